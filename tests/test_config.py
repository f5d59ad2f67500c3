import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import yaml

from stages.config import (
    DATASET_UNSUPPORTED_KEYS,
    UNSUPPORTED,
    UNSUPPORTED_KEYS,
    UNSUPPORTED_PREFIXES,
    ConfigError,
    DatasetConfig,
    MoltConfig,
    MoltConfigWarning,
    config_from_dict,
    known_unsupported_keys,
    load_config,
    parse_cli_overrides,
)

BASE = {"base_model": "tiny-model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}


def write(tmp_path, data, name="config.yml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load(tmp_path, overrides=None, **keys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoltConfigWarning)
        return load_config(write(tmp_path, {**BASE, **keys}), overrides)


def load_error(tmp_path, **keys) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **keys)
    return str(info.value)


# -- defaults -----------------------------------------------------------------------------------


def test_minimal_config_defaults(tmp_path):
    cfg = load(tmp_path)
    assert cfg.sequence_len == 2048
    assert cfg.micro_batch_size == 1 and cfg.gradient_accumulation_steps == 1
    assert cfg.batch_size == 1 and cfg.eval_batch_size == 1
    assert cfg.optimizer == "adamw_torch_fused" and cfg.lr_scheduler == "cosine"
    assert cfg.seed == 42 and cfg.output_dir == "./model-out"
    assert cfg.lora_r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.0
    assert cfg.val_set_size == 0.0 and cfg.excess_length_strategy == "drop"
    assert cfg.sample_packing is False and cfg.pad_to_sequence_len is False
    assert cfg.bf16 == "auto" and cfg.strict is False
    assert cfg.dataset_prepared_path is None and cfg.prepared_path == "last_run_prepared"
    ds = cfg.datasets[0]
    assert ds.split == "train" and ds.field_messages == "messages"
    assert ds.roles_to_train == ["assistant"] and ds.train_on_eos == "turn"
    assert ds.message_property_mappings == {"role": "role", "content": "content"}


def test_sample_packing_implies_pad_to_sequence_len(tmp_path):
    assert load(tmp_path, sample_packing=True).pad_to_sequence_len is True
    assert load(tmp_path, sample_packing=True, pad_to_sequence_len=False).pad_to_sequence_len is False


def test_real_batches_unless_varlen_attention(tmp_path):
    # Axolotl: a micro-batch is one micro_batch_size x sequence_len row only with flash/flex/xformers attention
    assert load(tmp_path, sample_packing=True).multipack_real_batches is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention keys may still be reported as ignored
        assert load(tmp_path, sample_packing=True, flash_attention=True).multipack_real_batches is False
        assert load(tmp_path, sample_packing=True, flash_attention=True, multipack_real_batches=True).multipack_real_batches is True
    assert load(tmp_path, sample_packing=True, multipack_real_batches=False).multipack_real_batches is False
    assert load(tmp_path, sample_packing=True, attn_implementation="flash_attention_2").multipack_real_batches is False
    assert load(tmp_path, sample_packing=True, attn_implementation="sdpa").multipack_real_batches is True


def test_learning_rate_in_yaml11_exponent_form(tmp_path):
    # PyYAML reads 2e-5 (no dot) as a string
    path = write(tmp_path, "base_model: m\ndatasets: [{path: d}]\nlearning_rate: 2e-5\n")
    assert load_config(path).learning_rate == pytest.approx(2e-5)


def test_batch_size_derives_gradient_accumulation(tmp_path):
    cfg = load(tmp_path, batch_size=16, micro_batch_size=4)
    assert cfg.gradient_accumulation_steps == 4 and cfg.batch_size == 16
    assert load(tmp_path, micro_batch_size=2, gradient_accumulation_steps=3).batch_size == 6


def test_batch_size_must_divide(tmp_path):
    message = load_error(tmp_path, batch_size=10, micro_batch_size=4)
    assert "batch_size (10)" in message and "micro_batch_size (4)" in message


def test_batch_size_contradicting_gradient_accumulation(tmp_path):
    message = load_error(tmp_path, batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2)
    assert "gradient_accumulation_steps (2)" in message


def test_chat_template_jinja_implies_jinja(tmp_path):
    cfg = load(tmp_path, chat_template_jinja="{{ messages }}",
               datasets=[{"path": "d", "type": "chat_template", "chat_template_jinja": "{{ x }}"}])
    assert cfg.chat_template == "jinja" and cfg.datasets[0].chat_template == "jinja"


def test_pretraining_dataset_shorthand(tmp_path):
    cfg = load(tmp_path, datasets=None, pretraining_dataset="allenai/c4", max_steps=10)
    assert (cfg.datasets[0].path, cfg.datasets[0].type) == ("allenai/c4", "completion")  # read as a completion dataset


def test_legacy_spelling_is_renamed(tmp_path):
    assert load(tmp_path, model_revision="abc").revision_of_model == "abc"
    assert "same option" in load_error(tmp_path, model_revision="a", revision_of_model="b")


def test_legacy_message_fields_fold_into_mappings(tmp_path):
    cfg = load(tmp_path, datasets=[{"path": "d", "type": "chat_template", "message_field_role": "from",
                                    "message_property_mappings": {"content": "value"}}])
    assert cfg.datasets[0].message_property_mappings == {"role": "from", "content": "value"}
    message = load_error(tmp_path, datasets=[{"path": "d", "message_field_role": "from",
                                              "message_property_mappings": {"role": "speaker"}}])
    assert "message_field_role" in message and "message_property_mappings.role" in message


# -- model_dump ---------------------------------------------------------------------------------


def test_model_dump_json_round_trip(tmp_path):
    cfg = load(tmp_path, wandb_project="p", sample_packing=True, batch_size=4,
               datasets=[{"path": "d", "type": {"field_instruction": "q", "field_output": "a"}, "foo": 1}])
    dumped = cfg.model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped
    assert "config_warnings" not in dumped and cfg.config_warnings
    assert dumped["wandb_project"] == "p" and dumped["datasets"][0]["foo"] == 1  # kept, not dropped
    assert dumped["pad_to_sequence_len"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoltConfigWarning)
        again = MoltConfig.model_validate(dumped)
    assert again.model_dump(mode="json") == dumped


# -- validation rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("keys, names", [
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, ["warmup_steps", "warmup_ratio", "10", "0.1"]),
    ({"eval_steps": 5, "evals_per_epoch": 2}, ["eval_steps", "evals_per_epoch"]),
    ({"save_steps": 5, "saves_per_epoch": 2}, ["save_steps", "saves_per_epoch"]),
    ({"datasets": None}, ["datasets", "pretraining_dataset"]),
    ({"datasets": []}, ["datasets", "pretraining_dataset"]),
    ({"test_datasets": [{"path": "t"}], "val_set_size": 0.1}, ["test_datasets", "val_set_size", "0.1"]),
    ({"adapter": "qlora"}, ["adapter: qlora", "load_in_4bit"]),
    ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, ["qlora", "load_in_8bit"]),
    ({"load_in_4bit": True}, ["load_in_4bit", "adapter"]),
    ({"load_in_8bit": True}, ["load_in_8bit", "adapter"]),
    ({"deepspeed": "zero3.json", "fsdp": ["full_shard"]}, ["deepspeed", "fsdp", "zero3.json"]),
    ({"deepspeed": "zero3.json", "fsdp_config": {"fsdp_version": 2}}, ["deepspeed", "fsdp_config"]),
    ({"sample_packing": True, "rl": "dpo"}, ["sample_packing with rl: dpo is not supported", "sample_packing: false"]),
    ({"rl": "kto", "reward_model": True}, ["rl: kto", "reward_model", "set one"]),
    ({"rl": "grpo"}, ["rl: grpo is not supported yet", "dpo, ipo, orpo, kto, simpo"]),
    ({"chat_template": "jinja"}, ["chat_template", "jinja", "chat_template_jinja"]),
    ({"excess_length_strategy": "cut"}, ["excess_length_strategy", "'cut'", "truncate"]),
    ({"val_set_size": -0.1}, ["val_set_size", "-0.1", "greater than or equal to 0"]),
    ({"adapter": "dora"}, ["adapter", "'dora'"]),
    ({"micro_batch_size": 0}, ["micro_batch_size", "0"]),
    ({"early_stopping_patience": 3}, ["early_stopping_patience", "eval_steps", "save_steps"]),
    ({"early_stopping_patience": 3, "eval_steps": 10, "save_steps": 15}, ["save_steps (15)", "multiple of eval_steps (10)"]),
    ({"relora_steps": 100, "fsdp": ["full_shard"], "adapter": "lora"}, ["relora_steps", "fsdp"]),
])
def test_rule_violations(tmp_path, keys, names):
    message = load_error(tmp_path, **keys)
    assert message.startswith(str(tmp_path / "config.yml"))
    for name in names:
        assert name in message


