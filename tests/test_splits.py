"""`split:` slices of local files of every kind molt reads (JSON arrays, JSON lines, CSV, Parquet,
Arrow), and of config-named datasets, select exactly the rows `datasets.load_dataset(..., split=)`
selects from the same file; the slice is in fetch_data's key."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest

from stages import fetch_data
from stages.store import DataError, read_table

N = 57  # not a round number: percent boundaries fall between rows
ROWS = [{"i": i, "t": f"row {i}"} for i in range(N)]
SPECS = ["train[:1%]", "train[10:20]", "train[:200]", "train[50%:]", "train[:10%]+train[-3:]", "train[-7%:]", "train[3:-40]"]


def _write(tmp_path, kind):
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text("i,t\n" + "".join(f"{r['i']},{r['t']}\n" for r in ROWS))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:  # datasets' own .arrow files are Arrow IPC streams
        path = tmp_path / "d.arrow"
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


LOADERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}


def _fetch(tmp_path, **source):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    out.mkdir()
    fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(**source)), {}, out)
    return read_table(out / "data.arrow").to_pylist()


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_split_slice_selects_the_rows_load_dataset_selects(tmp_path, kind):
    import tempfile

    import datasets

    path = _write(tmp_path, kind)
    for spec in SPECS:
        with tempfile.TemporaryDirectory(dir=tmp_path) as cache:
            expected = datasets.load_dataset(LOADERS[kind], data_files=str(path), split=spec, cache_dir=cache).to_list()
        got = _fetch(tmp_path, path=str(path), split=spec)
        assert got == expected, (kind, spec)
        assert len(got) < N or spec == "train[:200]"  # the slice took effect


def test_the_documented_slices_count_as_datasets_counts(tmp_path):
    path = _write(tmp_path, "jsonl")
    # 1% of 57 rows is 0.57, rounded to the closest row: 1; 50% is 28.5, rounded half to even: 28
    assert _fetch(tmp_path, path=str(path), split="train[:1%]") == ROWS[:1]
    assert _fetch(tmp_path, path=str(path), split="train[10:20]") == ROWS[10:20]
    assert _fetch(tmp_path, path=str(path), split="train[:200]") == ROWS
    assert _fetch(tmp_path, path=str(path), split="train[50%:]") == ROWS[28:]


def test_the_slice_is_in_fetch_datas_key(tmp_path):
    dumps = [fetch_data.Params(dataset=fetch_data.Source(path="d.jsonl", split=s)).model_dump(mode="json") for s in ("train[:1%]", "train[:2%]")]
    assert dumps[0] != dumps[1]


@pytest.mark.parametrize("spec", ["train[:1%", "train[10:20:2]", "[:5]", "train[x:]"])
def test_a_bad_split_names_the_dataset_and_the_key(tmp_path, spec):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(DataError, match=rf"dataset {re.escape(repr(str(path)))}: split {re.escape(repr(spec))} is not a split spec"):
        _fetch(tmp_path, path=str(path), split=spec)


def _mix(tmp_path, n: int, val_set_size: float, shuffle: bool = False):
    from stages import mix
    from stages.store import write_table

    tokenized = tmp_path / f"tok{n}"
    tokenized.mkdir(exist_ok=True)
    write_table(pa.table({"input_ids": [[i] for i in range(n)]}), tokenized / "tokenized.arrow")
    out = tmp_path / f"mix{len(list(tmp_path.glob('mix*')))}"
    out.mkdir()
    params = mix.Params(val_set_size=val_set_size, seed=7, shuffle_merged_datasets=shuffle, dataset_exact_deduplication=False)
    summary = mix.run(params, {"train.0": tokenized}, out)
    return summary, [read_table(out / f).column("input_ids").to_pylist() for f in ("train.arrow", "val.arrow")]


# fractions whose product with the row count is a float a hair above or below a whole number
# (0.07 * 100 = 7.000000000000001: datasets holds out 8), and integer counts
@pytest.mark.parametrize("n, size", [(40, 0.01), (100, 0.07), (100, 0.29), (100, 0.57), (30, 0.1), (20, 0.15), (3, 0.5), (10, 0.85),
                                     (41, 0.05), (1000, 0.001), (12, 5), (12, 11)])
def test_val_set_size_counts_as_train_test_split(tmp_path, n, size):
    from datasets import Dataset

    expected = Dataset.from_dict({"x": list(range(n))}).train_test_split(test_size=size, shuffle=False)
    summary, _ = _mix(tmp_path, n, size)
    assert (summary["rows"], summary["val_rows"]) == (expected["train"].num_rows, expected["test"].num_rows)


def test_the_split_is_deterministic(tmp_path):
    first = _mix(tmp_path, 50, 0.1, shuffle=True)[1]
    assert _mix(tmp_path, 50, 0.1, shuffle=True)[1] == first
    train, val = first
    assert len(val) == 5 and sorted(train + val) == [[i] for i in range(50)]
