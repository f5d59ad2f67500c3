"""The plan and the runner take any stage that states its contract: a pipeline of another shape
(here a stage defined by the test, reading mix, with no pack and no train) runs through the same
plan(), keys and Runner as the supervised one."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import ALPACA_ROWS, CHAT_ROWS, base_config, write_jsonl
from stages import dag, fingerprint
from stages.config import config_from_dict
from stages.store import Store

COUNT_STAGE = '''
    """count: how many rows and trained tokens each split of mix holds."""
    import json

    from pydantic import BaseModel

    from stages.store import read_table

    SCHEMA = 1
    LIBRARIES = ("pyarrow",)
    INPUTS = {"mixed": "mix"}


    class Params(BaseModel, frozen=True):
        seed: int = 42


    def run(params, inputs, out, ctx):
        counts = {}
        for split in ("train", "val"):
            table = read_table(inputs["mixed"] / f"{split}.arrow")
            counts[split] = {"rows": table.num_rows, "trained": sum(sum(1 for t in labels if t != -100) for labels in table.column("labels").to_pylist())}
        ctx.log(f"counted {counts['train']['rows']} rows")
        (out / "counts.json").write_text(json.dumps(counts, sort_keys=True))
        return {"rows": counts["train"]["rows"]}
'''


@pytest.fixture
def count_stage(tmp_path, monkeypatch):
    package = tmp_path / "molt_test_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "count.py").write_text(textwrap.dedent(COUNT_STAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    fingerprint.clear_caches()
    yield "molt_test_stages.count"
    for name in [m for m in sys.modules if m.startswith("molt_test_stages")]:
        del sys.modules[name]
    fingerprint.clear_caches()


def config(workdir, tiny_model_dir) -> dict:
    write_jsonl(workdir / "data" / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(workdir / "data" / "chat.jsonl", CHAT_ROWS)
    values = base_config(tiny_model_dir)
    values.pop("learning_rate")  # nothing trains: a key only train needs is not asked for
    return config_from_dict(values).model_dump()


def test_a_stage_without_pack_runs_through_the_same_plan_and_runner(workdir, tiny_model_dir, count_stage):
    values = config(workdir, tiny_model_dir)
    pipeline = [(stage, when) for stage, when in dag.SUPERVISED if stage not in ("pack", "train", "merge", "evaluate", "export")] + [(count_stage, None)]
    nodes = dag.plan(values, pipeline=pipeline)
    names = [n.name for n in nodes]
    assert "pack" not in names and "train" not in names and names[-1] == count_stage
    assert {role: n.name for role, n in nodes[-1].inputs.items()} == {"mixed": "mix"}

    events = []
    runner = dag.Runner(Store(workdir / "cache"), on_event=lambda how, node, key: events.append((how, node.name)))
    for node in nodes:
        runner.resolve(node)
    result = runner.done[count_stage]
    assert result.how == "ran"
    counts = json.loads((result.artifact.path / "counts.json").read_text())
    mix = runner.done["mix"].artifact.manifest
    assert counts["train"]["rows"] == mix["rows"] and counts["val"]["rows"] == mix["val_rows"] > 0
    assert counts["train"]["trained"] > 0
    assert "count.py:run" in result.record["code"]["files"]
    assert "stages/store.py:read_table" in result.record["code"]["files"]

    again = dag.Runner(Store(workdir / "cache"))
    for node in dag.plan(values, pipeline=pipeline):
        assert again.resolve(node).how == "cached", node.name


def test_plan_refuses_an_input_that_does_not_come_first(workdir, tiny_model_dir, count_stage):
    values = config(workdir, tiny_model_dir)
    with pytest.raises(KeyError, match="reads mix, which does not come before it"):
        dag.plan(values, pipeline=[("fetch_model", None), (count_stage, None)])


def test_until_builds_only_what_the_target_needs(workdir, tiny_model_dir):
    values = config(workdir, tiny_model_dir)  # no learning_rate: planning up to pack must not read train's keys
    assert [n.name for n in dag.plan(values, "tokenize[1]")] == ["fetch_model", "tokenizer", "fetch_data[1]", "format[1]", "tokenize[1]"]
    assert dag.plan(values, "pack")[-1].name == "pack"
