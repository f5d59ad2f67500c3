"""The molt config: a pydantic model of an Axolotl-style YAML file, and its loader.

Keys follow Axolotl's config reference so Axolotl YAMLs load as-is. Every key ends up in one of
three places, and none is dropped silently:
  * a typed field of `MoltConfig` / `DatasetConfig` (implemented by molt);
  * `UNSUPPORTED_KEYS`: a real Axolotl key molt does not implement yet; kept in the model's extras
    and reported as "ignored: <key> — not supported yet";
  * anything else: kept in extras and reported as "unknown key: ..." (an error under `strict: true`).

Cross-field rules are small functions registered with `@_rule`, run in declaration order after
field validation. Imports stay light (pydantic, PyYAML, stdlib): the CLI imports this first.
"""

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(Exception):
    """A config problem, worded for the user: names the file, key, value and rule."""


class MoltConfigWarning(UserWarning):
    """An ignored or unknown key; the same text is kept in `MoltConfig.config_warnings`."""


# What `dataset_prepared_path: null` means; kept as None in the model so a dump stays as written.
DEFAULT_DATASET_PREPARED_PATH = "last_run_prepared"

# -- Axolotl keys molt does not implement yet ----------------------------------------------------
# Implementing one: add the field to MoltConfig and delete it here (a test checks they are disjoint).

UNSUPPORTED_KEYS: frozenset[str] = frozenset({
    # model loading
    "cls_model_config", "processor_type", "tokenizer_use_mistral_common", "tokenizer_save_jinja_files",
    "experimental_skip_move_to_device", "use_kernels", "model_quantization_config",
    "model_quantization_config_kwargs", "model_config", "model_kwargs", "rope_scaling", "gptq", "device", "device_map", "max_memory",
    "gpu_memory_limit", "low_cpu_mem_usage", "is_falcon_derived_model", "is_llama_derived_model",
    "is_mistral_derived_model", "is_qwen_derived_model", "llama4_linearized_experts",
    "hf_use_auth_token", "reinit_weights", "random_init_weights",
    # tokenizer / embeddings
    "mean_resizing_embeddings", "shrink_embeddings",
    "embeddings_skip_upcast", "added_tokens_overrides", "fix_untrained_tokens",
    "chat_template_kwargs",
    # attention and kernels
    "s2_attention", "flex_attention", "flex_attn_compile_kwargs", "sage_attention",
    "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp",
    "flash_optimum", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
    "lora_embedding_kernel", "cut_cross_entropy", "chunked_cross_entropy",
    "chunked_cross_entropy_num_chunks", "tiled_mlp", "tiled_mlp_num_shards",
    "tiled_mlp_use_original_mlp", "activation_offloading", "dynamic_checkpoint", "gc_steps",
    # PEFT beyond plain LoRA / QLoRA
    "lora_target_parameters", "lora_on_cpu", "peft_layers_pattern",
    "peft_use_rslora", "peft_layer_replication", "peft_init_lora_weights",
    "peft_trainable_token_indices", "peft_ensure_weight_tying", "peft_autocast_adapter_dtype",
    "qlora_sharded_model_loading",
    "merge_lora", "merge_method", "relora",
    # quantization / low precision
    "fp8", "fp8_enable_fsdp_float8_all_gather", "qat", "quantization",
    # data pipeline
    "dataset_shard_num", "dataset_shard_idx", "skip_prepare_dataset", "dataset_keep_in_memory",
    "dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_drop_last", "remove_unused_columns", "push_dataset_to_hub", "min_sample_len",
    "max_prompt_len",
    "sample_packing_sequentially", "sample_packing_mp_start_method",
    "curriculum_sampling",
    "pretraining_sample_concatenation", "pretrain_multipack_buffer_size", "pretrain_multipack_attn",
    "use_pose", "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks",
    "preprocess_iterable", "is_preprocess",
    "total_supervised_tokens", "axolotl_config_path", "max_packed_sequence_len", "streaming",
    "shuffle_before_merging_datasets", "image_size", "image_resize_algorithm",
    # optimizer / schedule extras
    "auto_find_batch_size", "embedding_lr", "embedding_lr_scale",
    "torchdistx_path",
    "adam_epsilon2", "adam_beta3",
    "noisy_embedding_alpha",
    # evaluation / checkpoints / output
    "evaluation_strategy", "save_first_step", "load_best_model_at_end",
    "include_tokens_per_second", "include_tkps",
    "eval_table_size",
    "eval_max_new_tokens", "do_causal_lm_eval", "eval_causal_lm_metrics", "do_bench_eval",
    "bench_dataset", "bench_split", "hub_strategy", "hub_revision", "accelerator_config",
    # RL / preference tuning beyond `rl`
    "trl", "vllm", "reward_model", "process_reward_model", "num_labels", "orpo_alpha", "rpo_alpha",
    "simpo_gamma", "cpo_alpha", "rl_beta",
    # distributed
    "ddp", "world_size", "local_rank", "fsdp_final_state_dict_type", "fsdp_version",
    "sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size", "dp_shard_size",
    "dp_replicate_size", "heads_k_stride", "ring_attn_func", "use_ray", "resources_per_worker",
    # logging integrations and plugins
    "use_wandb", "hf_mlflow_log_artifacts", "use_swanlab", "use_trackio", "comet_api_key", "comet_workspace",
    "comet_experiment_key", "comet_online", "comet_experiment_config", "relora_prune_method",
    "liger_use_token_scaling", "liger_rms_norm_gated", "liger_dyt",
})

