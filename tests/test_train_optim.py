"""Optimizers, learning-rate schedules and `lr_groups`: each schedule's rate step by step against
its formula, each optimizer taking a real step on a tiny model, and the keys reaching training
through `molt train`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import logged
from safetensors.torch import load_file

from stages.store import DataError
from stages.train import Params
from stages.training.arguments import optimizer_settings, schedule_settings
from stages.training.optim import check_optimizer, make_optimizer, make_scheduler, parameter_groups

LR = 1e-3


# -- schedules ---------------------------------------------------------------------------------


def rates(params: Params, total: int, warmup: int) -> list[float]:
    """The rate each of `total` optimizer steps uses, as the Trainer builds the scheduler: molt's
    own (make_scheduler) or transformers' from schedule_settings."""
    from transformers import get_scheduler

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=params.learning_rate)
    scheduler = make_scheduler(optimizer, params, total, warmup)
    if scheduler is None:
        settings = schedule_settings(params)
        scheduler = get_scheduler(settings["lr_scheduler_type"], optimizer, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=settings.get("lr_scheduler_kwargs"))
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_transformers_schedules_follow_their_formulas():
    total, warmup = 10, 2
    expected = {
        "cosine": [LR * k / warmup if k < warmup else LR * cosine((k - warmup) / (total - warmup)) for k in range(total)],
        "linear": [LR * k / warmup if k < warmup else LR * (total - k) / (total - warmup) for k in range(total)],
        "constant": [LR] * total,
    }
    for name, want in expected.items():
        assert rates(Params(learning_rate=LR, lr_scheduler=name), total, warmup) == pytest.approx(want, abs=1e-12), name
    floor = rates(Params(learning_rate=LR, cosine_min_lr_ratio=0.1), total, warmup)
    assert floor == pytest.approx([LR * k / warmup if k < warmup else LR * (0.1 + 0.9 * cosine((k - warmup) / (total - warmup))) for k in range(total)])
    # lr_scheduler_kwargs reach the scheduler: two cosine cycles restart at the peak half-way
    restarts = rates(Params(learning_rate=LR, lr_scheduler="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}), total, 0)
    assert restarts == pytest.approx([LR * cosine((k / total * 2) % 1) for k in range(total)])


def test_quadratic_warmup_then_cosine():
    total, warmup = 10, 4
    got = rates(Params(learning_rate=LR, lr_quadratic_warmup=True), total, warmup)
    want = [LR * (k / warmup) ** 2 if k < warmup else LR * cosine((k - warmup) / (total - warmup)) for k in range(total)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[1] == pytest.approx(LR / 16)  # a linear warm-up would be at LR / 4


def test_cosine_down_to_the_floor_then_constant():
    total, warmup, floor, constant = 10, 2, 0.2, 0.6
    got = rates(Params(learning_rate=LR, cosine_min_lr_ratio=floor, cosine_constant_lr_ratio=constant), total, warmup)
    end = int(total * constant)  # 6: from here on the floor
    want = [LR * k / warmup if k < warmup else LR * (floor + (1 - floor) * cosine((min(k, end) - warmup) / (end - warmup))) for k in range(total)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[end:] == pytest.approx([floor * LR] * (total - end)) and got[end - 1] > floor * LR


def test_log_sweep_from_min_to_max():
    low, high = 1e-6, 1e-2
    over_run = rates(Params(learning_rate=LR, lr_scheduler="log_sweep", log_sweep_min_lr=low, log_sweep_max_lr=high), 9, 0)
    assert over_run == pytest.approx([low * 10 ** (k / 2) for k in range(9)], rel=1e-9)  # x10 every 2 steps: 1e-6 .. 1e-2
    # with warm-up steps the sweep spans them, then stays at the maximum
    over_warmup = rates(Params(learning_rate=LR, lr_scheduler="log_sweep", log_sweep_min_lr=low, log_sweep_max_lr=high), 8, 5)
    assert over_warmup == pytest.approx([low * 10 ** k for k in range(5)] + [high] * 3, rel=1e-9)


def test_one_cycle_with_lr_div_factor():
    got = rates(Params(learning_rate=LR, lr_scheduler="one_cycle", lr_div_factor=10), 10, 4)
    # torch's OneCycleLR: cosine up from LR/10 to LR over the warm-up (steps 0..3), cosine down to LR/10/1e4
    assert got[0] == pytest.approx(LR / 10) and got[3] == pytest.approx(LR)
    up = [LR / 10 + (LR - LR / 10) * (1 - cosine(k / 3)) for k in range(4)]
    assert got[:4] == pytest.approx(up)
    assert got == sorted(got[:4]) + sorted(got[4:], reverse=True) and got[-1] == pytest.approx(LR / 10 / 1e4)
    # lr_scheduler_kwargs reach OneCycleLR; parameter groups (lr_groups, LoRA+) each peak at their own rate
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": LR}, {"params": [weights[1]], "lr": 4 * LR}])
    params = Params(learning_rate=LR, lr_scheduler="one_cycle", lr_div_factor=10, lr_scheduler_kwargs={"final_div_factor": 10})
    scheduler = make_scheduler(optimizer, params, 10, 4)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[3] == pytest.approx([LR, 4 * LR]) and seen[0] == pytest.approx([LR / 10, 4 * LR / 10])
    assert seen[-1] == pytest.approx([LR / 100, 4 * LR / 100])



def test_new_schedules_drive_training(warm, molt, cache_dir):
    sweep = [h["lr"] for h in logged(molt, cache_dir, warm(max_steps=4, lr_scheduler="log_sweep", log_sweep_min_lr=1e-5, log_sweep_max_lr=1e-2))]
    assert sweep == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2], rel=1e-6)  # each logged step used that rate
    held = [h["lr"] for h in logged(molt, cache_dir, warm(max_steps=5, cosine_min_lr_ratio=0.3, cosine_constant_lr_ratio=0.4))]
    assert held[0] == pytest.approx(LR) and held[2:] == pytest.approx([0.3 * LR] * 3), held  # floor from step int(5 * 0.4) = 2


# -- optimizers --------------------------------------------------------------------------------

# name -> (module the optimizer class comes from, extra config)
GALORE = {"optim_target_modules": [r".*mlp.*"], "optim_args": {"rank": 4, "update_proj_gap": 1, "scale": 0.25}}
OPTIMIZERS = {
    "adamw_torch": ("torch.optim", {}),
    "adamw_torch_fused": ("torch.optim", {}),
    "adafactor": ("transformers", {}),
    "sgd": ("torch.optim", {}),
    "adagrad": ("torch.optim", {}),
    "adamw_bnb_8bit": ("bitsandbytes", {}),
    "paged_adamw_8bit": ("bitsandbytes", {}),
    "paged_adamw_32bit": ("bitsandbytes", {}),
    "lion_8bit": ("bitsandbytes", {}),
    "lion_32bit": ("bitsandbytes", {}),
    "adopt_adamw": ("pytorch_optimizer", {}),
    "galore_adamw": ("galore_torch", GALORE),
    "galore_adafactor": ("galore_torch", GALORE),
    "galore_adamw_layerwise": ("transformers", GALORE),
}


def trainer_for(model, params: Params, workdir: Path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(workdir), report_to=[], learning_rate=params.learning_rate, weight_decay=params.weight_decay, **optimizer_settings(params))
    return Trainer(model=model, args=args)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_steps_on_cpu(name, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    module, extra = OPTIMIZERS[name]
    params = Params(learning_rate=LR, optimizer=name, **extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = trainer_for(model, params, tmp_path)
    # as MoltTrainer.create_optimizer: molt's own optimizer, else the Trainer's
    optimizer = make_optimizer(trainer, params) or trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner).__module__.startswith(module), type(inner)
    if name.startswith("paged"):
        assert inner.is_paged
    if name.startswith("galore") and not name.endswith("layerwise"):
        projected = [g for g in inner.param_groups if "rank" in g]
        assert projected and projected[0]["rank"] == 4  # optim_args reached GaLore
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # ADOPT only initialises its second moment in the first step
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # the layer-wise GaLore variant steps inside backward instead
        optimizer.zero_grad()
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v)}
    assert len(changed) == len(before), sorted(set(before) - changed)


def test_adopt_takes_the_adam_settings(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    params = Params(learning_rate=LR, optimizer="adopt_adamw", adam_beta1=0.0, adam_epsilon=1e-8, weight_decay=0.1)
    optimizer = make_optimizer(trainer_for(AutoModelForCausalLM.from_pretrained(tiny_model_dir), params, tmp_path), params)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.9999) and group["eps"] == 1e-8 and group["weight_decouple"] is True
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}


