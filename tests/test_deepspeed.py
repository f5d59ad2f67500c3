"""DeepSpeed: the shipped ZeRO configs, `deepspeed:` checked at load (the file, its shape, its
`auto` values, the combinations that cannot work) and `molt fetch deepspeed_configs`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from stages import deepspeed_config
from stages.config import ConfigError, MoltConfigWarning, load_config

BASE = {"base_model": "tiny-model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "micro_batch_size": 2, "gradient_accumulation_steps": 3,
        "learning_rate": 1e-3}
SHIPPED = sorted(deepspeed_config.SHIPPED.glob("*.json"))


def load(tmp_path, **keys):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoltConfigWarning)
        return load_config(path)


def load_error(tmp_path, **keys) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **keys)
    return str(info.value)


def ds_file(tmp_path, body, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def test_the_shipped_set_covers_zero_1_2_3_with_and_without_offload():
    stages = {p.stem: deepspeed_config.zero_stage(json.loads(p.read_text())) for p in SHIPPED}
    assert {"zero1", "zero2", "zero2_cpuoffload", "zero3", "zero3_bf16", "zero3_bf16_cpuoffload_params", "zero3_bf16_cpuoffload_all"} <= set(stages)
    assert {stages["zero1"], stages["zero2"], stages["zero3"]} == {1, 2, 3}
    offloads = {p.stem: json.loads(p.read_text())["zero_optimization"] for p in SHIPPED}
    assert "offload_param" in offloads["zero3_bf16_cpuoffload_params"] and "offload_optimizer" not in offloads["zero3_bf16_cpuoffload_params"]
    assert {"offload_param", "offload_optimizer"} <= set(offloads["zero3_bf16_cpuoffload_all"])
    assert "offload_optimizer" in offloads["zero2_cpuoffload"] and "offload_optimizer" not in offloads["zero2"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_the_trainer_fills_each_auto(tmp_path, path):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = load(tmp_path, deepspeed=str(path))
    assert cfg.deepspeed == json.loads(path.read_text())  # the contents, which the train key hashes
    # what the Trainer does with it: every "auto" replaced from TrainingArguments and the model
    fixed_bf16 = cfg.deepspeed.get("bf16", {}).get("enabled") is True  # the *_bf16 files: the config must train in bf16 too
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5,
                             bf16=fixed_bf16, use_cpu=True, report_to=[])
    filled = HfTrainerDeepSpeedConfig(json.loads(json.dumps(cfg.deepspeed)))
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
    assert deepspeed_config._autos(filled.config) == []
    assert filled.config["train_micro_batch_size_per_gpu"] == 2 and filled.config["gradient_accumulation_steps"] == 3
    assert filled.config["train_batch_size"] == 6 and filled.config["gradient_clipping"] == 0.5
    if filled.config["zero_optimization"]["stage"] == 3:
        assert filled.config["zero_optimization"]["stage3_param_persistence_threshold"] == 640
        assert filled.config["zero_optimization"]["gather_16bit_weights_on_model_save"] is True  # the 16-bit weights gathered on save


@pytest.mark.parametrize("body, words", [
    ('{"zero_optimization": {"stage": 2,}}', ["ds.json", "not valid JSON", "line 1"]),
    ("[1, 2]", ["ds.json", "expected a JSON object", "list"]),
    ({"zero_optimization": {"stage": 5}}, ["ds.json", "zero_optimization.stage is 5", "0, 1, 2 or 3"]),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, ["ds.json", "zero_optimization.sub_group_size is \"auto\"", "train_batch_size"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, ["ds.json", "'optimizer' section", "lr_scheduler"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["ds.json", "'scheduler' section"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["offload_param needs stage 3", "stage 2"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, ["offload_optimizer", "'gpu'", "cpu"]),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, ["nvme needs nvme_path"]),
    ({"train_micro_batch_size_per_gpu": 0}, ["train_micro_batch_size_per_gpu is 0", "positive integer"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ["fp16.enabled and bf16.enabled are both true"]),
])
def test_a_bad_deepspeed_file_is_refused_naming_it_and_what_is_wrong(tmp_path, body, words):
    message = load_error(tmp_path, deepspeed=ds_file(tmp_path, body))
    for word in words:
        assert word in message, message


def test_a_missing_file_names_it_and_the_shipped_ones(tmp_path):
    message = load_error(tmp_path, deepspeed="deepspeed_configs/zero3.json")
    assert "deepspeed: deepspeed_configs/zero3.json: no such file" in message
    assert "molt fetch deepspeed_configs" in message and "zero3_bf16_cpuoffload_all.json" in message


@pytest.mark.parametrize("keys, words", [
    ({"deepspeed": "zero3.json", "load_in_8bit": True, "adapter": "lora"}, ["ZeRO-3", "load_in_8bit", "ZeRO-1 or ZeRO-2"]),
    ({"deepspeed": "zero3_bf16.json", "load_in_4bit": True, "adapter": "qlora"}, ["ZeRO-3", "load_in_4bit"]),
    ({"deepspeed": "zero2.json", "relora_steps": 10, "adapter": "lora"}, ["relora_steps (10) does not work with deepspeed"]),
    ({"deepspeed": "zero1.json", "fsdp_config": {"fsdp_version": 2}}, ["deepspeed and fsdp / fsdp_config are mutually exclusive"]),
    ({"deepspeed": "zero2.json", "rl": "dpo", "sample_packing": False}, ["deepspeed is not supported yet with rl"]),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(tmp_path, keys, words):
    keys = {**keys, "deepspeed": str(deepspeed_config.SHIPPED / keys["deepspeed"])}
    message = load_error(tmp_path, **keys)
    for word in words:
        assert word in message, message


def test_zero_2_with_an_8bit_base_loads(tmp_path):
    cfg = load(tmp_path, deepspeed=str(deepspeed_config.SHIPPED / "zero2.json"), load_in_8bit=True, adapter="lora")
    assert deepspeed_config.zero_stage(cfg.deepspeed) == 2


@pytest.mark.parametrize("body, words", [
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps is 4", "gradient_accumulation_steps is 3"]),
    ({"gradient_clipping": 0.3}, ["gradient_clipping is 0.3", "max_grad_norm is 1.0"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled is true", "bf16: True"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled is true", "bf16: false"]),
])
def test_fixed_values_that_contradict_the_config_are_refused(tmp_path, body, words):
    message = load_error(tmp_path, deepspeed=ds_file(tmp_path, body), **({"bf16": "fp16" in body}))
    for word in words:
        assert word in message, message


def test_fetch_deepspeed_configs_copies_the_shipped_files(workdir):
    from click.testing import CliRunner

    from stages.cli import main

    result = CliRunner().invoke(main, ["fetch", "deepspeed_configs"])
    assert result.exit_code == 0, result.output
    copied = sorted((workdir / "deepspeed_configs").glob("*.json"))
    assert [p.name for p in copied] == [p.name for p in SHIPPED]
    assert all(p.read_bytes() == (deepspeed_config.SHIPPED / p.name).read_bytes() for p in copied)
    result = CliRunner().invoke(main, ["fetch", "deepspeed_configs", "--dest", "elsewhere"])
    assert result.exit_code == 0 and (workdir / "elsewhere" / "zero3.json").is_file()
def test_the_train_key_hashes_the_contents_not_the_path(tmp_path):
    from stages.config import slice_params
    from stages.train import Params

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    body = json.loads((deepspeed_config.SHIPPED / "zero2.json").read_text())
    one = slice_params(Params, load(tmp_path, deepspeed=ds_file(tmp_path / "a", body)).model_dump(mode="json"))
    two = slice_params(Params, load(tmp_path, deepspeed=ds_file(tmp_path / "b", body)).model_dump(mode="json"))
    other = slice_params(Params, load(tmp_path, deepspeed=str(deepspeed_config.SHIPPED / "zero3.json")).model_dump(mode="json"))
    assert one.model_dump(mode="json") == two.model_dump(mode="json") != other.model_dump(mode="json")




# -- training: 2 processes (gloo on CPU; DeepSpeed's CPU accelerator) ------------------------------

TRAIN = dict(sample_packing=False, micro_batch_size=1, val_set_size=0.25, max_steps=None, num_epochs=1, lr_scheduler="constant", learning_rate=0.01,
             bf16=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_zero_trains_with_two_processes_and_the_model_loads(make_config, cache_dir, workdir, name):
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from conftest import REPO

    config = make_config(**TRAIN, deepspeed=str(deepspeed_config.SHIPPED / f"{name}.json"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "stages.cli", "train", str(config), "--cache-dir", str(cache_dir),
               "--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port", str(free_port())]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    (manifest,) = [json.loads(p.read_text()) for p in cache_dir.glob("train/*/manifest.json")]
    assert manifest["metrics"]["deepspeed_zero_stage"] == int(name[-1])  # DeepSpeed's engine trained, at that stage
    assert manifest["world_size"] == 2 and manifest["metrics"]["steps"] == 6 and manifest["params"]["deepspeed"]["zero_optimization"]["stage"] == int(name[-1])
    # the adapter is whole (ZeRO-3's partitions gathered on save) and trained (LoRA's B starts at zero)
    adapter = load_file(workdir / "out" / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(v.numel() > 0 for v in adapter.values()) and any(v.abs().sum() > 0 for v in b)
    metrics = json.loads((workdir / "out" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = yaml.safe_load(config.read_text())["base_model"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), workdir / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    if name == "zero1":  # the ranks split the rows: one process with twice the accumulation takes the same steps
        from conftest import invoke_molt

        one = invoke_molt("train", config, "--deepspeed", "null", "--gradient-accumulation-steps", "2", "--output-dir", "out1", cache=cache_dir)
        assert one.exit_code == 0, one
        single = json.loads((workdir / "out1" / "metrics.json").read_text())
        assert [h["loss"] for h in metrics["loss_history"]] == pytest.approx([h["loss"] for h in single["loss_history"]], abs=1e-4)
