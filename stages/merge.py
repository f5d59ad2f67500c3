"""merge: a LoRA adapter folded into its base model.

Reads the fetched base model, the tokenizer and the adapter: the trained one (train's
`model/`), or, when the pipeline has no training stage (`molt merge-lora CFG --lora-model-dir
DIR`), the one in `lora_model_dir` as it is (a checkpoint or any peft adapter directory; its
files are hashed into the key). Writes a standalone model directory (safetensors, config,
tokenizer with its chat template) that loads without peft.

A plain LoRA adapter is merged shard by shard: each safetensors shard of the base is read, its
LoRA-targeted weights get W + scale·B·A, and it is written out before the next is read, so the
peak memory is one shard plus the adapter, never the whole model. The adapter is folded onto the
full-precision weights on disk: a QLoRA / 8-bit adapter is merged into the unquantized base (as
Axolotl's merge-lora switches load_in_4bit/8bit off), folding into quantized weights would round
the update away. DoRA, LoftQ (folded into the NF4-rounded weights it was trained against),
trained modules_to_save, LoRA on embeddings and grown vocabularies go through peft's own
merge_and_unload on the loaded model instead.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from stages.config import stage_params
from stages.context import QUIET, Context
from stages.store import DataError, list_files
from stages.training.model import load_base, loftq_bits, with_trained_adapter

SCHEMA = 2
LIBRARIES = ("torch", "transformers", "peft", "safetensors")
# no training stage in the pipeline: the adapter comes from lora_model_dir
INPUTS = {"trained": ("train", "train_preference", "train_reward", None), "model": "fetch_model", "tokenizer": "tokenizer"}
PREFIX = "base_model.model."


Params = stage_params("adapter", "lora_model_dir", "trust_remote_code", "model_type", "overrides_of_model_config", "overrides_of_model_kwargs",
                      "resize_token_embeddings_to_32x", "peft")


def sources(params: Params) -> list[tuple[str, Path]]:
    """The adapter directory merged when no training stage gives one (its content keys the merge)."""
    if not params.lora_model_dir:
        return []
    root = Path(params.lora_model_dir)
    if not (root / "adapter_config.json").is_file():
        raise DataError(f"lora_model_dir {root}: not a LoRA adapter directory (no adapter_config.json)")
    return [(f"lora_model_dir/{p.relative_to(root).as_posix()}", p) for p in list_files(root)]


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    adapter_dir = inputs["trained"] / "model" if "trained" in inputs else Path(params.lora_model_dir or "")
    if not (adapter_dir / "adapter_config.json").exists():
        raise DataError("merge: the trained model is not a LoRA adapter (adapter is not set), nothing to merge")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    vocab = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())["vocab_size"]
    streamed = _streamable(params, config, inputs["model"], vocab)
    if streamed:
        merged = _merge_shards(inputs["model"], adapter_dir, config, out, ctx)
    else:
        base = load_base(params, inputs["model"], vocab, quantize=False)
        with_trained_adapter(params, base, adapter_dir).merge_and_unload().save_pretrained(out)
        merged = None
    for p in list_files(inputs["tokenizer"]):  # the config's tokenizer, with its chat template
        if p.name != "manifest.json":
            shutil.copy2(p, out / p.name)
    return {"merged_layers": merged, "shard_by_shard": streamed}


def _streamable(params: Params, config: dict, base_dir: Path, vocab: int) -> bool:
    """Whether the adapter is plain LoRA on linear layers of a base stored in safetensors, which
    the shard-by-shard path folds exactly as peft would."""
    base_vocab = json.loads((base_dir / "config.json").read_text()).get("vocab_size")
    return (not config.get("use_dora") and not config.get("modules_to_save") and not loftq_bits(params)
            and config.get("peft_type", "LORA") == "LORA" and vocab == base_vocab and not params.resize_token_embeddings_to_32x
            and not params.overrides_of_model_config and any(base_dir.glob("*.safetensors")))


def _scales(config: dict, modules: list[str]) -> dict[str, float]:
    """peft's scaling per LoRA module: alpha / r (rsLoRA: alpha / sqrt(r)), rank_pattern and
    alpha_pattern matched by the module name's suffix as peft matches them."""
    scales = {}
    for name in modules:
        r = next((v for k, v in (config.get("rank_pattern") or {}).items() if name == k or name.endswith(f".{k}")), config["r"])
        alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if name == k or name.endswith(f".{k}")), config["lora_alpha"])
        scales[name] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scales


def _merge_shards(base_dir: Path, adapter_dir: Path, config: dict, out: Path, ctx: Context) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    pairs = {}
    for key in adapter:
        if ".lora_A." in key:
            module = key.removeprefix(PREFIX).split(".lora_A.")[0]
            pairs[module] = (adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")])
        elif ".lora_B." not in key:
            raise DataError(f"{adapter_dir}: adapter tensor {key} is not a LoRA A/B matrix")
    scales = _scales(config, list(pairs))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    shards = sorted(base_dir.glob("*.safetensors"))
    done = set()
    with ctx.progress("merge", len(shards)) as advance:
        for shard in shards:
            tensors = {}
            with safe_open(shard, framework="pt") as f:
                metadata = f.metadata()
                for name in f.keys():
                    weight = f.get_tensor(name)
                    module = name.removesuffix(".weight")
                    if name.endswith(".weight") and module in pairs:
                        a, b = pairs[module]
                        delta = (b.float() @ a.float()) * scales[module]
                        weight = (weight.float() + (delta.T if fan_in_fan_out else delta)).to(weight.dtype)
                        done.add(module)
                    tensors[name] = weight.contiguous()
            save_file(tensors, out / shard.name, metadata=metadata)
            del tensors
            advance(1)
    if missing := sorted(set(pairs) - done):
        raise DataError(f"{adapter_dir}: LoRA layers with no base weight in {base_dir.name}: {', '.join(missing[:3])}")
    for extra in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        if (base_dir / extra).exists():
            shutil.copy2(base_dir / extra, out / extra)
    return len(done)
