"""fetch_data: one entry of `datasets:` snapshotted to a canonical Arrow table.

Reads local json / jsonl / csv / parquet / arrow / text files, folders of them, and `save_to_disk`
folders (`path`, `data_files`, `ds_type`, `split` or `train_on_split`), and the same through fsspec
URLs (`file://` is read in place; `memory://`, `s3://`, ...: remote files are copied into a local
content cache when the stage runs, `MOLT_REMOTE_CACHE` or ~/.cache/molt/remote). `shards` +
`shards_idx` keep one contiguous shard of the rows, as `datasets.Dataset.shard` does. `split` /
`train_on_split` take `datasets`' slice specs (`train[:10%]`, `train[10:20]+test[:5]`) on every kind
of source, sliced before sharding; local files are one split, named train. A folder laid
out as a Hugging Face dataset repository (README.md with `configs:`) is read by `datasets` with
`name`; a hub id (`org/name`, with `name` and `revision` = a cached commit) is read from the local
datasets cache only, never downloaded; `revision` on a local path is refused. Writes `data.arrow`
and `origin.arrow` (each row's file, line and row, so later stages' errors can name them; see
stages/origin.py). JSON is read as UTF-8 (a byte-order mark dropped), one row a line (lines end at line feeds only).
The source files' bytes are hashed into the key, so editing a data file reruns exactly what depends
on it. A remote file is keyed on the metadata its filesystem reports (`fs.info()`: size, etag /
checksum, version id, modification time), never on a download, so `molt status` makes no copy; a
filesystem that reports nothing beyond a file's size is refused with a clear error (a same-size edit
would go unseen), the fix being a local copy of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

from stages import origin
from stages.config import dataset_params, stage_params
from stages.store import DataError, list_files, write_table
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("pyarrow", "datasets")  # datasets: saved datasets, repositories, and how a split spec selects rows
PER_DATASET = True
INPUTS: dict[str, str] = {}
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


Source = dataset_params("Source", "path", "ds_type", "data_files", "split", "train_on_split", "name", "revision", "shards", "shards_idx")


def _is_url(path: str) -> bool:
    return "://" in path


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _fetch_remote(url: str) -> Path:
    """A remote file or folder copied into the local content cache (the copy's bytes are what
    the key hashes, so a changed remote file reruns what depends on it)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise DataError(f"dataset path {url!r}: not found")
    cache = Path(os.environ.get("MOLT_REMOTE_CACHE") or Path.home() / ".cache" / "molt" / "remote")
    dest = cache / hashlib.sha256(url.encode()).hexdigest()[:24]
    names = sorted(fs.find(root)) if fs.isdir(root) else [root]
    for name in names:
        rel = Path(name).relative_to(root).as_posix() if fs.isdir(root) else Path(name).name
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = fs.cat_file(name)
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(target)
    return dest if fs.isdir(root) else dest / Path(root).name


# fs.info() fields (lower case, without - and _) that change when a file's content does
IDENTITY = {"etag", "contentmd5", "md5", "md5hash", "digest", "crc", "crc32c", "checksum", "sha", "sha1", "sha256",
            "blobid", "oid", "versionid", "generation", "metageneration", "lastmodified", "mtime", "modified",
            "modify", "updated", "created", "timecreated", "creationtime"}


