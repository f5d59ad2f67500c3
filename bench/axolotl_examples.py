"""`python -m bench.axolotl_examples`: Axolotl's own example configs, tried as a new user would.

Every YAML file under Axolotl's `examples/` (read with `git show` from a bare mirror) that has a
`base_model` is a training config. Each gets `base_model: smollm2-135m-instruct` (the embedded
model) and every dataset (`datasets`, `test_datasets`, `pretraining_dataset`) pointed at a small
local JSON Lines file whose rows have the shape its `type` and field keys ask for (and Axolotl's
deepspeed_configs/ beside it, as `axolotl fetch deepspeed_configs` leaves them); everything else
is left as written (`tokenizer_config` too: a hub name that is not cached is one of the findings).
Then `molt preprocess`, in this process through the CLI's click entry point (one shared cache, so
the model is converted once), and each config is classified:

    preprocesses  exit 0
    refused       a clean non-zero exit; its first `error:` line is recorded
    traceback     any other exception, or a Python traceback in the output

Writes `results/axolotl-examples.md` (counts, the causes grouped by their line with the digits and
quoted names folded, and the table of every config) and the same rows as JSON.

    python -m bench.axolotl_examples [--axolotl-git DIR] [--rev HEAD] [--limit N] [--only TEXT]
                                     [--rows 200] [--work DIR] [--out bench/results]

200 rows per file by default, so that the smallest slices examples use (`train[:1%]`) keep a row
and a 1% `val_set_size` still leaves training rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path("/work/.mirror/axolotl-ai-cloud+axolotl/repo")
MODEL = "smollm2-135m-instruct"
# a dataset entry's keys that say where the rows come from; they go with the local file
SOURCE_KEYS = ("data_files", "name", "revision", "ds_type", "data_dir", "shards", "shards_idx", "trust_remote_code")

WORDS = "red blue green amber violet silver olive coral ivory teal".split()


# -- reading the examples ------------------------------------------------------------------------


def example_paths(git_dir: Path, rev: str) -> list[str]:
    out = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "--name-only", rev, "examples/"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if p.endswith((".yml", ".yaml")))


def show(git_dir: Path, rev: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{rev}:{path}"],
                          capture_output=True, text=True, check=True).stdout


def side_files(git_dir: Path, rev: str) -> dict[str, str]:
    """Axolotl's deepspeed_configs/*.json, which its examples name by relative path and a user
    has after `axolotl fetch deepspeed_configs`; each config's folder gets them."""
    out = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "--name-only", rev, "deepspeed_configs/"],
                         capture_output=True, text=True).stdout
    return {p: show(git_dir, rev, p) for p in out.splitlines() if p.endswith(".json")}


