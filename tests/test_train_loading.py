"""How the base model and tokenizer are loaded: model_type, overrides_of_model_config /
overrides_of_model_kwargs (train and merge load the same base), tokenizer_type, revision_of_model,
and custom model code refused unless trust_remote_code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from stages import fetch_model, tokenizer
from stages.store import DataError, read_table
from stages.training.batches import collate
from stages.training.loss import token_loss
from stages.training.model import load_base, load_for_training

LINEAR_ROPE = {"type": "linear", "factor": 2.0}


def val_loss(model, cache: Path) -> float:
    """Token-weighted loss on pack's validation rows (one batch), outside the train stage."""
    (val,) = cache.glob("pack/*/val.arrow")
    batch = collate(read_table(val).to_pylist(), pad_id=0)
    labels = batch.pop("labels")
    with torch.no_grad():
        total = token_loss(model(**batch, use_cache=False), labels, 1)
    return float(total) / int((labels[..., 1:] != -100).sum())


def val_logits(model, cache: Path):
    (val,) = cache.glob("pack/*/val.arrow")
    batch = collate(read_table(val).to_pylist(), pad_id=0)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_config_overrides_reach_the_trained_and_the_merged_model(warm, molt, cache_dir, tiny_model_dir):
    from peft import PeftModel

    full = molt("train", warm(adapter=None, lora_target_linear=None, max_steps=1, overrides_of_model_config={"rope_scaling": LINEAR_ROPE}))
    assert full.exit_code == 0, full
    assert "not supported yet" not in full.output
    rope = json.loads(Path("out/config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0 and rope["rope_theta"] == 10000.0  # theta kept

    lora = molt("train", warm(overrides_of_model_config={"rope_scaling": LINEAR_ROPE}, overrides_of_model_kwargs={"attn_implementation": "eager"}))
    assert lora.exit_code == 0, lora
    after = json.loads(Path("out/metrics.json").read_text())["eval_loss_after"]
    merged = molt("merge-lora", warm(overrides_of_model_config={"rope_scaling": LINEAR_ROPE}, overrides_of_model_kwargs={"attn_implementation": "eager"}))
    assert merged.exit_code == 0, merged
    model = AutoModelForCausalLM.from_pretrained("out/merged", dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_type"] == "linear"
    # the merged model is the trained one: the base got the same rope scaling in merge as in train
    assert val_loss(model, cache_dir) == pytest.approx(after, rel=1e-5)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "out").eval()
    # without the override it is another model (its loss on these short rows can come within the
    # tolerance above, so the logits are compared)
    assert (val_logits(plain, cache_dir) - val_logits(model, cache_dir)).abs().max() > 1e-3

    clash = molt("train", warm(overrides_of_model_kwargs={"device_map": "auto"}))
    assert clash.exit_code == 2 and "device_map are set by molt" in clash.output
    unknown = molt("train", warm(overrides_of_model_config={"no_such_setting": 1}))
    assert unknown.exit_code == 2 and "'no_such_setting' is not a setting of LlamaConfig" in unknown.output


def test_overrides_of_model_kwargs_go_to_from_pretrained(tiny_model_dir):
    model = load_base(SimpleNamespace(overrides_of_model_kwargs={"attn_implementation": "eager"}), tiny_model_dir, 49152)
    assert model.config._attn_implementation == "eager"
    assert load_base(SimpleNamespace(), tiny_model_dir, 49152).config._attn_implementation == "sdpa"


def test_model_type_names_the_class(warm, molt):
    named = molt("train", warm(model_type="LlamaForCausalLM"))
    assert named.exit_code == 0, named
    bad = molt("train", warm(model_type="NoSuchModelClass"))
    assert bad.exit_code == 2 and "model_type 'NoSuchModelClass': not a transformers model class" in bad.output
    classifier = molt("train", warm(model_type="AutoModelForSequenceClassification"))
    assert classifier.exit_code == 2 and "no class labels" in classifier.output


@pytest.mark.parametrize("model_type, labels", [
    ("AutoModelForSequenceClassification", torch.tensor([0, 1])),
    ("AutoModelForTokenClassification", torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, -100]])),
])
def test_classifier_heads_load_with_a_trainable_head_and_take_a_step(tiny_model_dir, model_type, labels):
    """For reward models (another issue): the loader builds the classification head with LoRA on
    the body and the new head trained in full (peft's SEQ_CLS / TOKEN_CLS), and a step with a
    labels column lowers nothing to NaN and moves both."""
    num_labels = 3 if "Token" in model_type else 2
    params = SimpleNamespace(model_type=model_type, overrides_of_model_config={"num_labels": num_labels}, adapter="lora",
                             lora_target_linear=True, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    model = load_for_training(params, tiny_model_dir, 49152)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    out = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]), labels=labels)
    assert out.logits.shape[-1] == num_labels and torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert any("score" in n for n in moved) and any("lora_B" in n for n in moved)


def test_custom_model_code_needs_trust_remote_code(tmp_path, tiny_model_dir, make_config, molt, cache_dir):
    custom = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, custom, ignore=shutil.ignore_patterns(".*"))
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_tiny.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class TinyConfig(LlamaConfig):\n    pass\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    refused = molt("train", make_config(base_model=str(custom)))
    assert refused.exit_code == 2, refused
    assert "ships its own code" in refused.output and "modeling_tiny.TinyForCausalLM" in refused.output and "trust_remote_code: true" in refused.output
    assert not list(cache_dir.glob("fetch_model/*/manifest.json"))  # nothing half-written

    out = tmp_path / "fetched"
    out.mkdir()
    fetch_model.run(fetch_model.Params(base_model=str(custom), trust_remote_code=True), {}, out)
    assert (out / "modeling_tiny.py").exists()
    with pytest.raises(DataError, match="trust_remote_code"):
        fetch_model.run(fetch_model.Params(base_model=str(custom)), {}, tmp_path / "other")


def test_revision_of_model_picks_the_snapshot(tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--acme--tiny"
    shas = {"main": "1" * 40, "v2": "2" * 40}
    for sha in shas.values():
        shutil.copytree(tiny_model_dir, repo / "snapshots" / sha, ignore=shutil.ignore_patterns(".*"))
    (repo / "refs").mkdir()
    for name, sha in shas.items():
        (repo / "refs" / name).write_text(sha)
    assert fetch_model.locate(fetch_model.Params(base_model="acme/tiny")).name == shas["main"]
    assert fetch_model.locate(fetch_model.Params(base_model="acme/tiny", revision_of_model="v2")).name == shas["v2"]
    assert fetch_model.locate(fetch_model.Params(base_model="acme/tiny", revision_of_model=shas["v2"])).name == shas["v2"]
    with pytest.raises(DataError, match="local Hugging Face cache"):
        fetch_model.locate(fetch_model.Params(base_model="acme/tiny", revision_of_model="v3"))


def test_tokenizer_type_names_the_class(tmp_path, tiny_model_dir):
    out = tmp_path / "tok"
    out.mkdir()
    tokenizer.run(tokenizer.Params(tokenizer_type="GPT2Tokenizer"), {"model": tiny_model_dir}, out)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    assert json.loads((out / "molt_tokenizer.json").read_text())["vocab_size"] == 49152
    with pytest.raises(DataError, match="tokenizer_type 'NoSuchTokenizer'"):
        tokenizer.run(tokenizer.Params(tokenizer_type="NoSuchTokenizer"), {"model": tiny_model_dir}, tmp_path / "bad")
