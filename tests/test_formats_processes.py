"""`dataset_processes`: format and tokenize split their rows over worker processes and write the
same bytes as one process; the setting is no part of their keys."""

from __future__ import annotations

import sys

import pytest

from stages import format as format_stage
from stages import tokenize as tokenize_stage
from stages import workers
from stages.store import DataError, write_table
from test_formats import tokenizer_artifacts  # noqa: F401  (fixture)

ROWS = [
    {"messages": [{"role": "user", "content": f"Convert {n} km to m."}, {"role": "assistant", "content": f"{n} km = {n * 1000} m"}]}
    for n in range(150)
] + [{"messages": [{"role": "user", "content": "only a question"}]}] * 5 + [
    {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "word " * 200}]} for _ in range(5)
]


def stages_bytes(tokenizer_dir, root, rows, processes):
    import pyarrow as pa

    data, formatted, tokenized = (root / d for d in ("data", "format", "tokenize"))
    for d in (data, formatted, tokenized):
        d.mkdir(parents=True)
    write_table(pa.Table.from_pylist(rows), data / "data.arrow")
    spec = format_stage.Spec(type="chat_template")
    format_stage.run(format_stage.Params(dataset=spec, dataset_processes=processes), {"data": data, "tokenizer": tokenizer_dir}, formatted)
    stats = tokenize_stage.run(tokenize_stage.Params(sequence_len=128, dataset_processes=processes),
                               {"formatted": formatted, "tokenizer": tokenizer_dir}, tokenized)
    return (formatted / "formatted.arrow").read_bytes(), (tokenized / "tokenized.arrow").read_bytes(), stats


def test_two_processes_write_the_same_bytes_as_one(tokenizer_artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "MIN_ROWS_PER_PROCESS", 60)
    assert workers.processes_for(len(ROWS), 4) == 2 and workers.processes_for(len(ROWS), 1) == 1
    one = stages_bytes(tokenizer_artifacts["chatml"], tmp_path / "one", ROWS, 1)
    two = stages_bytes(tokenizer_artifacts["chatml"], tmp_path / "two", ROWS, 2)
    assert one == two
    assert one[2]["dropped"] == {"too_long": 5, "too_short": 0, "nothing_trained": 5} and one[2]["rows"] == 150


@pytest.mark.parametrize("start_seconds", [0.0, 1e9])  # workers always pay / never pay
def test_unset_dataset_processes_starts_workers_only_when_a_probe_says_they_pay(tokenizer_artifacts, tmp_path, monkeypatch, start_seconds):
    monkeypatch.setattr(workers, "MIN_ROWS_PER_PROCESS", 60)
    monkeypatch.setattr(workers, "PROBE_ROWS", 16)
    monkeypatch.setattr(workers, "WORKER_START_SECONDS", start_seconds)
    monkeypatch.setattr(workers, "FORKED_WORKER_START_SECONDS", start_seconds)
    pools = []
    real = workers.ProcessPoolExecutor
    monkeypatch.setattr(workers, "ProcessPoolExecutor", lambda *a, **k: pools.append(k["mp_context"].get_start_method()) or real(*a, **k))
    one = stages_bytes(tokenizer_artifacts["chatml"], tmp_path / "one", ROWS, 1)
    assert not pools
    probed = stages_bytes(tokenizer_artifacts["chatml"], tmp_path / "probed", ROWS, None)
    assert probed == one
    # format probes, and forks its workers (they never touch the tokenizer library); tokenize
    # stays in one process unless told
    assert pools == (["fork" if sys.platform == "linux" else "spawn"] if start_seconds == 0.0 else [])
    pools.clear()
    assert stages_bytes(tokenizer_artifacts["chatml"], tmp_path / "two", ROWS, 2) == one
    assert pools == ["fork" if sys.platform == "linux" else "spawn", "spawn"]  # tokenize's workers are spawned


def test_a_bad_row_is_named_the_same_with_workers(tokenizer_artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "MIN_ROWS_PER_PROCESS", 60)
    rows = ROWS[:150] + [{"messages": [{"role": "robot", "content": "beep"}]}] + ROWS[:10]
    with pytest.raises(DataError, match=r"^row 151: field 'messages\[0\]\.role': unknown role 'robot'"):
        stages_bytes(tokenizer_artifacts["chatml"], tmp_path, rows, 2)


def test_ranges_cover_the_rows_in_order():
    assert workers.ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert workers.ranges(2, 4) == [(0, 1), (1, 2)]
    assert workers.processes_for(100, None) == 1  # too few rows for a second process


def test_dataset_processes_is_not_in_the_key():
    assert "dataset_processes" not in tokenize_stage.Params(sequence_len=8, dataset_processes=4).model_dump()
    assert "dataset_processes" not in format_stage.Params(dataset=format_stage.Spec(), dataset_processes=4).model_dump()
