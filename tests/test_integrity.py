"""A store that heals: damaged artifacts are found (on read, before a stage reads its inputs,
and by `molt verify --store`), named, quarantined and rebuilt; nothing is built from them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conftest import status_rows
from stages.store import hash_tree


def _flip(path: Path, needle: bytes | None = b"Hello!", restore_stat: bool = True) -> None:
    """Change one byte of `path` in place (at `needle`, else mid-file; same inode, same size);
    restore its mtime unless told not to."""
    st = path.stat()
    data = path.read_bytes()
    at = data.index(needle) if needle else len(data) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0x02]))  # "H" -> "J"
    if restore_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    after = path.stat()
    assert (after.st_size, after.st_ino) == (st.st_size, st.st_ino)
    assert (after.st_mtime_ns == st.st_mtime_ns) == restore_stat


def _manifest(cache: Path, stage: str, key: str) -> dict:
    return json.loads((cache / stage / key / "manifest.json").read_text())


def _every_artifact_matches(cache: Path) -> None:
    for manifest in cache.glob("*/*/manifest.json"):
        if manifest.parent.parent.name in ("quarantine", "tmp"):
            continue
        assert hash_tree(manifest.parent) == json.loads(manifest.read_text())["content"], manifest.parent


def test_a_flipped_byte_with_its_stat_restored_is_caught_before_a_stage_reads_it(warm, molt, cache_dir):
    config = warm()
    rows = status_rows(molt, config)
    fmt, tok = rows["format[0]"]["key"], rows["tokenize[0]"]["key"]
    clean = _manifest(cache_dir, "tokenize", tok)["content"]
    _flip(cache_dir / "format" / fmt / "formatted.arrow")
    assert status_rows(molt, config)["format[0]"]["state"] == "cached"  # the stat index cannot tell
    shutil.rmtree(cache_dir / "tokenize" / tok)  # so tokenize[0] reads format[0] again

    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert f"warning: format[0] (cache/format/{fmt}): its files do not match its manifest" in result.output, result
    assert {"format[0]", "tokenize[0]"} <= result.built(), result
    # tokenize[0] was built from the rebuilt format[0], not from the flipped byte
    assert _manifest(cache_dir, "tokenize", tok)["content"] == clean
    assert (cache_dir / "quarantine" / "format" / fmt / "formatted.arrow").exists()
    _every_artifact_matches(cache_dir)
    assert molt("verify", "--store").exit_code == 0
    assert all(r["state"] == "cached" for r in status_rows(molt, config).values())


def test_a_damaged_input_of_train_is_rebuilt_before_training(warm, molt, cache_dir):
    config = warm()
    rows = status_rows(molt, config)
    mix, train = rows["mix"]["key"], rows["train"]["key"]
    _flip(cache_dir / "mix" / mix / "train.arrow", needle=None)
    shutil.rmtree(cache_dir / "pack" / rows["pack"]["key"])
    result = molt("run", config, "--until", "pack")
    assert result.exit_code == 0, result
    assert "warning: mix (" in result.output and {"mix", "pack"} <= result.built(), result
    assert status_rows(molt, config)["train"]["state"] == "cached"  # pack came back with the same content
    _every_artifact_matches(cache_dir)
    assert (cache_dir / "train" / train).exists()


def test_a_changed_file_shows_as_corrupt_and_its_descendants_stay_cached(warm, molt, cache_dir):
    config = warm()
    fmt = status_rows(molt, config)["format[0]"]["key"]
    _flip(cache_dir / "format" / fmt / "formatted.arrow", restore_stat=False)
    rows = status_rows(molt, config)
    assert rows["format[0]"]["state"] == "corrupt"
    assert rows["format[0]"]["key"] == fmt
    assert any("files changed on disk" in why for why in rows["format[0]"]["why"])
    for name in ("tokenize[0]", "mix", "pack", "train", "merge", "format[1]"):
        assert rows[name]["state"] == "cached", (name, rows[name])

    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert f"warning: format[0] (cache/format/{fmt}): its files do not match its manifest (changed on disk)" in result.output, result
    assert "rebuilding" in result.output
    assert result.built() == {"format[0]"}, result
    assert (cache_dir / "quarantine" / "format" / fmt).is_dir()
    _every_artifact_matches(cache_dir)


def test_verify_store_finds_and_quarantines_a_flipped_byte(warm, molt, cache_dir):
    config = warm()
    assert molt("verify", "--store").exit_code == 0
    rows = status_rows(molt, config)
    fmt, tok = rows["format[0]"]["key"], rows["tokenize[0]"]["key"]
    _flip(cache_dir / "format" / fmt / "formatted.arrow")

    result = molt("verify", "--store")
    assert result.exit_code == 1, result
    assert f"format/{fmt}" in result.output and "1 of" in result.output, result
    assert not (cache_dir / "format" / fmt).exists()
    assert (cache_dir / "quarantine" / "format" / fmt / "manifest.json").exists()
    assert molt("verify", "--store").exit_code == 0  # what is left is whole

    rows = status_rows(molt, config)  # the quarantined manifest still gives its descendants' keys
    assert rows["format[0]"]["state"] == "missing" and "quarantined" in rows["format[0]"]["why"][0]
    assert rows["tokenize[0]"]["state"] == "cached" and rows["tokenize[0]"]["key"] == tok
    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert result.built() == {"format[0]"}, result
    _every_artifact_matches(cache_dir)

    _flip(cache_dir / "tokenize" / tok / "tokenized.arrow", needle=None)
    result = molt("verify", "--store", "--remove")
    assert result.exit_code == 1 and "removed" in result.output, result
    assert not (cache_dir / "tokenize" / tok).exists() and not (cache_dir / "quarantine" / "tokenize").exists()


def test_the_input_check_bench_runs_on_tiny_inputs(tmp_path):
    from bench import integrity

    results = integrity.main(["--rows", "40", "--rounds", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert [c["rebuilt"] for c in results["cases"]] == list(integrity.REBUILDS)
    assert all(c["check_s"] > 0 and c["no_check_s"] > 0 and c["rehash_s"] > 0 for c in results["cases"])
    assert "| on / off |" in (tmp_path / "out" / "integrity.md").read_text()


def test_what_molt_copies_out_is_re_hashed_first(warm, molt, cache_dir):
    config = warm()
    rows = status_rows(molt, config)
    _flip(cache_dir / "mix" / rows["mix"]["key"] / "train.arrow", needle=None)  # pack stays cached: nothing else reads mix
    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert f"warning: mix (cache/mix/{rows['mix']['key']}): its files do not match its manifest" in result.output, result
    assert result.built() == {"mix"}, result

    model = next((cache_dir / "train" / rows["train"]["key"]).rglob("*.safetensors"))
    _flip(model, needle=None)
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert f"warning: train (cache/train/{rows['train']['key']})" in result.output and "train" in result.built(), result
    _every_artifact_matches(cache_dir)
