"""The content-addressed artifact store.

`cache/<stage>/<key>/` holds one artifact: its files (canonical Arrow IPC or safetensors) and
`manifest.json`. An artifact is written in `cache/tmp/`, then renamed into place, under a per-key
lock, so readers see either nothing or a whole artifact. Hashes are xxh3-128 throughout.

`cache/<stage>/<key>.partial/` is a stage's work that must outlive a crash of its run: the train
stage's `checkpoints/`, from which `auto_resume_from_checkpoints` carries on after a killed run.
Every rank of a multi-process run shares it (it is keyed by the stage key, not by a temp name);
it is removed once the artifact is committed (scheduled saves are moved into the artifact).

Concurrent processes share a store. A stage is built under its key's lock (`locks/`), whose
holder's pid is written beside it (`<lock>.holder`) so that a waiter can say whom it waits for.
Temp dirs are named `<stage>-<key8>-<pid>@<host>-…`: one whose process is dead is a leftover of a
killed run and the next run (or `molt gc`) removes it. A running process leases what it resolves
(`leases/lease-<pid>@<host>-….json`: its pid, start time and the keys it resolved); `molt gc` keeps the
artifacts a live process leases and those younger than the oldest run in flight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash
from filelock import FileLock, Timeout

MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad user data or a missing source: the message names the file, row or key at fault."""
_CHUNK = 1 << 22


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_text(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode())


def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class StatIndex:
    """Remembers (path, size, mtime_ns, inode) -> content hash, as DVC does, so big unchanged
    files (model weights, raw data) are hashed once rather than on every run."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def hash(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entries = self._load()
        hit = entries.get(str(path))
        if hit and hit[:3] == stamp:
            return hit[3]
        digest = hash_file(path)
        entries[str(path)] = stamp + [digest]
        self._dirty = True
        return digest

    def correct(self, path: Path, stamp: list, digest: str) -> None:
        """A digest just computed from the bytes replaces a remembered one for the same stamp
        (a byte changed with size, mtime and inode restored); other entries are left alone."""
        entries, key = self._load(), str(Path(path).resolve())
        hit = entries.get(key)
        if hit and hit[:3] == stamp and hit[3] != digest:
            entries[key] = stamp + [digest]
            self._dirty = True

    def forget(self, path: Path) -> None:
        if self._load().pop(str(Path(path).resolve()), None) is not None:
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.path)
        self._dirty = False


def list_files(root: Path) -> list[Path]:
    """Files under root in a stable order (relative POSIX paths sort the same on every machine)."""
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def hash_tree(root: Path, index: StatIndex | None = None, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Hash of a file or a directory: relative paths and file hashes, nothing else (no mtimes)."""
    root = Path(root)
    entries = []
    for p in list_files(root):
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        entries.append([rel, index.hash(p) if index else hash_file(p)])
    return hash_text(canonical_json(entries))


class FreshHashes:
    """Content hashes read from the bytes, remembered for this process only: a file is re-hashed
    once per process (per device, inode, size and mtime_ns), so nothing a restored size and
    mtime could fake carries over from an earlier run. Files this process wrote and hashed count."""

    def __init__(self, index: StatIndex | None = None):
        self.index = index  # corrected where its remembered hash turns out wrong
        self._seen: dict[tuple, str] = {}

    def hash(self, path: Path) -> str:
        st = Path(path).stat()
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if (digest := self._seen.get(ident)) is None:
            digest = self._seen[ident] = hash_file(path)
            if self.index is not None:
                self.index.correct(path, [st.st_size, st.st_mtime_ns, st.st_ino], digest)
        return digest


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict

    @property
    def content(self) -> str:
        return self.manifest["content"]


def _host() -> str:
    """This machine's name plus its pid namespace: containers that share a host name (and the
    store) number their processes apart, so a pid only means something within one namespace."""
    name = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"
    try:
        return f"{name}.{re.sub(r'[^0-9]', '', os.readlink('/proc/self/ns/pid'))}"
    except OSError:
        return name


HOST = _host()
_OWNED = re.compile(r"-(\d+)@([A-Za-z0-9._]+)-[^-]*$")  # `…-<pid>@<host>-<random>` (mkdtemp's part has no "-")


def _process_start(pid: int) -> str:
    """The process's start time (clock ticks since boot) where /proc tells it: a pid reused by a
    later process then does not pass for the one that recorded it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, host: str = HOST, start: str = "") -> bool:
    """Whether the process that recorded (pid, host, start) still runs. A process of another
    host cannot be checked from here, so it counts as alive; a zombie counts as dead."""
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z" and not (start and fields[19] != start)


def owner_of(name: str) -> tuple[int, str] | None:
    """(pid, host) recorded in a temp dir's name, None for a name without one."""
    found = _OWNED.search(name)
    return (int(found.group(1)), found.group(2)) if found else None


