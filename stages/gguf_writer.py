"""A llama-family model directory (config.json, *.safetensors, tokenizer.json) as one GGUF file.

What llama.cpp's convert_hf_to_gguf.py writes for a Llama with a byte-level BPE tokenizer: the
hyperparameters under `llama.*`, the tensors under llama.cpp's names with Q and K permuted from
Hugging Face's rotary layout to llama.cpp's (the exact inverse of what transformers' GGUF loader
undoes), norms and other 1-D tensors in F32, and the tokenizer (tokens, types, merges, special
ids, the add-BOS/EOS flags, the pre-tokenizer's llama.cpp name, the chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from stages.store import DataError

ARCHITECTURES = ("llama", "mistral")  # llama.cpp runs Mistral as "llama"
# outtype: (llama.cpp's file type, the type of 2-D weights)
OUTTYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
# tokenizer.json pre-tokenizers llama.cpp knows by name (its regexes split text the same way)
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer` (DataError for one it has no name for)."""
    def like(step: dict, shape: dict) -> bool:
        return all(step.get(k) == v for k, v in shape.items())

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    if len(steps) == 1 and like(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and like(steps[0], {"type": "Digits", "individual_digits": True}) and like(steps[1], _BYTE_LEVEL):
        return "smollm"  # SmolLM / SmolLM2 on the Hub
    if (len(steps) == 2 and like(steps[0], {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}})
            and like(steps[1], {"type": "ByteLevel", "use_regex": False})):
        return "llama-bpe"  # Llama 3
    raise DataError(f"GGUF export: tokenizer.json's pre_tokenizer {json.dumps(pre)[:200]} has no llama.cpp name molt knows "
                    "(it maps GPT-2's byte-level split, SmolLM's and Llama 3's)")


def hyperparameters(config: dict) -> dict:
    """The llama.* values of a llama / mistral config.json; DataError for what llama.cpp's llama would run differently."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise DataError(f"GGUF export: model_type {model_type!r} is not supported; GGUF export supports llama-family models "
                        f"({', '.join(ARCHITECTURES)}, SmolLM2 included); export it with export_format: safetensors")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = [f"{key} {config[key]!r}" for key, ok in (("hidden_act", "silu"),) if config.get(key, ok) != ok]
    problems += [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}")
    window = config.get("sliding_window")
    if model_type == "mistral" and window is not None and window < config.get("max_position_embeddings", 0):
        problems.append(f"sliding_window {window}")
    if problems:
        raise DataError(f"GGUF export: this {model_type} model has {', '.join(problems)}, which molt's GGUF export does not write yet")
    heads = config["num_attention_heads"]
    return {
        "context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"], "feed_forward_length": config["intermediate_size"],
        "head_count": heads, "head_count_kv": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "rope_theta": float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "rms_norm_eps": float(config["rms_norm_eps"]), "vocab_size": config["vocab_size"],
    }


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Q / K rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs);
    transformers' LlamaTensorProcessor._reverse_permute_weights is its inverse."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def tensor_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())
    return total


def weights(model_dir: Path):
    """(name, float32 array) for every tensor of the model's safetensors files, in a stable order."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise DataError(f"GGUF export: no *.safetensors in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name).float().numpy()


def tokenizer_fields(model_dir: Path, vocab_size: int) -> dict:
    """The tokenizer.* values: llama.cpp's "gpt2" (byte-level BPE) vocabulary, padded to the embedding's rows."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise DataError(f"GGUF export: {model_dir} has no tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise DataError("GGUF export: the tokenizer is not a byte-level BPE (GPT-2 style, as SmolLM2's); "
                        "molt's GGUF export writes only those for now")
    tokens = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise DataError(f"GGUF export: the tokenizer has token id {max(tokens)}, past the model's {vocab_size} embedding rows")
    listed = [tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in m) for m in model.get("merges", [])]

    tok = AutoTokenizer.from_pretrained(model_dir)
    plain, marked = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    template = tok.chat_template
    if not template and (model_dir / "molt_tokenizer.json").exists():
        template = json.loads((model_dir / "molt_tokenizer.json").read_text()).get("chat_template")
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    return {
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer")), "tokens": [t for t, _ in listed], "types": [int(k) for _, k in listed],
        "merges": merges, "ids": {k: v for k, v in ids.items() if v is not None and v < vocab_size},
        "add_bos": len(marked) > len(plain) and marked[0] == tok.bos_token_id,
        "add_eos": len(marked) > len(plain) and marked[-1] == tok.eos_token_id,
        "chat_template": template if isinstance(template, str) else None,
    }


def write(model_dir: Path, path: Path, outtype: str, name: str, progress: Callable) -> None:
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    hp = hyperparameters(config)
    vocab = tokenizer_fields(model_dir, hp["vocab_size"])
    file_type, weight_type = OUTTYPES[outtype]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, token_id in vocab["ids"].items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["block_count"])
    tensors = dict(weights(model_dir))
    head = tensors.get("lm_head.weight")
    if head is not None and np.array_equal(head, tensors.get("model.embed_tokens.weight")):
        del tensors["lm_head.weight"]  # tied: llama.cpp (and transformers' loader) reuse token_embd without `output`
    for hf_name in list(tensors):
        array = tensors.pop(hf_name)  # the float32 copy goes once the written one is made
        progress(1)
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise DataError(f"GGUF export: tensor {hf_name!r} has no llama.cpp name")
        if new.endswith("attn_q.weight"):
            array = permute(array, hp["head_count"])
        elif new.endswith("attn_k.weight"):
            array = permute(array, hp["head_count_kv"])
        qtype = gguf.GGMLQuantizationType.F32 if array.ndim < 2 else getattr(gguf.GGMLQuantizationType, weight_type)
        if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # rows Q8_0 cannot block, as llama.cpp's converter falls back
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(new, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
