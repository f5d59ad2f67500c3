"""`pretraining_dataset`: Axolotl's streamed plain-text pretraining, read by molt from a local
file (or URL) as a `completion` dataset of its `text_column`: each document trained whole with its
EOS, split into sequence_len pieces; `max_steps` is required."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from stages.config import ConfigError, load_config
from stages.store import read_table

DOCS = [{"body": "The quick brown fox jumps over the lazy dog. " * 6, "id": 1}, {"body": "A short one.", "id": 2}]


def test_pretraining_dataset_is_tokenized_as_completion_chunks(make_config, molt, workdir, cache_dir, fast_tokenizer):
    write_jsonl(workdir / "data" / "corpus.jsonl", DOCS)
    config = make_config(datasets=None, pretraining_dataset={"path": "data/corpus.jsonl", "text_column": "body"},
                         max_steps=2, sequence_len=16, val_set_size=None)
    result = molt("run", config, "--until", "tokenize")
    assert result.exit_code == 0, result
    assert "pretraining_dataset" not in result.output  # no "ignored" note: the data is used
    [tokenized] = [m.parent for m in cache_dir.glob("tokenize/*/manifest.json")]
    table = read_table(tokenized / "tokenized.arrow")
    expected = []
    for row, doc in enumerate(DOCS):
        ids = fast_tokenizer.encode(doc["body"] + "<|im_end|>", add_special_tokens=False).ids
        expected += [(piece, piece, row) for piece in (ids[c : c + 16] for c in range(0, len(ids), 16))]
    got = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), table.column("row").to_pylist()))
    assert got == expected and len(got) > 3


def write(tmp_path, **config):
    path = tmp_path / "cfg.yml"
    path.write_text(json.dumps({"base_model": "smollm2-135m-instruct", **config}))
    return path


def test_pretraining_dataset_needs_max_steps(tmp_path):
    with pytest.raises(ConfigError, match="pretraining_dataset needs max_steps"):
        load_config(write(tmp_path, pretraining_dataset=[{"path": "corpus.jsonl"}]))


def test_pretraining_dataset_and_datasets_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="pretraining_dataset and datasets are both set"):
        load_config(write(tmp_path, max_steps=5, pretraining_dataset="corpus.jsonl", datasets=[{"path": "a.jsonl", "type": "alpaca"}]))


def test_pretraining_dataset_becomes_a_completion_entry(tmp_path):
    cfg = load_config(write(tmp_path, max_steps=5, pretraining_dataset=[{"path": "corpus.jsonl", "name": "en", "split": "train"}]))
    [entry] = cfg.datasets
    assert (entry.path, entry.type, entry.field, entry.name) == ("corpus.jsonl", "completion", "text", "en")
    assert cfg.pretraining_dataset is None
    # the dump loads again to the same config (no "both set" on a round trip)
    again = load_config(write(tmp_path, **cfg.model_dump(mode="json", exclude_none=True)))
    assert again.datasets[0].model_dump() == entry.model_dump()
