"""The `molt` command: Axolotl's verbs over the stage DAG, plus status, dag, run, gc and stage."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import click
from rich.markup import escape

from stages import dag
from stages.config import ConfigError, MoltConfigWarning, load_config, parse_cli_overrides
from stages.store import DataError, Store, copy_tree, hash_text, list_files, read_table
from stages.ui import console

EXIT_BAD_INPUT = 2
OVERRIDES = {"ignore_unknown_options": True, "allow_extra_args": True}
SYMBOL = {"cached": "[green]✓ cached[/]", "adopted": "[green]✓ adopted[/]", "ran": "[cyan]● built[/]", "missing": "[yellow]○ missing[/]", "blocked": "[yellow]○ waits[/]"}


def fail(message: str, code: int = EXIT_BAD_INPUT):
    console.quiet = False  # every rank of a launcher names its error
    console.print(f"[bold red]error:[/] {escape(message)}")
    sys.exit(code)


_CACHE_DIR: list[Path] = []  # the --cache-dir of this command, for messages about files molt cannot write


def _remember_cache_dir(ctx, param, value):
    _CACHE_DIR[:] = [Path(value).resolve()] if value else []
    return value


def cache_option(f):
    return click.option("--cache-dir", envvar="MOLT_CACHE_DIR", default="cache", show_default=True, type=click.Path(file_okay=False), callback=_remember_cache_dir, help="Artifact store (or MOLT_CACHE_DIR).")(f)


def writable(root: Path) -> bool:
    """Whether molt may create or write the directory `root`: its nearest existing ancestor is a
    directory this process may write to."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    return existing is not None and existing.is_dir() and os.access(existing, os.W_OK)


# a file molt may not create or write: permissions, a read-only file system, a file where a directory should be
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)


