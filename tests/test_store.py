"""The content-addressed store: atomic writes, verification, locking, canonical Arrow bytes and
the code fingerprint that goes into every key."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pyarrow as pa
import pytest

from stages.store import ROWS_PER_BATCH, Store, hash_text, hash_tree, read_table, write_table

KEY = hash_text("some record")


def _commit(store: Store, files: dict[str, bytes], stage="s", key=KEY):
    with store.writing(stage, key) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        return store.commit(tmp, stage, key, {"note": "x"})


def test_commit_then_get(tmp_path):
    store = Store(tmp_path)
    made = _commit(store, {"a.bin": b"1", "sub/b.bin": b"22"})
    got = store.get("s", KEY)
    assert got is not None and got.path == tmp_path / "s" / KEY
    assert got.content == made.content == hash_tree(got.path)
    assert got.manifest["note"] == "x" and got.manifest["key"] == KEY
    assert not any((tmp_path / "tmp").iterdir())
    assert store.get("s", hash_text("another")) is None


def test_error_while_writing_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("s", KEY) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            raise RuntimeError("stage crashed")
    assert store.get("s", KEY) is None
    assert not (tmp_path / "s").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("tamper", ["edit", "truncate", "delete", "add", "manifest_key"])
def test_tampered_artifact_is_not_returned(tmp_path, tamper):
    store = Store(tmp_path)
    art = _commit(store, {"a.bin": b"hello world", "b.bin": b"other"})
    assert store.get("s", KEY) is not None  # also fills the stat index
    target = art.path / "a.bin"
    if tamper == "edit":
        target.write_bytes(b"hello World")  # same size
    elif tamper == "truncate":
        target.write_bytes(b"hello")
    elif tamper == "delete":
        target.unlink()
    elif tamper == "add":
        (art.path / "stray.bin").write_bytes(b"")
    else:
        manifest = json.loads((art.path / "manifest.json").read_text())
        manifest["key"] = hash_text("not this one")
        (art.path / "manifest.json").write_text(json.dumps(manifest))
    assert Store(tmp_path).get("s", KEY) is None
    assert store.get("s", KEY) is None


def test_damaged_artifact_is_replaced_on_commit(tmp_path):
    store = Store(tmp_path)
    art = _commit(store, {"a.bin": b"good"})
    (art.path / "a.bin").write_bytes(b"bad!")
    assert store.get("s", KEY) is None
    _commit(store, {"a.bin": b"good"})
    assert (store.get("s", KEY).path / "a.bin").read_bytes() == b"good"


# -- two processes resolving the same key ----------------------------------------------------


def _resolve_slowly(cache: str, data_path: str, log: str, barrier) -> tuple[str, str]:
    """In a fresh process: resolve fetch_data for one file with a slow, logged `run`."""
    import stages.fetch_data as fetch_data
    from stages import dag as dag_

    original = fetch_data.run

    def slow_run(params, inputs, out, ctx):
        with open(log, "a") as f:
            f.write("ran\n")
        time.sleep(1.5)
        return original(params, inputs, out, ctx)

    fetch_data.run = slow_run
    node = dag_._node("fetch_data", {"datasets": [{"path": data_path}]}, {}, 0)
    runner = dag_.Runner(Store(cache))
    barrier.wait()
    res = runner.resolve(node)
    return res.how, res.key


def test_two_processes_compute_a_key_once(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n')
    log = tmp_path / "runs.log"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            args = (str(tmp_path / "cache"), str(data), str(log), barrier)
            results = [pool.apply_async(_resolve_slowly, args) for _ in range(2)]
            outcomes = [r.get(timeout=120) for r in results]
    assert log.read_text() == "ran\n"
    assert sorted(how for how, _ in outcomes) == ["cached", "ran"]
    (key,) = {key for _, key in outcomes}
    art = Store(tmp_path / "cache").get("fetch_data", key)
    assert art is not None and read_table(art.path / "data.arrow").column("a").to_pylist() == [1, 2]


def test_lock_excludes_another_process(tmp_path):
    store = Store(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with store.lock("s", KEY):
        p = ctx.Process(target=_try_lock, args=(str(tmp_path), str(tmp_path / "got")))
        p.start()
        p.join(60)
    assert p.exitcode == 0
    assert (tmp_path / "got").read_text() == "timeout"


def _try_lock(root: str, out: str) -> None:
    from filelock import Timeout

    try:
        with Store(root).lock("s", KEY).acquire(timeout=0.5):
            Path(out).write_text("acquired")
    except Timeout:
        Path(out).write_text("timeout")


# -- canonical Arrow -------------------------------------------------------------------------


def _table(n: int):
    return pa.table({
        "input_ids": pa.array([[i, i + 1, i + 2][: 1 + i % 3] for i in range(n)], type=pa.list_(pa.int32())),
        "row": pa.array(range(n), type=pa.int64()),
    })


def test_write_table_bytes_do_not_depend_on_chunking_or_metadata(tmp_path):
    n = ROWS_PER_BATCH * 2 + 123
    one = _table(n)
    cuts = [0, 5, 777, ROWS_PER_BATCH + 1, n]
    chunked = pa.concat_tables([one.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])
    chunked = chunked.replace_schema_metadata({"made_by": "pandas, say"})
    assert one.column("row").num_chunks == 1 and chunked.column("row").num_chunks == 4
    write_table(one, tmp_path / "one.arrow")
    write_table(chunked, tmp_path / "chunked.arrow")
    assert (tmp_path / "one.arrow").read_bytes() == (tmp_path / "chunked.arrow").read_bytes()
    assert read_table(tmp_path / "one.arrow").equals(one)
    write_table(_table(n - 1), tmp_path / "other.arrow")
    assert (tmp_path / "other.arrow").read_bytes() != (tmp_path / "one.arrow").read_bytes()


# -- adopting published artifacts (after `dvc pull`) -----------------------------------------


def test_adopt_takes_in_a_published_artifact(tmp_path):
    from stages.store import publish

    art = _commit(Store(tmp_path / "a"), {"a.bin": b"hello", "d/b.bin": b"x"})
    publish(art, tmp_path / "pub" / "s")
    other = Store(tmp_path / "b")
    adopted = other.adopt(tmp_path / "pub" / "s")
    assert adopted is not None and adopted.content == art.content
    assert other.get("s", KEY) is not None


def test_adopt_refuses_a_tampered_publication(tmp_path):
    from stages.store import publish

    art = _commit(Store(tmp_path / "a"), {"a.bin": b"hello"})
    publish(art, tmp_path / "pub" / "s")
    (tmp_path / "pub" / "s" / "a.bin").unlink()
    (tmp_path / "pub" / "s" / "a.bin").write_bytes(b"HELLO")
    assert Store(tmp_path / "b").adopt(tmp_path / "pub" / "s") is None
    assert not (tmp_path / "b" / "s").exists()


def test_adopt_replaces_a_damaged_artifact(tmp_path):
    from stages.store import publish

    store = Store(tmp_path / "cache")
    art = _commit(store, {"a.bin": b"hello"})
    publish(art, tmp_path / "pub" / "s")
    (art.path / "a.bin").unlink()  # a new inode: the published hard link keeps the good bytes
    (art.path / "a.bin").write_bytes(b"HELLO")
    assert store.get("s", KEY) is None
    adopted = store.adopt(tmp_path / "pub" / "s")
    assert adopted is not None and (adopted.path / "a.bin").read_bytes() == b"hello"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
