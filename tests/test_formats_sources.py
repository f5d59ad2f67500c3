"""Data sources of fetch_data: text files, shards, save_to_disk splits, fsspec URLs."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from stages import fetch_data
from stages.store import DataError, read_table

ROWS = [{"instruction": f"i{n}", "output": f"o{n}"} for n in range(10)]


def fetch(tmp_path, **source):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    out.mkdir()
    params = fetch_data.Params(dataset=fetch_data.Source(**source))
    fetch_data.run(params, {}, out)
    return read_table(out / "data.arrow").to_pylist(), [label for label, _ in fetch_data.sources(params)]


def test_text_file_is_one_row_per_line(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First line.\nSecond line.\n\nFourth.\n")
    rows, labels = fetch(tmp_path, path=str(path))
    assert rows == [{"text": "First line."}, {"text": "Second line."}, {"text": ""}, {"text": "Fourth."}]
    assert labels == ["book.txt"]
    other = tmp_path / "book.data"
    other.write_text("a\nb\n")
    assert fetch(tmp_path, path=str(other), ds_type="text")[0] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("shards, index, expected", [(3, 0, range(0, 4)), (3, 1, range(4, 7)), (3, 2, range(7, 10)), (10, 9, range(9, 10))])
def test_shards_keep_one_contiguous_shard_like_datasets(tmp_path, shards, index, expected):
    import datasets

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rows, _ = fetch(tmp_path, path=str(path), shards=shards, shards_idx=index)
    assert rows == [ROWS[i] for i in expected]
    assert rows == datasets.Dataset.from_list(ROWS).shard(num_shards=shards, index=index).to_list()


def test_shards_idx_out_of_range_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataError, match="shards_idx 3 is not below shards 3"):
        fetch(tmp_path, path=str(path), shards=3, shards_idx=3)


def test_save_to_disk_split_and_train_on_split(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]), "validation": datasets.Dataset.from_list(ROWS[5:6])}).save_to_disk(str(path))
    assert fetch(tmp_path, path=str(path))[0] == ROWS[:2]
    assert fetch(tmp_path, path=str(path), split="validation")[0] == ROWS[5:6]
    assert fetch(tmp_path, path=str(path), train_on_split="validation")[0] == ROWS[5:6]
    with pytest.raises(DataError, match=r"no split 'test' \(has train, validation\)"):
        fetch(tmp_path, path=str(path), split="test")


def test_file_url_reads_the_local_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    rows, labels = fetch(tmp_path, path=f"file://{path}")
    assert rows == ROWS[:3] and labels == ["d.jsonl"]


def test_memory_url_is_copied_and_its_bytes_are_keyed(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("MOLT_REMOTE_CACHE", str(tmp_path / "remote"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/molt-test/data/a.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())
    fs.pipe("/molt-test/data/sub/b.jsonl", (json.dumps(ROWS[2]) + "\n").encode())
    try:
        rows, labels = fetch(tmp_path, path="memory://molt-test/data")
        assert rows == ROWS[:3] and labels == ["a.jsonl", "sub/b.jsonl"]
        params = fetch_data.Params(dataset=fetch_data.Source(path="memory://molt-test/data"))
        before = {label: p.read_bytes() for label, p in fetch_data.sources(params)}
        fs.pipe("/molt-test/data/sub/b.jsonl", (json.dumps(ROWS[3]) + "\n").encode())
        after = {label: p.read_bytes() for label, p in fetch_data.sources(params)}
        assert before["a.jsonl"] == after["a.jsonl"] and before["sub/b.jsonl"] != after["sub/b.jsonl"]
        assert fetch(tmp_path, path="json", data_files="memory://molt-test/data/a.jsonl")[0] == ROWS[:2]
        with pytest.raises(DataError, match="not found"):
            fetch(tmp_path, path="memory://molt-test/nope.jsonl")
    finally:
        fs.rm("/molt-test", recursive=True)
