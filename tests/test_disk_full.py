"""A disk that fills up while a stage writes: molt names the stage, exits 2 with no traceback, and
the store keeps only the artifacts finished before (no temp dir, no half artifact).

The full disk is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with EFBIG
instead of killing the process) on a second `molt preprocess`, whose new dataset's snapshot is
larger than the limit; the first run, without a limit, built everything else."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO
from test_bad_inputs import complete_artifacts_only

LIMIT = 4 << 20  # bytes one file may grow to


def _limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _molt(workdir: Path, limited: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", "preprocess", "config.yml", "--cache-dir", str(workdir / "cache")],
                          cwd=workdir, env=dict(os.environ, COLUMNS="240", PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limited if limited else None)


def test_a_full_disk_names_the_stage_and_leaves_the_store_whole(tmp_path, tiny_model_dir):
    config = {"base_model": str(tiny_model_dir), "sequence_len": 128, "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    row = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    first = _molt(tmp_path, limited=False)
    assert first.returncode == 0, first.stdout + first.stderr
    built = {p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").glob("*/*") if p.is_dir()}

    big = {"instruction": "Repeat it.", "input": "", "output": "word " * 2000}  # ~10 kB a row, ~10 MB in all
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(big) + "\n" for _ in range(1000)))
    done = _molt(tmp_path, limited=True)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    said = " ".join(output.split())
    assert "fetch_data[0]" in said and "ran out of disk space" in said, output
    complete_artifacts_only(tmp_path / "cache")
    now = {p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").glob("*/*") if p.is_dir()}
    assert now - built <= {Path("tmp")} | {p for p in now if p.parts[0] in ("locks", "refs", "tmp")}, now - built


def test_a_full_tmpfs_store_names_the_stage_and_leaves_the_store_whole(tmp_path, tiny_model_dir):
    """The same with a real ENOSPC: the store on a 28 MB tmpfs (needs root; skipped elsewhere)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28m", "tmpfs", str(cache)], capture_output=True).returncode:
        import pytest

        pytest.skip("mounting a tmpfs needs root")
    try:
        config = {"base_model": str(tiny_model_dir), "sequence_len": 128, "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}
        (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
        (tmp_path / "data.jsonl").write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
        first = _molt(tmp_path, limited=False)
        assert first.returncode == 0, first.stdout + first.stderr
        big = {"instruction": "Repeat it.", "input": "", "output": "word " * 2000}
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(big) + "\n" for _ in range(2000)))  # ~20 MB
        done = _molt(tmp_path, limited=False)
        output = done.stdout + done.stderr
        assert done.returncode == 2 and "Traceback" not in output, output
        said = " ".join(output.split())
        assert "ran out of disk space" in said and any(f"{stage}[0] (datasets[0]" in said for stage in ("fetch_data", "format")), output
        complete_artifacts_only(cache)
    finally:
        subprocess.run(["umount", str(cache)], capture_output=True)
