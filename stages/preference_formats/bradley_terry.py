"""bradley_terry.chat_template: reward-model pairs (`reward_model: true`) rendered with the chat
template (the dataset's chat_template, else the tokenizer's).

Row (single turn): system?, input, chosen, rejected, e.g. argilla/distilabel-intel-orca-dpo-pairs.
The reward model scores the prompt followed by each answer.
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes


def _chat_template(spec, r, tokenizer):
    history = shapes.single_turn(r, "input")
    chosen, rejected = shapes.answer(r, "chosen", spec), shapes.answer(r, "rejected", spec)
    return shapes.paired(shapes.chat(spec, tokenizer), history, chosen, rejected, ("input", "chosen", "rejected"))


LOADERS = {"paired": {"chat_template": _chat_template}}


def build(loader: str, spec, method: str) -> shapes.Formatter:
    return shapes.Formatter(partial(shapes.pick("bradley_terry", LOADERS, loader, method), spec))
