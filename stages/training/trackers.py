"""The trackers a run reports to (tensorboard, wandb, mlflow, comet): which ones the config turns
on (trackers, transformers' `report_to` names) and the environment their callbacks read
(tracker_environment). Their logs stay out of the artifact."""

from __future__ import annotations

import contextlib
from pathlib import Path

from stages.store import DataError

# what each tracker needs installed: (report_to name, module, pip package)
TRACKERS = {
    "use_tensorboard": ("tensorboard", "tensorboard", "tensorboard"),
    "wandb_project": ("wandb", "wandb", "wandb"),
    "use_mlflow": ("mlflow", "mlflow", "mlflow-skinny"),
    "use_comet": ("comet_ml", "comet_ml", "comet-ml"),
}


def trackers(params) -> list[str]:
    """transformers `report_to` names of the trackers the config turns on: tensorboard
    (`use_tensorboard`), wandb (a `wandb_project`, unless `wandb_mode: disabled`), mlflow
    (`use_mlflow`, or an `mlflow_tracking_uri` / `mlflow_experiment_name`), comet (`use_comet`).
    None otherwise: nothing is reported anywhere unless configured. A tracker whose package is not
    installed is an error naming it, before any training."""
    import importlib.util

    on = {
        "use_tensorboard": params.use_tensorboard,
        "wandb_project": bool(params.wandb_project) and params.wandb_mode != "disabled",
        "use_mlflow": params.use_mlflow if params.use_mlflow is not None else bool(params.mlflow_tracking_uri or params.mlflow_experiment_name),
        "use_comet": bool(params.use_comet),
    }
    names = []
    for key, (name, module, package) in TRACKERS.items():
        if not on[key]:
            continue
        if importlib.util.find_spec(module) is None:
            raise DataError(f"{key}: reporting to {name} needs the Python package {package}, which is not installed (pip install {package})")
        names.append(name)
    return names


@contextlib.contextmanager
def tracker_environment(params, log):
    """The environment transformers' tracker callbacks read, set for the run and restored after.
    Tracker output stays out of the artifact (its files carry timestamps and run ids, so the
    artifact's bytes would differ run to run): it goes where each tracker puts it relative to the
    working directory: tensorboard `runs/<time>_<host>/`, wandb `wandb/` (or $WANDB_DIR), mlflow
    `mlflow_tracking_uri` (default a file store in `mlruns/`), comet offline archives in
    `.cometml-runs/`. The trackers' own usage telemetry is switched off. `log` is told where each
    tracker reports."""
    import os

    names = trackers(params)
    env = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_ERROR_REPORTING": "false"}
    if "tensorboard" in names:
        import socket
        from datetime import datetime

        env["TENSORBOARD_LOGGING_DIR"] = str(Path("runs") / f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}")
    if "wandb" in names:
        env.update(WANDB_PROJECT=params.wandb_project, WANDB_SILENT="true")
        wandb = {"WANDB_ENTITY": params.wandb_entity, "WANDB_MODE": params.wandb_mode, "WANDB_RUN_ID": params.wandb_run_id, "WANDB_WATCH": params.wandb_watch, "WANDB_LOG_MODEL": params.wandb_log_model}
        env.update({k: v for k, v in wandb.items() if v})
    if "mlflow" in names:
        uri = env["MLFLOW_TRACKING_URI"] = params.mlflow_tracking_uri or Path("mlruns").resolve().as_uri()
        if "://" not in uri or uri.startswith("file:"):
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 wants a database; a local directory is what was asked for
        if params.mlflow_experiment_name:
            env["MLFLOW_EXPERIMENT_NAME"] = params.mlflow_experiment_name
    if "comet_ml" in names:
        mode = (params.comet_mode or "online").lower()
        env["COMET_START_ONLINE"] = "false" if mode == "offline" else "true"
        env["COMET_OFFLINE_DIRECTORY"] = os.environ.get("COMET_OFFLINE_DIRECTORY", ".cometml-runs")
        if params.comet_project_name:
            env["COMET_PROJECT_NAME"] = params.comet_project_name
    where = {"tensorboard": env.get("TENSORBOARD_LOGGING_DIR"), "wandb": f"{params.wandb_mode or 'online'}, {os.environ.get('WANDB_DIR', 'wandb')}/",
             "mlflow": env.get("MLFLOW_TRACKING_URI"), "comet_ml": f"{params.comet_mode or 'online'}"}
    for name in names:
        log(f"  reporting to {name}: {where[name]}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if "wandb" in names:
            import wandb

            if wandb.run is not None:
                wandb.finish()  # writes the offline run's last records
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
