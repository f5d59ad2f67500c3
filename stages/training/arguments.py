"""The config's keys translated into transformers' TrainingArguments: batch sizes, epochs, the
optimizer and its schedule, activation checkpointing, precision, torch.compile, Liger kernels,
FSDP and DDP (training/sharding.py) and trackers (training_arguments); once the steps per epoch are known, when to evaluate and save
(schedule_checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

from stages.store import DataError
from stages.training.optim import check_optimizer, trainer_optimizer_name
from stages.training.precision import compile_settings, liger_settings, precision_settings
from stages.training.sharding import ddp_settings, fsdp_settings
from stages.training.trackers import trackers


def training_arguments(params, model, layout: dict, output_dir: Path, log):
    """TrainingArguments for the run, before the step-dependent schedule (logging_steps and
    schedule_checkpoints, which need the steps per epoch). Micro-batches are pack's
    `rows_per_batch` rows (layout.json); evaluation and saving start switched off; nothing is
    reported anywhere unless a tracker is configured; `log` gets the precision notes."""
    from transformers import TrainingArguments

    warmup = params.warmup_steps if params.warmup_steps is not None else (params.warmup_ratio or 0.0)
    return TrainingArguments(
        output_dir=str(output_dir),  # moved into the artifact when saves are scheduled
        per_device_train_batch_size=layout["train"]["rows_per_batch"],
        per_device_eval_batch_size=layout["val"]["rows_per_batch"],
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        num_train_epochs=params.num_epochs,
        max_steps=params.max_steps or -1,
        learning_rate=params.learning_rate,
        **optimizer_settings(params),
        **schedule_settings(params),
        **checkpointing_settings(params, model),
        **precision_settings(params, log=log),
        **compile_settings(params),
        **liger_settings(params),
        **fsdp_settings(params),
        **ddp_settings(params),
        warmup_steps=warmup,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm if params.max_grad_norm is not None else 1.0,
        seed=params.seed,
        data_seed=params.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to=trackers(params),  # none unless the config asks; no telemetry
        run_name=params.wandb_name or params.mlflow_run_name,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        average_tokens_across_devices=True,  # the loss divides by the trained tokens of all ranks
        neftune_noise_alpha=params.neftune_noise_alpha,
        **deepspeed_settings(params),
    )


def deepspeed_settings(params) -> dict:
    """The config's DeepSpeed settings (checked at load, stages/deepspeed_config.py) for the Trainer,
    which fills their "auto" values in place: a copy, so the stage's params stay as they were.
    The preference and reward stages declare no `deepspeed` (the config refuses it with them)."""
    settings = getattr(params, "deepspeed", None)
    if not settings:
        return {}
    settings = json.loads(json.dumps(settings))
    if settings.get("train_batch_size") == "auto":
        # the Trainer fills it while TrainingArguments is built, before its processes are counted
        # (world size 1 on CPU ranks); DeepSpeed computes it from the micro-batch, the accumulation
        # and its own world size when it is left out
        del settings["train_batch_size"]
    return {"deepspeed": settings}


def schedule_settings(params) -> dict:
    """TrainingArguments for the learning-rate schedule. Names are transformers' (linear, cosine,
    constant, constant_with_warmup, cosine_with_restarts, polynomial, inverse_sqrt, ...);
    `cosine_min_lr_ratio` turns cosine into cosine_with_min_lr (the floor a fraction of the peak).
    one_cycle, log_sweep, lr_quadratic_warmup and cosine_constant_lr_ratio are built by
    training.optim.make_scheduler (MoltTrainer.create_scheduler); which keys combine is checked
    at config load."""
    name, kwargs = params.lr_scheduler, dict(params.lr_scheduler_kwargs or {})
    if name in ("one_cycle", "log_sweep"):
        return {"lr_scheduler_type": "constant"}  # replaced by create_scheduler
    if name == "cosine" and params.cosine_min_lr_ratio is not None:
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": params.cosine_min_lr_ratio, **kwargs}
    from transformers import SchedulerType

    if name not in {s.value for s in SchedulerType}:
        raise DataError(f"lr_scheduler: {name!r} is not a scheduler; use one of one_cycle, log_sweep, {', '.join(s.value for s in SchedulerType)}")
    return {"lr_scheduler_type": name, "lr_scheduler_kwargs": kwargs}


def optimizer_settings(params) -> dict:
    """TrainingArguments for the optimizer: its name (a stand-in for the ones molt builds), Adam's
    betas and epsilon where given, `optim_args` as transformers' "k=v,k=v" string (Axolotl also
    takes a mapping), `optim_target_modules` for GaLore / APOLLO."""
    check_optimizer(params.optimizer)
    settings = {"optim": trainer_optimizer_name(params.optimizer)}
    settings.update({name: getattr(params, name) for name in ("adam_beta1", "adam_beta2", "adam_epsilon") if getattr(params, name) is not None})
    if isinstance(params.optim_args, dict):
        settings["optim_args"] = ",".join(f"{k}={v}" for k, v in params.optim_args.items())
    elif params.optim_args:
        settings["optim_args"] = params.optim_args
    if params.optim_target_modules:
        # Axolotl also spells transformers' all-linear with an underscore
        settings["optim_target_modules"] = "all-linear" if params.optim_target_modules == "all_linear" else params.optim_target_modules
    return settings


def checkpointing_settings(params, model) -> dict:
    """Activation checkpointing: recompute each layer's activations in the backward pass (less
    memory, same gradients). Non-reentrant by default, which needs no input gradients; with the
    reentrant variant a frozen embedding would cut the graph, so the inputs are made to need grads."""
    if not params.gradient_checkpointing:  # true, or offload (MoltTrainer keeps what it saves in CPU memory)
        return {}
    kwargs = {"use_reentrant": False, **(params.gradient_checkpointing_kwargs or {})}
    if kwargs["use_reentrant"] and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}


def every(steps: int | float | None, per_epoch: int | None, steps_per_epoch: int) -> int | float | None:
    """An evaluation or save interval in optimizer steps (a float < 1 stays a fraction of the run,
    which the Trainer resolves), from `*_steps` or `*s_per_epoch`; None: never."""
    if per_epoch:
        return max(1, steps_per_epoch // per_epoch)
    return steps


def schedule_checkpoints(args, params, steps_per_epoch: int, has_val: bool) -> bool:
    """Evaluation and saving during training; returns whether checkpoints are saved. An interval
    (`eval_steps`, `evals_per_epoch`, `save_steps`, `saves_per_epoch`) means the "steps"
    strategy; `eval_strategy` / `save_strategy` say it outright (no, steps, epoch; saves also
    best: a checkpoint whenever `metric_for_best_model` improves). Checkpoints go to the
    artifact's `checkpoints/` (a later run resumes from one with `resume_from_checkpoint`);
    early stopping keeps the best one and ends with its weights."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    eval_every = every(params.eval_steps, params.evals_per_epoch, steps_per_epoch)
    save_every = every(params.save_steps, params.saves_per_epoch, steps_per_epoch)
    evaluate = params.eval_strategy or ("steps" if eval_every else "no")
    save = params.save_strategy or ("steps" if save_every else "no")
    if evaluate not in ("no", "steps", "epoch"):
        raise DataError(f"eval_strategy: {evaluate!r}: use no, steps or epoch")
    if save not in ("no", "steps", "epoch", "best"):
        raise DataError(f"save_strategy: {save!r}: use no, steps, epoch or best")
    if evaluate != "no" and not has_val:
        raise DataError(f"eval_strategy {evaluate} (eval_steps / evals_per_epoch): there is no validation split (set val_set_size or test_datasets)")
    if save == "steps" and not save_every:
        raise DataError("save_strategy: steps needs save_steps or saves_per_epoch")
    if save == "best" and evaluate == "no":
        raise DataError("save_strategy: best saves at evaluations: schedule them (eval_steps, evals_per_epoch or eval_strategy)")
    metric = params.metric_for_best_model or "eval_loss"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    if metric != "eval_loss":
        raise DataError(f"metric_for_best_model: {params.metric_for_best_model!r}: molt's evaluation measures the loss only (use eval_loss)")
    higher = params.greater_is_better if params.greater_is_better is not None else False
    args.eval_strategy = IntervalStrategy(evaluate)
    if evaluate == "steps":
        args.eval_steps = eval_every or args.logging_steps  # the Trainer's default: evaluate when it logs
    args.save_strategy = SaveStrategy(save)
    if save == "steps":
        args.save_steps = save_every
    args.save_total_limit, args.save_only_model = params.save_total_limit, params.save_only_model
    if save == "best" or params.early_stopping_patience:
        args.metric_for_best_model, args.greater_is_better = metric, higher
    if params.early_stopping_patience:
        args.load_best_model_at_end = True
    return save != "no"


def count_deepspeed_ranks(args) -> None:
    """DeepSpeed on CPU processes: accelerate finds no backend for a DeepSpeed run without a GPU
    and counts one process, so every rank would train on all the rows (and the Trainer's batch
    arithmetic would be one rank's). DeepSpeed's own CPU accelerator has joined the ranks over
    gloo: accelerate's shared state is given that group's size and this rank's place in it."""
    import os

    import torch.distributed as dist
    from accelerate.utils import DistributedType

    state = args.distributed_state
    if args.deepspeed and state.distributed_type == DistributedType.DEEPSPEED and state.backend is None and dist.is_initialized():
        state.backend = dist.get_backend()
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
