"""Concurrent runs and kills, with real `molt` processes and real signals: two preprocesses of
one config on an empty cache build each artifact once (the second waits on the per-key lock and
says for whom); `molt gc` during a train keeps what the train uses (its lease); a run killed
with SIGKILL mid-tokenize or mid-train leaves a temp dir that the next run or gc removes, and the
rerun carries on from what was committed (and from the last checkpoint)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ALPACA_ROWS, REPO, write_jsonl

DATA_NODES = {"fetch_model", "tokenizer", "fetch_data[0]", "format[0]", "tokenize[0]", "fetch_data[1]", "format[1]", "tokenize[1]", "mix", "pack"}


def start(args: list, workdir: Path, cache_dir: Path, log: str) -> tuple[subprocess.Popen, Path]:
    """`molt ARGS` as a process of its own; its output goes to workdir/<log>.log."""
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="240")
    out = workdir / f"{log}.log"
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *map(str, args), "--cache-dir", str(cache_dir)],
                                cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return proc, out


def finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, out.read_text()


def marked(output: str, mark: str) -> list[str]:
    return [line.split(mark, 1)[1].split()[0] for line in output.splitlines() if mark in line]


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := sorted(root.glob(pattern))):
        assert proc.poll() is None, f"the run ended before {pattern} appeared"
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.01)
    return found[0]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def leftovers(cache_dir: Path) -> list[Path]:
    """Temp dirs, partial dirs and leases in a store."""
    return sorted([*(cache_dir / "tmp").glob("*"), *cache_dir.glob("*/*.partial"), *(cache_dir / "leases").glob("*")])


def test_two_preprocesses_at_once_build_each_artifact_once(make_config, workdir, cache_dir):
    config = make_config()
    write_jsonl(workdir / "data" / "alpaca.jsonl", ALPACA_ROWS * 125)  # 1000 rows: the stages take long enough to overlap
    runs = [start(["preprocess", config], workdir, cache_dir, f"run{i}") for i in range(2)]
    (code0, out0), (code1, out1) = [finish(*run) for run in runs]
    assert code0 == 0 and code1 == 0, out0 + out1
    assert "Traceback" not in out0 + out1
    built = marked(out0, "● built") + marked(out1, "● built")
    assert sorted(built) == sorted(DATA_NODES), (out0, out1)  # each instance once, by one of the two
    manifests = [json.loads(p.read_text()) for p in cache_dir.glob("*/*/manifest.json")]
    assert sorted(m["stage"] for m in manifests) == sorted(n.partition("[")[0] for n in DATA_NODES)
    # the one that found a key's lock held said which stage it waited on and for which process
    waits = [(i, line) for i, out in enumerate((out0, out1)) for line in out.splitlines() if "⧗ waiting" in line]
    assert waits, (out0, out1)
    for i, line in waits:
        other = runs[1 - i][0].pid
        assert re.search(rf"⧗ waiting\s+\S+\s+pid {other} is building it", line), line
        assert line.split()[2] in DATA_NODES
    # both name the same prepared dataset, written once, whole, with no temp dir beside it
    (prepared,) = {line.split()[2] for out in (out0, out1) for line in out.splitlines() if line.startswith("prepared dataset:")}
    assert [p.name for p in (workdir / "prepared").iterdir()] == [Path(prepared).name]
    import datasets

    assert datasets.load_from_disk(str(workdir / prepared))["train"].num_rows > 0
    assert leftovers(cache_dir) == []


def test_gc_during_a_train_keeps_what_the_train_uses(make_config, workdir, cache_dir, molt):
    from stages.store import Store

    config = make_config(max_steps=20, val_set_size=0.0, sample_packing=False)
    assert molt("preprocess", config).exit_code == 0
    store = Store(cache_dir)
    with store.writing("mix", "0" * 32) as tmp:  # an old artifact no run uses: gc removes it
        (tmp / "train.arrow").write_text("old")
        store.commit(tmp, "mix", "0" * 32, {})
    old = time.time() - 60  # built before any run in flight
    os.utime(cache_dir / "mix" / ("0" * 32) / "manifest.json", (old, old))
    inputs = {f"{m.parent.parent.name}/{m.parent.name}" for m in cache_dir.glob("*/*/manifest.json")} - {"mix/" + "0" * 32}

    run, log = start(["train", config], workdir, cache_dir, "train")
    wait_for("tmp/train-*", cache_dir, run)  # the train stage is running
    # as if the config's last run had moved on: no refs protect the train's inputs now
    for refs in (cache_dir / "refs").glob("*.json"):
        refs.unlink()
    gc = molt("gc")
    assert gc.exit_code == 0, gc
    assert run.poll() is None, "the train finished before gc ran: make it longer"
    assert f"removed mix/{'0' * 12}" in gc.output
    assert f"in use by molt pid {run.pid}" in gc.output
    assert not (cache_dir / "mix" / ("0" * 32)).exists()
    for entry in inputs:
        assert (cache_dir / entry / "manifest.json").exists(), f"gc removed {entry}, which the train uses"
    code, output = finish(run, log)
    assert code == 0, output
    assert "model written to" in output
    # once the train is over its lease is gone: only refs keep artifacts, and these have none
    dry = molt("gc", "--dry-run")
    assert any(f"would remove {entry.split('/')[0]}/{entry.split('/')[1][:12]}" in dry.output for entry in inputs), dry.output
    assert leftovers(cache_dir) == []


def test_gc_keeps_what_a_live_process_leases_and_what_it_built(molt, cache_dir):
    from stages.store import Store

    store = Store(cache_dir)

    def artifact(key: str) -> None:
        with store.writing("mix", key) as tmp:
            (tmp / "train.arrow").write_text(key)
            store.commit(tmp, "mix", key, {})

    artifact("a" * 32), artifact("b" * 32)
    old = time.time() - 60
    for key in ("a" * 32, "b" * 32):
        os.utime(cache_dir / "mix" / key / "manifest.json", (old, old))
    runner = Store(cache_dir)  # a "run" in this (live) process: it leases a, then builds c
    runner.hold("mix", "a" * 32)
    time.sleep(1.1)  # gc allows a second for coarse file-system clocks
    artifact("c" * 32)
    # a dead process's lease holds nothing; its temp dir is a leftover
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache_dir / "leases" / f"lease-{dead.pid}@x-abc.json").write_text(json.dumps({"pid": dead.pid, "host": runner._lease["host"], "since": 0, "keys": ["mix/" + "b" * 32]}))
    (cache_dir / "tmp" / f"tokenize-12345678-{dead.pid}@{runner._lease['host']}-abc").mkdir(parents=True)
    result = molt("gc")
    assert result.exit_code == 0, result
    assert f"kept mix/{'a' * 12}: in use by molt pid {os.getpid()}" in result.output
    assert f"kept mix/{'c' * 12}: built since molt pid {os.getpid()} started" in result.output
    assert f"removed mix/{'b' * 12}" in result.output and "left by a killed run" in result.output
    assert {p.name for p in (cache_dir / "mix").iterdir()} == {"a" * 32, "c" * 32}
    assert not list((cache_dir / "tmp").iterdir())
    assert [p.name for p in (cache_dir / "leases").iterdir()] == [runner._lease_path.name]
    runner.release()
    assert "removed mix/" in molt("gc").output and not list((cache_dir / "mix").iterdir())


def test_a_run_killed_mid_tokenize_leaves_nothing_after_the_rerun(make_config, workdir, cache_dir, molt):
    config = make_config()
    rows = [dict(r, output=f"{r['output']} ({i})") for i in range(2500) for r in ALPACA_ROWS]  # 20000 rows: tokenize takes a while
    write_jsonl(workdir / "data" / "alpaca.jsonl", rows)
    run, _ = start(["preprocess", config], workdir, cache_dir, "killed")
    tmp = wait_for("tmp/tokenize-*", cache_dir, run)
    kill(run)
    assert tmp.exists() and str(run.pid) in tmp.name  # the killed run's temp dir, named by its pid
    assert not list(cache_dir.glob("tokenize/*/manifest.json"))  # nothing half-written committed
    dry = molt("gc", "--dry-run")
    assert f"would remove tmp/{tmp.name}: left by a killed run" in dry.output and tmp.exists()

    rerun = molt("preprocess", config)
    assert rerun.exit_code == 0, rerun
    assert {"fetch_data[0]", "format[0]"} <= rerun.cached()  # what the killed run committed is reused
    assert "tokenize[0]" in rerun.built()
    assert leftovers(cache_dir) == [], leftovers(cache_dir)
    verify = molt("verify", config)
    assert verify.exit_code == 0, verify
    assert "every data stage reproduces" in verify.output


def test_a_run_killed_mid_train_resumes_and_leaves_nothing(make_config, workdir, cache_dir, molt):
    settings = dict(max_steps=12, save_steps=3, learning_rate=0.01, lr_scheduler="constant", val_set_size=0.0, sample_packing=False)
    config = make_config(**settings)
    run, _ = start(["train", config], workdir, cache_dir, "killed")
    state = wait_for("train/*.partial/checkpoints/checkpoint-3/trainer_state.json", cache_dir, run, timeout=240)
    kill(run)
    (tmp,) = (cache_dir / "tmp").glob("train-*")
    assert str(run.pid) in tmp.name
    checkpoints = state.parent.parent
    last = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))

    resumed = molt("train", make_config(**settings, auto_resume_from_checkpoints=True))
    assert resumed.exit_code == 0, resumed
    assert f"resuming from {checkpoints / f'checkpoint-{last}'}" in resumed.output
    assert resumed.built() == {"train"}  # the data stages the killed run committed are reused
    (train_dir,) = [p.parent for p in cache_dir.glob("train/*/manifest.json")]
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert metrics["loss_history"][0]["step"] == last + 1  # carried on from its last checkpoint
    assert leftovers(cache_dir) == [], leftovers(cache_dir)  # the killed run's temp dir and the partial dir are gone
    verify = molt("verify", config)
    assert verify.exit_code == 0, verify