def owned_name(prefix: str) -> str:
    """A mkdtemp prefix naming this process as the owner."""
    return f"{prefix}-{os.getpid()}@{HOST}-"


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.index = StatIndex(self.root / "index" / "stat.json")
        self.code_memo = self.root / "index" / "code.json"  # fingerprint.remembered
        self._lease: dict | None = None  # this process's lease, once it resolves something
        self._lease_path: Path | None = None
        self.fresh = FreshHashes(self.index)

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The artifact, or None when it is absent or its files no longer match its manifest."""
        return self.inspect(stage, key)[0]

    def inspect(self, stage: str, key: str) -> tuple[Artifact | None, Artifact | None]:
        """(artifact, None) when whole; (None, damaged) when its manifest is there but its files
        no longer match it (hashed through the stat index: a file whose size, mtime or inode
        changed is re-hashed); (None, None) when absent. An absent artifact that was quarantined
        comes back as damaged, its path in the quarantine (its manifest still says what it held)."""
        path = self.artifact_dir(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            quarantined = self.root / "quarantine" / stage / key
            try:
                manifest = json.loads((quarantined / MANIFEST).read_text())
            except (OSError, ValueError):
                return None, None
            return None, (Artifact(stage, key, quarantined, manifest) if manifest.get("key") == key else None)
        if manifest.get("key") != key:
            return None, None
        artifact = Artifact(stage, key, path, manifest)
        if hash_tree(path, self.index) != manifest.get("content"):
            return None, artifact
        return artifact, None

    def intact(self, artifact: Artifact) -> bool:
        """Whether the artifact's files match its manifest, every file re-hashed from its bytes
        (once per process; the stat index is not trusted). The check before a stage reads it."""
        try:
            return hash_tree(artifact.path, self.fresh) == artifact.content
        except OSError:  # a file went missing under us
            return False

    def quarantine(self, stage: str, key: str, remove: bool = False) -> Path | None:
        """Move a damaged artifact out of the store to `quarantine/<stage>/<key>` (replacing an
        older copy there), or delete it with `remove`; its stat index entries are dropped."""
        path = self.artifact_dir(stage, key)
        if not path.exists():
            return None
        for p in list_files(path):
            self.index.forget(p)
        if remove:
            shutil.rmtree(path)
            return None
        dest = self.root / "quarantine" / stage / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(path, dest)
        return dest

    def partial_dir(self, stage: str, key: str) -> Path:
        """Where a run of (stage, key) keeps what survives its crash; see the module docstring."""
        return self.root / stage / f"{key}.partial"

    def lock(self, stage: str, key: str) -> FileLock:
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_dir / f"{stage}-{key}.lock"))

    def _holder_path(self, stage: str, key: str) -> Path:
        return self.root / "locks" / f"{stage}-{key}.holder"

    def holder(self, stage: str, key: str) -> dict | None:
        """Who holds (stage, key)'s lock: {"pid", "host"}, None when nobody says so (yet)."""
        try:
            return json.loads(self._holder_path(stage, key).read_text())
        except (OSError, ValueError):
            return None

    @contextmanager
    def locked(self, stage: str, key: str, on_wait=None) -> Iterator[None]:
        """Hold (stage, key)'s lock; when another process holds it, call `on_wait(holder)` (see
        `holder`) once, then wait for it. The holder's pid is written beside the lock file."""
        lock = self.lock(stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(self.holder(stage, key))
            lock.acquire()
        holder = self._holder_path(stage, key)
        try:
            write_atomic(holder, json.dumps({"pid": os.getpid(), "host": HOST}))
            yield
        finally:
            holder.unlink(missing_ok=True)  # before the release: the next holder writes its own
            lock.release()

    # -- leases: what running processes use, which `molt gc` keeps ---------------------------

    def gc_lock(self) -> FileLock:
        """Held by `molt gc` while it decides and deletes, and briefly by a run adding a key to
        its lease before it looks the key up: gc never deletes what a run just found."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_dir / "gc.lock"))

    def hold(self, stage: str, key: str) -> None:
        """Lease (stage, key) to this process until `release` (or its death). The first call
        also clears what dead processes left: their temp dirs and leases."""
        if self._lease_path is False:  # a store this process cannot write to: nothing to protect
            return
        try:
            with self.gc_lock():
                if self._lease is None:
                    self.sweep()
                    leases = self.root / "leases"
                    leases.mkdir(parents=True, exist_ok=True)
                    self._lease_path = Path(tempfile.mkstemp(prefix=owned_name("lease"), suffix=".json", dir=leases)[1])
                    self._lease = {"pid": os.getpid(), "host": HOST, "start": _process_start(os.getpid()), "since": time.time(), "keys": []}
                entry = f"{stage}/{key}"
                if entry not in self._lease["keys"]:
                    self._lease["keys"].append(entry)
                    write_atomic(self._lease_path, json.dumps(self._lease))
        except OSError:  # a read-only store: it is read, never built into, so no gc races this run
            self._lease, self._lease_path = None, False

    def release(self) -> None:
        """End this process's lease (its run is over)."""
        if self._lease_path:
            self._lease_path.unlink(missing_ok=True)
        self._lease, self._lease_path = None, None

    def live_leases(self, prune: bool = True) -> list[dict]:
        """The leases of processes that still run (`prune`: a dead one's lease file is removed)."""
        found = []
        for path in sorted((self.root / "leases").glob("*.json")):
            try:
                lease = json.loads(path.read_text())
                alive = process_alive(int(lease["pid"]), lease.get("host", HOST), lease.get("start", ""))
            except (OSError, ValueError, KeyError, TypeError):
                # being written (mkstemp, then the first write) or unreadable: a lease in the
                # making, unless its owner, named in the file name, is dead
                owner = owner_of(path.name.removesuffix(".json"))
                if owner is None:  # not a lease molt wrote
                    continue
                if process_alive(*owner):
                    found.append({"pid": owner[0], "since": 0.0, "keys": []})
                elif prune:
                    path.unlink(missing_ok=True)
                continue
            if alive:
                found.append(lease)
            elif prune:
                path.unlink(missing_ok=True)
        return found

    def sweep(self, dry_run: bool = False) -> list[Path]:
        """Temp dirs (and leases) of processes that are dead: a killed run's leftovers."""
        dead = []
        for path in sorted((self.root / "tmp").glob("*")):
            owner = owner_of(path.name)
            if owner is not None and not process_alive(*owner):
                dead.append(path)
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not dry_run:
            self.live_leases()
        return dead

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """Yield an empty temp dir; on clean exit it becomes the artifact (the caller writes the
        manifest with `commit`). On error the temp dir is removed: no half-written artifact."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=owned_name(f"{stage}-{key[:8]}"), dir=tmp_root))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path, stage: str, key: str, manifest: dict) -> Artifact:
        manifest = dict(manifest, stage=stage, key=key, content=hash_tree(tmp, self.fresh))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for p in list_files(tmp):
            _fsync(p)
        return Artifact(stage, key, self._place(tmp, stage, key), manifest)

    def _place(self, tmp: Path, stage: str, key: str) -> Path:
        final = self.artifact_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # only a damaged artifact is ever replaced: a whole one is a hit
            shutil.rmtree(final)
        os.rename(tmp, final)
        tmp.mkdir()  # `writing` removes it again; keeps its cleanup unconditional
        return final

    def adopt(self, source: Path) -> Artifact | None:
        """Take in a published artifact (e.g. after `dvc pull`) whose files match its manifest."""
        try:
            manifest = json.loads((source / MANIFEST).read_text())
            stage, key = manifest["stage"], manifest["key"]
        except (OSError, ValueError, KeyError):
            return None
        if hash_tree(source, self.index) != manifest.get("content"):
            return None
        with self.lock(stage, key):
            if (hit := self.get(stage, key)) is not None:
                return hit
            with self.writing(stage, key) as tmp:
                copy_tree(source, tmp, link=True)
                self._place(tmp, stage, key)
        return self.get(stage, key)

    def artifacts(self) -> Iterator[Artifact]:
        for manifest_path in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            try:
                manifest = json.loads(manifest_path.read_text())
            except ValueError:
                continue
            yield Artifact(manifest_path.parent.parent.name, manifest_path.parent.name, manifest_path.parent, manifest)


def copy_tree(src: Path, dest: Path, link: bool, skip: tuple[str, ...] = ()) -> None:
    """Copy src's files into dest; `link` hardlinks them (read-only uses only)."""
    for p in list_files(src):
        if p.name in skip:
            continue
        target = dest / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(p, target) if link else shutil.copy2(p, target)


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def publish(artifact: Artifact, dest: Path) -> None:
    """Mirror an artifact at a stable path (a DVC `out`), replacing what was there atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    copy_tree(artifact.path, tmp, link=True)  # DVC unlinks outs before rewriting them: the store is safe
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file whole: readers see the old text or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- canonical Arrow -------------------------------------------------------------------------

ROWS_PER_BATCH = 8192


def write_table(table, path: Path) -> None:
    """Arrow IPC bytes depend on record-batch boundaries and schema metadata, so fix both."""
    import pyarrow as pa

    table = table.replace_schema_metadata(None).combine_chunks()
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
                writer.write_batch(batch)


def read_table(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()
