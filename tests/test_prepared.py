"""`molt preprocess` leaves `dataset_prepared_path/<key>/`, which loads with `datasets.load_from_disk`
for every way of holding rows out: none, a fraction, a row count, test_datasets."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, CHAT_ROWS, write_jsonl

ROWS = len(ALPACA_ROWS) + len(CHAT_ROWS)
HELD_OUT = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(5)]


def prepared_dir(result) -> Path:
    (path,) = re.findall(r"prepared dataset: (\S+)", result.output)
    return Path(path)


@pytest.mark.parametrize(
    "changes, train, validation",
    [
        ({"val_set_size": 0}, ROWS, None),
        ({"val_set_size": 0.25}, ROWS - 4, 4),
        ({"val_set_size": 3}, ROWS - 3, 3),
        ({"val_set_size": None, "test_datasets": [{"path": "data/held_out.jsonl", "type": "alpaca"}]}, ROWS, len(HELD_OUT)),
    ],
    ids=["none", "fraction", "rows", "test_datasets"],
)
def test_prepared_dataset_loads_with_load_from_disk(make_config, molt, workdir, changes, train, validation):
    import datasets

    write_jsonl(workdir / "data" / "held_out.jsonl", HELD_OUT)
    result = molt("preprocess", make_config(**changes))
    assert result.exit_code == 0, result
    assert f"({train} train rows, {validation or 0} validation rows)" in result.output
    loaded = datasets.load_from_disk(str(prepared_dir(result)))
    assert isinstance(loaded, datasets.DatasetDict)
    assert {k: v.num_rows for k, v in loaded.items()} == {"train": train, **({"validation": validation} if validation else {})}
    assert {"input_ids", "labels"} <= set(loaded["train"].column_names)
    assert all(len(row["input_ids"]) == len(row["labels"]) > 0 for row in loaded["train"])


def test_a_prepared_folder_with_an_empty_validation_split_is_rewritten(make_config, molt):
    """Earlier versions saved an empty `validation` split, which today's datasets cannot load."""
    import datasets

    config = make_config(val_set_size=0)
    dest = prepared_dir(molt("preprocess", config))
    train = datasets.load_from_disk(str(dest))["train"]
    old = dest.with_name("old")
    datasets.DatasetDict({"train": train, "validation": train.select([])}).save_to_disk(str(old))
    shutil.rmtree(dest)
    old.rename(dest)
    with pytest.raises(IndexError):
        datasets.load_from_disk(str(dest))

    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert {k: v.num_rows for k, v in datasets.load_from_disk(str(dest)).items()} == {"train": ROWS}


def _table_types():
    import pyarrow as pa

    turn = pa.struct([("role", pa.string()), ("content", pa.large_string()), ("weight", pa.float32())])
    return {
        "mix": pa.table({"input_ids": pa.array([[1, 2], [3]], pa.list_(pa.int32())), "labels": pa.array([[-100, 2], [3]], pa.list_(pa.int32())),
                         "length": pa.array([2, 1], pa.int32()), "dataset": pa.array([0, 1], pa.int32())}),
        "empty": pa.table({"input_ids": pa.array([], pa.list_(pa.int32())), "length": pa.array([], pa.int32())}),
        "nested": pa.table({"messages": pa.array([[{"role": "user", "content": "hi", "weight": 1.0}], []], pa.list_(turn)),
                            "ids": pa.array([[1], [2, 3]], pa.large_list(pa.int64())), "pair": pa.array([[0.5, 1.5], [2.0, 3.0]], pa.list_(pa.float64(), 2)),
                            "flag": pa.array([True, None]), "half": pa.array([1.0, 2.0], pa.float16()), "small": pa.array([1, 2], pa.uint8()),
                            "raw": pa.array([b"a", b""]), "nothing": pa.array([None, None], pa.null())}),
        # a type the table does not cover: datasets writes it
        "timestamps": pa.table({"at": pa.array([0, 1], pa.timestamp("s")), "text": ["a", "b"]}),
    }


@pytest.mark.parametrize("kind", ["mix", "empty", "nested", "timestamps"])
def test_the_prepared_folder_is_what_datasets_save_to_disk_writes(tmp_path, kind):
    """molt writes the folder with pyarrow alone; datasets must read it as it reads its own save."""
    import json

    import datasets
    import pyarrow as pa

    from stages.cli import write_dataset_dict

    table = _table_types()[kind]
    splits = {"train": table, "validation": table.slice(0, 1)} if table.num_rows else {"train": table}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_dataset_dict(splits, ours, fingerprint="0123456789abcdef")
    shards = {k: (None if t.num_rows else 1) for k, t in splits.items()}
    datasets.DatasetDict({k: datasets.Dataset(t) for k, t in splits.items()}).save_to_disk(str(theirs), num_shards=shards)

    assert sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*")) == sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*"))
    assert json.loads((ours / "dataset_dict.json").read_text()) == json.loads((theirs / "dataset_dict.json").read_text())
    for split in splits:
        assert (ours / split / "dataset_info.json").read_text() == (theirs / split / "dataset_info.json").read_text()
        state, their_state = (json.loads((d / split / "state.json").read_text()) for d in (ours, theirs))
        if kind != "timestamps":  # datasets draws its own
            assert state["_fingerprint"] == "0123456789abcdef"
        state.pop("_fingerprint"), their_state.pop("_fingerprint")
        assert state == their_state
        read = [pa.ipc.open_stream(str(d / split / "data-00000-of-00001.arrow")).read_all() for d in (ours, theirs)]
        assert read[0].schema.equals(read[1].schema, check_metadata=True)
        assert read[0].equals(read[1])
    loaded, their_loaded = datasets.load_from_disk(str(ours)), datasets.load_from_disk(str(theirs))
    assert list(loaded) == list(their_loaded) == list(splits)
    for split in splits:
        assert loaded[split].features == their_loaded[split].features
        assert loaded[split].data.table.equals(their_loaded[split].data.table)
        assert loaded[split].to_list() == their_loaded[split].to_list() == table.slice(0, loaded[split].num_rows).to_pylist()
