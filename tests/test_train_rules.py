"""Training options that cannot work together are refused when the config loads, with the rule."""

from __future__ import annotations

import warnings

import pytest
import yaml

from stages.config import ConfigError, MoltConfigWarning, load_config

BASE = {"base_model": "tiny-model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "learning_rate": 1e-3}


def load(tmp_path, **keys):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoltConfigWarning)  # every key here is a supported one
        return load_config(path)


@pytest.mark.parametrize("keys, message", [
    ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, "adapter: qlora cannot use load_in_8bit"),
    ({"loraplus_lr_ratio": 16}, "loraplus_lr_ratio (16.0) sets the learning rates of a LoRA adapter's matrices: needs adapter: lora or qlora"),
    ({"adapter": None, "loraplus_lr_embedding": 1e-6}, "loraplus_lr_embedding"),
    ({"lr_scheduler": "linear", "cosine_min_lr_ratio": 0.1}, "cosine_min_lr_ratio (0.1) applies to lr_scheduler: cosine, not lr_scheduler: linear"),
    ({"lr_scheduler": "cosine", "lr_div_factor": 10}, "lr_div_factor (10.0) applies to lr_scheduler: one_cycle, not lr_scheduler: cosine"),
    ({"cosine_constant_lr_ratio": 0.8}, "cosine_constant_lr_ratio (0.8) holds the learning rate at the cosine's floor: set cosine_min_lr_ratio"),
    ({"lr_scheduler": "constant", "cosine_min_lr_ratio": 0.1, "cosine_constant_lr_ratio": 0.8}, "applies to lr_scheduler: cosine, not lr_scheduler: constant"),
    ({"lr_scheduler": "linear", "lr_quadratic_warmup": True}, "lr_quadratic_warmup applies to lr_scheduler: cosine"),
    ({"lr_quadratic_warmup": True, "cosine_min_lr_ratio": 0.1}, "lr_quadratic_warmup and cosine_min_lr_ratio do not combine"),
    ({"log_sweep_min_lr": 1e-6}, "log_sweep_min_lr (1e-06) applies to lr_scheduler: log_sweep"),
    ({"lr_scheduler": "log_sweep", "log_sweep_min_lr": 1e-2, "log_sweep_max_lr": 1e-3}, "log_sweep_min_lr (0.01) must be below log_sweep_max_lr (0.001)"),
    ({"optimizer": "galore_adamw"}, "optimizer: galore_adamw needs optim_target_modules"),
    ({"optim_target_modules": ["mlp"]}, "optim_target_modules names the layers GaLore / APOLLO project: needs a galore_* or apollo_* optimizer, not adamw_torch"),
    ({"adapter": "lora", "loraplus_lr_ratio": 8, "lr_groups": [{"name": "a", "modules": ["q_proj"], "lr": 1e-4}]}, "lr_groups and loraplus_lr_ratio"),
    ({"optimizer": "galore_adamw", "optim_target_modules": ["mlp"], "lr_groups": [{"name": "a", "modules": ["q_proj"], "lr": 1e-4}]}, "lr_groups cannot be used with optimizer: galore_adamw"),
    ({"lr_groups": [{"name": "a", "modules": ["q_proj"], "lr": 1e-4}, {"name": "a", "modules": ["v_proj"], "lr": 1e-4}]}, "group names must differ"),
    ({"lr_groups": [{"name": "a", "modules": [], "lr": 1e-4}]}, "lr_groups[0].modules"),
    ({"fp16": True, "bf16": True}, "fp16: true and bf16: True are mutually exclusive"),
    ({"adapter": "qlora", "load_in_4bit": True, "bf16": "full"}, "bf16: full casts the weights to bf16, which a 4-/8-bit quantized base cannot be"),
    ({"bfloat16": True, "float16": True}, "bfloat16: true and float16: true each set the weights' dtype; set one"),
    ({"adapter": "lora", "load_in_8bit": True, "float16": True}, "float16: true casts the weights, which a 4-/8-bit quantized base cannot be"),
    ({"float16": True, "bf16": True}, "float16: true contradicts bf16: True"),
    ({"bfloat16": True, "fp16": True}, "bfloat16: true contradicts fp16: true"),
    ({"flash_attention": True, "sdp_attention": True}, "flash_attention: true and sdp_attention: true choose different attention kernels"),
    ({"attn_implementation": "eager", "sdp_attention": True}, "sdp_attention: true and attn_implementation: eager choose different attention kernels"),
    ({"gradient_checkpointing": "offload_disk"}, "gradient_checkpointing: offload_disk is not supported yet; use gradient_checkpointing: true, or offload"),
    ({"torch_compile_backend": "eager"}, "torch_compile_backend (eager) applies with torch_compile: true"),
    ({"torch_compile": True, "torch_compile_mode": "fastest"}, "torch_compile_mode"),
    ({"optimizer": "galore_adamw_layerwise", "optim_target_modules": ["mlp"], "lr_scheduler": "one_cycle"}, "lr_scheduler: one_cycle (and lr_quadratic_warmup / cosine_constant_lr_ratio) cannot drive it"),
    ({"optimizer": "galore_adamw_layerwise", "optim_target_modules": ["mlp"], "gradient_accumulation_steps": 2}, "gradient_accumulation_steps must be 1 (got 2)"),
    ({"optimizer": "galore_adamw_layerwise", "optim_target_modules": ["mlp"], "micro_batch_size": 2, "batch_size": 8}, "gradient_accumulation_steps must be 1 (got 4)"),
    ({"liger_rms_norm": True}, "liger_rms_norm: the liger_* keys belong to the Liger plugin: add plugins: [axolotl.integrations.liger.LigerPlugin]"),
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_swiglu": True, "liger_glu_activation": True}, "liger_swiglu and liger_glu_activation are the same option"),
])
def test_combinations_that_cannot_work_are_refused_at_load(tmp_path, keys, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **keys)
    assert message in str(info.value)