# Families of Axolotl keys (integrations, plugins) whose members keep growing.
UNSUPPORTED_PREFIXES: tuple[str, ...] = (
    "swanlab_", "trackio_", "gradio_", "ray_", "unsloth_",
    "jagged_restart_", "lisa_", "kd_", "dpo_", "kto_", "grokfast_", "spectrum_", "lm_eval_",
    "ddp_",
)

# Keys of a `datasets:` entry that Axolotl knows and molt does not implement yet.
DATASET_UNSUPPORTED_KEYS: frozenset[str] = frozenset({
    "input_transform", "preprocess_shards", "input_format", "field_human",
    "field_model", "field_tools", "field_thinking", "template_thinking_key", "split_thinking",
    "logprobs_field", "temperature", "trust_remote_code",
    "skip", "step_separator", "max_completion_length", "train_on_last_step_only", "length",
    "sequence_length", "min_input_id", "max_input_id", "seed",
})

# Keys allowed inside a dict-valued dataset `type:` (a user-defined prompt format).
DATASET_TYPE_KEYS: frozenset[str] = frozenset({
    "system_prompt", "system_format", "field_system", "field_instruction", "field_input", "field_output",
    "format", "no_input_format", "field_prompt", "field_chosen", "field_rejected", "prompt_format",
    "chosen_format", "rejected_format", "field_completion", "field_label", "completion_format",
})

# Old or internal Axolotl spellings of molt fields: {spelling: field}.
RENAMED_KEYS: dict[str, str] = {
    "model_revision": "revision_of_model",
    "type_of_model": "model_type",
    "dataset_num_proc": "dataset_processes",
}


def known_unsupported_keys() -> frozenset[str]:
    """Top-level Axolotl keys that load but are ignored (plus the families in UNSUPPORTED_PREFIXES)."""
    return UNSUPPORTED_KEYS


def _is_unsupported(key: str) -> bool:
    return key in UNSUPPORTED_KEYS or key.startswith(UNSUPPORTED_PREFIXES)


# -- datasets -------------------------------------------------------------------------------------


