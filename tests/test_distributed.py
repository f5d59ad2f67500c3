"""Multi-process training: `molt train --launcher ...` starts real processes (gloo on CPU); the data
stages are built once, every rank trains, rank 0 alone commits the artifact and writes output_dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

# 12 train rows of one sample each: 6 micro-batches per rank, and the one-process run with twice
# the accumulation sees the same micro-batches per step (both cut the epoch into 12 batches)
SETTINGS = dict(sample_packing=False, micro_batch_size=1, val_set_size=0.25, max_steps=None, num_epochs=1, lr_scheduler="constant", learning_rate=0.01)


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold torchrun's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(train_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(train_dir / "model" / "adapter_model.safetensors")


def manifests(cache: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in cache.glob("train/*/manifest.json")}


def test_two_processes_train_as_one_with_twice_the_accumulation(make_config, molt, cache_dir, workdir):
    config = make_config(**SETTINGS)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "stages.cli", "train", str(config), "--cache-dir", str(cache_dir),
               "--launcher", "accelerate", "--", "--cpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]  # accelerate fails if any rank does
    # rank 0 alone reports and writes output_dir; the other rank's scratch dir is gone
    assert done.stderr.count("model written to") == 1, done.stderr[-3000:]
    assert (workdir / "out" / "adapter_model.safetensors").exists()
    assert not list((cache_dir / "tmp").iterdir()) and not list(cache_dir.glob("train/*.partial"))
    (two_key, two), = manifests(cache_dir).items()  # committed once
    assert two["world_size"] == 2 and two["metrics"]["micro_batches_per_epoch"] == 6 and two["metrics"]["steps"] == 6

    one = molt("train", config, "--gradient-accumulation-steps", "2")
    assert one.exit_code == 0, one
    # the data the two ranks built is reused (pack reads the accumulation for its step count)
    assert {"fetch_model", "tokenizer", "tokenize[0]", "tokenize[1]", "mix"} <= one.cached() and "train" in one.built()
    (one_key, single), = {k: m for k, m in manifests(cache_dir).items() if k != two_key}.items()
    assert single["metrics"]["steps"] == 6 and single["metrics"]["micro_batches_per_epoch"] == 12
    a, b = adapter(cache_dir / "train" / two_key), adapter(cache_dir / "train" / one_key)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    steps = json.loads((cache_dir / "train" / two_key / "metrics.json").read_text())["loss_history"]
    assert [h["loss"] for h in steps] == pytest.approx([h["loss"] for h in json.loads((cache_dir / "train" / one_key / "metrics.json").read_text())["loss_history"]], abs=1e-5)


def test_launcher_arguments_after_the_dashes_reach_the_launcher(make_config, molt, monkeypatch, cache_dir):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    # set, then removed: monkeypatch then removes what launch() sets too (a later Ray cluster would inherit it)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    config, cache = make_config(), ["--cache-dir", str(cache_dir)]  # before `--`, where the fixture would add it
    result = molt("train", config, "--learning-rate", "0.0002", *cache, "--launcher", "torchrun", "--", "--nproc_per_node", "2")
    assert result.exit_code == 0, result
    argv, = calls
    assert argv[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "stages.cli", "train", str(config),
                        "--learning-rate", "0.0002", "--cache-dir", str(cache_dir)]
    # accelerate's --cpu starts one process unless MPI is set up: its torchrun path on CPU instead
    calls.clear()
    result = molt("train", config, *cache, "--launcher", "accelerate", "--", "--cpu", "--num_processes=2")
    assert calls[0][1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    # a bad override fails before any process starts; launcher arguments need a launcher
    calls.clear()
    bad = molt("train", config, "--learning-rat", "1", *cache, "--launcher", "torchrun", "--", "--nproc_per_node", "2")
    assert bad.exit_code == 2 and "learning_rat" in bad.output and not calls
    stray = molt("train", config, *cache, "--", "--nproc_per_node", "2")
    assert stray.exit_code == 2 and "--launcher" in stray.output
    assert not cache_dir.exists() or not list(cache_dir.glob("train/*"))


def test_two_nodes_on_localhost_meet_at_a_c10d_endpoint(make_config, cache_dir, workdir):
    """Two torchrun invocations, as two machines would start them (--nnodes 2, one process each,
    a c10d rendezvous on 127.0.0.1), sharing one store: the data is built once, both ranks train,
    rank 0 commits. The DDP keys reach DDP (a timeout, no unused-parameter search)."""
    config = make_config(**SETTINGS, ddp_timeout=300, ddp_find_unused_parameters=False, ddp_bucket_cap_mb=10)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "stages.cli", "train", str(config), "--cache-dir", str(cache_dir), "--launcher", "torchrun", "--",
                               "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "molt-test"],
                              cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    both = "".join(outputs)
    assert both.count("model written to") == 1, both[-3000:]
    # the data stages: whichever node takes a key's lock first builds it (rank 1 builds quietly), the
    # other waits and reuses it: one manifest each, and rank 0 reports each once, built or cached
    for stage in ("fetch_data", "format", "tokenize", "mix", "pack"):
        made = list(cache_dir.glob(f"{stage}/*/manifest.json"))
        assert len(made) == (2 if stage in ("fetch_data", "format", "tokenize") else 1), (stage, made)
    for data in ("tokenize[0]", "tokenize[1]", "mix", "pack"):
        assert sum(line.split()[2:3] == [data] for line in both.splitlines() if "● built" in line or "✓ cached" in line) == 1, (data, both[-3000:])
    assert not list(cache_dir.glob("*/*.partial"))
    assert "find_unused_parameters=True" not in both  # DDP's warning when it searches for unused parameters
    (two,) = manifests(cache_dir).values()
    assert two["world_size"] == 2 and two["metrics"]["steps"] == 6
