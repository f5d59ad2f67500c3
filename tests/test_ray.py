"""Ray Train: `molt train CFG --use-ray` on a local Ray cluster the test starts (2 CPUs, no
dashboard), reached through RAY_ADDRESS as an existing cluster is: the data stages are built
once, in the driver; two CPU workers train (gloo); rank 0's artifact is committed and lands in
output_dir."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import ray  # in the test extra; `molt[ray]` for users

from conftest import REPO

# 12 train rows of one sample each: 6 micro-batches per worker (as tests/test_distributed.py)
SETTINGS = dict(sample_packing=False, micro_batch_size=1, val_set_size=0.25, max_steps=None, num_epochs=1, lr_scheduler="constant", learning_rate=0.01)
DATA_NODES = ["fetch_model", "tokenizer", "fetch_data[0]", "format[0]", "tokenize[0]", "fetch_data[1]", "format[1]", "tokenize[1]", "mix", "pack"]


@pytest.fixture
def ray_cluster():
    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield info.address_info["address"]
    finally:
        ray.shutdown()


def test_two_ray_workers_train_once_on_data_built_once(make_config, cache_dir, workdir, tiny_model_dir, ray_cluster):
    config = make_config(**SETTINGS, ray_num_workers=2, resources_per_worker={"CPU": 1})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_ADDRESS=ray_cluster)
    command = [sys.executable, "-m", "stages.cli", "train", str(config), "--use-ray", "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    # each data artifact built once, by the driver, before the workers started (a worker that
    # built one would report it too); the store holds one artifact per data stage instance
    built = [m.group(1) for m in re.finditer(r"● built\s+(\S+)", output)]
    assert sorted(b for b in built if b != "train") == sorted(DATA_NODES), output[-4000:]
    manifests = {p.parent.parent.name: [] for p in cache_dir.glob("*/*/manifest.json")}
    for p in cache_dir.glob("*/*/manifest.json"):
        manifests[p.parent.parent.name].append(json.loads(p.read_text()))
    per_stage = {"fetch_model": 1, "tokenizer": 1, "fetch_data": 2, "format": 2, "tokenize": 2, "mix": 1, "pack": 1, "train": 1}
    assert {stage: len(found) for stage, found in manifests.items()} == per_stage
    (train,) = manifests["train"]
    data_built = max(m["created"] for stage, found in manifests.items() if stage != "train" for m in found)
    assert data_built < train["created"]
    # two workers, one group: each dealt half the rows; rank 0 committed, the other's scratch is gone
    assert train["world_size"] == 2 and train["metrics"]["micro_batches_per_epoch"] == 6 and train["metrics"]["steps"] == 6
    assert not list((cache_dir / "tmp").iterdir()) and not list(cache_dir.glob("train/*.partial"))
    assert output.count("model written to") == 1

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), workdir / "out")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
    metrics = json.loads((workdir / "out" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


def test_use_ray_refuses_another_launcher(make_config, molt):
    result = molt("train", make_config(use_ray=True), "--launcher", "torchrun", "--", "--nproc_per_node", "2")
    assert result.exit_code == 2 and "Ray Train starts the workers itself" in result.output, result


def test_ray_workers_train_with_deepspeed(make_config, cache_dir, workdir, ray_cluster):
    # Axolotl's Ray example trains with a ZeRO config: Ray's gloo group is the one DeepSpeed uses
    from stages import deepspeed_config

    config = make_config(**SETTINGS, bf16=False, ray_num_workers=2, resources_per_worker={"CPU": 1}, deepspeed=str(deepspeed_config.SHIPPED / "zero2.json"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_ADDRESS=ray_cluster)
    command = [sys.executable, "-m", "stages.cli", "train", str(config), "--use-ray", "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    (train,) = [json.loads(p.read_text()) for p in cache_dir.glob("train/*/manifest.json")]
    assert train["metrics"]["deepspeed_zero_stage"] == 2 and train["world_size"] == 2 and train["metrics"]["steps"] == 6
    assert (workdir / "out" / "adapter_model.safetensors").is_file()


def test_the_ray_keys_are_read_not_reported_ignored(make_config, molt):
    result = molt("status", make_config(use_ray=True, ray_num_workers=2, resources_per_worker={"CPU": 1}, ray_run_name="r"))
    assert result.exit_code == 0, result
    assert "ignored" not in result.output and "not supported" not in result.output, result.output