class DatasetConfig(BaseModel):
    """One entry of `datasets:`, `test_datasets:` or `pretraining_dataset:`."""

    model_config = ConfigDict(extra="allow")

    # where the rows come from
    path: str
    name: str | None = None
    data_files: str | list[str] | None = None
    ds_type: str | None = None  # file format when `path` is a file or directory: json, csv, parquet...
    split: str = "train"
    train_on_split: str | None = None
    revision: str | None = None
    shards: int | None = Field(default=None, ge=1)
    shards_idx: int | None = Field(default=None, ge=0)

    # how a row becomes a prompt: a strategy name (alpaca, completion, chat_template, ...) or a
    # dict of field_system / field_instruction / field_input / field_output / format ...
    type: str | dict[str, Any] | None = None
    field: str | None = None  # `completion`: the text column
    conversation: str | None = None  # `alpaca_chat`: its prompt style (instruct, chat, chatml, phi)
    text_column: str | None = None  # `pretraining_dataset`: the text column (default text)

    # `type: chat_template`; chat_template None means "use the top-level chat_template"
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    default_system_message: str | None = None
    field_messages: str = "messages"
    message_field_role: str = "role"  # legacy spelling of message_property_mappings.role
    message_field_content: str = "content"  # legacy spelling of message_property_mappings.content
    message_property_mappings: dict[str, str] | None = None  # filled in: always has role and content
    roles: dict[str, list[str]] | None = None
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "last", "none"] = "turn"
    message_field_training: str | None = None
    message_field_training_detail: str | None = None
    drop_system_message: bool = False  # the conversation's system message left out (a default_system_message is not)

    @field_validator("type")
    @classmethod
    def _no_sharegpt(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("sharegpt"):
            raise ValueError(
                f"`type: {value}` was removed from Axolotl and is not supported; use `type: chat_template` "
                "with `field_messages: conversations` and "
                "`message_property_mappings: {role: from, content: value}` for ShareGPT-shaped rows"
            )
        return value

    @model_validator(mode="after")
    def _resolve(self) -> "DatasetConfig":
        _resolve_chat_template(self)
        _merge_property_mappings(self)
        return self


def _resolve_chat_template(owner: "DatasetConfig | MoltConfig") -> None:
    # Axolotl: a custom template alone implies `chat_template: jinja`; `jinja` alone is an error.
    if owner.chat_template_jinja and not owner.chat_template:
        owner.chat_template = "jinja"
    if owner.chat_template == "jinja" and not owner.chat_template_jinja:
        raise ValueError("chat_template: jinja requires chat_template_jinja (the template text or a path to it)")


def _merge_property_mappings(ds: DatasetConfig) -> None:
    # The legacy message_field_* keys and message_property_mappings say the same thing; consumers
    # should read only the mapping, so fold the legacy keys in and refuse contradictions.
    mapping = dict(ds.message_property_mappings or {})
    for prop, legacy in (("role", "message_field_role"), ("content", "message_field_content")):
        given = getattr(ds, legacy)
        if prop in mapping and legacy in ds.model_fields_set and mapping[prop] != given:
            raise ValueError(
                f"{legacy} ({given!r}) contradicts message_property_mappings.{prop} ({mapping[prop]!r}); "
                "set only message_property_mappings"
            )
        mapping.setdefault(prop, given)
    ds.message_property_mappings = mapping


# -- the whole config -----------------------------------------------------------------------------


class LrGroup(BaseModel):
    """One entry of `lr_groups`: the parameters whose names contain one of `modules` train at `lr`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    modules: list[str] = Field(min_length=1)
    lr: float = Field(gt=0)


class MoltConfig(BaseModel):
    """The whole config. Unsupported and unknown keys are kept as extras (see module docstring)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    # model and tokenizer
    base_model: str
    base_model_config: str | None = None
    model_type: str | None = None  # e.g. AutoModelForCausalLM
    revision_of_model: str | None = None
    tokenizer_config: str | None = None
    tokenizer_type: str | None = None
    tokenizer_use_fast: bool = True
    tokenizer_legacy: bool | None = None
    trust_remote_code: bool = False
    overrides_of_model_config: dict[str, Any] | None = None  # e.g. rope_scaling, num_labels
    overrides_of_model_kwargs: dict[str, Any] | None = None  # passed to from_pretrained
    resize_token_embeddings_to_32x: bool = False

    # data
    datasets: list[DatasetConfig] | None = None
    test_datasets: list[DatasetConfig] | None = None
    pretraining_dataset: list[DatasetConfig] | None = None
    dataset_prepared_path: str | None = None  # None: DEFAULT_DATASET_PREPARED_PATH
    val_set_size: float = Field(default=0.0, ge=0)  # a fraction; >= 1 is a row count
    shuffle_merged_datasets: bool = True
    dataset_exact_deduplication: bool = False
    # None: decided at run time (from the CPU count), so the dump does not vary per machine
    dataset_processes: int | None = Field(default=None, ge=1)
    sequence_len: int = Field(default=2048, ge=1)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    sample_packing: bool = False
    pad_to_sequence_len: bool | None = None  # filled in: defaults to sample_packing
    eval_sample_packing: bool | None = None  # None: as sample_packing
    multipack_real_batches: bool | None = None  # filled in: true unless a varlen attention (flash, flex, xformers)
    sample_packing_group_size: int = Field(default=100_000, ge=1)
    sample_packing_bin_size: int = Field(default=200, ge=1)
    sample_packing_eff_est: float | None = Field(default=None, gt=0, le=1)
    total_num_tokens: int | None = Field(default=None, ge=0)
    batch_flattening: bool = False  # padding-free batches without packing
    group_by_length: bool = False
    train_on_inputs: bool = False

    # chat templates and tokens
    chat_template: str | None = None  # None: the tokenizer's own; or chatml, llama3, jinja, ...
    chat_template_jinja: str | None = None
    default_system_message: str | None = None
    special_tokens: dict[str, str] | None = None  # bos_token, eos_token, pad_token, unk_token
    eot_tokens: list[str] | None = None  # a chat turn's end markers (None: EOS and the built-in templates' markers)
    tokens: list[str] | None = None

    # adapter
    adapter: Literal["lora", "qlora"] | None = None
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = 16
    lora_dropout: float = Field(default=0.0, ge=0, le=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_fan_in_fan_out: bool | None = None
    lora_model_dir: str | None = None
    peft_use_dora: bool | None = None
    peft_layers_to_transform: list[int] | int | None = None
    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    loraplus_lr_embedding: float | None = Field(default=None, gt=0)
    unfrozen_parameters: list[str] | None = None
    neftune_noise_alpha: float | None = Field(default=None, gt=0)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_config_kwargs: dict[str, Any] | None = None
    peft: dict[str, Any] | None = None  # {loftq_config: {loftq_bits: 4}}: LoftQ-initialised LoRA

    # batch and schedule
    micro_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    batch_size: int | None = Field(default=None, ge=1)  # filled in: micro_batch_size * grad. accum.
    eval_batch_size: int | None = Field(default=None, ge=1)  # filled in: micro_batch_size
    num_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float | None = None  # Axolotl has no default (required there); the trainer decides
    optimizer: str = "adamw_torch"
    lr_scheduler: str = "cosine"
    cosine_min_lr_ratio: float | None = Field(default=None, ge=0, le=1)
    lr_div_factor: float | None = Field(default=None, gt=0)
    lr_scheduler_kwargs: dict[str, Any] | None = None
    adam_beta1: float | None = Field(default=None, ge=0, lt=1)
    adam_beta2: float | None = Field(default=None, ge=0, lt=1)
    adam_epsilon: float | None = Field(default=None, ge=0)
    optim_args: str | dict[str, Any] | None = None
    optim_target_modules: list[str] | Literal["all-linear", "all_linear"] | str | None = None  # GaLore / APOLLO
    lr_groups: list[LrGroup] | None = None  # parameter groups at their own lr
    cosine_constant_lr_ratio: float | None = Field(default=None, ge=0, le=1)  # cosine to the floor, then constant
    lr_quadratic_warmup: bool | None = None
    log_sweep_min_lr: float | None = Field(default=None, gt=0)
    log_sweep_max_lr: float | None = Field(default=None, gt=0)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 42
    rl: str | None = None  # dpo, ipo, orpo, kto, simpo, grpo

    # precision and memory
    bf16: Literal["auto", "full"] | bool | None = "auto"
    fp16: bool | None = None
    tf32: bool | None = None
    bfloat16: bool | None = None  # the weights themselves in bf16 (as bf16: full)
    float16: bool | None = None  # the weights themselves in fp16 (no loss scaling)
    float32: bool | None = None  # the weights in fp32 (molt's default)
    # attention kernel: attn_implementation (transformers' name) or one of the Axolotl flags
    attn_implementation: str | None = None
    flash_attention: bool | None = None
    sdp_attention: bool | None = None
    xformers_attention: bool | None = None
    eager_attention: bool | None = None
    torch_compile: Literal["auto"] | bool | None = None
    torch_compile_backend: str | None = None
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    # plugins: the Liger one (its liger_* kernels); others are reported as not supported
    plugins: list[str] | None = None
    liger_rope: bool | None = None
    liger_rms_norm: bool | None = None
    liger_layer_norm: bool | None = None
    liger_glu_activation: bool | None = None
    liger_swiglu: bool | None = None  # Axolotl's older spelling of liger_glu_activation
    liger_cross_entropy: bool | None = None
    liger_fused_linear_cross_entropy: bool | None = None
    gradient_checkpointing: Literal["offload", "offload_disk", "unsloth"] | bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None

    # evaluation, checkpoints, output
    output_dir: str = "./model-out"
    logging_steps: int | None = Field(default=None, ge=1)
    eval_steps: int | float | None = None  # int: every N steps; float < 1: fraction of total steps
    evals_per_epoch: int | None = Field(default=None, ge=1)
    save_steps: int | float | None = None
    saves_per_epoch: int | None = Field(default=None, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    loss_watchdog_threshold: float | None = None
    loss_watchdog_patience: int | None = Field(default=None, ge=1)
    resume_from_checkpoint: str | None = None
    auto_resume_from_checkpoints: bool = False
    eval_strategy: Literal["no", "steps", "epoch"] | None = None  # None: steps when an interval is set
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = None
    metric_for_best_model: str | None = None  # None: eval_loss (the only metric molt evaluates)
    greater_is_better: bool | None = None
    save_safetensors: bool | None = None  # weights are always safetensors; false is refused
    save_only_model: bool = False  # checkpoints without optimizer and scheduler state (not resumable)
    profiler_steps: int | None = Field(default=None, ge=1)
    profiler_steps_start: int | None = Field(default=None, ge=0)

    # ReLoRA: merge and restart the LoRA adapter every relora_steps
    relora_steps: int | None = Field(default=None, ge=1)
    relora_warmup_steps: int | None = Field(default=None, ge=0)
    relora_anneal_steps: int | None = Field(default=None, ge=0)
    relora_prune_ratio: float | None = Field(default=None, ge=0, le=1)
    relora_cpu_offload: bool = False

    # trackers (none unless set; their logs stay out of the artifacts)
    use_tensorboard: bool = False
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    wandb_run_id: str | None = None
    wandb_watch: str | None = None
    wandb_log_model: str | None = None
    use_mlflow: bool | None = None  # None: on when mlflow_tracking_uri or mlflow_experiment_name is set
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None
    use_comet: bool | None = None
    comet_mode: Literal["online", "offline", "get", "get_or_create", "create"] | None = None
    comet_project_name: str | None = None
    hub_model_id: str | None = None

    # distributed
    deepspeed: str | dict[str, Any] | None = None
    fsdp: list[str] | str | None = None
    fsdp_config: dict[str, Any] | None = None

    # molt behaviour
    strict: bool = False  # unknown keys are errors; CLI overrides may only change keys in the file
    config_warnings: list[str] = Field(default_factory=list, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _sort_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        notes = list((info.context or {}).get("load_warnings", ()))
        _rename_legacy_keys(data)
        unknown = _classify_keys(data, notes)
        if unknown and data.get("strict") is True:
            raise ValueError(
                f"strict: true refuses keys that are neither Axolotl nor molt options: {', '.join(unknown)}"
            )
        for note in notes:
            warnings.warn(note, MoltConfigWarning, stacklevel=2)
        data["config_warnings"] = notes
        return data

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # Axolotl examples write `adapter:` or `adapter: ""`

    @field_validator("pretraining_dataset", mode="before")
    @classmethod
    def _pretraining_dataset_shorthand(cls, value: Any) -> Any:
        # Older Axolotl configs give a single dataset path, or a single entry, instead of a list.
        if isinstance(value, str):
            return [{"path": value}]
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _apply_rules(self) -> "MoltConfig":
        problems = []
        for rule in _RULES:
            try:
                rule(self)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def prepared_path(self) -> str:
        return self.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH


def _known_keys() -> frozenset[str]:
    return frozenset(MoltConfig.model_fields) - {"config_warnings"}


def _rename_legacy_keys(data: dict) -> None:
    for old, new in RENAMED_KEYS.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{old} and {new} are the same option (given {data[old]!r} and {data[new]!r}); keep only {new}")
        data[new] = data.pop(old)


def _classify_keys(data: dict, notes: list[str]) -> list[str]:
    """Add a warning to `notes` for each ignored or unknown key; return the unknown ones."""
    unknown: list[str] = []

    def sort(key: str, shown: str, known: frozenset[str], unsupported: Callable[[str], bool]) -> None:
        if key in known:
            return
        if unsupported(key):
            notes.append(f"ignored: {shown} — not supported yet")
        else:
            notes.append(f"unknown key: {shown} (not an Axolotl or molt option)")
            unknown.append(shown)

    for key in data:
        sort(key, key, _known_keys(), _is_unsupported)
    dataset_keys = frozenset(DatasetConfig.model_fields)
    for list_key in ("datasets", "test_datasets", "pretraining_dataset"):
        entries = data.get(list_key)
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            if not isinstance(entry, dict):
                continue
            for key in entry:
                sort(key, f"{list_key}[{i}].{key}", dataset_keys, DATASET_UNSUPPORTED_KEYS.__contains__)
            if isinstance(entry.get("type"), dict):
                for key in entry["type"]:
                    sort(key, f"{list_key}[{i}].type.{key}", DATASET_TYPE_KEYS, lambda _: False)
    return unknown


# -- cross-field rules: each raises ValueError naming the keys, values and rule --------------------

_RULES: list[Callable[[MoltConfig], None]] = []


def _rule(fn: Callable[[MoltConfig], None]) -> Callable[[MoltConfig], None]:
    _RULES.append(fn)
    return fn


def _exclusive(cfg: MoltConfig, a: str, b: str) -> None:
    va, vb = getattr(cfg, a), getattr(cfg, b)
    if va is not None and vb is not None:
        raise ValueError(f"{a} ({va!r}) and {b} ({vb!r}) are mutually exclusive; set only one")


@_rule
def _chat_template_jinja(cfg: MoltConfig) -> None:
    _resolve_chat_template(cfg)


@_rule
def _warmup_exclusive(cfg: MoltConfig) -> None:
    _exclusive(cfg, "warmup_steps", "warmup_ratio")


@_rule
def _eval_schedule_exclusive(cfg: MoltConfig) -> None:
    _exclusive(cfg, "eval_steps", "evals_per_epoch")


@_rule
def _save_schedule_exclusive(cfg: MoltConfig) -> None:
    _exclusive(cfg, "save_steps", "saves_per_epoch")


@_rule
def _needs_data(cfg: MoltConfig) -> None:
    if not cfg.datasets and not cfg.pretraining_dataset:
        raise ValueError("datasets (or pretraining_dataset) is required: at least one dataset to train on")


@_rule
def _pretraining_dataset_as_completion(cfg: MoltConfig) -> None:
    # Axolotl streams pretraining_dataset's `text_column` for max_steps; molt reads it as `completion`
    # datasets (each document with BOS/EOS, long ones split into sequence_len pieces, then packed).
    if not cfg.pretraining_dataset:
        return
    if cfg.datasets:
        raise ValueError("pretraining_dataset and datasets are both set; Axolotl trains on pretraining_dataset alone: keep one")
    if not cfg.max_steps:
        raise ValueError("pretraining_dataset needs max_steps (Axolotl streams it, so the number of steps is not known)")
    cfg.datasets = [
        d.model_copy(update={"type": "completion", "field": d.field or d.text_column or "text", "text_column": None})
        if d.type in (None, "pretrain") else d
        for d in cfg.pretraining_dataset
    ]
    cfg.pretraining_dataset = None


@_rule
def _one_eval_source(cfg: MoltConfig) -> None:
    if cfg.test_datasets and cfg.val_set_size:
        raise ValueError(
            f"test_datasets and val_set_size ({cfg.val_set_size!r}) are mutually exclusive: "
            "evaluate on test_datasets or on a split of datasets, not both (set val_set_size: 0)"
        )


@_rule
def _qlora_needs_4bit(cfg: MoltConfig) -> None:
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        raise ValueError(f"adapter: qlora requires load_in_4bit: true (got load_in_4bit: {cfg.load_in_4bit!r})")


@_rule
def _qlora_not_8bit(cfg: MoltConfig) -> None:
    if cfg.adapter == "qlora" and cfg.load_in_8bit:
        raise ValueError("adapter: qlora cannot use load_in_8bit: true (qlora is 4-bit; use adapter: lora for 8-bit)")


@_rule
def _quantized_needs_adapter(cfg: MoltConfig) -> None:
    flags = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(cfg, k)]
    if flags and not cfg.adapter:
        raise ValueError(
            f"{' and '.join(f'{k}: true' for k in flags)} requires an adapter (lora or qlora): "
            "a quantized model cannot be fully fine-tuned"
        )


@_rule
def _loftq_on_plain_lora(cfg: MoltConfig) -> None:
    unknown = sorted(set(cfg.peft or {}) - {"loftq_config"})
    if unknown:
        raise ValueError(f"peft: {', '.join(unknown)} not supported (molt reads peft.loftq_config)")
    loftq = (cfg.peft or {}).get("loftq_config")
    if loftq is None:
        return
    if not isinstance(loftq, dict) or set(loftq) - {"loftq_bits"}:
        raise ValueError(f"peft.loftq_config: {loftq!r}: expected {{loftq_bits: 4}}")
    if cfg.adapter != "lora":
        raise ValueError(f"peft.loftq_config initialises a LoRA adapter: needs adapter: lora (got {cfg.adapter!r})")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ValueError("peft.loftq_config quantizes the full-precision base itself: unset load_in_4bit / load_in_8bit")
    if cfg.peft_use_dora:
        raise ValueError("peft.loftq_config with peft_use_dora: DoRA's magnitudes would be computed from the unquantized weights")


@_rule
def _one_distributed_backend(cfg: MoltConfig) -> None:
    if cfg.deepspeed and (cfg.fsdp or cfg.fsdp_config):
        other = "fsdp" if cfg.fsdp else "fsdp_config"
        raise ValueError(f"deepspeed ({cfg.deepspeed!r}) and {other} are mutually exclusive; use one")


@_rule
def _early_stopping_needs_evaluation(cfg: MoltConfig) -> None:
    # The best checkpoint is judged at evaluations and must have been saved at one (Axolotl's rule).
    if cfg.early_stopping_patience is None:
        return
    if not (cfg.eval_steps and cfg.save_steps):
        raise ValueError(
            f"early_stopping_patience ({cfg.early_stopping_patience}) needs evaluation and saving at fixed steps: "
            f"set eval_steps and save_steps (got eval_steps: {cfg.eval_steps!r}, save_steps: {cfg.save_steps!r})"
        )
    if cfg.save_steps % cfg.eval_steps:
        raise ValueError(f"early_stopping_patience: save_steps ({cfg.save_steps}) must be a multiple of eval_steps ({cfg.eval_steps})")


@_rule
def _relora_not_sharded(cfg: MoltConfig) -> None:
    relora = cfg.relora_steps
    if relora and (cfg.fsdp or cfg.fsdp_config):
        raise ValueError(f"relora_steps ({relora}) does not work with fsdp: ReLoRA merges and resets adapters on one process")


@_rule
def _loraplus_needs_adapter(cfg: MoltConfig) -> None:
    given = [k for k in ("loraplus_lr_ratio", "loraplus_lr_embedding") if getattr(cfg, k) is not None]
    if given and not cfg.adapter:
        raise ValueError(f"{given[0]} ({getattr(cfg, given[0])}) sets the learning rates of a LoRA adapter's matrices: needs adapter: lora or qlora")


@_rule
def _schedule_keys_match_scheduler(cfg: MoltConfig) -> None:
    name = cfg.lr_scheduler
    for key, wanted in (("cosine_min_lr_ratio", "cosine"), ("cosine_constant_lr_ratio", "cosine"), ("lr_div_factor", "one_cycle"), ("log_sweep_min_lr", "log_sweep"), ("log_sweep_max_lr", "log_sweep")):
        if getattr(cfg, key) is not None and name != wanted:
            raise ValueError(f"{key} ({getattr(cfg, key)}) applies to lr_scheduler: {wanted}, not lr_scheduler: {name}")
    if cfg.lr_quadratic_warmup and name != "cosine":
        raise ValueError(f"lr_quadratic_warmup applies to lr_scheduler: cosine, not lr_scheduler: {name}")
    if cfg.cosine_constant_lr_ratio is not None and cfg.cosine_min_lr_ratio is None:
        raise ValueError(f"cosine_constant_lr_ratio ({cfg.cosine_constant_lr_ratio}) holds the learning rate at the cosine's floor: set cosine_min_lr_ratio (the floor) too")
    if cfg.lr_quadratic_warmup and cfg.cosine_min_lr_ratio is not None:
        raise ValueError("lr_quadratic_warmup and cosine_min_lr_ratio do not combine (the quadratic warm-up's cosine ends at 0); set only one")
    low, high = cfg.log_sweep_min_lr or 1e-10, cfg.log_sweep_max_lr or 10.0
    if name == "log_sweep" and low >= high:
        raise ValueError(f"log_sweep_min_lr ({low}) must be below log_sweep_max_lr ({high})")


GALORE_LIKE = ("galore_", "apollo_")


@_rule
def _optimizer_keys(cfg: MoltConfig) -> None:
    projected = cfg.optimizer.startswith(GALORE_LIKE)
    if cfg.optim_target_modules and not projected:
        raise ValueError(f"optim_target_modules names the layers GaLore / APOLLO project: needs a galore_* or apollo_* optimizer, not {cfg.optimizer}")
    if projected and not cfg.optim_target_modules:
        raise ValueError(f"optimizer: {cfg.optimizer} needs optim_target_modules (the layers it projects, e.g. [attn, mlp] or all-linear)")
    if cfg.lr_groups:
        names = [g.name for g in cfg.lr_groups]
        if len(set(names)) < len(names):
            raise ValueError(f"lr_groups: group names must differ (got {names})")
        if cfg.loraplus_lr_ratio is not None:
            raise ValueError("lr_groups and loraplus_lr_ratio both set the parameters' learning rates; use one")
        if projected or cfg.optimizer in ("lomo", "adalomo"):
            raise ValueError(f"lr_groups cannot be used with optimizer: {cfg.optimizer} (it builds its own parameter groups)")
    own_schedule = cfg.lr_scheduler in ("one_cycle", "log_sweep") or cfg.lr_quadratic_warmup or cfg.cosine_constant_lr_ratio is not None
    if cfg.optimizer.endswith("_layerwise") and own_schedule:
        raise ValueError(f"optimizer: {cfg.optimizer} steps each layer inside the backward pass with transformers' own schedulers; lr_scheduler: {cfg.lr_scheduler} (and lr_quadratic_warmup / cosine_constant_lr_ratio) cannot drive it")
    accumulation = cfg.batch_size // cfg.micro_batch_size if cfg.batch_size else cfg.gradient_accumulation_steps
    if cfg.optimizer.endswith("_layerwise") and accumulation > 1:
        raise ValueError(f"optimizer: {cfg.optimizer} updates each layer as soon as its gradient is ready: gradient_accumulation_steps must be 1 (got {accumulation})")


@_rule
def _one_precision(cfg: MoltConfig) -> None:
    if cfg.fp16 and cfg.bf16 in (True, "full"):
        raise ValueError(f"fp16: true and bf16: {cfg.bf16} are mutually exclusive; set one (bf16: auto picks for you)")
    if cfg.bf16 == "full" and (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ValueError("bf16: full casts the weights to bf16, which a 4-/8-bit quantized base cannot be; use bf16: true (mixed precision)")
    dtypes = [k for k in ("bfloat16", "float16", "float32") if getattr(cfg, k)]
    if len(dtypes) > 1:
        raise ValueError(f"{' and '.join(f'{k}: true' for k in dtypes)} each set the weights' dtype; set one")
    if dtypes and (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ValueError(f"{dtypes[0]}: true casts the weights, which a 4-/8-bit quantized base cannot be; use bf16: true (mixed precision)")
    clash = {"float16": cfg.bf16 in (True, "full"), "bfloat16": bool(cfg.fp16), "float32": cfg.bf16 == "full"}
    for key in dtypes:
        if clash[key]:
            raise ValueError(f"{key}: true contradicts {'fp16: true' if key == 'bfloat16' else f'bf16: {cfg.bf16}'}: the weights have one dtype")


ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "xformers_attention": "xformers", "eager_attention": "eager"}


@_rule
def _one_attention(cfg: MoltConfig) -> None:
    chosen = {f"{k}: true": v for k, v in ATTENTION_FLAGS.items() if getattr(cfg, k)}
    if cfg.attn_implementation:
        chosen[f"attn_implementation: {cfg.attn_implementation}"] = cfg.attn_implementation
    if len(set(chosen.values())) > 1:
        raise ValueError(f"{' and '.join(chosen)} choose different attention kernels; set one")


@_rule
def _plain_gradient_checkpointing(cfg: MoltConfig) -> None:
    mode = cfg.gradient_checkpointing
    if mode not in (True, False, "offload"):
        raise ValueError(f"gradient_checkpointing: {mode} is not supported yet; use gradient_checkpointing: true, or offload (checkpointed activations kept in CPU memory)")


@_rule
def _compile_settings_need_compile(cfg: MoltConfig) -> None:
    given = [k for k in ("torch_compile_backend", "torch_compile_mode") if getattr(cfg, k) is not None]
    if given and not cfg.torch_compile:
        raise ValueError(f"{given[0]} ({getattr(cfg, given[0])}) applies with torch_compile: true")


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_KEYS = ("liger_rope", "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu", "liger_cross_entropy", "liger_fused_linear_cross_entropy")


@_rule
def _plugins(cfg: MoltConfig) -> None:
    plugins = cfg.plugins or []
    liger = any(p.endswith("LigerPlugin") for p in plugins)
    for name in plugins:
        if not name.endswith("LigerPlugin"):
            note = f"ignored: plugins: {name} — not supported yet (molt has the Liger kernels: {LIGER_PLUGIN})"
            if note not in cfg.config_warnings:
                cfg.config_warnings.append(note)
                warnings.warn(note, MoltConfigWarning, stacklevel=2)
    given = [k for k in LIGER_KEYS if getattr(cfg, k)]
    if given and not liger:
        raise ValueError(f"{given[0]}: the liger_* keys belong to the Liger plugin: add plugins: [{LIGER_PLUGIN}]")
    if cfg.liger_swiglu is not None and cfg.liger_glu_activation is not None:
        raise ValueError("liger_swiglu and liger_glu_activation are the same option (liger_swiglu is the old name); keep liger_glu_activation")
    for key in ("liger_cross_entropy", "liger_fused_linear_cross_entropy"):
        if getattr(cfg, key):
            raise ValueError(
                f"{key}: not supported: molt computes the loss itself from the logits (summed over the trained tokens of the "
                "whole optimizer step), so Liger's loss kernels, which replace the model's own loss, would never run"
            )


@_rule
def _relora_needs_plain_lora(cfg: MoltConfig) -> None:
    if not cfg.relora_steps:
        return
    if cfg.adapter != "lora":
        raise ValueError(f"relora_steps ({cfg.relora_steps}) needs adapter: lora (got adapter: {cfg.adapter!r}): ReLoRA merges and restarts a LoRA adapter")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ValueError("relora_steps with load_in_4bit / load_in_8bit is not supported yet: merging into a quantized base needs its full weights")
    if cfg.peft_use_dora:
        raise ValueError("relora_steps with peft_use_dora: DoRA's magnitude vector is not a low-rank update ReLoRA can merge")
    if cfg.lr_scheduler == "one_cycle":
        raise ValueError("relora_steps does not work with lr_scheduler: one_cycle (Axolotl's rule); use cosine, linear or constant")


@_rule
def _strategies_match_intervals(cfg: MoltConfig) -> None:
    # Axolotl: an interval means the "steps" strategy; another strategy beside it is a contradiction.
    for strategy, intervals in (("eval_strategy", ("eval_steps", "evals_per_epoch")), ("save_strategy", ("save_steps", "saves_per_epoch"))):
        value = getattr(cfg, strategy)
        given = [k for k in intervals if getattr(cfg, k) is not None]
        if value not in (None, "steps") and given:
            raise ValueError(f"{strategy}: {value} contradicts {given[0]} ({getattr(cfg, given[0])!r}): an interval means {strategy}: steps; remove one")


@_rule
def _best_saves_need_evaluation(cfg: MoltConfig) -> None:
    evaluates = cfg.eval_strategy in ("steps", "epoch") or (cfg.eval_strategy is None and (cfg.eval_steps or cfg.evals_per_epoch))
    if cfg.save_strategy == "best" and not evaluates:
        raise ValueError("save_strategy: best saves when an evaluation improves on the best so far: set eval_steps, evals_per_epoch or eval_strategy")


@_rule
def _safetensors_only(cfg: MoltConfig) -> None:
    if cfg.save_safetensors is False:
        raise ValueError("save_safetensors: false is not supported: molt writes weights as safetensors only (no pickled .bin files)")


@_rule
def _no_packing_for_rl(cfg: MoltConfig) -> None:
    if cfg.sample_packing and cfg.rl:
        raise ValueError(f"sample_packing: true is not supported with rl: {cfg.rl}; set sample_packing: false")


@_rule
def _packing_pads(cfg: MoltConfig) -> None:
    # Axolotl: packed batches are padded to sequence_len unless the user says otherwise.
    if cfg.pad_to_sequence_len is None:
        cfg.pad_to_sequence_len = cfg.sample_packing


VARLEN_ATTENTION_KEYS = ("flash_attention", "flex_attention", "xformers_attention")


@_rule
def _real_batches_without_varlen_attention(cfg: MoltConfig) -> None:
    # Axolotl: one micro_batch_size x sequence_len row per micro-batch only pays off where attention
    # skips the other samples' blocks (varlen kernels); dense SDPA/eager attention over that row
    # costs micro_batch_size times more, so without those kernels a micro-batch is rows of sequence_len.
    if cfg.multipack_real_batches is None:
        extra = cfg.model_extra or {}
        varlen = any(getattr(cfg, k, None) or extra.get(k) for k in VARLEN_ATTENTION_KEYS)
        varlen = varlen or (cfg.attn_implementation or "").startswith(("flash_attention", "flex_attention"))
        cfg.multipack_real_batches = not varlen


@_rule
def _batch_sizes(cfg: MoltConfig) -> None:
    mbs, gas, total = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.batch_size
    if total is None:
        cfg.batch_size = mbs * gas
    elif total % mbs:
        raise ValueError(f"batch_size ({total}) must be a multiple of micro_batch_size ({mbs})")
    elif "gradient_accumulation_steps" in cfg.model_fields_set and gas != total // mbs:
        raise ValueError(
            f"batch_size ({total}) != micro_batch_size ({mbs}) * gradient_accumulation_steps ({gas}); "
            "set two of the three"
        )
    else:
        cfg.gradient_accumulation_steps = total // mbs
    if cfg.eval_batch_size is None:
        cfg.eval_batch_size = mbs


# -- loading --------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (PyYAML keeps the last one without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    self.duplicates.append(
                        f"duplicate key: {key_node.value} (line {key_node.start_mark.line + 1}) — the last value wins"
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[Any, list[str]]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    loader = _YamlLoader(text)
    try:
        return loader.get_single_data(), [f"{path}: {d}" for d in loader.duplicates]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML error: {error}") from None
    finally:
        loader.dispose()


def _normalize_key(key: str) -> str:
    return key.strip().replace("-", "_")


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> MoltConfig:
    """Read a YAML config, apply `overrides` (e.g. from parse_cli_overrides) and validate it."""
    path = Path(path)
    data, notes = _read_yaml(path)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {got}")
    if overrides:
        overrides = {_normalize_key(k): v for k, v in overrides.items()}
        # Axolotl: under strict, the CLI may change what the file says but not add to it.
        added = sorted(k for k in overrides if k not in data)
        if data.get("strict") is True and added:
            raise ConfigError(
                f"{path}: strict: true only allows overriding keys already in the file; "
                f"not in it: {', '.join(added)}"
            )
        data.update(overrides)
    return config_from_dict(data, source=str(path), load_warnings=notes)


def config_from_dict(data: dict, source: str = "<config>", load_warnings: list[str] = ()) -> MoltConfig:
    """Validate an already-parsed config; errors become one ConfigError prefixed by `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys, got a {type(data).__name__}")
    bad = [repr(k) for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{source}: config keys must be strings, got {', '.join(bad)}")
    try:
        return MoltConfig.model_validate(data, context={"load_warnings": list(load_warnings)})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


# pydantic puts union members and wrapper schemas in error locations ("str", "list[str]",
# "function-after[...]"); they are not keys, so they are left out of the path shown.
_SCHEMA_TAG = re.compile(
    r"(?:str|int|float|bool|bytes|none)$"
    r"|(?:list|dict|tuple|set|literal|is-instance|json-or-python|nullable|union|tagged-union|model|function-\w+)\["
    r"|[A-Z]\w*$"
)


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _SCHEMA_TAG.match(part):
            out += f".{part}" if out else part
    return out


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: ValidationError, source: str) -> str:
    by_key: dict[str, tuple[Any, list[str]]] = {}
    for e in error.errors(include_url=False):
        key = _key_path(e["loc"])
        if e["type"] == "value_error":
            message = str(e["ctx"]["error"])
        elif e["type"] == "missing":
            message = "missing (required)"
        else:
            message = e["msg"]
        value, messages = by_key.setdefault(key, (e.get("input"), []))
        if message not in messages:
            messages.append(message)
    lines = [f"{source}: invalid config:"]
    for key, (value, messages) in by_key.items():
        if not key:  # cross-field rules: each message line already names its keys and values
            lines += [f"  - {line}" for m in messages for line in m.splitlines()]
        elif messages == ["missing (required)"] or isinstance(value, dict):
            lines.append(f"  - {key}: {' or '.join(messages)}")
        else:  # several messages: one per member of a union type
            lines.append(f"  - {key}: got {_short_repr(value)}: {' or '.join(messages)}")
    return "\n".join(lines)


# -- CLI overrides --------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) reads "1e-4" as a string: exponent floats need a dot there.
_EXPONENT_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. a Jinja template: not YAML, meant verbatim
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def parse_cli_overrides(args: list[str]) -> dict[str, object]:
    """["--learning-rate", "1e-4", "--sample-packing", "--seed=7"] -> {"learning_rate": 0.0001, ...}.

    Values are YAML (numbers, booleans, lists); a flag without a value is True. Only molt config
    fields are accepted: overriding an ignored or unknown key would have no effect.
    """
    out: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --key value, --key=value or --flag")
        name, has_value, text = arg[2:].partition("=")
        if has_value:
            value = _parse_value(text)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            value = _parse_value(args[i])
        else:
            value = True
        key = _normalize_key(name)
        key = RENAMED_KEYS.get(key, key)
        if key not in _known_keys():
            why = "an Axolotl option molt does not support yet" if _is_unsupported(key) else "not a molt config option"
            raise ConfigError(f"--{name}: {key} is {why}")
        out[key] = value
        i += 1
    return out
