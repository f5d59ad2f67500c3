"""Chat templates: the built-in ones users name in configs, and rendering in a sandbox.

Templates come from configs and model repos, so they are untrusted code: they run in Jinja's
immutable sandbox, with the same options transformers uses so renderings match its own, and
within limits: a rendering stops after MAX_SECONDS or MAX_OUTPUT characters, `*` may not build a
string or list over MAX_OUTPUT, `**` a number over MAX_POWER_BITS bits, and no filter or method
gets a size argument over MAX_OUTPUT. A broken or over-limit template is named (config key or
built-in name) with its line.
"""

from __future__ import annotations

import functools
import _signal
import json
import signal
import threading
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# One file per built-in template: a key reads the file of the template a config names, so
# editing one template's text rebuilds only the datasets rendered with it.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
BUILTIN_NAMES = tuple(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))

FALLBACK_PREFIX = "tokenizer_default_fallback_"
FIXED_DATE = datetime(2024, 1, 1)


class TemplateChoiceError(ValueError):
    pass


class TemplateSourceError(ValueError):
    """The template itself does not compile: the message names it and the line; no row is at fault."""


class TemplateLimit(TemplateError):
    """A rendering went over a resource limit."""


MAX_SECONDS = 10.0  # one rendering
MAX_OUTPUT = 1 << 26  # characters a rendering produces, or a `*` builds, or a size argument asks for
MAX_POWER_BITS = 1 << 16


def template_name(choice: str | None) -> str:
    """How a message names the template a `chat_template` choice renders with."""
    if choice in (None, "tokenizer_default"):
        return "the tokenizer's chat template (chat_template: tokenizer_default)"
    if choice == "jinja":
        return "the template of chat_template_jinja"
    if choice.startswith(FALLBACK_PREFIX):
        return f"the tokenizer's chat template or {choice[len(FALLBACK_PREFIX):]!r} (chat_template: {choice})"
    return f"the built-in chat template {choice!r} (stages/templates/{choice}.jinja)"


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


_deadline = threading.local()


def _check_time() -> None:
    if time.monotonic() > getattr(_deadline, "at", float("inf")):
        raise TemplateLimit(f"rendering took over {MAX_SECONDS:g} s (the limit for one rendering)")


def _size_arg(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with bounds on what one rendering may build (see the module's docstring)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise TemplateLimit(f"{type(seq).__name__} * {n}: over the limit of {MAX_OUTPUT} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right * abs(left).bit_length() > MAX_POWER_BITS:
            raise TemplateLimit(f"{left} ** {right}: over the limit of {MAX_POWER_BITS}-bit numbers")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_time()
        if any(map(_size_arg, args)) or any(map(_size_arg, kwargs.values())):
            raise TemplateLimit(f"{getattr(__obj, '__name__', 'a call').removeprefix('safe_')}(): a size argument over the limit of {MAX_OUTPUT}")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)


def _bounded_filter(f):
    first = 1 if getattr(f, "jinja_pass_arg", None) else 0  # context / environment, then the value

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        if any(map(_size_arg, args[first + 1:])) or any(map(_size_arg, kwargs.values())):
            raise TemplateLimit(f"filter {f.__name__.removeprefix('do_')}: a size argument over the limit of {MAX_OUTPUT}")
        return f(*args, **kwargs)

    return bounded


class GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for its
    assistant mask): the body renders as is. molt finds a turn's text by rendering, so the
    marks are not needed, but templates that use the tag (llava's) must compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' options: its templates call tojson(indent=...), (separators=...), (sort_keys=...)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str):
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationTag])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    # Training data must not depend on the day it was rendered: dates come out as a fixed day.
    env.globals["strftime_now"] = lambda fmt: FIXED_DATE.strftime(fmt)
    template = env.from_string(source)
    # jinja keeps them as a ChainMap over the environment's and copies that into every render's
    # context; a plain dict copies several times faster (one template renders twice a row)
    template.globals = dict(template.globals)
    return template


def _alarm(signum, frame):
    raise TemplateLimit(f"rendering took over {MAX_SECONDS:g} s (the limit for one rendering)")


def render(source: str, messages: list[dict], add_generation_prompt: bool = False, *, name: str = "the chat template", **special_tokens) -> str:
    """The template rendered within the limits; an error names the template (`name`) and, for
    one that does not compile, its line."""
    try:
        template = compile_template(source)
    except TemplateSyntaxError as error:
        raise TemplateSourceError(f"{name}: syntax error at line {error.lineno} of the template: {error.message}") from None
    # a timer interrupts loops that call nothing; only the main thread gets signals, elsewhere the hooks check the clock
    timer = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
             and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if timer:  # _signal: signal.signal's enum conversions cost more than a short rendering (two a row)
        previous = _signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    _deadline.at = time.monotonic() + MAX_SECONDS
    try:
        pieces, size = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise TemplateLimit(f"the rendering is over the limit of {MAX_OUTPUT} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit as error:
        raise TemplateLimit(f"{name}: {error}") from None
    except TemplateError as error:  # raise_exception(), an undefined name, ...
        raise TemplateError(f"{name}: {error}") from None
    except OverflowError as error:  # the sandbox's range() over MAX_RANGE items
        raise TemplateLimit(f"{name}: {error}") from None
    except MemoryError:
        raise TemplateLimit(f"{name}: the rendering ran out of memory") from None
    finally:
        _deadline.at = float("inf")
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _signal.signal(signal.SIGALRM, previous)
