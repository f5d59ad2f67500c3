"""train_preference: the base model trained on preference data with TRL's trainers.

Reads the rows with the reference log-probs (ref_logprobs' `train.arrow` / `val.arrow`; for ORPO
and SimPO, which have no reference model, mix's), the fetched model and the tokenizer. Writes
`model/` (the adapter, or the full model, with the tokenizer and its chat template),
`metrics.json` (the loss and TRL's reward metrics per logged step, the held-out metrics before
and after training) and `loss.png`.

`rl:` picks the trainer: dpo (TRL's DPOTrainer, loss `dpo_loss_type`, default sigmoid), ipo
(DPO with the IPO loss), kto (KTOTrainer; `kto_desirable_weight`, `kto_undesirable_weight`),
orpo (ORPOTrainer; `orpo_alpha` is its beta) and simpo (CPOTrainer with the SimPO loss;
`simpo_gamma`, `cpo_alpha`). `rl_beta` is beta; `rpo_alpha` adds TRL's NLL ("sft") term to DPO
with that weight. DPO and KTO read the reference log-probs from the rows (TRL's
precompute_ref_log_probs path): no reference model is loaded or run here.
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
INPUTS = {"rows": ("ref_logprobs", "mix"), "model": "fetch_model", "tokenizer": "tokenizer"}
EVERY_RANK = True  # DDP needs every rank in the run
REWARD_METRICS = ("rewards/accuracies", "rewards/margins")  # kept per logged step, drawn under the loss
SHOWN = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")  # said before and after training

Params = stage_params(
    *keys.MODEL, *keys.SCHEDULE, *keys.PRECISION, *keys.EVALUATION,
    "rl", "rl_beta", "dpo_loss_type", "dpo_loss_weights", "dpo_use_weighting", "dpo_label_smoothing", "rpo_alpha", "orpo_alpha",
    "kto_desirable_weight", "kto_undesirable_weight", "simpo_gamma", "cpo_alpha", "sequence_len",
    required=("learning_rate",), unkeyed=keys.TRACKERS,
)
# the columns each trainer reads (TRL's ORPO and CPO trainers tokenize the strings themselves)
COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"),
    "kto": ("prompt_ids", "completion_ids", "label", "KL_completion_ids", "ref_logps", "ref_KL_logps"),
    "orpo": ("prompt", "chosen", "rejected"),
    "simpo": ("prompt", "chosen", "rejected"),
}


def method_settings(params: Params) -> dict:
    """The TRL config fields of the method (beyond TrainingArguments)."""
    beta = {"beta": params.rl_beta} if params.rl_beta is not None else {}
    if params.rl in ("dpo", "ipo"):
        losses = list(params.dpo_loss_type or (["ipo"] if params.rl == "ipo" else ["sigmoid"]))
        weights = list(params.dpo_loss_weights or [1.0] * len(losses))
        if len(weights) != len(losses):
            raise DataError(f"dpo_loss_weights: {len(weights)} weights for {len(losses)} dpo_loss_type entries ({', '.join(losses)}); give one each")
        if params.rpo_alpha is not None:
            losses, weights = losses + ["sft"], weights + [params.rpo_alpha]
        return {**beta, "loss_type": losses, "loss_weights": weights, "use_weighting": params.dpo_use_weighting,
                "label_smoothing": params.dpo_label_smoothing, "precompute_ref_log_probs": True}
    if params.rl == "kto":
        return {**beta, "desirable_weight": params.kto_desirable_weight, "undesirable_weight": params.kto_undesirable_weight,
                "precompute_ref_log_probs": True, "train_sampling_strategy": "sequential"}
    if params.rl == "orpo":
        return {"beta": params.orpo_alpha if params.orpo_alpha is not None else params.rl_beta or 0.1, "max_length": params.sequence_len}
    return {**({"beta": params.rl_beta} if params.rl_beta is not None else {}), "loss_type": "simpo",
            "simpo_gamma": params.simpo_gamma, "cpo_alpha": params.cpo_alpha, "max_length": params.sequence_len}


def trainer_class(rl: str):
    """TRL's trainer for the method; DPO and KTO told that the rows come tokenized, with their
    reference log-probs (TRL would otherwise tokenize them and run the reference itself)."""
    if rl in ("dpo", "ipo", "kto"):
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

        base, config = (KTOTrainer, KTOConfig) if rl == "kto" else (DPOTrainer, DPOConfig)

        class Precomputed(base):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                return dataset

        return Precomputed, config
    if rl == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import dataclasses

    import datasets
    from transformers import AutoTokenizer, PrinterCallback, TrainingArguments, set_seed

    from stages.training.arguments import schedule_checkpoints, training_arguments
    from stages.training.callbacks import Report, callbacks_for
    from stages.training.model import load_for_training
    from stages.training.outputs import keep_checkpoints, run_evaluated, save_model, write_metrics
    from stages.training.trackers import tracker_environment

    if params.lr_scheduler in ("one_cycle", "log_sweep"):
        raise DataError(f"lr_scheduler: {params.lr_scheduler} is built by molt's supervised trainer; with rl: use one of transformers' schedulers (cosine, linear, constant, ...)")
    set_seed(params.seed)
    checkpoints = ctx.checkpoints or out.parent / f"{out.name}.checkpoints"
    info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    columns = COLUMNS["dpo" if params.rl == "ipo" else params.rl]
    tables = {split: read_table(inputs["rows"] / f"{split}.arrow") for split in ("train", "val")}
    missing = [c for c in columns if c not in tables["train"].column_names]
    if missing:
        raise DataError(f"rl: {params.rl}: the rows have no {', '.join(missing)} (preference rows of another method?)")
    train_set, val_set = (datasets.Dataset(tables[s].select(list(columns))) for s in ("train", "val"))
    if len(train_set) == 0:
        raise DataError("no training rows: every pair was dropped before training")
    tokenizer = AutoTokenizer.from_pretrained(inputs["tokenizer"])
    model = load_for_training(params, inputs["model"], info["vocab_size"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    eval_rows = params.eval_batch_size or params.micro_batch_size
    layout = {"train": {"rows_per_batch": params.micro_batch_size}, "val": {"rows_per_batch": eval_rows}}
    base_args = training_arguments(params, model, layout, checkpoints, ctx.log)
    steps_per_epoch = max(1, -(-len(train_set) // (params.micro_batch_size * params.gradient_accumulation_steps * max(1, base_args.world_size))))
    total_steps = params.max_steps or max(1, int(steps_per_epoch * params.num_epochs + 0.999999))
    trainer_cls, config_cls = trainer_class(params.rl)
    shared = {f.name: getattr(base_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init and f.name in {g.name for g in dataclasses.fields(config_cls)}}
    args = config_cls(**{**shared, "logging_steps": params.logging_steps or max(1, total_steps // 20), **method_settings(params)})
    saving = schedule_checkpoints(args, params, steps_per_epoch, len(val_set) > 0)

    with ctx.progress(f"train {params.rl}", total_steps) as advance, tracker_environment(params, ctx.log):
        report = Report(advance, ctx.log, kept=REWARD_METRICS)
        trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=val_set if len(val_set) else None,
                              processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        before, result, seconds, after = run_evaluated(trainer, len(val_set) > 0, callbacks_for(params, report, out), checkpoints, ctx.log, SHOWN)

    save_model(trainer.model, inputs["tokenizer"], out)
    keep_checkpoints(checkpoints, out, saving, ctx.rank)
    recorded = write_metrics(out, {"rl": params.rl, "steps": result.global_step, "train_loss": round(float(result.training_loss), 6),
                                   "train_rows": len(train_set), "val_rows": len(val_set), "steps_per_epoch": steps_per_epoch,
                                   "trainable_parameters": trainable}, report, before, after, REWARD_METRICS)
    return {"metrics": recorded, "adapter": params.adapter, "train_seconds": round(seconds, 3)}
