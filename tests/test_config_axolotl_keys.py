"""Every key of Axolotl's current config schema is known to molt: implemented (a field), renamed to
one, or in the UNSUPPORTED table with its reason. tests/data/axolotl_schema_keys.txt lists them,
written from Axolotl's source by tests/extract_axolotl_schema_keys.py (the commit is in its header)."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from stages.config import (
    DATASET_TYPE_KEYS,
    RENAMED_KEYS,
    UNSUPPORTED,
    ConfigError,
    DatasetConfig,
    MoltConfig,
    MoltConfigWarning,
    load_config,
    unsupported,
)

KEYS_FILE = Path(__file__).parent / "data" / "axolotl_schema_keys.txt"
EXTRACTOR = Path(__file__).parent / "extract_axolotl_schema_keys.py"
MIRROR = Path("/work/.mirror/axolotl-ai-cloud+axolotl/repo")
ENTRY, TYPE = "datasets[].", "datasets[].type."


def schema_keys() -> tuple[list[str], list[str], list[str]]:
    lines = [line.strip() for line in KEYS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    types = [k[len(TYPE):] for k in lines if k.startswith(TYPE)]
    entries = [k[len(ENTRY):] for k in lines if k.startswith(ENTRY) and not k.startswith(TYPE)]
    top = [k for k in lines if not k.startswith(ENTRY)]
    return top, entries, types


def recorded_commit() -> str:
    found = re.search(r"axolotl-ai-cloud/axolotl ([0-9a-f]{40}) ", KEYS_FILE.read_text().splitlines()[0])
    assert found, "the key list's first line names the Axolotl commit it was read from"
    return found.group(1)


def write(tmp_path, data) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def notes_of(path) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", MoltConfigWarning)
        try:
            notes = load_config(path).config_warnings
        except ConfigError as error:
            notes = error.notes
    assert sorted(notes) == sorted(str(w.message) for w in record if issubclass(w.category, MoltConfigWarning))
    return notes


def test_the_key_list_is_axolotls_whole_schema():
    recorded_commit()
    top, entries, types = schema_keys()
    # a sample that would be missing if the extractor stopped reading a class or the plugins
    assert {"base_model", "lora_r", "quantize_moe_experts", "ebft", "fused_attn_kernel", "experts_implementation",  # schemas/
            "use_scattermoe", "liger_rms_norm", "kd_trainer", "lm_eval_tasks", "spectrum_top_fraction",  # plugins' args
            "model_config", "overrides_of_model_config"} <= set(top)  # an alias and its field
    assert {"path", "field_messages", "field_chosen", "field_rejected", "train_on_eot"} <= set(entries)
    assert {"field_instruction", "field_chosen"} <= set(types)
    assert len(top) > 400 and len(top) == len(set(top))


def test_every_axolotl_key_is_known_to_molt():
    top, entries, types = schema_keys()
    unknown = [k for k in top if k not in MoltConfig.model_fields and k not in RENAMED_KEYS and unsupported(k) is None]
    unknown += [ENTRY + k for k in entries if k not in DatasetConfig.model_fields and unsupported(k, entry=True) is None]
    unknown += [TYPE + k for k in types if k not in DATASET_TYPE_KEYS]
    assert unknown == []


def test_no_axolotl_key_loads_as_unknown(tmp_path):
    # every key at once, null (Axolotl's "unset"): nothing refused, and no "unknown key" among the notes
    top, entries, types = schema_keys()
    skip = {"base_model", "datasets", "test_datasets", "pretraining_dataset", *RENAMED_KEYS.values()}
    config = {k: None for k in top if k not in skip}
    config["base_model"] = "m"
    config["datasets"] = [{**{k: None for k in entries}, "path": "d.jsonl", "type": {k: "x" for k in types}}]
    notes = notes_of(write(tmp_path, config))
    assert [n for n in notes if n.startswith("unknown key")] == []


@pytest.mark.parametrize("key, row", [
    ("capabilities", "Axolotl fills it in from the machine it runs on"),
    ("lm_eval_post_train", "molt runs lm-evaluation-harness as its own command, after training: molt lm-eval cfg.yml"),
    ("lm_eval_model", "molt lm-eval evaluates the trained model"),
])
def test_keys_added_with_the_schema_say_what_molt_does(key, row):
    assert not UNSUPPORTED[key].refused and UNSUPPORTED[key].reason.startswith(row)


def test_axolotls_aliases_are_its_fields(tmp_path):
    # Axolotl's examples write model_config: (the alias of overrides_of_model_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoltConfigWarning)
        cfg = load_config(write(tmp_path, {"base_model": "m", "datasets": [{"path": "d"}], "model_config": {"output_router_logits": True},
                                           "model_kwargs": {"attn_implementation": "eager"}, "model_revision": "main"}))
    assert cfg.overrides_of_model_config == {"output_router_logits": True}
    assert cfg.overrides_of_model_kwargs == {"attn_implementation": "eager"} and cfg.revision_of_model == "main"


@pytest.mark.parametrize("where, key, said", [
    ("top", "lora_rr", "unknown key: lora_rr (not an Axolotl or molt option; did you mean lora_r?)"),
    ("top", "learnign_rate", "unknown key: learnign_rate (not an Axolotl or molt option; did you mean learning_rate?)"),
    ("top", "use_scatermoe", "unknown key: use_scatermoe (not an Axolotl or molt option; did you mean use_scattermoe?)"),  # a warned key
    ("entry", "feild_messages", "unknown key: datasets[0].feild_messages (not an Axolotl or molt option; did you mean field_messages?)"),
    ("type", "fild_output", "unknown key: datasets[0].type.fild_output (not an Axolotl or molt option; did you mean field_output?)"),
    ("top", "colour", "unknown key: colour (not an Axolotl or molt option)"),  # nothing close: no guess
    ("top", "eta_min", "unknown key: eta_min (not an Axolotl or molt option)"),  # nor a far-fetched one (streaming)
])
def test_unknown_keys_name_the_nearest_known_one(tmp_path, where, key, said):
    entry = {"path": "d.jsonl", "type": "alpaca"}
    if where == "entry":
        entry[key] = "x"
    elif where == "type":
        entry["type"] = {"field_instruction": "q", key: "a"}
    config = {"base_model": "m", "datasets": [entry], **({key: 1} if where == "top" else {})}
    assert notes_of(write(tmp_path, config)) == [said]


@pytest.mark.skipif(not MIRROR.is_dir(), reason="needs the Axolotl mirror the key list was written from")
def test_the_key_list_is_what_the_extractor_writes(tmp_path):
    commit = recorded_commit()
    out = tmp_path / "keys.txt"
    # run the extractor against the recorded commit, writing elsewhere, and compare
    code = (f"import runpy, pathlib; g = runpy.run_path({str(EXTRACTOR)!r}, run_name='extract'); "
            f"g['main'].__globals__['OUT'] = pathlib.Path({str(out)!r}); g['main']({str(MIRROR)!r}, {commit!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.read_text() == KEYS_FILE.read_text()
