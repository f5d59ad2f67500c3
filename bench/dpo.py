"""DPO training throughput: molt's cached reference log-probs vs TRL's DPOTrainer running the
reference on the fly, same rows, same model, same LoRA, same steps and seed.

    python -m bench.dpo [--model tiny|smollm2|DIR] [--rows 32] [--micro-batch-size 2] [--betas 0.1 0.2 0.5]

The rows (alpaca-like prompts, the chosen answer the row's own output, the rejected one another
row's) are tokenized once with the chat template. molt's way: the reference's summed log-probs of
every answer (`stages.ref_logprobs.answer_logps`, the model as the stage loads it) computed once
and timed on their own, then `stages.train_preference.trainer_class("dpo")` trains reading those
columns. TRL's way: `trl.DPOTrainer` with `precompute_ref_log_probs=False` (the reference is the
LoRA model with its adapter switched off, one extra forward per batch), fed the same tokenized
rows (`_prepare_dataset` returns them unchanged). One epoch each; `trainer.train()`'s wall time;
tokens = prompt + answer tokens of both sides of every row. The runs alternate molt, TRL for each
beta, so a beta sweep is those same runs: molt pays the reference once, TRL once per beta.
Writes dpo-<model>.md and dpo-<model>.json. A timing, not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench import pipeline

REPO = pipeline.REPO


def model_dir(name: str) -> Path:
    if name == "tiny":
        return pipeline.tiny_model_dir()
    if name == "smollm2":  # the demo's converted GGUF in the repo cache (`molt train pipelines/smollm2-dpo.yml` builds it)
        for config in sorted((REPO / "cache" / "fetch_model").glob("*/config.json")):
            if json.loads(config.read_text()).get("hidden_size") == 576:
                return config.parent
        raise SystemExit("no converted SmolLM2 in cache/fetch_model: run `molt train pipelines/smollm2-dpo.yml` once")
    return Path(name)


def preference_rows(tokenizer, n: int, seed: int = 3) -> list[dict]:
    rows = pipeline.alpaca_rows(n, seed=seed)
    others = [r["output"] for r in rows]
    random.Random(seed).shuffle(others)
    out = []
    for r, other in zip(rows, others):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True, tokenize=False)
        answer = lambda text: tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]  # noqa: E731
        out.append({"prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"], "chosen_ids": answer(r["output"]),
                    "rejected_ids": answer(other if other != r["output"] else r["instruction"])})
    return out


def _model(path: Path, lora: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    add_fused_lm_head(model)  # as stages.ref_logprobs loads it: answer_logps asks for fused_lm_head
    if lora:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def reference(path: Path, rows: list[dict], pad_id: int) -> tuple[list[dict], float]:
    """The rows with molt's cached columns, and the seconds the reference took."""
    import torch

    from stages.ref_logprobs import reference_logps

    model = _model(path, lora=False).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        chosen, rejected = reference_logps(model, rows, [[r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]], pad_id, lambda n: None)
    seconds = time.perf_counter() - started
    return [dict(r, ref_chosen_logps=c, ref_rejected_logps=j) for r, c, j in zip(rows, chosen, rejected)], seconds


def train(path: Path, rows: list[dict], tokenizer, cached: bool, beta: float, mbs: int) -> dict:
    import datasets
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from stages.train_preference import trainer_class

    if cached:
        cls = trainer_class("dpo")[0]
    else:
        class cls(DPOTrainer):  # noqa: N801 - TRL's own computation, minus its re-tokenizing of text rows
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=mbs, num_train_epochs=1, learning_rate=5e-4, beta=beta, seed=42,
                         precompute_ref_log_probs=cached, report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=True,
                         disable_tqdm=True, dataloader_num_workers=0)
        trainer = cls(model=_model(path, lora=True), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "loss": float(result.training_loss), "steps": result.global_step}


