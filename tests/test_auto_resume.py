"""auto_resume_from_checkpoints: a `molt train` killed after a checkpoint carries on from it (the
checkpoints live in the store's per-key partial dir, not in the run's temp dir) and ends with the
weights of the uninterrupted run; without the key a rerun starts afresh."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO

SETTINGS = dict(max_steps=12, save_steps=3, learning_rate=0.01, lr_scheduler="constant", val_set_size=0.0, sample_packing=False)


def adapter(train_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(train_dir / "model" / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_killed_run_resumes_from_its_last_checkpoint(make_config, molt, cache_dir, workdir):
    config = make_config(**SETTINGS)
    whole = molt("train", config)
    assert whole.exit_code == 0, whole
    (train_dir,) = [p.parent for p in cache_dir.glob("train/*/manifest.json")]
    expected, expected_metrics = adapter(train_dir), json.loads((train_dir / "metrics.json").read_text())
    assert expected_metrics["checkpoints"] == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert not list(cache_dir.glob("train/*.partial"))  # scheduled saves moved into the artifact
    shutil.rmtree(train_dir)

    # the same run as a process of its own, killed once its first checkpoint is whole
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.Popen([sys.executable, "-m", "stages.cli", "train", str(config), "--cache-dir", str(cache_dir)],
                           cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (first := [p for p in cache_dir.glob("train/*.partial/checkpoints/checkpoint-3/trainer_state.json") if _whole(p)]):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not list(cache_dir.glob("train/*/manifest.json"))  # nothing committed
    partial = first[0].parent.parent  # cache/train/<key>.partial/checkpoints
    assert partial.parent.name == f"{train_dir.name}.partial", "the train key changed: a stage module was edited meanwhile?"
    whole_saves = [int(p.parent.name.split("-")[1]) for p in partial.glob("checkpoint-*/trainer_state.json") if _whole(p)]
    dry = molt("gc", "--dry-run")
    assert "checkpoints of an unfinished run" in dry.output and partial.exists()
    last = max(whole_saves)

    resumed = molt("train", make_config(**SETTINGS, auto_resume_from_checkpoints=True))
    assert resumed.exit_code == 0, resumed
    assert "not supported yet" not in resumed.output and f"resuming from {partial / f'checkpoint-{last}'}" in resumed.output
    (resumed_dir,) = [p.parent for p in cache_dir.glob("train/*/manifest.json")]
    assert resumed_dir.name == train_dir.name  # auto_resume is not part of the key: the same artifact
    metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert metrics["loss_history"][0]["step"] == last + 1  # carried on; the steps before are not redone
    # each later step saw the batches it saw uninterrupted: the sampler resumed in the same order
    later = [h for h in expected_metrics["loss_history"] if h["step"] > last]
    assert [h["step"] for h in metrics["loss_history"]] == [h["step"] for h in later]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in metrics["loss_history"]]), torch.tensor([h["loss"] for h in later]), rtol=0, atol=1e-4)
    assert_same_weights(adapter(resumed_dir), expected)
    assert metrics["checkpoints"] == expected_metrics["checkpoints"]
    assert not partial.parent.exists()  # committed: the partial dir is gone

    # a killed run's checkpoint left behind, and a rerun without auto_resume: it starts at step 1,
    # and the leftover is neither resumed from nor kept
    shutil.copytree(resumed_dir / "checkpoints" / "checkpoint-6", partial / "checkpoint-6")
    shutil.rmtree(resumed_dir)
    afresh = molt("train", make_config(**SETTINGS))
    assert afresh.exit_code == 0, afresh
    (afresh_dir,) = [p.parent for p in cache_dir.glob("train/*/manifest.json")]
    assert json.loads((afresh_dir / "metrics.json").read_text())["loss_history"][0]["step"] == 1
    assert_same_weights(adapter(afresh_dir), expected)
    assert not partial.parent.exists()


def test_gc_drops_a_killed_runs_checkpoints_unless_a_run_holds_the_key(molt, cache_dir):
    from stages.store import Store

    store = Store(cache_dir)
    partial = store.partial_dir("train", "ab" * 16)
    (partial / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (partial / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with store.lock("train", "ab" * 16):  # a run is training that key now
        assert molt("gc").exit_code == 0
    assert partial.exists()
    result = molt("gc")
    assert result.exit_code == 0 and "checkpoints of an unfinished run" in result.output
    assert not partial.exists()


def _whole(state: Path) -> bool:
    """A checkpoint's trainer_state.json written to the end (the kill may land mid-write)."""
    try:
        json.loads(state.read_text())
        return True
    except (OSError, ValueError):
        return False
