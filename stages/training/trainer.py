"""The Trainer molt runs (MoltTrainer: transformers' loop with molt's batches, loss, evaluation,
optimizers and schedules), the model it trains (model_to_train) and the checkpoint a killed run
resumes from (last_checkpoint).

Imports transformers: the stage imports this module when it trains, not when it plans.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from stages.store import DataError
from stages.training.batches import RankBatches, Rows, data_loader
from stages.training.chunked_loss import TrainedTokenLoss, asked_kernel
from stages.training.evaluation import evaluation_loss
from stages.training import fused_projections
from stages.training.model import check_packed_masking, is_causal_lm, keeps_samples_apart, load_for_training
from stages.training.optim import loraplus_optimizer, make_optimizer, make_scheduler
from stages.training.precision import cast_weights, offloaded_activations, set_attention
from stages.training.sharding import fsdp_enabled, shard_on_cpu


class MoltTrainer(Trainer):
    """transformers' Trainer over packed rows: batches from epoch_batches (every rank the same
    count, each row once per epoch), the loss of TrainedTokenLoss (token_loss's sum over the
    trained tokens, without the full logits), the token-weighted evaluation of evaluation_loss,
    and the optimizers and schedules of training/optim.py. `collators` maps "train" and "val" to
    the collate of that split."""

    # the loss is divided by the trained tokens of the whole optimizer step (num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(self, params, train_rows: Rows, val_rows: Rows, collators: dict, **kwargs):
        self.molt_params, self.train_rows, self.val_rows, self.collators = params, train_rows, val_rows, collators
        super().__init__(train_dataset=train_rows, eval_dataset=val_rows, **kwargs)
        # a sharded model's output weight is whole only inside its own forward
        self.trained_token_loss = TrainedTokenLoss(self.model, self.is_fsdp_enabled or self.is_deepspeed_enabled, asked_kernel(params))

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = shard_on_cpu(self)  # accelerate drops FSDP on CPU processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss = self.trained_token_loss(model, inputs, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens, and DDP averages the ranks' gradients
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _batches(self, rows: Rows, rows_per_batch: int, **order) -> RankBatches:
        # the Trainer's world (torch.distributed) is the one the batches are dealt out over
        return RankBatches(rows.lengths, rows_per_batch, max(1, self.args.world_size), self.args.process_index, self.molt_params.seed, **order)

    def get_train_dataloader(self):
        sampler = self._batches(self.train_rows, self.args.per_device_train_batch_size, shuffle=not self.molt_params.curriculum_sampling,
                                group_by_length=self.molt_params.group_by_length)
        return data_loader(self, self.train_rows, sampler, self.collators["train"])

    def get_eval_dataloader(self, eval_dataset=None):
        sampler = self._batches(self.val_rows, self.args.per_device_eval_batch_size, shuffle=False)
        return data_loader(self, self.val_rows, sampler, self.collators["val"])

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The token-weighted loss of evaluation_loss (not a mean of batch means)."""
        metrics = {f"{metric_key_prefix}_loss": evaluation_loss(self, self.get_eval_dataloader())}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = make_scheduler(optimizer or self.optimizer, self.molt_params, num_training_steps, self.args.get_warmup_steps(num_training_steps))
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss_context_manager(self):
        stack = super().compute_loss_context_manager()
        stack.enter_context(offloaded_activations(self.molt_params))
        return stack

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = self.molt_params
            self.optimizer = loraplus_optimizer(self, params) if params.loraplus_lr_ratio is not None else make_optimizer(self, params)
        return super().create_optimizer(model)


def model_to_train(params, model_dir: Path, vocab_size: int, packed: bool, log):
    """The model to train (training/model.py, shared with merge), with its attention kernel and
    weights' dtype, and whether its micro-batches are flattened into one padding-free row
    (`batch_flattening`; unset: wherever the model keeps samples apart). Checked to keep packed
    samples apart when the rows are packed or flattened. Only causal LMs: the packed rows hold
    next-token labels, not the class labels a classifier head needs. The gated MLPs and LoRA
    Linears get molt's leaner forward (training/fused_projections.py) unless FSDP or DeepSpeed
    shard the weights: both gather a module's weights when that module is called."""
    if not is_causal_lm(params.model_type):
        raise DataError(
            f"model_type {params.model_type}: the train stage fine-tunes causal language models on next-token labels; "
            "the data has no class labels for a classification head (reward-model training is not supported yet)"
        )
    model = load_for_training(params, model_dir, vocab_size)
    set_attention(model, params, log)
    cast_weights(model, params)
    flatten = params.batch_flattening
    if packed or flatten:
        check_packed_masking(model)
    elif flatten is None:
        flatten = keeps_samples_apart(model)
        log(f"  micro-batches: {'flattened into one padding-free row' if flatten else 'padded (the model does not keep samples apart)'}")
    if not (fsdp_enabled(params) or params.deepspeed):
        swapped = fused_projections.install(model)
        if any(swapped.values()):
            log(f"  leaner forward: {swapped['gated_mlp']} gated MLPs, {swapped['lora_linear']} other LoRA Linears")
    return model, bool(flatten)


def last_checkpoint(folder: Path) -> str | None:
    """The newest whole checkpoint in folder: the Trainer writes trainer_state.json last, so a
    checkpoint a kill cut short has none, or one the kill left half-written."""
    whole = [p for p in Path(folder).glob("checkpoint-*") if _readable_state(p / "trainer_state.json") and p.name.split("-")[-1].isdigit()]
    return str(max(whole, key=lambda p: int(p.name.split("-")[-1]))) if whole else None


def _readable_state(path: Path) -> bool:
    import json

    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
