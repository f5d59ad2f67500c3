"""train: the base model fine-tuned on the packed data, full or with a LoRA adapter.

Reads the fetched model, the tokenizer and pack's `train.arrow` / `val.arrow` / `layout.json`.
Trains with the transformers Trainer (peft for LoRA / DoRA / LoRA+, bitsandbytes for a 4-bit
(QLoRA) or 8-bit base, stages/training/relora.py for ReLoRA restarts); measures the validation
loss before and after, and as `eval_strategy` / `eval_steps` schedule it.
Writes `model/` (the full model, or the adapter, with the tokenizer and its chat template; with
ReLoRA the full model), `metrics.json` (loss and learning rate per logged step, eval losses),
`loss.png` (training and validation loss), `profiler_trace.json` with `profiler_steps`, and
`checkpoints/` when saves are scheduled (what `resume_from_checkpoint` points at). Trackers
(tensorboard, wandb, mlflow, comet) write outside the artifact (see tracker_environment). While it runs,
checkpoints go to the store's per-key `checkpoints` dir, which outlives a killed run:
`auto_resume_from_checkpoints` carries on from the newest one there.

Batches: a micro-batch is `layout.rows_per_batch` rows (1 row of `micro_batch_size × sequence_len`
tokens when pack made multipack bins, else `micro_batch_size` rows). `epoch_batches` deals them
out: each epoch a fresh order drawn from `seed` and the epoch, every rank the same number of
micro-batches (no rank waits at the end of an epoch), every row on exactly one rank once.
`collate` pads to the longest row rounded up to 8, or to the row capacity with
`pad_to_sequence_len`; `batch_flattening` concatenates a micro-batch into one row.

Loss: summed over trained tokens, divided by the trained tokens of the whole optimizer step
(all micro-batches of the accumulation, all ranks): packing changes neither the loss nor the
gradients. The validation loss is token-weighted the same way.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, Field

from stages.store import DataError, list_files, read_table
from stages.training.arguments import schedule_checkpoints, training_arguments
from stages.training.batches import RankBatches, Rows, data_loader, make_collator
from stages.training.evaluation import evaluation_loss
from stages.training.loss import token_loss
from stages.training.model import check_packed_masking, is_causal_lm, load_for_training
from stages.training.optim import make_optimizer, make_scheduler
from stages.training.plots import save_loss_plot
from stages.training.precision import cast_weights, offloaded_activations, set_attention
from stages.training.trackers import tracker_environment
from stages.context import QUIET, Context
from stages.ui import console, progress

SCHEMA = 3
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
INPUTS = {"packed": "pack", "model": "fetch_model", "tokenizer": "tokenizer"}
EVERY_RANK = True  # DDP: every rank trains; rank 0 commits


class Params(BaseModel, frozen=True):
    adapter: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_fan_in_fan_out: bool | None = None
    lora_model_dir: str | None = None
    peft_use_dora: bool | None = None
    peft_layers_to_transform: list[int] | int | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float | None = None
    unfrozen_parameters: list[str] | None = None
    neftune_noise_alpha: float | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_config_kwargs: dict | None = None
    trust_remote_code: bool = False
    model_type: str | None = None
    overrides_of_model_config: dict | None = None
    overrides_of_model_kwargs: dict | None = None
    resize_token_embeddings_to_32x: bool = False
    peft: dict | None = None
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    eval_batch_size: int | None = None
    num_epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float
    optimizer: str = "adamw_torch"
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    cosine_min_lr_ratio: float | None = None
    lr_div_factor: float | None = None
    lr_scheduler_kwargs: dict | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float | None = None
    optim_args: str | dict | None = None
    optim_target_modules: list[str] | str | None = None
    lr_groups: list[dict] | None = None
    cosine_constant_lr_ratio: float | None = None
    lr_quadratic_warmup: bool | None = None
    log_sweep_min_lr: float | None = None
    log_sweep_max_lr: float | None = None
    bf16: str | bool | None = "auto"
    fp16: bool | None = None
    tf32: bool | None = None
    bfloat16: bool | None = None
    float16: bool | None = None
    float32: bool | None = None
    attn_implementation: str | None = None
    flash_attention: bool | None = None
    sdp_attention: bool | None = None
    xformers_attention: bool | None = None
    eager_attention: bool | None = None
    torch_compile: str | bool | None = None
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    plugins: list[str] | None = None  # checked at config load; the liger_* keys say what runs
    liger_rope: bool | None = None
    liger_rms_norm: bool | None = None
    liger_layer_norm: bool | None = None
    liger_glu_activation: bool | None = None
    liger_swiglu: bool | None = None
    gradient_checkpointing: str | bool = False
    gradient_checkpointing_kwargs: dict | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    logging_steps: int | None = None
    eval_steps: int | float | None = None
    evals_per_epoch: int | None = None
    save_steps: int | float | None = None
    saves_per_epoch: int | None = None
    save_total_limit: int | None = None
    early_stopping_patience: int | None = None
    loss_watchdog_threshold: float | None = None
    loss_watchdog_patience: int | None = None
    eval_strategy: str | None = None
    save_strategy: str | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    save_safetensors: bool | None = None
    save_only_model: bool = False
    profiler_steps: int | None = None
    profiler_steps_start: int | None = None
    relora_steps: int | None = None
    relora_warmup_steps: int | None = None
    relora_anneal_steps: int | None = None
    relora_prune_ratio: float | None = None
    relora_cpu_offload: bool = False
    # trackers: where a run is reported, not what it computes; their logs live outside the artifact
    use_tensorboard: bool = Field(default=False, exclude=True)
    wandb_project: str | None = Field(default=None, exclude=True)
    wandb_name: str | None = Field(default=None, exclude=True)
    wandb_entity: str | None = Field(default=None, exclude=True)
    wandb_mode: str | None = Field(default=None, exclude=True)
    wandb_run_id: str | None = Field(default=None, exclude=True)
    wandb_watch: str | None = Field(default=None, exclude=True)
    wandb_log_model: str | None = Field(default=None, exclude=True)
    use_mlflow: bool | None = Field(default=None, exclude=True)
    mlflow_tracking_uri: str | None = Field(default=None, exclude=True)
    mlflow_experiment_name: str | None = Field(default=None, exclude=True)
    mlflow_run_name: str | None = Field(default=None, exclude=True)
    use_comet: bool | None = Field(default=None, exclude=True)
    comet_mode: str | None = Field(default=None, exclude=True)
    comet_project_name: str | None = Field(default=None, exclude=True)
    resume_from_checkpoint: str | None = None
    # how to run, not what: a resumed run ends with the same weights, so it stays out of the key
    auto_resume_from_checkpoints: bool = Field(default=False, exclude=True)
    seed: int = 42
    pad_to_sequence_len: bool | None = None
    batch_flattening: bool = False
    group_by_length: bool = False


def _load_model(params: Params, model_dir: Path, vocab_size: int, packed: bool, log):
    """The model to train (stages/training/model.py, shared with merge). Only causal LMs: the
    packed rows hold next-token labels, not the class labels a classifier head needs."""
    if not is_causal_lm(params.model_type):
        raise DataError(
            f"model_type {params.model_type}: the train stage fine-tunes causal language models on next-token labels; "
            "the data has no class labels for a classification head (reward-model training is not supported yet)"
        )
    model = load_for_training(params, model_dir, vocab_size)
    set_attention(model, params, log)
    cast_weights(model, params)
    if packed:
        check_packed_masking(model)
    return model


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


def loraplus_optimizer(trainer, params: Params):
    """LoRA+: the B matrices learn `loraplus_lr_ratio` times faster than A (peft's grouping), with
    the optimizer class and settings the Trainer would have used."""
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    extra = {"loraplus_lr_embedding": params.loraplus_lr_embedding} if params.loraplus_lr_embedding is not None else {}
    return create_loraplus_optimizer(trainer.model, cls, lr=trainer.args.learning_rate, loraplus_lr_ratio=params.loraplus_lr_ratio, loraplus_weight_decay=trainer.args.weight_decay, **extra, **kwargs)


class LossWatchdog:
    """Stops a run whose logged training loss stays above `threshold` for `patience` logs in a row
    (Axolotl's loss watchdog): a diverged run is an error, not a model."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.strikes = threshold, patience, 0

    def check(self, step: int, loss: float) -> None:
        self.strikes = self.strikes + 1 if loss > self.threshold else 0
        if self.strikes >= self.patience:
            raise DataError(
                f"loss watchdog: training loss {loss:.4f} above loss_watchdog_threshold ({self.threshold}) "
                f"for {self.strikes} logged steps in a row (step {step}); training aborted"
            )


def profiler_callback(start: int, steps: int, path: Path):
    """A callback that records optimizer steps start+1 … start+steps with torch's profiler (CPU
    ops, and CUDA kernels on a GPU; tensor shapes and memory) and writes them as a Chrome trace
    (chrome://tracing, Perfetto, TensorBoard) to `path` (Axolotl's `profiler_steps`). The trace
    goes in the artifact: it is what the run did, with timings, so two runs' traces differ."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.profiler, self.done = None, False

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profiler is None and state.global_step == start:
                activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                # a schedule makes the profiler mark each step (ProfilerStep#N spans)
                every_step = torch.profiler.schedule(wait=0, warmup=0, active=steps, repeat=1)
                self.profiler = torch.profiler.profile(activities=activities, schedule=every_step, on_trace_ready=self.write, record_shapes=True, profile_memory=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and not self.done:
                self.profiler.step()
                if state.global_step >= start + steps:
                    self.finish()

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is not None and not self.done:
                self.finish()  # the run was shorter than start + steps

        def finish(self):
            self.done = True
            self.profiler.__exit__(None, None, None)

        def write(self, profiler):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                profiler.export_chrome_trace(str(path))

    return Profile()


def last_checkpoint(folder: Path) -> str | None:
    """The newest whole checkpoint in folder: the Trainer writes trainer_state.json last, so a
    checkpoint a kill cut short has none."""
    whole = [p for p in Path(folder).glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name.split("-")[-1].isdigit()]
    return str(max(whole, key=lambda p: int(p.name.split("-")[-1]))) if whole else None


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    checkpoints = ctx.checkpoints or out.parent / f"{out.name}.checkpoints"
    from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed

    set_seed(params.seed)
    tokenizer_info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    pad_id = tokenizer_info["pad_token_id"]
    layout = json.loads((inputs["packed"] / "layout.json").read_text())
    train_rows = Rows(read_table(inputs["packed"] / "train.arrow"), pad_id)
    val_rows = Rows(read_table(inputs["packed"] / "val.arrow"), pad_id)
    if len(train_rows) == 0:
        raise DataError("no training rows: every sample was dropped before packing")
    packed = params.batch_flattening or layout["train"]["packed"] or layout["val"]["packed"]
    model = _load_model(params, inputs["model"], tokenizer_info["vocab_size"], packed, ctx.log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def collator(split: str):
        return make_collator(layout[split], pad_id, bool(params.pad_to_sequence_len), params.batch_flattening)

    train_batch = layout["train"]["rows_per_batch"]
    eval_batch = layout["val"]["rows_per_batch"]
    args = training_arguments(params, model, layout, checkpoints, ctx.log)
    world = max(1, args.world_size)
    batches_per_epoch = RankBatches(train_rows.lengths, train_batch, world, 0, params.seed).__len__()
    steps_per_epoch = max(1, -(-batches_per_epoch // params.gradient_accumulation_steps))
    total_steps = params.max_steps or max(1, math.ceil(steps_per_epoch * params.num_epochs))
    args.logging_steps = params.logging_steps or max(1, total_steps // 20)
    saving = schedule_checkpoints(args, params, steps_per_epoch, len(val_rows) > 0)

    class MoltTrainer(Trainer):
        """Batches from epoch_batches (every rank the same count, each row once per epoch)."""

        def get_train_dataloader(self):
            sampler = RankBatches(train_rows.lengths, train_batch, world, args.process_index, params.seed, group_by_length=params.group_by_length)
            return data_loader(self, train_rows, sampler, collator("train"))

        def get_eval_dataloader(self, eval_dataset=None):
            sampler = RankBatches(val_rows.lengths, eval_batch, world, args.process_index, params.seed, shuffle=False)
            return data_loader(self, val_rows, sampler, collator("val"))

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """The token-weighted loss of evaluation_loss (not a mean of batch means)."""
            metrics = {f"{metric_key_prefix}_loss": evaluation_loss(self, self.get_eval_dataloader())}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = make_scheduler(optimizer or self.optimizer, params, num_training_steps, self.args.get_warmup_steps(num_training_steps))
            return super().create_scheduler(num_training_steps, optimizer)

        def compute_loss_context_manager(self):
            stack = super().compute_loss_context_manager()
            stack.enter_context(offloaded_activations(params))
            return stack

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = loraplus_optimizer(self, params) if params.loraplus_lr_ratio is not None else make_optimizer(self, params)
            return super().create_optimizer(model)

    history: list[dict] = []
    evals: list[dict] = []
    watchdog = LossWatchdog(params.loss_watchdog_threshold, params.loss_watchdog_patience or 3) if params.loss_watchdog_threshold is not None else None
    callbacks = []
    if params.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
    if params.profiler_steps:
        callbacks.append(profiler_callback(params.profiler_steps_start or 0, params.profiler_steps, out / "profiler_trace.json"))
    relora = None
    if params.relora_steps:
        from stages.training.relora import ReLoRACallback

        relora = ReLoRACallback(params.relora_steps, params.relora_warmup_steps or 0, params.relora_anneal_steps or 0, 0.9 if params.relora_prune_ratio is None else params.relora_prune_ratio, params.relora_cpu_offload, params.seed)
        callbacks.append(relora)

    class Report(TrainerCallback):
        def __init__(self, advance):
            self.advance = advance

        def on_step_end(self, args, state, control, **kwargs):
            self.advance(1)

        def on_save(self, args, state, control, **kwargs):
            # the pickled TrainingArguments: resuming never reads it, and loading it would run code
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs:
                evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"]})
                console.print(f"  step {state.global_step:>5}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")
            if logs and "loss" in logs and watchdog:
                watchdog.check(state.global_step, float(logs["loss"]))
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": round(float(logs["loss"]), 6), "lr": float(logs.get("learning_rate", 0.0))})
                console.print(f"  step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}")

    with progress("train", total_steps) as advance, tracker_environment(params, ctx.log):
        trainer = MoltTrainer(model=model, args=args, train_dataset=train_rows, compute_loss_func=token_loss, eval_dataset=val_rows, callbacks=[Report(advance), *callbacks])
        trainer.remove_callback(PrinterCallback)  # Report prints the loss; no raw dicts
        before = evaluation_loss(trainer, trainer.get_eval_dataloader()) if len(val_rows) else None
        if before is not None:
            console.print(f"  eval loss before training: {before:.4f}")
        started = time.perf_counter()
        resume = params.resume_from_checkpoint
        if resume is None and params.auto_resume_from_checkpoints:
            resume = last_checkpoint(checkpoints)
            console.print(f"  resuming from {resume}" if resume else "  no checkpoint to resume from: starting afresh")
        elif trainer.is_world_process_zero():
            shutil.rmtree(checkpoints, ignore_errors=True)  # a killed run's saves are not this run's
        if relora is not None:
            relora.resume_from = resume  # its base weights, changed by earlier restarts, are in the checkpoint
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
        after = evaluation_loss(trainer, trainer.get_eval_dataloader()) if len(val_rows) else None
        if after is not None:
            console.print(f"  eval loss after training:  {after:.4f}")

    model_dir = out / "model"
    if relora is not None:
        model = model.merge_and_unload()  # ReLoRA's earlier updates live in the base weights: the artifact is the full model
    model.save_pretrained(model_dir)
    for p in list_files(inputs["tokenizer"]):
        if p.name != "manifest.json":
            shutil.copy2(p, model_dir / p.name)
    if saving and trainer.is_world_process_zero():
        (out / "checkpoints").mkdir()
        for saved in checkpoints.glob("checkpoint-*"):
            shutil.move(saved, out / "checkpoints" / saved.name)
    metrics = {
        "steps": result.global_step,
        "train_loss": round(float(result.training_loss), 6),
        "loss_history": history,
        "eval_history": evals,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps_per_epoch": steps_per_epoch,
        "micro_batches_per_epoch": batches_per_epoch,
        "trainable_parameters": trainable,
        **({"relora_restarts": relora.restarts} if relora is not None else {}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_loss_plot(history, evals, before, after, out / "loss.png")
    trained_tokens = sum(train_rows.lengths)
    # timings go in the manifest, not in metrics.json: the artifact's bytes stay reproducible
    return {"metrics": {k: v for k, v in metrics.items() if k not in ("loss_history", "eval_history")}, "adapter": params.adapter, "train_seconds": round(seconds, 3), "tokens_per_epoch": trained_tokens}