def test_valid_adapter_combinations(tmp_path):
    assert load(tmp_path, adapter="qlora", load_in_4bit=True).adapter == "qlora"
    assert load(tmp_path, adapter="lora", load_in_8bit=True).load_in_8bit is True
    assert load(tmp_path, adapter="").adapter is None


def test_all_rule_violations_reported_together(tmp_path):
    message = load_error(tmp_path, warmup_steps=1, warmup_ratio=0.1, save_steps=1, saves_per_epoch=1)
    assert "warmup_steps" in message and "saves_per_epoch" in message


@pytest.mark.parametrize("ds_type", ["sharegpt", "sharegpt:chat"])
def test_sharegpt_refused_with_pointer_to_chat_template(tmp_path, ds_type):
    message = load_error(tmp_path, datasets=[{"path": "a"}, {"path": "b", "type": ds_type}])
    assert "datasets[1].type" in message and repr(ds_type) in message
    assert "type: chat_template" in message and "message_property_mappings" in message


def test_dataset_chat_template_jinja_rule(tmp_path):
    message = load_error(tmp_path, datasets=[{"path": "a", "chat_template": "jinja"}])
    assert "datasets[0]" in message and "chat_template_jinja" in message


def test_type_errors_name_path_value_and_expectation(tmp_path):
    message = load_error(tmp_path, datasets=[{"path": "a"}, {"path": "b", "type": 5}], sequence_len="long")
    assert "datasets[1].type: got 5" in message and "valid string" in message
    assert "sequence_len: got 'long'" in message and "integer" in message


