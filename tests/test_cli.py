"""CLI behaviour beyond the invalidation matrix: warnings, overrides, dag, gc, --only."""

from __future__ import annotations

from pathlib import Path

from conftest import ALL_NODES, artifact_dirs, status_rows


def test_keys_no_stage_reads_are_named_not_dropped(make_config, molt):
    config = make_config(sequence_parallel_degree=2, dataloader_num_workers=4, lora_mlp_kernel=True)
    result = molt("status", config)
    assert result.exit_code == 0, result
    for note in ("sequence_parallel_degree: 2 — not supported yet: molt trains unsharded on one process (DDP with --launcher)",
                 "dataloader_num_workers: 4 — not supported yet: molt loads the batches in the training process (no workers, no pinned memory)",
                 "lora_mlp_kernel: true — not supported yet: molt runs PEFT's LoRA layers (same result, without a fused kernel)"):
        assert f"warning: {note}" in result.output
    assert result.output.count("lora_mlp_kernel") == 1


def test_keys_that_would_change_the_model_are_refused(make_config, molt):
    result = molt("status", make_config(kd_trainer=True))
    assert result.exit_code == 2, result
    assert "kd_trainer: true is not supported yet: knowledge distillation" in result.output


def test_a_refused_config_names_its_ignored_and_unknown_keys_first(make_config, molt):
    result = molt("status", make_config(kd_trainer=True, sequence_parallel_degree=2, colour="red"))
    assert result.exit_code == 2, result
    warned = "warning: sequence_parallel_degree: 2 — not supported yet: molt trains unsharded on one process (DDP with --launcher)"
    unknown = "warning: unknown key: colour (not an Axolotl or molt option)"
    refused = "kd_trainer: true is not supported yet"
    assert warned in result.output and unknown in result.output
    assert result.output.index(warned) < result.output.index(refused) and result.output.index(unknown) < result.output.index(refused)


def test_cli_override_changes_only_what_it_touches(warm, molt):
    config = warm()
    result = molt("run", config, "--learning-rate", "0.0002", "--lora-r", "4")
    assert result.exit_code == 0, result
    assert result.built() == {"train", "merge", "evaluate", "export"}


def test_status_on_an_empty_cache_reports_missing_and_builds_nothing(make_config, molt, cache_dir):
    rows = status_rows(molt, make_config())
    assert set(rows) == ALL_NODES
    assert {r["state"] for r in rows.values()} == {"missing"}
    assert artifact_dirs(cache_dir) == set()


def test_dag_lists_every_instance_and_its_inputs(make_config, molt):
    result = molt("dag", make_config(), "--mermaid")
    assert result.exit_code == 0, result
    assert result.output.startswith("flowchart LR")
    for name in ALL_NODES:
        assert f'["{name}"]' in result.output
    assert "-->|formatted|" in result.output


def test_only_refuses_when_inputs_are_missing_then_runs_one_stage(make_config, molt):
    config = make_config()
    refused = molt("run", config, "--only", "pack")
    assert refused.exit_code == 2 and "not cached" in refused.output
    assert molt("run", config, "--until", "mix").exit_code == 0
    only = molt("run", config, "--only", "pack")
    assert only.exit_code == 0, only
    assert only.built() == {"pack"}


def test_gc_drops_only_what_no_config_last_used(warm, molt, cache_dir):
    assert molt("run", warm(learning_rate=0.0003)).built() == {"train", "merge", "evaluate", "export"}
    superseded = artifact_dirs(cache_dir)
    assert molt("run", warm(learning_rate=0.0004)).built() == {"train", "merge", "evaluate", "export"}
    latest = artifact_dirs(cache_dir)
    result = molt("gc")
    assert result.exit_code == 0, result
    after = artifact_dirs(cache_dir)
    assert len(latest) - len(after) == 4  # the lr=0.0003 train, merge, evaluate and export went
    assert latest - superseded <= after  # the newest stayed
    assert molt("run", warm(learning_rate=0.0004)).built() == set()


def test_fetch_examples_copies_the_ready_configs(workdir):
    from click.testing import CliRunner

    from stages.cli import main

    result = CliRunner().invoke(main, ["fetch", "examples", "--dest", "ex"])
    assert result.exit_code == 0, result.output
    assert (Path("ex") / "smollm2-lora.yml").exists()
    assert (Path("ex") / "data" / "conversions.jsonl").exists()



def test_a_read_only_cache_dir_is_read_by_status_and_named_by_train(make_config, molt, cache_dir, workdir):
    """A real read-only store (a read-only bind mount in a user namespace; skipped where there is none)."""
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user and mount namespaces here")
    config = make_config(learning_rate=1e-3, max_steps=1)
    assert molt("preprocess", config).exit_code == 0
    molt_cmd = f"COLUMNS=240 {sys.executable} -m stages.cli"
    script = (f"mount --bind {cache_dir} {cache_dir} && mount -o remount,ro,bind {cache_dir} && "
              f"{molt_cmd} status {config} --cache-dir {cache_dir}; echo status-exit=$?; "
              f"{molt_cmd} train {config} --cache-dir {cache_dir}; echo train-exit=$?")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=workdir, timeout=600)
    output = " ".join((done.stdout + done.stderr).split())
    assert "Traceback" not in output, output
    assert f"note: the cache dir {cache_dir} is not writable" in output and "status-exit=0" in output, output
    assert output.count("cached") >= 6, output  # fetch_model ... pack, read from the read-only store
    assert "train-exit=2" in output and "Read-only file system" in output, output
    assert f"the cache dir {cache_dir} must be a directory molt can write" in output, output
