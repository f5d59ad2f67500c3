"""`python -m bench` runs end to end on tiny inputs and writes its table, plot and numbers; no
timing is asserted (packing and throughput are covered by test_pack_bench.py)."""

from __future__ import annotations

import json

import bench.__main__ as bench_main
from bench import pipeline


def test_bench_runs_every_pipeline_benchmark_on_tiny_inputs(tmp_path):
    out = tmp_path / "results"
    results = bench_main.main(["--tiny", "--skip", "packing", "throughput", "--out", str(out), "--work", str(tmp_path / "work")])
    assert set(results) == {"preprocess", "tokenize", "growth", "status"}
    p = results["preprocess"]
    assert p["warm_imports_torch"] is False  # a no-change rerun must not load torch
    assert p["partial_rebuilt"] == {"format": 1, "tokenize": 1, "mix": 1, "pack": 1}  # one of four datasets
    assert {r["dataset"] for r in results["tokenize"]} == {"alpaca", "chat_template"}
    assert all(r["molt_rows_per_s"] > 0 and r["bare_rows_per_s"] > 0 and r["kept_rows"] > 0 for r in results["tokenize"])
    assert [r["rows"] for r in results["growth"]] == bench_main.SIZES["tiny"]["growth"]
    assert [r["artifacts"] for r in results["status"]] == bench_main.SIZES["tiny"]["status"]
    text = (out / "bench-tiny.md").read_text()
    for heading in ("## 1. Tokenize", "## 2. `molt preprocess`", "## 5a.", "## 5b."):
        assert heading in text
    assert (out / "bench-tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "bench-tiny.json").read_text())["mode"] == "tiny"


def test_imports_torch_reads_importtime_output():
    assert pipeline._imports_torch("import time:       120 |        900 |   torch\n")
    assert not pipeline._imports_torch("import time:       120 |        900 |   torch._C\nimport time: 1 | 2 | tokenizers\n")


def test_dpo_bench_runs_molt_and_trl_on_the_same_rows(tmp_path):
    from bench import dpo

    result = dpo.main(["--rows", "2", "--micro-batch-size", "2", "--betas", "0.1", "--out", str(tmp_path)])
    assert [r["steps"] for r in result["runs"]["molt"] + result["runs"]["trl"]] == [1, 1]
    assert result["ref_seconds"] > 0 and result["molt_tokens_per_s"] > 0 and result["trl_tokens_per_s"] > 0
    assert result["max_loss_gap"] < 1e-3  # the cached reference is the one TRL computes
    assert "molt / TRL" in (tmp_path / "dpo-tiny.md").read_text()