class MoltGroup(click.Group):
    """Every command: an OSError about a file molt cannot write (a read-only cache dir, a file in
    the way) is one line naming it, exit 2, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (OSError, dag.StageFailed) as error:
            cause = error.error if isinstance(error, dag.StageFailed) else error
            if not isinstance(cause, OSError) or cause.errno not in _UNWRITABLE:
                raise
            where = Path(cause.filename).absolute() if cause.filename else None
            stage = f"{error.node}: " if isinstance(error, dag.StageFailed) else ""
            cache = _CACHE_DIR[0] if _CACHE_DIR else None
            if where is not None and cache is not None and where.is_relative_to(cache):
                hint = f"the cache dir {cache} must be a directory molt can write (set --cache-dir or MOLT_CACHE_DIR to another one)"
            else:
                hint = "expected a path molt can read and write"
            fail(f"{stage}{where or 'a file'}: {cause.strerror or cause}; {hint}")


def _out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _no_space_message(stage: str, error: OSError, root: Path) -> str:
    return (f"{stage}: ran out of disk space while writing its artifact ({error.strerror}); the store ({root}) keeps no part "
            "of it, only the artifacts finished before; free some space (or `molt gc`) and run again")


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]warning:[/] {escape(note)}")


class Session:
    """A config loaded with its overrides, its stage plan and a runner over the store."""

    _building: str | None = None  # the stage instance being built, for a commit that fails

    def __init__(self, config_path: str, extra_args: list[str], cache_dir: str, published: Path | None = Path("artifacts"), quiet: bool = False,
                 data_only: bool = False):
        """`data_only`: the command builds data stages only, so keys that only training reads and
        molt refuses (config.REFUSED_AT_TRAINING) are named as what `molt train` will refuse."""
        warnings.simplefilter("ignore", MoltConfigWarning)  # printed below, once, in our own words
        try:
            self.config = load_config(config_path, parse_cli_overrides(list(extra_args)), defer_training_refusals=data_only)
        except ConfigError as error:
            _print_notes(error.notes)  # a refused config's ignored and unknown keys are named too, first
            fail(str(error))
        self.store = Store(cache_dir)
        for note in self.config.config_warnings + dag.unread_settings(self.config, self.store.code_memo):
            console.print(f"[yellow]warning:[/] {escape(note)}")
        for refusal in self.config.training_refusals:
            console.print(f"[yellow]warning:[/] {escape(refusal)} (molt train will refuse it; the prepared data does not depend on it)")
        self.config_path = Path(config_path)
        self.values = self.config.model_dump(mode="json")
        if (command := click.get_current_context(silent=True)) is not None:
            command.call_on_close(self.store.release)  # the lease on what it resolved ends with the command
        refs_id = hash_text(str(self.config_path.resolve()))[:16]
        # under a multi-process launcher (accelerate, torchrun) each process has a RANK
        self.rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        # with deepspeed, accelerate must not be told CPU: it would drop DeepSpeed for plain DDP
        # (DeepSpeed's own CPU accelerator runs the ranks over gloo)
        if world_size > 1 and "ACCELERATE_USE_CPU" not in os.environ and not self.config.deepspeed:
            import torch

            if not torch.cuda.is_available():  # else the Trainer's ranks each train alone, on all the data
                os.environ["ACCELERATE_USE_CPU"] = "true"
        self.runner = dag.Runner(self.store, published, refs_id, on_event=None if quiet else self._event, rank=self.rank, world_size=world_size)

    def _event(self, how: str, node: dag.Node, key: str) -> None:
        name = escape(f"{node.name:<16}")  # "[test0]" is not rich markup
        if how == "start":
            self._building = node.name
            console.print(f"  [cyan]▶[/] {name} building [dim]{key[:12]}[/]")
        elif how == "wait":  # `key` is whom it waits for, e.g. "pid 1234"
            console.print(f"  [yellow]⧗ waiting[/]       {name} {escape(key)} is building it; it is reused once done")
        elif how in ("damaged", "damaged-input"):
            where = _shown(self.store.artifact_dir(node.stage, key))
            found = "changed on disk" if how == "damaged" else "found by re-hashing it before it was read"
            console.print(f"[yellow]warning:[/] {escape(node.name)} ({escape(where)}): its files do not match its manifest ({found}); "
                          f"moved to {escape(_shown(self.store.root / 'quarantine' / node.stage / key))}; rebuilding")
        elif how in SYMBOL:
            console.print(f"  {SYMBOL[how]:<24} {name} [dim]{key[:12]}[/]")

    def plan(self, until: str | None = None, pipeline: dag.Pipeline | None = None) -> list[dag.Node]:
        try:
            return dag.plan(self.values, until, pipeline)
        except KeyError as error:
            fail(error.args[0])
        except ConfigError as error:  # a key a planned stage needs is unset (e.g. train's learning_rate)
            fail(f"{self.config_path}: {error}")

    def resolve(self, nodes: list[dag.Node], run: bool = True) -> dict[str, dag.Resolution]:
        try:
            for n in nodes:
                self.runner.resolve(n, run)
        except dag.StageFailed as failure:
            label = f" ({failure.node_label})" if failure.node_label else ""
            if isinstance(failure.error, (DataError, ConfigError)):
                fail(f"{failure.node}{label}: {failure.error}")
            if _out_of_space(failure.error):
                fail(_no_space_message(f"{failure.node}{label}", failure.error, self.store.root))
            raise
        except DataError as error:  # raised while computing a key (a missing source, an unknown type): the config's doing
            fail(f"{self.config_path}: {error}")
        except OSError as error:  # while committing an artifact: the stage that was building is at fault
            if _out_of_space(error):
                fail(_no_space_message(self._building or "molt", error, self.store.root))
            raise
        finally:
            try:
                self.store.index.save()
            except OSError as error:  # a full disk: the index only caches hashes, so it is rebuilt next time
                if not _out_of_space(error):
                    raise
        return self.runner.done

    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def intact(self, name: str):
        """The artifact of a resolved instance, re-hashed before molt copies it out (rebuilt when damaged)."""
        return self.runner.ensure_intact(self.runner.done[name].node).artifact


def _shown(path: Path) -> str:
    """A store path as the user named it: relative to the working directory when inside it."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def check_output_dir(session: Session, dest: Path) -> None:
    """Before any stage runs: `dest` (output_dir) must be a directory molt can create or write."""
    blocker = next((p for p in (dest, *dest.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == dest else f"is inside {blocker}, which is a file"
        fail(f"{session.config_path}: output_dir: {dest} {where} (expected a directory to write the model to, or a path that does not exist yet)")


def _copy_dir(src: Path, dest: Path) -> None:
    """Real copies: users edit and delete what lands in output_dir; the store must not change."""
    dest.mkdir(parents=True, exist_ok=True)
    copy_tree(src, dest, link=False, skip=("manifest.json",))


def _write_card(session: Session, artifact, dest: Path) -> None:
    card, chain = dag.model_card(session.store, artifact, f"{dest.name} (fine-tuned from {session.config.base_model})")
    (dest / "README.md").write_text(card)
    (dest / "lineage.json").write_text(json.dumps(chain, indent=1))


@click.group(cls=MoltGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="molt")
def main():
    """molt: post-training as a DAG of cached, content-addressed stages."""


@main.command(context_settings=OVERRIDES)
@click.argument("config")
@cache_option  # accepted as every command accepts it; check reads no artifact
@click.pass_context
def check(ctx, config, cache_dir):
    """Load and validate CONFIG, running nothing: every refused key with its reason, every ignored
    key with what molt does instead and every unknown key with the nearest known name, all at once.
    Exit 2 if anything is refused, else 0. The same as `molt preprocess CONFIG --dry-run`."""
    check_config(config, ctx.args)


def check_config(config: str, extra_args: list[str]) -> None:
    warnings.simplefilter("ignore", MoltConfigWarning)  # printed below, once, in our own words
    try:
        cfg = load_config(config, parse_cli_overrides(list(extra_args)))
    except ConfigError as error:
        _print_notes(error.notes)
        refused = sum(line.startswith("  - ") for line in str(error).splitlines()) or 1
        console.print(f"{escape(config)}: {refused} refused, {len(error.notes)} warned")
        fail(str(error))
    notes = cfg.config_warnings + dag.unread_settings(cfg)
    _print_notes(notes)
    values = cfg.model_dump(mode="json")
    try:  # the stages preprocess would build: a key one of them needs and cannot do without is refused here too
        nodes = dag.plan(values, dag.target(values, "data"))
    except (KeyError, ConfigError) as error:
        console.print(f"{escape(config)}: 1 refused, {len(notes)} warned")
        fail(f"{config}: {error.args[0] if isinstance(error, KeyError) else error}")
    console.print(f"{escape(config)}: nothing refused, {len(notes)} warned; preprocess would build {len(nodes)} stage instances")


@main.command(context_settings=OVERRIDES)
@click.argument("config")
@click.option("--debug", is_flag=True, help="Print tokens as text(label, id).")
@click.option("--debug-num-examples", default=1, show_default=True)
@click.option("--debug-text-only", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Only load and validate the config, as `molt check` (exit 2 if anything is refused).")
@cache_option
@click.pass_context
def preprocess(ctx, config, debug, debug_num_examples, debug_text_only, dry_run, cache_dir):
    """Fetch, format, tokenize, mix and pack the datasets of CONFIG."""
    if dry_run:
        return check_config(config, ctx.args)
    session = Session(config, ctx.args, cache_dir, data_only=True)
    done = session.resolve(session.plan(dag.target(session.values, "data")))
    mix = session.intact("mix")
    prepared = Path(session.config.dataset_prepared_path or "last_run_prepared") / mix.key
    _save_prepared(mix.path, prepared)
    console.print(f"prepared dataset: {prepared}  ({mix.manifest['rows']} train rows, {mix.manifest['val_rows']} validation rows)")
    if debug:
        tokenizer = done["tokenizer"].artifact.path / "tokenizer.json"
        show_examples(mix.path / "train.arrow", tokenizer, debug_num_examples, debug_text_only)


def _save_prepared(mix_dir: Path, dest: Path) -> None:
    """Mirror the mixed dataset as `datasets.save_to_disk`, as Axolotl users expect to inspect it:
    `datasets.load_from_disk(dest)` gives a DatasetDict with `train` and, when there are held-out
    rows (`val_set_size` or `test_datasets`), `validation`. With no held-out rows there is no
    `validation` split, as Axolotl has no eval set then (an empty split saved by `datasets` has no
    Arrow file and does not load back). A folder written with another set of splits is rewritten.
    The folder is named by the mix key, so a concurrent `molt preprocess` that placed it first
    placed the same content: this one then keeps that one."""
    import tempfile

    from stages.store import owned_name, owner_of, process_alive

    splits = {"train": read_table(mix_dir / "train.arrow"), "validation": read_table(mix_dir / "val.arrow")}
    splits = {k: t for k, t in splits.items() if k == "train" or t.num_rows}

    def placed() -> bool:
        try:
            return json.loads((dest / "dataset_dict.json").read_text()).get("splits") == list(splits)
        except (OSError, ValueError):
            return False

    if placed():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}-*.tmp"):  # of a killed preprocess
        owner = owner_of(leftover.name.removesuffix(".tmp"))
        if owner is not None and not process_alive(*owner):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=owned_name(f".{dest.name}"), suffix=".tmp", dir=dest.parent))
    try:
        write_dataset_dict(splits, tmp, fingerprint=dest.name[:16])
        if placed():  # another process finished first
            return
        aside = dest.parent / f"{owned_name(f'.{dest.name}')}old.tmp"
        try:  # another set of splits: moved aside whole (a rename), then removed
            os.rename(dest, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process placed it between the two renames
            if not placed():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# datasets' Value dtypes for the Arrow types they are named after
_VALUE_DTYPES = {"null", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "halffloat", "float", "double",
                 "string", "large_string", "binary", "large_binary"}
_DTYPE_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}


def dataset_features(arrow_type):
    """What `datasets.Features.from_arrow_schema` makes of an Arrow type, as its `to_dict()`;
    None for a type this table does not cover (then datasets itself writes the folder)."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        fields = {arrow_type.field(i).name: dataset_features(arrow_type.field(i).type) for i in range(arrow_type.num_fields)}
        return None if None in fields.values() else fields
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        feature = dataset_features(arrow_type.value_type)
        if feature is None:
            return None
        length = {"length": arrow_type.list_size} if pa.types.is_fixed_size_list(arrow_type) else {}
        return {"feature": feature, **length, "_type": "LargeList" if pa.types.is_large_list(arrow_type) else "List"}
    name = str(arrow_type)
    return {"dtype": _DTYPE_NAMES.get(name, name), "_type": "Value"} if name in _VALUE_DTYPES else None


def write_dataset_dict(splits: dict, dest: Path, fingerprint: str) -> None:
    """Write Arrow tables as `datasets.DatasetDict(...).save_to_disk(dest)` lays them out (one
    shard a split), with pyarrow alone: importing datasets costs more than a small preprocess.
    Column types outside `dataset_features`' table go through datasets itself."""
    import pyarrow as pa

    features = {k: {f.name: dataset_features(f.type) for f in t.schema} for k, t in splits.items()}
    if any(None in f.values() for f in features.values()):
        import datasets

        datasets.disable_progress_bars()
        shards = {k: (None if t.num_rows else 1) for k, t in splits.items()}  # an empty train split still gets its Arrow file
        datasets.DatasetDict({k: datasets.Dataset(t) for k, t in splits.items()}).save_to_disk(str(dest), num_shards=shards)
        return
    for split, table in splits.items():
        folder = dest / split
        folder.mkdir(parents=True)
        metadata = {"huggingface": json.dumps({"info": {"features": features[split]}})}
        table = table.replace_schema_metadata(metadata)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1000)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": fingerprint, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = {"citation": "", "description": "", "features": features[split], "homepage": "", "license": ""}
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (dest / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))


