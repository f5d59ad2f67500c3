"""End to end on the embedded SmolLM2-135M-Instruct: the demo's path, shortened."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from stages.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_smollm2_lora_lowers_held_out_loss_then_everything_is_cached(tmp_path, monkeypatch):
    config = yaml.safe_load((REPO / "pipelines" / "smollm2-lora.yml").read_text())
    for entry in config["datasets"]:
        entry["path"] = str(REPO / entry["path"])
    config.update(max_steps=8, val_set_size=16, output_dir=str(tmp_path / "out"), logging_steps=2)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config))
    cache = ["--cache-dir", str(REPO / "cache")]  # the SmolLM2 conversion is shared with the demo
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["train", str(path), *cache])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < 0.8 * metrics["eval_loss_before"]
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000

    # the rerun in a fresh process, to see whether a fully cached run loads torch
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom stages.cli import main\n"
        f"r = CliRunner().invoke(main, ['train', {str(path)!r}, '--cache-dir', {str(REPO / 'cache')!r}])\n"
        "print(r.output)\nprint('exit', r.exit_code, 'torch' in sys.modules)\n"
    )
    started = time.perf_counter()
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert again.stdout.strip().endswith("exit 0 False"), again.stdout + again.stderr
    assert "built" not in again.stdout and "held-out loss" in again.stdout
    assert seconds < 30
