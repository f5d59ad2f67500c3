"""What a training stage does around the Trainer's own loop and leaves in its artifact: the
evaluations before and after training (run_evaluated, for TRL's trainers), `model/` with the
tokenizer beside it (save_model), the scheduled checkpoints (keep_checkpoints), metrics.json and
loss.png (write_metrics)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from stages.store import list_files


def held_out(trainer) -> dict:
    """The trainer's held-out metrics (loss, TRL's reward metrics), rounded for the record."""
    found = trainer.evaluate()
    return {k: round(float(v), 6) for k, v in sorted(found.items()) if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second", "_preparation_time"))}


def run_evaluated(trainer, evaluate: bool, callbacks: list, checkpoints: Path, log, shown: tuple[str, ...]):
    """Evaluate, train, evaluate: (before, train result, seconds, after). The callbacks join after
    the first evaluation, which is no step of the run; a killed run's checkpoints are dropped."""
    before = held_out(trainer) if evaluate else {}
    for callback in callbacks:
        trainer.add_callback(callback)
    if before:
        log("  before training: " + said(before, shown))
    shutil.rmtree(checkpoints, ignore_errors=True)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    after = held_out(trainer) if evaluate else {}
    if after:
        log("  after training:  " + said(after, shown))
    return before, result, seconds, after


def said(metrics: dict, shown: tuple[str, ...]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {metrics[k]:.4f}" for k in shown if k in metrics)


def save_model(model, tokenizer_dir: Path, out: Path, state_dict: dict | None = None) -> Path:
    """`out/model/`: the weights (or adapter) with the tokenizer files and chat template;
    `state_dict`: the weights gathered from a sharded (FSDP) model."""
    model_dir = out / "model"
    model.save_pretrained(model_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
    for p in list_files(tokenizer_dir):
        if p.name != "manifest.json":
            shutil.copy2(p, model_dir / p.name)
    return model_dir


def keep_checkpoints(checkpoints: Path, out: Path, saving: bool, rank: int) -> None:
    """The scheduled saves moved into the artifact's `checkpoints/` (rank 0 owns them)."""
    if saving and rank == 0:
        (out / "checkpoints").mkdir()
        for saved in checkpoints.glob("checkpoint-*"):
            shutil.move(saved, out / "checkpoints" / saved.name)


def write_metrics(out: Path, metrics: dict, report, before: dict, after: dict, kept: tuple[str, ...]) -> dict:
    """metrics.json (with the per-step history and the held-out metrics before and after) and
    loss.png; returns what the manifest records (no per-step history)."""
    from stages.training.plots import save_loss_plot

    metrics = {**metrics, "loss_history": report.history, "eval_history": report.evals, "eval_before": before, "eval_after": after,
               "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_loss_plot(report.history, report.evals, before.get("eval_loss"), after.get("eval_loss"), out / "loss.png", kept)
    return {k: v for k, v in metrics.items() if k not in ("loss_history", "eval_history")}
