"""alpaca: `instruction` / `input` / `output` rows in the Stanford Alpaca prompt; the response
(and EOS) is trained, the prompt is not."""

from __future__ import annotations

from stages.formats.rows import RowError, require_text

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_row(row: dict, spec, tokenizer: dict) -> list[tuple[str, bool]]:
    instruction = require_text(row, "instruction")
    output = require_text(row, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("input", f"expected text, got {type(extra).__name__}")
    prompt = PROMPT_INPUT.format(instruction=instruction, input=extra) if extra else PROMPT_NO_INPUT.format(instruction=instruction)
    bos = tokenizer["bos_token"] if tokenizer["adds_bos"] else ""
    return [(bos + prompt, False), (output + tokenizer["eos_token"], True)]
