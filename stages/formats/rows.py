"""What prompt strategies share: row checks (a RowError names the field, the format stage adds
the dataset and row number), the resolved `type:` (Kind), what a strategy hands the format stage
(Formatter) and the one prompt-then-response builder the instruction types use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


class UnknownKind(ValueError):
    """The module exists but has no such loader / prompt style."""


class Kind(NamedTuple):
    """A parsed `type:`: `alpaca_chat.load_qa` is (alpaca_chat, load_qa, None); `alpaca:chatml`
    is (alpaca, load, chatml); a mapping (user-defined prompt) is (user_defined, load, None)."""

    name: str
    loader: str = "load"
    style: str | None = None


class Tokens(NamedTuple):
    """A pretokenized row: ids and labels as given (validated by the strategy)."""

    input_ids: list[int]
    labels: list[int]


# How tokenize turns a row's segments into ids:
#   joined    - the segments' text encoded in one call; a token is trained if it covers a trained character
#               (a `detail` segment, from message_field_training_detail, follows Axolotl's token rule instead)
#   separate  - each segment encoded on its own, ids concatenated (template-free input_output)
#   prefix    - as separate, except that an untrained segment directly followed by a trained one is
#               encoded together with it, and as many leading tokens are masked as the untrained text
#               has on its own (Axolotl's reflection and pygmalion bot turns)
#   chunk     - joined, then split into sequence_len pieces instead of dropped (completion)
#   tokens    - the row already holds input_ids and labels (pretokenized)
MODES = ("joined", "separate", "prefix", "chunk", "tokens")


class Segment(NamedTuple):
    """A piece of a row's text; `detail` marks a message_field_training_detail span."""

    text: str
    train: bool
    detail: bool = False


@dataclass(frozen=True)
class Formatter:
    row: Callable[[dict, dict], "list[tuple[str, bool]] | list[Segment] | Tokens"]  # (row, tokenizer info) -> segments
    mode: str = "joined"


def require_text(row: dict, field: str) -> str:
    if field not in row or row[field] is None:
        raise RowError(field, "missing")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"expected text, got {type(value).__name__}")
    return value


def optional_text(row: dict, field: str, default: str = "") -> str:
    """A text field that may be absent or null (then `default`)."""
    value = row.get(field)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RowError(field, f"expected text, got {type(value).__name__}")
    return value


def prompt_then_response(tokenizer: dict, prompt: str, response: str, eos_count: int = 1) -> list[tuple[str, bool]]:
    """BOS (when the tokenizer adds one) and the prompt masked, the response and its EOS trained,
    as Axolotl's instruction strategies do (prompt encoded with BOS, response with EOS appended)."""
    bos = tokenizer["bos_token"] if tokenizer["adds_bos"] and tokenizer["bos_token"] else ""
    eos = tokenizer["eos_token"] or ""
    if eos and response.endswith(eos):  # an EOS already there counts as one of them
        eos_count -= 1
    return [(bos + prompt, False), (response + eos * max(eos_count, 0), True)]