def test_missing_base_model(tmp_path):
    path = write(tmp_path, {"datasets": [{"path": "d"}]})
    with pytest.raises(ConfigError, match="base_model: missing"):
        load_config(path)


# -- unknown and unsupported keys ---------------------------------------------------------------


def test_unsupported_and_unknown_keys_warn_and_are_kept(tmp_path):
    path = write(tmp_path, {**BASE, "sage_attention": True, "swanlab_project": "x", "bogus_key": 1,
                            "datasets": [{"path": "d", "preprocess_shards": 4, "colour": "red"}]})
    with pytest.warns(MoltConfigWarning) as record:
        cfg = load_config(path)
    expected = [
        "sage_attention: true — not supported yet: molt uses the attention attn_implementation names (transformers' default otherwise)",
        "swanlab_project: x — not supported yet: molt reports to tensorboard, wandb, mlflow or comet only",
        "unknown key: bogus_key (not an Axolotl or molt option)",
        "datasets[0].preprocess_shards: 4 — not supported yet: molt formats a dataset whole (dataset_processes spreads it over processes)",
        "unknown key: datasets[0].colour (not an Axolotl or molt option)",
    ]
    assert sorted(cfg.config_warnings) == sorted(expected)
    assert sorted(str(w.message) for w in record) == sorted(expected)
    assert cfg.model_extra == {"sage_attention": True, "swanlab_project": "x", "bogus_key": 1}
    assert cfg.datasets[0].model_extra == {"preprocess_shards": 4, "colour": "red"}


def test_unknown_key_in_dataset_type_dict(tmp_path):
    cfg = load(tmp_path, datasets=[{"path": "d", "type": {"field_instruction": "q", "fild_output": "a"}}])
    assert cfg.config_warnings == ["unknown key: datasets[0].type.fild_output (not an Axolotl or molt option; did you mean field_output?)"]


def test_strict_refuses_all_unknown_keys(tmp_path):
    message = load_error(tmp_path, strict=True, bogus_one=1, swanlab_project="ok",
                         datasets=[{"path": "d", "bogus_two": 2}])
    assert "strict" in message and "bogus_one" in message and "datasets[0].bogus_two" in message
    assert "swanlab_project" not in message  # a known Axolotl key is only ignored, even under strict


def test_duplicate_yaml_key_warns(tmp_path):
    path = write(tmp_path, "base_model: m\ndatasets: [{path: d}]\nlora_r: 8\nlora_r: 16\n")
    with pytest.warns(MoltConfigWarning, match="duplicate key: lora_r"):
        cfg = load_config(path)
    assert cfg.lora_r == 16 and "line 4" in cfg.config_warnings[0]


