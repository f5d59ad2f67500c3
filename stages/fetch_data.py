"""fetch_data: one entry of `datasets:` snapshotted to a canonical Arrow table.

Reads local json / jsonl / csv / parquet / arrow files, folders of them, and `save_to_disk`
folders (`path`, `data_files`, `ds_type`, `split`). Writes `data.arrow`. The source files'
bytes are hashed into the key, so editing a data file reruns exactly what depends on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from stages.store import DataError, list_files, write_table

SCHEMA = 1
LIBRARIES = ("pyarrow",)
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class Source(BaseModel, frozen=True):
    path: str
    ds_type: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    name: str | None = None


class Params(BaseModel, frozen=True):
    dataset: Source


def _files(source: Source) -> list[Path]:
    if source.data_files:
        names = [source.data_files] if isinstance(source.data_files, str) else source.data_files
        base = Path(source.path) if Path(source.path).is_dir() else Path(".")
        files = [p if p.is_absolute() or p.exists() else base / p for p in map(Path, names)]
    else:
        root = Path(source.path).expanduser()
        if not root.exists():
            raise DataError(f"dataset path {source.path!r}: no such file or directory (hub datasets must be in the local cache; molt makes no network calls)")
        if root.is_file() or _is_saved_dataset(root):
            return [root]
        files = [p for p in list_files(root) if p.suffix in SUFFIXES]
        if not files:
            raise DataError(f"dataset path {source.path!r}: folder holds no {'/'.join(SUFFIXES)} files")
    for p in files:
        if not p.exists():
            raise DataError(f"dataset data_files {str(p)!r}: no such file")
    return files


def _is_saved_dataset(root: Path) -> bool:
    return root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists())


def _label(f: Path, source: Source) -> str:
    """A file's name in the key: unique within the dataset (two `part.jsonl` in different
    subfolders must not share one) and the same on every machine (no absolute paths)."""
    root = Path(source.path).expanduser()
    if root.is_dir() and f != root and f.is_relative_to(root):
        return f.relative_to(root).as_posix()
    return f.name if f.is_absolute() or f == root else f.as_posix()


def sources(params: Params) -> list[tuple[str, Path]]:
    out = []
    for f in _files(params.dataset):
        label = _label(f, params.dataset)
        if f.is_dir():
            out += [(f"{label}/{p.relative_to(f).as_posix()}", p) for p in list_files(f)]
        else:
            out.append((label, f))
    return out


def run(params: Params, inputs: dict[str, Path], out: Path) -> dict:
    import pyarrow as pa

    tables = [_read(f, params.dataset) for f in _files(params.dataset)]
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as error:
        raise DataError(f"dataset {params.dataset.path!r}: its files have incompatible columns ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"dataset {params.dataset.path!r}: no rows")
    write_table(table, out / "data.arrow")
    return {"rows": table.num_rows}


def _read(path: Path, source: Source):
    import pyarrow as pa

    if _is_saved_dataset(path):
        from datasets import DatasetDict, load_from_disk

        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if source.split not in loaded:
                raise DataError(f"dataset {str(path)!r}: no split {source.split!r} (has {', '.join(loaded)})")
            loaded = loaded[source.split]
        return loaded.data.table
    kind = source.ds_type or SUFFIXES.get(path.suffix)
    try:
        if kind == "json":
            return _read_json(path)
        if kind == "csv":
            import pyarrow.csv

            return pyarrow.csv.read_csv(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "arrow":
            try:
                return pa.ipc.open_file(str(path)).read_all()
            except pa.ArrowInvalid:
                return pa.ipc.open_stream(pa.OSFile(str(path))).read_all()
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: cannot read as {kind}: {error}") from None
    raise DataError(f"{path}: unknown data file type {path.suffix!r} (set ds_type to one of json, csv, parquet, arrow)")


def _read_json(path: Path):
    """JSON Lines (or a JSON array), parsed row by row so an error names its line."""
    import pyarrow as pa

    text = path.read_text(encoding="utf-8")
    rows: list = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        lines = [None] * len(rows)
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno})") from None
            lines.append(number)
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"line {lines[i]}" if lines[i] else f"item {i}"
            raise DataError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
        for k in row:
            columns.setdefault(k, [])
    for k in columns:
        columns[k] = [row.get(k) for row in rows]
    arrays = {}
    for k, values in columns.items():
        try:
            arrays[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise DataError(f"{path}: column {k!r} mixes types across rows ({error})") from None
    return pa.table(arrays)
