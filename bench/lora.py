"""SmolLM2-135M training throughput on CPU, LoRA or full: `molt train` packed, unpacked as molt
does it by default (padding-free: each micro-batch flattened into one row) and unpacked padded to
the longest (`batch_flattening: false`) vs a plain transformers Trainer (+ peft for LoRA) on the
same tokenized rows (the baseline).

    python -m bench.lora [--rows 128] [--seq-len 512] [--micro-batch-size 2] [--rounds 3] [--full] [--row-scale 1]

One epoch each, real (non-pad) tokens per second from the train stage's manifest
(`train_seconds`, `tokens_per_epoch`) and, for the baseline, `trainer.train()`'s own runtime
over the same rows' token count; peak RSS of each process. The modes are interleaved round by
round (their order rotating) and the medians reported, so load on a shared machine falls on all
of them alike. The baseline process also computes, on its first micro-batch, the Trainer's own
loss (`model(labels=...)`, full logits) and molt's (training/chunked_loss.py) on the same rows:
the speed is not from computing another loss. A timing, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import pipeline

REPO = pipeline.REPO


def _config(work: Path, rows: int, seq_len: int, mbs: int, packed: bool, full: bool = False, padded: bool = False) -> Path:
    method = {"adapter": None, "lora_r": None, "lora_alpha": None, "lora_target_linear": None, "learning_rate": 1e-5} if full else {
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 1e-4}
    return pipeline.write_config(
        work / f"{'full' if full else 'lora'}-{'packed' if packed else 'padded' if padded else 'unpacked'}.yml", Path("unused"),
        [{"path": "data/a.jsonl", "type": "alpaca"}], base_model="smollm2-135m-instruct", sequence_len=seq_len, sample_packing=packed,
        micro_batch_size=mbs, **({"batch_flattening": False} if padded else {}),
        num_epochs=1, max_steps=None, logging_steps=1000, chat_template="tokenizer_default", **method,
    )


def baseline(model_dir: str, tokenized: list[str], mbs: int, out: str, full: bool = False) -> None:
    """Plain transformers Trainer (+ peft LoRA), padding to the longest of each batch (run in a
    subprocess by `run`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from stages.store import read_table

    rows = []
    for path in tokenized:
        t = read_table(Path(path) / "tokenized.arrow")
        rows += [{"input_ids": i, "labels": l} for i, l in zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist())]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if not full:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    same = _first_batch_losses(model, rows[:mbs], collate)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=mbs, num_train_epochs=1, learning_rate=1e-5 if full else 1e-4,
                                 report_to=[], save_strategy="no", logging_steps=1000, seed=42, remove_unused_columns=False, use_cpu=True)
        started = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
        seconds = time.perf_counter() - started
    Path(out).write_text(json.dumps({"train_seconds": seconds, "tokens_per_epoch": sum(len(r["input_ids"]) for r in rows), "rows": len(rows), **same}))


def _first_batch_losses(model, rows, collate) -> dict:
    """The Trainer's loss (the model's own, full logits) and molt's on the same rows, the same weights."""
    import torch

    from stages.training.batches import collate as molt_collate
    from stages.training.chunked_loss import TrainedTokenLoss

    theirs = collate(rows)
    mine = molt_collate([{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows], pad_id=0)
    labels = mine.pop("labels")
    with torch.no_grad():
        trainer_loss = float(model(**theirs).loss)
        molt_loss = float(TrainedTokenLoss(model)(model, mine, labels))
    return {"first_batch_loss_trainer": trainer_loss, "first_batch_loss_molt": molt_loss}


def _seed_cache(cache: Path) -> None:
    """Hard-link the repo cache's converted models and tokenizers in (the GGUF conversion is not
    what is measured); a key that no longer matches is simply rebuilt."""
    for stage in ("fetch_model", "tokenizer"):
        src = REPO / "cache" / stage
        if src.is_dir() and not (cache / stage).exists():
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(src), str(cache / stage)], check=False)


def _molt_mode(work: Path, cache: Path, cfg: Path) -> dict:
    shutil.rmtree(cache / "train", ignore_errors=True)  # a fresh run each round, the data stages cached
    r = pipeline.molt(["train", cfg], work, cache)
    (path,) = list(cache.glob("train/*/manifest.json"))
    manifest = json.loads(path.read_text())
    return {"train_seconds": manifest["train_seconds"], "tokens_per_epoch": manifest["tokens_per_epoch"], "wall_s": r["seconds"],
            "peak_rss_mib": r["peak_rss_mib"], "stage_peak_rss_mib": manifest.get("peak_rss_mib"), "steps": manifest.get("metrics", {}).get("steps"),
            "loss": manifest.get("loss")}