def _table_sample(row):
    """A value the row acts on: 7, unless the row's inert value (what molt does anyway) is true or a name."""
    if row.inert is True:
        return False
    return "random" if isinstance(row.inert, str) else 7


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_every_unsupported_key_is_refused_or_warned_with_its_reason(tmp_path, key):
    row = UNSUPPORTED[key]
    name = key.replace("*", "x") if key.endswith("*") else key.removeprefix("datasets[].")
    value = _table_sample(row)
    shown_value = {False: "false", 7: "7"}.get(value, value)
    if key.startswith("datasets[]."):
        keys, shown = {"datasets": [{**BASE["datasets"][0], name: value}]}, f"datasets[0].{name}"
    else:
        keys, shown = {name: value}, name
    reason = row.reason.format(value=shown_value, VALUE=str(shown_value).upper())
    if row.refused:
        message = load_error(tmp_path, **keys)
        assert f"  - {shown}: {shown_value} is not supported yet: {reason}" in message.splitlines()
    else:
        with pytest.warns(MoltConfigWarning) as record:
            cfg = load_config(write(tmp_path, {**BASE, **keys}))
        assert cfg.config_warnings == [str(w.message) for w in record] == [f"{shown}: {shown_value} — not supported yet: {reason}"]
    # null, or the value that asks for what molt does anyway, says nothing
    quiet = {"datasets": [{**BASE["datasets"][0], name: row.inert}]} if key.startswith("datasets[].") else {name: row.inert}
    for keys in (quiet, {k: ([{**v[0], name: None}] if k == "datasets" else None) for k, v in quiet.items()}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", MoltConfigWarning)
            load_config(write(tmp_path, {**BASE, **keys}))


@pytest.mark.parametrize("keys, message", [
    ({"kd_trainer": True}, "kd_trainer: true is not supported yet: knowledge distillation: molt would train on the labels alone, without a teacher's logits"),
    ({"datasets": [{"path": "d", "skip": 10}]}, "datasets[0].skip: 10 is not supported yet: molt would train on every row, the first 10 too"),
    ({"base_model_config": "other-model"}, "base_model_config: other-model is not supported yet: molt reads the model's config from base_model"),
])
def test_refusals_name_the_key_value_and_what_molt_would_do_instead(tmp_path, keys, message):
    assert message in load_error(tmp_path, **keys).splitlines()[1]


@pytest.mark.parametrize("keys, note", [
    ({"sequence_parallel_degree": 2}, "sequence_parallel_degree: 2 — not supported yet: molt trains unsharded on one process (DDP with --launcher)"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size: 2 — not supported yet: molt trains unsharded on one process (DDP with --launcher)"),
    ({"processor_type": "AutoProcessor"}, "processor_type: AutoProcessor — not supported yet: molt trains on text; "
     "rows whose messages hold image parts are refused when formatted"),
])
def test_warnings_say_what_molt_does_instead(tmp_path, keys, note):
    assert load(tmp_path, **keys).config_warnings == [note]


def test_keys_restating_others_load_silently(tmp_path):
    # older configs repeat base_model as base_model_config; newer ones add `relora: true` to relora_steps
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoltConfigWarning)
        cfg = load_config(write(tmp_path, {**BASE, "base_model_config": BASE["base_model"], "relora": True, "relora_steps": 5, "adapter": "lora"}))
    assert "base_model_config" not in cfg.model_extra and "relora" not in cfg.model_extra
    assert "relora: true is not supported yet" in load_error(tmp_path, relora=True, adapter="lora")


def test_unsupported_table_is_disjoint_from_fields():
    fields = set(MoltConfig.model_fields)
    assert not fields & UNSUPPORTED_KEYS
    assert not [f for f in fields if f.startswith(UNSUPPORTED_PREFIXES)]
    assert not set(DatasetConfig.model_fields) & DATASET_UNSUPPORTED_KEYS
    assert known_unsupported_keys() == UNSUPPORTED_KEYS and "sage_attention" in UNSUPPORTED_KEYS


@pytest.mark.parametrize("key", ["quantize_moe_experts", "ebft", "use_scattermoe", "fused_attn_kernel", "experts_implementation",
                                 "use_sonicmoe", "eval_sequence_len", "lora_rank_pattern", "generate_samples", "use_otel_metrics"])
def test_keys_of_axolotls_current_schema_are_known(key):
    from stages.config import unsupported

    assert key in MoltConfig.model_fields or unsupported(key) is not None


@pytest.mark.parametrize("key", ["field_chosen", "field_rejected", "train_on_eot"])
def test_dataset_keys_of_axolotls_current_schema_are_known(key):
    from stages.config import unsupported

    assert key in DatasetConfig.model_fields or unsupported(key, entry=True) is not None


@pytest.mark.parametrize("key", ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "use_kernels", "liger_rms_norm_gated", "activation_offloading",
                                 "use_scattermoe", "fused_attn_kernel", "experts_implementation"])
