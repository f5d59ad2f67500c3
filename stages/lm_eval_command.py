"""`molt lm-eval CONFIG`: lm-evaluation-harness benchmarks on the model a config trains (Axolotl's
`axolotl lm-eval`).

Which model: by default the trained model of CONFIG (trained first when it is not cached); an
adapter is merged into its base in memory, as Axolotl evaluates the merged model. `--model-dir DIR`
evaluates that model directory alone (no training). Tasks: `--tasks a,b`, else the config's
`lm_eval_tasks`, else `molt_unit_conversions`, the local multiple-choice task shipped in
pipelines/lm_eval/ (its folder is always on lm-eval's include path). Hub tasks (hellaswag, ...)
run where their data is already in the local Hugging Face cache: the command never goes online.
Writes `{output_dir}/lm_eval/results.json` (what lm-eval's own `--output_path` writes, samples
left out) and prints task / metric / value to stderr.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

TASKS_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "lm_eval"
DEFAULT_TASKS = ["molt_unit_conversions"]


def local_tasks(dest: Path) -> Path:
    """A copy of the shipped task YAMLs in `dest` with their data_files made absolute: lm-eval
    passes data_files to `datasets.load_dataset`, which reads a relative path against the working
    directory, not against the YAML."""
    import yaml

    for source in sorted(TASKS_DIR.glob("*.yaml")):
        task = yaml.safe_load(source.read_text())
        files = (task.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            task["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / path) for split, path in files.items()}
        (dest / source.name).write_text(yaml.safe_dump(task, sort_keys=False))
    return dest


def load_merged(config, model_dir: Path, adapter: Path | None):
    """(model, tokenizer) as molt inference loads them, an adapter merged into its base (lm-eval
    wants a plain transformers model; a quantized base keeps its adapter unmerged)."""
    from stages.inference import _Params, load_model

    model, tokenizer = load_model(_Params(config, False, False), model_dir, adapter or model_dir, adapter)
    if adapter is not None and not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def evaluate(model, tokenizer, tasks: list[str], batch_size: int, include: Path) -> dict:
    """lm-eval's simple_evaluate over `tasks`, JSON-ready (numpy numbers and sets made plain)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from stages.cli import fail

    # indexing lm-eval's ~15k built-in task YAMLs takes seconds: only when a task is not ours
    manager = TaskManager(include_path=str(include), include_defaults=False)
    if set(tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=str(include))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        fail(f"lm-eval: unknown task {', '.join(unknown)} (molt ships {', '.join(DEFAULT_TASKS)}; lm-eval's own are listed by `lm_eval ls tasks`)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, batch_size=batch_size, log_samples=False)
    except (FileNotFoundError, ConnectionError) as error:  # a hub task whose data is not cached
        fail(f"lm-eval {', '.join(tasks)}: its data is not in the local Hugging Face cache and molt does not download it ({error})")
    return json.loads(json.dumps(results, default=handle_non_serializable))


def show(results: dict) -> None:
    """task / metric / value (± stderr when lm-eval computed one) on the console (stderr)."""
    from rich.table import Table

    from stages.ui import console

    table = Table("task", "metric", "value")
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                spread = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
                table.add_row(task, metric, f"{value:.4f}" + (f" ± {spread:.4f}" if isinstance(spread, (int, float)) else ""))
    console.print(table)


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config")
@click.option("--tasks", help="Comma-separated lm-eval task names (default: the config's lm_eval_tasks, else molt_unit_conversions).")
@click.option("--model-dir", type=click.Path(file_okay=False), help="Evaluate this model directory alone (no training).")
@click.option("--cache-dir", envvar="MOLT_CACHE_DIR", default="cache", show_default=True, type=click.Path(file_okay=False), help="Artifact store (or MOLT_CACHE_DIR).")
@click.pass_context
def lm_eval_command(ctx, config, tasks, model_dir, cache_dir):
    """Run lm-evaluation-harness tasks on the trained model of CONFIG (trained first if not
    cached), or on --model-dir; results to {output_dir}/lm_eval/results.json."""
    # before datasets / huggingface_hub are imported: they read these once, at import
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from stages import cli, dag
    from stages.store import DataError
    from stages.ui import console

    cli._CACHE_DIR[:] = [Path(cache_dir).resolve()]
    if model_dir and not (Path(model_dir) / "config.json").is_file():
        cli.fail(f"--model-dir {Path(model_dir).absolute()}: not a model directory (no config.json in it)")
    session = cli.Session(config, ctx.args, cache_dir)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else (session.config.lm_eval_tasks or DEFAULT_TASKS)
    adapter = None
    if model_dir:
        model_dir = Path(model_dir)
    else:
        trained = dag.target(session.values, "train")
        done = session.resolve(session.plan(trained))
        model_dir = session.intact(trained).path / "model"
        if (model_dir / "adapter_config.json").exists():
            model_dir, adapter = done["fetch_model"].artifact.path, model_dir
    console.print(f"lm-eval {', '.join(names)} on {adapter or model_dir}" + (f" merged into {model_dir}" if adapter else ""))
    try:
        model, tokenizer = load_merged(session.config, model_dir, adapter)
    except DataError as error:
        cli.fail(str(error))
    except (OSError, ValueError) as error:  # a directory transformers or peft cannot read
        cli.fail(f"loading {adapter or model_dir}: {error}")
    with tempfile.TemporaryDirectory(prefix="molt-lm-eval-") as include:
        results = evaluate(model, tokenizer, names, session.config.lm_eval_batch_size, local_tasks(Path(include)))
    dest = session.output_dir() / "lm_eval" / "results.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    show(results)
    console.print(f"wrote {dest}")


if __name__ == "__main__":  # `python -m stages.lm_eval_command ...` before stages/cli.py registers the command
    from stages.cli import main

    if "lm-eval" not in main.commands:
        main.add_command(lm_eval_command)
    main()
