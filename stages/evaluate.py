"""evaluate: the trained (or a given) model's held-out loss and perplexity, and, when asked, its
greedy generations on the held-out prompts scored against the references.

Reads the fetched base model, the tokenizer, the trained model (train's `model/`: an adapter is
put on the base, a full model is read whole; with no training stage in the pipeline, `molt
evaluate CFG --lora-model-dir DIR` reads that adapter and `--base-model DIR` that model alone),
pack's validation rows and mix's unpacked ones (the loss of each dataset they came from: each
`test_datasets` entry, or each `datasets` entry's share of `val_set_size`). Writes `metrics.json`, `report.html` (the metrics and a
table of prompt / reference / generation) and `metrics.png`.

The loss is token-weighted as in training: summed over every trained token, divided by their
number, on the same packed validation rows, so it is the number train measured. With
`eval_causal_lm_metrics` (sacrebleu, chrf, ter, perplexity; comet with unbabel-comet installed)
each held-out row's prompt (the tokens before its first trained one) is continued greedily for up
to `eval_max_new_tokens` tokens and the generation scored against the trained span that followed;
`eval_table_size` rows are shown in the table (5 by default).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from stages.config import stage_params
from stages.context import QUIET, Context
from stages.store import DataError, list_files, read_table

SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "sacrebleu")
INPUTS = {"trained": ("train", None), "model": "fetch_model", "tokenizer": "tokenizer", "packed": "pack", "mixed": "mix"}
METRICS = ("sacrebleu", "chrf", "ter", "perplexity", "comet")
IGNORE = -100
BATCH = 8

Params = stage_params(
    "adapter", "lora_model_dir", "trust_remote_code", "model_type", "overrides_of_model_config", "overrides_of_model_kwargs",
    "resize_token_embeddings_to_32x", "peft", "eval_causal_lm_metrics", "eval_max_new_tokens", "eval_table_size", "val_set_size",
)


def sources(params: Params) -> list[tuple[str, Path]]:
    if not params.lora_model_dir:
        return []
    root = Path(params.lora_model_dir)
    if not root.is_dir():
        raise DataError(f"lora_model_dir {root}: not a directory")
    return [(f"lora_model_dir/{p.relative_to(root).as_posix()}", p) for p in list_files(root)]


def load_model(params: Params, inputs: dict[str, Path], vocab: int):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.training.model import load_base, loftq_bits, quantize_lora_bases

    trained = inputs["trained"] / "model" if "trained" in inputs else Path(params.lora_model_dir) if params.lora_model_dir else None
    if trained is not None and not (trained / "adapter_config.json").exists():  # a full fine-tune
        return AutoModelForCausalLM.from_pretrained(trained, dtype="float32", trust_remote_code=params.trust_remote_code).eval()
    model = load_base(params, inputs["model"], vocab, quantize=False)
    if trained is not None:
        model = PeftModel.from_pretrained(model, trained)
        if loftq_bits(params):
            quantize_lora_bases(model, loftq_bits(params))
    return model.eval()


def held_out_loss(model, rows: list[dict], pad_id: int) -> dict | None:
    """Token-weighted loss over rows (packed or not: position_ids keep samples apart)."""
    import torch

    from stages.training.batches import collate
    from stages.training.chunked_loss import TrainedTokenLoss

    loss, total, count = TrainedTokenLoss(model), 0.0, 0
    for start in range(0, len(rows), BATCH):
        batch = collate([{"position_ids": list(range(len(r["input_ids"]))), **r} for r in rows[start:start + BATCH]], pad_id)
        labels = batch.pop("labels")
        n = int((labels[..., 1:] != IGNORE).sum())
        if n:
            with torch.no_grad():
                total += float(loss(model, {**batch, "use_cache": False}, labels, 1))
            count += n
    if not count:
        return None
    return {"loss": round(total / count, 6), "perplexity": round(math.exp(total / count), 4), "tokens": count}


def prompt_and_reference(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """The tokens before the first trained one, and the trained span that follows (None: nothing trained)."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if first is None or first == 0:
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
    return ids[:first], ids[first:end]


def generations(model, tokenizer, rows: list[dict], max_new_tokens: int, ctx: Context) -> list[dict]:
    import torch

    pairs = [p for p in (prompt_and_reference(r["input_ids"], r["labels"]) for r in rows) if p]
    out = []
    with ctx.progress("generate", len(pairs)) as advance:
        for prompt, reference in pairs:
            with torch.no_grad():
                made = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(made[0, len(prompt):], skip_special_tokens=True).strip()
            out.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "reference": tokenizer.decode(reference, skip_special_tokens=True).strip(),
                        "generation": text})
            advance(1)
    return out


