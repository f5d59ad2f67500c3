"""The stage DAG: which stage instances a config needs, their keys, and running what is missing.

The stage contract is below (the stages and the plan). A stage's key hashes its schema, the code
its `run` reaches (stages/fingerprint.py), the versions of the libraries it names, its params
slice, the files it reads and the *content* hashes of its inputs, so an upstream change that
leaves bytes alone stops there. The runner knows no stage by name: what a stage needs from it
(ranks, a checkpoint folder) the stage declares.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from rich.markup import escape

from stages import fingerprint, ui
from stages.config import slice_params
from stages.context import Context
from stages.store import HOST, Artifact, Store, canonical_json, hash_file, hash_text, hash_tree, list_files, now, publish, read_table



class StageFailed(Exception):
    def __init__(self, node: "Node", error: BaseException):
        super().__init__(f"{node.name}: {error}")
        self.node, self.node_label, self.error = node.name, node.label, error


# -- stages and the plan ---------------------------------------------------------------------
#
# A stage is a module (`stages.<name>`, or any importable module named by its dotted path) that
# declares its contract:
#   Params               the config keys it reads (a typed slice of the config)
#   INPUTS               {role: upstream stage}; an upstream that runs per dataset, read by a
#                        stage that does not, gives one input per dataset (roles train.N, test.N);
#                        a tuple of stages: the first of them the pipeline has (a None last:
#                        without any of them the role is left out)
#   PER_DATASET = True   one instance per `datasets` / `test_datasets` entry
#   EVERY_RANK = True    under a multi-process launcher it runs on every rank at once (the
#                        world size is then part of its key); other stages run once, on the rank
#                        that takes the key's lock first, and the rest find them cached
#   SCHEMA, LIBRARIES    bumped when its output layout changes; libraries whose versions shape it
#   run(params, inputs, out, ctx)   ctx: stages.context.Context (rank, world size, checkpoints, progress)
#   sources(params)      optional: external files it reads (hashed into the key), or identities
#   code_modules(params) optional: modules it loads dynamically (a prompt strategy), taken whole
# Adding a stage is a module plus its place in a pipeline below.

# (stage, when): the stages a config runs, in order; `when` leaves a stage out of configs that
# do not need it
Pipeline = list[tuple[str, Callable[[dict], bool] | None]]
SUPERVISED: Pipeline = [
    ("fetch_model", None), ("tokenizer", None), ("fetch_data", None), ("format", None), ("tokenize", None),
    ("mix", None), ("pack", None), ("train", None), ("merge", lambda config: bool(config.get("adapter"))), ("evaluate", None),
    ("export", None),
]
# preference training (rl:) and reward models: the reference model's log-probs are a stage of
# their own for the methods that have a reference (DPO, IPO, KTO), so a new beta or learning
# rate re-trains without running the reference again
REFERENCED = ("dpo", "ipo", "kto")
PREFERENCE: Pipeline = [
    ("fetch_model", None), ("tokenizer", None), ("fetch_data", None), ("format_preference", None), ("tokenize_preference", None),
    ("mix", None), ("ref_logprobs", lambda config: config.get("rl") in REFERENCED),
    ("train_preference", lambda config: bool(config.get("rl"))),
    ("train_reward", lambda config: not config.get("rl")),
    ("merge", lambda config: bool(config.get("adapter"))),
    ("export", lambda config: bool(config.get("rl"))),  # reward models are classifiers: nothing llama.cpp runs
]
# `molt merge-lora CFG --lora-model-dir DIR`: that adapter merged as it is, nothing trained
MERGE_GIVEN_ADAPTER: Pipeline = [("fetch_model", None), ("tokenizer", None), ("merge", None)]
# `molt evaluate CFG --lora-model-dir DIR | --base-model DIR`: that model evaluated, nothing trained
EVALUATE_GIVEN_MODEL: Pipeline = [stage for stage in SUPERVISED if stage[0] not in ("train", "merge", "export")]
STAGES = tuple(dict.fromkeys(name for pipeline in (SUPERVISED, PREFERENCE) for name, _ in pipeline))
# what the CLI's commands build, per pipeline: the prepared data, the trained model, the merged one
TARGETS = {"data": ("pack", "mix"), "train": ("train", "train_preference", "train_reward"), "merge": ("merge",), "evaluate": ("evaluate",), "export": ("export",)}


def pipeline_for(config: dict) -> Pipeline:
    return PREFERENCE if config.get("rl") or config.get("reward_model") or config.get("process_reward_model") else SUPERVISED


def target(config: dict, what: str) -> str:
    """The stage that builds `what` (data, train, merge) for this config."""
    present = [stage for stage, when in pipeline_for(config) if when is None or when(config)]
    return next(stage for stage in TARGETS[what] if stage in present)


# read by the CLI (or folded into other keys by the config) rather than by a stage
CLI_KEYS = frozenset({"output_dir", "dataset_prepared_path", "strict", "datasets", "test_datasets", "batch_size", "pad_to_sequence_len", "config_warnings", "training_refusals",
                      "lm_eval_tasks", "lm_eval_batch_size", "use_ray", "ray_num_workers", "resources_per_worker", "ray_run_name"})
DATASET_IDENTITY_KEYS = frozenset({"message_property_mappings"})

def keys_read(memo: Path | None = None) -> tuple[set[str], set[str]]:
    """(top-level keys, dataset-entry keys) that some stage declares in its Params (`memo`: see
    fingerprint.remembered; it spares importing every stage module)."""
    def read() -> list[list[str]]:
        top, per_dataset = set(CLI_KEYS), set(DATASET_IDENTITY_KEYS)
        for stage in STAGES:
            for name, f in stage_module(stage).Params.model_fields.items():
                if name == "dataset":
                    per_dataset |= set(f.annotation.model_fields)
                else:
                    top.add(name)
        return [sorted(top), sorted(per_dataset)]

    top, per_dataset = fingerprint.remembered(memo, "keys_read", read)
    return set(top), set(per_dataset)


def unread_settings(config, memo: Path | None = None) -> list[str]:
    """Keys the config model knows but no stage reads yet, set by the user: named, never dropped."""
    top, per_dataset = keys_read(memo)
    def typed_and_set(model) -> set[str]:  # extras (unknown keys) are the config's own warnings
        return model.model_fields_set & set(type(model).model_fields)

    notes = [k for k in sorted(typed_and_set(config) - top) if _is_set(getattr(config, k))]
    for split in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(config, split) or []):
            notes += [f"{split}[{i}].{k}" for k in sorted(typed_and_set(entry) - per_dataset) if _is_set(getattr(entry, k))]
    return [f"ignored: {k} — not supported yet" for k in notes]


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {})


def stage_module(stage: str):
    return importlib.import_module(stage if "." in stage else f"stages.{stage}")


@dataclass
class Node:
    stage: str  # module name, e.g. "format"
    params: BaseModel
    inputs: dict[str, "Node"] = field(default_factory=dict)
    index: int | None = None  # the dataset entry, for per-dataset stages
    test: bool = False  # the entry is in test_datasets
    param_paths: tuple[str, ...] = ()  # the config keys (as DVC params) it reads
    label: str = ""  # what a user recognises it by, e.g. "datasets[1]: data/chat.jsonl"

    @property
    def name(self) -> str:  # e.g. "format[1]", "format[test0]"
        return self.stage if self.index is None else f"{self.stage}[{'test' if self.test else ''}{self.index}]"

    @property
    def dvc_name(self) -> str:  # its name in dvc.yaml and under artifacts/, e.g. "format-1"
        return self.stage if self.index is None else f"{self.stage}-{'test' if self.test else ''}{self.index}"

    @property
    def module(self):
        return stage_module(self.stage)

    @property
    def every_rank(self) -> bool:
        return bool(getattr(self.module, "EVERY_RANK", False))

    def code(self, memo: Path | None = None) -> dict:
        """The fingerprint of the code its `run` reaches, plus modules it loads dynamically, whole
        (`memo`: see fingerprint.remembered; for molt's own stages only, which it covers)."""
        module = self.module.__name__
        extra = getattr(self.module, "code_modules", None)
        roots = [(module, "run")] + [(m, fingerprint.WHOLE) for m in (extra(self.params) if extra else ())]
        root = module.split(".")[0]
        files = fingerprint.remembered(memo if root == "stages" else None, json.dumps(["code", roots]),
                                       lambda: fingerprint.fingerprint(roots, root=root))
        return {"files": files,
                "libs": {lib: _version(lib) for lib in getattr(self.module, "LIBRARIES", ())}}

    def sources(self) -> list[tuple[str, Path | str]]:
        """(label, path) of the external files the stage reads for these params, or (label,
        identity) for a remote file (its metadata)."""
        hook = getattr(self.module, "sources", None)
        return list(hook(self.params)) if hook else []


def _version(lib: str) -> str:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _node(stage: str, config: dict, inputs: dict[str, Node], index: int | None = None, split: str = "datasets") -> Node:
    module = stage_module(stage)
    values = dict(config)
    label = ""
    if index is not None:
        values["dataset"] = config[split][index]
        label = f"{split}[{index}]: {values['dataset'].get('path')}"
    params = slice_params(module.Params, values)
    paths = tuple(split if k == "dataset" else k for k in module.Params.model_fields)
    return Node(stage, params, inputs, index, split == "test_datasets", paths, label)


def plan(config: dict, until: str | None = None, pipeline: Pipeline | None = None) -> list[Node]:
    """The stage instances for a config, in dependency order (up to `until`: a stage or an
    instance name, with what it needs)."""
    chosen = [stage for stage, when in (pipeline or pipeline_for(config)) if when is None or when(config)]

    def upstream(up: str | tuple[str | None, ...]) -> str | None:
        return up if isinstance(up, str) else next((u for u in up if u is None or u in chosen), up[0])

    declared = {stage: {role: found for role, up in getattr(stage_module(stage), "INPUTS", {}).items() if (found := upstream(up)) is not None}
                for stage in chosen}
    for stage, inputs in declared.items():
        missing = [up for up in inputs.values() if up not in declared or chosen.index(up) > chosen.index(stage)]
        if missing:
            raise KeyError(f"stage {stage} reads {', '.join(missing)}, which does not come before it in the pipeline")
    if until is not None:
        target = until.partition("[")[0]
        if target not in declared:
            raise KeyError(f"no stage named {until!r}; stages: {', '.join(chosen)}")
        keep, todo = set(), [target]
        while todo:  # only the stages the target needs: their params are the only ones read
            stage = todo.pop()
            if stage not in keep:
                keep.add(stage)
                todo.extend(declared[stage].values())
        chosen = [s for s in chosen if s in keep]

    splits = [(split, i) for split in ("datasets", "test_datasets") for i, _ in enumerate(config.get(split) or [])]
    nodes: list[Node] = []
    single: dict[str, Node] = {}
    per_dataset: dict[str, dict[tuple[str, int], Node]] = {}
    for stage in chosen:
        def inputs_for(where: tuple[str, int] | None) -> dict[str, Node]:
            found = {}
            for role, up in declared[stage].items():
                if up in single:
                    found[role] = single[up]
                elif where is not None:
                    found[role] = per_dataset[up][where]
                else:  # every dataset's instance
                    found.update({f"{'train' if s == 'datasets' else 'test'}.{i}": n for (s, i), n in per_dataset[up].items()})
            return found

        if getattr(stage_module(stage), "PER_DATASET", False):
            per_dataset[stage] = {}
            for split, i in splits:
                node = per_dataset[stage][(split, i)] = _node(stage, config, inputs_for((split, i)), i, split)
                nodes.append(node)
        else:
            node = single[stage] = _node(stage, config, inputs_for(None))
            nodes.append(node)
    if until is not None and until.partition("[")[0] != until:
        if until not in {n.name for n in nodes}:
            raise KeyError(f"no stage named {until!r}; instances: {', '.join(n.name for n in nodes)}")
        nodes = upstream_of(nodes, [n for n in nodes if n.name == until])
    return nodes


def upstream_of(nodes: list[Node], targets: list[Node]) -> list[Node]:
    keep: set[str] = set()
    todo = list(targets)
    while todo:
        n = todo.pop()
        if n.name not in keep:
            keep.add(n.name)
            todo.extend(n.inputs.values())
    return [n for n in nodes if n.name in keep]


# -- keys and running ------------------------------------------------------------------------


@dataclass
class Resolution:
    node: Node
    key: str | None  # None when an upstream artifact is missing (status without running)
    record: dict | None
    artifact: Artifact | None = None
    how: str = ""  # "cached", "adopted", "ran", "missing", "blocked", "damaged" (status only)
    damaged: Artifact | None = None  # its manifest is there, its files do not match it


class Runner:
    def __init__(self, store: Store, published: Path | None = None, refs_id: str | None = None, on_event: Callable[[str, Node, str], None] | None = None, rank: int = 0, world_size: int = 1):
        self.store = store
        self.rank, self.world_size = rank, world_size  # under a multi-process launcher
        self.published = published
        self.refs_path = store.root / "refs" / f"{refs_id}.json" if refs_id else None
        self.on_event = on_event or (lambda event, node, detail: None)
        self.done: dict[str, Resolution] = {}
        # re-hash a stage's inputs before it reads them (MOLT_CHECK_INPUTS=0: off, for bench.integrity)
        self.check_inputs = os.environ.get("MOLT_CHECK_INPUTS", "1") != "0"

    # the record is everything the key hashes; it is also written into the manifest
    def record(self, node: Node, inputs: dict[str, Artifact]) -> dict:
        module = node.module
        # a Path is hashed by content; a str is an identity taken verbatim (a remote file's metadata)
        sources = {label: value if isinstance(value, str) else self.store.index.hash(value) for label, value in node.sources()}
        record = {
            "stage": node.stage,
            "schema": module.SCHEMA,
            "code": node.code(self.store.code_memo),
            "params": node.params.model_dump(mode="json"),
            "inputs": {k: a.content for k, a in sorted(inputs.items())},
            "sources": sources,
        }
        if node.every_rank and self.world_size > 1:  # more ranks, bigger batches: other weights
            record["world_size"] = self.world_size
        return record

    def resolve(self, node: Node, run: bool = True) -> Resolution:
        if node.name in self.done:
            return self.done[node.name]
        ups = {k: self.resolve(n, run) for k, n in node.inputs.items()}
        # a damaged input (status only: a run rebuilds it) still names the content its manifest
        # records, which is what a rebuild gives and what the keys below it were made from
        if any(u.artifact is None and u.damaged is None for u in ups.values()):
            res = Resolution(node, None, None, how="blocked")
        else:
            inputs = {k: u.artifact or u.damaged for k, u in ups.items()}
            record = self.record(node, inputs)
            key = hash_text(canonical_json(record))
            res = Resolution(node, key, record)
            if run:  # leased before it is looked up: a `molt gc` from now on keeps it
                self.store.hold(node.stage, key)
            res.artifact, res.damaged = self.store.inspect(node.stage, key)
            res.how = "cached" if res.artifact else "missing"
            if res.damaged is not None and run and res.damaged.path == self.store.artifact_dir(node.stage, key):
                self._quarantine(node, key)  # found on read: a file's size, mtime or inode changed
                self.on_event("damaged", node, key)
            if res.artifact is None and self.published is not None:
                res.artifact = self._adopt(node, key)
                res.how = "adopted" if res.artifact else "missing"
            if res.artifact is None and run:
                if self.check_inputs and self._rebuild_damaged_inputs(node, ups):
                    inputs = {k: u.artifact for k, u in ups.items()}
                    record = self.record(node, inputs)
                    key = hash_text(canonical_json(record))
                    res = Resolution(node, key, record, self.store.get(node.stage, key), "cached")
                if res.artifact is None:
                    res.artifact, ran = self._run(node, key, record, inputs)
                    res.how = "ran" if ran else "cached"
                res.damaged = None
            elif res.damaged is not None:
                res.how = "damaged"
        if res.artifact is not None:
            self._remember(node.name, res.key)
        self.on_event(res.how, node, res.key or "")
        self.done[node.name] = res
        return res

    def _rebuild_damaged_inputs(self, node: Node, ups: dict[str, Resolution]) -> bool:
        """Before a stage reads its inputs, re-hash their files (once per process, trusting no
        stat); one that does not match its manifest is quarantined and rebuilt, so no artifact
        is ever made from damaged bytes. True when an input was rebuilt (`ups` is updated)."""
        rebuilt = False
        for role, up in ups.items():
            if up.artifact is not None and (checked := self.ensure_intact(node.inputs[role])) is not up:
                ups[role], rebuilt = checked, True
        return rebuilt

    def ensure_intact(self, node: Node) -> Resolution:
        """The node's resolution after re-hashing its files from their bytes (once per process):
        one that no longer matches its manifest is quarantined and rebuilt. Called before a stage
        reads it, and before molt copies it out (the prepared dataset, the trained model)."""
        res = self.done[node.name]
        if res.artifact is None or not self.check_inputs or self.store.intact(res.artifact):
            return res
        self._quarantine(node, res.key)
        self.on_event("damaged-input", node, res.key)
        del self.done[node.name]
        res = self.resolve(node)
        if res.artifact is None or not self.store.intact(res.artifact):
            raise StageFailed(node, RuntimeError(f"{node.name} was rebuilt after its files were found damaged, but the rebuilt files do not match their manifest either"))
        return res

    def _quarantine(self, node: Node, key: str) -> None:
        """Move (node, key) to the store's quarantine unless, under its lock, it is whole again
        (another process rebuilt it)."""
        with self.store.lock(node.stage, key):
            current, damaged = self.store.inspect(node.stage, key)
            if damaged is not None or (current is not None and not self.store.intact(current)):
                self.store.quarantine(node.stage, key)

    def _adopt(self, node: Node, key: str) -> Artifact | None:
        source = self.published / node.dvc_name
        try:
            manifest = json.loads((source / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return self.store.adopt(source) if manifest.get("key") == key else None

    def _run(self, node: Node, key: str, record: dict, inputs: dict[str, Artifact]) -> tuple[Artifact | None, bool]:
        if self.rank and node.every_rank:
            # rank 0 holds the lock and commits; this rank trains beside it into a scratch dir
            # that is discarded (taking the lock would wait for rank 0, which waits for this rank)
            self.on_event("start", node, key)
            with self.store.writing(node.stage, key) as scratch:
                self._call(node, key, inputs, scratch)
            return None, True
        with self.store.locked(node.stage, key, on_wait=lambda holder: self.on_event("wait", node, _whom(holder))):
            if (hit := self.store.get(node.stage, key)) is not None:  # another process made it
                return hit, False
            self.on_event("start", node, key)
            started = time.perf_counter()
            with self.store.writing(node.stage, key) as tmp:
                extra = self._call(node, key, inputs, tmp)
                manifest = dict(record, **extra, created=now(), seconds=round(time.perf_counter() - started, 3))
                artifact = self.store.commit(tmp, node.stage, key, manifest)
            shutil.rmtree(self.store.partial_dir(node.stage, key), ignore_errors=True)
        self.store.index.save()
        return artifact, True

    def _call(self, node: Node, key: str, inputs: dict[str, Artifact], out: Path) -> dict:
        ctx = Context(rank=self.rank, world_size=self.world_size, checkpoints=self.store.partial_dir(node.stage, key) / "checkpoints",
                      progress=ui.progress, log=lambda message: ui.console.print(escape(message)))
        try:
            return node.module.run(node.params, {k: a.path for k, a in inputs.items()}, out, ctx) or {}
        except Exception as error:
            raise StageFailed(node, error) from error

    # -- what was last used, for `molt status` to say why something is stale -------------------

    def refs(self) -> dict[str, str]:
        if self.refs_path is None:
            return {}
        try:
            return json.loads(self.refs_path.read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, name: str, key: str) -> None:
        if self.refs_path is None:
            return
        refs = self.refs()
        if refs.get(name) != key:
            refs[name] = key
            self.refs_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.refs_path.with_suffix(f".{os.getpid()}.tmp")  # another run of this config may write it too
            tmp.write_text(json.dumps(refs, indent=1, sort_keys=True))
            tmp.replace(self.refs_path)


def _whom(holder: dict | None) -> str:
    """The process a waiter waits for, in words: `pid 1234` (`pid 1234 on host2`)."""
    if not holder:
        return "another process"
    host = holder.get("host")
    return f"pid {holder.get('pid')}" + (f" on {host}" if host and host != HOST else "")


def why_changed(old: dict, new: dict) -> list[str]:
    """Human reasons a key changed, e.g. `chat_template chatml → llama3`."""
    reasons = []
    for k, (a, b) in _flat_diff(old.get("params", {}), new.get("params", {})):
        reasons.append(f"{k} {_short(a)} → {_short(b)}")
    old_code, new_code = old.get("code", {}), new.get("code", {})
    for f in sorted(set(old_code.get("files", {})) | set(new_code.get("files", {}))):
        if old_code.get("files", {}).get(f) != new_code.get("files", {}).get(f):
            reasons.append(f"code of {f} changed")
    for lib, (a, b) in _flat_diff(old_code.get("libs", {}), new_code.get("libs", {})):
        reasons.append(f"{lib} {a} → {b}")
    for k, (a, b) in _flat_diff(old.get("inputs", {}), new.get("inputs", {})):
        reasons.append(f"input {k} changed")
    for k, (a, b) in _flat_diff(old.get("sources", {}), new.get("sources", {})):
        reasons.append(f"source {k} changed")
    if old.get("schema") != new.get("schema"):
        reasons.append(f"schema {old.get('schema')} → {new.get('schema')}")
    return reasons


def _flat(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _flat_diff(a: dict, b: dict):
    fa, fb = _flat(a), _flat(b)
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k, "∅") != fb.get(k, "∅"):
            yield k, (fa.get(k, "∅"), fb.get(k, "∅"))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def stored_content(path: Path) -> str | None:
    """The hash of an artifact directory's files as they are now (None: no such artifact)."""
    return hash_tree(path) if (path / "manifest.json").exists() else None


def first_difference(old: Path, new: Path) -> str:
    """Where two versions of an artifact first differ: a file, and for Arrow files a row."""
    old_files = {p.relative_to(old).as_posix(): p for p in list_files(old) if p.name != "manifest.json"}
    new_files = {p.relative_to(new).as_posix(): p for p in list_files(new) if p.name != "manifest.json"}
    if set(old_files) != set(new_files):
        return f"files differ: stored {sorted(old_files)}, recomputed {sorted(new_files)}"
    for name in sorted(old_files):
        if hash_file(old_files[name]) == hash_file(new_files[name]):
            continue
        if name.endswith(".arrow"):
            try:
                a, b = read_table(old_files[name]), read_table(new_files[name])
            except Exception as error:  # a hand-edited file may not parse at all
                return f"{name} is not a readable Arrow file ({error})"
            if a.schema != b.schema:
                return f"{name}: schema differs"
            for i in range(min(a.num_rows, b.num_rows)):
                if a.slice(i, 1).to_pylist() != b.slice(i, 1).to_pylist():
                    return f"{name}: first differing row {i}"
            return f"{name}: {a.num_rows} stored rows vs {b.num_rows} recomputed"
        if name.endswith(".json"):
            return f"{name} differs{json_difference(old_files[name], new_files[name])}"
        return f"{name} differs"
    return "the manifest's content hash does not match its files"


def json_difference(old: Path, new: Path) -> str:
    """The first top-level key two JSON objects disagree on, both values shortened (empty when
    either is not a JSON object)."""
    try:
        a, b = json.loads(old.read_text()), json.loads(new.read_text())
    except ValueError:
        return ""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    def shown(value) -> str:
        text = json.dumps(value)
        return text[:80] + ("…" if len(text) > 80 else "")

    for key in sorted(set(a) | set(b), key=str):
        stored, recomputed = a.get(key, "<absent>"), b.get(key, "<absent>")
        if stored != recomputed:
            return f" at key {key!r}: stored {shown(stored)}, recomputed {shown(recomputed)}"
    return ""


def lineage(store: Store, target: str) -> list[tuple[int, Artifact]]:
    """(depth, artifact) from `target` (key, key prefix, artifact or published directory) back
    through its inputs, found in the store by content hash, down to the stages with sources."""
    artifacts = list(store.artifacts())
    path = Path(target)
    if (path / "manifest.json").exists():
        key = json.loads((path / "manifest.json").read_text())["key"]
        start = [a for a in artifacts if a.key == key]
    else:
        start = [a for a in artifacts if a.key.startswith(target)]
    if len(start) != 1:
        raise LookupError(f"{target!r}: {'no' if not start else 'more than one'} artifact in {store.root} matches")
    by_content = {a.manifest.get("content"): a for a in artifacts}
    chain, todo, seen = [], [(0, start[0])], set()
    while todo:
        depth, artifact = todo.pop()
        if artifact.key in seen:
            continue
        seen.add(artifact.key)
        chain.append((depth, artifact))
        for role, content in sorted(artifact.manifest.get("inputs", {}).items(), reverse=True):
            if content in by_content:
                todo.append((depth + 1, by_content[content]))
    return chain


def model_card(store: Store, artifact: Artifact, title: str) -> tuple[str, list[dict]]:
    """A README for a trained or merged model: what produced it, stage by stage, down to the
    content hashes of the raw files; plus the same chain as data (for lineage.json)."""
    chain = [
        {"depth": d, "stage": a.manifest["stage"], "key": a.key, "content": a.manifest["content"], "params": a.manifest.get("params", {}),
         "code": a.manifest["code"], "inputs": a.manifest.get("inputs", {}), "sources": a.manifest.get("sources", {})}
        for d, a in lineage(store, artifact.key)
    ]
    lines = [f"# {title}", "", "Produced by molt. Every artifact below is named by the hash of what it was made from;",
             "`molt lineage <key>` prints the same chain from the store.", "", "| stage | key | params | sources |", "|---|---|---|---|"]
    for link in chain:
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(link["params"].items()) if v not in (None, [], {}))
        sources = ", ".join(f"{label} ({digest[:12]})" for label, digest in link["sources"].items())
        lines.append(f"| {'↳ ' * min(link['depth'], 1)}{link['stage']} | `{link['key'][:16]}` | {params.replace('|', '/')[:300]} | {sources[:300]} |")
    return "\n".join(lines) + "\n", chain


def publish_node(res: Resolution, root: Path) -> Path:
    dest = root / res.node.dvc_name
    publish(res.artifact, dest)
    return dest


# -- dvc.yaml --------------------------------------------------------------------------------

# what turns a config into keys: DVC reruns a stage's `molt stage` when they change (the stage's
# key then decides whether anything is rebuilt)
CORE_FILES = ["stages/config.py", "stages/dag.py", "stages/fingerprint.py"]


def dvc_yaml(nodes: list[Node], config_path: str, config_keys: set[str], publish_dir: str = "artifacts") -> str:
    """dvc.yaml for the same DAG: per instance the files holding the code its key covers (DVC
    sees files, not definitions), upstream outs, source files inside the repo and the config
    keys it reads. DVC's `foreach` over a list gives no index to pass to the command, so
    per-dataset stages are written out one by one (`format-0`, `format-1`)."""
    import yaml

    stages = {}
    for n in nodes:
        deps = fingerprint.modules_of(n.code()["files"]) + CORE_FILES
        for _, path in n.sources():
            if isinstance(path, str):  # a remote file's identity: nothing in the repo to track
                continue
            path = Path(path)
            # molt's own data files (a built-in template) are deps where the package lies inside
            # the DVC repo; other absolute paths (a model in a venv or a cache) are not tracked
            if path.is_absolute() and path.is_relative_to(fingerprint.PACKAGE_DIR) and path.is_relative_to(Path.cwd()):
                path = path.relative_to(Path.cwd())
            if not path.is_absolute() and ".." not in path.parts:
                deps.append(path.as_posix())
        deps += [f"{publish_dir}/{up.dvc_name}" for up in n.inputs.values()]
        index = "" if n.index is None else f" --index {n.index}" + (" --test" if n.test else "")
        # only keys written in the file: DVC cannot track a default, and config.py (a dep) holds those
        keys = [k for k in dict.fromkeys(n.param_paths) if k in config_keys]
        stages[n.dvc_name] = {"cmd": f"molt stage {config_path} {n.stage}{index}", "deps": list(dict.fromkeys(deps))}
        if keys:
            stages[n.dvc_name]["params"] = keys if config_path == "params.yaml" else [{config_path: keys}]
        stages[n.dvc_name]["outs"] = [f"{publish_dir}/{n.dvc_name}"]
    header = f"# Written by `molt dvc-yaml {config_path}` from molt's stage declarations; regenerate, don't edit.\n"
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