def test_optim_target_modules_spellings():
    galore = {"learning_rate": LR, "optimizer": "galore_adamw"}
    assert optimizer_settings(Params(**galore, optim_target_modules="all_linear"))["optim_target_modules"] == "all-linear"
    assert optimizer_settings(Params(**galore, optim_target_modules=["attn", "mlp"]))["optim_target_modules"] == ["attn", "mlp"]
    assert "optim_target_modules" not in optimizer_settings(Params(learning_rate=LR))


def test_cuda_only_and_missing_optimizers_are_refused(monkeypatch):
    with pytest.raises(DataError, match="optimizer: 'adamw_torhc' is not an optimizer; use one of adamw_torch, "):
        check_optimizer("adamw_torhc")
    with pytest.raises(DataError, match="galore_adamw_8bit needs a CUDA GPU"):
        check_optimizer("galore_adamw_8bit")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytorch_optimizer" else real(name, *a))
    with pytest.raises(DataError, match="adopt_adamw needs the package pytorch-optimizer: pip install pytorch-optimizer"):
        check_optimizer("adopt_adamw")


def test_galore_trains_through_molt(warm, molt, cache_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    full = dict(adapter=None, lora_target_linear=None, optimizer="galore_adamw", optim_target_modules=["mlp"], optim_args={"rank": 4, "update_proj_gap": 1}, max_steps=2)
    history = logged(molt, cache_dir, warm(**full))
    assert len(history) == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained("out").state_dict()
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])


