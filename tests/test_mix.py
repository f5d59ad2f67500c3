"""mix: the validation share of `val_set_size` counts as datasets' train_test_split counts it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages import mix
from stages.store import DataError, read_table, write_table


def _mix(tmp_path, n: int, val_set_size: float):
    tokenized = tmp_path / f"tok{n}"
    tokenized.mkdir()
    write_table(pa.table({"input_ids": [[i] for i in range(n)], "row": list(range(1, n + 1))}), tokenized / "tokenized.arrow")
    out = tmp_path / f"out{n}-{val_set_size}"
    out.mkdir()
    params = mix.Params(val_set_size=val_set_size, seed=1, shuffle_merged_datasets=False, dataset_exact_deduplication=False)
    return mix.run(params, {"train.0": tokenized}, out), out


@pytest.mark.parametrize("n", [7, 30, 40, 99, 1000])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.33, 0.5])
def test_a_fractional_val_set_size_counts_rows_as_train_test_split(tmp_path, n, fraction):
    from datasets import Dataset

    try:
        expected = Dataset.from_dict({"x": list(range(n))}).train_test_split(test_size=fraction, shuffle=False)
    except ValueError:  # datasets would leave no training row
        with pytest.raises(DataError, match="val_set_size"):
            _mix(tmp_path, n, fraction)
        return
    summary, out = _mix(tmp_path, n, fraction)
    assert (summary["rows"], summary["val_rows"]) == (len(expected["train"]), len(expected["test"]))
    assert read_table(out / "val.arrow").column("input_ids").to_pylist() == [[i] for i in range(n - len(expected["test"]), n)]


def test_a_hundredth_of_forty_rows_is_one_validation_row(tmp_path):
    # int(round(0.4)) gave 0 rows, an error; datasets rounds the test share up
    summary, _ = _mix(tmp_path, 40, 0.01)
    assert (summary["rows"], summary["val_rows"]) == (39, 1)


def test_a_whole_val_set_size_is_a_row_count(tmp_path):
    summary, _ = _mix(tmp_path, 40, 3)
    assert (summary["rows"], summary["val_rows"]) == (37, 3)
