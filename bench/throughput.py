"""Training throughput, real (non-pad) tokens per second, packed against unpacked, on a small
random Llama (8 layers, hidden 256, vocabulary 4096), measured side by side in one run.

    python -m bench.throughput [--samples 256] [--seq-len 512] [--micro-batch-size 4] [--rounds 3] [--attn molt_segments]

Alpaca-like lengths (bench.packing's distribution, samples over --seq-len dropped), random
tokens. Each round runs one epoch (forward, backward, AdamW step per micro-batch) of every mode
in turn, so a slow moment of a shared machine hits all modes alike; the table gives each
mode's median real tokens/s and its ratio to "unpacked, pad to longest" measured in the same
rounds. Modes use molt's own code (stages.pack bins and layout, stages.training collate, loss and
epoch batches):

* packed: multipack bins of micro_batch_size x seq_len tokens, one row per micro-batch (with
  --real-batches: bins of seq_len, micro_batch_size rows per micro-batch);
* unpacked, pad to longest: micro_batch_size samples per micro-batch, padded to the longest
  (rounded up to 8), as molt trains without sample_packing;
* unpacked, pad to sequence_len: the same with pad_to_sequence_len.

Writes throughput-<seq_len>-mbs<micro_batch_size>[-real].md under --out and prints it. A timing, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.packing import alpaca_like_lengths


def tiny_model(vocab: int, seq_len: int, attn: str, seed: int = 0, layers: int = 8, hidden: int = 256):
    """A small random Llama whose layers outweigh its output layer about 5:1, as SmolLM2-135M's do
    (about 4:1): molt's loss runs the output layer on labelled tokens only, padded or not, so a
    model made mostly of output layer would hide what padding costs the layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max(seq_len, 64), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if attn == "molt_segments":
        import stages.training.segment_attention  # noqa: F401  (registers molt's per-sample SDPA)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def make_table(lengths: np.ndarray, vocab: int, seed: int = 0):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]
    labels = [[-100] * (len(x) // 3) + x[len(x) // 3:] for x in ids]
    return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())), "labels": pa.array(labels, type=pa.list_(pa.int32())),
                     "length": pa.array(lengths.astype(np.int32))})


def batches_for(mode: str, table, lengths: np.ndarray, seq_len: int, mbs: int, real_batches: bool = False) -> list[dict]:
    from stages.pack import _layout, pack_groups
    from stages.training.batches import collate, epoch_batches

    if mode == "packed":
        bins = pack_groups(lengths, seq_len * (1 if real_batches else mbs), 100_000, 200, seed=0)
        per_batch, width = (mbs if real_batches else 1), None
    else:
        bins = [np.array([i]) for i in range(len(lengths))]
        per_batch, width = mbs, (seq_len if mode == "unpacked, pad to sequence_len" else None)
    rows = _layout(table, bins)[0].to_pylist()
    plan = epoch_batches([r["length"] for r in rows], per_batch, 1, seed=0, epoch=0)[0]
    return [collate([rows[i] for i in batch], pad_id=0, width=width) for batch in plan]


def epoch(model, optimizer, batches: list[dict], device: str) -> float:
    import torch

    from stages.training.chunked_loss import TrainedTokenLoss

    loss = TrainedTokenLoss(model)  # molt's training loss
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss(model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


MODES = ("packed", "unpacked, pad to longest", "unpacked, pad to sequence_len")


def run(samples: int = 256, seq_len: int = 512, mbs: int = 4, rounds: int = 3, vocab: int = 4096, attn: str = "molt_segments", device: str = "cpu", real_batches: bool = False) -> dict:
    import torch

    lengths = alpaca_like_lengths(samples)
    lengths = lengths[lengths <= seq_len]
    table = make_table(lengths, vocab)
    real = int(lengths.sum())
    prepared = {m: batches_for(m, table, lengths, seq_len, mbs, real_batches) for m in MODES}
    models = {m: tiny_model(vocab, seq_len, attn).to(device) for m in MODES}
    optimizers = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in MODES}
    for m in MODES:  # warm-up: allocator, kernels
        epoch(models[m], optimizers[m], prepared[m][:2], device)
    seconds = {m: [] for m in MODES}
    for _ in range(rounds):
        for m in MODES:
            seconds[m].append(epoch(models[m], optimizers[m], prepared[m], device))
    rates = {m: [real / s for s in seconds[m]] for m in MODES}
    base = "unpacked, pad to longest"
    return {
        "samples": len(lengths), "real_tokens": real, "seq_len": seq_len, "micro_batch_size": mbs, "rounds": rounds,
        "device": device, "attn": attn, "threads": torch.get_num_threads(), "real_batches": real_batches,
        "modes": {m: {"micro_batches": len(prepared[m]),
                      "slots": int(sum(b["input_ids"].numel() for b in prepared[m])),
                      "tokens_per_s": statistics.median(rates[m]),
                      "ratio": statistics.median(r / b for r, b in zip(rates[m], rates[base]))} for m in MODES},
    }


def table(result: dict) -> str:
    lines = [
        f"Training throughput, small Llama (8 layers, hidden 256, vocab 4096, {result['attn']}, {result['device']}, {result['threads']} threads), {result['samples']} alpaca-like samples "
        f"({result['real_tokens']} real tokens), sequence_len {result['seq_len']}, micro_batch_size {result['micro_batch_size']}, "
        f"multipack_real_batches {str(result['real_batches']).lower()}, "
        f"median of {result['rounds']} interleaved rounds (`python -m bench.throughput`)",
        "",
        "| mode | micro-batches / epoch | real tokens / slots | real tokens/s | ratio to unpacked, pad to longest (same rounds) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, r in result["modes"].items():
        lines.append(f"| {m} | {r['micro_batches']} | {result['real_tokens'] / r['slots']:.1%} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attn", default="molt_segments", choices=["molt_segments", "sdpa", "eager", "flash_attention_2"],
                        help="molt_segments: molt's CPU default (SDPA per packed sample); sdpa: one masked SDPA per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-batches", action="store_true", help="packed bins of seq-len, micro-batch-size rows per batch")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.samples, args.seq_len, args.micro_batch_size, args.rounds, attn=args.attn, device=args.device, real_batches=args.real_batches)
    text = table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"throughput-{args.seq_len}-mbs{args.micro_batch_size}{'-real' if args.real_batches else ''}{'' if args.attn == 'molt_segments' else '-' + args.attn}.md"
    (args.out / name).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
