"""stepwise_supervised: process reward model rows (`process_reward_model: true`), e.g.
trl-lib/math_shepherd.

Row: prompt (text), completions: [step, ...], labels: [true / false, ...], one label per step
and at least one step. No chat template is applied: as in Axolotl and TRL's PRM trainer, the
prompt and steps are trained as plain text (the steps joined by step_separator when tokenized).
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes


def _steps(spec, r, tokenizer):
    prompt = shapes.require_text(r, "prompt")
    if not prompt.strip():
        raise shapes.RowError("prompt", "empty prompt")
    completions, labels = r.get("completions"), r.get("labels")
    for field, value in (("completions", completions), ("labels", labels)):
        if not isinstance(value, list):
            raise shapes.RowError(field, "missing" if value is None else f"expected a list, got {type(value).__name__}")
    if not completions:
        raise shapes.RowError("completions", "no steps")
    if len(completions) != len(labels):
        raise shapes.RowError("labels", f"{len(labels)} labels for {len(completions)} steps (one label per step)")
    for i, (step, label) in enumerate(zip(completions, labels)):
        if not isinstance(step, str):
            raise shapes.RowError(f"completions[{i}]", f"expected text, got {type(step).__name__}")
        if not isinstance(label, bool):
            raise shapes.RowError(f"labels[{i}]", f"expected true or false, got {label!r}")
    return {"prompt": prompt, "completions": list(completions), "labels": list(labels)}


LOADERS = {"steps": {"default": _steps}}


def build(loader: str, spec, method: str) -> shapes.Formatter:
    return shapes.Formatter(partial(shapes.pick("stepwise_supervised", LOADERS, loader, method), spec))
