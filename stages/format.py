"""format: one dataset's rows rendered by its prompt strategy into text segments.

Reads the fetched rows (`data.arrow`) and the tokenizer's `molt_tokenizer.json` (chat template,
special token strings). Writes `formatted.arrow`: per row, `segments` (text, trained?) and the
source `row` number. The prompt strategy module for the dataset's `type` is part of this stage's
code fingerprint, so editing one strategy reformats only the datasets that use it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated

from jinja2 import TemplateError
from pydantic import BaseModel, BeforeValidator

from stages.chat_templates import TemplateChoiceError
from stages.formats.rows import RowError
from stages.store import DataError, read_table, write_table
from stages.ui import progress

SCHEMA = 1
LIBRARIES = ("pyarrow", "jinja2")
STRATEGIES = ("alpaca", "chat_template")
BATCH = 1024


def _or(default):
    return BeforeValidator(lambda v: default if v is None else v)


class Spec(BaseModel, frozen=True):
    type: str | dict | None = None
    field_messages: Annotated[str, _or("messages")] = "messages"
    message_property_mappings: Annotated[dict[str, str], _or({"role": "role", "content": "content"})] = {"role": "role", "content": "content"}
    message_field_training: str | None = None
    roles: dict[str, list[str] | str] | None = None
    roles_to_train: Annotated[list[str], _or(["assistant"])] = ["assistant"]
    train_on_eos: Annotated[str, _or("turn")] = "turn"
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    default_system_message: str | None = None


class Params(BaseModel, frozen=True):
    dataset: Spec


def strategy_name(spec: Spec) -> str:
    if not isinstance(spec.type, str) or not spec.type:
        raise DataError(f"dataset type {spec.type!r}: molt formats these types so far: {', '.join(STRATEGIES)}")
    name = spec.type
    if name not in STRATEGIES:
        raise DataError(f"dataset type {name!r}: unknown; molt formats these types so far: {', '.join(STRATEGIES)}")
    return name


def code_modules(params: Params) -> list[str]:
    return [f"stages.formats.{strategy_name(params.dataset)}"]


def run(params: Params, inputs: dict[str, Path], out: Path) -> dict:
    import pyarrow as pa

    spec = params.dataset
    strategy = importlib.import_module(code_modules(params)[0])
    tokenizer = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    table = read_table(inputs["data"] / "data.arrow")
    segments: list = []
    with progress(f"format {spec.type}", table.num_rows) as advance:
        for offset in range(0, table.num_rows, BATCH):
            for i, row in enumerate(table.slice(offset, BATCH).to_pylist(), offset):
                try:
                    segments.append([{"text": t, "train": trained} for t, trained in strategy.format_row(row, spec, tokenizer)])
                except RowError as error:
                    raise DataError(f"row {i}: {error}") from None
                except (TemplateChoiceError, TemplateError) as error:
                    raise DataError(f"row {i}: chat template: {error}") from None
            advance(min(BATCH, table.num_rows - offset))
    segment_type = pa.list_(pa.struct([("text", pa.string()), ("train", pa.bool_())]))
    result = pa.table({"segments": pa.array(segments, type=segment_type), "row": pa.array(range(table.num_rows), type=pa.int64())})
    write_table(result, out / "formatted.arrow")
    return {"rows": result.num_rows}
