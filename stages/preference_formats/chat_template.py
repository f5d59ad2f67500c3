"""chat_template.*: preference rows rendered with the chat template (the dataset's chat_template,
else the tokenizer's), roles mapped by `roles:` and message keys by message_property_mappings.

Paired (DPO, IPO, SimPO, ORPO) rows:
    default       field_messages: the conversation before the answers (a string: one user turn);
                  field_chosen / field_rejected: each a string, an assistant message or a
                  conversation whose last message is the answer
    argilla_chat  field_chosen / field_rejected: conversations; the prompt is the chosen one's
                  turns before its last
    argilla       (ORPO's) system?, prompt?, chosen / rejected: conversations the same up to their
                  last assistant turn; `prompt`, when given, is the user turn of a single-turn one
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes


def _default(spec, r, tokenizer):
    field = spec.field_messages
    raw = r.get(field)
    history = [{"role": "user", "content": raw}] if isinstance(raw, str) else shapes.conversation(r, field, spec)
    chosen, rejected = shapes.answer(r, spec.field_chosen, spec), shapes.answer(r, spec.field_rejected, spec)
    return shapes.paired(shapes.chat(spec, tokenizer), history, chosen, rejected, (field, spec.field_chosen, spec.field_rejected))


def _argilla_chat(spec, r, tokenizer):
    history = shapes.conversation(r, spec.field_chosen, spec)[:-1]
    chosen, rejected = shapes.answer(r, spec.field_chosen, spec), shapes.answer(r, spec.field_rejected, spec)
    return shapes.paired(shapes.chat(spec, tokenizer), history, chosen, rejected, (spec.field_chosen, spec.field_chosen, spec.field_rejected))


def _argilla(spec, r, tokenizer):
    chosen_turns, rejected_turns = shapes.conversation(r, "chosen", spec), shapes.conversation(r, "rejected", spec)
    if chosen_turns[:-1] != rejected_turns[:-1]:
        raise shapes.RowError("rejected", "its turns before the answer differ from chosen's (both continue one conversation)")
    history = chosen_turns[:-1]
    prompt = shapes.optional_text(r, "prompt")
    if prompt and len(history) == 1 and history[0]["role"] == "user":
        history = [{"role": "user", "content": prompt}]
    system = shapes.optional_text(r, "system")
    if system and not (history and history[0]["role"] == "system"):
        history = [{"role": "system", "content": system}, *history]
    chosen, rejected = shapes.answer(r, "chosen", spec), shapes.answer(r, "rejected", spec)
    return shapes.paired(shapes.chat(spec, tokenizer), history, chosen, rejected, ("chosen", "chosen", "rejected"))


LOADERS = {"paired": {"default": _default, "argilla_chat": _argilla_chat, "argilla": _argilla}}


def build(loader: str, spec, method: str) -> shapes.Formatter:
    return shapes.Formatter(partial(shapes.pick("chat_template", LOADERS, loader, method), spec))
