"""export: the finished model in a format to ship: safetensors, or one GGUF file for llama.cpp / Ollama.

Reads the merged model (merge, for adapters) or train's full model (`<artifact>/model/`): a
standalone model directory with config.json, safetensors weights and the tokenizer files with
the chat template. Writes, for `export_format: safetensors`, the same directory with the weights
cast to `export_outtype` (f32, f16, bf16; config.json's dtype follows); for `export_format: gguf`,
`model.gguf` (llama-family models, SmolLM2 included: hyperparameters, tensors under llama.cpp's
names, the tokenizer and the chat template, in `export_outtype`, q8_0 too; see
stages/gguf_writer.py) and a `Modelfile` for `ollama create NAME -f Modelfile`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages import gguf_writer
from stages.config import stage_params
from stages.context import QUIET, Context
from stages.store import DataError, list_files

SCHEMA = 1
LIBRARIES = ("gguf", "safetensors", "torch", "transformers", "tokenizers")
INPUTS = {"model": ("merge", "train", "train_preference")}
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

Params = stage_params("export_format", "export_outtype", "base_model")


def model_dir(artifact: Path) -> Path:
    """The model directory inside an input artifact: merge's is the artifact, train's is `model/`."""
    inner = artifact / "model"
    found = inner if inner.is_dir() else artifact
    if not (found / "config.json").exists():
        raise DataError(f"export: {found} holds no config.json (a LoRA adapter is exported after merge)")
    if (found / "adapter_config.json").exists():
        raise DataError(f"export: {found} is a LoRA adapter; export reads the merged model (add the merge stage)")
    return found


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    source = model_dir(Path(inputs["model"]))
    out.mkdir(parents=True, exist_ok=True)
    if params.export_format == "gguf":
        name = Path(params.base_model or "").name or json.loads((source / "config.json").read_text()).get("model_type", "model")
        with ctx.progress(f"export GGUF {params.export_outtype}", gguf_writer.tensor_count(source)) as advance:
            gguf_writer.write(source, out / "model.gguf", params.export_outtype, name, advance)
        (out / "Modelfile").write_text("FROM ./model.gguf\n")
    else:
        export_safetensors(source, out, params.export_outtype, ctx)
    size = sum(p.stat().st_size for p in list_files(out))
    ctx.log(f"export: {params.export_format} {params.export_outtype}, {size / 2**20:.1f} MiB")
    return {"format": params.export_format, "outtype": params.export_outtype, "bytes": size}


def export_safetensors(source: Path, out: Path, outtype: str, ctx: Context) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if outtype not in DTYPES:
        raise DataError(f"export_outtype {outtype!r} is GGUF-only; export_format: safetensors writes f32, f16 or bf16 "
                        "(or set export_format: gguf)")
    dtype = getattr(torch, DTYPES[outtype])
    files = list_files(source)
    total = 0
    with ctx.progress(f"export safetensors {outtype}", len(files)) as advance:
        for path in files:
            target = out / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    tensors = {k: cast(f.get_tensor(k), dtype) for k in f.keys()}
                    metadata = f.metadata() or {"format": "pt"}
                save_file(tensors, target, metadata=metadata)
                total += sum(t.numel() * t.element_size() for t in tensors.values())
            elif path.name != "model.safetensors.index.json" and path.name != "config.json":
                shutil.copy2(path, target)
            advance(1)
    config = json.loads((source / "config.json").read_text())
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = DTYPES[outtype]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = source / "model.safetensors.index.json"
    if index.exists():
        spec = json.loads(index.read_text())
        spec.setdefault("metadata", {})["total_size"] = total
        (out / index.name).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def cast(tensor, dtype):
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
