"""The Trainer callbacks of a run: Report (the progress bar, the logged losses said and kept),
LossWatchdog (stops a diverged run), Profiler (a Chrome trace of some steps), and
callbacks_for, which adds the watchdog, early stopping and the profiler as the config asks.

Imports transformers: the stage imports this module when it trains, not when it plans.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from stages.store import DataError


class Report(TrainerCallback):
    """Advances the progress bar each optimizer step; says each logged training and validation
    loss through `log` and keeps them (`history`, `evals`: metrics.json and loss.png); drops the
    pickled TrainingArguments from each checkpoint."""

    def __init__(self, advance, log, kept: tuple[str, ...] = ()):
        self.advance, self.log = advance, log
        self.kept = kept  # more logged metrics to keep per step, e.g. TRL's rewards/accuracies
        self.history: list[dict] = []
        self.evals: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.advance(1)

    def on_save(self, args, state, control, **kwargs):
        # the pickled TrainingArguments: resuming never reads it, and loading it would run code
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            extra = {f"eval_{k}": round(float(logs[f"eval_{k}"]), 6) for k in self.kept if f"eval_{k}" in logs}
            self.evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"], **extra})
            self.log(f"  step {state.global_step:>5}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")
        if logs and "loss" in logs:
            extra = {k: round(float(logs[k]), 6) for k in self.kept if k in logs}
            self.history.append({"step": state.global_step, "loss": round(float(logs["loss"]), 6), "lr": float(logs.get("learning_rate", 0.0)), **extra})
            self.log(f"  step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}")


class LossWatchdog(TrainerCallback):
    """Stops a run whose logged training loss stays above `threshold` for `patience` logs in a row
    (Axolotl's loss watchdog): a diverged run is an error, not a model."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.strikes = threshold, patience, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.check(state.global_step, float(logs["loss"]))

    def check(self, step: int, loss: float) -> None:
        self.strikes = self.strikes + 1 if loss > self.threshold else 0
        if self.strikes >= self.patience:
            raise DataError(
                f"loss watchdog: training loss {loss:.4f} above loss_watchdog_threshold ({self.threshold}) "
                f"for {self.strikes} logged steps in a row (step {step}); training aborted"
            )


class Profiler(TrainerCallback):
    """Records optimizer steps start+1 … start+steps with torch's profiler (CPU ops, and CUDA
    kernels on a GPU; tensor shapes and memory) and writes them as a Chrome trace
    (chrome://tracing, Perfetto, TensorBoard) to `path` (Axolotl's `profiler_steps`). The trace
    goes in the artifact: it is what the run did, with timings, so two runs' traces differ."""

    def __init__(self, start: int, steps: int, path: Path):
        self.start, self.steps, self.path = start, steps, path
        self.profiler, self.done = None, False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler is None and state.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            # a schedule makes the profiler mark each step (ProfilerStep#N spans)
            every_step = torch.profiler.schedule(wait=0, warmup=0, active=self.steps, repeat=1)
            self.profiler = torch.profiler.profile(activities=activities, schedule=every_step, on_trace_ready=self.write, record_shapes=True, profile_memory=True)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and not self.done:
            self.profiler.step()
            if state.global_step >= self.start + self.steps:
                self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None and not self.done:
            self.finish()  # the run was shorter than start + steps

    def finish(self):
        self.done = True
        self.profiler.__exit__(None, None, None)

    def write(self, profiler):
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            profiler.export_chrome_trace(str(self.path))


def callbacks_for(params, report: Report, out: Path) -> list[TrainerCallback]:
    """Report and what the config adds to it, in the order the Trainer calls them: the loss
    watchdog (`loss_watchdog_threshold`, `loss_watchdog_patience`, 3 by default) first, so the
    loss that trips it is not reported as trained; early stopping (`early_stopping_patience`); the
    profiler (`profiler_steps` from `profiler_steps_start`, its trace in `out`)."""
    callbacks: list[TrainerCallback] = []
    if params.loss_watchdog_threshold is not None:
        callbacks.append(LossWatchdog(params.loss_watchdog_threshold, params.loss_watchdog_patience or 3))
    callbacks.append(report)
    if params.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
    if params.profiler_steps:
        callbacks.append(Profiler(params.profiler_steps_start or 0, params.profiler_steps, out / "profiler_trace.json"))
    return callbacks
