"""Chat templates: the built-in ones users name in configs, and rendering in a sandbox.

Templates come from configs and model repos, so they are untrusted code: they run in Jinja's
immutable sandbox, with the same options transformers uses so renderings match its own.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# One file per built-in template: a key reads the file of the template a config names, so
# editing one template's text rebuilds only the datasets rendered with it.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
BUILTIN_NAMES = tuple(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))

FALLBACK_PREFIX = "tokenizer_default_fallback_"
FIXED_DATE = datetime(2024, 1, 1)


class TemplateChoiceError(ValueError):
    pass


def resolve(choice: str | None, jinja: str | None, tokenizer_template: str | None) -> str | None:
    """The Jinja source for a config's `chat_template` choice (None: the tokenizer's own, if any)."""
    if choice in (None, "tokenizer_default"):
        if choice and not tokenizer_template:
            raise TemplateChoiceError("chat_template: tokenizer_default, but the tokenizer has no chat template; name one (e.g. chatml)")
        return tokenizer_template
    if choice.startswith(FALLBACK_PREFIX):
        return tokenizer_template or resolve(choice[len(FALLBACK_PREFIX):], jinja, None)
    if choice == "jinja":
        if not jinja:
            raise TemplateChoiceError("chat_template: jinja needs chat_template_jinja")
        return jinja
    return builtin(choice)


def builtin(name: str) -> str:
    if name not in BUILTIN_NAMES:
        raise TemplateChoiceError(f"chat_template: unknown template {name!r}; built-in: {', '.join(BUILTIN_NAMES)}, jinja, tokenizer_default")
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_file(choice: str | None) -> Path | None:
    """The built-in template file a `chat_template` choice may read (for the stages' keys)."""
    name = (choice or "").removeprefix(FALLBACK_PREFIX)
    return TEMPLATES_DIR / f"{name}.jinja" if name in BUILTIN_NAMES else None


def _raise(message):
    raise TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    # Training data must not depend on the day it was rendered: dates come out as a fixed day.
    env.globals["strftime_now"] = lambda fmt: FIXED_DATE.strftime(fmt)
    return env.from_string(source)


def render(source: str, messages: list[dict], add_generation_prompt: bool = False, **special_tokens) -> str:
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