def _baseline_mode(work: Path, model_dir: Path, tokenized: list[str], mbs: int, full: bool) -> dict:
    result_path = work / "baseline.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"from bench.lora import baseline; baseline({str(model_dir)!r}, {tokenized!r}, {mbs}, {str(result_path)!r}, {full!r})"
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], cwd=work, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the transformers Trainer baseline failed")
    return dict(json.loads(result_path.read_text()), wall_s=time.perf_counter() - start, peak_rss_mib=usage.ru_maxrss / 1024)


BASELINE = "transformers Trainer (pad to longest)"
DEFAULT = "molt unpacked (default: padding-free)"


def run(rows: int = 128, seq_len: int = 512, mbs: int = 2, work: Path | None = None, rounds: int = 3, full: bool = False,
        row_scale: float = 1.0) -> dict:
    import statistics

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="molt-bench-lora-")) if own else work
    try:
        cache = work / "cache"
        _seed_cache(cache)
        pipeline.write_jsonl(work / "data" / "a.jsonl", pipeline.alpaca_rows(rows, seed=7, scale=row_scale))
        configs = {"molt packed": _config(work, rows, seq_len, mbs, True, full), DEFAULT: _config(work, rows, seq_len, mbs, False, full),
                   "molt unpacked, batch_flattening: false (padded)": _config(work, rows, seq_len, mbs, False, full, padded=True)}
        for cfg in configs.values():
            pipeline.molt(["preprocess", cfg], work, cache)
        status = pipeline.molt(["status", configs[DEFAULT], "--json"], work, cache)["stdout"]
        keys = {r["stage"]: r["key"] for r in json.JSONDecoder().raw_decode(status[status.index("["):])[0]}
        model_dir = cache / "fetch_model" / keys["fetch_model"]
        tokenized = [str(cache / "tokenize" / k) for s, k in keys.items() if s == "tokenize" or s.startswith("tokenize[")]
        names = [*configs, BASELINE]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                runs[name].append(_baseline_mode(work, model_dir, tokenized, mbs, full) if name == BASELINE else _molt_mode(work, cache, configs[name]))
        out = {}
        for name, each in runs.items():
            for r in each:
                r["tokens_per_s"] = r["tokens_per_epoch"] / r["train_seconds"]
            out[name] = dict(each[0], tokens_per_s=statistics.median(r["tokens_per_s"] for r in each),
                             peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in each), rounds=[round(r["tokens_per_s"], 1) for r in each])
        for v in out.values():
            v["ratio"] = v["tokens_per_s"] / out[BASELINE]["tokens_per_s"]
            v["rss_ratio"] = v["peak_rss_mib"] / out[BASELINE]["peak_rss_mib"]
        return {"rows": rows, "row_scale": row_scale, "seq_len": seq_len, "mbs": mbs, "rounds": rounds, "method": "full fine-tune" if full else "LoRA (r 16, all linear)", "modes": out}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    base = result["modes"][BASELINE]
    lines = [f"SmolLM2-135M-Instruct {result.get('method', 'LoRA (r 16, all linear)')}, {result['rows']} alpaca-like rows{_scaled(result)}, sequence_len {result['seq_len']}, "
             f"micro_batch_size {result['mbs']}, one epoch, CPU; medians of {result.get('rounds', 1)} interleaved rounds", "",
             "| mode | real tokens | real tokens/s (each round) | ratio to Trainer | peak RSS MiB | RSS ratio |", "|---|---:|---:|---:|---:|---:|"]
    for name, v in result["modes"].items():
        each = ", ".join(f"{x:,.0f}" for x in v.get("rounds", []))
        lines.append(f"| {name} | {v['tokens_per_epoch']:,} | {v['tokens_per_s']:,.0f} ({each}) | {v['ratio']:.2f}x | {v['peak_rss_mib']:.0f} | {v['rss_ratio']:.2f}x |")
    if "first_batch_loss_trainer" in base:
        lines += ["", f"First micro-batch, same weights: the Trainer's loss {base['first_batch_loss_trainer']:.6f}, molt's {base['first_batch_loss_molt']:.6f}."]
    loss = next((v.get("loss") for v in result["modes"].values() if v.get("loss")), None)
    if loss:
        lines.append(f"molt's loss: {loss}.")
    return "\n".join(lines) + "\n"


def _scaled(result: dict) -> str:
    scale = result.get("row_scale", 1.0)
    return "" if scale == 1.0 else f" (fields {scale:g}x the default length)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--row-scale", type=float, default=1.0, help="stretch every row's fields (longer rows for a long sequence_len)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.rows, args.seq_len, args.micro_batch_size, rounds=args.rounds, full=args.full, row_scale=args.row_scale)
    text = table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    scaled = "" if args.row_scale == 1.0 else f"-rows{args.row_scale:g}x"
    (args.out / f"{'full' if args.full else 'lora'}-{args.seq_len}-mbs{args.micro_batch_size}{scaled}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
