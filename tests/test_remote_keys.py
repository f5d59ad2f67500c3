"""Keys never touch the network: a remote (fsspec) dataset is keyed on its metadata, `molt status`
and `molt dag` read and copy nothing, and the copy happens when fetch_data runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from stages import fetch_data
from stages.store import DataError
from conftest import CHAT_ROWS, REPO, artifact_dirs, status_rows

REMOTE = "memory://molt-remote-keys/chat.jsonl"


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def remote(monkeypatch, tmp_path):
    """A remote chat dataset at REMOTE; returns the list of paths whose bytes were read."""
    monkeypatch.setenv("MOLT_REMOTE_CACHE", str(tmp_path / "remote-cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe(REMOTE, _jsonl(CHAT_ROWS))
    reads = []
    cat, open_ = MemoryFileSystem.cat_file, MemoryFileSystem._open
    monkeypatch.setattr(MemoryFileSystem, "cat_file", lambda self, path, *a, **k: reads.append(path) or cat(self, path, *a, **k))
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda self, path, *a, **k: reads.append(path) or open_(self, path, *a, **k))
    yield reads
    fs.rm("/molt-remote-keys", recursive=True)


def _copies(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "remote-cache").rglob("*") if p.is_file()]


def test_status_and_dag_copy_nothing_preprocess_fetches_and_metadata_changes_are_stale(tmp_path, remote, make_config, molt, cache_dir):
    config = make_config(datasets=[{"path": REMOTE, "type": "chat_template"}, {"path": "data/alpaca.jsonl", "type": "alpaca"}])
    for command in ("status", "dag"):
        result = molt(command, config)
        assert result.exit_code == 0, result
    assert remote == [] and _copies(tmp_path) == [] and artifact_dirs(cache_dir) == set()

    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert "fetch_data[0]" in result.built(), result
    assert [p.name for p in _copies(tmp_path)] == ["chat.jsonl"] and remote
    manifest = next(cache_dir.glob("fetch_data/*/manifest.json"), None)
    identities = [json.loads(m.read_text())["sources"] for m in cache_dir.glob("fetch_data/*/manifest.json")]
    assert manifest and any(s.get("chat.jsonl", "").startswith("memory:///molt-remote-keys/chat.jsonl size=") for s in identities)
    assert status_rows(molt, config)["fetch_data[0]"]["state"] == "cached"

    fsspec.filesystem("memory").pipe(REMOTE, _jsonl(CHAT_ROWS[:-1]))  # new bytes: new size and creation time
    remote.clear()
    rows = status_rows(molt, config)
    assert remote == []
    assert rows["fetch_data[0]"]["state"] == "stale" and rows["fetch_data[0]"]["why"] == ["source chat.jsonl changed"], rows
    assert rows["fetch_data[1]"]["state"] == "cached"


class Bare(MemoryFileSystem):
    """A filesystem whose info() gives a size and nothing that changes with the content."""

    protocol = "molt-bare"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("molt-bare://"))

    def info(self, path, **kwargs):
        info = super().info(path, **kwargs)
        return {k: info[k] for k in ("name", "size", "type")}


def test_a_filesystem_without_usable_metadata_is_refused(monkeypatch):
    fsspec.register_implementation("molt-bare", Bare, clobber=True)
    Bare().pipe("/molt-bare-test/d.jsonl", _jsonl(CHAT_ROWS[:1]))
    try:
        params = fetch_data.Params(dataset=fetch_data.Source(path="molt-bare://molt-bare-test/d.jsonl"))
        with pytest.raises(DataError, match=r"reports no etag, checksum, version id or modification time \(only name, size, type\)"):
            fetch_data.sources(params)
    finally:
        Bare().rm("/molt-bare-test", recursive=True)


def test_data_files_mix_local_paths_and_remote_identities(tmp_path, remote):
    local = tmp_path / "local.jsonl"
    local.write_bytes(_jsonl(CHAT_ROWS[:2]))
    params = fetch_data.Params(dataset=fetch_data.Source(path="json", data_files=[str(local), REMOTE]))
    found = fetch_data.sources(params)
    assert found[0] == ("local.jsonl", local)
    assert found[1][0] == "chat.jsonl" and found[1][1].startswith("memory:///molt-remote-keys/chat.jsonl size=")
    assert remote == []
    under = fetch_data.Params(dataset=fetch_data.Source(path="memory://molt-remote-keys", data_files="chat.jsonl"))
    assert fetch_data.sources(under) == [("chat.jsonl", found[1][1])]


# -- with networking off ------------------------------------------------------------------------

NO_NETWORK = '''
"""Loaded at start-up from PYTHONPATH: any network connection or name lookup is logged and refused."""
import os
import socket


def _refuse(what):
    def refused(*args, **kwargs):
        with open(os.environ["MOLT_NET_LOG"], "a") as log:
            log.write(f"{what} {args[1:] if what.startswith('socket.') else args}\\n")
        raise OSError(f"network disabled in this test: {what}")
    return refused


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guard(original, what):
    def guarded(self, address, *args):
        if self.family == getattr(socket, "AF_UNIX", None):  # local IPC, not the network
            return original(self, address, *args)
        return _refuse(what)(self, address)
    return guarded


socket.socket.connect = _guard(_connect, "socket.connect")
socket.socket.connect_ex = _guard(_connect_ex, "socket.connect_ex")
socket.create_connection = _refuse("create_connection")
socket.getaddrinfo = _refuse("getaddrinfo")
socket.gethostbyname = _refuse("gethostbyname")
'''

CREATED = 1700000000.0  # the remote file's creation time, the same in every subprocess

DRIVER = f'''
import os
import sys
from datetime import datetime, timezone

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

fs = fsspec.filesystem("memory")
fs.pipe({REMOTE!r}, {_jsonl(CHAT_ROWS)!r})
fs.store[fs._strip_protocol({REMOTE!r})].created = datetime.fromtimestamp({CREATED!r}, timezone.utc)


def logged(original):
    def read(self, path, *args, **kwargs):  # reading the remote file's bytes counts as an attempt too
        with open(os.environ["MOLT_NET_LOG"], "a") as log:
            log.write(f"read {{path}}\\n")
        return original(self, path, *args, **kwargs)
    return read


MemoryFileSystem.cat_file, MemoryFileSystem._open = logged(MemoryFileSystem.cat_file), logged(MemoryFileSystem._open)
from stages.cli import main

main(sys.argv[1:], prog_name="molt")
'''


def _offline(tmp_path: Path, *args, cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """`molt ARGS` in a fresh Python whose sockets refuse to connect; (result, network attempts)."""
    (tmp_path / "offline").mkdir(exist_ok=True)
    (tmp_path / "offline" / "sitecustomize.py").write_text(NO_NETWORK)
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "network.log"
    log.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "offline"), str(REPO)]), MOLT_NET_LOG=str(log),
               MOLT_REMOTE_CACHE=str(tmp_path / "remote-cache"))
    result = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, log.read_text() if log.exists() else ""


def test_the_network_guard_sees_an_attempt(tmp_path):
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(NO_NETWORK)
    log = tmp_path / "network.log"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "offline"), MOLT_NET_LOG=str(log))
    code = "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\nexcept OSError as e:\n    print(e)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "network disabled" in result.stdout and "create_connection" in log.read_text()


def test_status_and_dag_run_offline(tmp_path, make_config, cache_dir):
    """With the data stages built, every key up to train's is computed offline; the demo config,
    on an empty store, as far as its first stages."""
    config = make_config(datasets=[{"path": REMOTE, "type": "chat_template"}, {"path": "data/alpaca.jsonl", "type": "alpaca"}])
    result, attempts = _offline(tmp_path, "preprocess", config, "--cache-dir", cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert attempts == "read /molt-remote-keys/chat.jsonl\n"  # fetch_data reads the remote file; nothing goes out
    runs = [(config, tmp_path, cache_dir), (REPO / "pipelines" / "smollm2-lora.yml", REPO, tmp_path / "demo-cache")]
    for cfg, cwd, cache in runs:
        for command in (["status", "--json"], ["dag"]):
            result, attempts = _offline(tmp_path, *command, cfg, "--cache-dir", cache, cwd=cwd)
            assert result.returncode == 0, result.stdout + result.stderr
            assert attempts == "", attempts
            assert "fetch_data[0]" in result.stdout
            if command[0] == "status" and cfg == config:
                rows = {r["stage"]: r for r in json.loads(result.stdout)}
                states = {name: (r["state"], r["key"], r["why"]) for name, r in rows.items()}
                assert rows["fetch_data[0]"]["state"] == rows["pack"]["state"] == "cached", states
                assert all(r["key"] for name, r in rows.items() if name not in ("merge", "evaluate", "export")), states  # those read the model
