"""The spine end to end through the CLI, on a tiny random Llama: what a config change reruns,
determinism of the data artifacts, refusal of bad input, and train + merge."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from conftest import ALL_NODES, CHAT_ROWS, artifact_dirs, invoke_molt, status_rows, write_jsonl

DATA_STAGES = ("fetch_model", "tokenizer", "fetch_data", "format", "tokenize", "mix", "pack")
FETCHES = {"fetch_model", "fetch_data[0]", "fetch_data[1]"}


def rerun(molt, config) -> set[str]:
    result = molt("run", config)
    assert result.exit_code == 0, result
    assert result.built() | result.cached() == ALL_NODES, result
    return result.built()


# -- invalidation ----------------------------------------------------------------------------


def test_no_change_builds_nothing(warm, molt):
    config = warm()
    result = molt("run", config)
    assert result.exit_code == 0, result
    assert result.built() == set()
    assert result.cached() == ALL_NODES
    assert {r["state"] for r in status_rows(molt, config).values()} == {"cached"}


def test_chat_template_change_reruns_from_tokenizer(warm, molt):
    config = warm(chat_template="chatml")
    rows = status_rows(molt, config)
    assert rows["tokenizer"]["state"] == "stale"
    assert any("chat_template" in why and "chatml" in why for why in rows["tokenizer"]["why"]), rows["tokenizer"]
    for name in FETCHES:
        assert rows[name]["state"] == "cached", rows[name]
    for name in ALL_NODES - FETCHES - {"tokenizer"}:
        assert rows[name]["state"] == "stale", rows[name]
        assert any(w.startswith("after ") for w in rows[name]["why"]), rows[name]

    # mix reruns only because tokenize[1] wrote other bytes: SmolLM2's own template adds a
    # system prompt that chatml does not
    assert rerun(molt, config) == ALL_NODES - FETCHES


@pytest.mark.parametrize("change", [{"learning_rate": 2e-3}, {"lora_r": 8}])
def test_training_keys_rerun_only_train_and_merge(warm, molt, change):
    config = warm(**change)
    rows = status_rows(molt, config)
    assert rows["train"]["state"] == "stale"
    key = next(iter(change))
    assert any(w.startswith(f"{key} ") for w in rows["train"]["why"]), rows["train"]
    assert rerun(molt, config) == {"train", "merge", "evaluate", "export"}


def test_sequence_len_reruns_tokenize_not_format(warm, molt, cache_dir):
    config = warm(sequence_len=256)
    built = rerun(molt, config)
    assert {"tokenize[0]", "tokenize[1]", "pack", "train", "merge"} <= built
    assert not built & ({"format[0]", "format[1]", "tokenizer"} | FETCHES)
    # every row fits both lengths, so tokenize wrote the same bytes and mix stays cached
    for manifest in cache_dir.glob("tokenize/*/manifest.json"):
        assert json.loads(manifest.read_text())["dropped"]["too_long"] == 0
    assert "mix" not in built


@pytest.fixture
def alpaca_source():
    """Edit stages/formats/alpaca.py in a test; the original bytes (and mtime) always come back."""
    import stages.formats.alpaca as module

    path = Path(module.__file__)
    original, stat = path.read_bytes(), path.stat()

    def edit(transform) -> None:
        path.write_text(transform(original.decode()))
        importlib.reload(module)

    try:
        yield edit
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        importlib.reload(module)
        from stages import fingerprint

        fingerprint.clear_caches()
    assert path.read_bytes() == original


def test_comment_and_docstring_edits_of_a_strategy_rerun_nothing(warm, molt, alpaca_source):
    config = warm()
    alpaca_source(lambda src: src.replace('"""alpaca:', '"""alpaca (reworded docstring):', 1) + "\n# a trailing comment\n")
    assert rerun(molt, config) == set()


def test_code_edit_of_a_strategy_reruns_only_its_datasets(warm, molt, alpaca_source):
    config = warm()
    # a real change that leaves the output alone: format[0] reruns, its bytes match, so it stops
    alpaca_source(lambda src: src + "\n_UNUSED = 1\n")
    rows = status_rows(molt, config)
    assert rows["format[0]"]["state"] == "stale"
    assert rows["format[0]"]["why"] == ["code of stages/formats/alpaca.py changed"]
    assert rows["format[1]"]["state"] == "cached"
    assert rerun(molt, config) == {"format[0]"}

    # a change of the prompt text: the alpaca dataset and everything after it, not the chat one
    alpaca_source(lambda src: src.replace("### Response:", "### Answer:"))
    assert rerun(molt, config) == {"format[0]", "tokenize[0]", "mix", "pack", "train", "merge", "evaluate", "export"}


def test_data_file_change_reruns_only_that_dataset(warm, molt):
    config = warm()
    write_jsonl(Path("data/chat.jsonl"), CHAT_ROWS + [CHAT_ROWS[0]])
    rows = status_rows(molt, config)
    assert rows["fetch_data[1]"]["state"] == "stale"
    assert any("source chat.jsonl changed" in w for w in rows["fetch_data[1]"]["why"]), rows["fetch_data[1]"]
    assert rows["fetch_data[0]"]["state"] == "cached"
    assert rerun(molt, config) == {"fetch_data[1]", "format[1]", "tokenize[1]", "mix", "pack", "train", "merge", "evaluate", "export"}


def test_tampered_artifact_is_rebuilt(warm, molt, cache_dir):
    config = warm()
    arrow = sorted(cache_dir.glob("tokenize/*/tokenized.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[:-8])
    built = rerun(molt, config)
    assert len(built) == 1 and next(iter(built)).startswith("tokenize["), built


# -- determinism -----------------------------------------------------------------------------


def _preprocess_in(root: Path, tiny_model_dir: Path) -> Path:
    from conftest import ALPACA_ROWS, base_config

    import yaml

    root.mkdir()
    write_jsonl(root / "data" / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(root / "data" / "chat.jsonl", CHAT_ROWS)
    (root / "config.yml").write_text(yaml.safe_dump(base_config(tiny_model_dir)))
    old = os.getcwd()
    os.chdir(root)
    try:
        result = invoke_molt("preprocess", "config.yml", cache=root / "cache")
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result
    return root / "cache"


def test_preprocess_is_deterministic(tmp_path, tiny_model_dir):
    a = _preprocess_in(tmp_path / "a", tiny_model_dir)
    b = _preprocess_in(tmp_path / "b", tiny_model_dir)
    assert artifact_dirs(a) == artifact_dirs(b)
    stages = {d.split("/")[0] for d in artifact_dirs(a)}
    assert stages == set(DATA_STAGES)
    arrows = 0
    for entry in sorted(artifact_dirs(a)):
        ma, mb = (json.loads((c / entry / "manifest.json").read_text()) for c in (a, b))
        for volatile in ("created", "seconds"):
            ma.pop(volatile), mb.pop(volatile)
        assert ma == mb, entry
        files_a = sorted(p.relative_to(a / entry) for p in (a / entry).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b / entry) for p in (b / entry).rglob("*") if p.is_file())
        assert files_a == files_b, entry
        for rel in files_a:
            if rel.name != "manifest.json":
                assert (a / entry / rel).read_bytes() == (b / entry / rel).read_bytes(), f"{entry}/{rel}"
                arrows += rel.suffix == ".arrow"
    assert arrows >= 8  # 2 fetch_data + 2 format + 2 tokenize + mix train/val + pack train/val


# -- bad input -------------------------------------------------------------------------------


def _refused(molt, config, *expected: str, new: set[str] = frozenset()):
    cache = Path("cache")
    before = artifact_dirs(cache)
    result = molt("run", config)
    assert result.exit_code == 2, result
    assert result.exception is None, result
    assert "error:" in result.output
    for text in expected:
        assert text in result.output, (text, result)
    assert "Traceback" not in result.output
    assert {d.split("/")[0] for d in artifact_dirs(cache) - before} == set(new), result
    assert not any((cache / "tmp").iterdir())
    return result


def test_unknown_dataset_type_is_refused(warm, molt):
    config = warm(datasets=[{"path": "data/alpaca.jsonl", "type": "alpaca"}, {"path": "data/chat.jsonl", "type": "chat_tempalte"}])
    _refused(molt, config, "chat_tempalte", "alpaca, chat_template")


def test_conflicting_warmup_keys_are_refused(warm, molt):
    config = warm(warmup_steps=2, warmup_ratio=0.1)
    _refused(molt, config, "warmup_steps", "warmup_ratio", "mutually exclusive")


def test_missing_data_file_is_refused(warm, molt):
    config = warm(datasets=[{"path": "data/alpaca.jsonl", "type": "alpaca"}, {"path": "data/nope.jsonl", "type": "chat_template"}])
    _refused(molt, config, "data/nope.jsonl", "no such file")


def test_malformed_jsonl_line_is_refused_with_file_and_line(warm, molt):
    config = warm()
    lines = Path("data/chat.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing braces of line 3
    Path("data/chat.jsonl").write_text("\n".join(lines) + "\n")
    _refused(molt, config, "chat.jsonl line 3", "invalid JSON")


def test_unknown_role_is_refused_with_row_and_field(warm, molt):
    config = warm()
    rows = [dict(r) for r in CHAT_ROWS]
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    write_jsonl(Path("data/chat.jsonl"), rows)
    # the rows parse, so the new snapshot is kept; format refuses and writes nothing
    _refused(molt, config, "datasets[1]", "chat.jsonl line 3", "messages[1].role", "'robot'", new={"fetch_data"})


# -- train and merge -------------------------------------------------------------------------


def test_train_and_merge_lora(warm, molt, cache_dir, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = warm()
    result = molt("train", config)
    assert result.exit_code == 0, result
    train_dir = cache_dir / "train" / status_rows(molt, config)["train"]["key"]
    assert (train_dir / "model" / "adapter_config.json").exists()
    assert (train_dir / "model" / "tokenizer.json").exists()
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["loss_history"]] == [1, 2]
    assert all(h["loss"] > 0 for h in metrics["loss_history"])
    assert metrics["eval_loss_before"] is not None and metrics["eval_loss_after"] is not None
    assert (train_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (Path("out") / "adapter_config.json").exists() and (Path("out") / "loss.png").exists()

    result = molt("merge-lora", config)
    assert result.exit_code == 0, result
    merged_dir = Path("out") / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "tokenizer.json").exists() and (merged_dir / "chat_template.jinja").exists()

    ids = torch.tensor([[1, 17, 230, 4000, 9, 12000, 77, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, train_dir / "model").eval()
        expected = adapted(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (expected - base_logits).abs().max() > 1e-5  # the adapter is not a no-op


def test_editing_one_of_two_same_named_files_in_a_dataset_folder_is_seen(workdir, make_config, molt):
    write_jsonl(Path("shards/x/part.jsonl"), CHAT_ROWS[:4])
    write_jsonl(Path("shards/y/part.jsonl"), CHAT_ROWS[4:])
    config = make_config(datasets=[{"path": "shards", "type": "chat_template"}])
    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    write_jsonl(Path("shards/x/part.jsonl"), CHAT_ROWS[:3])
    rows = status_rows(molt, config)
    assert rows["fetch_data[0]"]["state"] == "stale", rows["fetch_data[0]"]
    assert any("x/part.jsonl" in w for w in rows["fetch_data[0]"]["why"]), rows["fetch_data[0]"]


# -- packing ---------------------------------------------------------------------------------


def test_packed_rows_give_each_sample_the_logits_it_has_alone(warm, cache_dir, tiny_model_dir, molt):
    """pack puts several samples in a row with position_ids restarting at 0 and no attention
    mask; the model must then see each sample alone (block-diagonal attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.store import read_table
    from stages.training.batches import collate

    config = warm()
    rows = status_rows(molt, config)
    packed = read_table(cache_dir / "pack" / rows["pack"]["key"] / "train.arrow").to_pylist()
    mixed = read_table(cache_dir / "mix" / rows["mix"]["key"] / "train.arrow").to_pylist()
    assert len(packed) < len(mixed)  # 128-token rows hold several of these short samples
    assert sorted(t for r in packed for t in r["input_ids"]) == sorted(t for r in mixed for t in r["input_ids"])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    batch = collate(packed[:2], pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for r, row in enumerate(packed[:2]):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            assert len(starts) > 2 or r > 0
            for a, b in zip(starts, starts[1:]):
                assert row["labels"][a] == -100  # no token trained across a sample boundary
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                assert torch.allclose(logits[r, a:b], alone, atol=1e-5), (r, a, b)
