"""Data sources of fetch_data: text files, shards, save_to_disk splits, fsspec URLs."""

from __future__ import annotations

import json
import re

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


def test_memory_url_is_copied_and_its_metadata_is_keyed(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("MOLT_REMOTE_CACHE", str(tmp_path / "remote"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/molt-test/data/a.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())
    fs.pipe("/molt-test/data/sub/b.jsonl", (json.dumps(ROWS[2]) + "\n").encode())
    try:
        rows, labels = fetch(tmp_path, path="memory://molt-test/data")
        assert rows == ROWS[:3] and labels == ["a.jsonl", "sub/b.jsonl"]
        params = fetch_data.Params(dataset=fetch_data.Source(path="memory://molt-test/data"))
        before = dict(fetch_data.sources(params))  # identities from metadata, not the bytes
        assert before["a.jsonl"].startswith("memory:///molt-test/data/a.jsonl size=") and "created=" in before["a.jsonl"]
        fs.pipe("/molt-test/data/sub/b.jsonl", (json.dumps(ROWS[3]) + "\n").encode())
        after = dict(fetch_data.sources(params))
        assert before["a.jsonl"] == after["a.jsonl"] and before["sub/b.jsonl"] != after["sub/b.jsonl"]
        assert fetch(tmp_path, path="json", data_files="memory://molt-test/data/a.jsonl")[0] == ROWS[:2]
        with pytest.raises(DataError, match="not found"):
            fetch(tmp_path, path="memory://molt-test/nope.jsonl")
    finally:
        fs.rm("/molt-test", recursive=True)


# -- dataset repositories (README.md with configs:) and hub ids from the local datasets cache --

README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: test
    path: en/test.jsonl
- config_name: fr
  data_files: fr/*.jsonl
---
# toy
"""


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "toy"
    for rel, rows in {"en/train.jsonl": [{"text": "hello"}, {"text": "hi"}], "en/test.jsonl": [{"text": "bye"}],
                      "fr/a.jsonl": [{"text": "bonjour"}]}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text(README)
    return root


def test_dataset_repo_folder_reads_the_named_config_and_split(tmp_path, repo):
    rows, labels = fetch(tmp_path, path=str(repo), name="en")
    assert rows == [{"text": "hello"}, {"text": "hi"}]
    assert labels == ["toy/README.md", "toy/en/test.jsonl", "toy/en/train.jsonl", "toy/fr/a.jsonl"]
    assert fetch(tmp_path, path=str(repo), name="en", split="test")[0] == [{"text": "bye"}]
    assert fetch(tmp_path, path=str(repo), name="fr")[0] == [{"text": "bonjour"}]
    assert fetch(tmp_path, path=str(repo), name="en", split="train[-1:]+test")[0] == [{"text": "hi"}, {"text": "bye"}]


@pytest.mark.parametrize("source, message", [
    ({"name": "de"}, r"dataset '.*toy'.*\bde\b.*(en|fr)"),
    ({"name": "en", "split": "validation"}, r"no split 'validation' \(has train, test\)"),
    ({"name": "en", "revision": "main"}, r"revision 'main' only applies to hub datasets; this path is local"),
])
def test_dataset_repo_folder_errors(tmp_path, repo, source, message):
    with pytest.raises(DataError, match=message):
        fetch(tmp_path, path=str(repo), **source)


def test_name_on_a_plain_folder_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"name 'en' needs a dataset repository folder"):
        fetch(tmp_path, path=str(tmp_path / "plain"), name="en")


def test_revision_on_a_local_file_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"revision 'v1' only applies to hub datasets"):
        fetch_data.sources(fetch_data.Params(dataset=fetch_data.Source(path=str(tmp_path / "a.jsonl"), revision="v1")))


@pytest.fixture
def hub_cache(tmp_path, repo, monkeypatch):
    """The datasets cache holding `testorg/toy` (config en) as load_dataset leaves it after a download."""
    import datasets.config
    from datasets import load_dataset

    cache = tmp_path / "hf-cache"
    load_dataset(str(repo), name="en", cache_dir=str(cache))
    (cache / "toy").rename(cache / "testorg___toy")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    [commit] = [d.name for d in (cache / "testorg___toy" / "en").glob("*/*") if d.is_dir()]
    return commit


def test_hub_id_is_read_from_the_local_cache_only(tmp_path, hub_cache):
    rows, labels = fetch(tmp_path, path="testorg/toy", name="en", split="test")
    assert rows == [{"text": "bye"}]
    assert labels == [f"testorg/toy/en/0.0.0/{hub_cache}/{f}" for f in ("dataset_info.json", "toy-test.arrow", "toy-train.arrow")]
    assert fetch(tmp_path, path="testorg/toy", revision=hub_cache)[0] == [{"text": "hello"}, {"text": "hi"}]
    assert fetch(tmp_path, path="testorg/toy", name="en", split="train[50%:]")[0] == [{"text": "hi"}]


@pytest.mark.parametrize("source, message", [
    ({"path": "testorg/toy", "name": "fr"}, r"'testorg/toy' name 'fr': not a local file or folder, and not in the local Hugging Face "
                                            r"datasets cache .*; cached there: en@\w+; molt makes no network calls"),
    ({"path": "testorg/toy", "revision": "0123abc"}, r"revision '0123abc': not a local file .* cached there: en@"),
    ({"path": "otherorg/nothing"}, r"'otherorg/nothing': not a local file or folder, and not in the local Hugging Face datasets cache"),
])
def test_hub_id_not_in_the_cache_is_a_clear_offline_error(tmp_path, hub_cache, source, message):
    with pytest.raises(DataError, match=message):
        fetch(tmp_path, **source)


SLICES = ["train", "train[:1%]", "train[:3%]", "train[10:20]", "train[:200]", "train[-10:]", "train[10%:20%]", "train[:50%]",
          "train[33%:]", "train[-25%:-5%]", "train[:-3]", "train[5:]+train[:2]", "train[:12%]+train[-1:]"]


def _datasets_split(tmp_path, spec, loader="json", **files):
    """Rows datasets' own loader gives for `spec` (or its error), from a fresh scratch cache."""
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory(dir=tmp_path) as cache:
        try:
            return datasets.load_dataset(loader, split=spec, cache_dir=cache, **files).to_list()
        except ValueError:  # "corresponds to no data"
            return None


@pytest.mark.parametrize("n", [7, 40, 150])
def test_a_split_slice_of_local_files_selects_the_rows_datasets_selects(tmp_path, n):
    rows = [{"i": i} for i in range(n)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for spec in SLICES + ["train[:20%](pct1_dropremainder)"]:
        expected = _datasets_split(tmp_path, spec, data_files=str(path))
        if not expected:  # datasets: an error, or no rows where the slice ends before it starts; molt refuses both
            with pytest.raises(DataError, match=rf"split {re.escape(repr(spec))}"):
                fetch(tmp_path, path=str(path), split=spec)
            continue
        assert fetch(tmp_path, path=str(path), split=spec)[0] == expected, spec


@pytest.mark.parametrize("loader, suffix, text", [("csv", ".csv", "i,j\n" + "".join(f"{i},x{i}\n" for i in range(30))),
                                                  ("text", ".txt", "".join(f"line {i}\n" for i in range(30)))])
def test_a_split_slice_of_a_csv_or_text_file_selects_the_rows_datasets_selects(tmp_path, loader, suffix, text):
    path = tmp_path / f"d{suffix}"
    path.write_text(text)
    for spec in ("train[:10%]", "train[7:9]", "train[-15%:]", "train[:2]+train[-2:]"):
        assert fetch(tmp_path, path=str(path), split=spec)[0] == _datasets_split(tmp_path, spec, loader, data_files=str(path)), spec


def test_a_split_slice_of_a_folder_spans_its_files_and_keeps_each_rows_origin(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for k in range(3):
        (folder / f"p{k}.jsonl").write_text("".join(json.dumps({"i": 10 * k + j}) + "\n" for j in range(5)))
    files = sorted(str(p) for p in folder.iterdir())
    for spec in ("train[4:11]", "train[-40%:]", "train[:2]+train[-2:]"):
        assert fetch(tmp_path, path=str(folder), split=spec)[0] == _datasets_split(tmp_path, spec, data_files=files), spec
    out = sorted(tmp_path.glob("out*"))[-1]
    where = read_table(out / "origin.arrow").to_pylist()
    assert [(w["file"], w["line"]) for w in where] == [("p0.jsonl", 1), ("p0.jsonl", 2), ("p2.jsonl", 4), ("p2.jsonl", 5)]


def test_a_split_slice_of_a_saved_dataset_dict_and_train_on_split(tmp_path):
    import datasets

    train, test = [{"i": i} for i in range(40)], [{"i": 100 + i} for i in range(25)]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}).save_to_disk(str(saved))
    for spec in ("train[:3%]", "train[10:20]", "test[-10:]", "train[:50%]+test[:10]", "test[10%:20%]+train[-3:]"):
        expected = _datasets_split(tmp_path, spec, data_files=files)
        assert fetch(tmp_path, path=str(saved), split=spec)[0] == expected, spec
        assert fetch(tmp_path, path=str(saved), train_on_split=spec)[0] == expected, spec
    with pytest.raises(DataError, match=r"no split 'validation' \(has train, test\) \(split 'train\[:5\]\+validation\[:5\]'\)"):
        fetch(tmp_path, path=str(saved), split="train[:5]+validation[:5]")


def test_a_saved_single_dataset_is_one_split_named_train(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert fetch(tmp_path, path=str(saved), split="train[20%:50%]")[0] == ROWS[2:5]


@pytest.mark.parametrize("key", ["split", "train_on_split"])
@pytest.mark.parametrize("spec", ["train[:1%", "train[abc]", "train[::2]", "train[1.5:]", "train[:110%]", "train[:5%](closest", "train[:12%] + train[-1:]"])
def test_a_malformed_split_spec_is_refused_naming_the_key_and_the_spec(tmp_path, key, spec):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataError, match=rf"{key} {re.escape(repr(spec))} is not a split spec") as error:
        fetch(tmp_path, path=str(path), **{key: spec})
    assert "train[:10%]" in str(error.value)


def test_local_files_are_one_split_named_train(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert fetch(tmp_path, path=str(path), split="test")[0] == ROWS  # a bare name keeps every row, as before
    with pytest.raises(DataError, match=r"no split 'test' \(has train\) \(local data files are one split, named train\)"):
        fetch(tmp_path, path=str(path), split="test[:10]")
    with pytest.raises(DataError, match=r"split 'train\[5:5\]' selects no rows \(train has 10\)"):
        fetch(tmp_path, path=str(path), split="train[5:5]")


def test_the_split_spec_is_in_fetch_datas_params_so_in_its_key(tmp_path):
    path = str(tmp_path / "d.jsonl")
    dumps = [fetch_data.Params(dataset=fetch_data.Source(path=path, **s)).model_dump(mode="json")["dataset"]
             for s in ({}, {"split": "train[:10%]"}, {"train_on_split": "train[10:20]"})]
    assert (dumps[1]["split"], dumps[2]["train_on_split"]) == ("train[:10%]", "train[10:20]") and dumps[0] != dumps[1]
