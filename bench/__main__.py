"""All molt benchmarks in one run, each result a ratio measured side by side on this machine.

    python -m bench [--quick] [--out bench/results] [--skip NAME ...]

1. tokenize: molt's tokenize stage vs the bare fast tokenizer's encode_batch of the same texts;
2. preprocess: cold `molt preprocess` (wall, peak RSS), warm no-change rerun (and whether it
   imports torch), partial rerun after changing the template of one of four equal datasets;
3. packing: bench.packing (molt's packer vs first-fit in order vs unpacked);
4. throughput: bench.throughput (tiny Llama, packed vs unpacked), multipack real batches; in the
   full run also bench.lora (SmolLM2-135M LoRA: molt packed / unpacked vs a plain Trainer);
   quick and full: bench.dpo (tiny Llama DPO: cached reference log-probs vs TRL's on the fly);
5. growth: preprocess time at growing row counts, `molt status` time at 10/100/1000 artifacts.

Writes bench.md (every table) and bench.png under --out, plus packing.md/png and the throughput
table. --quick (under 5 minutes on 2 cores) uses small sizes. A timing, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bench import dpo, lora, packing, pipeline, throughput

SIZES = {
    "quick": {"alpaca": 3000, "chats": 1200, "quarter": 1000, "growth": [1000, 5000, 20000], "status": [10, 100, 1000],
              "tokenize_rounds": 3, "packing_samples": 52000, "throughput": ["--samples", "48", "--rounds", "1"], "cold_rounds": 1,
              "dpo_rows": 16},
    "full": {"alpaca": 20000, "chats": 20000, "quarter": 10000, "growth": [10000, 50000, 200000], "status": [10, 100, 1000],
             "tokenize_rounds": 2, "cold_rounds": 3, "packing_samples": 52000, "throughput": ["--samples", "128", "--rounds", "2"], "lora_rows": 32,
             "dpo_rows": 64},
    "tiny": {"alpaca": 40, "chats": 20, "quarter": 10, "growth": [20, 40], "status": [12, 14],
             "tokenize_rounds": 1, "cold_rounds": 1, "packing_samples": 2000, "throughput": ["--samples", "8", "--rounds", "1", "--seq-len", "128"]},
}
STEPS = ("preprocess", "tokenize", "packing", "throughput", "growth", "status", "lora", "dpo")


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def report(results: dict, mode: str, seconds: float) -> str:
    lines = [f"# molt benchmarks ({mode})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {_cpus()} CPU cores, "
             f"{_mem_gib()} GiB RAM, Python {platform.python_version()}; whole run {seconds:.0f} s.", ""]
    if "tokenize" in results:
        lines += ["## 1. Tokenize throughput: molt's tokenize stage vs the bare fast tokenizer", "",
                  "| dataset | rows | tokens | molt rows/s | bare rows/s | molt tokens/s | bare tokens/s | molt / bare |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["tokenize"]:
            lines.append(f"| {r['dataset']} | {r['rows']:,} | {r['tokens']:,} | {r['molt_rows_per_s']:,.0f} | {r['bare_rows_per_s']:,.0f} | "
                         f"{r['molt_tokens_per_s']:,.0f} | {r['bare_tokens_per_s']:,.0f} | {r['molt_over_bare']:.2f}x |")
        lines += ["", "bare: `Tokenizer.encode_batch` of the rows' joined texts (no offsets, no labels); molt: `stages.tokenize.run` "
                  "(encode with offsets, labels, length checks, Arrow write). Medians of alternating rounds.", ""]
    if "preprocess" in results:
        p = results["preprocess"]
        lines += ["## 2. `molt preprocess`: cold, warm, partial", "",
                  "| run | rows | wall s | peak RSS MiB | ratio |", "|---|---:|---:|---:|---:|",
                  f"| cold (fetch → pack, fresh cache) | {p['rows']:,} | {_f(p['cold_s'])} | {p['cold_peak_rss_mib']:.0f} | 1 |",
                  f"| warm, nothing changed | {p['rows']:,} | {_f(p['warm_s'])} | {p['warm_peak_rss_mib']:.0f} | {p['warm_over_cold']:.3f} |",
                  f"| 4 equal chat datasets, cold (model, tokenizer cached) | {p['four_rows']:,} | {_f(p['four_cold_s'])} | | 1 |",
                  f"| same, after changing one dataset's chat_template | {p['four_rows']:,} | {_f(p['partial_s'])} | | {p['partial_over_cold']:.2f} |",
                  f"| same, stage seconds only (manifests) | | {_f(p['partial_data_s'])} of {_f(p['four_cold_data_s'])} | | {p['partial_data_over_cold']:.2f} |",
                  "", f"Warm rerun imports torch: **{'yes' if p['warm_imports_torch'] else 'no'}** (`python -X importtime`). "
                  f"Partial rerun rebuilt: {', '.join(f'{k} x{v}' for k, v in p['partial_rebuilt'].items())}. "
                  f"Cold stage seconds (manifests, last round): {', '.join(f'{k} {v:.2f}' for k, v in sorted(p['cold_stage_seconds'].items()))}.", "",
                  f"Cold whole process against the bare tokenizer: **{p['cold_over_bare']:.2f}x** (cold {_f(p['cold_s'])} s, the median of "
                  f"{', '.join(_f(x) for x in p['cold_rounds_s'])}; `encode_batch` of the same rows' texts after each, median "
                  f"{_f(p['bare_encode_s'])} s of {', '.join(_f(x) for x in p['bare_rounds_s'])}).", ""]
    if "packing" in results:
        lines += ["## 3. Packing efficiency (real tokens / slots)", "", packing.table(results["packing"]).strip(), ""]
    if "throughput" in results:
        lines += ["## 4. Training throughput, tiny Llama on CPU", "", throughput.table(results["throughput"]).strip(), ""]
    if "lora" in results:
        lines += ["## 4b. SmolLM2 LoRA training throughput on CPU: molt vs a plain transformers Trainer", "", lora.table(results["lora"]).strip(), ""]
    if "dpo" in results:
        lines += ["## 4c. DPO training throughput: cached reference log-probs vs TRL computing them on the fly", "", dpo.table(results["dpo"]).strip(), ""]
    if "growth" in results:
        lines += ["## 5a. Preprocess cost growth (one alpaca dataset; model and tokenizer cached)", "",
                  "| rows | wall s | stage seconds | µs / row | per row vs smallest | peak RSS MiB |", "|---:|---:|---:|---:|---:|---:|"]
        for r in results["growth"]:
            lines.append(f"| {r['rows']:,} | {_f(r['seconds'])} | {_f(r['data_seconds'])} | {r['us_per_row']:.0f} | {r['per_row_vs_smallest']:.2f} | {r['peak_rss_mib']:.0f} |")
        lines.append("")
    if "status" in results:
        lines += ["## 5b. `molt status` time vs artifacts in the cache", "", "| artifacts | wall s (median of 3, incl. process start) | ratio |",
                  "|---:|---:|---:|"]
        s0 = results["status"][0]["seconds"]
        for r in results["status"]:
            lines.append(f"| {r['artifacts']:,} | {_f(r['seconds'])} | {r['seconds'] / s0:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    if "tokenize" in results:
        names = [r["dataset"] for r in results["tokenize"]]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r["molt_tokens_per_s"] for r in results["tokenize"]], 0.4, label="molt tokenize stage")
        ax.bar([i + 0.2 for i in x], [r["bare_tokens_per_s"] for r in results["tokenize"]], 0.4, label="bare encode_batch")
        ax.set_xticks(list(x), names), ax.set_ylabel("tokens / s"), ax.legend(), ax.set_title("tokenize throughput")
    ax = axes[0][1]
    if "preprocess" in results:
        p = results["preprocess"]
        labels = ["cold", "warm", "4 ds cold", "partial (1 of 4)"]
        ax.bar(labels, [p["cold_s"], p["warm_s"], p["four_cold_s"], p["partial_s"]], color=["C0", "C2", "C0", "C1"])
        ax.set_ylabel("wall s"), ax.set_title("molt preprocess")
    ax = axes[1][0]
    if "growth" in results:
        g = results["growth"]
        ax.loglog([r["rows"] for r in g], [r["data_seconds"] for r in g], "o-", label="stage seconds")
        ax.loglog([r["rows"] for r in g], [r["seconds"] for r in g], "s--", label="wall (incl. start)")
        r0 = g[0]
        ax.loglog([r["rows"] for r in g], [r0["data_seconds"] * r["rows"] / r0["rows"] for r in g], ":", color="grey", label="linear")
        ax.set_xlabel("rows"), ax.set_ylabel("s"), ax.legend(), ax.set_title("preprocess cost growth")
    ax = axes[1][1]
    if "status" in results:
        s = results["status"]
        ax.semilogx([r["artifacts"] for r in s], [r["seconds"] for r in s], "o-")
        ax.set_xlabel("artifacts in cache"), ax.set_ylabel("wall s"), ax.set_ylim(bottom=0), ax.set_title("molt status")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _mem_gib() -> int:
    try:
        return round(int(open("/proc/meminfo").read().split()[1]) / 2**20)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 5 minutes on 2 cores")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="molt-bench-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {}
    timings: dict = {}

    def step(name: str, fn):
        if name in args.skip:
            return
        t = time.perf_counter()
        print(f"bench: {name} ...", flush=True)
        results[name] = fn()
        timings[name] = time.perf_counter() - t
        print(f"bench: {name} done in {timings[name]:.1f} s", flush=True)

    try:
        need_cache = any(s not in args.skip for s in ("preprocess", "tokenize", "growth", "status"))
        if need_cache:
            step("preprocess", lambda: pipeline.preprocess_bench(work / "pre", sizes["alpaca"], sizes["chats"], sizes["quarter"], sizes["cold_rounds"]))
            if "preprocess" not in results:  # the others need a cache with the tokenizer
                pipeline.preprocess_bench(work / "pre", sizes["alpaca"], sizes["chats"], sizes["quarter"])
        cache = work / "pre" / "cache"
        step("tokenize", lambda: pipeline.tokenize_bench(cache, rounds=sizes["tokenize_rounds"]))
        step("packing", lambda: packing.main(["--samples", str(sizes["packing_samples"]), "--out", str(args.out)]))
        step("throughput", lambda: throughput.main([*sizes["throughput"], "--micro-batch-size", "8", "--real-batches", "--out", str(args.out)]))
        step("growth", lambda: pipeline.growth_bench(work / "growth", sizes["growth"], cache))
        step("status", lambda: pipeline.status_bench(work / "status", sizes["status"], cache))
        if "lora_rows" in sizes:  # SmolLM2 LoRA on CPU: minutes per mode on 2 cores, so the full run only
            step("lora", lambda: lora.run(rows=sizes["lora_rows"], work=work / "lora", rounds=1))
        if "dpo_rows" in sizes:  # not in --tiny: tests/test_bench.py runs bench.dpo on its own
            step("dpo", lambda: dpo.run(rows=sizes["dpo_rows"]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    text = report(results, mode, seconds)
    name = "bench" if mode == "full" else f"bench-{mode}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({"mode": mode, "seconds": seconds, "step_seconds": timings, "results": results}, indent=1, default=str))
    plot(results, args.out / f"{name}.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
