"""format: one dataset's rows rendered by its prompt strategy into text segments.

Reads the fetched rows (`data.arrow`) and the tokenizer's `molt_tokenizer.json` (chat template,
special token strings). Writes `formatted.arrow`: per row, `segments` (text, trained?, from a
training detail?), how tokenize encodes them (`mode`: joined / separate / prefix / chunk /
tokens), `input_ids` and `labels` for pretokenized rows, and the source `row` number; the fetched
`origin.arrow` is copied along, so an error names a row's file and line.
`dataset_processes` worker processes share the rows (same bytes for any number).

`type:` names a prompt strategy the way Axolotl does: `alpaca`, `alpaca:chatml` (a prompt style),
`alpaca_chat.load_qa` (a loader of a strategy), a mapping (a user-defined prompt) or nothing
(pretokenized rows). The name resolves to one module in stages/formats/ (several Axolotl names
share a module, see ALIASES), and only that module is in this stage's code fingerprint, so
editing one strategy reformats only the datasets that use it.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from jinja2 import TemplateError

from stages import chat_templates, origin, workers
from stages.chat_templates import TemplateChoiceError, TemplateSourceError
from stages.config import dataset_params, stage_params
from stages.formats.rows import MODES, Kind, RowError, Segment, Tokens, UnknownKind
from stages.store import DataError, read_table, write_table
from stages.context import QUIET, Context

SCHEMA = 3
LIBRARIES = ("pyarrow", "jinja2", "pyyaml")
PER_DATASET = True
INPUTS = {"data": "fetch_data", "tokenizer": "tokenizer"}
BATCH = 1024
FORMATS_DIR = Path(__file__).resolve().parent / "formats"
HELPERS = frozenset({"__init__", "rows"})  # modules of stages/formats/ that are not strategies
# Axolotl type names served by a module of another name
ALIASES = {
    **dict.fromkeys(
        ("jeopardy", "oasst", "gpteacher", "reflection", "explainchoice", "concisechoice", "summarizetldr",
         "alpaca_chat", "alpaca_w_system", "context_qa", "metharme", "user_defined"),
        "alpaca",
    ),
    **dict.fromkeys(("input_output", "completion", "pretokenized"), "raw"),
}


Spec = dataset_params(
    "Spec", "type", "field", "conversation", "field_messages", "message_field_role", "message_field_content", "message_property_mappings",
    "message_field_training", "message_field_training_detail", "roles", "roles_to_train", "train_on_eos", "chat_template",
    "chat_template_jinja", "default_system_message", "drop_system_message", "field_thinking", "template_thinking_key",
)
# dataset_processes: how many worker processes; the output is the same for any number, so it is not in the key
Params = stage_params("eot_tokens", unkeyed=("dataset_processes",), dataset=Spec)


def strategies() -> list[str]:
    return sorted(p.stem for p in FORMATS_DIR.glob("*.py") if p.stem not in HELPERS)


def parse_type(value) -> Kind:
    """`type:` as (name, loader, style): `a.load_x:style` -> (a, load_x, style)."""
    if isinstance(value, dict):
        return Kind("user_defined")
    if value in (None, ""):
        return Kind("pretokenized")
    if not isinstance(value, str):
        raise DataError(f"dataset type {value!r}: expected a name or a mapping")
    name, _, style = value.partition(":")
    loader = "load"
    base, _, last = name.rpartition(".")
    if base and last.startswith("load"):
        name, loader = base, last
    return Kind(name, loader, style or None)


def resolve(spec: Spec) -> tuple[str, Kind]:
    """(module, kind) for a dataset's `type:`; unknown names are refused with the known ones."""
    kind = parse_type(spec.type)
    module = ALIASES.get(kind.name, kind.name)
    if module not in strategies():
        import difflib

        modules = [m for m in strategies() if m not in ALIASES.values() or m == "alpaca"]
        shared = sorted(k for k, v in ALIASES.items() if v == "alpaca" and k != "user_defined")
        close = difflib.get_close_matches(kind.name, modules + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(
            f"dataset type {spec.type!r}: unknown type {kind.name!r}{hint}; molt formats: {', '.join(modules)}, "
            f"input_output, completion, pretokenized (empty type), a user-defined mapping, and alpaca's relatives {', '.join(shared)}"
        )
    return f"stages.formats.{module}", kind


def code_modules(params: Params) -> list[str]:
    formatter(params.dataset)  # an unknown loader, prompt style or user-defined key stops at plan time
    return [resolve(params.dataset)[0]]


def sources(params: Params) -> list[tuple[str, Path]]:
    """The built-in chat template a dataset names for itself (the top-level one is the tokenizer's)."""
    path = chat_templates.template_file(params.dataset.chat_template)
    return [(f"chat_template {path.stem}", path)] if path else []


def formatter(spec: Spec):
    module, kind = resolve(spec)
    if spec.conversation is not None and module != "stages.formats.alpaca":
        raise DataError(f"dataset type {spec.type!r}: conversation: {spec.conversation!r} only picks the prompt style of `type: alpaca_chat`"
                        + ("; a chat template is chosen with chat_template:" if kind.name == "chat_template" else ""))
    try:
        made = importlib.import_module(module).build(kind, spec)
    except UnknownKind as error:
        raise DataError(f"dataset type {spec.type!r}: {error}") from None
    assert made.mode in MODES, made.mode
    return made


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import pyarrow as pa

    spec = params.dataset
    formatter(spec)  # a bad type stops here, before any worker starts
    rows = read_table(inputs["data"] / "data.arrow").num_rows
    label = spec.type if isinstance(spec.type, str) and spec.type else "user-defined" if spec.type else "pretokenized"
    with ctx.progress(f"format {label}", rows) as advance:
        parts = workers.map_ranges(_format_rows, rows, workers.processes_for(rows, params.dataset_processes),
                                   (spec, params.eot_tokens, inputs["data"], inputs["tokenizer"]), advance,
                                   probe=params.dataset_processes is None, forkable=True)  # jinja and pyarrow only
    result = pa.concat_tables(parts)
    write_table(result, out / "formatted.arrow")
    if (inputs["data"] / origin.FILE).is_file():  # tokenize names a row's file and line from it
        shutil.copyfile(inputs["data"] / origin.FILE, out / origin.FILE)
    return {"rows": result.num_rows}


def _format_rows(start: int, stop: int, spec: Spec, eot_tokens: list[str] | None, data: Path, tokenizer_dir: Path, advance=None):
    """Rows [start, stop) of the fetched table, formatted (in a worker process or in the stage's own)."""
    import pyarrow as pa

    made = formatter(spec)
    tokenizer = json.loads((tokenizer_dir / "molt_tokenizer.json").read_text()) | {"eot_tokens": eot_tokens}
    table = read_table(data / "data.arrow").slice(start, stop - start)
    texts: list[str] = []  # the segments column, flat: one entry a segment
    trained: list[bool] = []
    details: list[bool] = []
    ends = [0]  # where each row's segments end
    ids: list = []
    labels: list = []
    for offset in range(0, table.num_rows, BATCH):
        for i, row in enumerate(table.slice(offset, BATCH).to_pylist(), start + offset):
            try:
                result = made.row(row, tokenizer)
            except RowError as error:
                raise DataError(f"{origin.where(data, i)}: {error}") from None
            except TemplateSourceError as error:  # the template's fault, not the row's
                raise DataError(str(error)) from None
            except (TemplateChoiceError, TemplateError) as error:
                raise DataError(f"{origin.where(data, i)}: chat template: {error}") from None
            if isinstance(result, Tokens):
                ids.append(result.input_ids)
                labels.append(result.labels)
            else:
                for piece in result:
                    text, train, detail = Segment(*piece)
                    texts.append(text)
                    trained.append(train)
                    details.append(detail)
                ids.append(None)
                labels.append(None)
            ends.append(len(texts))
        if advance:
            advance(min(BATCH, table.num_rows - offset))
    segment = pa.StructArray.from_arrays([pa.array(texts, pa.string()), pa.array(trained, pa.bool_()), pa.array(details, pa.bool_())],
                                         names=["text", "train", "detail"])
    return pa.table({
        "segments": pa.ListArray.from_arrays(pa.array(ends, pa.int32()), segment),
        "mode": pa.array([made.mode] * table.num_rows, type=pa.string()),
        "input_ids": pa.array(ids, type=pa.list_(pa.int64())),
        "labels": pa.array(labels, type=pa.list_(pa.int64())),
        "row": pa.array(range(start, stop), type=pa.int64()),
    })
