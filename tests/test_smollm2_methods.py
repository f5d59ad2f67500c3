"""Slow, end to end on the embedded SmolLM2-135M-Instruct with the demo data (shortened): LoRA,
QLoRA (4-bit base through bitsandbytes on CPU) and full fine-tuning each lower the held-out loss.
The three runs share the fetched SmolLM2 conversion and the prepared data (one store)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import invoke_molt

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# each method's own keys on top of the shortened demo config
METHODS = {
    "lora": {"adapter": "lora", "learning_rate": 1e-3},
    "qlora": {"adapter": "qlora", "load_in_4bit": True, "learning_rate": 1e-3},
    "full": {"adapter": None, "lora_r": None, "lora_alpha": None, "lora_dropout": None, "lora_target_linear": None, "learning_rate": 5e-5},
}


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory) -> dict:
    """The demo config shortened (4 steps, 128-token rows, 8 held-out rows), its data prepared
    once in the repository's store, where the SmolLM2 conversion is shared with the demo."""
    config = yaml.safe_load((REPO / "pipelines" / "smollm2-lora.yml").read_text())
    for entry in config["datasets"]:
        entry["path"] = str(REPO / entry["path"])
    config.update(max_steps=4, sequence_len=128, val_set_size=8, logging_steps=1, warmup_ratio=None, warmup_steps=1,
                  dataset_prepared_path=str(tmp_path_factory.mktemp("prepared")))
    root = tmp_path_factory.mktemp("smollm2-methods")
    path = root / "prepare.yml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(root / "unused")}))
    result = invoke_molt("run", path, "--until", "pack", cache=REPO / "cache")
    assert result.exit_code == 0, result
    return {"config": config, "root": root, "seconds": {}}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_lowers_the_held_out_loss(smollm2_demo, method):
    config = {**smollm2_demo["config"], **METHODS[method], "output_dir": str(smollm2_demo["root"] / method)}
    config = {k: v for k, v in config.items() if v is not None}
    path = smollm2_demo["root"] / f"{method}.yml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    result = invoke_molt("train", path, cache=REPO / "cache")
    smollm2_demo["seconds"][method] = round(time.perf_counter() - started, 1)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output
    out = Path(config["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / weights).exists()
    print(f"{method}: eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} in {smollm2_demo['seconds'][method]} s")
