"""molt evaluate: the held-out loss train measured, generation metrics, a cached second run, and
a given model evaluated without training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import write_jsonl

REPO = Path(__file__).resolve().parent.parent


def test_evaluate_reports_the_loss_train_measured_and_scores_generations(make_config, molt, cache_dir):
    config = make_config(eval_causal_lm_metrics=["sacrebleu", "chrf", "ter", "perplexity"], eval_max_new_tokens=6, eval_table_size=2)
    trained = molt("train", config)
    assert trained.exit_code == 0, trained
    result = molt("evaluate", config)
    assert result.exit_code == 0, result
    assert result.built() == {"evaluate"}, result.output
    train_metrics = json.loads(Path("out/metrics.json").read_text())
    found = json.loads(Path("out/eval/metrics.json").read_text())
    assert found["validation"]["loss"] == pytest.approx(train_metrics["eval_loss_after"], abs=1e-5)
    assert f"held-out loss {found['validation']['loss']:.4f}" in result.output
    generation = found["generation"]
    assert set(generation) == {"sacrebleu", "chrf", "ter", "perplexity"} and generation["perplexity"] == found["validation"]["perplexity"]
    assert 0 <= generation["chrf"] <= 100 and len(found["table"]) == 2 and all(t["reference"] for t in found["table"])
    page = Path("out/eval/report.html").read_text()
    assert found["table"][0]["generation"].replace("&", "&amp;").replace("<", "&lt;")[:10] in page and Path("out/eval/metrics.png").stat().st_size > 1000
    again = molt("evaluate", config)
    assert again.exit_code == 0 and "evaluate" in again.cached() and not again.built(), again.output


def test_each_test_dataset_gets_its_own_loss(make_config, molt, workdir):
    write_jsonl(workdir / "data" / "held_a.jsonl", [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(4)])
    write_jsonl(workdir / "data" / "held_b.jsonl", [{"instruction": f"Double {i}.", "output": str(2 * i)} for i in range(4)])
    config = make_config(val_set_size=None, test_datasets=[{"path": "data/held_a.jsonl", "type": "alpaca"}, {"path": "data/held_b.jsonl", "type": "alpaca"}])
    result = molt("evaluate", config)
    assert result.exit_code == 0, result
    found = json.loads(Path("out/eval/metrics.json").read_text())
    assert set(found["by_dataset"]) == {"test_datasets[0]", "test_datasets[1]"}
    parts = found["by_dataset"].values()
    weighted = sum(p["loss"] * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts)
    assert weighted == pytest.approx(found["validation"]["loss"], abs=1e-4)


def test_a_given_base_model_is_evaluated_without_training(make_config, tiny_model_dir, tmp_path):
    config = make_config()
    run = subprocess.run([str(REPO / ".venv/bin/molt"), "evaluate", str(config), "--base-model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    built = {line.split()[2] for line in run.stderr.splitlines() if "built" in line and len(line.split()) > 2}
    assert "evaluate" in built and "train" not in built and "pack" in built, run.stderr
    assert "held-out loss" in run.stderr
