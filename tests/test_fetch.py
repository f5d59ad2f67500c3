"""fetch_model and fetch_data: where models and rows come from, and what their keys cover."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import fetch_data, fetch_model
from stages.store import DataError, read_table


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.startswith("."):
            (snapshot / p.name).write_bytes(p.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model_dir)
    found = fetch_model.locate(fetch_model.Params(base_model="acme/tiny-llama"))
    assert found.resolve() == snapshot.resolve()
    labels = [label for label, _ in fetch_model.sources(fetch_model.Params(base_model="acme/tiny-llama"))]
    assert "config.json" in labels and "model.safetensors" in labels

    with pytest.raises(DataError, match=r"acme/not-here.*local Hugging Face cache.*no network"):
        fetch_model.locate(fetch_model.Params(base_model="acme/not-here"))


def test_local_model_dir_is_copied_and_its_files_are_keyed(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    params = fetch_model.Params(base_model=str(tiny_model_dir))
    fetch_model.run(params, {}, out)
    assert (out / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert (out / "model.safetensors").exists() and not any(p.name.startswith(".") for p in out.iterdir())
    with pytest.raises(DataError, match="no config.json"):
        fetch_model.locate(fetch_model.Params(base_model=str(tmp_path)))


def test_a_model_path_that_is_missing_or_has_no_weights_is_named(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    for name in ("./no_such_model", "/no/such/model", "models/org/name"):
        with pytest.raises(DataError, match=rf"base_model '{name}': the directory .* does not exist") as error:
            fetch_model.locate(fetch_model.Params(base_model=name))
        assert "huggingface-cli" not in str(error.value)
    assert fetch_model.looks_like_path("a/b/c") and not fetch_model.looks_like_path("acme/tiny-llama")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(DataError, match=r"base_model 'bare': the directory bare has a config.json but no weights \(expected model.safetensors"):
        fetch_model.locate(fetch_model.Params(base_model="bare"))


def test_tokenizer_config_resolves_offline_or_says_why(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from stages import tokenizer

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"tokenizer_config 'EleutherAI/gpt-neox-20b': not a local directory and not in the local Hugging Face cache; molt makes no network calls"):
        tokenizer.sources(tokenizer.Params(tokenizer_config="EleutherAI/gpt-neox-20b"))
    with pytest.raises(DataError, match=r"tokenizer_config './nope': .* does not exist"):
        tokenizer.locate(tokenizer.Params(tokenizer_config="./nope"))
    alias = tokenizer.Params(tokenizer_config="smollm2-135m-instruct")
    assert tokenizer.locate(alias).suffix == ".gguf" and [label for label, _ in tokenizer.sources(alias)] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    (tmp_path / "alias").mkdir()
    tokenizer.run(alias, {"model": tmp_path}, tmp_path / "alias")  # the tokenizer inside the embedded GGUF
    assert json.loads((tmp_path / "alias" / tokenizer.INFO).read_text())["base_vocab_size"] == 49152
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"tokenizer_config '.*empty': the directory holds no tokenizer \(expected one of tokenizer.json"):
        tokenizer.run(tokenizer.Params(tokenizer_config=str(tmp_path / "empty")), {"model": tmp_path}, tmp_path / "out")


def test_embedded_alias_points_at_the_shipped_gguf():
    path = fetch_model.locate(fetch_model.Params(base_model="smollm2-135m-instruct"))
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


ROWS = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow", "saved"])
def test_every_local_source_kind_snapshots_to_the_same_table(tmp_path, kind):
    table = pa.Table.from_pylist(ROWS)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text("instruction,output\na,b\nc,d\n")
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(table, path)
    elif kind == "arrow":
        path = tmp_path / "d.arrow"
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(path))
    out = tmp_path / "out"
    out.mkdir()
    meta = fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(path))), {}, out)
    assert meta["rows"] == 2
    assert read_table(out / "data.arrow").select(["instruction", "output"]).to_pylist() == ROWS


def test_data_files_list_and_folder_sources(tmp_path):
    folder = tmp_path / "parts"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "part.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "b" / "part.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    params = fetch_data.Params(dataset=fetch_data.Source(path=str(folder)))
    labels = [label for label, _ in fetch_data.sources(params)]
    assert labels == ["a/part.jsonl", "b/part.jsonl"]
    out = tmp_path / "out"
    out.mkdir()
    fetch_data.run(params, {}, out)
    assert read_table(out / "data.arrow").to_pylist() == ROWS

    listed = fetch_data.Params(dataset=fetch_data.Source(path="json", data_files=[str(folder / "b" / "part.jsonl")]))
    out2 = tmp_path / "out2"
    out2.mkdir()
    fetch_data.run(listed, {}, out2)
    assert read_table(out2 / "data.arrow").to_pylist() == [ROWS[1]]


def test_a_row_that_is_not_an_object_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"d.jsonl line 2: expected a JSON object"):
        fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(path))), {}, out)


def _fetch(tmp_path: Path, name: str, data: bytes, **source) -> tuple[list[dict], list[dict]]:
    """(rows, origin entries) of a one-file dataset holding `data`."""
    path = tmp_path / name
    path.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(path), **source)), {}, out)
    return read_table(out / "data.arrow").to_pylist(), read_table(out / "origin.arrow").to_pylist()


def test_a_byte_order_mark_and_u2028_inside_strings_load_intact(tmp_path):
    rows = [dict(ROWS[0], output="one\u2028two\u2029three\x85four"), ROWS[1]]
    data = "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    got, where = _fetch(tmp_path, "d.jsonl", data.encode())
    assert [{k: r[k] for k in ROWS[0]} for r in got] == rows
    assert where == [{"file": "d.jsonl", "line": 1, "row": 1}, {"file": "d.jsonl", "line": 2, "row": 2}]


def test_origin_names_lines_past_blank_ones_and_rows_of_an_array(tmp_path):
    _, where = _fetch(tmp_path, "d.jsonl", ("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n").encode())
    assert [w["line"] for w in where] == [2, 4]
    got, where = _fetch(tmp_path, "d.json", json.dumps(ROWS, indent=2).encode())  # a pretty-printed array of rows
    assert [{k: r[k] for k in ROWS[0]} for r in got] == ROWS
    assert where == [{"file": "d.json", "line": None, "row": 1}, {"file": "d.json", "line": None, "row": 2}]


def test_a_pretty_printed_object_of_columns_is_rows_and_one_of_fields_is_refused(tmp_path):
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    got, _ = _fetch(tmp_path, "d.json", json.dumps(columns, indent=2).encode())
    assert [{k: r[k] for k in ROWS[0]} for r in got] == ROWS
    with pytest.raises(DataError, match=r"e.json line 1: one JSON object .* expected JSON Lines"):
        _fetch(tmp_path, "e.json", json.dumps(ROWS[0], indent=2).encode())


def test_invalid_utf8_and_a_misfit_type_name_their_line(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid UTF-8 \(byte 0xe9"):
        _fetch(tmp_path, "d.jsonl", json.dumps(ROWS[0]).encode() + b'\n{"instruction": "caf\xe9"}\n')
    lines = [json.dumps(ROWS[0])] * 3 + [json.dumps(dict(ROWS[0], output=5))]
    with pytest.raises(DataError, match=r"e.jsonl line 4: field 'output': int 5, where the rows before it hold another type"):
        _fetch(tmp_path, "e.jsonl", "\n".join(lines).encode())


def test_a_text_file_names_lines_as_an_editor_counts_them(tmp_path):
    got, where = _fetch(tmp_path, "d.txt", "a\nb\u2028c\n\r\nd".encode())  # rows as datasets' text loader splits them
    assert [r["text"] for r in got] == ["a", "b", "c", "", "d"]
    assert [w["line"] for w in where] == [1, 2, 2, 3, 4]


@pytest.mark.parametrize("params", ["", "tokenizer_type='PreTrainedTokenizerFast'"])  # copied, loaded with transformers
def test_the_tokenizer_artifact_does_not_depend_on_offline_mode(tmp_path, tiny_model_dir, params):
    """transformers writes how a tokenizer was loaded into tokenizer_config.json
    (`local_files_only` follows HF_HUB_OFFLINE, read once per process): the same inputs built
    with and without it must give the same files, or `molt verify` says the stage does not reproduce."""
    import os
    import subprocess
    import sys

    from stages.dag import first_difference

    script = ("import sys; from pathlib import Path; from stages import tokenizer; "
              f"tokenizer.run(tokenizer.Params({params}), {{'model': Path(sys.argv[1])}}, Path(sys.argv[2]))")
    repo = Path(__file__).resolve().parent.parent
    for name, offline in (("offline", "1"), ("online", "0")):
        env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE=offline)
        subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / name)], env=env, check=True)
    assert "local_files_only" not in json.loads((tmp_path / "offline" / "tokenizer_config.json").read_text())
    assert first_difference(tmp_path / "offline", tmp_path / "online") == "the manifest's content hash does not match its files"  # no file differs


def _tokenizer_source(tmp_path: Path, tiny_model_dir: Path, change: str) -> Path:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((src / "tokenizer_config.json").read_text())
    if change == "no pad token":
        del config["pad_token"]
    elif change == "no bos token":
        config["bos_token"] = None
    elif change == "no chat template":
        (src / "chat_template.jinja").unlink()
    elif change == "an unknown special token":
        config["pad_token"] = "<|not-in-the-vocabulary|>"
    elif change == "add_bos_token":
        config["add_bos_token"] = True
    (src / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return src


@pytest.mark.parametrize("chat_template", [None, "chatml", "llama3"])
@pytest.mark.parametrize("change", ["as saved", "no pad token", "no bos token", "no chat template"])
def test_a_tokenizer_transformers_saved_is_copied_as_transformers_saves_it(tmp_path, tiny_model_dir, change, chat_template):
    """The tokenizer stage copies a directory transformers saved instead of loading it with
    transformers (no torch import); every file and every molt_tokenizer.json field must be what
    transformers' own load and save give."""
    from stages import tokenizer

    src = _tokenizer_source(tmp_path, tiny_model_dir, change)
    params = tokenizer.Params(chat_template=chat_template)
    plain = tokenizer.plain_config(params, src)
    assert plain is not None
    (tmp_path / "copied").mkdir()
    (tmp_path / "saved").mkdir()
    copied = tokenizer._copy_plain(params, src, plain, tmp_path / "copied")
    saved = tokenizer._save_with_transformers(params, src, {"model": src}, tmp_path / "saved")
    assert copied == saved
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert sorted(p.name for p in (tmp_path / "copied").iterdir()) == names
    assert ("chat_template.jinja" in names) == (change != "no chat template" or chat_template is not None)
    for name in names:
        assert (tmp_path / "copied" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name


@pytest.mark.parametrize("change", ["an unknown special token", "add_bos_token", "special_tokens", "tokenizer_type"])
def test_a_tokenizer_with_more_to_it_is_loaded_with_transformers(tmp_path, tiny_model_dir, change):
    from stages import tokenizer

    src = _tokenizer_source(tmp_path, tiny_model_dir, change)
    params = tokenizer.Params(**{"special_tokens": {"pad_token": "<pad>"}} if change == "special_tokens" else
                              {"tokenizer_type": "PreTrainedTokenizerFast"} if change == "tokenizer_type" else {})
    assert tokenizer.plain_config(params, src) is None
    assert tokenizer.plain_config(tokenizer.Params(), _tokenizer_source(tmp_path / "plain", tiny_model_dir, "as saved")) is not None
    tokenizer.run(params, {"model": src}, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "molt_tokenizer.json").read_text())
    assert info["pad_token"] == {"an unknown special token": "<|not-in-the-vocabulary|>", "special_tokens": "<pad>"}.get(change, "<|im_end|>")
