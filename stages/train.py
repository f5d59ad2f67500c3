"""train: the base model fine-tuned on the packed data, full or with a LoRA adapter.

Reads the fetched model, the tokenizer and pack's `train.arrow` / `val.arrow`. Trains with the
transformers Trainer (peft for LoRA); measures the validation loss before and after. Writes
`model/` (the full model, or the adapter, with the tokenizer and its chat template),
`metrics.json` (loss per logged step, eval loss before/after) and `loss.png`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from stages.store import DataError, list_files, read_table
from stages.ui import console, progress

SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "accelerate")
IGNORE = -100


class Params(BaseModel, frozen=True):
    adapter: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_fan_in_fan_out: bool | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    trust_remote_code: bool = False
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
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    logging_steps: int | None = None
    seed: int = 42


def collate(rows: list[dict], pad_id: int) -> dict:
    """Pad to the longest row. No attention mask: position_ids restarting at 0 mark where each
    sample (and the padding) begins, and transformers derives a block-diagonal causal mask."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(list(r["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(r["labels"]) + [IGNORE] * pad)
        batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _load_model(params: Params, model_dir: Path, vocab_size: int):
    import torch
    from transformers import AutoModelForCausalLM

    if params.load_in_4bit or params.load_in_8bit:
        raise DataError("load_in_4bit / load_in_8bit (QLoRA, 8-bit LoRA): not supported yet")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=params.trust_remote_code)
    model.config.use_cache = False  # a KV cache would also switch off packed-sequence masking
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    if params.adapter in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets = params.lora_target_modules or ("all-linear" if params.lora_target_linear else None)
        config = LoraConfig(
            r=params.lora_r,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules=targets,
            modules_to_save=params.lora_modules_to_save,
            fan_in_fan_out=bool(params.lora_fan_in_fan_out),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif params.adapter:
        raise DataError(f"adapter {params.adapter!r}: molt trains lora, qlora or (no adapter) full models")
    return model


def run(params: Params, inputs: dict[str, Path], out: Path) -> dict:
    import datasets
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    set_seed(params.seed)
    tokenizer_info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    train_set = datasets.Dataset(read_table(inputs["packed"] / "train.arrow"))
    val_set = datasets.Dataset(read_table(inputs["packed"] / "val.arrow"))
    model = _load_model(params, inputs["model"], tokenizer_info["vocab_size"])

    per_step = params.micro_batch_size * params.gradient_accumulation_steps
    steps_per_epoch = max(1, -(-len(train_set) // per_step))
    total_steps = params.max_steps or max(1, int(steps_per_epoch * params.num_epochs + 0.999))
    warmup = params.warmup_steps if params.warmup_steps is not None else (params.warmup_ratio or 0.0)
    args = TrainingArguments(
        output_dir=str(out / "_scratch"),  # checkpoints are not part of the artifact
        per_device_train_batch_size=params.micro_batch_size,
        per_device_eval_batch_size=params.eval_batch_size or params.micro_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        num_train_epochs=params.num_epochs,
        max_steps=params.max_steps or -1,
        learning_rate=params.learning_rate,
        optim=params.optimizer,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm if params.max_grad_norm is not None else 1.0,
        logging_steps=params.logging_steps or max(1, total_steps // 20),
        seed=params.seed,
        data_seed=params.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],  # no trackers, no telemetry unless a config asks (see issue 5)
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    history: list[dict] = []

    class Report(TrainerCallback):
        def __init__(self, advance):
            self.advance = advance

        def on_step_end(self, args, state, control, **kwargs):
            self.advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": round(float(logs["loss"]), 6)})
                console.print(f"  step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}")

    pad_id = tokenizer_info["pad_token_id"]
    with progress("train", total_steps) as advance:
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set if len(val_set) else None, data_collator=lambda rows: collate(rows, pad_id), callbacks=[Report(advance)])
        trainer.remove_callback(PrinterCallback)  # Report prints the loss; no raw dicts
        before = trainer.evaluate()["eval_loss"] if len(val_set) else None
        if before is not None:
            console.print(f"  eval loss before training: {before:.4f}")
        result = trainer.train()
        after = trainer.evaluate()["eval_loss"] if len(val_set) else None
        if after is not None:
            console.print(f"  eval loss after training:  {after:.4f}")

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    for p in list_files(inputs["tokenizer"]):
        if p.name != "manifest.json":
            shutil.copy2(p, model_dir / p.name)
    shutil.rmtree(out / "_scratch", ignore_errors=True)
    metrics = {
        "steps": result.global_step,
        "train_loss": round(float(result.training_loss), 6),
        "loss_history": history,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_rows": len(train_set),
        "val_rows": len(val_set),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plot(history, before, after, out / "loss.png")
    return {"metrics": {k: v for k, v in metrics.items() if k != "loss_history"}, "adapter": params.adapter}


def _plot(history: list[dict], before, after, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", ms=3, label="train loss")
    if before is not None and after is not None and history:
        ax.scatter([0, history[-1]["step"]], [before, after], color="tab:red", zorder=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
