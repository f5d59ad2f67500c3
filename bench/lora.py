"""SmolLM2-135M LoRA training throughput on CPU: `molt train` packed vs unpacked vs a plain
transformers Trainer + peft loop on the same tokenized rows (the baseline).

    python -m bench.lora [--rows 96] [--seq-len 512] [--micro-batch-size 2]

One epoch each, real (non-pad) tokens per second from the train stage's manifest
(`train_seconds`, `tokens_per_epoch`) and, for the baseline, `trainer.train()`'s own runtime
over the same rows' token count; peak RSS of each process. Runs in turn (packed, unpacked,
baseline), so on a shared machine compare within one run only. A timing, not a test.
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


def _config(work: Path, rows: int, seq_len: int, mbs: int, packed: bool) -> Path:
    return pipeline.write_config(
        work / f"lora-{'packed' if packed else 'unpacked'}.yml", Path("unused"), [{"path": "data/a.jsonl", "type": "alpaca"}],
        base_model="smollm2-135m-instruct", sequence_len=seq_len, sample_packing=packed, micro_batch_size=mbs, lora_r=16, lora_alpha=32,
        lora_dropout=0.0, num_epochs=1, max_steps=None, learning_rate=1e-4, logging_steps=1000, chat_template="tokenizer_default",
    )


def baseline(model_dir: str, tokenized: list[str], mbs: int, out: str) -> None:
    """Plain transformers Trainer + peft LoRA, padding to the longest of each batch (run in a
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
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=mbs, num_train_epochs=1, learning_rate=1e-4, report_to=[],
                                 save_strategy="no", logging_steps=1000, seed=42, remove_unused_columns=False, use_cpu=True)
        started = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
        seconds = time.perf_counter() - started
    Path(out).write_text(json.dumps({"train_seconds": seconds, "tokens_per_epoch": sum(len(r["input_ids"]) for r in rows), "rows": len(rows)}))


def _seed_cache(cache: Path) -> None:
    """Hard-link the repo cache's converted models and tokenizers in (the GGUF conversion is not
    what is measured); a key that no longer matches is simply rebuilt."""
    for stage in ("fetch_model", "tokenizer"):
        src = REPO / "cache" / stage
        if src.is_dir() and not (cache / stage).exists():
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(src), str(cache / stage)], check=False)


def run(rows: int = 96, seq_len: int = 512, mbs: int = 2, work: Path | None = None) -> dict:
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="molt-bench-lora-")) if own else work
    try:
        cache = work / "cache"
        _seed_cache(cache)
        pipeline.write_jsonl(work / "data" / "a.jsonl", pipeline.alpaca_rows(rows, seed=7))
        out = {}
        for packed in (True, False):
            cfg = _config(work, rows, seq_len, mbs, packed)
            before = {m.parent for m in cache.glob("train/*/manifest.json")}
            r = pipeline.molt(["train", cfg], work, cache)
            new = [m for m in cache.glob("train/*/manifest.json") if m.parent not in before]
            manifest = json.loads(new[0].read_text())
            out["molt packed" if packed else "molt unpacked"] = {
                "train_seconds": manifest["train_seconds"], "tokens_per_epoch": manifest["tokens_per_epoch"], "wall_s": r["seconds"],
                "peak_rss_mib": r["peak_rss_mib"], "steps": manifest.get("metrics", {}).get("steps")}
        status = pipeline.molt(["status", cfg, "--json"], work, cache)["stdout"]
        keys = {r["stage"]: r["key"] for r in json.JSONDecoder().raw_decode(status[status.index("["):])[0]}
        model_dir = cache / "fetch_model" / keys["fetch_model"]
        tokenized = [str(cache / "tokenize" / k) for s, k in keys.items() if s == "tokenize" or s.startswith("tokenize[")]
        result_path = work / "baseline.json"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = f"from bench.lora import baseline; baseline({str(model_dir)!r}, {tokenized!r}, {mbs}, {str(result_path)!r})"
        start = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", code], cwd=work, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the transformers Trainer baseline failed")
        b = json.loads(result_path.read_text())
        out["transformers Trainer + peft (pad to longest)"] = dict(b, wall_s=time.perf_counter() - start, peak_rss_mib=usage.ru_maxrss / 1024)
        base = out["transformers Trainer + peft (pad to longest)"]
        for v in out.values():
            v["tokens_per_s"] = v["tokens_per_epoch"] / v["train_seconds"]
            v["ratio"] = v["tokens_per_s"] / (base["tokens_per_epoch"] / base["train_seconds"])
        return {"rows": rows, "seq_len": seq_len, "mbs": mbs, "modes": out}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct LoRA (r 16, all linear), {result['rows']} alpaca-like rows, sequence_len {result['seq_len']}, "
             f"micro_batch_size {result['mbs']}, one epoch, CPU", "",
             "| mode | train s | real tokens | real tokens/s | ratio to Trainer baseline | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, v in result["modes"].items():
        lines.append(f"| {name} | {v['train_seconds']:.1f} | {v['tokens_per_epoch']:,} | {v['tokens_per_s']:,.0f} | {v['ratio']:.2f}x | {v['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.rows, args.seq_len, args.micro_batch_size)
    text = table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lora-{args.seq_len}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
