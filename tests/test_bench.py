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
    assert p["bare_encode_s"] > 0 and p["cold_over_bare"] == p["cold_s"] / p["bare_encode_s"]
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


def test_axolotl_examples_bench_classifies_each_training_config(tmp_path, tiny_model_dir):
    """A git repository with an examples/ folder of four YAML files: an alpaca config, a chat config
    whose datasets name their fields, a refused one and one without base_model (not a training config)."""
    import subprocess

    import yaml

    from bench import axolotl_examples

    repo = tmp_path / "axolotl"
    (repo / "examples" / "sub").mkdir(parents=True)
    common = {"sequence_len": 256, "micro_batch_size": 1, "num_epochs": 1, "learning_rate": 1e-5, "output_dir": "out"}
    files = {
        "examples/alpaca.yml": {"base_model": "org/some-7b", "datasets": [{"path": "tatsu/alpaca", "type": "alpaca", "split": "train[:10%]"}],
                                "val_set_size": 0.1, **common},
        "examples/sub/chat.yaml": {"base_model": "org/chat-7b", "chat_template": "chatml", "datasets": [
            {"path": "org/sharegpt", "type": "chat_template", "field_messages": "conversations",
             "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}}], **common},
        # refused for a key that changes the data (one only training reads would let preprocess through)
        "examples/refused.yml": {"base_model": "org/some-7b", "datasets": [{"path": "x/y", "type": "alpaca"}], "pretraining_sample_concatenation": True,
                                 "adapter": "lora", "lora_r": 8, "lora_alpha": 16, **common},
        "examples/cloud.yaml": {"provider": "somewhere", "gpu": "h100"},
    }
    for path, config in files.items():
        (repo / path).write_text(yaml.safe_dump(config))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "examples"], check=True)

    result = axolotl_examples.main(["--axolotl-git", str(repo / ".git"), "--base-model", str(tiny_model_dir), "--rows", "40",
                                    "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    outcomes = {r["config"]: (r["outcome"], r["error"]) for r in result["rows"]}
    assert set(outcomes) == {"examples/alpaca.yml", "examples/sub/chat.yaml", "examples/refused.yml"}
    assert outcomes["examples/alpaca.yml"] == ("preprocesses", "")
    assert outcomes["examples/sub/chat.yaml"] == ("preprocesses", "")
    assert outcomes["examples/refused.yml"][0] == "refused" and "pretraining_sample_concatenation" in outcomes["examples/refused.yml"][1]
    # the slice of the 40 local rows was read: 10% is 4 rows, 1 of them held out; the chats all
    prepared = {r["config"]: r["rows"] for r in result["rows"]}
    assert prepared == {"examples/alpaca.yml": "3+1", "examples/sub/chat.yaml": "40+0", "examples/refused.yml": ""}
    (alpaca,) = (tmp_path / "work").glob("*alpaca*")
    rows = [json.loads(line) for line in (alpaca / "data" / "datasets-0.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"instruction", "input", "output"} <= set(rows[0])
    (chat,) = (tmp_path / "work").glob("*chat*")
    first = json.loads((chat / "data" / "datasets-0.jsonl").read_text().splitlines()[0])
    assert {m["from"] for m in first["conversations"]} <= {"system", "human", "gpt"} and "value" in first["conversations"][0]
    text = (tmp_path / "out" / "axolotl-examples.md").read_text()
    assert "| preprocesses | 2 | 66.7% |" in text and "| refused | 1 | 33.3% |" in text
    assert "| 1 | pretraining_sample_concatenation: … is not supported yet" in text