def _remote(url: str):
    """(filesystem, path, info) of a remote file or folder: metadata only, no byte is read."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        return fs, root, fs.info(root)
    except FileNotFoundError:
        raise DataError(f"dataset path {url!r}: not found") from None


def _listing(fs, root: str, info: dict) -> list[tuple[str, str, dict]]:
    """(path relative to root, path, info) of each file under a remote folder; ("", root, info) for a file."""
    if info.get("type") != "directory":
        return [("", root, info)]
    found = fs.find(root, detail=True)
    return sorted(((PurePosixPath(name).relative_to(root).as_posix(), name, meta) for name, meta in found.items()), key=lambda e: e[0])


def _flat_info(info: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out.update(_flat_info(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity(fs, name: str, info: dict) -> str:
    """A remote file's identity for the key, from its metadata, e.g.
    `s3://bucket/data.jsonl size=123 ETag="abc" LastModified=2024-05-01T10:00:00+00:00`."""
    url = fs.unstrip_protocol(name)
    fields = {k: v for k, v in _flat_info(info).items()
              if k.rsplit(".", 1)[-1].lower().replace("-", "").replace("_", "") in IDENTITY and v not in (None, "")}
    if not fields:
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        raise DataError(f"dataset file {url!r}: its filesystem ({protocol}) reports no etag, checksum, version id or modification "
                        f"time (only {', '.join(sorted(info)) or 'nothing'}), so molt cannot tell a changed file from the same one "
                        "without downloading it; copy the data to a local path and point the dataset at it")
    text = {k: v.isoformat() if hasattr(v, "isoformat") else str(v) for k, v in fields.items()}
    size = f" size={info['size']}" if info.get("size") is not None else ""
    return url + size + "".join(f" {k}={v}" for k, v in sorted(text.items()))


def _remote_sources(source: Source) -> list[tuple[str, Path | str]]:
    """sources() of a dataset that names fsspec URLs: each remote file's identity from its metadata
    (the files _files() would copy and read, or a superset), local files as paths."""
    _check_revision(source)
    path = _local(source.path)
    if not source.data_files:
        fs, root, info = _remote(path)
        files = _listing(fs, root, info)
        if info.get("type") == "directory":
            top = {rel for rel, _, _ in files if "/" not in rel}
            if source.name and "README.md" not in top:
                raise DataError(f"dataset {source.path!r}: name {source.name!r} needs a dataset repository folder (a README.md whose YAML header lists configs:)")
            if not top & {"state.json", "dataset_dict.json", "README.md"}:  # a saved dataset or repository reads them all
                files = [f for f in files if PurePosixPath(f[0]).suffix in SUFFIXES]
            if not files:
                raise DataError(f"dataset path {source.path!r}: folder holds no {'/'.join(SUFFIXES)} files")
        return [(rel or PurePosixPath(root).name, _identity(fs, name, meta)) for rel, name, meta in files]
    out: list[tuple[str, Path | str]] = []
    for name in _data_files(source):
        name = _local(name)
        local = Path(name)
        if _is_url(name):
            fs, p, info = _remote(name)
        elif _is_url(path) and not (local.is_absolute() or local.exists()):  # a file under the remote root
            fs, root, _ = _remote(path)
            p = f"{root.rstrip('/')}/{name}"
            try:
                info = fs.info(p)
            except FileNotFoundError:
                raise DataError(f"dataset data_files {name!r}: no such file in {source.path!r}") from None
        else:
            root = Path(path).expanduser()
            f = local if local.is_absolute() or local.exists() or not root.is_dir() else root / local
            if not f.exists():
                raise DataError(f"dataset data_files {str(f)!r}: no such file")
            label = _label(f, source, root)
            out += [(f"{label}/{q.relative_to(f).as_posix()}", q) for q in list_files(f)] if f.is_dir() else [(label, f)]
            continue
        base = PurePosixPath(p).name if _is_url(name) else name
        out += [(f"{base}/{rel}" if rel else base, _identity(fs, n, meta)) for rel, n, meta in _listing(fs, p, info)]
    return out


Params = stage_params(dataset=Source)


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _is_hub_id(source: Source) -> bool:
    """A path that names a Hugging Face dataset (`org/name`) rather than a local file: it does not
    exist here, is no URL and has no data-file suffix."""
    path = source.path
    return (not source.data_files and not _is_url(path) and HUB_ID.match(path) is not None
            and not Path(path).expanduser().exists() and Path(path).suffix not in SUFFIXES)


def _is_dataset_repo(root: Path) -> bool:
    """A folder laid out as a Hugging Face dataset repository: its README.md has a `configs:` list."""
    readme = root / "README.md"
    if not root.is_dir() or not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return False
    import yaml

    try:
        card = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as error:
        raise DataError(f"{readme}: its YAML header does not parse ({error})") from None
    return isinstance(card, dict) and "configs" in card


def _check_revision(source: Source) -> None:
    if source.revision is not None and not _is_hub_id(source):
        raise DataError(f"dataset {source.path!r}: revision {source.revision!r} only applies to hub datasets; this path is local "
                        "(its files' content is what molt keys on, so pin a version by the files themselves)")


def _cached_hub_dirs(source: Source) -> list[Path]:
    """The datasets cache folders of a hub dataset (`<cache>/<org>___<name>/<config>/<version>/<commit>`)
    for the configured `name` and `revision`, newest last."""
    import datasets.config

    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(source.path.split("/"))
    found = [d for d in root.glob(f"{source.name or '*'}/*/{source.revision or '*'}") if (d / "dataset_info.json").is_file()]
    if not found:
        cached = sorted({d.parent.parent.name + "@" + d.name for d in root.glob("*/*/*") if d.is_dir()})
        wanted = "".join(f" {k} {v!r}" for k, v in (("name", source.name), ("revision", source.revision)) if v)
        raise DataError(
            f"dataset {source.path!r}{wanted}: not a local file or folder, and not in the local Hugging Face datasets cache "
            f"({root.parent})" + (f"; cached there: {', '.join(cached)}" if cached else "")
            + "; molt makes no network calls: load it once with datasets.load_dataset, or point path at local files"
        )
    configs = {d.parent.parent.name for d in found}
    if len(configs) > 1:
        raise DataError(f"dataset {source.path!r}: the cache holds several configs ({', '.join(sorted(configs))}); choose one with name:")
    return sorted(found, key=lambda d: d.stat().st_mtime)


def _data_files(source: Source) -> list[str]:
    return [source.data_files] if isinstance(source.data_files, str) else list(source.data_files or [])


def _files(source: Source) -> list[Path]:
    _check_revision(source)
    if _is_hub_id(source):
        newest = _cached_hub_dirs(source)[-1]
        return sorted(p for p in newest.iterdir() if p.is_file())
    if source.data_files:
        names = [source.data_files] if isinstance(source.data_files, str) else source.data_files
        names = [_fetch_remote(n) if _is_url(_local(n)) else Path(_local(n)) for n in names]
        root = _root(source)
        base = root if root.is_dir() else Path(".")
        files = [p if p.is_absolute() or p.exists() else base / p for p in map(Path, names)]
    else:
        root = _root(source)
        if not root.exists():
            raise DataError(f"dataset path {source.path!r}: no such file or directory (hub datasets must be in the local cache; molt makes no network calls)")
        if root.is_file() or _is_saved_dataset(root) or _is_dataset_repo(root):
            return [root]
        if source.name:
            raise DataError(f"dataset {source.path!r}: name {source.name!r} needs a dataset repository folder (a README.md whose YAML header lists configs:)")
        files = [p for p in list_files(root) if p.suffix in SUFFIXES]
        if not files:
            raise DataError(f"dataset path {source.path!r}: folder holds no {'/'.join(SUFFIXES)} files")
    for p in files:
        if not p.exists():
            raise DataError(f"dataset data_files {str(p)!r}: no such file")
    return files


def _root(source: Source) -> Path:
    path = _local(source.path)
    return _fetch_remote(path) if _is_url(path) else Path(path).expanduser()


def _is_saved_dataset(root: Path) -> bool:
    return root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists())


def _label(f: Path, source: Source, root: Path) -> str:
    """A file's name in the key: unique within the dataset (two `part.jsonl` in different
    subfolders must not share one) and the same on every machine (no absolute paths)."""
    if root.is_dir() and f != root and f.is_relative_to(root):
        return f.relative_to(root).as_posix()
    return f.name if f.is_absolute() or f == root else f.as_posix()


def sources(params: Params) -> list[tuple[str, Path | str]]:
    """(label, Path) of each local file read, hashed by content, and (label, identity) of each remote
    one: its metadata as a string, so computing the key downloads and copies nothing (run() does)."""
    if _is_url(_local(params.dataset.path)) or any(_is_url(_local(n)) for n in _data_files(params.dataset)):
        return _remote_sources(params.dataset)
    if _is_hub_id(params.dataset):  # the cached Arrow files, under the cache's own config/version/commit names
        return [(f"{params.dataset.path}/{'/'.join(p.parts[-4:])}", p) for p in _files(params.dataset)]
    out = []
    root = _root(params.dataset)
    for f in _files(params.dataset):
        label = _label(f, params.dataset, root)
        if f.is_dir():
            out += [(f"{label}/{p.relative_to(f).as_posix()}", p) for p in list_files(f)]
        else:
            out.append((label, f))
    return out


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import pyarrow as pa

    read_from: list[Path] = []
    if _is_hub_id(params.dataset):
        read = [(params.dataset.path, _read_hub(params.dataset), None)]
    else:
        root = Path(_local(params.dataset.path)).expanduser()  # a URL's files are labelled by name
        read_from = _files(params.dataset)
        read = [(_label(f, params.dataset, root), *_read(f, params.dataset)) for f in read_from]
    tables = [t for _, t, _ in read]
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        misfit = next(label for k, (label, _, _) in enumerate(read) if not _concatenates(tables[: k + 1]))
        raise DataError(f"dataset {params.dataset.path!r}: its files have incompatible columns: {misfit} does not fit "
                        f"{read[0][0]}{' and the files before it' if misfit != read[1][0] else ''} ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"dataset {params.dataset.path!r}: no rows ({', '.join(label for label, _, _ in read)}: empty)")
    files, lines, rows = [], [], []
    for label, t, numbers in read:
        files += [label] * t.num_rows
        lines += numbers if numbers is not None else [None] * t.num_rows
        rows += range(1, t.num_rows + 1)
    where = origin.table(files, lines, rows)
    if not (_is_hub_id(params.dataset) or any(map(_holds_splits, read_from))):  # _split_of sliced those
        ranges = _ranges({"train": table.num_rows}, params.dataset, params.dataset.path, one_split=True)
        if ranges is not None:
            table, where = (_take(ranges, {"train": t}) for t in (table, where))
    where = _shard(where, params.dataset)
    table = _shard(table, params.dataset)
    write_table(table, out / "data.arrow")
    write_table(where, out / origin.FILE)
    return {"rows": table.num_rows}


def _concatenates(tables: list) -> bool:
    import pyarrow as pa

    try:
        pa.concat_tables(tables, promote_options="permissive")
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def _shard(table, source: Source):
    """Shard `shards_idx` (default 0) of `shards` contiguous shards, sized as datasets' shard()."""
    if not source.shards:
        return table
    index = source.shards_idx or 0
    if not 0 <= index < source.shards:
        raise DataError(f"dataset {source.path!r}: shards_idx {index} is not below shards {source.shards}")
    size, extra = divmod(table.num_rows, source.shards)
    start = size * index + min(index, extra)
    return table.slice(start, size + (index < extra))


