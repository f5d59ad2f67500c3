"""chatml.*: Axolotl's preference types written for one template, rendered with the built-in
chatml template unless the config chooses a chat_template (see shapes.chat). llama3.py is their
twin: the same row shapes with the llama3 template.

Paired (DPO, IPO, SimPO, ORPO) rows:
    argilla       system?, instruction, chosen_response, rejected_response
    argilla_chat  chosen: [user, assistant], rejected: [user, assistant]; the prompt is chosen's
                  turns before its last (rejected's are not read, as in Axolotl)
    icr           system?, input, chosen, rejected
    intel         system?, question, chosen, rejected
    prompt_pairs  system?, prompt, chosen, rejected
    ultra         system?, prompt, chosen / rejected: [user, assistant] whose last turn is the answer
    default       (`type: chatml`) the first column of prompt, input, question, instruction; chosen
                  or chosen_response; rejected or rejected_response
Unpaired (KTO) rows, each with label: true or false:
    argilla       system?, instruction, completion
    argilla_chat  completion: [user, assistant] (or, as the guide shows it, chosen: [user] and
                  completion: [assistant])
    intel         system?, question, completion
    prompt_pairs  system?, prompt, completion
    ultra         system?, prompt, completion

Axolotl documents chatml.argilla but does not ship it: it is built as documented. An answer may
also be a message or a conversation (its last message), whatever the type.
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes


def _pair(prompt_field: str, chosen_field: str = "chosen", rejected_field: str = "rejected"):
    def row(family, spec, r, tokenizer):
        history = shapes.single_turn(r, prompt_field)
        chosen, rejected = shapes.answer(r, chosen_field, spec), shapes.answer(r, rejected_field, spec)
        return shapes.paired(shapes.chat(spec, tokenizer, family), history, chosen, rejected, (prompt_field, chosen_field, rejected_field))
    return row


def _default(family, spec, r, tokenizer):
    # Axolotl's key guessing, in its order
    prompt_field = next((f for f in ("prompt", "input", "question") if f in r), "instruction")
    chosen_field = "chosen" if "chosen" in r else "chosen_response"
    rejected_field = "rejected" if "rejected" in r else "rejected_response"
    return _pair(prompt_field, chosen_field, rejected_field)(family, spec, r, tokenizer)


def _argilla_chat(family, spec, r, tokenizer):
    history = shapes.conversation(r, "chosen", spec)[:-1]
    chosen, rejected = shapes.answer(r, "chosen", spec), shapes.answer(r, "rejected", spec)
    return shapes.paired(shapes.chat(spec, tokenizer, family), history, chosen, rejected, ("chosen", "chosen", "rejected"))


def _completion(prompt_field: str):
    def row(family, spec, r, tokenizer):
        history = shapes.single_turn(r, prompt_field)
        completion, label = shapes.answer(r, "completion", spec), shapes.require_label(r)
        return shapes.unpaired(shapes.chat(spec, tokenizer, family), history, completion, label, (prompt_field, "completion"))
    return row


def _kto_argilla_chat(family, spec, r, tokenizer):
    turns = shapes.conversation(r, "completion", spec)
    history = turns[:-1] if len(turns) > 1 or r.get("chosen") is None else shapes.conversation(r, "chosen", spec)
    completion, label = shapes.answer(r, "completion", spec), shapes.require_label(r)
    return shapes.unpaired(shapes.chat(spec, tokenizer, family), history, completion, label, ("completion", "completion"))


LOADERS = {
    "paired": {
        "argilla": _pair("instruction", "chosen_response", "rejected_response"), "argilla_chat": _argilla_chat,
        "icr": _pair("input"), "intel": _pair("question"), "prompt_pairs": _pair("prompt"), "ultra": _pair("prompt"),
        "default": _default,
    },
    "unpaired": {
        "argilla": _completion("instruction"), "argilla_chat": _kto_argilla_chat, "intel": _completion("question"),
        "prompt_pairs": _completion("prompt"), "ultra": _completion("prompt"),
    },
}


def build(loader: str, spec, method: str, family: str = "chatml") -> shapes.Formatter:
    return shapes.Formatter(partial(shapes.pick(family, LOADERS, loader, method), family, spec))
