"""`molt verify`, `molt lineage` and library versions as part of a stage's key."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from stages import dag
from stages.store import read_table, write_table
from conftest import status_rows


def _artifact(cache: Path, stage: str) -> Path:
    (manifest,) = cache.glob(f"{stage}/*/manifest.json")
    return manifest.parent


def test_verify_passes_on_an_untouched_cache(warm, molt):
    result = molt("verify", warm())
    assert result.exit_code == 0, result
    assert "every data stage reproduces" in result.output


def test_verify_names_the_stage_and_row_of_a_hand_edit(warm, molt, cache_dir):
    config = warm()
    target = sorted(cache_dir.glob("tokenize/*/manifest.json"))[0].parent / "tokenized.arrow"
    table = read_table(target)
    labels = table.column("labels").to_pylist()
    labels[3] = [-100] * len(labels[3])
    edited = table.set_column(table.schema.get_field_index("labels"), "labels", pa.array(labels, type=table.schema.field("labels").type))
    target.unlink()  # the table above still maps the old file
    write_table(edited, target)
    result = molt("verify", config)
    assert result.exit_code == 1, result
    assert "does not reproduce" in result.output and "first differing row 3" in result.output


def test_lineage_of_the_merged_model_reaches_the_raw_data(warm, molt, cache_dir):
    warm()
    merged = _artifact(cache_dir, "merge")
    result = molt("lineage", str(merged))
    assert result.exit_code == 0, result
    for stage in ("merge", "train", "pack", "mix", "tokenize", "format", "fetch_data", "tokenizer", "fetch_model"):
        assert f"{stage} " in result.output
    for data in ("alpaca.jsonl", "chat.jsonl"):
        manifest = [json.loads(m.read_text()) for m in cache_dir.glob("fetch_data/*/manifest.json")]
        digest = next(m["sources"][data] for m in manifest if data in m["sources"])
        assert f"source {data} {digest}" in result.output
    assert molt("lineage", "ffffffffffff").exit_code == 2


def test_a_library_upgrade_is_the_reason_a_stage_is_stale(warm, molt, monkeypatch):
    config = warm()
    real = dag._version
    monkeypatch.setattr(dag, "_version", lambda lib: "99.0" if lib == "tokenizers" else real(lib))
    rows = status_rows(molt, config)
    assert rows["tokenize[0]"]["state"] == "stale"
    assert any(r.startswith("tokenizers ") and r.endswith("→ 99.0") for r in rows["tokenize[0]"]["why"])
    assert rows["fetch_data[0]"]["state"] == "cached"


def test_the_model_card_names_every_stage_back_to_the_data(warm, molt):
    config = warm()
    assert molt("merge-lora", config).exit_code == 0
    card = (Path("out") / "merged" / "README.md").read_text()
    chain = json.loads((Path("out") / "merged" / "lineage.json").read_text())
    stages = [link["stage"] for link in chain]
    assert stages[0] == "merge" and {"train", "pack", "mix", "format", "fetch_data", "fetch_model"} <= set(stages)
    assert "alpaca.jsonl" in card and "chat.jsonl" in card
    assert molt("train", config).exit_code == 0
    assert "| train |" in (Path("out") / "README.md").read_text()