def _holds_splits(path: Path) -> bool:
    """A source read as named splits (_split_of selects from them), not as one split of rows."""
    return _is_dataset_repo(path) or (path.is_dir() and (path / "dataset_dict.json").exists())


def _split_of(loaded, source: Source, where: str):
    """The rows of a DatasetDict that `split` (or `train_on_split`) selects, as an Arrow table;
    a single Dataset's rows are one split (run() slices them)."""
    from datasets import DatasetDict

    if not isinstance(loaded, DatasetDict):
        return loaded.data.table
    tables = {name: dataset.data.table for name, dataset in loaded.items()}
    return _take(_ranges({name: t.num_rows for name, t in tables.items()}, source, where), tables)


def _ranges(lengths: dict[str, int], source: Source, where: str, one_split: bool = False):
    """(split, start, stop) of each piece `split` (or `train_on_split`) selects, read as datasets reads a
    split spec (`train`, `train[:10%]`, `train[10:20]`, `train[-10:]`, `train[:50%]+test[:10]`, percent
    boundaries rounded to the closest row, or `(pct1_dropremainder)`), for splits of these lengths.
    `one_split`: the rows are one split named train (local files, as datasets loads them); a bare
    split name then keeps every row whatever it names (None), as it always has."""
    key = "train_on_split" if source.train_on_split else "split"
    spec = getattr(source, key)
    if one_split and re.fullmatch(r"[\w-]+", str(spec)):  # what datasets reads as a bare split name; no need to import it
        return None
    from datasets import ReadInstruction

    try:
        if re.search(r"\s", str(spec)):  # load_dataset takes ` train` beside a + for a split name, and refuses it
            raise ValueError("no spaces: datasets reads the split names beside a + with them")
        instruction = ReadInstruction.from_spec(spec)
    except (ValueError, TypeError) as error:
        raise DataError(f"dataset {where!r}: {key} {spec!r} is not a split spec ({error}); write a split name with optional "
                        "slices in rows or percent, joined by +, e.g. train, train[:10%], train[10:20], train[:50%]+test[:10]") from None
    subs = str(spec).split("+")
    for name in (re.match(r"[\w-]+", sub).group() for sub in subs):
        if name not in lengths:
            local = " (local data files are one split, named train)" if one_split else ""
            within = f" ({key} {spec!r})" if spec != name else ""
            raise DataError(f"dataset {where!r}: no split {name!r} (has {', '.join(lengths)}){local}{within}")
    try:
        absolute = instruction.to_absolute(lengths)
    except ValueError as error:
        raise DataError(f"dataset {where!r}: {key} {spec!r}: {error}") from None
    ranges = [(a.splitname, a.from_, max(a.from_, a.to)) for a in absolute]
    if all(start == stop for _, start, stop in ranges):
        sizes = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise DataError(f"dataset {where!r}: {key} {spec!r} selects no rows ({sizes})")
    return ranges


