"""pygmalion: `conversations` of {role: system / human / bot, value} rows in Pygmalion's
`<|system|>Persona: ` / `<|user|> ` / `<|model|> ` prompt; each bot reply and its EOS are trained,
the `<|model|>` marker is not. As in Axolotl, each turn is encoded on its own, a bot turn with its
marker in one piece, and as many leading tokens masked as the marker has alone."""

from __future__ import annotations

from stages.formats.rows import Formatter, Kind, RowError, UnknownKind

PREFIX = {"system": "<|system|>Persona: ", "human": "<|user|> ", "bot": "<|model|>"}


def _row(row: dict, tokenizer: dict) -> list[tuple[str, bool]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("conversations", "expected a non-empty list of {role, value} objects" if turns is not None else "missing")
    bos = tokenizer["bos_token"] if tokenizer["adds_bos"] and tokenizer["bos_token"] else ""
    eos = tokenizer["eos_token"] or ""
    segments: list[tuple[str, bool]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}]", f"expected an object, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in PREFIX:
            raise RowError(f"conversations[{i}].role", f"unknown role {role!r} (known: system, human, bot)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowError(f"conversations[{i}].value", "missing" if value is None else f"expected text, got {type(value).__name__}")
        if role == "system":  # only the system part is encoded with BOS, as Axolotl does
            segments.append((bos + PREFIX[role] + value.removesuffix("\n<START>").strip(), False))
            continue
        value = value.strip()
        if role == "human":
            segments.append((PREFIX[role] + value, False))
        else:
            segments += [(PREFIX[role], False), (" " + value + ("" if eos and value.endswith(eos) else eos), True)]
    return segments


def build(kind: Kind, spec) -> Formatter:
    if kind.style or kind.loader != "load":
        raise UnknownKind("pygmalion takes no loader or prompt style")
    return Formatter(_row, "prefix")
