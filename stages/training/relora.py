"""ReLoRA (arXiv:2307.05695) as Axolotl runs it: every `relora_steps` optimizer steps the LoRA
update is merged into the base weights, the adapter starts again (A re-drawn, B zero), the
optimizer's Adam moments of the adapter are magnitude-pruned, and the learning rate restarts with
a short warm-up ("jagged" schedule), so a sum of low-rank updates adds up to a high-rank one.

Only the full-precision LoRA case: a quantized base (QLoRA) would have to be re-quantized from
full weights after every merge, and DoRA's magnitude vector is not a low-rank delta; both are
refused at config load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from stages.store import DataError

# the learning-rate factor at the very start of a restart (Axolotl's min_lr_scale)
RESTART_FLOOR = 0.001
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def restart_scale(step: int, every: int, warmup: int = 0, anneal: int = 0, floor: float = RESTART_FLOOR) -> float:
    """The factor on the base schedule's learning rate after `step` optimizer steps. The first
    cycle keeps the base schedule (its own warm-up); each later cycle ramps up linearly from
    `floor` over `warmup` steps; the last `anneal` steps of every cycle ramp down towards `floor`
    before the restart."""
    cycle, position = divmod(step, every)
    t = 1.0
    if cycle > 0 and warmup:
        t = min(t, position / warmup)
    if anneal:
        t = min(t, (every - position) / anneal)
    return floor + (1.0 - floor) * t


def jagged(schedule, every: int, warmup: int, anneal: int) -> None:
    """Multiply a LambdaLR's factors (every transformers schedule is one) by `restart_scale`, in
    place: the Trainer keeps stepping the same scheduler object."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(schedule, LambdaLR):
        raise DataError(f"relora_steps: the learning-rate schedule is a {type(schedule).__name__}, not a LambdaLR")
    schedule.lr_lambdas = [lambda step, f=f: f(step) * restart_scale(step, every, warmup, anneal) for f in schedule.lr_lambdas]


def lora_layers(model) -> dict:
    """name -> peft LoRA layer, for every layer that carries an adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer) and module.lora_A}


@torch.no_grad()
def merge_and_restart(model, cpu_offload: bool = False, seed: int = 0) -> int:
    """Add each layer's LoRA update (B @ A · scaling) to its base weight and start the adapter
    again (A re-drawn from `seed`, B zero: the model's output is unchanged). A seeded draw of its
    own leaves the training's random stream alone and gives every rank the same A. `cpu_offload`
    computes the updates on the CPU (less accelerator memory, slower). Returns the number of
    layers merged."""
    from peft.utils import transpose

    layers = lora_layers(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, layer in layers.items():
            _merge_layer(name, layer, cpu_offload, transpose)
    return len(layers)


def _merge_layer(name: str, layer, cpu_offload: bool, transpose) -> None:
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear):
        raise DataError(f"relora: {name} is a {type(base).__name__}; ReLoRA merges LoRA on Linear layers only")
    for adapter in list(layer.lora_A):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        device = torch.device("cpu") if cpu_offload else a.device
        delta = transpose(b.to(device, torch.float32) @ a.to(device, torch.float32), layer.fan_in_fan_out) * layer.scaling[adapter]
        base.weight.add_(delta.to(base.weight.device, base.weight.dtype))
        layer.reset_lora_parameters(adapter, True)


@torch.no_grad()
def magnitude_prune_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the `ratio` fraction of entries with the smallest magnitude, in place."""
    if ratio <= 0 or tensor.numel() == 0:
        return
    if ratio >= 1:
        tensor.zero_()
        return
    magnitude = tensor.abs().flatten().float()
    k = int(ratio * magnitude.numel())
    if k == 0:
        return
    threshold = magnitude.kthvalue(k).values
    tensor.mul_((tensor.abs().float() > threshold).to(tensor.dtype))


def prune_optimizer_state(optimizer, params, ratio: float) -> None:
    """Magnitude-prune the Adam moments of `params` (the adapter): the restarted adapter keeps
    only the largest of its old moments, as Axolotl's reset_optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for p in params:
        kept = inner.state.get(p, {})
        if kept and not any(key in kept for key in ADAM_MOMENTS):
            # e.g. bitsandbytes' 8-bit Adam keeps quantized state1/state2: pruning them would be meaningless
            raise DataError(f"relora_steps: the optimizer {type(inner).__name__} keeps {', '.join(sorted(kept))}, not Adam's exp_avg / exp_avg_sq; use adamw_torch")
        for key in ADAM_MOMENTS:
            if key in kept:
                magnitude_prune_(kept[key], ratio)


# in each checkpoint: the base weights of the adapted layers, which earlier restarts changed
BASE_WEIGHTS = "relora_base.safetensors"


def save_base_weights(model, folder: Path) -> None:
    from safetensors.torch import save_file

    weights = {f"{name}.base_layer.weight": layer.get_base_layer().weight.detach().cpu().contiguous() for name, layer in lora_layers(model).items()}
    save_file(weights, str(folder / BASE_WEIGHTS))


@torch.no_grad()
def load_base_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / BASE_WEIGHTS
    if not path.exists():
        raise DataError(f"resume_from_checkpoint {folder}: no {BASE_WEIGHTS} (not saved by a ReLoRA run): the merged base weights would be lost")
    weights = load_file(str(path))
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer().weight
        base.copy_(weights[f"{name}.base_layer.weight"].to(base.device, base.dtype))


class ReLoRACallback(TrainerCallback):
    """Merges and restarts the adapter every `every` optimizer steps (not after the last step:
    the final model is merged anyway); turns the schedule jagged when training begins. Each
    checkpoint also gets the adapted layers' base weights; set `resume_from` (the checkpoint the
    Trainer resumes from) to load them back."""

    def __init__(self, every: int, warmup: int = 0, anneal: int = 0, prune_ratio: float = 0.9, cpu_offload: bool = False, seed: int = 0):
        self.every, self.warmup, self.anneal = every, warmup, anneal
        self.prune_ratio, self.cpu_offload, self.seed = prune_ratio, cpu_offload, seed
        self.restarts = 0
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, lr_scheduler=None, model=None, **kwargs):
        if "adam" not in str(args.optim).lower():
            raise DataError(f"relora_steps: the optimizer {args.optim} has no Adam moments to prune; use an adamw_* optimizer")
        jagged(lr_scheduler, self.every, self.warmup, self.anneal)
        if self.resume_from:
            load_base_weights(model, Path(self.resume_from))
            self.restarts = min(state.global_step, max(0, state.max_steps - 1)) // self.every

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            save_base_weights(model, folder)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps:
            return
        merge_and_restart(model, self.cpu_offload, seed=self.seed + step)
        trained = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        prune_optimizer_state(optimizer, trained, self.prune_ratio)
        self.restarts += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["relora_restarts"] = self.restarts
