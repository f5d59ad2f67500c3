"""Trackers through transformers' report_to integrations: tensorboard event files, a wandb offline
run, an mlflow local file store; none unless configured, nothing of theirs in the artifact, and a
clear error naming a tracker's package when it is not installed."""

from __future__ import annotations

import json
import os

import pytest

from stages.store import DataError
from stages.train import Params
from stages.training.trackers import trackers


def test_no_tracker_unless_configured():
    assert trackers(Params(learning_rate=1e-3)) == []
    assert trackers(Params(learning_rate=1e-3, wandb_project="p", wandb_mode="disabled")) == []
    assert trackers(Params(learning_rate=1e-3, mlflow_tracking_uri="file:/tmp/x", use_mlflow=False)) == []
    assert trackers(Params(learning_rate=1e-3, use_tensorboard=True, wandb_project="p", mlflow_experiment_name="e")) == ["tensorboard", "wandb", "mlflow"]


def test_a_missing_tracker_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    with pytest.raises(DataError, match=r"use_comet: reporting to comet_ml needs the Python package comet-ml.*pip install comet-ml"):
        trackers(Params(learning_rate=1e-3, use_comet=True, comet_mode="offline"))


def test_trackers_write_their_logs_outside_the_artifact(warm, molt, cache_dir, workdir, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI")}
    store = (workdir / "mlstore").as_uri()
    config = warm(max_steps=3, eval_steps=1, use_tensorboard=True, wandb_project="molt-test", wandb_mode="offline", wandb_name="tiny",
                  mlflow_tracking_uri=store, mlflow_experiment_name="molt-exp")
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    assert {k: os.environ.get(k) for k in before} == before  # the environment is restored
    assert "reporting to wandb: offline, wandb/" in result.output and f"reporting to mlflow: {store}" in result.output
    train = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent
    losses = [h["loss"] for h in json.loads((train / "metrics.json").read_text())["loss_history"]]

    # tensorboard: an event file with the training loss of every logged step
    events = list((workdir / "runs").glob("*/events.out.tfevents.*"))
    assert len(events) == 1, events
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    assert [round(e.value, 4) for e in scalars.Scalars("train/loss")] == [round(x, 4) for x in losses]
    assert len(scalars.Scalars("eval/loss")) == 3

    # wandb: an offline run directory with its records, nothing synced
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("run-*.wandb"))

    # mlflow: the local file store has the run, named by the experiment, with each step's loss
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("molt-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)] == [round(x, 4) for x in losses]

    # none of it went into the content-addressed artifact
    names = {p.name for p in train.rglob("*")}
    assert not {n for n in names if n.startswith(("events.out", "run-", "offline-run"))} and "mlruns" not in names and "wandb" not in names
