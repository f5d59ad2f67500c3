"""ref_logprobs: the reference model's log-probabilities of every answer, computed once.

Reads mix's `train.arrow` / `val.arrow` (tokenized preference rows), the fetched base model and
the tokenizer. Writes `train.arrow` / `val.arrow`: the same rows with the reference's summed
log-probs of each answer's tokens — `ref_chosen_logps`, `ref_rejected_logps` (DPO, IPO) or
`ref_logps`, `ref_KL_logps` with the mismatched `KL_completion_ids` (KTO) — the columns TRL's
trainers read instead of running a reference model (their `precompute_ref_log_probs` path).

The reference is the base model as train loads it (quantized for QLoRA: TRL's reference there is
the adapter switched off), or base + the adapter of `lora_model_dir` with `rl_adapter_ref_model`.
The key holds the model and the rows, not beta or the learning rate: changing those re-trains
without running the reference again. KTO's mismatched completions rotate within each
`micro_batch_size` batch, as TRL builds them, so for KTO that key is read too.
"""

from __future__ import annotations

from pathlib import Path

from stages.config import stage_params
from stages.context import QUIET, Context
from stages.store import DataError, list_files, read_table, write_table

SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl")
INPUTS = {"rows": "mix", "model": "fetch_model", "tokenizer": "tokenizer"}

Params = stage_params(
    "rl", "rl_adapter_ref_model", "lora_model_dir", "micro_batch_size", "trust_remote_code", "overrides_of_model_config",
    "overrides_of_model_kwargs", "resize_token_embeddings_to_32x", "load_in_4bit", "load_in_8bit", "bnb_config_kwargs",
    "bf16", "bfloat16", "float16",
)


def sources(params: Params) -> list[tuple[str, Path]]:
    if not (params.rl_adapter_ref_model and params.lora_model_dir):
        return []
    root = Path(params.lora_model_dir)
    if not root.is_dir():
        raise DataError(f"lora_model_dir {root}: not a directory")
    return [(f"lora_model_dir/{p.relative_to(root).as_posix()}", p) for p in list_files(root)]


def kl_completions(completions: list[list[int]], batch: int) -> list[list[int]]:
    """Each row's completion replaced by its predecessor's within its batch (the first by the
    batch's last), as TRL's KTO estimates its KL term from mismatched pairs."""
    out = []
    for start in range(0, len(completions), batch):
        part = completions[start:start + batch]
        out += [part[-1]] + part[:-1]
    return out


ROWS_PER_PASS = 8  # rows per reference forward (fixed, so the bytes do not depend on the config)


def answer_logps(model, prompts: list[list[int]], sides: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Sum of log p(token) over each answer's tokens after its prompt: for rows i, sides[k][i] is
    the k-th answer of row i. One forward for all, laid out as TRL's collator lays a batch out
    ([all first answers, all second answers], right-padded), through TRL's fused LM head: the
    computation its trainers run on the policy, so before training policy and reference agree."""
    import torch

    if any(not p for p in prompts):
        raise DataError("a row has an empty prompt after tokenization: the reference needs a token to predict the answer from")
    sequences = [(prompt, answer) for answers in sides for prompt, answer in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(answer)
    logps = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
    return [[float(x) for x in part] for part in logps.split(len(prompts))]


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import json

    import pyarrow as pa
    import torch

    from stages.training.model import load_base
    from stages.training.precision import cast_weights

    info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    from trl.trainer.utils import add_fused_lm_head

    model = load_base(params, inputs["model"], info["vocab_size"])
    add_fused_lm_head(model)  # before peft wraps it, as TRL adds it
    if params.rl_adapter_ref_model and params.lora_model_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, params.lora_model_dir)
    cast_weights(model, params)
    model.eval()
    torch.manual_seed(0)
    tables = {split: read_table(inputs["rows"] / f"{split}.arrow") for split in ("train", "val")}
    total = sum(t.num_rows for t in tables.values())
    with torch.inference_mode(), ctx.progress("reference log-probs", total) as advance:
        for split, table in tables.items():
            rows = table.to_pylist()
            if params.rl == "kto":
                kl = kl_completions([r["completion_ids"] for r in rows], params.micro_batch_size)
                found = reference_logps(model, rows, [[r["completion_ids"] for r in rows], kl], info["pad_token_id"], advance)
                columns = {"KL_completion_ids": pa.array(kl, type=pa.list_(pa.int32())), "ref_logps": found[0], "ref_KL_logps": found[1]}
            else:
                found = reference_logps(model, rows, [[r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]], info["pad_token_id"], advance)
                columns = {"ref_chosen_logps": found[0], "ref_rejected_logps": found[1]}
            for name, values in columns.items():
                table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values, type=pa.float32()))
            write_table(table, out / f"{split}.arrow")
    return {"rows": tables["train"].num_rows, "val_rows": tables["val"].num_rows}


def reference_logps(model, rows: list[dict], sides: list[list[list[int]]], pad_id: int, advance) -> list[list[float]]:
    """answer_logps over the rows, ROWS_PER_PASS at a time: one list of sums per side."""
    found: list[list[float]] = [[] for _ in sides]
    for start in range(0, len(rows), ROWS_PER_PASS):
        stop = start + ROWS_PER_PASS
        part = answer_logps(model, [r["prompt_ids"] for r in rows[start:stop]], [side[start:stop] for side in sides], pad_id)
        for k, values in enumerate(part):
            found[k] += values
        advance(len(rows[start:stop]))
    return found
