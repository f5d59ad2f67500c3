"""user_defined.default: a mapping `type:` that names the row's fields and the formats their text
fills (Python str.format), as Axolotl's user-defined DPO and KTO types. No chat template: the
prompt and answers are exactly the filled formats.

Paired (DPO, IPO, SimPO, ORPO) keys, with their defaults:
    field_prompt: prompt, field_system: system, field_chosen: chosen, field_rejected: rejected,
    prompt_format: "{prompt}" (may also use {system}), chosen_format: "{chosen}", rejected_format: "{rejected}"
Unpaired (KTO) keys:
    field_prompt, field_system, field_completion: completion, field_label: label (true or false),
    prompt_format, completion_format: "{completion}"
An unset or empty format is its default; {system} is empty for a row without one.
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes
from stages.formats.rows import UnknownKind

DEFAULTS = {
    "paired": {"field_prompt": "prompt", "field_system": "system", "field_chosen": "chosen", "field_rejected": "rejected",
               "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"},
    "unpaired": {"field_prompt": "prompt", "field_system": "system", "field_completion": "completion", "field_label": "label",
                 "prompt_format": "{prompt}", "completion_format": "{completion}"},
}
PLACEHOLDERS = {"prompt_format": ("prompt", "system"), "chosen_format": ("chosen",), "rejected_format": ("rejected",),
                "completion_format": ("completion",)}


def settings(spec, method: str) -> dict[str, str]:
    given = spec.type if isinstance(spec.type, dict) else {}
    defaults = DEFAULTS[method]
    unknown = sorted(set(given) - set(defaults))
    if unknown:  # a key of another method, or of the SFT user-defined type, would silently do nothing
        raise UnknownKind(f"user_defined for {shapes.METHODS[method]} takes {', '.join(defaults)}, not {', '.join(unknown)}")
    chosen = {k: given.get(k) or v for k, v in defaults.items()}
    for key, names in PLACEHOLDERS.items():
        if key in chosen:
            try:
                chosen[key].format(**dict.fromkeys(names, ""))
            except (KeyError, IndexError, ValueError) as error:
                raise UnknownKind(f"{key} {chosen[key]!r}: not a format of {', '.join('{' + n + '}' for n in names)} ({error})") from None
    return chosen


def _prompt(s: dict, r: dict) -> str:
    prompt = shapes.require_text(r, s["field_prompt"])
    if not prompt.strip():
        raise shapes.RowError(s["field_prompt"], "empty prompt")
    return s["prompt_format"].format(prompt=prompt, system=shapes.optional_text(r, s["field_system"]))


def _paired(s, r, tokenizer):
    prompt = _prompt(s, r)
    chosen = s["chosen_format"].format(chosen=shapes.require_text(r, s["field_chosen"]))
    rejected = s["rejected_format"].format(rejected=shapes.require_text(r, s["field_rejected"]))
    shapes.distinct(chosen, rejected, s["field_chosen"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _unpaired(s, r, tokenizer):
    prompt = _prompt(s, r)
    completion = s["completion_format"].format(completion=shapes.require_text(r, s["field_completion"]))
    return {"prompt": prompt, "completion": completion, "label": shapes.require_label(r, s["field_label"])}


LOADERS = {"paired": {"default": _paired}, "unpaired": {"default": _unpaired}}


def build(loader: str, spec, method: str) -> shapes.Formatter:
    row = shapes.pick("user_defined", LOADERS, loader, method)
    return shapes.Formatter(partial(row, settings(spec, method)))
