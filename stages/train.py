"""train: the base model fine-tuned on the packed data, full or with a LoRA adapter.

Reads the fetched model, the tokenizer and pack's `train.arrow` / `val.arrow` / `layout.json`.
Writes `model/` (the full model, or the adapter, with the tokenizer and its chat template; with
ReLoRA the full model), `metrics.json` (loss and learning rate per logged step, eval losses),
`loss.png` (training and validation loss), `profiler_trace.json` with `profiler_steps`, and
`checkpoints/` when saves are scheduled (what `resume_from_checkpoint` points at). Trackers
(tensorboard, wandb, mlflow, comet) write outside the artifact (training/trackers.py). While it
runs, checkpoints go to the store's per-key `checkpoints` dir (`ctx.checkpoints`), which outlives
a killed run: `auto_resume_from_checkpoints` carries on from the newest one there.

The order of work: load the model (training/trainer.py; peft for LoRA / DoRA / LoRA+,
bitsandbytes for a 4-bit (QLoRA) or 8-bit base); turn the config into TrainingArguments and
schedule evaluations and saves by the steps per epoch (training/arguments.py); measure the
validation loss; train with the transformers Trainer (MoltTrainer: micro-batches of
training/batches.py, the loss of training/loss.py, the callbacks of training/callbacks.py,
ReLoRA restarts of training/relora.py); measure the validation loss again; save the model with
the tokenizer, the scheduled checkpoints, metrics.json and loss.png (training/plots.py).

Batches: a micro-batch is `layout.rows_per_batch` rows; each epoch a fresh order drawn from
`seed` and the epoch, every rank the same number of micro-batches, every row on exactly one rank
once. Loss: summed over trained tokens, divided by the trained tokens of the whole optimizer step
(all micro-batches of the accumulation, all ranks): packing changes neither the loss nor the
gradients. The validation loss is token-weighted the same way (training/evaluation.py).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from stages.config import stage_params
from stages.context import QUIET, Context
from stages.deepspeed_config import zero_stage
from stages.store import DataError, list_files, read_table
from stages.training.arguments import count_deepspeed_ranks, schedule_checkpoints, training_arguments
from stages.training.batches import RankBatches, Rows, make_collator
from stages.training.evaluation import evaluation_loss
from stages.training.outputs import keep_checkpoints, save_model
from stages.training.plots import save_loss_plot
from stages.training.resources import MemoryPeak, set_threads
from stages.training.sharding import check_fsdp, check_resume, fsdp_enabled, gathered_state_dict
from stages.training.trackers import tracker_environment

SCHEMA = 3
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
INPUTS = {"packed": "pack", "model": "fetch_model", "tokenizer": "tokenizer"}
EVERY_RANK = True  # DDP needs every rank in the run


# tracker keys say where a run is reported, not what it computes (their logs live outside the artifact);
# auto_resume_from_checkpoints says how to run, not what: a resumed run ends with the same weights;
# so do DDP's timeout, gradient buckets and unused-parameter search (the same gradients, reduced otherwise)
Params = stage_params(
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "lora_modules_to_save",
    "lora_fan_in_fan_out", "lora_model_dir", "peft_use_dora", "peft_layers_to_transform", "loraplus_lr_ratio", "loraplus_lr_embedding",
    "unfrozen_parameters", "neftune_noise_alpha", "load_in_4bit", "load_in_8bit", "bnb_config_kwargs", "trust_remote_code", "model_type",
    "overrides_of_model_config", "overrides_of_model_kwargs", "resize_token_embeddings_to_32x", "peft",
    "micro_batch_size", "gradient_accumulation_steps", "eval_batch_size", "num_epochs", "max_steps", "optimizer", "lr_scheduler",
    "warmup_steps", "warmup_ratio", "cosine_min_lr_ratio", "lr_div_factor", "lr_scheduler_kwargs", "adam_beta1", "adam_beta2",
    "adam_epsilon", "optim_args", "optim_target_modules", "lr_groups", "cosine_constant_lr_ratio", "lr_quadratic_warmup",
    "log_sweep_min_lr", "log_sweep_max_lr", "weight_decay", "max_grad_norm", "seed",
    "bf16", "fp16", "tf32", "bfloat16", "float16", "float32", "attn_implementation", "flash_attention", "sdp_attention",
    "xformers_attention", "eager_attention", "torch_compile", "torch_compile_backend", "torch_compile_mode", "plugins", "liger_rope",
    "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu", "cut_cross_entropy", "chunked_cross_entropy",
    "liger_cross_entropy", "liger_fused_linear_cross_entropy", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "logging_steps", "eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch", "save_total_limit", "early_stopping_patience",
    "loss_watchdog_threshold", "loss_watchdog_patience", "eval_strategy", "save_strategy", "metric_for_best_model", "greater_is_better",
    "save_safetensors", "save_only_model", "profiler_steps", "profiler_steps_start", "resume_from_checkpoint",
    "relora_steps", "relora_warmup_steps", "relora_anneal_steps", "relora_prune_ratio", "relora_cpu_offload",
    "pad_to_sequence_len", "batch_flattening", "group_by_length", "curriculum_sampling", "deepspeed",
    "fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type", "ddp_broadcast_buffers",
    required=("learning_rate",),
    unkeyed=("use_tensorboard", "wandb_project", "wandb_name", "wandb_entity", "wandb_mode", "wandb_run_id", "wandb_watch", "wandb_log_model",
             "use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "use_comet", "comet_mode", "comet_project_name",
             "auto_resume_from_checkpoints", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_find_unused_parameters"),
)


def sources(params: Params) -> list[tuple[str, Path]]:
    """The adapter continued from (`lora_model_dir`) and the checkpoint resumed from
    (`resume_from_checkpoint`): their content is part of the key."""
    out = []
    for key in ("lora_model_dir", "resume_from_checkpoint"):
        if getattr(params, key):
            root = Path(getattr(params, key))
            if not root.is_dir():
                raise DataError(f"{key} {root}: not a directory")
            out += [(f"{key}/{p.relative_to(root).as_posix()}", p) for p in list_files(root)]
    return out


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    from transformers import PrinterCallback, set_seed

    # these import transformers: loaded when the stage trains, not when a plan imports the stage
    from stages.training.callbacks import Report, callbacks_for
    from stages.training.trainer import MoltTrainer, last_checkpoint, model_to_train

    checkpoints = ctx.checkpoints or out.parent / f"{out.name}.checkpoints"
    set_seed(params.seed)
    set_threads(ctx.log)
    memory = MemoryPeak()
    memory.start()
    tokenizer_info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    pad_id = tokenizer_info["pad_token_id"]
    layout = json.loads((inputs["packed"] / "layout.json").read_text())
    train_rows = Rows(read_table(inputs["packed"] / "train.arrow"), pad_id)
    val_rows = Rows(read_table(inputs["packed"] / "val.arrow"), pad_id)
    if len(train_rows) == 0:
        raise DataError("no training rows: every sample was dropped before packing")
    packed = layout["train"]["packed"] or layout["val"]["packed"]
    model, flatten = model_to_train(params, inputs["model"], tokenizer_info["vocab_size"], packed, ctx.log)
    check_fsdp(params, model, ctx.world_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    args = training_arguments(params, model, layout, checkpoints, ctx.log)
    count_deepspeed_ranks(args)
    # counted over the Trainer's world (torch.distributed), the one MoltTrainer deals batches out over
    batches_per_epoch = len(RankBatches(train_rows.lengths, layout["train"]["rows_per_batch"], max(1, args.world_size), 0, params.seed))
    steps_per_epoch = max(1, -(-batches_per_epoch // params.gradient_accumulation_steps))
    total_steps = params.max_steps or max(1, math.ceil(steps_per_epoch * params.num_epochs))
    args.logging_steps = params.logging_steps or max(1, total_steps // 20)
    saving = schedule_checkpoints(args, params, steps_per_epoch, len(val_rows) > 0)
    collators = {split: make_collator(layout[split], pad_id, bool(params.pad_to_sequence_len), flatten) for split in ("train", "val")}
    relora = None
    if params.relora_steps:
        from stages.training.relora import ReLoRACallback

        relora = ReLoRACallback(params.relora_steps, params.relora_warmup_steps or 0, params.relora_anneal_steps or 0, 0.9 if params.relora_prune_ratio is None else params.relora_prune_ratio, params.relora_cpu_offload, params.seed)

    with ctx.progress("train", total_steps) as advance, tracker_environment(params, ctx.log):
        report = Report(advance, ctx.log)
        callbacks = callbacks_for(params, report, out) + ([relora] if relora is not None else [])
        trainer = MoltTrainer(params, train_rows, val_rows, collators, model=model, args=args, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # Report says the loss; no raw dicts
        ctx.log(f"  loss: {trainer.trained_token_loss.describe()}")
        before = evaluation_loss(trainer, trainer.get_eval_dataloader()) if len(val_rows) else None
        if before is not None:
            ctx.log(f"  eval loss before training: {before:.4f}")
        started = time.perf_counter()
        resume = params.resume_from_checkpoint
        if resume is None and params.auto_resume_from_checkpoints:
            resume = last_checkpoint(checkpoints)
            ctx.log(f"  resuming from {resume}" if resume else "  no checkpoint to resume from: starting afresh")
        elif ctx.rank == 0:
            shutil.rmtree(checkpoints, ignore_errors=True)  # a killed run's saves are not this run's
        check_resume(params, resume, ctx.world_size)
        if relora is not None:
            relora.resume_from = resume  # its base weights, changed by earlier restarts, are in the checkpoint
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
        after = evaluation_loss(trainer, trainer.get_eval_dataloader()) if len(val_rows) else None
        if after is not None:
            ctx.log(f"  eval loss after training:  {after:.4f}")

    if relora is not None:
        model = model.merge_and_unload()  # ReLoRA's earlier updates live in the base weights: the artifact is the full model
    if fsdp_enabled(params):
        # each rank holds a shard: gathered whole (every rank takes part), written by rank 0, whose artifact is the one kept
        whole = gathered_state_dict(trainer)
        if ctx.rank == 0:
            save_model(model, inputs["tokenizer"], out, state_dict=whole)
    elif params.deepspeed and zero_stage(params.deepspeed) == 3:
        # ZeRO-3 leaves each rank a partition of every weight: the 16-bit weights gathered from
        # DeepSpeed's engine (every rank takes part; rank 0 alone receives them), written by rank 0
        gathered = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if ctx.rank == 0:
            whole = {k: v.detach().to("cpu").clone() for k, v in gathered.items()}
            save_model(model, inputs["tokenizer"], out, state_dict=whole)
    else:
        save_model(model, inputs["tokenizer"], out)
    keep_checkpoints(checkpoints, out, saving, ctx.rank)
    metrics = {
        "steps": result.global_step,
        "train_loss": round(float(result.training_loss), 6),
        "loss_history": report.history,
        "eval_history": report.evals,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps_per_epoch": steps_per_epoch,
        "micro_batches_per_epoch": batches_per_epoch,
        "trainable_parameters": trainable,
        **({"relora_restarts": relora.restarts} if relora is not None else {}),
        # what accelerate ran, not what the config asked for (one process trains unsharded)
        **({"fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version} if trainer.is_fsdp_enabled else {}),
        # asked of DeepSpeed's engine: the stage it ran, not the one the config asked for
        **({"deepspeed_zero_stage": trainer.deepspeed.zero_optimization_stage()} if trainer.is_deepspeed_enabled else {}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_loss_plot(report.history, report.evals, before, after, out / "loss.png")
    trained_tokens = sum(train_rows.lengths)
    # timings go in the manifest, not in metrics.json: the artifact's bytes stay reproducible
    return {"metrics": {k: v for k, v in metrics.items() if k not in ("loss_history", "eval_history")}, "adapter": params.adapter, "train_seconds": round(seconds, 3), "tokens_per_epoch": trained_tokens,
            "loss": trainer.trained_token_loss.describe(), **memory.peak()}
