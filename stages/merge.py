"""merge: a trained LoRA adapter folded into its base model.

Reads the fetched base model and train's `model/` (adapter, tokenizer). Writes a standalone
model directory (safetensors, config, tokenizer with its chat template) that loads without peft.
A QLoRA / 8-bit adapter is merged into the base loaded in full precision (as Axolotl's merge-lora
switches load_in_4bit/8bit off): folding into quantized weights would round the update away. The
base is loaded as train loaded it (model_type, config and load overrides, resized embeddings); a
LoftQ adapter is folded into the NF4-rounded weights it was trained against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.config import stage_params
from stages.store import DataError, list_files
from stages.training.model import load_base, with_trained_adapter
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "safetensors")
INPUTS = {"trained": ("train", "train_preference", "train_reward"), "model": "fetch_model"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


Params = stage_params("adapter", "trust_remote_code", "model_type", "overrides_of_model_config", "overrides_of_model_kwargs",
                      "resize_token_embeddings_to_32x", "peft")


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    trained = inputs["trained"] / "model"
    if not (trained / "adapter_config.json").exists():
        raise DataError("merge: the trained model is not a LoRA adapter (adapter is not set), nothing to merge")
    vocab = json.loads((trained / "molt_tokenizer.json").read_text())["vocab_size"]
    base = load_base(params, inputs["model"], vocab, quantize=False)
    merged = with_trained_adapter(params, base, trained).merge_and_unload()
    merged.save_pretrained(out)
    for p in list_files(trained):
        if p.name not in ADAPTER_FILES:
            shutil.copy2(p, out / p.name)
    return {}
