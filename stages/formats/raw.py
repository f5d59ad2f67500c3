"""raw: template-free rows. `input_output` (a list of `segments`, each `text` with a boolean
`label`: trained or not; each segment is encoded on its own, with no BOS or EOS added),
`completion` (the text of `field`, default `text`, trained whole with BOS and EOS, long texts
split into `sequence_len` pieces by tokenize; unlike Axolotl, which truncates each text at
64 x sequence_len tokens, no text is cut short) and `pretokenized` (an empty `type:`: rows hold
`input_ids`, optional `labels` and `attention_mask`)."""

from __future__ import annotations

from stages.formats.rows import Formatter, Kind, RowError, Tokens, UnknownKind, require_text


def _input_output(row: dict, tokenizer: dict) -> list[tuple[str, bool]]:
    segments = row.get("segments")
    if segments is None:
        raise RowError("segments", "missing")
    if not isinstance(segments, list) or not segments:
        raise RowError("segments", "expected a non-empty list of {text, label} objects")
    out = []
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict):
            raise RowError(f"segments[{i}]", f"expected an object with text and label, got {type(segment).__name__}")
        text = segment.get("text")
        if not isinstance(text, str):
            raise RowError(f"segments[{i}].text", "missing" if text is None else f"expected text, got {type(text).__name__}")
        label = segment.get("label")
        if not isinstance(label, bool):
            raise RowError(f"segments[{i}].label", f"expected true or false, got {label!r}")
        out.append((text, label))
    return out


def _completion(field: str):
    def row_fn(row: dict, tokenizer: dict) -> list[tuple[str, bool]]:
        bos = tokenizer["bos_token"] if tokenizer["adds_bos"] and tokenizer["bos_token"] else ""
        eos = tokenizer["eos_token"] or ""
        text = require_text(row, field)
        return [(bos + text + ("" if eos and text.endswith(eos) else eos), True)]

    return row_fn


def _int_list(row: dict, field: str, required: bool) -> list[int] | None:
    value = row.get(field)
    if value is None:
        if required:
            raise RowError(field, "missing (a pretokenized dataset, `type:` left empty, needs input_ids)")
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RowError(field, "expected a list of integers")
    return value


def _pretokenized(row: dict, tokenizer: dict) -> Tokens:
    ids = _int_list(row, "input_ids", True)
    if not ids:
        raise RowError("input_ids", "empty")
    if any(i < 0 for i in ids):
        raise RowError("input_ids", "negative token id")
    labels = _int_list(row, "labels", False)
    if labels is None:
        labels = list(ids)
    elif len(labels) != len(ids):
        raise RowError("labels", f"{len(labels)} labels for {len(ids)} input_ids")
    elif any(label < 0 and label != -100 for label in labels):
        raise RowError("labels", "a negative label other than -100")
    mask = _int_list(row, "attention_mask", False)
    if mask is not None:
        if len(mask) != len(ids):
            raise RowError("attention_mask", f"{len(mask)} values for {len(ids)} input_ids")
        if any(m not in (0, 1) for m in mask):
            raise RowError("attention_mask", "values must be 0 or 1")
    return Tokens(ids, labels)


def build(kind: Kind, spec) -> Formatter:
    if kind.style or kind.loader != "load":
        raise UnknownKind(f"{kind.name} takes no loader or prompt style")
    if kind.name == "input_output":
        return Formatter(_input_output, "separate")
    if kind.name == "completion":
        return Formatter(_completion(spec.field or "text"), "chunk")
    if kind.name == "pretokenized":
        return Formatter(_pretokenized, "tokens")
    raise UnknownKind(f"unknown type {kind.name!r}")
