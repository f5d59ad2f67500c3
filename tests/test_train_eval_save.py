"""eval_strategy / save_strategy (no, steps, epoch, best with metric_for_best_model and
greater_is_better), save_only_model, save_safetensors, and the eval-loss curve in loss.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.config import ConfigError, load_config
from stages.store import DataError
from stages.train import Params
from stages.training.arguments import schedule_checkpoints
from stages.training.plots import loss_figure


def newest_train(cache: Path) -> Path:
    return max(cache.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent


def test_evaluate_and_save_every_epoch(warm, molt, cache_dir):
    result = molt("train", warm(max_steps=None, num_epochs=2, eval_strategy="epoch", save_strategy="epoch", save_only_model=True))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    train = newest_train(cache_dir)
    metrics = json.loads((train / "metrics.json").read_text())
    per_epoch = metrics["steps_per_epoch"]
    assert metrics["steps"] == 2 * per_epoch
    assert [e["step"] for e in metrics["eval_history"]] == [per_epoch, 2 * per_epoch]
    assert metrics["checkpoints"] == [f"checkpoint-{per_epoch}", f"checkpoint-{2 * per_epoch}"]
    saved = train / "checkpoints" / f"checkpoint-{per_epoch}"
    assert (saved / "adapter_model.safetensors").exists()
    assert not (saved / "optimizer.pt").exists() and not (saved / "scheduler.pt").exists()  # save_only_model
    assert list(saved.glob("*.bin")) == []  # weights as safetensors; no pickled TrainingArguments
    assert not (train / "profiler_trace.json").exists()  # no profiler_steps, no trace


def test_save_best_saves_only_when_the_eval_loss_improves(warm, molt, cache_dir):
    # a learning rate far too high: some evaluations are worse than the best so far
    result = molt("train", warm(max_steps=6, learning_rate=30.0, lr_scheduler="constant", eval_steps=1, save_strategy="best"))
    assert result.exit_code == 0, result
    train = newest_train(cache_dir)
    metrics = json.loads((train / "metrics.json").read_text())
    evals = metrics["eval_history"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4, 5, 6]
    improved = [e["step"] for i, e in enumerate(evals) if all(e["eval_loss"] < p["eval_loss"] for p in evals[:i])]
    assert len(improved) < len(evals), evals  # the test means something only if some evaluation got worse
    assert metrics["checkpoints"] == [f"checkpoint-{s}" for s in improved]
    assert (train / "checkpoints" / f"checkpoint-{improved[0]}" / "optimizer.pt").exists()  # resumable by default


def test_strategies_set_the_trainer_arguments(tmp_path):
    from transformers import TrainingArguments

    def scheduled(**settings):
        args = TrainingArguments(output_dir=str(tmp_path), logging_steps=3, report_to=[])
        saving = schedule_checkpoints(args, Params(learning_rate=1e-3, **settings), steps_per_epoch=10, has_val=True)
        return args, saving

    args, saving = scheduled(eval_strategy="steps", save_strategy="best", greater_is_better=True, save_total_limit=2)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 3)  # no interval: evaluate when logging, as the Trainer does
    assert (args.save_strategy, args.metric_for_best_model, args.greater_is_better, args.save_total_limit) == ("best", "eval_loss", True, 2)
    assert saving
    args, saving = scheduled(evals_per_epoch=2, saves_per_epoch=5)
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 5, "steps", 2)
    args, saving = scheduled(eval_steps=4, save_strategy="no")
    assert args.save_strategy == "no" and not saving
    with pytest.raises(DataError, match="measures the loss only"):
        scheduled(eval_steps=1, save_strategy="best", metric_for_best_model="accuracy")
    with pytest.raises(DataError, match="save_strategy: steps needs save_steps"):
        scheduled(save_strategy="steps")
    with pytest.raises(DataError, match="no validation split"):
        schedule_checkpoints(TrainingArguments(output_dir=str(tmp_path), report_to=[]), Params(learning_rate=1e-3, eval_strategy="epoch"), 10, has_val=False)


@pytest.mark.parametrize("settings, words", [
    ({"eval_strategy": "epoch", "eval_steps": 5}, ["eval_strategy: epoch", "eval_steps"]),
    ({"save_strategy": "best", "saves_per_epoch": 2}, ["save_strategy: best", "saves_per_epoch"]),
    ({"save_strategy": "best"}, ["save_strategy: best", "eval_steps"]),
    ({"save_safetensors": False}, ["save_safetensors: false", "safetensors only"]),
    ({"eval_strategy": "sometimes"}, ["eval_strategy"]),
])
def test_contradictory_strategies_are_refused_at_load(tmp_path, settings, words):
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"base_model": "m", "datasets": [{"path": "d"}], **settings}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_the_loss_plot_draws_the_eval_curve():
    history = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 5)]
    evals = [{"step": 2, "eval_loss": 2.9}, {"step": 4, "eval_loss": 2.7}]
    lines = {line.get_label(): line for line in loss_figure(history, evals, 3.1, 2.7).axes[0].get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [0, 2, 4]  # before training, then each scheduled evaluation
    assert list(lines["eval loss"].get_ydata()) == [3.1, 2.9, 2.7]
    assert list(lines["train loss"].get_xdata()) == [1, 2, 3, 4]
    # without scheduled evaluations: the losses before and after, as two points (no curve)
    figure = loss_figure(history, [], 3.1, 2.8)
    assert "eval loss" not in {line.get_label() for line in figure.axes[0].get_lines()}
    assert figure.axes[0].collections[0].get_offsets().tolist() == [[0, 3.1], [4, 2.8]]
