"""The optimizer and its learning-rate schedule, beyond what TrainingArguments names.

Schedulers (each a multiplier of the peak `learning_rate` per optimizer step k, T steps in all,
w of warm-up):
  * `lr_quadratic_warmup` (cosine): (k/w)² during the warm-up, then cosine to 0;
  * `cosine_min_lr_ratio` + `cosine_constant_lr_ratio` (cosine): linear warm-up, cosine from 1 down
    to the floor m at step c = int(T × cosine_constant_lr_ratio), then m until the end (Axolotl's
    "warmup, decay, constant" schedule);
  * `log_sweep`: the learning-rate range test; from `log_sweep_min_lr` to `log_sweep_max_lr`
    geometrically over the warm-up steps (the whole run when none are set), then the maximum;
  * `one_cycle`: torch's OneCycleLR (up from lr / lr_div_factor over the warm-up, cosine down).
Everything else is transformers' own (cosine, linear, constant, cosine_with_min_lr, ...).

Optimizers: the transformers names, plus `adopt_adamw` (ADOPT with decoupled weight decay, from
pytorch-optimizer); `lr_groups` puts the parameters whose names contain one of a group's
`modules` in a parameter group with the group's `lr`; `loraplus_lr_ratio` builds peft's LoRA+
optimizer.
"""

from __future__ import annotations

import math

from stages.store import DataError

# optimizers molt builds itself; the Trainer is told adamw_torch (a name it accepts) and never builds it
OWN_OPTIMIZERS = {"adopt_adamw": "pytorch-optimizer"}
# transformers optimizers that need a CUDA GPU (bitsandbytes' 8-bit GaLore projects on the GPU)
CUDA_OPTIMIZERS = frozenset({"galore_adamw_8bit", "galore_adamw_8bit_layerwise"})
# and the package each family imports
OPTIMIZER_PACKAGES = {"galore_": ("galore_torch", "galore-torch"), "apollo_": ("apollo_torch", "apollo-torch"), "lomo": ("lomo_optim", "lomo-optim"), "adalomo": ("lomo_optim", "lomo-optim"), "grokadamw": ("grokadamw", "grokadamw"), "schedule_free_": ("schedulefree", "schedulefree")}
BNB_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "lion_", "paged_", "rmsprop_bnb")
LOG_SWEEP_DEFAULTS = (1e-10, 10.0)  # Axolotl's log_sweep_min_lr / log_sweep_max_lr


def trainer_optimizer_name(optimizer: str) -> str:
    """The `optim` TrainingArguments gets: the optimizer's own name, or a stand-in for one molt builds."""
    return "adamw_torch" if optimizer in OWN_OPTIMIZERS else optimizer


def check_optimizer(optimizer: str) -> None:
    """Refuse, before any training, an optimizer that does not exist or whose package or hardware
    is missing (the Trainer's own message would come from deep inside its set-up)."""
    import importlib.util

    import torch
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames] + list(OWN_OPTIMIZERS)
    if optimizer not in names:
        raise DataError(f"optimizer: {optimizer!r} is not an optimizer; use one of {', '.join(names)}")
    if optimizer in CUDA_OPTIMIZERS and not torch.cuda.is_available():
        raise DataError(f"optimizer: {optimizer} needs a CUDA GPU (bitsandbytes' 8-bit GaLore); on CPU use galore_adamw or galore_adafactor")
    needs = [(module, package) for prefix, (module, package) in OPTIMIZER_PACKAGES.items() if optimizer.startswith(prefix)]
    if optimizer in OWN_OPTIMIZERS:
        needs.append(("pytorch_optimizer", OWN_OPTIMIZERS[optimizer]))
    if optimizer.startswith(BNB_OPTIMIZERS):
        needs.append(("bitsandbytes", "bitsandbytes"))
    for module, package in needs:
        if importlib.util.find_spec(module) is None:
            raise DataError(f"optimizer: {optimizer} needs the package {package}: pip install {package}")


def make_optimizer(trainer, params):
    """The optimizer for `lr_groups` or `adopt_adamw`; None: the Trainer builds its own."""
    if not params.lr_groups and params.optimizer not in OWN_OPTIMIZERS:
        return None
    model = trainer.model
    if params.optimizer == "adopt_adamw":
        from pytorch_optimizer import ADOPT

        cls = ADOPT
        def given(value, default):
            return default if value is None else value

        # ADOPT's own defaults where the config sets none (beta2 0.9999, eps 1e-6)
        kwargs = {"betas": (given(params.adam_beta1, 0.9), given(params.adam_beta2, 0.9999)), "eps": given(params.adam_epsilon, 1e-6), "weight_decouple": True}
    else:
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    groups = parameter_groups(model, params.lr_groups or [], trainer.args.learning_rate, trainer.args.weight_decay, set(trainer.get_decay_parameter_names(model)))
    return cls(groups, lr=trainer.args.learning_rate, **kwargs)