def test_kernel_choices_say_what_molt_runs_instead(key):
    row = UNSUPPORTED[key]
    assert not row.refused and row.reason.startswith("molt ") and "not supported" not in row.reason


def test_refused_config_warns_about_its_other_keys_first(tmp_path):
    path = write(tmp_path, {**BASE, "kd_trainer": True, "sage_attention": True, "colour": "red"})
    with pytest.warns(MoltConfigWarning) as record, pytest.raises(ConfigError) as info:
        load_config(path)
    notes = ["unknown key: colour (not an Axolotl or molt option)",
             "sage_attention: true — not supported yet: molt uses the attention attn_implementation names (transformers' default otherwise)"]
    assert sorted(info.value.notes) == sorted(str(w.message) for w in record) == sorted(notes)
    assert "kd_trainer: true is not supported yet" in str(info.value) and "colour" not in str(info.value)
    # a config refused for a bad value names them too
    with pytest.warns(MoltConfigWarning), pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "sequence_len": "long", "colour": "red"}))
    assert info.value.notes == [notes[0]]


def test_every_refusal_is_named_at_once(tmp_path):
    # keys molt lacks, a value of the wrong type and the cross-field rules: pydantic checks the rules
    # only once the values are valid, so molt checks them again without the invalid ones
    message = load_error(tmp_path, kd_trainer=True, datasets=[{"path": "d", "skip": 2}], sequence_len="long",
                         warmup_steps=1, warmup_ratio=0.1, adapter="qlora")
    assert message.splitlines()[1:] == [
        "  - kd_trainer: true is not supported yet: knowledge distillation: molt would train on the labels alone, without a teacher's logits",
        "  - datasets[0].skip: 2 is not supported yet: molt would train on every row, the first 2 too",
        "  - warmup_steps (1) and warmup_ratio (0.1) are mutually exclusive; set only one",
        "  - adapter: qlora requires load_in_4bit: true (got load_in_4bit: False)",
        "  - sequence_len: got 'long': Input should be a valid integer, unable to parse string as an integer",
    ]
    # a rule about a key whose value was refused would judge its default, not what was written: left out
    message = load_error(tmp_path, lr_scheduler="cosin", lr_div_factor=2.0)
    assert "unknown lr_scheduler 'cosin'" in message and "lr_div_factor" not in message
    # a refused key alone is refused as before
    assert load_error(tmp_path, kd_trainer=True).splitlines()[1:] == [
        "  - kd_trainer: true is not supported yet: knowledge distillation: molt would train on the labels alone, without a teacher's logits"]


# -- empty values (YAML null) -------------------------------------------------------------------


EMPTY_MEANS_DEFAULT = ["lora_r", "lora_alpha", "lora_dropout", "gradient_checkpointing", "optimizer", "sample_packing", "weight_decay",
                       "trust_remote_code", "sequence_len", "micro_batch_size", "num_epochs", "lr_scheduler", "val_set_size", "seed",
                       "output_dir", "strict", "train_on_inputs", "load_in_4bit", "excess_length_strategy"]


def test_an_empty_value_means_the_keys_default(tmp_path):
    # Axolotl reads `lora_r:` (no value, YAML null) as unset; so does molt, for every key with a default
    text = "base_model: m\ndatasets: [{path: d, type: alpaca, split: null, train_on_eos: null, roles_to_train: null}]\n"
    text += "".join(f"{key}:\n" for key in EMPTY_MEANS_DEFAULT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoltConfigWarning)
        cfg = load_config(write(tmp_path, text))
    default = load(tmp_path)
    for key in EMPTY_MEANS_DEFAULT:
        assert getattr(cfg, key) == getattr(default, key), key
    assert not set(EMPTY_MEANS_DEFAULT) & cfg.model_fields_set
    assert cfg.model_dump() == default.model_dump() | {"base_model": "m", "datasets": cfg.model_dump()["datasets"]}
    ds = cfg.datasets[0]
    assert (ds.split, ds.train_on_eos, ds.roles_to_train) == ("train", "turn", ["assistant"])


