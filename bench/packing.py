"""Packing efficiency on a realistic length distribution: molt's packer against first-fit in
arrival order and against not packing at all.

    python -m bench.packing [--samples 52000] [--seq-lens 512 2048 8192] [--out bench/results]

Lengths are drawn from a lognormal fitted by eye to Alpaca's token lengths (median ~140 tokens,
long right tail), seeded; samples over sequence_len are dropped as tokenize does. Efficiency =
real tokens / token slots. Columns:

* molt: `stages.pack.pack_groups` (first-fit-decreasing in groups of 100,000, at most 200
  samples per bin) into bins of sequence_len (micro_batch_size 1);
* first-fit, arrival order: each sample into the first bin with room, in the order given;
* unpacked, padded to sequence_len: one sample per row of sequence_len (pad_to_sequence_len);
* unpacked, padded to longest: random micro-batches of 8 rows padded to their longest row
  (rounded up to 8), the waste of plain batching.

Writes packing.md (the table) and packing.png under --out and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from stages.pack import first_fit_in_order, pack_groups


def alpaca_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(8, rng.lognormal(mean=np.log(140), sigma=0.75, size=n)).astype(np.int64)


def padded_to_longest(lengths: np.ndarray, batch: int, seed: int = 0, multiple: int = 8) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    slots = 0
    for start in range(0, len(order), batch):
        part = lengths[order[start:start + batch]]
        slots += len(part) * (-(-int(part.max()) // multiple) * multiple)
    return float(lengths.sum() / slots)


def measure(lengths: np.ndarray, seq_len: int, batch: int = 8) -> dict:
    lengths = lengths[lengths <= seq_len]
    tokens = int(lengths.sum())
    started = time.perf_counter()
    bins = pack_groups(lengths, seq_len, 100_000, 200, seed=0)
    seconds = time.perf_counter() - started
    in_order = int(first_fit_in_order(lengths, seq_len).max()) + 1
    return {
        "sequence_len": seq_len, "samples": len(lengths), "tokens": tokens,
        "molt": tokens / (len(bins) * seq_len), "molt_rows": len(bins), "molt_seconds": seconds,
        "lower_bound_rows": -(-tokens // seq_len),
        "first_fit_in_order": tokens / (in_order * seq_len), "first_fit_rows": in_order,
        "unpacked_pad_to_sequence_len": tokens / (len(lengths) * seq_len),
        "unpacked_pad_to_longest": padded_to_longest(lengths, batch),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| sequence_len | samples | molt (rows; lower bound) | first-fit, arrival order (rows) | unpacked, pad to sequence_len | unpacked, pad to longest of 8 | molt packing time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['sequence_len']} | {r['samples']} | {r['molt']:.2%} ({r['molt_rows']}; {r['lower_bound_rows']}) | "
            f"{r['first_fit_in_order']:.2%} ({r['first_fit_rows']}) | {r['unpacked_pad_to_sequence_len']:.2%} | "
            f"{r['unpacked_pad_to_longest']:.2%} | {r['molt_seconds']:.2f} s |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("molt", "molt (FFD)"), ("first_fit_in_order", "first-fit, arrival order"),
            ("unpacked_pad_to_longest", "unpacked, pad to longest"), ("unpacked_pad_to_sequence_len", "unpacked, pad to sequence_len")]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    width = 0.8 / len(keys)
    x = np.arange(len(results))
    for k, (key, label) in enumerate(keys):
        ax.bar(x + k * width, [r[key] * 100 for r in results], width, label=label)
    ax.set_xticks(x + width * (len(keys) - 1) / 2, [str(r["sequence_len"]) for r in results])
    ax.set_xlabel("sequence_len")
    ax.set_ylabel("real tokens / slots (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=52_000)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    lengths = alpaca_like_lengths(args.samples)
    results = [measure(lengths, s) for s in args.seq_lens]
    text = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    header = f"Packing efficiency, {args.samples} alpaca-like lengths (lognormal, median 140; `python -m bench.packing`)\n\n"
    (args.out / "packing.md").write_text(header + text + "\n")
    plot(results, args.out / "packing.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