def test_combinations_that_work_load(tmp_path):
    cfg = load(tmp_path, cosine_min_lr_ratio=0.1, cosine_constant_lr_ratio=0.8, lr_scheduler_kwargs={"num_cycles": 0.5})
    assert cfg.cosine_constant_lr_ratio == 0.8
    assert load(tmp_path, lr_scheduler="one_cycle", lr_div_factor=10).lr_div_factor == 10
    assert load(tmp_path, lr_scheduler="log_sweep", log_sweep_min_lr=1e-6, log_sweep_max_lr=1e-2).log_sweep_max_lr == 1e-2
    # a flag and the attn_implementation it means agree
    assert load(tmp_path, sdp_attention=True, attn_implementation="sdpa").sdp_attention is True
    groups = load(tmp_path, lr_groups=[{"name": "attention", "modules": ["q_proj", "k_proj"], "lr": 1e-4}]).model_dump()["lr_groups"]
    assert groups == [{"name": "attention", "modules": ["q_proj", "k_proj"], "lr": 1e-4}]
    galore = load(tmp_path, optimizer="galore_adamw", optim_target_modules=["attn", "mlp"], optim_args={"rank": 8})
    assert galore.optim_target_modules == ["attn", "mlp"]
    assert load(tmp_path, torch_compile=True, torch_compile_backend="eager", torch_compile_mode="default").torch_compile is True


def test_liger_plugin_loads_and_other_plugins_are_reported(tmp_path):
    cfg = load(tmp_path, plugins=["axolotl.integrations.liger.LigerPlugin"], liger_rope=True, liger_rms_norm=True, liger_glu_activation=True)
    assert cfg.liger_rms_norm is True and cfg.config_warnings == []
    path = tmp_path / "other.yml"
    path.write_text(yaml.safe_dump({**BASE, "plugins": ["axolotl.integrations.kd.KDPlugin"]}))
    with pytest.warns(MoltConfigWarning, match="ignored: plugins: axolotl.integrations.kd.KDPlugin — not supported yet"):
        load_config(path)


@pytest.mark.parametrize("keys", [
    {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": True},
    {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True},
    {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_cross_entropy": True},
])
def test_loss_kernel_keys_load_without_a_warning(tmp_path, keys):
    # they ask for another kernel of the loss molt computes anyway without the full logits (training/chunked_loss.py)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoltConfigWarning)
        cfg = load_config(path)
    assert cfg.config_warnings == []


def test_training_keys_are_read_by_the_train_stage(tmp_path):
    """No key of this area is reported as set-but-ignored by the stages (dag.unread_settings)."""
    from stages import dag

    cfg = load(tmp_path, plugins=["axolotl.integrations.liger.LigerPlugin"], liger_rms_norm=True, bf16=True, tf32=True, sdp_attention=True,
               torch_compile=True, torch_compile_backend="eager", lr_groups=[{"name": "a", "modules": ["q_proj"], "lr": 1e-4}],
               gradient_checkpointing="offload", float32=True, lr_quadratic_warmup=True, optim_args={"rank": 4})
    assert dag.unread_settings(cfg) == []
