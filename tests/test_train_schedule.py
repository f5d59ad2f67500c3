"""Learning-rate schedules, optimizer settings and gradient checkpointing, read back from the
learning rate and loss logged at every step of a 4-step run."""

from __future__ import annotations

import pytest
from conftest import logged

from stages.store import DataError
from stages.train import Params
from stages.training.arguments import optimizer_settings, schedule_settings

LR = 1e-3



def test_schedules_shape_the_learning_rate(warm, molt, cache_dir):
    base = dict(max_steps=4, learning_rate=LR)
    constant = [h["lr"] for h in logged(molt, cache_dir, warm(**base, lr_scheduler="constant"))]
    assert constant == [pytest.approx(LR)] * 4

    floor = [h["lr"] for h in logged(molt, cache_dir, warm(**base, cosine_min_lr_ratio=0.5))]
    # each step logs the rate it used: from LR down, never under half of it (plain cosine ends at 0.15 LR)
    assert floor == sorted(floor, reverse=True) and floor[0] == pytest.approx(LR) and 0.5 * LR < floor[-1] < 0.6 * LR, floor

    restarts = [h["lr"] for h in logged(molt, cache_dir, warm(**base, lr_scheduler="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}))]
    assert restarts[2] == pytest.approx(LR) and restarts[1] < LR, restarts  # lr_scheduler_kwargs: a second cycle restarts at LR

    cycle = [h["lr"] for h in logged(molt, cache_dir, warm(**base, lr_scheduler="one_cycle", lr_div_factor=10, warmup_steps=2))]
    # up from LR/10 to LR at the end of the warm-up, then annealed towards zero
    assert cycle[0] == pytest.approx(LR / 10) and max(cycle) == pytest.approx(LR) and cycle[3] < LR / 2, cycle


def test_gradient_checkpointing_keeps_the_losses(warm, molt, cache_dir):
    plain = logged(molt, cache_dir, warm(max_steps=3))
    # reentrant checkpointing with a frozen base: without input grads the adapter would get no gradient
    checkpointed = logged(molt, cache_dir, warm(max_steps=3, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}))
    assert [h["loss"] for h in checkpointed] == pytest.approx([h["loss"] for h in plain], rel=1e-4)
    assert plain[-1]["loss"] != plain[0]["loss"]


def test_optimizer_and_schedule_settings_map_to_the_trainer():
    params = Params(learning_rate=LR, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, optim_args={"amsgrad": True})
    assert optimizer_settings(params) == {"optim": "adamw_torch_fused", "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "optim_args": "amsgrad=True"}
    assert optimizer_settings(Params(learning_rate=LR)) == {"optim": "adamw_torch_fused"}
    with pytest.raises(DataError, match="not a scheduler"):
        schedule_settings(Params(learning_rate=LR, lr_scheduler="cosine_typo"))
    # lr_div_factor with another scheduler is refused at config load (tests/test_train_optim.py)


def test_adam_betas_change_what_is_trained(warm, molt, cache_dir):
    plain = logged(molt, cache_dir, warm(max_steps=3))
    tuned = logged(molt, cache_dir, warm(max_steps=3, adam_beta1=0.0, adam_beta2=0.5, adam_epsilon=1e-3))
    assert plain[0]["loss"] == pytest.approx(tuned[0]["loss"]) and tuned[-1]["loss"] != pytest.approx(plain[-1]["loss"], rel=1e-6)
