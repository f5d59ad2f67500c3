"""The bad-input corpus (tests/bad_inputs/, see its README): each case exits as it says, names
what its message must name, prints no traceback and leaves only complete artifacts in the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import MoltResult, invoke_molt
from stages.store import hash_tree

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").exists())


def prepare(case: str, workdir: Path, tiny_model_dir: Path) -> dict:
    spec = yaml.safe_load((CORPUS / case / "case.yaml").read_text())
    for source in (CORPUS / case).rglob("*"):
        if source.name == "case.yaml" or source.is_dir():
            continue
        dest = workdir / source.relative_to(CORPUS / case)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        if b"${TINY_MODEL}" in data:
            data = data.replace(b"${TINY_MODEL}", str(tiny_model_dir).encode())
        dest.write_bytes(data)
    return spec


def run_case(spec: dict, workdir: Path) -> MoltResult:
    if "timeout_s" not in spec:
        return invoke_molt(*spec["args"], cache=workdir / "cache")
    env = dict(os.environ, COLUMNS="240")
    try:
        done = subprocess.run([sys.executable, "-m", "stages.cli", *spec["args"], "--cache-dir", str(workdir / "cache")],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=spec["timeout_s"])
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {spec['timeout_s']} s")
    output = done.stdout + done.stderr
    return MoltResult(done.returncode, output, RuntimeError("traceback") if "Traceback (most recent call last)" in output else None)


def complete_artifacts_only(cache: Path) -> None:
    if not cache.exists():
        return
    leftovers = [p for p in (cache / "tmp").glob("*")] if (cache / "tmp").exists() else []
    assert not leftovers, f"temp dirs left in the store: {leftovers}"
    for stage_dir in cache.iterdir():
        if stage_dir.name in ("tmp", "locks", "refs") or not stage_dir.is_dir():
            continue
        for artifact in stage_dir.iterdir():
            assert not artifact.name.endswith(".partial"), f"partial dir left: {artifact}"
            if artifact.is_dir():
                manifest = json.loads((artifact / "manifest.json").read_text())
                assert hash_tree(artifact) == manifest["content"], f"{artifact} does not match its manifest"


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, workdir, tiny_model_dir):
    spec = prepare(case, workdir, tiny_model_dir)
    result = run_case(spec, workdir)
    assert result.exception is None, result  # an exception that escaped the CLI: a traceback
    assert result.exit_code == spec["exit"], result
    said = " ".join(result.output.split()).lower()
    for words in spec["contains"]:
        assert str(words).lower() in said, f"{words!r} not in the output:\n{result.output[-3000:]}"
    complete_artifacts_only(workdir / "cache")


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 50  # the issue asks for at least 50 (config_, model_ and data_ cases)