def show_examples(arrow: Path, tokenizer_json: Path, count: int, text_only: bool) -> None:
    """The first rows' tokens as text(label, id): red where the loss ignores them, green where it
    trains. A preference row shows its prompt (never trained) and then each answer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    table = read_table(arrow).slice(0, count)

    def show(ids: list[int], labels: list[int]) -> str:
        parts = []
        for token_id, label in zip(ids, labels):
            text = tokenizer.decode([token_id], skip_special_tokens=False).replace("[", "\\[")
            colour = "red" if label == -100 else "green"
            parts.append(f"[{colour}]{text}[/]" if text_only else f"[{colour}]{text}({label}, {token_id})[/]")
        return ("" if text_only else " ").join(parts)

    for row in table.to_pylist():
        if "prompt_ids" in row:
            console.print("[bold]prompt:[/] " + show(row["prompt_ids"], [-100] * len(row["prompt_ids"])), soft_wrap=True)
            for side in ("chosen", "rejected", "completion"):
                if f"{side}_ids" in row:
                    label = f" (label {row['label']})" if side == "completion" else ""
                    console.print(f"[bold]{side}{label}:[/] " + show(row[f"{side}_ids"], row[f"{side}_ids"]), soft_wrap=True)
        elif "token_labels" in row:
            console.print(show(row["input_ids"], row["token_labels"]), soft_wrap=True)
        else:
            console.print(show(row["input_ids"], row["labels"]), soft_wrap=True)
        console.print()


class LauncherCommand(click.Command):
    """Arguments after `--` are the launcher's (`--launcher accelerate -- --num_processes 2`):
    click would otherwise mix them into the config overrides."""

    def parse_args(self, ctx, args):
        if "--" in args:
            cut = args.index("--")
            args, ctx.meta["launcher_args"] = args[:cut], args[cut + 1 :]
        return super().parse_args(ctx, args)


LAUNCHERS = {"accelerate": ["-m", "accelerate.commands.launch"], "torchrun": ["-m", "torch.distributed.run"]}


def launch(launcher: str, launcher_args: list[str], command: list[str]) -> None:
    """Replace this process with `launcher [launcher_args] -m stages.cli COMMAND`: every process it
    starts runs molt with its own RANK (the stage contract in stages/dag.py says how the stages share the work)."""
    launcher_args = list(launcher_args)
    if launcher == "accelerate" and "--cpu" in launcher_args and "--mpirun_hostfile" not in launcher_args and _processes(launcher_args) > 1:
        # `accelerate launch --cpu` starts one process unless MPI is set up; its torchrun path
        # (--multi_gpu) starts them all, and ACCELERATE_USE_CPU makes them a gloo group on CPU
        launcher_args[launcher_args.index("--cpu")] = "--multi_gpu"
        os.environ["ACCELERATE_USE_CPU"] = "true"
    argv = [sys.executable, *LAUNCHERS[launcher], *launcher_args, "-m", "stages.cli", *command]
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, argv)


def _processes(launcher_args: list[str]) -> int:
    for i, arg in enumerate(launcher_args):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (launcher_args[i + 1] if i + 1 < len(launcher_args) else "1")
            return int(value) if value.isdigit() else 1
    return 1


@main.command(cls=LauncherCommand, context_settings=OVERRIDES)
@click.argument("config")
@click.option("--launcher", type=click.Choice(["python", *LAUNCHERS]), default="python", show_default=True, help="python: this process; accelerate / torchrun: start the processes they are told after `--`.")
@cache_option
@click.pass_context
def train(ctx, config, launcher, cache_dir):
    """Prepare the data if needed and fine-tune; the model lands in output_dir.

    Multi-process: `molt train CONFIG --launcher accelerate -- --cpu --num_processes 2` (GPUs:
    --multi_gpu), `--launcher torchrun -- --nproc_per_node 2`, or molt started by a launcher
    (`torchrun --nproc_per_node 2 -m stages.cli train CONFIG`). The data stages are built once;
    every rank trains, rank 0 stores the model and writes output_dir. Several machines: the same
    command on each, `--launcher torchrun -- --nnodes N --nproc_per_node G --rdzv_backend c10d
    --rdzv_endpoint HOST:PORT`. Sharded (FSDP / FSDP2): fsdp / fsdp_config in the config. `--use-ray` (use_ray:
    true): Ray Train's workers train (ray_num_workers, resources_per_worker; RAY_ADDRESS names
    an existing cluster)."""
    launcher_args = ctx.meta.get("launcher_args", [])
    if launcher != "python":
        warnings.simplefilter("ignore", MoltConfigWarning)  # each rank's molt names them
        try:  # a bad config fails here, once, rather than in every process
            loaded = load_config(config, parse_cli_overrides(list(ctx.args)))
        except ConfigError as error:
            _print_notes(error.notes)
            fail(str(error))
        if loaded.use_ray:
            fail(f"--launcher {launcher} with use_ray: Ray Train starts the workers itself (ray_num_workers); drop --launcher")
        return launch(launcher, launcher_args, ["train", config, *ctx.args, "--cache-dir", cache_dir])
    if launcher_args:
        fail(f"arguments after `--` ({' '.join(launcher_args)}) are for a launcher: add --launcher accelerate or --launcher torchrun")
    if int(os.environ.get("RANK", "0")):
        console.quiet = True  # rank 0 reports; the others say only what fails
    session = Session(config, ctx.args, cache_dir)
    check_output_dir(session, session.output_dir())
    trained = dag.target(session.values, "train")
    if session.config.use_ray:  # Ray Train's workers run the train stage (stages/ray_train.py)
        from stages.ray_train import RayError, train_on_ray

        try:
            train_on_ray(session, trained, config, list(ctx.args), cache_dir)
        except RayError as error:
            fail(str(error))
    else:
        session.resolve(session.plan(trained))
    if session.rank:
        return
    artifact = session.intact(trained)
    _copy_dir(artifact.path / "model", session.output_dir())
    for extra in ("metrics.json", "loss.png", "profiler_trace.json"):  # the trace only with profiler_steps
        if (artifact.path / extra).exists():
            shutil.copy2(artifact.path / extra, session.output_dir() / extra)
    _write_card(session, artifact, session.output_dir())
    metrics = artifact.manifest.get("metrics", {})
    console.print(f"model written to {session.output_dir()}  (loss curve: {session.output_dir() / 'loss.png'})")
    if metrics.get("eval_loss_before") is not None:
        before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
        console.print(f"held-out loss: {before:.4f} → {after:.4f}  ({(before - after) / before:+.1%} better)")


@main.command("merge-lora", context_settings=OVERRIDES)
@click.argument("config")
@cache_option
@click.pass_context
def merge_lora(ctx, config, cache_dir):
    """Merge the trained LoRA adapter into the base model: {output_dir}/merged. With
    --lora-model-dir DIR, merge that adapter (a checkpoint or any peft adapter directory) as it
    is, without training."""
    session = Session(config, ctx.args, cache_dir)
    given = "lora_model_dir" in parse_cli_overrides(list(ctx.args))
    if not session.config.adapter and not given:
        fail("merge-lora: the config trains no adapter (set adapter: lora, or give --lora-model-dir)")
    if session.config.relora_steps and not given:
        fail(f"merge-lora: with relora_steps the adapter is merged at every restart and `molt train` already writes the full model to {session.output_dir()}; nothing to merge")
    check_output_dir(session, session.output_dir() / "merged")
    done = session.resolve(session.plan("merge", dag.MERGE_GIVEN_ADAPTER if given else None))
    dest = session.output_dir() / "merged"
    merged = session.intact("merge")
    _copy_dir(merged.path, dest)
    _write_card(session, merged, dest)
    console.print(f"merged model written to {dest}")


@main.command("merge-sharded-fsdp-weights", context_settings=OVERRIDES)
@click.argument("config")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A checkpoint-N folder to merge (default: the newest checkpoint of this config's last `molt train`).")
@cache_option
@click.pass_context
def merge_sharded_fsdp_weights(ctx, config, checkpoint_dir, cache_dir):
    """One safetensors model from a sharded FSDP checkpoint (fsdp_state_dict_type: SHARDED_STATE_DICT):
    {output_dir}/merged, with the trained model's config and the tokenizer, loadable as it is.
    `molt train` already writes the final model whole; this merges a checkpoint saved on the way."""
    from stages.training.sharding import merge_sharded_weights

    session = Session(config, ctx.args, cache_dir)
    if session.config.adapter:
        fail("merge-sharded-fsdp-weights: the config trains a LoRA adapter, which `molt train` gathers whole into output_dir; "
             "molt merge-lora merges it into the base model")
    key = session.runner.refs().get("train")  # the last train of this config: its key holds the world size it ran with
    artifact = session.store.get("train", key) if key else None
    if checkpoint_dir is None:
        if artifact is None:
            fail(f"merge-sharded-fsdp-weights: {config} has no trained model in {cache_dir}: run molt train {config} --launcher ... first, or give --checkpoint DIR")
        saved = sorted((artifact.path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        if not saved:
            fail(f"merge-sharded-fsdp-weights: the trained artifact {_shown(artifact.path)} kept no checkpoints (set save_steps or saves_per_epoch)")
        checkpoint_dir = saved[-1]
    dest = session.output_dir() / "merged"
    check_output_dir(session, dest)
    try:
        written = merge_sharded_weights(Path(checkpoint_dir), dest)
    except DataError as error:
        fail(f"merge-sharded-fsdp-weights: {error}")
    if artifact is not None:  # config.json and the tokenizer: the merged weights load as a model
        for p in (artifact.path / "model").iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(p, dest / p.name)
    console.print(f"merged {_shown(Path(checkpoint_dir))} into {_shown(written)}")


@main.command(context_settings=OVERRIDES)
@click.argument("config")
@cache_option
@click.pass_context
def evaluate(ctx, config, cache_dir):
    """Held-out loss and perplexity of the trained model (training it if needed), with generation
    metrics when eval_causal_lm_metrics lists them: {output_dir}/eval/ (metrics.json, report.html,
    metrics.png). With --lora-model-dir DIR or --base-model DIR: that model, nothing trained."""
    session = Session(config, ctx.args, cache_dir)
    given = {"lora_model_dir", "base_model"} & set(parse_cli_overrides(list(ctx.args)))
    if session.config.rl or session.config.reward_model or session.config.process_reward_model:
        fail("evaluate: preference and reward models report their held-out metrics in metrics.json of molt train")
    dest = session.output_dir() / "eval"
    check_output_dir(session, dest)
    session.resolve(session.plan("evaluate", dag.EVALUATE_GIVEN_MODEL if given else None))
    report = session.intact("evaluate")
    _copy_dir(report.path, dest)
    metrics = report.manifest.get("metrics", {})
    if metrics.get("validation"):
        console.print(f"held-out loss {metrics['validation']['loss']:.4f}, perplexity {metrics['validation']['perplexity']:.3f} ({metrics['validation']['tokens']} tokens)")
    for name, found in (metrics.get("by_dataset") or {}).items():
        if found and len(metrics["by_dataset"]) > 1:
            console.print(f"  {escape(name)}: loss {found['loss']:.4f}, perplexity {found['perplexity']:.3f}")
    for name, value in (metrics.get("generation") or {}).items():
        console.print(f"  {name}: {value}")
    console.print(f"report: {dest / 'report.html'}")


@main.command(context_settings=OVERRIDES)
@click.argument("config")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default=None, help="export_format (default safetensors)")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None, help="export_outtype (default f16; q8_0 is GGUF only)")
@cache_option
@click.pass_context
def export(ctx, config, fmt, outtype, cache_dir):
    """The trained (with an adapter, merged) model as safetensors, or as one GGUF file for
    llama.cpp and Ollama: {output_dir}/export."""
    args = list(ctx.args) + (["--export-format", fmt] if fmt else []) + (["--export-outtype", outtype] if outtype else [])
    session = Session(config, args, cache_dir)
    if session.config.reward_model or session.config.process_reward_model:
        fail("export: a reward model is a classifier, not a language model llama.cpp or Ollama runs; its weights are in output_dir")
    dest = session.output_dir() / "export"
    check_output_dir(session, dest)
    session.resolve(session.plan("export"))
    artifact = session.intact("export")
    _copy_dir(artifact.path, dest)
    console.print(f"exported model written to {dest}" + ("  (ollama create NAME -f Modelfile)" if (dest / "Modelfile").exists() else ""))


@main.command(context_settings=OVERRIDES)
@click.argument("config")
@click.option("--only", help="Run just this stage (its inputs must be cached).")
@click.option("--until", help="Run this stage and everything it needs.")
@cache_option
@click.pass_context
def run(ctx, config, only, until, cache_dir):
    """Run the whole pipeline of CONFIG (or part of it)."""
    session = Session(config, ctx.args, cache_dir)
    nodes = session.plan(until or only)
    if only:
        targets = [n for n in nodes if only in (n.stage, n.name)]
        for n in nodes:
            if n not in targets:
                res = session.runner.resolve(n, run=False)
                if res.artifact is None:
                    fail(f"--only {only}: its input {n.name} is not cached; run with --until {only}")
    session.resolve(nodes)


@main.command()
@click.argument("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@cache_option
def status(config, as_json, cache_dir):
    """Each stage instance: cached, stale (and why) or missing. Computes nothing."""
    session = Session(config, [], cache_dir, quiet=True)
    nodes = session.plan()
    if not writable(session.store.root):  # status needs nothing written: the stat index only saves re-hashing next time
        session.store.index.save = lambda: None
        console.print(f"note: the cache dir {session.store.root} is not writable: its stat index is not updated (files are re-hashed next time)")
    done = session.resolve(nodes, run=False)
    refs = session.runner.refs()
    rows = []
    for n in nodes:
        res = done[n.name]
        row = {"stage": n.name, "key": res.key, "state": "cached" if res.artifact else "missing", "why": []}
        if res.damaged is not None and res.damaged.path != session.store.artifact_dir(n.stage, res.key):
            row["why"] = ["quarantined: its files did not match its manifest (the next run rebuilds it)"]
        elif res.damaged is not None:  # its downstream keys still come from the content its manifest records
            row["state"], row["why"] = "corrupt", ["files changed on disk: they do not match the manifest (the next run rebuilds it)"]
        elif res.artifact is None and n.name in refs:
            old = session.store.artifact_dir(n.stage, refs[n.name]) / "manifest.json"
            if old.exists():
                row["state"] = "stale"
                current = res.record or session.runner.record(n, {})
                reasons = dag.why_changed(json.loads(old.read_text()), current)
                if res.record is None:
                    reasons = [r for r in reasons if not r.startswith("input ")]
                    waits = [u.name for u in n.inputs.values() if done[u.name].artifact is None]
                    reasons.append(f"after {', '.join(waits)}")
                row["why"] = reasons
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table("stage", "state", "key", "why")
    colour = {"cached": "green", "stale": "yellow", "missing": "red", "corrupt": "red"}
    for r in rows:
        table.add_row(escape(r["stage"]), f"[{colour[r['state']]}]{r['state']}[/]", (r["key"] or "-")[:12], escape("; ".join(r["why"])))
    console.print(table)


@main.command("dag")
@click.argument("config")
@click.option("--mermaid", is_flag=True, help="Print a mermaid flowchart.")
@cache_option
def show_dag(config, mermaid, cache_dir):
    """The stage instances of CONFIG and their inputs."""
    session = Session(config, [], cache_dir, quiet=True)
    nodes = session.plan()
    if mermaid:
        click.echo("flowchart LR")
        ident = {n.name: f"n{i}" for i, n in enumerate(nodes)}
        for n in nodes:
            click.echo(f'  {ident[n.name]}["{n.name}"]')
        for n in nodes:
            for role, up in n.inputs.items():
                click.echo(f"  {ident[up.name]} -->|{role}| {ident[n.name]}")
        return
    for n in nodes:
        ins = ", ".join(f"{role}={up.name}" for role, up in n.inputs.items())
        click.echo(f"{n.name:<18} <- {ins}" if ins else n.name)


@main.command()
@click.option("--dry-run", is_flag=True)
@cache_option
def gc(dry_run, cache_dir):
    """Delete artifacts that no config's last run used, and checkpoints and temp dirs killed runs
    left behind. What a running molt process uses (its lease), or built since the oldest run in
    flight began, is kept."""
    from filelock import Timeout

    from stages.store import MANIFEST

    store = Store(cache_dir)
    keep = set()
    for refs in (store.root / "refs").glob("*.json"):
        keep.update(json.loads(refs.read_text()).values())
    freed = 0

    def drop(stage: str, key: str, path: Path, what: str = "") -> None:
        nonlocal freed
        size = sum(p.stat().st_size for p in list_files(path))
        freed += size
        console.print(f"{'would remove' if dry_run else 'removed'} {stage}/{key[:12]}{what} ({size / 1e6:.1f} MB)")
        if not dry_run:
            shutil.rmtree(path)

    def kept(stage: str, key: str, why: str) -> None:
        console.print(f"kept {stage}/{key[:12]}: {why}")

    # a run adds a key to its lease under this lock before it looks the key up, so no run finds
    # an artifact that this gc then deletes
    with store.gc_lock():
        leases = store.live_leases(prune=not dry_run)
        users = {entry: lease["pid"] for lease in leases for entry in lease["keys"]}
        oldest = min(leases, key=lambda lease: lease["since"], default=None)
        for artifact in store.artifacts():
            if artifact.key in keep:
                continue
            if (pid := users.get(f"{artifact.stage}/{artifact.key}")) is not None:
                kept(artifact.stage, artifact.key, f"in use by molt pid {pid}")
            elif oldest is not None and (artifact.path / MANIFEST).stat().st_mtime >= oldest["since"] - 1:  # coarse fs clocks
                kept(artifact.stage, artifact.key, f"built since molt pid {oldest['pid']} started, which still runs")
            else:
                drop(artifact.stage, artifact.key, artifact.path)
        for partial in sorted(store.root.glob("*/*.partial")):
            stage, key = partial.parent.name, partial.name.removesuffix(".partial")
            if f"{stage}/{key}" in users:  # a run that may resume from them is in flight
                continue
            try:
                with store.lock(stage, key).acquire(timeout=0):  # held: a run is writing there now
                    drop(stage, key, partial, " checkpoints of an unfinished run")
            except Timeout:
                continue
        for leftover in store.sweep(dry_run=True):
            size = sum(p.stat().st_size for p in list_files(leftover))
            freed += size
            console.print(("would remove" if dry_run else "removed") + f" tmp/{leftover.name}: left by a killed run ({size / 1e6:.1f} MB)")
        if not dry_run:
            store.sweep()
    console.print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB")


@main.command()
@click.argument("config")
@click.argument("stage")
@click.option("--index", type=int, help="Dataset index for per-dataset stages.")
@click.option("--test", is_flag=True, help="Index into test_datasets instead of datasets.")
@click.option("--publish-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False))
@cache_option
def stage(config, stage, index, test, publish_dir, cache_dir):
    """Build one stage instance and publish it under --publish-dir (the command dvc.yaml runs)."""
    name = stage if index is None else f"{stage}[{'test' if test else ''}{index}]"
    session = Session(config, [], cache_dir, published=Path(publish_dir))
    nodes = session.plan(name)
    done = session.resolve(nodes)
    dest = dag.publish_node(done[name], Path(publish_dir))
    console.print(f"published {escape(name)} at {dest}")


@main.command()
@click.argument("config", required=False)
@click.option("--store", "whole_store", is_flag=True, help="Re-hash every artifact in the store instead; quarantine those that do not match their manifest.")
@click.option("--remove", is_flag=True, help="With --store: delete damaged artifacts instead of quarantining them.")
@cache_option
def verify(config, whole_store, remove, cache_dir):
    """Recompute the data stages of CONFIG into a scratch store and compare with the stored
    artifacts; or, with --store, re-hash every stored artifact against its manifest."""
    import tempfile

    from rich.table import Table

    if whole_store:
        return verify_store(Store(cache_dir), remove)
    if remove:
        fail("--remove goes with --store")
    if config is None:
        fail("molt verify CONFIG (recompute its data stages) or molt verify --store (re-hash every artifact)")
    session = Session(config, [], cache_dir, quiet=True)
    nodes = session.plan(dag.target(session.values, "data"))
    stored = session.resolve(nodes, run=False)
    with tempfile.TemporaryDirectory(prefix="molt-verify-") as scratch:
        fresh = dag.Runner(Store(scratch), on_event=lambda how, node, key: how == "start" and console.print(f"  recomputing {escape(node.name)}"))
        try:
            recomputed = {n.name: fresh.resolve(n) for n in nodes}
        except dag.StageFailed as failure:
            fail(f"recomputing {failure.node}: {failure.error}", code=1)
        table = Table("stage", "stored", "recomputed", "match")
        first_bad, missing = None, []
        for n in nodes:
            new = recomputed[n.name].artifact
            path = session.store.artifact_dir(n.stage, new.key)
            old = dag.stored_content(path)
            if old is None:
                missing.append(n.name)
                verdict = "[yellow]not built[/]"
            elif old == new.content:
                verdict = "[green]yes[/]"
            else:
                verdict = "[red]NO[/]"
                first_bad = first_bad or (n, path, new.path)
            table.add_row(escape(n.name), (old or "-")[:16], new.content[:16], verdict)
        console.print(table)
        if first_bad:
            node, old_dir, new_dir = first_bad
            fail(f"{node.name} does not reproduce: {dag.first_difference(old_dir, new_dir)}", code=1)
        if missing:
            fail(f"not in the store, nothing to compare: {', '.join(missing)} (run `molt preprocess {config}` first)", code=1)
    console.print("[green]every data stage reproduces[/]")


def verify_store(store: Store, remove: bool) -> None:
    """Re-hash every artifact's files (the stat index not trusted) against its manifest; move
    those that do not match to quarantine/<stage>/<key> (or delete them); exit 1 if any."""
    from stages.store import MANIFEST, hash_tree

    reserved = {"tmp", "quarantine", "index", "locks", "refs", "leases"}
    checked, damaged = 0, []
    for manifest_path in sorted(store.root.glob(f"*/*/{MANIFEST}")):
        path = manifest_path.parent
        stage, key = path.parent.name, path.name
        if stage in reserved or key.endswith(".partial"):
            continue
        checked += 1
        try:
            manifest = json.loads(manifest_path.read_text())
            why = None if manifest.get("key") == key else "its manifest names another key"
            if why is None and hash_tree(path) != manifest.get("content"):
                why = "its files do not match its manifest"
        except (OSError, ValueError) as error:
            why = f"unreadable ({error})"
        if why is None:
            continue
        with store.lock(stage, key):
            dest = store.quarantine(stage, key, remove=remove)
        store.index.save()
        damaged.append(f"{stage}/{key}")
        console.print(f"[red]damaged:[/] {escape(_shown(path))}: {escape(why)}; " + ("removed" if remove else f"moved to {escape(_shown(dest))}"))
    if damaged:
        fail(f"{len(damaged)} of {checked} artifacts did not match their manifests ({'removed' if remove else 'quarantined'}); the next run rebuilds them", code=1)
    console.print(f"[green]all {checked} artifacts match their manifests[/]")


@main.command()
@click.argument("target")
@cache_option
def lineage(target, cache_dir):
    """The chain from an artifact (key, key prefix or path) back to its source files."""
    store = Store(cache_dir)
    try:
        chain = dag.lineage(store, target)
    except LookupError as error:
        fail(str(error))
    for depth, artifact in chain:
        m = artifact.manifest
        pad = "  " * depth
        console.print(f"{pad}[bold]{m['stage']}[/] {artifact.key}  content {m['content'][:16]}")
        if m.get("params"):
            console.print(f"{pad}  params {escape(json.dumps(m['params'], sort_keys=True))}")
        console.print(f"{pad}  code {escape(', '.join(f'{f}@{h[:8]}' for f, h in m['code']['files'].items()))}")
        if m["code"].get("libs"):
            console.print(f"{pad}  libs {escape(', '.join(f'{k}=={v}' for k, v in m['code']['libs'].items()))}")
        for role, content in m.get("inputs", {}).items():
            console.print(f"{pad}  input {role} {content[:16]}")
        for label, digest in m.get("sources", {}).items():
            console.print(f"{pad}  source {escape(label)} {digest}")


@main.command(context_settings=OVERRIDES)
@click.pass_context
def push(ctx):
    """`dvc push --run-cache`: published artifacts and the run records that point at them."""
    _dvc(["push", "--run-cache", *ctx.args])


@main.command(context_settings=OVERRIDES)
@click.pass_context
def pull(ctx):
    """`dvc pull --run-cache`; molt then adopts the pulled artifacts instead of recomputing."""
    _dvc(["pull", "--run-cache", *ctx.args])


def _dvc(args: list[str]) -> None:
    import subprocess

    dvc = Path(sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc) if dvc.exists() else "dvc", *args])
    sys.exit(done.returncode)


@main.command("dvc-yaml")
@click.argument("config", default="params.yaml")
@click.option("--output", default="dvc.yaml", show_default=True)
def dvc_yaml(config, output):
    """Write dvc.yaml for CONFIG from the same stage declarations molt runs."""
    session = Session(config, [], "cache", quiet=True)
    import yaml

    written = set(yaml.safe_load(Path(config).read_text()) or {})
    text = dag.dvc_yaml(session.plan(), config, written)
    Path(output).write_text(text)
    console.print(f"wrote {output}")


# what `molt fetch` copies: {what: (folder, default dest)}
FETCHED = {"examples": (Path(__file__).resolve().parent.parent / "pipelines", "examples"),
           "deepspeed_configs": (Path(__file__).resolve().parent / "deepspeed_configs", "deepspeed_configs")}


@main.command()
@click.argument("what", type=click.Choice(list(FETCHED)))
@click.option("--dest", default=None, help="Where to copy them (default: examples, deepspeed_configs).")
def fetch(what, dest):
    """Copy molt's ready configs (examples: the pipelines and their data; deepspeed_configs: the
    ZeRO 1/2/3 JSON files a config's `deepspeed:` names) into DEST."""
    source, default = FETCHED[what]
    dest = dest or default
    if not source.is_dir():
        fail(f"no {what} folder at {source}")
    _copy_dir(source, Path(dest))
    console.print(f"copied {len(list_files(source))} files to {dest}")


from stages.inference import inference  # noqa: E402  (it imports stages.cli only inside the command)

main.add_command(inference)
from stages.lm_eval_command import lm_eval_command  # noqa: E402  (it imports stages.cli only inside the command)

main.add_command(lm_eval_command)


if __name__ == "__main__":
    main()
