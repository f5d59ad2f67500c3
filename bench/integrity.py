"""What the input check costs: `molt preprocess` with and without re-hashing a stage's inputs
before it reads them (MOLT_CHECK_INPUTS=0 turns the check off).

    python -m bench.integrity [--rows 20000] [--rounds 3] [--out bench/results]

One alpaca dataset of --rows rows; a cold preprocess builds everything once. Each round then
removes the format, tokenize, mix and pack artifacts and reruns preprocess with the check on and
off (order alternating by round), so every rebuilt stage reads inputs that an earlier process
wrote: format re-hashes fetch_data's copy and the tokenizer, the rest read what this process
wrote and hashed itself. A second pair removes only tokenize, mix and pack, so tokenize re-hashes
format's Arrow file. Reports medians of wall seconds and the ratio check-on / check-off, plus the
time of the re-hash alone (the inputs' files hashed from their bytes). A timing, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import pipeline

REBUILDS = {"format → pack": ("format", "tokenize", "mix", "pack"), "tokenize → pack": ("tokenize", "mix", "pack")}


def _preprocess(cfg: Path, work: Path, cache: Path, check: bool) -> float:
    old = os.environ.get("MOLT_CHECK_INPUTS")
    os.environ["MOLT_CHECK_INPUTS"] = "1" if check else "0"
    try:
        return pipeline.molt(["preprocess", cfg], work, cache)["seconds"]
    finally:
        if old is None:
            os.environ.pop("MOLT_CHECK_INPUTS")
        else:
            os.environ["MOLT_CHECK_INPUTS"] = old


def _rehash_seconds(cache: Path, stages: tuple[str, ...]) -> tuple[float, int]:
    """Seconds to hash, from their bytes, the files of the artifacts those stages read; and their bytes."""
    from stages.store import hash_tree

    read = {"format": ("fetch_data", "tokenizer"), "tokenize": ("format", "tokenizer"), "mix": ("tokenize",), "pack": ("mix",)}
    inputs = {up for s in stages for up in read[s]}
    dirs = [m.parent for up in sorted(inputs) for m in (cache / up).glob("*/manifest.json")]
    size = sum(p.stat().st_size for d in dirs for p in d.rglob("*") if p.is_file())
    start = time.perf_counter()
    for d in dirs:
        hash_tree(d)
    return time.perf_counter() - start, size


def run(work: Path, rows: int, rounds: int) -> dict:
    model = pipeline.tiny_model_dir()
    work.mkdir(parents=True, exist_ok=True)
    pipeline.write_jsonl(work / "data" / "alpaca.jsonl", pipeline.alpaca_rows(rows, seed=1))
    cfg = pipeline.write_config(work / "config.yml", model, [{"path": "data/alpaca.jsonl", "type": "alpaca"}])
    cache = work / "cache"
    cold = pipeline.molt(["preprocess", cfg], work, cache)["seconds"]
    results = {"rows": rows, "rounds": rounds, "cold_s": cold, "cases": []}
    for name, stages in REBUILDS.items():
        times = {True: [], False: []}
        for r in range(rounds):
            for check in ((True, False) if r % 2 == 0 else (False, True)):
                for stage in stages:
                    shutil.rmtree(cache / stage, ignore_errors=True)
                times[check].append(_preprocess(cfg, work, cache, check))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rehash, size = _rehash_seconds(cache, stages)
        results["cases"].append({"rebuilt": name, "check_s": on, "no_check_s": off, "ratio": on / off, "rehash_s": rehash,
                                 "rehashed_mib": size / 2**20, "all_check_s": times[True], "all_no_check_s": times[False]})
    return results


def table(results: dict) -> str:
    lines = [f"# Input check cost: `molt preprocess`, {results['rows']:,} alpaca rows", "",
             f"Cold preprocess (fetch → pack): {results['cold_s']:.2f} s. Medians of {results['rounds']} rounds, modes alternating.", "",
             "| rebuilt | check on s | check off s | on / off | re-hash alone s | re-hash / check-off | inputs MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in results["cases"]:
        lines.append(f"| {c['rebuilt']} | {c['check_s']:.2f} | {c['no_check_s']:.2f} | {c['ratio']:.3f}x | {c['rehash_s']:.3f} | "
                     f"{c['rehash_s'] / c['no_check_s']:.2%} | {c['rehashed_mib']:.1f} |")
    lines += ["", "re-hash alone: every input artifact the rebuilt stages read (all of them, also those a run wrote itself and "
              "does not re-hash: an upper bound), hashed from its bytes with xxh3-128. Runs: "
              + "; ".join(f"{c['rebuilt']}: on {', '.join(f'{x:.1f}' for x in c['all_check_s'])}, off {', '.join(f'{x:.1f}' for x in c['all_no_check_s'])}"
                          for c in results["cases"]) + " s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="molt-bench-integrity-")) if args.work is None else args.work
    try:
        results = run(work, args.rows, args.rounds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "integrity.md").write_text(text)
    (args.out / "integrity.json").write_text(json.dumps(results, indent=1))
    print(text)
    return results


if __name__ == "__main__":
    main()