def training_configs(git_dir: Path, rev: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """(path, config) of the examples with a base_model, and the paths of the others."""
    kept, skipped = [], []
    for path in example_paths(git_dir, rev):
        try:
            config = yaml.safe_load(show(git_dir, rev, path))
        except yaml.YAMLError:
            skipped.append(path)
            continue
        if isinstance(config, dict) and config.get("base_model"):
            kept.append((path, config))
        else:
            skipped.append(path)
    return kept, skipped


# -- rows of the right shape ---------------------------------------------------------------------


def _texts(i: int) -> tuple[str, str]:
    a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
    return f"Question {i}: what comes after {a}?", f"After {a} comes {b} ({i})."


def _roles(ds: dict) -> dict[str, str]:
    """The role names the rows use: the first name `roles` maps to each of molt's roles."""
    names = {"system": "system", "user": "user", "assistant": "assistant"}
    for role, given in (ds.get("roles") or {}).items():
        if isinstance(given, list) and given:
            names[role] = str(given[0])
        elif isinstance(given, str):
            names[role] = given
    return names


def _message_keys(ds: dict) -> tuple[str, str]:
    mapping = ds.get("message_property_mappings") or {}
    role = mapping.get("role") or ds.get("message_field_role") or "role"
    content = mapping.get("content") or ds.get("message_field_content") or "content"
    return str(role), str(content)


def _message(ds: dict, role: str, text: str, thinking: bool = False) -> dict:
    role_key, content_key = _message_keys(ds)
    message = {role_key: _roles(ds).get(role, role), content_key: text}
    if thinking and ds.get("field_thinking"):
        message[str(ds["field_thinking"])] = "Think briefly."
    return message


def _has_system(ds: dict) -> bool:
    """A `roles` mapping replaces the default one: a system turn only where it maps one."""
    return not ds.get("roles") or "system" in ds["roles"]


def _chat(ds: dict, i: int, system: bool) -> list[dict]:
    q, a = _texts(i)
    turns = [_message(ds, "system", "Answer in one line.")] if system and _has_system(ds) else []
    turns += [_message(ds, "user", q), _message(ds, "assistant", a, thinking=True)]
    if i % 4 == 1:  # some rows have two exchanges
        turns += [_message(ds, "user", f"And {i + 1}?"), _message(ds, "assistant", f"{i + 1} follows {i}.", thinking=True)]
    return turns


def row(ds: dict, config: dict, i: int, pretraining: bool = False) -> dict:
    """One row for dataset entry `ds` of `config` (the i-th: contents vary, shapes do not)."""
    kind = ds.get("type")
    q, a = _texts(i)
    wrong = f"I do not know ({i})."
    if pretraining:
        return {str(ds.get("text_column") or "text"): f"{q} {a}", str(ds.get("field") or "text"): f"{q} {a}"}
    if isinstance(kind, dict):  # a user-defined instruction format
        return {str(kind.get(k, d)): v for k, d, v in (("field_instruction", "instruction", q), ("field_input", "input", ""),
                                                        ("field_output", "output", a), ("field_system", "system", "Be brief."))}
    kind = str(kind or "")
    base, _, loader = kind.partition(".")
    base = base.split(":")[0]
    rl = config.get("rl")
    if not kind:  # pretokenized
        ids = [1 + (i + j) % 50 for j in range(12)]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
    if base == "chat_template" and not rl and not config.get("reward_model"):
        return {str(ds.get("field_messages") or "messages"): _chat(ds, i, system=i % 3 == 0)}
    if base == "chat_template" and loader in ("argilla",):
        return {"prompt": q, "chosen": [_message(ds, "user", q), _message(ds, "assistant", a)],
                "rejected": [_message(ds, "user", q), _message(ds, "assistant", wrong)]}
    if base == "chat_template" and loader == "argilla_chat":
        return {str(ds.get("field_chosen") or "chosen"): [_message(ds, "user", q), _message(ds, "assistant", a)],
                str(ds.get("field_rejected") or "rejected"): [_message(ds, "user", q), _message(ds, "assistant", wrong)]}
    if base == "chat_template":  # preference: a conversation, then the two answers as messages
        system = [_message(ds, "system", "Be brief.")] if _has_system(ds) else []
        return {str(ds.get("field_messages") or "messages"): system + [_message(ds, "user", q)],
                str(ds.get("field_chosen") or "chosen"): _message(ds, "assistant", a),
                str(ds.get("field_rejected") or "rejected"): _message(ds, "assistant", wrong)}
    if base == "bradley_terry":
        return {"system": "Be brief.", "input": q, "chosen": a, "rejected": wrong}
    if base == "stepwise_supervised":
        return {"prompt": q, "completions": [f"Step one ({i}).", a], "labels": [True, i % 2 == 0]}
    if rl == "kto":
        completion = [_message(ds, "user", q), _message(ds, "assistant", a)] if loader == "argilla_chat" else a
        return {"system": "Be brief.", "prompt": q, "question": q, "instruction": q, "completion": completion, "label": i % 2 == 0}
    if rl:  # chatml.* / llama3.* / zephyr.* / user types: every column those loaders read
        listed = loader in ("ultra", "argilla_chat")
        chosen = [{"role": "user", "content": q}, {"role": "assistant", "content": a}] if listed else a
        rejected = [{"role": "user", "content": q}, {"role": "assistant", "content": wrong}] if listed else wrong
        return {"system": "Be brief.", "prompt": q, "question": q, "input": q, "instruction": q, "chosen": chosen,
                "rejected": rejected, "chosen_response": a, "rejected_response": wrong, "answer": a}
    if base == "completion":
        return {str(ds.get("field") or "text"): f"{q} {a}"}
    if base == "input_output":
        return {"segments": [{"text": f"{q}\n", "label": False}, {"text": a, "label": True}]}
    if base == "jeopardy":
        return {"question": q, "category": "COLOURS", "answer": a}
    if base in ("oasst", "pygmalion", "metharme"):
        return {"INSTRUCTION": q, "RESPONSE": a, "prompt": q, "generation": a,
                "conversations": [{"role": "user", "value": q}, {"role": "bot", "value": a}]}
    # alpaca and its relatives (alpaca:chat, alpaca:phi, alpaca_w_system, gpteacher, ...)
    return {"instruction": q, "input": "" if i % 2 else "colours", "output": a, "system_prompt": "Be brief.",
            "question": q, "response": a}


def prepare(config: dict, work: Path, rows: int, base_model: str = MODEL) -> dict:
    """The config with base_model and every dataset swapped; writes its data files under work/data."""
    config = dict(config)
    config["base_model"] = base_model
    (work / "data").mkdir(parents=True, exist_ok=True)
    n = 0
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        entries = config.get(key)
        if entries is None:
            continue
        single = isinstance(entries, (dict, str))
        swapped = []
        for ds in [entries] if single else list(entries):
            ds = {"path": ds} if isinstance(ds, str) else dict(ds)
            for source in SOURCE_KEYS:
                ds.pop(source, None)
            path = work / "data" / f"{key}-{n}.jsonl"
            n += 1
            with path.open("w") as f:
                for i in range(rows):
                    f.write(json.dumps(row(ds, config, i, pretraining=key == "pretraining_dataset")) + "\n")
            ds["path"] = str(path.relative_to(work))
            swapped.append(ds)
        config[key] = swapped[0] if single else swapped
    return config


# -- running and classifying ---------------------------------------------------------------------


ERROR = re.compile(r"^\s*error:\s*(.*)$")


def first_error(output: str) -> str:
    lines = output.splitlines()
    for n, line in enumerate(lines):
        m = ERROR.match(line)
        if m:
            text = m.group(1).strip()
            # "invalid config:" is followed by its findings, one "  - ..." each: the first is the cause
            rest = [x.strip().removeprefix("- ") for x in lines[n + 1:] if x.strip()]
            if text.endswith(":") and rest:
                text = f"{text} {rest[0]}"
            return text
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def all_errors(output: str) -> list[str]:
    """Every finding of a refusal: an "invalid config:" error lists each refused key on a
    "  - ..." line of its own (other errors are one line)."""
    lines = output.splitlines()
    for n, line in enumerate(lines):
        m = ERROR.match(line)
        if m and m.group(1).strip().endswith("invalid config:"):
            head = m.group(1).strip()
            found = []
            for x in lines[n + 1:]:
                if x.startswith("  - "):
                    found.append(f"{head} {x[4:].strip()}")
                elif found and x.startswith("    "):  # a finding's continuation line
                    found[-1] += " " + x.strip()
                else:
                    break
            return found or [first_error(output)]
    return [first_error(output)]


PREPARED = re.compile(r"\((\d+) train rows, (\d+) validation rows\)")


def preprocess(config_path: Path, cache: Path) -> tuple[str, str, float, str, list[str]]:
    """(outcome, first error line, seconds, "train+validation" rows, every finding of a refusal)
    of `molt preprocess` in config_path's folder."""
    from click.testing import CliRunner

    from stages.cli import main
    from stages.ui import console

    old_cwd, old_width = os.getcwd(), console._width
    console.width = 400  # one error per line, unwrapped
    os.chdir(config_path.parent)
    start = time.perf_counter()
    try:
        result = CliRunner().invoke(main, ["preprocess", config_path.name, "--cache-dir", str(cache)], catch_exceptions=True)
    finally:
        os.chdir(old_cwd)
        console._width = old_width
    seconds = time.perf_counter() - start
    output = result.output
    error = result.exception
    if (error is not None and not isinstance(error, SystemExit)) or "Traceback (most recent call last)" in output:
        if error is not None and not isinstance(error, SystemExit):
            return "traceback", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300], seconds, "", []
        return "traceback", first_error(output)[:300], seconds, "", []
    if result.exit_code == 0:
        counts = PREPARED.search(output)
        return "preprocesses", "", seconds, f"{counts.group(1)}+{counts.group(2)}" if counts else "?", []
    return "refused", first_error(output)[:300], seconds, "", [e[:300] for e in all_errors(output)]


