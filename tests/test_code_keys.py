"""What a code edit rebuilds, through the CLI, with real edits in a scratch copy of the package.

A stage's key covers the code its `run` reaches (stages/fingerprint.py), so editing display,
bookkeeping or the CLI rebuilds nothing; editing the Arrow writer rebuilds every stage that
writes Arrow; a helper only tokenize calls, tokenize; one built-in chat template, only the
datasets rendered with it. Each edit is made in a copy of stages/ that a fresh `python -m
stages.cli` process imports, as a user editing molt's code would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ALPACA_ROWS, CHAT_ROWS, MoltResult, base_config, write_jsonl

REPO = Path(__file__).resolve().parent.parent
ARROW_STAGES = {"fetch_data[0]", "fetch_data[1]", "fetch_data[2]", "format[0]", "format[1]", "format[2]",
                "tokenize[0]", "tokenize[1]", "tokenize[2]", "mix", "pack"}
EVERYTHING = ARROW_STAGES | {"fetch_model", "tokenizer", "train", "merge", "evaluate", "export"}


def molt(root: Path, *args: str) -> MoltResult:
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="240", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "stages.cli", *args, "--cache-dir", "cache"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return MoltResult(done.returncode, done.stdout + done.stderr, None)


def status(root: Path) -> dict[str, dict]:
    result = molt(root, "status", "config.yml", "--json")
    assert result.exit_code == 0, result
    rows, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("["):])
    return {r["stage"]: r for r in rows}


def stale(root: Path) -> dict[str, list[str]]:
    return {name: row["why"] for name, row in status(root).items() if row["state"] != "cached"}


def stale_for_themselves(rows: dict[str, list[str]]) -> dict[str, list[str]]:
    """The stale stages whose own key changed (the others wait on an input: `after format[2]`)."""
    return {n: why for n, why in rows.items() if not (len(why) == 1 and why[0].startswith("after "))}


def built(root: Path) -> set[str]:
    result = molt(root, "run", "config.yml")
    assert result.exit_code == 0, result
    assert result.built() | result.cached() == EVERYTHING, result
    return result.built()


@pytest.fixture(scope="module")
def warm_copy(tmp_path_factory, tiny_model_dir) -> Path:
    """stages/, data and a config (alpaca, a chatml chat and a llama3 chat dataset) built once."""
    root = tmp_path_factory.mktemp("code-keys")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    write_jsonl(root / "data" / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(root / "data" / "chat.jsonl", CHAT_ROWS)
    write_jsonl(root / "data" / "chat2.jsonl", CHAT_ROWS[::-1])  # its own file: a fetch_data of its own
    config = base_config(tiny_model_dir)
    config["datasets"] = [
        {"path": "data/alpaca.jsonl", "type": "alpaca"},
        {"path": "data/chat.jsonl", "type": "chat_template", "chat_template": "chatml"},
        {"path": "data/chat2.jsonl", "type": "chat_template", "chat_template": "llama3"},
    ]
    (root / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert built(root) == EVERYTHING
    return root


@pytest.fixture
def scratch(warm_copy):
    """`edit(relative path, old, new)` edits the copy; every edit is undone after the test."""
    originals: dict[Path, bytes] = {}

    def edit(relative: str, old: str, new: str) -> None:
        path = warm_copy / relative
        originals.setdefault(path, path.read_bytes())
        text = path.read_text()
        assert text.count(old) == 1, f"{relative}: {old!r} found {text.count(old)} times"
        path.write_text(text.replace(old, new))

    yield edit
    for path, data in originals.items():
        path.write_bytes(data)
    built(warm_copy)  # back to the warm state for the next test


def test_display_bookkeeping_and_cli_edits_rebuild_nothing(warm_copy, scratch):
    scratch("stages/ui.py", "transient=True", "transient=False")  # the progress display
    scratch("stages/cli.py", "{'would remove' if dry_run else 'removed'}", "{'would delete' if dry_run else 'deleted'}")  # molt gc
    scratch("stages/cli.py", 'Table("stage", "state", "key", "why")', 'Table("stage", "state", "key", "why", show_lines=True)')  # status printing
    scratch("stages/cli.py", '@click.option("--dry-run", is_flag=True)', '@click.option("--dry-run", "-n", is_flag=True)')  # argument parsing (molt gc)
    scratch("stages/store.py", 'FileLock(str(lock_dir / f"{stage}-{key}.lock"))', 'FileLock(str(lock_dir / f"{stage}.{key}.lock"))')  # locks
    scratch("stages/store.py", "tmp.write_text(json.dumps(self._entries))", "tmp.write_text(json.dumps(self._entries, indent=0))")  # the stat index
    assert stale(warm_copy) == {}
    assert built(warm_copy) == set()


def test_the_arrow_writer_rebuilds_every_stage_that_writes_arrow(warm_copy, scratch):
    scratch("stages/store.py", "def write_table(table, path: Path) -> None:\n", "def write_table(table, path: Path) -> None:\n    assert path.suffix == \".arrow\", path\n")
    rows = stale(warm_copy)
    assert set(stale_for_themselves(rows)) == ARROW_STAGES, rows
    assert "code of stages/store.py:write_table changed" in rows["mix"]
    # the bytes come out the same, so train and merge, which read Arrow but write none, stay
    assert built(warm_copy) == ARROW_STAGES


def test_a_helper_only_tokenize_calls_rebuilds_tokenize(warm_copy, scratch):
    scratch("stages/tokenize.py", "    token_row = np.repeat(np.arange(len(row_tokens)), row_tokens)\n    first =", "    token_row = np.arange(len(row_tokens)).repeat(row_tokens)\n    first =")
    rows = stale_for_themselves(stale(warm_copy))
    assert set(rows) == {"tokenize[0]", "tokenize[1]", "tokenize[2]"}, rows
    assert rows["tokenize[0]"] == ["code of stages/tokenize.py:labels_for changed"]
    assert built(warm_copy) == {"tokenize[0]", "tokenize[1]", "tokenize[2]"}


def test_one_chat_template_rebuilds_only_the_datasets_rendered_with_it(warm_copy, scratch):
    # the same text by another expression: format[2] reruns, writes the same bytes, and stops there
    scratch("stages/templates/llama3.jinja", "'<|eot_id|>'", "'<|eot_' + 'id|>'")
    rows = stale_for_themselves(stale(warm_copy))
    assert rows == {"format[2]": ["source chat_template llama3 changed"]}, rows
    assert built(warm_copy) == {"format[2]"}
    # other text: that dataset and what follows it, not the chatml or alpaca datasets
    scratch("stages/templates/chatml.jinja", "'<|im_start|>' + message['role'] + '\\n'", "'<|im_start|>' + message['role'] + ':\\n'")
    assert built(warm_copy) == {"format[1]", "tokenize[1]", "mix", "pack", "train", "merge", "evaluate", "export"}
