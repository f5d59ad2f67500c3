"""`molt check CFG` and `molt preprocess CFG --dry-run`: every finding of a config at once, nothing run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main
from stages.ui import console

REPO = Path(__file__).resolve().parent.parent
ROWS = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'

# refused for five reasons of four kinds: a key molt lacks, a dataset entry's key molt lacks, a
# cross-field rule, a value of the wrong type; plus one warned and one unknown key
REFUSED = {
    "base_model": "smollm2-135m-instruct",
    "datasets": [{"path": "data.jsonl", "type": "alpaca", "skip": 3}],
    "kd_trainer": True,
    "warmup_steps": 10,
    "warmup_ratio": 0.1,
    "adapter": "qlora",
    "sequence_len": "long",
    "lora_mlp_kernel": True,
    "lora_rr": 8,
}
REFUSALS = [
    "  - kd_trainer: true is not supported yet: knowledge distillation: molt would train on the labels alone, without a teacher's logits",
    "  - datasets[0].skip: 3 is not supported yet: molt would train on every row, the first 3 too",
    "  - warmup_steps (10) and warmup_ratio (0.1) are mutually exclusive; set only one",
    "  - adapter: qlora requires load_in_4bit: true (got load_in_4bit: False)",
    "  - sequence_len: got 'long': Input should be a valid integer, unable to parse string as an integer",
]
WARNINGS = [
    "warning: lora_mlp_kernel: true — not supported yet: molt runs PEFT's LoRA layers (same result, without a fused kernel)",
    "warning: unknown key: lora_rr (not an Axolotl or molt option; did you mean lora_r?)",
]
# loads: Axolotl's empty values and zero evaluations, one warned and one unknown key
ACCEPTED = {
    "base_model": "smollm2-135m-instruct",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
    "lora_r": None, "optimizer": None, "sample_packing": None, "evals_per_epoch": 0,
    "lora_mlp_kernel": True, "lora_rr": 8,
}


def write(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "data.jsonl").write_text(ROWS)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(*args) -> tuple[int, str]:
    width = console._width
    console.width = 300  # no wrapping inside the lines compared
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        console._width = width
    return result.exit_code, result.output


def test_check_names_every_refusal_and_warning_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = cli("check", write(tmp_path, REFUSED))
    assert code == 2, output
    lines = output.splitlines()
    assert [line for line in lines if line.startswith("  - ")] == REFUSALS
    assert [line for line in lines if line.startswith("warning:")] == WARNINGS
    assert f"{tmp_path / 'config.yml'}: 5 refused, 2 warned" in lines
    assert lines.index(WARNINGS[0]) < lines.index(REFUSALS[0])  # the warnings come first, as in every command
    assert "Traceback" not in output and sorted(p.name for p in tmp_path.iterdir()) == ["config.yml", "data.jsonl"]  # nothing built


def test_check_passes_a_config_that_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = cli("check", write(tmp_path, ACCEPTED), "--micro-batch-size", "2")
    assert code == 0, output
    assert [line for line in output.splitlines() if line.startswith("warning:")] == WARNINGS
    assert "config.yml: nothing refused, 2 warned; preprocess would build 7 stage instances" in output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "last_run_prepared").exists()
    # an override is checked as the file's keys are
    code, output = cli("check", write(tmp_path, ACCEPTED), "--micro-batch-size", "0")
    assert code == 2 and "micro_batch_size: got 0: Input should be greater than or equal to 1" in output


def test_preprocess_dry_run_is_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for config, code in ((REFUSED, 2), (ACCEPTED, 0)):
        path = write(tmp_path, config)
        dry, checked = cli("preprocess", path, "--dry-run"), cli("check", path)
        assert dry == checked and dry[0] == code, dry[1]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "last_run_prepared").exists()


@pytest.mark.parametrize("config, code", [(REFUSED, 2), (ACCEPTED, 0)])
def test_check_as_a_process(tmp_path, config, code):
    path = write(tmp_path, config)
    run = subprocess.run([str(REPO / ".venv/bin/molt"), "check", str(path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "300"}, timeout=300)
    assert run.returncode == code, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert [line for line in lines if line.startswith("warning:")] == WARNINGS
    assert [line for line in lines if line.startswith("  - ")] == (REFUSALS if code else [])
    assert "Traceback" not in run.stderr


def test_tokenizer_config_offline_or_the_embedded_alias(tmp_path):
    # a hub id not in the local cache: one line naming it, what molt does and what to do, no traceback;
    # the embedded alias, which works for base_model, works for tokenizer_config too
    config = {"base_model": "smollm2-135m-instruct", "tokenizer_config": "EleutherAI/gpt-neox-20b",
              "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 128}
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub")}

    def preprocess(config: dict) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / ".venv/bin/molt"), "preprocess", str(write(tmp_path, config)), "--cache-dir", "cache"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    run = preprocess(config)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    [error] = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {tmp_path / 'config.yml'}: tokenizer_config 'EleutherAI/gpt-neox-20b': not a local directory and not in the local "
                            "Hugging Face cache; molt makes no network calls at run time. Download it elsewhere "
                            "(huggingface-cli download EleutherAI/gpt-neox-20b)")
    run = preprocess({**config, "tokenizer_config": "smollm2-135m-instruct"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 train rows, 0 validation rows)" in run.stderr


def test_keys_only_training_reads_refuse_train_not_preprocess(tmp_path, monkeypatch, tiny_model_dir):
    # data is often prepared on one machine and trained on another: a key molt refuses that changes
    # only the training (QAT, LISA) lets `molt preprocess` prepare the data and say what train refuses;
    # check and train refuse it; a refused key that would change the data stops preprocess too
    monkeypatch.chdir(tmp_path)
    training_only = {"base_model": str(tiny_model_dir), "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 64,
                     "micro_batch_size": 1, "learning_rate": 1e-4, "max_steps": 1, "qat": {"weight_dtype": "int4"}, "lisa_n_layers": 2,
                     "early_stopping_patience": 3}
    path = write(tmp_path, training_only)
    code, output = cli("preprocess", path, "--cache-dir", "cache")
    assert code == 0, output
    assert ("warning: qat: {weight_dtype: int4} is not supported yet: molt would train without fake quantization (quantization-aware training) "
            "(molt train will refuse it; the prepared data does not depend on it)") in output.splitlines()
    assert "(2 train rows, 0 validation rows)" in output
    assert ("warning: early_stopping_patience (3) needs evaluation and saving at fixed steps: set eval_steps and save_steps (got eval_steps: None, "
            "save_steps: None) (molt train will refuse it; the prepared data does not depend on it)") in output.splitlines()
    for command in ("check", "train"):
        code, output = cli(command, path, "--cache-dir", "cache")
        assert code == 2, output
        assert [line for line in output.splitlines() if line.startswith("  - ")] == [
            "  - qat: {weight_dtype: int4} is not supported yet: molt would train without fake quantization (quantization-aware training)",
            "  - lisa_n_layers: 2 is not supported yet: molt would train every trainable layer at each step, not LISA's sampled ones",
            "  - early_stopping_patience (3) needs evaluation and saving at fixed steps: set eval_steps and save_steps (got eval_steps: None, save_steps: None)"]
    assert not list((tmp_path / "cache").glob("train/*"))
    code, output = cli("preprocess", write(tmp_path, {**training_only, "pretraining_sample_concatenation": True}), "--cache-dir", "cache")
    assert code == 2 and "pretraining_sample_concatenation: true is not supported yet" in output and "qat: {weight_dtype: int4}" in output
    assert "early_stopping_patience (3)" in output


def test_an_axolotl_optimizer_molt_lacks_waits_for_train_and_a_typo_does_not(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    config = {"base_model": str(tiny_model_dir), "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 64,
              "micro_batch_size": 1, "learning_rate": 1e-4, "max_steps": 1, "optimizer": "muon"}
    path = write(tmp_path, config)
    code, output = cli("preprocess", path, "--cache-dir", "cache")
    assert code == 0, output
    assert "(2 train rows, 0 validation rows)" in output
    said = "optimizer: muon is not supported yet: it is one of Axolotl's own optimizers, which molt lacks"
    assert f"warning: {said}" in output and "(molt train will refuse it; the prepared data does not depend on it)" in output
    for command in ("check", "train"):
        code, output = cli(command, path, "--cache-dir", "cache")
        assert code == 2 and said in output, output
    code, output = cli("preprocess", write(tmp_path, {**config, "optimizer": "muonn"}), "--cache-dir", "cache")
    assert code == 2 and "unknown optimizer 'muonn'" in output


def test_the_training_only_tables_name_refused_keys_and_real_checks():
    from stages import config

    for key in config.REFUSED_AT_TRAINING:
        row = config.UNSUPPORTED.get(key)
        assert row is not None and row.refused, key  # a key implemented since, or only warned, would linger here
    assert config.TRAINING_CHECKS <= {check.__name__ for check in config.CHECKS}
    assert set(config.TRAINING_RULE_KEYS) <= {rule[0] for rule in config.RULES}
