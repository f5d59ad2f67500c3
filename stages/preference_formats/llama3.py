"""llama3.*: the chatml.* types (the same loaders and row shapes, listed in chatml.py) rendered
with the built-in llama3 template unless the config chooses a chat_template (see shapes.chat).
With it an answer ends in `<|eot_id|>`, as Axolotl's llama3 strings do."""

from __future__ import annotations

from stages.preference_formats import chatml, shapes


def build(loader: str, spec, method: str) -> shapes.Formatter:
    return chatml.build(loader, spec, method, family="llama3")
