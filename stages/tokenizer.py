"""tokenizer: the tokenizer every later stage and the trained model share.

Reads the fetched model's tokenizer (or `tokenizer_config`) with the class `tokenizer_type` names
(AutoTokenizer unless set), adds `special_tokens` and `tokens`,
sets the chat template chosen by `chat_template` / `chat_template_jinja`, and writes the tokenizer
files plus `molt_tokenizer.json` (template, special token strings, vocabulary sizes) so that
format and tokenize can read what they need without loading transformers. A directory transformers
itself saved, with nothing to add to it, is copied without loading transformers (`plain_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import chat_templates, fetch_model
from stages.config import stage_params
from stages.store import DataError, list_files
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("transformers", "tokenizers")
INPUTS = {"model": "fetch_model"}
INFO = "molt_tokenizer.json"
# the files one of which a tokenizer directory holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


Params = stage_params("tokenizer_config", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy", "trust_remote_code",
                      "chat_template", "chat_template_jinja", "special_tokens", "tokens")


def locate(params: Params) -> Path | None:
    """The local file or directory `tokenizer_config` names (None: the fetched model's tokenizer):
    the embedded alias (its GGUF file), a local path, or a hub id already in the local Hugging Face
    cache; never downloads."""
    name = params.tokenizer_config
    if not name:
        return None
    if name.lower() in fetch_model.EMBEDDED:
        return fetch_model._embedded_gguf(name.lower())
    path = Path(name).expanduser()
    if path.exists():
        return path
    if fetch_model.looks_like_path(name):
        raise DataError(f"tokenizer_config {name!r}: {path.absolute()} does not exist "
                        "(expected a tokenizer or model directory, a hub id such as org/name in the local cache, or 'smollm2-135m-instruct')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        raise DataError(
            f"tokenizer_config {name!r}: not a local directory and not in the local Hugging Face cache; "
            f"molt makes no network calls at run time. Download it elsewhere (huggingface-cli download {name}) "
            f"or set tokenizer_config to a tokenizer directory, or leave it unset to use base_model's tokenizer. ({type(error).__name__})"
        ) from None


def sources(params: Params) -> list[tuple[str, Path]]:
    template = chat_templates.template_file(params.chat_template)
    found = [(f"chat_template {template.stem}", template)] if template else []
    root = locate(params)
    if root is None:
        return found
    return found + [(p.relative_to(root).as_posix() if root.is_dir() else p.name, p) for p in list_files(root) if not p.name.startswith(".")]


def tokenizer_class(name: str | None):
    """The transformers tokenizer class `tokenizer_type` names (AutoTokenizer when unset)."""
    import transformers

    name = name or "AutoTokenizer"
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DataError(f"tokenizer_type {name!r}: not a transformers tokenizer class (e.g. AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast)")
    return cls


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    source = locate(params) or inputs["model"]
    plain = plain_config(params, source)
    info = _copy_plain(params, source, plain, out) if plain is not None else _save_with_transformers(params, source, inputs, out)
    (out / INFO).write_text(json.dumps(info, indent=1, sort_keys=True))
    return {"added_tokens": info["vocab_size"] - info["base_vocab_size"]}


def _template(params: Params, own: str | None) -> str | None:
    try:
        return chat_templates.resolve(params.chat_template, params.chat_template_jinja, own)
    except chat_templates.TemplateChoiceError as error:
        raise DataError(str(error)) from None


def _save_with_transformers(params: Params, source: Path, inputs: dict[str, Path], out: Path) -> dict:
    kwargs = {"use_fast": params.tokenizer_use_fast, "trust_remote_code": params.trust_remote_code, "local_files_only": True}
    if params.tokenizer_legacy is not None:
        kwargs["legacy"] = params.tokenizer_legacy
    what = f"tokenizer_config {params.tokenizer_config!r}" if params.tokenizer_config else f"base_model {inputs['model'].name}"
    if source.is_file() and source.suffix == ".gguf":  # the embedded alias: the tokenizer inside the GGUF file
        source, kwargs["gguf_file"] = source.parent, source.name
    elif source.is_dir() and not any((source / name).exists() for name in TOKENIZER_FILES):
        raise DataError(f"{what}: the directory holds no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = tokenizer_class(params.tokenizer_type).from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as error:  # files transformers cannot read
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{what}: cannot load a tokenizer from it (expected tokenizer.json or the tokenizer files transformers reads): {first}") from None
    base_size = len(tokenizer)
    if params.special_tokens:
        tokenizer.add_special_tokens(dict(params.special_tokens))
    if params.tokens:
        tokenizer.add_tokens(list(params.tokens))
    if tokenizer.pad_token is None:  # batching needs one; EOS is what most recipes use
        tokenizer.pad_token = tokenizer.eos_token
    template = tokenizer.chat_template = _template(params, tokenizer.chat_template)
    # transformers saves how the files were loaded (offline or not: HF_HUB_OFFLINE); the artifact
    # must not depend on the environment it was built in
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(out)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {
        "chat_template": template,
        "chat_template_choice": params.chat_template,  # how messages name it
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "adds_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "base_vocab_size": base_size,
        "vocab_size": len(tokenizer),
    }


# A tokenizer directory that transformers itself saved with the `tokenizers` backend holds only
# these keys when no tokenizer code of its own is involved. Loading and saving such a directory
# changes only how it was loaded and the pad token and template molt sets, so it is copied that way
# instead: importing transformers (and torch under it) is most of a cold preprocess's tokenizer
# stage. tests/test_fetch.py checks the copy against transformers' own save, file by file.
PLAIN_CONFIG_KEYS = {"backend", "tokenizer_class", "bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "is_local",
                     "local_files_only"}
# files that would make transformers read more than tokenizer.json and tokenizer_config.json
OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "special_tokens_map.json", "added_tokens.json",
                         "chat_template.json", "additional_chat_templates")


def plain_config(params: Params, source: Path):
    """(the source's tokenizer_config, its loaded tokenizer.json) when copying it reproduces
    transformers' save (see above), else None."""
    if (params.tokenizer_type not in (None, "AutoTokenizer") or not params.tokenizer_use_fast or params.tokenizer_legacy is not None
            or params.trust_remote_code or params.special_tokens or params.tokens or not source.is_dir()):
        return None
    if not (source / "tokenizer.json").is_file() or any((source / name).exists() for name in OTHER_TOKENIZER_FILES):
        return None
    try:
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or set(config) - PLAIN_CONFIG_KEYS or config.get("backend") != "tokenizers" or config.get("tokenizer_class") != "TokenizersBackend":
        return None
    named = [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k) is not None]
    if not isinstance(config.get("eos_token"), str) or not all(isinstance(t, str) for t in named):
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(source / "tokenizer.json"))
    except Exception:  # noqa: BLE001 (tokenizers raises a bare Exception); transformers then says what is wrong
        return None
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    return (config, backend) if all(t in specials for t in named) else None


def _copy_plain(params: Params, source: Path, plain: tuple, out: Path) -> dict:
    config, backend = plain
    own = source / "chat_template.jinja"
    template = _template(params, own.read_text(encoding="utf-8") if own.is_file() else None)
    saved = {k: v for k, v in config.items() if k != "local_files_only"}
    saved["is_local"] = True
    saved["pad_token"] = config.get("pad_token") or config["eos_token"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    backend.save(str(out / "tokenizer.json"))
    if template is not None:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    bos_id = backend.token_to_id(config["bos_token"]) if config.get("bos_token") else None
    size = backend.get_vocab_size(with_added_tokens=True)
    return {
        "chat_template": template,
        "chat_template_choice": params.chat_template,
        "bos_token": config.get("bos_token"),
        "eos_token": config["eos_token"],
        "pad_token": saved["pad_token"],
        "pad_token_id": backend.token_to_id(saved["pad_token"]),
        "adds_bos": bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id],
        "base_vocab_size": size,
        "vocab_size": size,
    }
