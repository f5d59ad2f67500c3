"""`molt train CFG --use-ray` (or `use_ray: true`): Ray Train's TorchTrainer as the launcher of
the train stage.

The driver (this process) builds the data stages once, then starts `ray_num_workers` workers,
each with `resources_per_worker` (default: one GPU where the cluster has GPUs, else one CPU).
TorchTrainer joins them in one torch.distributed group (gloo on CPU, NCCL on GPUs) and sets
RANK / WORLD_SIZE, so each worker is what a torchrun rank is to molt: it plans the same config,
finds the data artifacts in the store, and trains; rank 0 commits the artifact and the other
ranks train into scratch folders that are discarded (stages/dag.py). The driver then copies
the committed model to output_dir, as `molt train` does.

The cluster: RAY_ADDRESS (or a `ray.init` already made in this process, as a test does) names
an existing one; without it Ray starts a local one. On several machines every node needs molt
installed and the same paths: the config, its data files and the cache dir on a shared file
system, and the same working directory for relative paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class RayError(Exception):
    """Ray is missing, or its run failed: worded for the user."""


def train_on_ray(session, target: str, config: str, overrides: list[str], cache_dir: str):
    """Train `target` (the train stage instance) on Ray workers; the Resolution of the committed
    artifact, keyed by the workers' world size."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as error:
        raise RayError(f"use_ray needs Ray Train ({error}): pip install 'molt[ray]'") from None

    nodes = session.plan(target)
    session.resolve([n for n in nodes if n.name != target])  # the data stages: once, here
    cfg = session.config
    # the key the workers' rank 0 commits under: their world size's, as under torchrun, taken now,
    # before they start (a cached one needs no workers)
    session.runner.world_size = cfg.ray_num_workers
    planned = session.runner.resolve(next(n for n in nodes if n.name == target), run=False)
    if planned.artifact is not None:
        return planned
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # a cluster of our own: no dashboard (nothing would look at it)
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    resources = dict(cfg.resources_per_worker or ({"GPU": 1} if ray.cluster_resources().get("GPU") else {"CPU": 1}))
    job = {"cwd": os.getcwd(), "config": str(Path(config).resolve()), "overrides": list(overrides),
           "cache_dir": str(Path(cache_dir).resolve()), "target": target}
    storage = tempfile.mkdtemp(prefix="molt-ray-")  # Ray's run records; molt's results are in the store
    try:
        trainer = TorchTrainer(
            train_worker, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=cfg.ray_num_workers, use_gpu=resources.get("GPU", 0) > 0, resources_per_worker=resources),
            run_config=RunConfig(name=cfg.ray_run_name or "molt-train", storage_path=storage),
        )
        trainer.fit()
    except Exception as error:  # Ray wraps a worker's failure in its own error types
        raise RayError(f"Ray Train failed: {error}") from error
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    planned.artifact = session.store.get(planned.node.stage, planned.key)
    if planned.artifact is None:
        raise RayError(f"Ray Train finished but the store {session.store.root} has no {target} artifact under key {planned.key[:12]}: "
                       "the workers must share the cache dir with this process (a shared file system on several machines), "
                       "and molt's code and the config must not change while they run (they key the artifact as they find them)")
    planned.how = "ran"
    return planned


def train_worker(job: dict) -> None:
    """One Ray Train worker: the train stage as a launcher's rank runs it."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Ray reuses worker processes: what an earlier job set here (RANK, ACCELERATE_USE_CPU, which
    # makes accelerate drop DeepSpeed) must not reach this one
    started_with = dict(os.environ)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(context.get_world_size()))
    if Path(job["cwd"]).is_dir():  # Ray starts workers in a folder of its own
        os.chdir(job["cwd"])
    from stages.cli import Session
    from stages.ui import console

    console.quiet = rank != 0  # rank 0 reports; the others say only what fails
    try:
        session = Session(job["config"], job["overrides"], job["cache_dir"], quiet=rank != 0)
        session.resolve(session.plan(job["target"]))
    except SystemExit as stop:  # molt's own error, printed above by this worker
        raise RuntimeError(f"molt train failed on Ray worker {rank} (exit {stop.code}; its error is printed above)") from None
    finally:
        os.environ.clear()
        os.environ.update(started_with)
