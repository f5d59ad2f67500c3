"""The content-addressed artifact store.

`cache/<stage>/<key>/` holds one artifact: its files (canonical Arrow IPC or safetensors) and
`manifest.json`. An artifact is written in `cache/tmp/`, then renamed into place, under a per-key
lock, so readers see either nothing or a whole artifact. Hashes are xxh3-128 throughout.

`cache/<stage>/<key>.partial/` is a stage's work that must outlive a crash of its run: the train
stage's `checkpoints/`, from which `auto_resume_from_checkpoints` carries on after a killed run.
Every rank of a multi-process run shares it (it is keyed by the stage key, not by a temp name);
it is removed once the artifact is committed (scheduled saves are moved into the artifact).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash
from filelock import FileLock

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


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.index = StatIndex(self.root / "index" / "stat.json")
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

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """Yield an empty temp dir; on clean exit it becomes the artifact (the caller writes the
        manifest with `commit`). On error the temp dir is removed: no half-written artifact."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{stage}-{key[:8]}-", dir=tmp_root))
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