def run(model: str = "tiny", rows: int = 32, mbs: int = 2, betas: tuple[float, ...] = (0.1, 0.2, 0.5)) -> dict:
    from transformers import AutoTokenizer

    path = model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)  # both model dirs carry their tokenizer
    data = preference_rows(tokenizer, rows)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data)
    cached_rows, ref_seconds = reference(path, data, tokenizer.pad_token_id)
    runs = {"molt": [], "trl": []}
    for beta in betas:  # alternate, so load from elsewhere on the machine falls on both alike
        runs["molt"].append(dict(train(path, cached_rows, tokenizer, True, beta, mbs), beta=beta))
        runs["trl"].append(dict(train(path, data, tokenizer, False, beta, mbs), beta=beta))
    molt_s, trl_s = (statistics.median(r["seconds"] for r in runs[k]) for k in ("molt", "trl"))
    sweep_molt, sweep_trl = ref_seconds + sum(r["seconds"] for r in runs["molt"]), sum(r["seconds"] for r in runs["trl"])
    return {
        "model": model, "rows": rows, "mbs": mbs, "tokens": tokens, "betas": list(betas), "runs": runs, "ref_seconds": ref_seconds,
        "ref_tokens_per_s": tokens / ref_seconds,
        "molt_tokens_per_s": tokens / molt_s, "trl_tokens_per_s": tokens / trl_s, "molt_over_trl": trl_s / molt_s,
        "molt_with_ref_tokens_per_s": tokens / (molt_s + ref_seconds), "molt_with_ref_over_trl": trl_s / (molt_s + ref_seconds),
        "sweep_molt_s": sweep_molt, "sweep_trl_s": sweep_trl, "sweep_molt_over_trl": sweep_trl / sweep_molt,
        # same seed, same rows, an fp32 reference either way: the losses should agree
        "max_loss_gap": max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["molt"], runs["trl"])),
    }


def _seconds(runs: list[dict]) -> str:
    return ", ".join(f"{x['seconds']:.1f}" for x in runs)


def table(r: dict) -> str:
    n = len(r["betas"])
    lines = [f"DPO, LoRA r 16 (all linear), model {r['model']}, {r['rows']} rows ({r['tokens']:,} prompt + answer tokens, both sides), "
             f"micro_batch_size {r['mbs']}, one epoch per run, betas {', '.join(map(str, r['betas']))} (molt, TRL alternating), CPU", "",
             "| measure | molt (cached reference) | TRL DPOTrainer (reference on the fly) | molt / TRL |", "|---|---:|---:|---:|",
             f"| training tokens/s (median of {n}) | {r['molt_tokens_per_s']:,.0f} | {r['trl_tokens_per_s']:,.0f} | {r['molt_over_trl']:.2f}x |",
             f"| same, molt paying its reference once per run | {r['molt_with_ref_tokens_per_s']:,.0f} | {r['trl_tokens_per_s']:,.0f} | {r['molt_with_ref_over_trl']:.2f}x |",
             f"| {n}-beta sweep, total s (molt: one reference + {n} runs) | {r['sweep_molt_s']:.1f} | {r['sweep_trl_s']:.1f} | {r['sweep_molt_over_trl']:.2f}x |",
             "", f"Reference log-probs once (`ref_logprobs`, ROWS_PER_PASS rows a forward): {r['ref_seconds']:.1f} s ({r['ref_tokens_per_s']:,.0f} tokens/s). "
             f"Per run s, molt: {_seconds(r['runs']['molt'])}; TRL: {_seconds(r['runs']['trl'])}. "
             f"Largest train-loss gap molt vs TRL at one beta: {r['max_loss_gap']:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (bench.pipeline's random Llama), smollm2 (the repo cache's), or a model dir")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.model, args.rows, args.micro_batch_size, tuple(args.betas))
    text = table(result)
    name = args.model if args.model in ("tiny", "smollm2") else "model"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dpo-{name}.md").write_text(text)
    (args.out / f"dpo-{name}.json").write_text(json.dumps(result, indent=1))
    print(text)
    return result


if __name__ == "__main__":
    main()
