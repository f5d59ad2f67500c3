"""tokenize_preference: one preference or reward dataset's rendered strings turned into token ids.

Reads format_preference's `pairs.arrow` and the tokenizer (`tokenizer.json`, through the
`tokenizers` library). Writes `tokenized.arrow` with the strings kept (what `molt preprocess`
leaves for inspection and what TRL's ORPO / CPO trainers tokenize themselves) and the ids TRL's
DPO, KTO and reward trainers take:
    paired    prompt, chosen, rejected, prompt_ids, chosen_ids, rejected_ids
    unpaired  prompt, completion, label, prompt_ids, completion_ids
    steps     prompt, completions, labels, input_ids, token_labels (PRM: each step's last token
              carries its label, every other token -100)
and the source `row`. The ids are TRL's: the prompt and prompt + answer (with EOS appended when
the answer does not end with it) encoded whole, with the tokenizer's BOS unless the text starts
with it, the answer starting where the two diverge. The
prompt keeps its last `max_prompt_len` tokens; prompt + answer its first `sequence_len`; a row
whose prompt alone fills `sequence_len` is dropped and counted (no answer token would be left).
"""

from __future__ import annotations

from pathlib import Path

from stages import origin
from stages.config import dataset_params, stage_params
from stages.context import QUIET, Context
from stages.store import DataError, read_table, write_table

SCHEMA = 1
LIBRARIES = ("tokenizers", "pyarrow")
PER_DATASET = True
INPUTS = {"pairs": "format_preference", "tokenizer": "tokenizer"}
IGNORE = -100

Spec = dataset_params("Spec", "step_separator", "max_completion_length", "train_on_last_step_only")
Params = stage_params("sequence_len", "max_prompt_len", dataset=Spec)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _answers(encode, eos: str, prompt: str, answers: list[str], params: Params) -> tuple[list[int], list[list[int]]] | None:
    """(prompt ids, answer ids...) as TRL splits them; None when the prompt leaves no room."""
    prompt_ids = encode(prompt)
    full = [encode(prompt + (a if not eos or a.endswith(eos) else a + eos)) for a in answers]
    cut = min(common_prefix(prompt_ids, f) for f in full)
    prompt_ids, answer_ids = prompt_ids[:cut], [f[cut:] for f in full]
    prompt_ids = prompt_ids[-params.max_prompt_len:]
    if len(prompt_ids) >= params.sequence_len:
        return None
    room = params.sequence_len - len(prompt_ids)
    return prompt_ids, [ids[:room] for ids in answer_ids]


def _steps(encode_plain, bos_id: int | None, prompt: str, completions: list[str], labels: list[bool], params: Params) -> tuple[list[int], list[int]] | None:
    """A PRM row: prompt, then each step and the separator; a step's last token holds its label."""
    spec = params.dataset
    separator = encode_plain(spec.step_separator)
    prompt_ids = ([bos_id] if bos_id is not None else []) + encode_plain(prompt)
    step_ids = [encode_plain(c) + separator for c in completions]
    step_labels = [[IGNORE] * (len(ids) - 1) + [int(label)] for ids, label in zip(step_ids, labels)]
    if spec.train_on_last_step_only:
        step_labels = [[IGNORE] * len(s) for s in step_labels[:-1]] + step_labels[-1:]
    completion_ids = [t for ids in step_ids for t in ids]
    completion_labels = [t for ls in step_labels for t in ls]
    prompt_ids = prompt_ids[-params.max_prompt_len:]
    if spec.max_completion_length:
        completion_ids, completion_labels = completion_ids[:spec.max_completion_length], completion_labels[:spec.max_completion_length]
    ids, token_labels = (prompt_ids + completion_ids)[:params.sequence_len], ([IGNORE] * len(prompt_ids) + completion_labels)[:params.sequence_len]
    return (ids, token_labels) if any(t != IGNORE for t in token_labels) else None


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import json

    import pyarrow as pa
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(inputs["tokenizer"] / "tokenizer.json"))
    info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    eos = info["eos_token"] or ""
    bos_id = tokenizer.token_to_id(info["bos_token"]) if info["adds_bos"] and info["bos_token"] else None
    table = read_table(inputs["pairs"] / "pairs.arrow")
    names = set(table.column_names)
    ids = pa.list_(pa.int32())

    bos = info["bos_token"] if info["adds_bos"] else None

    def encode(text: str) -> list[int]:
        # the tokenizer's own BOS, unless the chat template already wrote it (llama3's does)
        return tokenizer.encode(text, add_special_tokens=bool(bos) and not text.startswith(bos)).ids

    def encode_plain(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    kept, dropped, first_dropped = [], 0, None
    columns: dict[str, list] = {}
    with ctx.progress("tokenize pairs", table.num_rows) as advance:
        for i, row in enumerate(table.to_pylist()):
            if "chosen" in names:
                made = _answers(encode, eos, row["prompt"], [row["chosen"], row["rejected"]], params)
                values = made and {"prompt_ids": made[0], "chosen_ids": made[1][0], "rejected_ids": made[1][1]}
            elif "completion" in names:
                made = _answers(encode, eos, row["prompt"], [row["completion"]], params)
                values = made and {"prompt_ids": made[0], "completion_ids": made[1][0]}
            else:
                if len(row["completions"]) != len(row["labels"]):
                    raise DataError(f"{origin.where(inputs['pairs'], row['row'])}: {len(row['completions'])} completions but {len(row['labels'])} labels")
                made = _steps(encode_plain, bos_id, row["prompt"], row["completions"], row["labels"], params)
                values = made and {"input_ids": made[0], "token_labels": made[1]}
            if values is None:
                dropped += 1
                first_dropped = row["row"] if first_dropped is None else first_dropped
            else:
                kept.append(i)
                for k, v in values.items():
                    columns.setdefault(k, []).append(v)
            advance(1)
    if dropped:
        ctx.log(f"dropped {dropped} of {table.num_rows} rows whose prompt fills sequence_len {params.sequence_len} "
                f"(first: {origin.where(inputs['pairs'], first_dropped)}); raise sequence_len or lower max_prompt_len")
    strings = table.take(pa.array(kept, type=pa.int64()))
    result = strings.drop_columns(["row"])
    for k in _columns_for(names):
        result = result.append_column(k, pa.array(columns.get(k, []), type=ids))
    result = result.append_column("row", strings.column("row"))
    write_table(result, out / "tokenized.arrow")
    return {"rows": result.num_rows, "dropped": dropped}


def _columns_for(names: set[str]) -> tuple[str, ...]:
    if "chosen" in names:
        return ("prompt_ids", "chosen_ids", "rejected_ids")
    if "completion" in names:
        return ("prompt_ids", "completion_ids")
    return ("input_ids", "token_labels")
