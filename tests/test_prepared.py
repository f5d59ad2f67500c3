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