def test_an_empty_value_keeps_its_meaning_where_null_is_one(tmp_path):
    cfg = load(tmp_path, dataset_prepared_path=None, adapter=None, eval_batch_size=None, bf16=None, learning_rate=None, micro_batch_size=3)
    assert cfg.dataset_prepared_path is None and cfg.prepared_path == "last_run_prepared"
    assert cfg.adapter is None and cfg.eval_batch_size == 3 and cfg.bf16 is None and cfg.learning_rate is None
    assert "base_model: got None" in load_error(tmp_path, base_model=None)  # required: refused by name
    assert "datasets[0].path: got None" in load_error(tmp_path, datasets=[{"path": None}])


def test_zero_evaluations_or_saves_per_epoch_schedule_none(tmp_path):
    # Axolotl: evals_per_epoch: 0 evaluates nothing, saves_per_epoch: 0 schedules no saves (as unset)
    cfg = load(tmp_path, evals_per_epoch=0, saves_per_epoch=0, eval_steps=5, save_steps=10, val_set_size=0.1)
    assert cfg.evals_per_epoch is None and cfg.saves_per_epoch is None and cfg.eval_steps == 5
    assert "evals_per_epoch" in load_error(tmp_path, evals_per_epoch=-1)


def test_bfloat16_with_8bit_loads_with_a_note(tmp_path):
    with pytest.warns(MoltConfigWarning, match="bfloat16: true with load_in_8bit: molt keeps the int8 layers int8 and the other weights in fp32"):
        cfg = load_config(write(tmp_path, {**BASE, "adapter": "lora", "load_in_8bit": True, "bfloat16": True}))
    assert cfg.bfloat16 is True and cfg.load_in_8bit is True and len(cfg.config_warnings) == 1
    assert "bfloat16: true casts the weights, which a 4-bit quantized base cannot be" in load_error(
        tmp_path, adapter="qlora", load_in_4bit=True, bfloat16=True)


# -- files --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yml"):
        load_config(tmp_path / "nope.yml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "base_model: m\ndatasets:\n  - path: [unclosed\nlora_r: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, text))


# -- overrides ----------------------------------------------------------------------------------


def test_parse_cli_overrides():
    args = ["--learning-rate", "1e-4", "--micro-batch-size", "2", "--sample-packing",
            "--lora-target-modules=[q_proj, v_proj]", "--seed=-3", "--adapter", "lora", "--tf32"]
    assert parse_cli_overrides(args) == {
        "learning_rate": 0.0001, "micro_batch_size": 2, "sample_packing": True,
        "lora_target_modules": ["q_proj", "v_proj"], "seed": -3, "adapter": "lora", "tf32": True,
    }


def test_parse_cli_overrides_keeps_non_yaml_text():
    assert parse_cli_overrides(["--chat-template-jinja", "{% for m in messages %}"]) == {
        "chat_template_jinja": "{% for m in messages %}"}


