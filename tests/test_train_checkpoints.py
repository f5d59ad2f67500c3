"""During training: evaluations and saves at fixed steps, save_total_limit, resuming from a saved
checkpoint (same final weights as the uninterrupted run), early stopping and the loss watchdog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def newest_train(cache: Path) -> Path:
    return max(cache.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(path / "adapter_model.safetensors").items()}


def test_evaluations_and_saves_at_steps(warm, molt, cache_dir):
    result = molt("train", warm(max_steps=4, eval_steps=1, save_steps=2, save_total_limit=1))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output
    metrics = json.loads((newest_train(cache_dir) / "metrics.json").read_text())
    assert [e["step"] for e in metrics["eval_history"]] == [1, 2, 3, 4]
    # the in-training evaluation is the same token-weighted loss as the final one
    assert metrics["eval_history"][-1]["eval_loss"] == pytest.approx(metrics["eval_loss_after"])
    assert metrics["checkpoints"] == ["checkpoint-4"]  # save_total_limit: 1 keeps the newest


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(warm, molt, cache_dir):
    settings = dict(max_steps=4, save_steps=2, learning_rate=0.01)
    whole = molt("train", warm(**settings))
    assert whole.exit_code == 0, whole
    first = newest_train(cache_dir)
    assert json.loads((first / "metrics.json").read_text())["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    resumed = molt("train", warm(**settings, resume_from_checkpoint=str(first / "checkpoints" / "checkpoint-2")))
    assert resumed.exit_code == 0, resumed
    second = newest_train(cache_dir)
    assert second != first
    a, b = adapter(first / "model"), adapter(second / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert json.loads((second / "metrics.json").read_text())["loss_history"][0]["step"] == 3  # steps 1-2 not redone


def test_early_stopping_ends_the_run(warm, molt, cache_dir):
    # a learning rate far too high: the eval loss rises and patience 1 stops the run (at 3.0 the
    # tiny LoRA still improved at every one of the 10 evaluations; at 300 the losses are NaN)
    result = molt("train", warm(max_steps=10, learning_rate=30.0, lr_scheduler="constant", eval_steps=1, save_steps=1, early_stopping_patience=1))
    assert result.exit_code == 0, result
    metrics = json.loads((newest_train(cache_dir) / "metrics.json").read_text())
    losses = [e["eval_loss"] for e in metrics["eval_history"]]
    # it stopped at the first evaluation that did not improve on the best so far
    worse = next(i for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))
    assert metrics["steps"] == worse + 1 < 10, losses
    # and ended with the best checkpoint's weights
    assert metrics["eval_loss_after"] == pytest.approx(min(losses))


def test_loss_watchdog_aborts_with_the_reason(warm, molt, cache_dir):
    before = set(cache_dir.glob("train/*"))
    result = molt("train", warm(max_steps=4, loss_watchdog_threshold=1.0, loss_watchdog_patience=2))
    assert result.exit_code == 2, result
    assert "loss watchdog" in result.output and "loss_watchdog_threshold (1.0)" in result.output
    assert set(cache_dir.glob("train/*/manifest.json")) == {p / "manifest.json" for p in before if (p / "manifest.json").exists()}


def test_intervals_per_epoch_and_watchdog_patience():
    from stages.store import DataError
    from stages.training.arguments import every
    from stages.training.callbacks import LossWatchdog

    assert every(None, 4, 10) == 2 and every(None, 20, 10) == 1  # at least every step
    assert every(0.25, None, 10) == 0.25 and every(None, None, 10) is None
    dog = LossWatchdog(threshold=2.0, patience=2)
    dog.check(1, 3.0)
    dog.check(2, 1.0)  # back under: the count starts again
    dog.check(3, 3.0)
    with pytest.raises(DataError, match="2 logged steps in a row"):
        dog.check(4, 3.0)