def cause(line: str) -> str:
    """An error line with what varies between configs folded, so that one cause counts once: the
    config file's name, a refused key's value (`qat: {...} is not supported yet: ...` is one cause
    whatever the value), paths and numbers."""
    line = re.sub(r"^config\.yml: (invalid config: )?", "", line)
    m = re.match(r"^([\w.\[\]]+): .*? (is not supported yet: .*)$", line)
    if m:
        line = f"{m.group(1)}: … {m.group(2)}"
    line = re.sub(r"[\w.\-]*\w/[\w.\-/]+", "PATH", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:180]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_results(rows: list[dict], skipped: list[str], out: Path, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(r["outcome"] for r in rows)
    total = len(rows)
    causes = Counter(cause(r["error"]) for r in rows if r["outcome"] != "preprocesses")
    lines = [
        "# Axolotl's example configs through `molt preprocess`",
        "",
        f"`python -m bench.axolotl_examples` at molt {meta['molt']} on Axolotl {meta['axolotl']} ({meta['date']}): "
        f"{total} training configs (of {total + len(skipped)} YAML files; those without a `base_model` are left out), "
        f"`base_model: {meta.get('base_model', MODEL)}`, every dataset a local file of {meta['rows']} rows of its type's shape, everything else "
        f"as written. {meta['seconds']:.0f} s.",
        "",
        "| outcome | configs | share |",
        "|---|---:|---:|",
    ]
    for outcome in ("preprocesses", "refused", "traceback"):
        lines.append(f"| {outcome} | {counts[outcome]} | {100 * counts[outcome] / max(total, 1):.1f}% |")
    lines += ["", "## Causes (refused and traceback), by number of configs", "", "| configs | first error line (numbers and paths folded) |", "|---:|---|"]
    for text, n in causes.most_common():
        lines.append(f"| {n} | {_cell(text)} |")
    every, alone = Counter(), Counter()
    for r in rows:
        found = {cause(e) for e in r.get("errors") or []}
        every.update(found)
        if len(found) == 1:
            alone.update(found)
    if every:
        lines += ["", "## Every finding of the refusals", "",
                  "A refused config counts under each of its findings (`molt preprocess` names every refused key at once); "
                  "alone: the configs refused for that finding only, which lifting it would let through.", "",
                  "| configs | alone | finding |", "|---:|---:|---|"]
        for text, n in every.most_common():
            lines.append(f"| {n} | {alone[text]} | {_cell(text)} |")
    lines += ["", "## Every config", "", "rows: the prepared train + validation rows (of the local files' rows, after `split` slices and "
              "`val_set_size`).", "", "| config | outcome | rows | first error line |", "|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['outcome']} | {r.get('rows', '')} | {_cell(r['error'])} |")
    md = out / "axolotl-examples.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "axolotl-examples.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return md


def _revision(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()[:12]
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.axolotl_examples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--axolotl-git", type=Path, default=MIRROR, help="Axolotl's git directory (a bare mirror is enough)")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--limit", type=int, help="only the first N training configs")
    parser.add_argument("--only", help="only configs whose path contains this text")
    parser.add_argument("--rows", type=int, default=200, help="rows in each local data file")
    parser.add_argument("--base-model", default=MODEL, help="what base_model becomes (the tests use a tiny model)")
    parser.add_argument("--work", type=Path, help="scratch directory (kept); default: a temporary one")
    parser.add_argument("--cache-dir", type=Path, help="molt cache shared by the runs; default: WORK/cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--from-json", type=Path, help="rewrite the table from an earlier run's JSON, running nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        write_results(earlier["rows"], earlier["meta"].get("skipped", []), args.out, earlier["meta"])
        return earlier

    configs, skipped = training_configs(args.axolotl_git, args.rev)
    extra = side_files(args.axolotl_git, args.rev)
    if args.only:
        configs = [(p, c) for p, c in configs if args.only in p]
    if args.limit is not None:
        configs = configs[: args.limit]
    work = args.work or Path(tempfile.mkdtemp(prefix="molt-axolotl-examples-"))
    cache = args.cache_dir or work / "cache"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    rows = []
    for n, (path, config) in enumerate(configs):
        folder = work / f"{n:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', path)[:80]}"
        folder.mkdir(parents=True, exist_ok=True)
        swapped = prepare(config, folder, args.rows, args.base_model)
        for name, text in extra.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        (folder / "config.yml").write_text(yaml.safe_dump(swapped, sort_keys=False, allow_unicode=True))
        outcome, error, seconds, prepared, errors = preprocess(folder / "config.yml", cache)
        rows.append({"config": path, "outcome": outcome, "error": error, "errors": errors, "rows": prepared, "seconds": round(seconds, 2)})
        print(f"[{n + 1}/{len(configs)}] {outcome:12s} {seconds:5.1f}s {path}  {error[:150]}", flush=True)
    meta = {"molt": _revision(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
            "axolotl": _revision(["git", "--git-dir", str(args.axolotl_git), "rev-parse", args.rev]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": args.rows, "base_model": args.base_model,
            "seconds": time.perf_counter() - start, "work": str(work), "skipped": skipped}
    md = write_results(rows, skipped, args.out, meta)
    counts = Counter(r["outcome"] for r in rows)
    print(f"{dict(counts)} of {len(rows)}; wrote {md}")
    return {"meta": meta, "rows": rows, "counts": dict(counts)}


if __name__ == "__main__":
    main(sys.argv[1:])