@pytest.mark.parametrize("args, match", [
    (["--learning-rat", "1"], "learning_rat"),
    (["--s2-attention"], "s2_attention is an Axolotl option"),
    (["learning_rate", "1"], "unexpected argument 'learning_rate'"),
])
def test_parse_cli_overrides_refuses(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_cli_overrides(args)


def test_overrides_apply_on_top_of_file(tmp_path):
    cfg = load(tmp_path, parse_cli_overrides(["--micro-batch-size", "4", "--learning-rate=3e-4"]),
               micro_batch_size=1)
    assert cfg.micro_batch_size == 4 and cfg.learning_rate == pytest.approx(3e-4)


def test_overrides_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load(tmp_path, {"warmup_ratio": 0.1}, warmup_steps=5)


def test_strict_overrides_only_existing_keys(tmp_path):
    assert load(tmp_path, {"lora_r": 32}, strict=True, lora_r=8).lora_r == 32
    with pytest.raises(ConfigError, match="strict.*not in it: seed"):
        load(tmp_path, {"seed": 1}, strict=True)


# -- import cost --------------------------------------------------------------------------------


def test_import_does_not_pull_in_torch_or_transformers():
    code = "import sys, stages.config; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "False"


def test_yaml_example_from_axolotl_loads(tmp_path):
    text = textwrap.dedent("""\
        base_model: NousResearch/Llama-3.2-1B
        load_in_8bit: false
        load_in_4bit: true
        adapter: qlora
        lora_r: 32
        lora_alpha: 16
        lora_dropout: 0.05
        lora_target_linear: true
        datasets:
          - path: mlabonne/FineTome-100k
            type: chat_template
            split: train[:20%]
            field_messages: conversations
            message_property_mappings:
              role: from
              content: value
        chat_template: llama3
        val_set_size: 0.05
        output_dir: ./outputs/qlora-out
        sequence_len: 2048
        sample_packing: true
        gradient_accumulation_steps: 2
        micro_batch_size: 2
        num_epochs: 1
        optimizer: paged_adamw_8bit
        lr_scheduler: cosine
        learning_rate: 0.0002
        bf16: auto
        tf32: false
        gradient_checkpointing: true
        flash_attention: true
        flash_attn_rms_norm: true
        warmup_ratio: 0.1
        evals_per_epoch: 4
        saves_per_epoch: 1
        weight_decay: 0.0
        special_tokens:
          pad_token: <|end_of_text|>
        """)
    with pytest.warns(MoltConfigWarning, match="flash_attn_rms_norm: true — not supported yet: molt runs the model's own modules"):
        cfg = load_config(write(tmp_path, text))
    assert cfg.flash_attention is True and cfg.optimizer == "paged_adamw_8bit"
    assert cfg.batch_size == 4 and cfg.pad_to_sequence_len is True
    assert cfg.datasets[0].message_property_mappings == {"role": "from", "content": "value"}


def test_optimizer_and_scheduler_names_are_transformers_own_plus_molts():
    # config.py keeps the names as a table (it must not import transformers); they must be the installed ones
    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames

    from stages.config import LR_SCHEDULERS, OPTIMIZERS
    from stages.training.optim import OWN_OPTIMIZERS

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames} | set(OWN_OPTIMIZERS)
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} | {"one_cycle", "log_sweep"}
    with pytest.raises(ConfigError, match=r"optimizer: got 'adamw_torhc': unknown optimizer 'adamw_torhc' \(did you mean adamw_torch\?\); expected one of"):
        config_from_dict({**BASE, "optimizer": "adamw_torhc"})
    with pytest.raises(ConfigError, match=r"unknown lr_scheduler 'cosin' \(did you mean cosine\?\)"):
        config_from_dict({**BASE, "lr_scheduler": "cosin"})


def test_val_set_size_of_one_or_more_is_a_whole_row_count():
    assert config_from_dict({**BASE, "val_set_size": 0.25}).val_set_size == 0.25
    assert config_from_dict({**BASE, "val_set_size": 3}).val_set_size == 3
    with pytest.raises(ConfigError, match=r"val_set_size: got 1.5: expected a fraction of the rows below 1 .* or a whole number of rows"):
        config_from_dict({**BASE, "val_set_size": 1.5})


def test_an_unknown_chat_template_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"chat_template: unknown template 'chatmll' \(did you mean chatml\?\)"):
        config_from_dict({**BASE, "chat_template": "chatmll"})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: chat_template: unknown template 'nope'"):
        config_from_dict({**BASE, "datasets": [{"path": "d.jsonl", "type": "chat_template", "chat_template": "nope"}]})
    for name in ("llama3", "tokenizer_default", "tokenizer_default_fallback_chatml"):
        assert config_from_dict({**BASE, "chat_template": name}).chat_template == name


def test_nested_yaml_aliases_are_bounded(tmp_path):
    levels = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yml"
    path.write_text("base_model: m\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"laughs.yml: line 10: alias \*a7 .* expands the config beyond 1,000,000"):
        load_config(path)
    path.write_text("base_model: m\na: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"line 2: alias \*a refers to the node it is inside"):
        load_config(path)
    path.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    # aliases that stay small load as before
    path.write_text("base_model: m\nd: &d {path: data.jsonl, type: alpaca}\ndatasets: [*d, *d]\n")
    with pytest.warns(MoltConfigWarning, match="unknown key: d"):
        assert len(load_config(path).datasets) == 2
