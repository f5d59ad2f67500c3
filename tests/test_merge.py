"""merge-lora: shard-by-shard folding equals peft's, --lora-model-dir merges exactly that adapter,
and merging SmolLM2 keeps its memory near one shard plus the adapter."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
SAMPLE = torch.tensor([[1, 5, 9, 200, 3000, 7, 42, 11]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(SAMPLE).logits


def adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter))


def test_merged_logits_equal_the_base_with_its_adapter(make_config, molt, cache_dir, tiny_model_dir):
    config = make_config(learning_rate=0.05, max_steps=4)
    assert molt("train", config).exit_code == 0
    result = molt("merge-lora", config)
    assert result.exit_code == 0, result
    merged = Path("out/merged")
    manifest = json.loads(next((cache_dir / "merge").glob("*/manifest.json")).read_text())
    assert manifest["shard_by_shard"] is True and manifest["merged_layers"] > 0
    assert not (merged / "adapter_config.json").exists() and (merged / "tokenizer.json").exists()
    folded = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert (folded - adapter_logits(tiny_model_dir, Path("out"))).abs().max() < 1e-4
    assert (folded - logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max() > 1e-3


def test_lora_model_dir_merges_exactly_that_adapter(make_config, molt, cache_dir, tiny_model_dir):
    one = make_config("one.yml", learning_rate=0.05, max_steps=4, output_dir="one")
    two = make_config("two.yml", learning_rate=0.05, max_steps=4, seed=7, lora_r=8, output_dir="two")
    assert molt("train", one).exit_code == 0 and molt("train", two).exit_code == 0
    results = {}
    for name in ("one", "two"):
        merged = molt("merge-lora", one, "--lora-model-dir", name, "--output-dir", f"merged-{name}")
        assert merged.exit_code == 0, merged
        assert not {n for n in merged.built() if n.startswith(("train", "pack", "format"))}, merged.output  # nothing trained
        results[name] = logits(AutoModelForCausalLM.from_pretrained(f"merged-{name}/merged", dtype=torch.float32))
        assert (results[name] - adapter_logits(tiny_model_dir, Path(name))).abs().max() < 1e-4
    assert (results["one"] - results["two"]).abs().max() > 1e-3
    again = molt("merge-lora", one, "--lora-model-dir", "two", "--output-dir", "merged-again")
    assert again.exit_code == 0 and "merge" in again.cached(), again.output
    refused = molt("merge-lora", one, "--lora-model-dir", "data")
    assert refused.exit_code == 2 and "not a LoRA adapter directory" in refused.output


def test_dora_merges_through_peft(make_config, molt, tiny_model_dir, cache_dir):
    config = make_config(learning_rate=0.05, max_steps=3, peft_use_dora=True)
    assert molt("train", config).exit_code == 0
    assert molt("merge-lora", config).exit_code == 0
    manifest = json.loads(next((cache_dir / "merge").glob("*/manifest.json")).read_text())
    assert manifest["shard_by_shard"] is False
    folded = logits(AutoModelForCausalLM.from_pretrained("out/merged", dtype=torch.float32))
    assert (folded - adapter_logits(tiny_model_dir, Path("out"))).abs().max() < 1e-4


PEAK = """
import json, resource, sys
from pathlib import Path
import torch, safetensors, peft, transformers  # imported before the baseline: the merge's own memory is what is measured
from stages import merge
from stages.config import slice_params
from stages.context import QUIET
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = slice_params(merge.Params, {"adapter": "lora", "lora_model_dir": sys.argv[2]})
out = Path(sys.argv[4]); out.mkdir()
merge.run(params, {"model": Path(sys.argv[1]), "tokenizer": Path(sys.argv[3])}, out, QUIET)
print(json.dumps({"baseline_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_merging_smollm2_peaks_under_two_shards_plus_the_adapter(tmp_path):
    """SmolLM2-135M (one 0.54 GB fp32 shard) with a rank-16 adapter on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from stages import fetch_model, tokenizer as tokenizer_stage
    from stages.config import slice_params

    model_dir, tok_dir = tmp_path / "smollm2", tmp_path / "tok"
    model_dir.mkdir(), tok_dir.mkdir()
    fetch_model.run(slice_params(fetch_model.Params, {"base_model": "smollm2-135m-instruct"}), {}, model_dir)
    tokenizer_stage.run(slice_params(tokenizer_stage.Params, {"chat_template": None}), {"model": model_dir}, tok_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():  # a trained adapter's size of update (peft's random B would move every logit by tens)
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.02)
    model.save_pretrained(tmp_path / "adapter")
    del model
    shard = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, "-c", PEAK, str(model_dir), str(tmp_path / "adapter"), str(tok_dir), str(tmp_path / "merged")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    used = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (used["peak_kib"] - used["baseline_kib"]) * 1024
    assert grown < 2 * shard + adapter, (grown / 2**20, shard / 2**20, adapter / 2**20)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    sample = tokenizer(["Convert 3 km to m."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(sample).logits
    from peft import PeftModel

    with torch.no_grad():
        logits_of_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(sample).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tmp_path / "adapter").eval()(sample).logits
    assert (folded - adapted).abs().max() < 1e-4 and (adapted - logits_of_base).abs().max() > 1e-2


def test_merge_lora_as_a_user_runs_it(make_config, molt):
    """A real `molt merge-lora` process on a trained adapter directory."""
    config = make_config(learning_rate=0.05, max_steps=3)
    assert molt("train", config).exit_code == 0
    run = subprocess.run([str(REPO / ".venv/bin/molt"), "merge-lora", str(config), "--lora-model-dir", "out", "--output-dir", "merged-out",
                          "--cache-dir", "cache"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "merged model written to merged-out/merged" in run.stderr
    assert (Path("merged-out/merged") / "model.safetensors").exists() and not (Path("merged-out/merged") / "adapter_config.json").exists()
