"""One declaration per key: every key a stage reads is the config's own field, sliced, never redeclared."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path
from types import NoneType
from typing import Union, get_args

import pytest
from pydantic import BaseModel

from stages import dag
from stages.config import ConfigError, DatasetConfig, MoltConfig, StageParams, dataset_params, slice_params, stage_params

# the config folds these into `datasets` (pretraining_dataset, with its text_column), so no stage reads them
FOLDED_BY_THE_CONFIG = {"pretraining_dataset"}, {"text_column"}


def declaration(field) -> tuple:
    return field.annotation, field.get_default(call_default_factory=True), field.metadata


def assert_sliced(params: type[BaseModel], source: type[BaseModel]) -> None:
    assert issubclass(params, StageParams), f"{params.__module__}.{params.__name__} is written by hand: use stage_params / dataset_params"
    for name, field in params.model_fields.items():
        if name == "dataset" and source is MoltConfig:
            assert_sliced(field.annotation, DatasetConfig)
            continue
        assert name in source.model_fields, f"{params.__module__}: {name} is not a {source.__name__} field"
        config = source.model_fields[name]
        if field.is_required() and not config.is_required():  # `required=`: the config's type without null
            without_null = Union[tuple(a for a in get_args(config.annotation) if a is not NoneType)]
            assert (field.annotation, field.metadata) == (without_null, config.metadata), f"{params.__module__}: {name}"
        else:
            assert declaration(field) == declaration(config), f"{params.__module__}: {name} differs from {source.__name__}.{name}"


def own_model_classes(module) -> list[str]:
    """Pydantic models the module declares itself (fields of its own) rather than slices it derives."""
    found = [name for name, obj in vars(module).items() if isinstance(obj, type) and issubclass(obj, BaseModel)
             and obj.__module__ == module.__name__ and not issubclass(obj, StageParams)]
    for node in ast.walk(ast.parse(inspect.getsource(module))):  # nor a class statement on a slice
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", "")) in ("BaseModel", "StageParams") for b in node.bases):
            found.append(node.name)
    return sorted(set(found))


@pytest.mark.parametrize("stage", dag.STAGES)
def test_every_key_a_stage_reads_is_declared_once(stage):
    module = dag.stage_module(stage)
    assert own_model_classes(module) == []
    assert_sliced(module.Params, MoltConfig)


def test_every_typed_key_is_read_by_a_stage_or_the_cli():
    """A typed field nobody reads would load and do nothing: it belongs in the UNSUPPORTED table instead."""
    top, per_dataset = dag.keys_read()
    assert set(MoltConfig.model_fields) - top <= FOLDED_BY_THE_CONFIG[0]
    assert set(DatasetConfig.model_fields) - per_dataset <= FOLDED_BY_THE_CONFIG[1]


def test_slices_copy_type_default_and_constraints():
    Params = stage_params("sequence_len", "lora_dropout", required=("learning_rate",), unkeyed=("dataset_processes",),
                          dataset=dataset_params("Entry", "roles_to_train", "shards"))
    assert Params.__module__ == __name__ and Params.model_config["frozen"]
    p = Params(learning_rate=1e-3, dataset={}, dataset_processes=4)
    assert (p.sequence_len, p.lora_dropout, p.dataset.roles_to_train, p.dataset.shards) == (2048, 0.0, ["assistant"], None)
    assert "dataset_processes" not in p.model_dump() and p.dataset_processes == 4
    for bad in ({"sequence_len": 0}, {"lora_dropout": 2}, {"dataset": {"shards": 0}}, {"learning_rate": None}):
        with pytest.raises(ValueError):
            Params(**{"learning_rate": 1e-3, "dataset": {}, **bad})
    with pytest.raises(KeyError):
        stage_params("no_such_key")


def test_a_required_key_left_unset_is_one_line_naming_the_stage():
    from stages import mix

    Params = stage_params("seed", required=("learning_rate",))
    with pytest.raises(ConfigError) as error:
        slice_params(Params, {"learning_rate": None, "seed": 1})
    assert str(error.value) == f"learning_rate: required (the {__name__.rpartition('.')[2]} stage reads it)"
    with pytest.raises(ConfigError) as error:
        slice_params(mix.Params, {"val_set_size": -1})
    assert str(error.value) == "val_set_size: got -1: Input should be greater than or equal to 0 (the mix stage reads it)"


def test_molt_dag_without_learning_rate_names_it_in_one_line(make_config, molt):
    config = make_config(learning_rate=None)
    for command in ("dag", "train"):
        result = molt(command, config)
        assert result.exit_code == 2, result
        assert result.output.strip().splitlines()[-1] == f"error: {config}: learning_rate: required (the train stage reads it)"


def test_a_derived_params_pickles_into_a_spawned_worker():
    # format and tokenize hand their params to worker processes (stages/workers.py spawns them)
    code = ("import pickle, sys; from stages import format as f; "
            "p = f.Params(dataset=f.Spec(type='alpaca'), dataset_processes=2); sys.stdout.buffer.write(pickle.dumps(p))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=str(Path(__file__).resolve().parents[1])).stdout
    import pickle

    from stages import format as format_stage

    assert pickle.loads(out) == format_stage.Params(dataset=format_stage.Spec(type="alpaca"), dataset_processes=2)