# -- lr_groups -----------------------------------------------------------------------------------


def test_lr_groups_make_parameter_groups(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    groups = [{"name": "attention", "modules": ["q_proj", "k_proj"], "lr": 1e-2}, {"name": "mlp", "modules": ["down_proj"], "lr": 1e-5}]
    params = Params(learning_rate=LR, weight_decay=0.1, lr_groups=groups)
    trainer = trainer_for(model, params, tmp_path)
    optimizer = make_optimizer(trainer, params)
    decayed = set(trainer.get_decay_parameter_names(model))  # transformers' rule: no decay for biases, norms, embeddings
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.norm.weight" not in decayed
    names = {id(p): n for n, p in model.named_parameters()}
    by_group: dict = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            by_group[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert by_group.keys() == set(names.values())  # every trainable parameter, once
    for name, (lr, decay) in by_group.items():
        want = 1e-2 if ("q_proj" in name or "k_proj" in name) else 1e-5 if "down_proj" in name else LR
        assert lr == want, name
        assert decay == (0.1 if name in decayed else 0.0), name
    with pytest.raises(DataError, match="lr_groups: nothing match no trainable parameter"):
        parameter_groups(model, [{"name": "nothing", "modules": ["no_such_module"], "lr": 1e-3}], LR, 0.0, set())


def test_lr_groups_train_at_their_rates(warm, molt):
    # q_proj's adapter at 20x the rate of the rest: its B matrices move far more than v_proj's
    result = molt("train", warm(learning_rate=LR, lr_scheduler="constant", lr_groups=[{"name": "fast", "modules": ["q_proj"], "lr": 20 * LR}]))
    assert result.exit_code == 0, result
    weights = load_file(Path("out") / "adapter_model.safetensors")
    moved = {m: max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k and m in k) for m in ("q_proj", "v_proj")}
    assert moved["q_proj"] > 5 * moved["v_proj"], moved
