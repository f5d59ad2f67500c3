"""ReLoRA: the jagged learning-rate factor, merge-and-restart of the adapter, magnitude pruning of
the Adam moments, a run with restarts (full model out, loss down), and the refused combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.config import ConfigError, load_config
from stages.store import DataError
from stages.training.relora import RESTART_FLOOR, magnitude_prune_, merge_and_restart, prune_optimizer_state, restart_scale


def test_restart_scale_warms_up_after_each_restart_and_anneals_before_it():
    scale = [restart_scale(step, every=4, warmup=2, anneal=2) for step in range(12)]
    half = RESTART_FLOOR + (1 - RESTART_FLOOR) * 0.5
    # first cycle: the base schedule (its own warm-up), annealed into the restart at step 4
    assert scale[:4] == [1.0, 1.0, 1.0, pytest.approx(half)]
    # after each restart: from the floor up over 2 steps, then down again before the next one
    assert scale[4:8] == [pytest.approx(RESTART_FLOOR), pytest.approx(half), 1.0, pytest.approx(half)]
    assert scale[8:12] == scale[4:8]
    assert [restart_scale(s, every=3) for s in range(6)] == [1.0] * 6  # no warm-up, no anneal: the base schedule


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter: B no longer zero
    return model


def test_merge_and_restart_moves_the_update_into_the_base(lora_model):
    layer = lora_model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        before = lora_model(input_ids=ids).logits

    assert merge_and_restart(lora_model) == 4  # q_proj and v_proj of 2 layers

    torch.testing.assert_close(layer.base_layer.weight, base + (b @ a) * layer.scaling["default"])
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B is zero again
    assert not torch.equal(layer.lora_A["default"].weight, a)  # A re-drawn
    with torch.no_grad():
        torch.testing.assert_close(lora_model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)  # same function

    offloaded = merge_and_restart(lora_model, cpu_offload=True)  # B is zero: nothing moves
    assert offloaded == 4
    torch.testing.assert_close(layer.base_layer.weight, base + (b @ a) * layer.scaling["default"])


def test_magnitude_pruning_of_the_adam_moments(lora_model):
    t = torch.tensor([0.1, -0.5, 0.3, -0.05, 2.0, -1.0, 0.0, 0.7])
    magnitude_prune_(t, 0.5)
    assert t.tolist() == pytest.approx([0, -0.5, 0, 0, 2.0, -1.0, 0, 0.7])

    trained = [p for n, p in lora_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    lora_model(input_ids=torch.arange(1, 9).unsqueeze(0), labels=torch.arange(1, 9).unsqueeze(0)).loss.backward()
    optimizer.step()
    prune_optimizer_state(optimizer, trained, 0.9)
    for p in trained:
        for key in ("exp_avg", "exp_avg_sq"):
            kept = torch.count_nonzero(optimizer.state[p][key]).item()
            assert kept <= 0.1 * p.numel() + 1, (key, kept, p.numel())

    momentum = torch.optim.SGD(trained, lr=1e-3, momentum=0.9)  # state, but no Adam moments to prune
    momentum.step()
    with pytest.raises(DataError, match="keeps momentum_buffer, not Adam's exp_avg"):
        prune_optimizer_state(momentum, trained, 0.9)


def test_a_run_with_restarts(warm, molt, cache_dir, tiny_model_dir):
    from safetensors.torch import load_file

    result = molt("train", warm(max_steps=7, lr_scheduler="constant", relora_steps=3, relora_warmup_steps=2, relora_prune_ratio=0.9))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    train = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["relora_restarts"] == 2  # after steps 3 and 6
    lrs = [h["lr"] for h in metrics["loss_history"]]
    lr = 1e-3
    # each restart starts again from a tiny learning rate and warms up over relora_warmup_steps
    assert lrs[:3] == [pytest.approx(lr)] * 3
    assert lrs[3] == pytest.approx(lr * RESTART_FLOOR) and lrs[4] == pytest.approx(lr * (RESTART_FLOOR + (1 - RESTART_FLOOR) / 2))
    assert lrs[5] == pytest.approx(lr) and lrs[6] == pytest.approx(lr * RESTART_FLOOR)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]  # training goes on across restarts
    # the artifact is the full model: the earlier updates live in its weights, not in an adapter
    model_dir = train / "model"
    assert not (model_dir / "adapter_config.json").exists()
    weights, base = load_file(model_dir / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[key], base[key])
    assert torch.equal(weights["model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])  # not an adapter target


def test_resuming_a_relora_run_ends_where_the_uninterrupted_run_does(warm, molt, cache_dir):
    from safetensors.torch import load_file

    settings = dict(max_steps=5, lr_scheduler="constant", learning_rate=0.01, relora_steps=2, relora_warmup_steps=1, save_steps=3)
    whole = molt("train", warm(**settings))
    assert whole.exit_code == 0, whole
    first = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent
    checkpoint = first / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "relora_base.safetensors").exists()  # after the restart at step 2: the merged base
    resumed = molt("train", warm(**settings, resume_from_checkpoint=str(checkpoint)))
    assert resumed.exit_code == 0, resumed
    second = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent
    assert second != first
    assert json.loads((second / "metrics.json").read_text())["relora_restarts"] == 2  # steps 2 (before the checkpoint) and 4
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings, words", [
    ({}, ["relora_steps", "adapter: lora"]),
    ({"adapter": "lora", "fsdp": ["full_shard"]}, ["relora_steps", "fsdp"]),
    ({"adapter": "qlora", "load_in_4bit": True}, ["relora_steps", "adapter: lora"]),
    ({"adapter": "lora", "load_in_8bit": True}, ["relora_steps", "load_in_8bit"]),
    ({"adapter": "lora", "lr_scheduler": "one_cycle"}, ["relora_steps", "one_cycle"]),
    ({"adapter": "lora", "peft_use_dora": True}, ["relora_steps", "peft_use_dora"]),
])
def test_relora_combinations_that_cannot_work_are_refused_at_load(tmp_path, settings, words):
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"base_model": "m", "datasets": [{"path": "d"}], "relora_steps": 10, **settings}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert all(w in str(error.value) for w in words), str(error.value)
