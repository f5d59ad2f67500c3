"""`dvc repro` end to end in a temporary git repo: the same DAG, the same store, the same keys."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


def sh(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def dvc_repo(tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    data = repo / "data"
    data.mkdir()
    (data / "alpaca.jsonl").write_text("".join(
        f'{{"instruction": "Add {i} and {i + 1}.", "input": "", "output": "{2 * i + 1}"}}\n' for i in range(24)))
    (data / "chat.jsonl").write_text("".join(
        f'{{"messages": [{{"role": "user", "content": "Say {i}."}}, {{"role": "assistant", "content": "{i}"}}]}}\n' for i in range(24)))
    config = {
        "base_model": str(tiny_model_dir),
        "chat_template": "chatml",
        "datasets": [{"path": "data/alpaca.jsonl", "type": "alpaca"}, {"path": "data/chat.jsonl", "type": "chat_template"}],
        "val_set_size": 0.25,
        "sequence_len": 128,
        "sample_packing": True,
        "adapter": "lora",
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.001,
        "output_dir": "out",
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (repo / ".dvcignore").write_text("__pycache__/\n*.pyc\ncache/\n")
    (repo / ".gitignore").write_text("cache/\n")
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "molt", "dvc-yaml", "params.yaml")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


def edit(repo: Path, **changes) -> None:
    config = yaml.safe_load((repo / "params.yaml").read_text())
    config.update(changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_dvc_repro_follows_the_molt_dag(dvc_repo):
    everything = {"fetch_model", "tokenizer", "fetch_data-0", "format-0", "tokenize-0", "fetch_data-1", "format-1", "tokenize-1", "mix", "pack", "train", "merge", "evaluate", "export"}
    assert ran(sh(dvc_repo, "dvc", "repro")) == everything
    assert (dvc_repo / "artifacts" / "merge" / "model.safetensors").exists()
    assert ran(sh(dvc_repo, "dvc", "repro")) == set()
    assert "up to date" in sh(dvc_repo, "dvc", "status").lower()

    edit(dvc_repo, chat_template="llama3")
    rerun = ran(sh(dvc_repo, "dvc", "repro"))
    assert "fetch_model" not in rerun and not {"fetch_data-0", "fetch_data-1"} & rerun
    assert {"tokenizer", "format-0", "format-1", "tokenize-1", "mix", "pack", "train", "merge", "evaluate", "export"} <= rerun

    edit(dvc_repo, learning_rate=0.0005)
    assert ran(sh(dvc_repo, "dvc", "repro")) == {"train", "merge", "evaluate", "export"}

    # molt reads the same store: after dvc repro, molt computes nothing
    out = sh(dvc_repo, "molt", "run", "params.yaml")
    assert "built" not in out and out.count("cached") >= len(everything)


def test_molt_then_dvc_computes_nothing_twice(dvc_repo):
    first = sh(dvc_repo, "molt", "run", "params.yaml")
    assert first.count("built") == 14
    out = sh(dvc_repo, "dvc", "repro")
    assert len(ran(out)) == 14  # DVC has no record yet, so it runs each command ...
    assert "building" not in out  # ... and each one finds its artifact in molt's store
    assert ran(sh(dvc_repo, "dvc", "repro")) == set()


def test_committed_dvc_yaml_is_generated_from_params(tmp_path):
    out = tmp_path / "dvc.yaml"
    sh(REPO, "molt", "dvc-yaml", "params.yaml", "--output", str(out))
    assert out.read_text() == (REPO / "dvc.yaml").read_text(), "dvc.yaml is stale: run `molt dvc-yaml params.yaml`"


def test_two_clones_share_artifacts_through_a_dvc_remote(dvc_repo, tmp_path):
    remote = tmp_path / "remote"
    sh(dvc_repo, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(dvc_repo, "dvc", "repro")
    sh(dvc_repo, "molt", "push")
    sh(dvc_repo, "git", "add", "-A")
    sh(dvc_repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(dvc_repo), str(clone))
    sh(clone, "molt", "pull")
    assert "up to date" in sh(clone, "dvc", "status").lower()
    out = sh(clone, "molt", "preprocess", "params.yaml")
    assert "building" not in out and "adopted" in out
    out = sh(clone, "molt", "train", "params.yaml")
    assert "building" not in out
    assert (clone / "out" / "adapter_config.json").exists()