def loraplus_optimizer(trainer, params):
    """LoRA+: the B matrices learn `loraplus_lr_ratio` times faster than A (peft's grouping), with
    the optimizer class and settings the Trainer would have used."""
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    extra = {"loraplus_lr_embedding": params.loraplus_lr_embedding} if params.loraplus_lr_embedding is not None else {}
    return create_loraplus_optimizer(trainer.model, cls, lr=trainer.args.learning_rate, loraplus_lr_ratio=params.loraplus_lr_ratio, loraplus_weight_decay=trainer.args.weight_decay, **extra, **kwargs)


def parameter_groups(model, lr_groups: list[dict], lr: float, weight_decay: float, decay_names: set[str]) -> list[dict]:
    """The trainable parameters in optimizer groups: each `lr_groups` entry (first match wins, by
    substring of the parameter name, as Axolotl) at its own lr, the rest at `lr`; biases and norms
    (not in `decay_names`) without weight decay. A group that matches nothing is a config error."""
    buckets: dict[tuple[str | None, bool], list] = {}
    used = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g["name"] for g in lr_groups if any(m in name for m in g["modules"])), None)
        used.add(group)
        buckets.setdefault((group, name in decay_names), []).append(param)
    unused = [g["name"] for g in lr_groups if g["name"] not in used]
    if unused:
        example = next((n for n, p in model.named_parameters() if p.requires_grad), "")
        raise DataError(f"lr_groups: {', '.join(unused)} match no trainable parameter (names look like {example})")
    rates = {g["name"]: float(g["lr"]) for g in lr_groups}
    return [
        {"params": ps, "lr": rates.get(group, lr), "weight_decay": weight_decay if decay else 0.0, **({"name": group} if group else {})}
        for (group, decay), ps in buckets.items()
    ]


# -- schedules ---------------------------------------------------------------------------------


def quadratic_warmup_cosine(step: int, warmup: int, total: int, cycles: float = 0.5) -> float:
    if step < warmup:
        return (step / max(1, warmup)) ** 2
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))


def cosine_then_constant(step: int, warmup: int, total: int, min_ratio: float, constant_ratio: float) -> float:
    if step < warmup:
        return step / max(1, warmup)
    end = int(total * constant_ratio)
    progress = (min(step, end) - warmup) / max(1, end - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def log_sweep_lr(step: int, steps: int, min_lr: float, max_lr: float) -> float:
    if step >= steps - 1:
        return max_lr
    return min_lr * (max_lr / min_lr) ** (step / max(1, steps - 1))


def make_scheduler(optimizer, params, total_steps: int, warmup_steps: int):
    """The scheduler for one_cycle, log_sweep, lr_quadratic_warmup or cosine_constant_lr_ratio;
    None: transformers' scheduler of `schedule_settings`."""
    from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

    kwargs = dict(params.lr_scheduler_kwargs or {})
    if params.lr_scheduler == "one_cycle":
        # up from lr / lr_div_factor over the warm-up (30% of the run when none is set), then cosine down
        pct_start = warmup_steps / total_steps if warmup_steps else 0.3
        settings = {"pct_start": min(max(pct_start, 1e-6), 1.0), "div_factor": params.lr_div_factor or 25.0, "anneal_strategy": "cos", **kwargs}
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps, **settings)
    if params.lr_scheduler == "log_sweep":
        low = params.log_sweep_min_lr if params.log_sweep_min_lr is not None else LOG_SWEEP_DEFAULTS[0]
        high = params.log_sweep_max_lr if params.log_sweep_max_lr is not None else LOG_SWEEP_DEFAULTS[1]
        steps = warmup_steps or total_steps
        # a multiplier of each group's own lr: the sweep's rates themselves for the default group
        return LambdaLR(optimizer, lambda k: log_sweep_lr(k, steps, low, high) / params.learning_rate)
    if params.lr_scheduler == "cosine" and params.lr_quadratic_warmup:
        cycles = float(kwargs.get("num_cycles", 0.5))
        return LambdaLR(optimizer, lambda k: quadratic_warmup_cosine(k, warmup_steps, total_steps, cycles))
    if params.lr_scheduler == "cosine" and params.cosine_constant_lr_ratio is not None:
        return LambdaLR(optimizer, lambda k: cosine_then_constant(k, warmup_steps, total_steps, params.cosine_min_lr_ratio, params.cosine_constant_lr_ratio))
    return None
