"""format_preference: one preference or reward dataset's rows rendered into prompt / answer text.

Reads the fetched rows (`data.arrow`) and the tokenizer's `molt_tokenizer.json` (chat template,
special tokens). Writes `pairs.arrow`: per row the strings TRL's trainers take, rendered with the
chat template — `prompt`, `chosen`, `rejected` (DPO, IPO, SimPO, ORPO, reward models), `prompt`,
`completion`, `label` (KTO) or `prompt`, `completions`, `labels` (process reward models) — and
the source `row`; `origin.arrow` is copied along so later errors name a row's file and line.
This is what `molt preprocess` leaves under dataset_prepared_path for these configs.

`type:` names an Axolotl preference type, `<module>.<loader>` (`chatml.intel`, `zephyr.nectar`,
`chat_template.default`, a mapping for user_defined.default, `stepwise_supervised`); the module
is one file of stages/preference_formats/, and only that file is in this stage's fingerprint.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from jinja2 import TemplateError

from stages import chat_templates, origin, workers
from stages.chat_templates import TemplateChoiceError, TemplateSourceError
from stages.config import dataset_params, stage_params
from stages.context import QUIET, Context
from stages.formats.rows import RowError, UnknownKind
from stages.store import DataError, read_table, write_table

SCHEMA = 1
LIBRARIES = ("pyarrow", "jinja2")
PER_DATASET = True
INPUTS = {"data": "fetch_data", "tokenizer": "tokenizer"}
BATCH = 1024
FORMATS_DIR = Path(__file__).resolve().parent / "preference_formats"
HELPERS = frozenset({"__init__", "shapes"})  # modules there that are not types
KINDS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"), "steps": ("prompt", "completions", "labels")}

Spec = dataset_params(
    "Spec", "type", "field_messages", "field_chosen", "field_rejected", "message_property_mappings", "roles",
    "chat_template", "chat_template_jinja",
)
Params = stage_params("rl", "reward_model", "process_reward_model", unkeyed=("dataset_processes",), dataset=Spec)


def method(params) -> str:
    """What the rows train: paired answers, unpaired ones with a label (KTO), or labelled steps (PRM)."""
    if params.process_reward_model:
        return "steps"
    return "unpaired" if params.rl == "kto" else "paired"


def types() -> list[str]:
    return sorted(p.stem for p in FORMATS_DIR.glob("*.py") if p.stem not in HELPERS)


def resolve(spec) -> tuple[str, str]:
    """(module, loader) for a dataset's `type:`: `chatml.intel` -> (chatml, intel)."""
    if isinstance(spec.type, dict):
        return "stages.preference_formats.user_defined", "default"
    if not isinstance(spec.type, str) or not spec.type:
        raise DataError(f"dataset type {spec.type!r}: preference and reward data need a type, e.g. chatml.intel, "
                        "chat_template.default or a mapping (user_defined.default)")
    name, _, loader = spec.type.partition(".")
    if name not in types():
        raise DataError(f"dataset type {spec.type!r}: unknown preference type {name!r}; molt's: "
                        + ", ".join(f"{t}.*" for t in types()) + ", or a mapping (user_defined.default)")
    return f"stages.preference_formats.{name}", loader or "default"


def formatter(params):
    module, loader = resolve(params.dataset)
    try:
        return importlib.import_module(module).build(loader, params.dataset, method(params))
    except UnknownKind as error:
        raise DataError(f"dataset type {params.dataset.type!r}: {error}") from None


def code_modules(params: Params) -> list[str]:
    formatter(params)  # an unknown type or loader stops at plan time
    return [resolve(params.dataset)[0]]


# type families that render with their own built-in template when the config names none
FAMILY_TEMPLATES = ("chatml", "llama3", "zephyr")


def sources(params: Params) -> list[tuple[str, Path]]:
    """The built-in chat template a dataset names for itself, or its type family's (the top-level
    one is in the tokenizer's artifact)."""
    family = params.dataset.type.partition(".")[0] if isinstance(params.dataset.type, str) else None
    path = chat_templates.template_file(params.dataset.chat_template or (family if family in FAMILY_TEMPLATES else None))
    return [(f"chat_template {path.stem}", path)] if path else []


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import pyarrow as pa

    formatter(params)  # a bad type stops here, before any worker starts
    rows = read_table(inputs["data"] / "data.arrow").num_rows
    with ctx.progress(f"format {params.dataset.type if isinstance(params.dataset.type, str) else 'user-defined'}", rows) as advance:
        parts = workers.map_ranges(_format_rows, rows, workers.processes_for(rows, params.dataset_processes),
                                   (params, inputs["data"], inputs["tokenizer"]), advance,
                                   probe=params.dataset_processes is None)
    result = pa.concat_tables(parts)
    write_table(result, out / "pairs.arrow")
    if (inputs["data"] / origin.FILE).is_file():
        shutil.copyfile(inputs["data"] / origin.FILE, out / origin.FILE)
    return {"rows": result.num_rows}


def _format_rows(start: int, stop: int, params, data: Path, tokenizer_dir: Path, advance=None):
    import json

    import pyarrow as pa

    made = formatter(params)
    columns = KINDS[method(params)]
    tokenizer = json.loads((tokenizer_dir / "molt_tokenizer.json").read_text())
    table = read_table(data / "data.arrow").slice(start, stop - start)
    values: dict[str, list] = {c: [] for c in columns}
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
            for c in columns:
                values[c].append(result[c])
        if advance:
            advance(min(BATCH, table.num_rows - offset))
    types = {"label": pa.bool_(), "completions": pa.list_(pa.string()), "labels": pa.list_(pa.bool_())}
    arrays = {c: pa.array(values[c], type=types.get(c, pa.string())) for c in columns}
    return pa.table({**arrays, "row": pa.array(range(start, stop), type=pa.int64())})