def _take(ranges, tables: dict):
    """The rows of `ranges` ((split, start, stop) each), from `tables` by split name, one piece after another."""
    import pyarrow as pa

    pieces = [tables[name].slice(start, stop - start) for name, start, stop in ranges]
    return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces, promote_options="permissive")


def _read_hub(source: Source):
    """A hub dataset from the local datasets cache, the exact cached copy _files() keyed."""
    from datasets.packaged_modules.cache.cache import Cache

    newest = _cached_hub_dirs(source)[-1]
    config, version, commit = newest.parts[-3:]
    builder = Cache(cache_dir=str(newest.parents[3]), repo_id=source.path, dataset_name=source.path.split("/")[-1],
                    config_name=config, version=version, hash=commit)
    return _split_of(builder.as_dataset(), source, source.path)


def _read_dataset_repo(path: Path, source: Source):
    """A local dataset repository read by `datasets` itself (its README's configs, `name`), built in
    a scratch cache that is dropped afterwards."""
    import tempfile

    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="molt-datasets-") as scratch:
        try:
            loaded = load_dataset(str(path), name=source.name, cache_dir=scratch, keep_in_memory=True)
        except ValueError as error:  # an unknown config name, named with the known ones
            raise DataError(f"dataset {str(path)!r}: {error}") from None
        return _split_of(loaded, source, str(path))


