"""FSDP through accelerate and the Trainer: fsdp / fsdp_config (Axolotl's two spellings) become the
Trainer's arguments, the combinations torch / accelerate reject are refused at load, and on CPU
(gloo, 2 processes) FSDP2 trains full weights and LoRA as one process does with the same global
batch, saves sharded checkpoints, resumes from one, and merge-sharded-fsdp-weights makes one
safetensors model of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from stages.config import MoltConfigWarning, ConfigError, config_from_dict
from stages.store import DataError
from stages.training.sharding import check_fsdp, check_resume, ddp_settings, fsdp_settings
from test_distributed import SETTINGS, free_port

FULL = dict(SETTINGS, adapter=None, lora_r=None, lora_alpha=None, lora_target_linear=None, learning_rate=1e-3)
BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "learning_rate": 1e-3, "micro_batch_size": 1}


def load(**keys):
    return config_from_dict({**BASE, **keys})


def test_both_spellings_of_fsdp_config_give_the_trainer_the_same_arguments():
    prefixed = load(fsdp=["full_shard", "auto_wrap"], fsdp_config={
        "fsdp_version": 2, "fsdp_offload_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_reshard_after_forward": True, "fsdp_activation_checkpointing": True})
    bare = load(fsdp_version=2, fsdp_config={
        "offload_params": False, "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True,
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "reshard_after_forward": True, "activation_checkpointing": True})
    assert fsdp_settings(prefixed) == fsdp_settings(bare) == {"fsdp": True, "fsdp_config": {
        "version": 2, "cpu_offload": False, "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True,
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "activation_checkpointing": True}}
    # the legacy list: shard_grad_op is FSDP2's reshard_after_forward: false, offload its CPU offload
    assert fsdp_settings(load(fsdp="shard_grad_op offload", fsdp_config={"version": 2}))["fsdp_config"] == {"version": 2, "reshard_after_forward": False, "cpu_offload": True}
    # Axolotl's default without a version is FSDP1, whose reshard_after_forward names the strategy
    assert fsdp_settings(load(fsdp=["full_shard"], fsdp_config={"reshard_after_forward": False}))["fsdp_config"] == {"version": 1, "reshard_after_forward": "shard_grad_op"}
    assert fsdp_settings(load()) == {}
    # FSDP1's sharding_strategy (in 35 of Axolotl's examples) is that entry of the list
    assert fsdp_settings(load(fsdp_config={"version": 2, "fsdp_sharding_strategy": "SHARD_GRAD_OP"}))["fsdp_config"] == {"version": 2, "reshard_after_forward": False}
    with pytest.raises(ConfigError, match="one sharding strategy"):
        load(fsdp=["full_shard"], fsdp_config={"sharding_strategy": "NO_SHARD"})

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="x", use_cpu=True, **fsdp_settings(bare))
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer" and args.fsdp_plugin_args["reshard_after_forward"] is True


def test_ddp_keys_reach_the_training_arguments_and_only_broadcast_buffers_is_keyed():
    from transformers import TrainingArguments

    from stages.train import Params

    config = load(ddp_timeout=120, ddp_bucket_cap_mb=50, ddp_broadcast_buffers=False, ddp_find_unused_parameters=True)
    args = TrainingArguments(output_dir="x", use_cpu=True, **ddp_settings(config))
    assert (args.ddp_timeout, args.ddp_bucket_cap_mb, args.ddp_broadcast_buffers, args.ddp_find_unused_parameters) == (120, 50, False, True)
    assert ddp_settings(load()) == {}  # the Trainer's defaults
    keyed = set(Params.model_fields)
    assert {"fsdp", "fsdp_config", "fsdp_version", "ddp_broadcast_buffers"} <= keyed


@pytest.mark.parametrize("keys, words", [
    ({"fsdp_config": {"fsdp_offload_param": True}}, ["offload_param", "did you mean offload_params"]),
    ({"fsdp_config": {"offload_params": True, "fsdp_offload_params": False}}, ["given twice"]),
    ({"fsdp_config": {"state_dict_type": "FULL"}}, ["state_dict_type", "FULL_STATE_DICT"]),
    ({"fsdp": ["full_shard", "shard_everything"]}, ["shard_everything", "not an FSDP option"]),
    ({"fsdp": ["hybrid_shard"], "fsdp_config": {"fsdp_version": 2}}, ["hybrid_shard", "FSDP1"]),
    ({"fsdp": ["full_shard", "shard_grad_op"], "fsdp_config": {"fsdp_version": 1}}, ["one sharding strategy"]),
    ({"fsdp_version": 2, "fsdp_config": {"fsdp_version": 1}}, ["differ"]),
    ({"fsdp_version": 2}, ["without fsdp_config"]),
    ({"fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, ["min_num_params"]),
    ({"fsdp_config": {"fsdp_version": 2, "cpu_offload_pin_memory": False}}, ["cpu_offload_pin_memory", "offload_params"]),
    ({"fsdp_config": {"offload_params": True}, "optimizer": "adamw_bnb_8bit"}, ["FSDP1", "8-bit"]),
    ({"fsdp_config": {"fsdp_version": 2}, "load_in_8bit": True, "adapter": "lora"}, ["load_in_8bit", "int8"]),
    ({"fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}, "save_only_model": True}, ["SHARDED_STATE_DICT", "save_only_model"]),
    ({"fsdp_config": {"fsdp_version": 2}, "relora_steps": 10, "adapter": "lora"}, ["relora_steps", "fsdp"]),
    ({"fsdp_config": {"fsdp_version": 2}, "rl": "dpo"}, ["fsdp is not supported yet with rl"]),
])
def test_combinations_fsdp_rejects_are_refused_at_load_with_the_reason(keys, words):
    with pytest.raises(ConfigError) as error:
        load(**keys)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_gradient_checkpointing_under_fsdp_activation_checkpointing_is_left_to_fsdp():
    # as Axolotl does: 4 of its examples set both
    with pytest.warns(MoltConfigWarning, match="FSDP checkpoints the layers"):
        cfg = load(fsdp_config={"fsdp_version": 2, "activation_checkpointing": True}, gradient_checkpointing=True)
    assert cfg.gradient_checkpointing is False and cfg.fsdp_config["activation_checkpointing"] is True


def test_fsdp1_on_cpu_processes_and_an_unknown_layer_class_are_refused_before_training(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    one = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"fsdp_version": 1}, fsdp_version=None)
    with pytest.raises(DataError, match="fsdp_version 1 on CPU processes.*fsdp_version: 2"):
        check_fsdp(one, model, world_size=2)
    offload = SimpleNamespace(fsdp=["full_shard", "offload"], fsdp_config={"fsdp_version": 2}, fsdp_version=None)
    with pytest.raises(DataError, match="offload_params on CPU processes"):
        check_fsdp(offload, model, world_size=2)
    wrong = SimpleNamespace(fsdp=None, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": "MistralDecoderLayer"}, fsdp_version=None)
    with pytest.raises(DataError, match="MistralDecoderLayer is not a module class of this model.*LlamaDecoderLayer"):
        check_fsdp(wrong, model, world_size=2)
    check_fsdp(SimpleNamespace(**{**vars(wrong), "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}), model, world_size=2)


def train_two(config: Path, cache_dir: Path, workdir: Path, *overrides: str, launcher: str = "accelerate") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = str(free_port())
    after = ["--cpu", "--num_processes", "2", "--main_process_port", port] if launcher == "accelerate" else ["--nproc_per_node", "2", "--master_port", port]
    command = [sys.executable, "-m", "stages.cli", "train", str(config), *overrides, "--cache-dir", str(cache_dir), "--launcher", launcher, "--", *after]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    return done


def trained(cache_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in cache_dir.glob("train/*/manifest.json")}


def losses(train_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((train_dir / "metrics.json").read_text())["loss_history"]]


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_fsdp2_full_weights_match_one_process_save_sharded_resume_and_merge(make_config, molt, cache_dir, workdir):
    # Axolotl's prefixed spelling; sharded checkpoints at steps 3 and 6 of the 6
    config = make_config(**FULL, save_steps=3, fsdp=["full_shard", "auto_wrap"], fsdp_config={
        "fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})
    done = train_two(config, cache_dir, workdir)
    (key, manifest), = trained(cache_dir).items()
    assert manifest["world_size"] == 2 and manifest["metrics"]["steps"] == 6 and manifest["metrics"]["fsdp_version"] == 2
    run = cache_dir / "train" / key
    for step in (3, 6):  # each rank's shard in torch.distributed.checkpoint's files, not one model file
        saved = run / "checkpoints" / f"checkpoint-{step}"
        assert (saved / "pytorch_model_fsdp_0").is_dir() and (saved / "optimizer_0").is_dir(), sorted(p.name for p in saved.iterdir())
        assert not list(saved.glob("*.safetensors"))
    sharded = load_file(run / "model" / "model.safetensors")  # the final model gathered whole
    assert "eval loss after training" in done.stderr + done.stdout

    # one process, no FSDP, twice the accumulation: the same global batch, the same steps
    one = molt("train", make_config("one.yml", **FULL), "--gradient-accumulation-steps", "2")
    assert one.exit_code == 0, one
    (one_key, _), = {k: m for k, m in trained(cache_dir).items() if k != key}.items()
    assert losses(run) == pytest.approx(losses(cache_dir / "train" / one_key), abs=1e-4)
    assert_same_tensors(sharded, load_file(cache_dir / "train" / one_key / "model" / "model.safetensors"), atol=1e-4)

    # resumed from the sharded checkpoint-3 by two processes: steps 4-6 again, the same weights
    train_two(config, cache_dir, workdir, "--resume-from-checkpoint", str(run / "checkpoints" / "checkpoint-3"))
    (resumed_key, resumed), = {k: m for k, m in trained(cache_dir).items() if k not in (key, one_key)}.items()
    assert resumed["metrics"]["steps"] == 6
    assert losses(cache_dir / "train" / resumed_key) == pytest.approx(losses(run)[3:], abs=1e-5)
    assert_same_tensors(load_file(cache_dir / "train" / resumed_key / "model" / "model.safetensors"), sharded, atol=1e-5)

    # the newest sharded checkpoint (step 6, the resumed run's) as one safetensors model that loads
    merged = molt("merge-sharded-fsdp-weights", config)
    assert merged.exit_code == 0, merged
    assert "checkpoint-6" in merged.output
    assert_same_tensors(load_file(workdir / "out" / "merged" / "model.safetensors"), sharded, atol=0)
    evaluated = molt("evaluate", config, "--base-model", str(workdir / "out" / "merged"))
    assert evaluated.exit_code == 0, evaluated
    held_out = json.loads((workdir / "out" / "eval" / "metrics.json").read_text())["validation"]["loss"]
    assert held_out == pytest.approx(manifest["metrics"]["eval_loss_after"], abs=1e-4)


def test_fsdp2_lora_through_torchrun_matches_one_process(make_config, molt, cache_dir, workdir):
    config = make_config(**SETTINGS, save_steps=3, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})
    train_two(config, cache_dir, workdir, launcher="torchrun")
    (key, manifest), = trained(cache_dir).items()
    # FULL_STATE_DICT (the default): each checkpoint holds the adapter gathered whole
    saved = cache_dir / "train" / key / "checkpoints" / "checkpoint-3"
    assert (saved / "adapter_model.safetensors").exists() and not list(saved.glob("pytorch_model_fsdp_*")), sorted(p.name for p in saved.iterdir())
    assert manifest["world_size"] == 2 and manifest["metrics"]["steps"] == 6 and manifest["metrics"]["fsdp_version"] == 2
    one = molt("train", make_config("one.yml", **SETTINGS), "--gradient-accumulation-steps", "2")
    assert one.exit_code == 0, one
    (one_key, _), = {k: m for k, m in trained(cache_dir).items() if k != key}.items()
    assert losses(cache_dir / "train" / key) == pytest.approx(losses(cache_dir / "train" / one_key), abs=1e-4)
    # the adapter gathered from the shards, under PEFT's own names, loadable as any adapter
    adapter = load_file(cache_dir / "train" / key / "model" / "adapter_model.safetensors")
    # FSDP2 reduce-scatters the gradients in another order than one process sums them: last-bit
    # differences, which Adam's division by sqrt(v) lifts to ~1e-4 after 6 steps at lr 0.01
    assert_same_tensors(adapter, load_file(cache_dir / "train" / one_key / "model" / "adapter_model.safetensors"), atol=1e-3)
    assert (workdir / "out" / "adapter_config.json").exists()
    # resuming it on CPU processes would hang in accelerate's load: refused with the way out
    with pytest.raises(DataError, match="FULL_STATE_DICT checkpoint does not resume.*SHARDED_STATE_DICT"):
        check_resume(SimpleNamespace(fsdp=None, fsdp_config={"fsdp_version": 2}), str(saved), world_size=2)


def test_qlora_with_fsdp_stores_the_4bit_weights_in_the_compute_dtype():
    """Axolotl's FSDP+QLoRA: bitsandbytes packs the 4-bit weights into the compute dtype, which FSDP
    shards like the others (uint8 storage would not flatten with them); a storage given is kept."""
    qlora = dict(adapter="qlora", load_in_4bit=True)
    assert load(**qlora, fsdp_config={"fsdp_version": 2}).bnb_config_kwargs == {"bnb_4bit_quant_storage": "float32"}
    given = load(**qlora, fsdp_config={"fsdp_version": 2}, bnb_config_kwargs={"bnb_4bit_compute_dtype": "bfloat16"})
    assert given.bnb_config_kwargs == {"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"}
    assert load(**qlora).bnb_config_kwargs is None  # without FSDP, bitsandbytes' own uint8

    from stages.training.model import quantization_config

    settings = quantization_config(load(**qlora, fsdp_config={"fsdp_version": 2}))
    assert settings.bnb_4bit_quant_storage == torch.float32


def test_qlora_under_fsdp2_trains_as_one_process(make_config, molt, cache_dir, workdir):
    qlora = dict(SETTINGS, adapter="qlora", load_in_4bit=True)
    train_two(make_config(**qlora, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}), cache_dir, workdir)
    (key, manifest), = trained(cache_dir).items()
    assert manifest["metrics"]["fsdp_version"] == 2 and manifest["metrics"]["steps"] == 6
    # one process, bitsandbytes' own uint8 storage: the same NF4 values, so the same losses
    one = molt("train", make_config("one.yml", **qlora), "--gradient-accumulation-steps", "2")
    assert one.exit_code == 0, one
    (one_key, _), = {k: m for k, m in trained(cache_dir).items() if k != key}.items()
    assert losses(cache_dir / "train" / key) == pytest.approx(losses(cache_dir / "train" / one_key), abs=1e-3)
    assert (cache_dir / "train" / key / "model" / "adapter_model.safetensors").exists()


def test_merge_sharded_fsdp_weights_says_what_it_lacks(make_config, molt, workdir):
    lora = molt("merge-sharded-fsdp-weights", make_config(fsdp_config={"fsdp_version": 2}))
    assert lora.exit_code == 2 and "LoRA adapter" in lora.output and "merge-lora" in lora.output
    untrained = molt("merge-sharded-fsdp-weights", make_config(**FULL, fsdp_config={"fsdp_version": 2}))
    assert untrained.exit_code == 2 and "no trained model" in untrained.output and "--checkpoint" in untrained.output
    (workdir / "checkpoint-3").mkdir()  # a checkpoint of FULL_STATE_DICT holds no pytorch_model_fsdp_*
    whole = molt("merge-sharded-fsdp-weights", make_config(**FULL, fsdp_config={"fsdp_version": 2}), "--checkpoint", str(workdir / "checkpoint-3"))
    assert whole.exit_code == 2 and "SHARDED_STATE_DICT" in whole.output
    assert not (workdir / "out" / "merged").exists()
