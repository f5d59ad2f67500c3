"""train_reward: a reward model or a process reward model trained on labelled answers.

Reads mix's `train.arrow` / `val.arrow` (tokenized preference rows), the fetched model and the
tokenizer. Writes `model/` (the classifier, or its adapter, with the tokenizer), `metrics.json`
(the loss per logged step; the held-out loss and accuracy before and after) and `loss.png`.

`reward_model: true`: AutoModelForSequenceClassification with one output (`num_labels: 1`)
trained by TRL's RewardTrainer on prompt + chosen against prompt + rejected (Bradley-Terry);
held-out `accuracy` is how often the chosen answer scores higher, `margin` by how much.
`process_reward_model: true`: AutoModelForTokenClassification with two outputs scoring each
reasoning step at its last token (the labels tokenize_preference placed), trained with the
transformers Trainer; `accuracy` is over the labelled tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.config import stage_params
from stages.context import QUIET, Context
from stages.store import DataError, read_table
from stages.training import keys

SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl")
INPUTS = {"rows": "mix", "model": "fetch_model", "tokenizer": "tokenizer"}
EVERY_RANK = True
REWARD_METRICS = ("accuracy", "margin")  # kept per logged step, drawn under the loss
SHOWN = ("eval_loss", "eval_accuracy", "eval_margin")  # said before and after training

Params = stage_params(
    *keys.MODEL, *keys.SCHEDULE, *keys.PRECISION, *keys.EVALUATION, "reward_model", "process_reward_model", "num_labels",
    "center_rewards_coefficient", required=("learning_rate",), unkeyed=keys.TRACKERS,
)
HEADS = {"reward": ("AutoModelForSequenceClassification", 1), "process": ("AutoModelForTokenClassification", 2)}


def classifier_params(params: Params) -> Params:
    """The params with the classification head filled in: the class `model_type` names (by
    default the one the kind of reward model needs) and `num_labels` in the model's config."""
    kind = "process" if params.process_reward_model else "reward"
    cls, labels = HEADS[kind]
    model_type = params.model_type or cls
    if not model_type.endswith(cls.removeprefix("AutoModelFor")):
        raise DataError(f"model_type {model_type}: a {'process ' if kind == 'process' else ''}reward model needs a {cls.removeprefix('AutoModelFor')} head (e.g. {cls})")
    overrides = {**(params.overrides_of_model_config or {}), "num_labels": params.num_labels or labels}
    return params.model_copy(update={"model_type": model_type, "overrides_of_model_config": overrides})


def datasets_for(tables: dict, process: bool):
    """The rows as the trainers read them: chosen / rejected as whole sequences for the reward
    trainer, input_ids / labels for token classification."""
    import datasets

    made = {}
    for split, t in tables.items():
        if process:
            made[split] = datasets.Dataset(t.select(["input_ids", "token_labels"]).rename_columns(["input_ids", "labels"]))
        else:
            joined = {side: [p + a for p, a in zip(t.column("prompt_ids").to_pylist(), t.column(f"{side}_ids").to_pylist())] for side in ("chosen", "rejected")}
            made[split] = datasets.Dataset.from_dict({"chosen_ids": joined["chosen"], "rejected_ids": joined["rejected"]})
    return made


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import dataclasses

    from transformers import AutoTokenizer, DataCollatorForTokenClassification, PrinterCallback, Trainer, TrainingArguments, set_seed

    from stages.training.arguments import schedule_checkpoints, training_arguments
    from stages.training.callbacks import Report, callbacks_for
    from stages.training.model import load_for_training
    from stages.training.outputs import keep_checkpoints, run_evaluated, save_model, write_metrics
    from stages.training.trackers import tracker_environment

    process = bool(params.process_reward_model)
    params = classifier_params(params)
    set_seed(params.seed)
    checkpoints = ctx.checkpoints or out.parent / f"{out.name}.checkpoints"
    info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    tables = {split: read_table(inputs["rows"] / f"{split}.arrow") for split in ("train", "val")}
    needed = ("input_ids", "token_labels") if process else ("prompt_ids", "chosen_ids", "rejected_ids")
    if missing := [c for c in needed if c not in tables["train"].column_names]:
        raise DataError(f"{'process_' if process else ''}reward_model: the rows have no {', '.join(missing)} "
                        f"(use a {'stepwise_supervised' if process else 'paired (chosen / rejected)'} dataset type)")
    sets = datasets_for(tables, process)
    if len(sets["train"]) == 0:
        raise DataError("no training rows")
    tokenizer = AutoTokenizer.from_pretrained(inputs["tokenizer"])
    model = load_for_training(params, inputs["model"], info["vocab_size"])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.pad_token_id = info["pad_token_id"]  # the sequence classifier scores the last token before padding
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    eval_rows = params.eval_batch_size or params.micro_batch_size
    base_args = training_arguments(params, model, {"train": {"rows_per_batch": params.micro_batch_size}, "val": {"rows_per_batch": eval_rows}}, checkpoints, ctx.log)
    steps_per_epoch = max(1, -(-len(sets["train"]) // (params.micro_batch_size * params.gradient_accumulation_steps * max(1, base_args.world_size))))
    total_steps = params.max_steps or max(1, int(steps_per_epoch * params.num_epochs + 0.999999))
    logging = {"logging_steps": params.logging_steps or max(1, total_steps // 20)}
    if process:
        args, trainer_cls = base_args, Trainer
        for k, v in logging.items():
            setattr(args, k, v)
        extra = {"data_collator": DataCollatorForTokenClassification(tokenizer), "compute_metrics": _token_accuracy,
                 "preprocess_logits_for_metrics": lambda logits, labels: logits.argmax(-1)}
    else:
        from trl import RewardConfig, RewardTrainer

        names = {f.name for f in dataclasses.fields(RewardConfig)}
        shared = {f.name: getattr(base_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init and f.name in names}
        args, trainer_cls, extra = RewardConfig(**{**shared, **logging, "max_length": None, "center_rewards_coefficient": params.center_rewards_coefficient}), RewardTrainer, {}
    saving = schedule_checkpoints(args, params, steps_per_epoch, len(sets["val"]) > 0)

    with ctx.progress("train reward model", total_steps) as advance, tracker_environment(params, ctx.log):
        report = Report(advance, ctx.log, kept=REWARD_METRICS)
        trainer = trainer_cls(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["val"] if len(sets["val"]) else None,
                              processing_class=tokenizer, **extra)
        trainer.remove_callback(PrinterCallback)
        before, result, seconds, after = run_evaluated(trainer, len(sets["val"]) > 0, callbacks_for(params, report, out), checkpoints, ctx.log, SHOWN)

    save_model(trainer.model, inputs["tokenizer"], out)
    keep_checkpoints(checkpoints, out, saving, ctx.rank)
    recorded = write_metrics(out, {"kind": "process_reward_model" if process else "reward_model", "steps": result.global_step,
                                   "train_loss": round(float(result.training_loss), 6), "train_rows": len(sets["train"]),
                                   "val_rows": len(sets["val"]), "trainable_parameters": trainable}, report, before, after, REWARD_METRICS)
    return {"metrics": recorded, "adapter": params.adapter, "train_seconds": round(seconds, 3)}


def _token_accuracy(prediction) -> dict:
    predicted, labels = prediction.predictions, prediction.label_ids
    scored = labels != -100
    return {"accuracy": float((predicted[scored] == labels[scored]).mean()) if scored.any() else 0.0}