def _read(path: Path, source: Source):
    """(table, the 1-based line of each row, or None where the file is not line-based)."""
    import pyarrow as pa

    if _is_dataset_repo(path):
        return _read_dataset_repo(path, source), None

    if _is_saved_dataset(path):
        from datasets import load_from_disk

        return _split_of(load_from_disk(str(path)), source, str(path)), None
    kind = source.ds_type or SUFFIXES.get(path.suffix)
    try:
        if kind == "json":
            return _read_json(path)
        if kind == "text":  # one row per line, in a `text` column, as datasets' text loader
            pieces = _decode(path).splitlines(keepends=True)
            numbers, number = [], 1  # a row's line as an editor counts them (U+2028 and the like end a row, not a line)
            for piece in pieces:
                numbers.append(number)
                number += piece.endswith(("\n", "\r"))
            return pa.table({"text": pa.array([p.splitlines()[0] if p.splitlines() else "" for p in pieces], type=pa.string())}), numbers
        if kind == "csv":
            import pyarrow.csv

            text = _decode(path)  # pyarrow would read a column with a non-UTF-8 byte as binary, silently
            try:
                table = pyarrow.csv.read_csv(path)
            except pa.ArrowInvalid as error:
                raise DataError(f"{path}{_csv_line(text, str(error))}: cannot read as csv: {error}") from None
            one_line_each = len(text.rstrip("\r\n").split("\n")) == table.num_rows + 1  # no quoted line breaks
            return table, list(range(2, table.num_rows + 2)) if one_line_each else None
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path), None
        if kind == "arrow":
            try:
                return pa.ipc.open_file(str(path)).read_all(), None
            except pa.ArrowInvalid:
                return pa.ipc.open_stream(pa.OSFile(str(path))).read_all(), None
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: cannot read as {kind}: {error}") from None
    raise DataError(f"{path}: unknown data file type {path.suffix!r} (set ds_type to one of json, csv, parquet, arrow, text)")


def _csv_line(text: str, message: str) -> str:
    """` line N` of the row a pyarrow CSV parse error quotes (`Expected 3 columns, got 4: a,b,c,d`), if found."""
    quoted = message.partition("columns, got ")[2].partition(": ")[2]
    for number, line in enumerate(text.split("\n"), 1):
        if quoted and line.rstrip("\r") == quoted:
            return f" line {number}"
    return ""