def scores(names: list[str], table: list[dict], loss: dict | None) -> dict:
    import sacrebleu

    hyps, refs = [t["generation"] for t in table], [[t["reference"] for t in table]]
    found = {}
    for name in names:
        if name == "sacrebleu":
            found[name] = round(sacrebleu.corpus_bleu(hyps, refs).score, 4)
        elif name == "chrf":
            found[name] = round(sacrebleu.corpus_chrf(hyps, refs).score, 4)
        elif name == "ter":
            found[name] = round(sacrebleu.corpus_ter(hyps, refs).score, 4)
        elif name == "perplexity":
            found[name] = loss["perplexity"] if loss else None
        elif name == "comet":
            try:
                from comet import download_model  # noqa: F401
            except ImportError:
                raise DataError("eval_causal_lm_metrics: comet needs the unbabel-comet package and a local COMET model: pip install unbabel-comet") from None
            raise DataError("eval_causal_lm_metrics: comet downloads its scoring model from a hub, which molt does not do at run time")
        else:
            raise DataError(f"eval_causal_lm_metrics: unknown metric {name!r}; molt computes {', '.join(METRICS)}")
    return found


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    from transformers import AutoTokenizer

    names = list(params.eval_causal_lm_metrics or [])
    if unknown := [n for n in names if n not in METRICS]:
        raise DataError(f"eval_causal_lm_metrics: unknown metric {unknown[0]!r}; molt computes {', '.join(METRICS)}")
    info = json.loads((inputs["tokenizer"] / "molt_tokenizer.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(inputs["tokenizer"])
    model = load_model(params, inputs, info["vocab_size"])
    packed = read_table(inputs["packed"] / "val.arrow").select(["input_ids", "labels", "position_ids"]).to_pylist()
    metrics = {"validation": held_out_loss(model, packed, info["pad_token_id"]) if packed else None}
    mixed = read_table(inputs["mixed"] / "val.arrow")
    val_rows = mixed.select(["input_ids", "labels"]).to_pylist()
    split = "datasets" if params.val_set_size else "test_datasets"  # where the held-out rows came from
    for index in sorted(set(mixed.column("dataset").to_pylist())):
        picked = [r for r, d in zip(val_rows, mixed.column("dataset").to_pylist()) if d == index]
        metrics.setdefault("by_dataset", {})[f"{split}[{index}]"] = held_out_loss(model, picked, info["pad_token_id"])
    table = []
    if names:
        if not val_rows:
            raise DataError("eval_causal_lm_metrics: there is no validation split to generate on (set val_set_size or test_datasets)")
        table = generations(model, tokenizer, val_rows, params.eval_max_new_tokens, ctx)
        metrics["generation"] = scores(names, table, metrics["validation"])
    if not packed and not names:
        raise DataError("evaluate: there is no validation split (set val_set_size or test_datasets)")
    shown = table[: 5 if params.eval_table_size is None else params.eval_table_size]
    (out / "metrics.json").write_text(json.dumps({**metrics, "table": shown}, indent=1))
    (out / "report.html").write_text(_report(metrics, shown))
    _plot(metrics, out / "metrics.png")
    return {"metrics": metrics}


def _report(metrics: dict, table: list[dict]) -> str:
    rows = "".join(f"<tr><td><pre>{html.escape(t['prompt'])}</pre></td><td>{html.escape(t['reference'])}</td><td>{html.escape(t['generation'])}</td></tr>" for t in table)
    summary = "".join(f"<li>{html.escape(k)}: {html.escape(json.dumps(v))}</li>" for k, v in metrics.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>molt evaluate</title></head><body><h1>molt evaluate</h1>"
            f"<ul>{summary}</ul><img src='metrics.png' alt='metrics'><table border='1'><tr><th>prompt</th><th>reference</th>"
            f"<th>generation</th></tr>{rows}</table></body></html>\n")


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"validation loss": (metrics.get("validation") or {}).get("loss")}
    bars.update({k: v for k, v in (metrics.get("generation") or {}).items() if v is not None and k != "perplexity"})
    bars = {k: v for k, v in bars.items() if v is not None}
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    for i, v in enumerate(bars.values()):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_title("held-out metrics")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