def _decode(path: Path) -> str:
    """A file's text as UTF-8 (a byte-order mark dropped); bad bytes are named by line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte {column} of the line); "
                        "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false", type(None): "null"}


def _read_json(path: Path):
    """JSON Lines (or a JSON array of rows), parsed row by row so an error names its line (a
    row of an array: its 1-based number). Lines end at \\n only: U+2028 and the other breaks
    str.splitlines knows are valid inside a JSON string."""
    import pyarrow as pa

    text = _decode(path)
    rows: list = []
    lines: list | None = None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    else:
        lines = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == 1 and line.lstrip().startswith("{"):
                    return _read_json_object(path, text)
                raise DataError(f"{path} line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
            lines.append(number)

    def where(i: int) -> str:
        return f"{path} line {lines[i]}" if lines is not None else f"{path} row {i + 1}"

    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where(i)}: expected a JSON object, got {JSON_TYPES.get(type(row), type(row).__name__)}")
        for k in row:
            columns.setdefault(k, [])
    for k in columns:
        columns[k] = [row.get(k) for row in rows]
    arrays = {}
    for k, values in columns.items():
        try:
            arrays[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            unified = _text_as_parts(values)
            if unified is not None:
                try:
                    arrays[k] = pa.array(unified)
                    continue
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    pass
            i = _first_misfit(values)
            raise DataError(f"{where(i)}: field {k!r}: {type(values[i]).__name__} {_short(values[i])}, where the rows before it "
                            f"hold another type ({error})") from None
    return pa.table(arrays), lines


def _is_parts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and "type" in p for p in value)


def _text_as_parts(values: list) -> list | None:
    """OpenAI-style messages mix the two shapes of a content, text and a list of typed parts
    (`[{"type": "text", "text": ...}]`), at the same place of different rows or messages (datasets
    keeps such a field as JSON): one Arrow column cannot hold both, so where a place holds both,
    its texts become one text part each, which is what they mean. None: no place mixes them."""
    kinds: dict[tuple, set] = {}

    def survey(value, place):
        if isinstance(value, dict):
            for key, item in value.items():
                survey(item, (*place, key))
        elif isinstance(value, str):
            kinds.setdefault(place, set()).add("text")
        elif _is_parts(value):
            kinds.setdefault(place, set()).add("parts")
            for part in value:
                survey(part, (*place, "[]"))
        elif isinstance(value, list):
            for item in value:
                survey(item, (*place, "[]"))

    for value in values:
        survey(value, ())
    mixed = {place for place, seen in kinds.items() if seen == {"text", "parts"}}
    if not mixed:
        return None

    def convert(value, place):
        if place in mixed and isinstance(value, str):
            return [{"type": "text", "text": value}]
        if isinstance(value, dict):
            return {key: convert(item, (*place, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [convert(item, (*place, "[]")) for item in value]
        return value

    return [convert(value, ()) for value in values]


def _first_misfit(values: list) -> int:
    """The first row whose value Arrow cannot put in one column with the values before it."""
    import pyarrow as pa

    low, high = 1, len(values)  # values[:high] fails; find the shortest failing prefix
    while low < high:
        mid = (low + high) // 2
        try:
            pa.array(values[:mid])
            low = mid + 1
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            high = mid
    return high - 1


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_json_object(path: Path, text: str):
    """A .json file that is one (pretty-printed) JSON object: columns of equal length are rows (as
    datasets reads such a file); any other object is refused, saying what was expected."""
    import pyarrow as pa

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    lengths = {len(v) for v in value.values() if isinstance(v, list)}
    if value and all(isinstance(v, list) for v in value.values()) and len(lengths) == 1:
        rows = [dict(zip(value, items)) for items in zip(*value.values())]
        try:
            return pa.Table.from_pylist(rows), None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise DataError(f"{path}: its columns do not convert ({error})") from None
    keys = ", ".join(map(repr, list(value)[:5])) + (", ..." if len(value) > 5 else "")
    raise DataError(f"{path} line 1: one JSON object (keys {keys}) spanning several lines, not rows; expected JSON Lines "
                    "(one object per line) or a JSON array of row objects")
