"""The molt config: a pydantic model of an Axolotl-style YAML file, and its loader.

Keys follow Axolotl's config reference so Axolotl YAMLs load as-is. Every key ends up in one of
three places, and none is dropped silently:
  * a typed field of `MoltConfig` / `DatasetConfig` (implemented by molt), declared once: each
    stage reads a slice of these fields (`stage_params`, `dataset_params`, `slice_params`);
  * `UNSUPPORTED`: a real Axolotl key molt does not implement yet, refused at load when it would
    change the model or the data, else kept in the model's extras with a warning saying what molt
    does instead;
  * anything else: kept in extras and reported as "unknown key: ..." (an error under `strict: true`).

After field validation a few steps fill in values (NORMALISE), then the cross-field rules are
checked: a table of which keys exclude or require which (RULES) and a few small functions for
rules a row cannot say (CHECKS). Imports stay light (pydantic, PyYAML, stdlib): the CLI imports
this first.
"""

import difflib
import fnmatch
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from stages import deepspeed_config


class ConfigError(Exception):
    """A config problem, worded for the user: names the file, key, value and rule. `notes`: the
    warnings about ignored or unknown keys found before the config was refused (shown first)."""

    def __init__(self, message: str, notes: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.notes = list(notes)


class MoltConfigWarning(UserWarning):
    """An ignored or unknown key; the same text is kept in `MoltConfig.config_warnings`."""


# What `dataset_prepared_path: null` means; kept as None in the model so a dump stays as written.
DEFAULT_DATASET_PREPARED_PATH = "last_run_prepared"

# -- Axolotl keys molt does not implement yet ----------------------------------------------------
# One row per key, of one of two kinds:
#   refused: molt would produce something else than the key asks for (another model, other data):
#            loading stops with `key: value is not supported yet: <what molt would do instead>`;
#   warned:  the key only changes speed, memory, logging or where the run happens: it loads with
#            the warning `key: value — not supported yet: <what molt does instead>`.
# `family_*` names every key with that prefix, `datasets[].key` a key of a dataset entry. A null or
# empty value, or one equal to the row's `inert` value (what molt does anyway), loads silently.
# Implementing a key: add its field to MoltConfig / DatasetConfig and delete its row (a test
# checks they are disjoint). `{value}` / `{VALUE}` in a reason: the value given (upper-cased).


class Unsupported(NamedTuple):
    refused: bool
    reason: str
    inert: Any = False  # False also matches 0
    at_training: bool = False  # refused by training only: see REFUSED_AT_TRAINING


def _refused(reason: str, inert: Any = False) -> Unsupported:
    return Unsupported(True, reason, inert)


def _warned(instead: str, inert: Any = False) -> Unsupported:
    return Unsupported(False, instead, inert)


_SFT = "molt trains plain supervised fine-tuning, which has no such weight"
_KD = "knowledge distillation: molt would train on the labels alone, without a teacher's logits"
_NO_UPLOAD = "molt uploads nothing; the model is written to output_dir"
_UNSHARDED = "molt trains unsharded on one process (DDP with --launcher)"
_OWN_MODULES = "molt runs the model's own modules (same result, without this kernel)"
_LORA_KERNEL = "molt runs PEFT's LoRA layers (same result, without a fused kernel)"
_LOADER = "molt loads the batches in the training process (no workers, no pinned memory)"
_TEXT_ONLY = "molt trains on text; rows whose messages hold image parts are refused when formatted"
_LOSS_ONLY = "molt evaluates the loss on the held-out rows only"
_ARCHITECTURE = "molt reads the architecture from the model's config"
_PLACEMENT = "molt puts the whole model on each process's device"
_TRACKERS = "molt reports to tensorboard, wandb, mlflow or comet only"
_POSE = "molt would train on the rows' own positions, without PoSE's skipped ones"
_SYNTHETIC = "a setting of Axolotl's synthetic (random-token) dataset; molt would read the rows of path"

UNSUPPORTED: dict[str, Unsupported] = {
    # training method and objective
    "trl": _refused("it configures TRL's trainers directly; molt sets them from rl:, rl_beta and the other Axolotl keys"),
    "cls_model_config": _refused("molt would train a causal LM, not a sequence classifier"),
    "dpo_norm_loss": _refused("molt's DPO sums each answer's log-probs (use dpo_loss_type: [sigmoid_norm] for TRL's length-normalised loss)"),
    **dict.fromkeys(("dpo_padding_free", "dpo_use_logits_to_keep", "dpo_use_liger_kernel"),
                    _warned("molt runs TRL's DPO on padded pairs (same loss)")),
    "dpo_generate_during_eval": _warned("molt generates nothing while training"),
    "kd_*": _refused(_KD),
    "vllm": _warned("molt generates nothing while training"),
    "ebft": _refused("molt would train plain supervised fine-tuning, not energy-based fine-tuning (EBFT)"),
    "precompute_ref_log_probs": _warned("molt always computes the reference log-probs once, as a cached stage (ref_logprobs)"),
    "use_eaft": _refused("molt's loss weighs every trained token alike, not by the entropy of its prediction (EAFT)"),
    "eaft_*": _warned("a setting of use_eaft: molt's loss weighs every trained token alike"),
    "trainer_cls": _refused("molt trains with its own trainer, not {value}"),
    "use_onebitllms": _refused("molt would train the weights as they load, not as 1.58-bit ones"),
    # model loading
    "base_model_config": _refused("molt reads the model's config from base_model"),
    "rope_scaling": _refused("molt would keep the model's own RoPE; set overrides_of_model_config: {{rope_scaling: ...}}"),
    **dict.fromkeys(("model_quantization_config", "model_quantization_config_kwargs"),
                    _refused("molt would load the base unquantized (4-/8-bit: load_in_4bit / load_in_8bit)")),
    "gptq": _refused("molt would not load the base as a GPTQ model"),
    **dict.fromkeys(("reinit_weights", "random_init_weights"), _refused("molt would train from the base model's weights, not freshly initialised ones")),
    "llama4_linearized_experts": _refused("molt would keep Llama 4's experts as the fused modules they load as"),
    "tokenizer_use_mistral_common": _refused("molt would tokenize with the transformers tokenizer, not mistral-common"),
    "processor_type": _warned(_TEXT_ONLY),
    **dict.fromkeys(("image_size", "image_resize_algorithm"), _warned(_TEXT_ONLY)),
    "tokenizer_save_jinja_files": _warned("molt saves the tokenizer as transformers writes it"),
    "experimental_skip_move_to_device": _warned(_PLACEMENT),
    "use_kernels": _warned(_OWN_MODULES),
    "experts_implementation": _warned("molt runs the MoE experts as transformers loads them (same result, without this implementation)"),
    "quantize_moe_experts": _warned("molt keeps the MoE experts' weights unquantized (more memory; load_in_4bit / load_in_8bit quantize the linear layers)"),
    "freeze_mm_modules": _refused("molt would train the multimodal encoders' parameters too (unfrozen_parameters chooses what trains)"),
    **dict.fromkeys(("processor_kwargs", "role_boundaries"), _warned(_TEXT_ONLY)),
    **dict.fromkeys(("device", "device_map", "max_memory", "gpu_memory_limit"), _warned(_PLACEMENT)),
    "low_cpu_mem_usage": _warned("molt loads the model as transformers does by default"),
    "torchdistx_path": _warned("molt loads the model as transformers does by default"),
    **dict.fromkeys(("is_falcon_derived_model", "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model"), _warned(_ARCHITECTURE)),
    **dict.fromkeys(("capabilities", "env_capabilities"), _warned("Axolotl fills it in from the machine it runs on; molt reads the machine itself when it trains")),
    "hf_use_auth_token": _warned("molt downloads nothing: models and datasets come from local files and caches"),
    # tokenizer and embeddings
    "mean_resizing_embeddings": _refused("molt starts new embedding rows at the mean of the others (as mean_resizing_embeddings: true)", inert=True),
    "shrink_embeddings": _refused("molt would keep the embedding matrix's size"),
    "embeddings_skip_upcast": _warned("molt keeps the embeddings in the dtype they load in"),
    "added_tokens_overrides": _refused("molt would keep the tokenizer's added tokens as they are"),
    "fix_untrained_tokens": _refused("molt would leave the embeddings of untrained tokens as they are"),
    "chat_template_kwargs": _refused("molt would render the chat template without these variables"),
    "default_system_message": _refused("molt would add no system message; set default_system_message on the dataset entries"),
    # attention and kernels
    **dict.fromkeys(("scaling_softmax", "scaling_softmax_factor", "scaling_softmax_bias"),
                    _refused("molt would train with the model's own attention softmax, not scaled softmax (SSMax)")),
    **dict.fromkeys(("large_head_attention", "flash_attn_d512", "gemma4_hybrid_attn_impl"),
                    _warned("molt uses the attention attn_implementation names (transformers' default otherwise)")),
    "sdpa_varlen": _warned("molt runs sdpa over packed rows with a block-diagonal mask (same result)"),
    "fused_attn_kernel": _warned(_OWN_MODULES),
    "torch_compile_options": _warned("molt compiles with inductor's default settings"),
    "s2_attention": _refused("molt would train with full attention, not shifted sparse attention"),
    "flex_attention": _warned("molt uses the attention attn_implementation names (attn_implementation: flex_attention)"),
    "flex_attn_compile_kwargs": _warned("molt compiles FlexAttention with its defaults"),
    "sage_attention": _warned("molt uses the attention attn_implementation names (transformers' default otherwise)"),
    **dict.fromkeys(("flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp", "flash_optimum",
                     "liger_rms_norm_gated", "liger_dyt", "unsloth_*"), _warned(_OWN_MODULES)),
    **dict.fromkeys(("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"), _warned(_LORA_KERNEL)),
    "chunked_cross_entropy_num_chunks": _warned("molt's chunked loss sizes its chunks itself (at most 32 MiB of logits each)"),
    "liger_use_token_scaling": _refused("molt's loss weighs every trained token alike"),
    **dict.fromkeys(("tiled_mlp", "tiled_mlp_num_shards", "tiled_mlp_use_original_mlp"), _warned("molt runs the MLPs untiled (same result, more memory)")),
    "activation_offloading": _warned("molt keeps activations on the device (gradient_checkpointing: offload keeps the checkpointed ones in CPU memory)"),
    "dynamic_checkpoint": _warned("molt checkpoints every layer with gradient_checkpointing: true"),
    "gc_steps": _warned("molt leaves garbage collection to Python"),
    "gc_collect_steps": _warned("molt leaves garbage collection to Python"),
    "torch_empty_cache_steps": _warned("molt leaves the CUDA cache to PyTorch"),
    "selective_checkpointing": _warned("molt checkpoints every layer with gradient_checkpointing: true"),
    "layer_offloading": _warned("molt keeps the model's layers on the device"),
    **dict.fromkeys(("fp32_norms", "fp32_norm_classes", "deepcompile"), _warned(_UNSHARDED)),
    # PEFT beyond molt's LoRA / QLoRA
    **dict.fromkeys(("lora_rank_pattern", "lora_alpha_pattern"), _refused("molt would give every adapted module lora_r and lora_alpha")),
    "lora_target_parameters": _refused("molt would put LoRA on lora_target_modules only, not on these parameters"),
    "peft_layers_pattern": _refused("molt would find peft_layers_to_transform's layers by PEFT's default pattern"),
    "peft_use_rslora": _refused("molt would scale the adapter by lora_alpha / r, not the rank-stabilised lora_alpha / sqrt(r)"),
    "peft_layer_replication": _refused("molt would train the model's layers unreplicated"),
    "peft_init_lora_weights": _refused("molt would initialise the adapter as PEFT does by default"),
    "peft_trainable_token_indices": _refused("molt would not train these token rows"),
    "peft_ensure_weight_tying": _refused("molt would leave the tying of adapted embeddings at PEFT's default"),
    "peft_autocast_adapter_dtype": _refused("molt keeps the adapter weights in float32 (as peft_autocast_adapter_dtype: true)", inert=True),
    "lora_on_cpu": _warned("molt keeps the adapter on the training device"),
    "qlora_sharded_model_loading": _warned("molt loads the quantized base in one piece"),
    "merge_lora": _warned("molt merges with `molt merge-lora cfg.yml` (into {{output_dir}}/merged)"),
    "merge_method": _warned("molt merges with PEFT's merge_and_unload"),
    "relora": _refused("molt would train one plain LoRA adapter; molt's ReLoRA is relora_steps (with relora_*)"),
    "relora_prune_method": _refused("molt prunes the optimizer state by magnitude (as relora_prune_method: magnitude)", inert="magnitude"),
    # quantization and low precision
    "fp8": _refused("molt would train in bf16 / fp16 / fp32, not with FP8 matmuls"),
    "fp8_enable_fsdp_float8_all_gather": _warned(_UNSHARDED),
    "qat": _refused("molt would train without fake quantization (quantization-aware training)"),
    "quantization": _refused("molt would write the trained model unquantized"),
    # data
    **dict.fromkeys(("dataset_shard_num", "dataset_shard_idx"), _refused("molt would train on every row (a dataset entry's shards / shards_idx keep one shard)")),
    "skip_prepare_dataset": _warned("molt prepares each dataset once and caches it"),
    "dataset_keep_in_memory": _warned("molt reads the prepared data from Arrow files"),
    **dict.fromkeys(("dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor"), _warned(_LOADER)),
    "dataloader_drop_last": _refused("molt trains the last, smaller batch of each epoch too"),
    "remove_unused_columns": _warned("molt keeps only the columns it trains on"),
    "push_dataset_to_hub": _warned("molt uploads nothing; the prepared data is in dataset_prepared_path"),
    "sample_packing_mp_start_method": _warned("molt packs in one process"),
    "pretraining_sample_concatenation": _refused("molt keeps each document apart (split into sequence_len pieces, then packed)"),
    "pretrain_multipack_buffer_size": _warned("molt packs the whole dataset at once"),
    "pretrain_multipack_attn": _refused("molt keeps packed samples apart (as pretrain_multipack_attn: true)", inert=True),
    **dict.fromkeys(("use_pose", "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks"), _refused(_POSE)),
    "preprocess_iterable": _warned("molt reads each dataset whole, once, and caches it"),
    "streaming": _warned("molt reads each dataset whole, once, and caches it"),
    "is_preprocess": _warned("molt preprocesses with `molt preprocess cfg.yml`"),
    "total_supervised_tokens": _warned("molt counts the trained tokens itself (in the tokenize and pack artifacts)"),
    "axolotl_config_path": _warned("molt reads the config file it is given"),
    "eval_sequence_len": _refused("molt would cut the held-out rows at sequence_len too"),
    "streaming_multipack_buffer_size": _warned("molt packs the whole dataset at once", inert=10_000),
    "num_dataset_shards_to_save": _warned("molt writes the prepared data as its own Arrow artifacts"),
    "pad_to_multiple_of": _warned("molt pads a batch to its longest row (to sequence_len with pad_to_sequence_len); the padding is never trained"),
    "max_packed_sequence_len": _refused("molt packs rows of sequence_len tokens; set sequence_len"),
    "shuffle_before_merging_datasets": _refused("molt shuffles after merging the datasets (shuffle_merged_datasets), which orders the rows otherwise"),
    # optimizer and schedule
    "auto_find_batch_size": _warned("molt trains with micro_batch_size as set (running out of memory stops the run)"),
    **dict.fromkeys(("embedding_lr", "embedding_lr_scale"), _refused("molt would train the embeddings at learning_rate (lr_groups gives parameters their own lr)")),
    **dict.fromkeys(("adam_epsilon2", "adam_beta3"), _refused("molt's optimizers would run without it")),
    "noisy_embedding_alpha": _refused("molt would train without embedding noise; the key is now neftune_noise_alpha"),
    "jagged_restart_*": _refused("molt would follow lr_scheduler without jagged restarts"),
    "lisa_*": _refused("molt would train every trainable layer at each step, not LISA's sampled ones"),
    **dict.fromkeys(("dion_*", "qgalore_*"), _warned("a setting of an optimizer molt lacks; molt trains with the one optimizer names")),
    "grokfast_*": _refused("molt would step the optimizer on the raw gradients, without Grokfast's filter"),
    "spectrum_*": _refused("molt would train the parameters adapter / unfrozen_parameters choose, not Spectrum's"),
    # evaluation, checkpoints, output
    "evaluation_strategy": _warned("the key is now eval_strategy; molt evaluates as eval_strategy / eval_steps say"),
    "save_first_step": _warned("molt saves as save_strategy / save_steps say"),
    "load_best_model_at_end": _refused("molt's model is the one of the last step (early_stopping_patience keeps the best)"),
    **dict.fromkeys(("include_tokens_per_second", "include_tkps"), _warned("molt logs the loss and learning rate (tokens per second: python -m bench)")),
    **dict.fromkeys(("do_bench_eval", "bench_dataset", "bench_split"), _warned(_LOSS_ONLY)),
    "lm_eval_post_train": _warned("molt runs lm-evaluation-harness as its own command, after training: molt lm-eval cfg.yml"),
    "lm_eval_model": _warned("molt lm-eval evaluates the trained model, or the one --model-dir names"),
    "do_causal_lm_eval": _warned("molt evaluate computes eval_causal_lm_metrics whenever they are listed (training evaluates the loss)"),
    **dict.fromkeys(("hub_model_id", "hub_strategy", "hub_revision"), _warned(_NO_UPLOAD)),
    # where it runs
    **dict.fromkeys(("sequence_parallel_degree",
                     "context_parallel_size", "tensor_parallel_size", "dp_shard_size", "dp_replicate_size", "heads_k_stride", "ring_attn_func"),
                    _warned(_UNSHARDED)),
    **dict.fromkeys(("ddp", "world_size", "local_rank"), _warned("molt takes the processes from its launcher (--launcher accelerate / torchrun)")),
    "accelerator_config": _warned("molt sets accelerate up itself"),
    # logging integrations
    "use_wandb": _warned("molt logs to wandb when wandb_project is set"),
    "hf_mlflow_log_artifacts": _warned("molt logs metrics to mlflow, never the artifacts (they stay in molt's store)"),
    **dict.fromkeys(("use_swanlab", "swanlab_*", "use_trackio", "trackio_*"), _warned(_TRACKERS)),
    **dict.fromkeys(("comet_api_key", "comet_workspace", "comet_experiment_key", "comet_online", "comet_experiment_config"),
                    _warned("molt passes comet only use_comet, comet_mode and comet_project_name")),
    "gradio_*": _warned("molt has no Gradio app"),
    **dict.fromkeys(("generate_samples", "num_generation_samples", "generation_*"), _warned("molt generates nothing while training")),
    **dict.fromkeys(("use_otel_metrics", "otel_metrics_host", "otel_metrics_port"), _warned(_TRACKERS)),
    # Axolotl plugins' keys (molt loads the Liger one only)
    **dict.fromkeys(("use_scattermoe", "use_sonicmoe", "expert_backend", "moe_grouped_backend", "moe_dequant_chunk_size", "moe_bnb_fast",
                     "use_dsv4_kernels", "use_glm_dsa_kernels", "dsv4_fp8_lora_kernel", "dsv4_shared_mlp_lora_kernel"), _warned(_OWN_MODULES)),
    **dict.fromkeys(("nonexpert_quantization", "dsv4_fp8_nonexpert_mode", "dsv4_fp4_grouped_mode", "dsv4_bf16_all", "gemma4_fp8_nonexpert",
                     "gemma4_nf4_nonexpert", "nvfp4_merge_aware", "nvfp4_merge_aware_start_step"),
                    _refused("molt would keep the weights in the dtype they load in (load_in_4bit / load_in_8bit quantize the linear layers)")),
    "dense_mixer": _refused("molt would train the MoE routers with their own sparse gradients, not DenseMixer's dense ones"),
    "diffusion": _refused("molt would train a causal LM on next-token labels, not a diffusion LM"),
    "expert_parallel_*": _warned(_UNSHARDED),
    "hatchery": _refused("it trains through a remote Tinker / Hatchery service; molt would train here, with its own trainer"),
    "llmcompressor": _refused("molt would train without LLM Compressor's sparsity / quantization recipe"),
    "mora": _refused("molt would train a LoRA adapter, not MoRA"),
    "nemo_gym_*": _warned("NeMo Gym gives RL rewards; molt trains plain supervised fine-tuning (rl: is refused)"),
    # keys of a dataset entry
    "datasets[].input_transform": _refused("molt would format the rows untransformed"),
    "datasets[].input_format": _refused("molt would format the rows by their type: alone"),
    **dict.fromkeys(("datasets[].field_human", "datasets[].field_model"),
                    _refused("molt would read the roles by roles: and message_property_mappings (these are ShareGPT's keys)")),
    "datasets[].field_tools": _refused("molt would render the conversations without their tools"),
    "datasets[].split_thinking": _refused("molt would render an answer's <think> part as content, not as its reasoning (field_thinking reads it from its own field)"),
    **dict.fromkeys(("datasets[].logprobs_field", "datasets[].temperature"), _refused(_KD)),
    "datasets[].skip": _refused("molt would train on every row, the first {value} too"),
    **dict.fromkeys(("datasets[].length", "datasets[].sequence_length", "datasets[].min_input_id", "datasets[].max_input_id", "datasets[].seed"),
                    _refused(_SYNTHETIC)),
    "datasets[].train_on_eot": _refused("molt trains a turn's end markers as the entry's train_on_eos says (set train_on_eos: {value})"),
    "datasets[].preprocess_shards": _warned("molt formats a dataset whole (dataset_processes spreads it over processes)"),
    "datasets[].trust_remote_code": _warned("molt runs no dataset loading script (it reads data files and cached datasets)"),
}

# Refused keys that change only how the model is loaded or trained, never the prepared data: `molt
# preprocess` prepares the data of such a config and names what `molt train` will refuse (data is
# often prepared on one machine and trained on another, with dvc push / pull in between); every
# command that trains refuses them. Names as in UNSUPPORTED (`lisa_*` for the family).
REFUSED_AT_TRAINING: tuple[str, ...] = (
    "trl", "cls_model_config", "dpo_norm_loss", "ebft", "use_eaft", "trainer_cls", "use_onebitllms", "rope_scaling",
    "model_quantization_config", "model_quantization_config_kwargs", "gptq", "reinit_weights", "random_init_weights",
    "llama4_linearized_experts", "freeze_mm_modules", "mean_resizing_embeddings", "shrink_embeddings", "fix_untrained_tokens",
    "scaling_softmax", "scaling_softmax_factor", "scaling_softmax_bias", "s2_attention", "liger_use_token_scaling",
    "lora_rank_pattern", "lora_alpha_pattern", "lora_target_parameters", "peft_layers_pattern", "peft_use_rslora",
    "peft_layer_replication", "peft_init_lora_weights", "peft_trainable_token_indices", "peft_ensure_weight_tying",
    "peft_autocast_adapter_dtype", "relora", "relora_prune_method", "fp8", "qat", "quantization", "dataloader_drop_last",
    "embedding_lr", "embedding_lr_scale", "adam_epsilon2", "adam_beta3", "noisy_embedding_alpha", "jagged_restart_*", "lisa_*",
    "grokfast_*", "spectrum_*", "load_best_model_at_end", "nonexpert_quantization", "dsv4_fp8_nonexpert_mode",
    "dsv4_fp4_grouped_mode", "dsv4_bf16_all", "gemma4_fp8_nonexpert", "gemma4_nf4_nonexpert", "nvfp4_merge_aware",
    "nvfp4_merge_aware_start_step", "dense_mixer", "diffusion", "hatchery", "llmcompressor", "mora",
)
# a KeyError here: a key implemented (its row deleted) or renamed since
UNSUPPORTED.update({key: UNSUPPORTED[key]._replace(at_training=True) for key in REFUSED_AT_TRAINING})


_ENTRY = "datasets[]."
UNSUPPORTED_KEYS: frozenset[str] = frozenset(k for k in UNSUPPORTED if not k.endswith("*") and not k.startswith(_ENTRY))
UNSUPPORTED_PREFIXES: tuple[str, ...] = tuple(k[:-1] for k in UNSUPPORTED if k.endswith("*"))
DATASET_UNSUPPORTED_KEYS: frozenset[str] = frozenset(k[len(_ENTRY):] for k in UNSUPPORTED if k.startswith(_ENTRY))


def unsupported(key: str, entry: bool = False) -> Unsupported | None:
    """The row of a top-level key (or, with `entry`, of a dataset entry's key); None: not in the table."""
    if entry:
        return UNSUPPORTED.get(_ENTRY + key)
    if key in UNSUPPORTED:
        return UNSUPPORTED[key]
    return next((row for family, row in UNSUPPORTED.items() if family.endswith("*") and key.startswith(family[:-1])), None)


def _shown(value: Any, limit: int = 60) -> str:
    """A value as YAML's flow style writes it: `dpo`, `true`, `[full_shard]`, `{fsdp_version: 2}`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unsupported_note(shown: str, value: Any, row: Unsupported) -> str | None:
    """The refusal or warning for a key given `value` (None: the value asks for nothing molt misses)."""
    if value is None or value in ("", [], {}) or value == row.inert:
        return None
    reason = row.reason.format(value=_shown(value), VALUE=_shown(value).upper())
    if row.refused:
        return f"{shown}: {_shown(value)} is not supported yet: {reason}"
    return f"{shown}: {_shown(value)} — not supported yet: {reason}"

# Keys allowed inside a dict-valued dataset `type:` (a user-defined prompt format).
DATASET_TYPE_KEYS: frozenset[str] = frozenset({
    "system_prompt", "system_format", "field_system", "field_instruction", "field_input", "field_output",
    "format", "no_input_format", "field_prompt", "field_chosen", "field_rejected", "prompt_format",
    "chosen_format", "rejected_format", "field_completion", "field_label", "completion_format",
})

# Old or internal Axolotl spellings of molt fields: {spelling: field}.
RENAMED_KEYS: dict[str, str] = {
    "model_revision": "revision_of_model",
    "model_config": "overrides_of_model_config",  # Axolotl's alias of the field (its examples write it)
    "model_kwargs": "overrides_of_model_kwargs",
    "type_of_model": "model_type",
    "dataset_num_proc": "dataset_processes",
    "dpo_beta": "rl_beta",
}


def known_unsupported_keys() -> frozenset[str]:
    """Top-level Axolotl keys molt refuses or warns about (plus the families in UNSUPPORTED_PREFIXES)."""
    return UNSUPPORTED_KEYS


def _is_unsupported(key: str) -> bool:
    return unsupported(key) is not None


def _admits_none(annotation: Any) -> bool:
    return annotation is Any or annotation is type(None) or type(None) in get_args(annotation)


def _null_means_unset(model: type[BaseModel], data: dict) -> dict:
    """Axolotl reads a key written with no value (`lora_r:`, YAML null) as unset: its default
    applies. Keys whose type holds None keep the null, which means something there
    (`dataset_prepared_path`, `adapter`, `eval_batch_size`: filled in later ...); a required key's
    null stays, to be refused by name."""
    fields = model.model_fields
    return {key: value for key, value in data.items()
            if not (value is None and key in fields and not fields[key].is_required() and not _admits_none(fields[key].annotation))}


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
    # always has role and content: the legacy message_field_* keys are folded in (see _merge_property_mappings)
    message_property_mappings: dict[str, str] = Field(default_factory=lambda: {"role": "role", "content": "content"})
    roles: dict[str, list[str]] | None = None
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "last", "none"] = "turn"
    message_field_training: str | None = None
    message_field_training_detail: str | None = None
    drop_system_message: bool = False  # the conversation's system message left out (a default_system_message is not)
    # a message's reasoning: read from its field_thinking, handed to the template as template_thinking_key
    field_thinking: str = "reasoning_content"
    template_thinking_key: str = "reasoning_content"

    # preference and reward data (rl:, reward_model:, process_reward_model:)
    field_chosen: str = "chosen"
    field_rejected: str = "rejected"
    step_separator: str = "\n"  # stepwise_supervised: what joins a completion's steps
    max_completion_length: int | None = Field(default=None, ge=1)  # stepwise_supervised: tokens kept per completion
    train_on_last_step_only: bool = False  # stepwise_supervised: only the last step's label trained

    @model_validator(mode="before")
    @classmethod
    def _nulls_unset(cls, data: Any) -> Any:
        return _null_means_unset(cls, data) if isinstance(data, dict) else data

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


# The built-in chat templates, one file each (as stages/chat_templates.py reads them, without Jinja).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_FALLBACK_PREFIX = "tokenizer_default_fallback_"


def _resolve_chat_template(owner: "DatasetConfig | MoltConfig") -> None:
    # Axolotl: a custom template alone implies `chat_template: jinja`; `jinja` alone is an error.
    if owner.chat_template_jinja and not owner.chat_template:
        owner.chat_template = "jinja"
    if owner.chat_template == "jinja" and not owner.chat_template_jinja:
        raise ValueError("chat_template: jinja requires chat_template_jinja (the template text or a path to it)")
    name = (owner.chat_template or "").removeprefix(TEMPLATE_FALLBACK_PREFIX)
    if name and name not in ("jinja", "tokenizer_default") and not (TEMPLATES_DIR / f"{name}.jinja").is_file():
        builtin = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        close = difflib.get_close_matches(name, builtin, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"chat_template: unknown template {owner.chat_template!r}{hint}; expected a built-in one ({', '.join(builtin)}), "
                         f"jinja with chat_template_jinja, tokenizer_default or {TEMPLATE_FALLBACK_PREFIX}<built-in>")


def _merge_property_mappings(ds: DatasetConfig) -> None:
    # The legacy message_field_* keys and message_property_mappings say the same thing; consumers
    # should read only the mapping, so fold the legacy keys in and refuse contradictions.
    mapping = dict(ds.message_property_mappings) if "message_property_mappings" in ds.model_fields_set else {}
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

# The names `optimizer` and `lr_scheduler` take, checked at load without importing transformers:
# transformers' OptimizerNames and SchedulerType (tests/test_config.py compares them with the
# installed version), plus the ones molt builds itself (stages/training/optim.py). Whether an
# optimizer's package or GPU is there is checked when training starts.
OPTIMIZERS: tuple[str, ...] = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit",
    "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
    "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw",
    "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
    "adopt_adamw",  # molt's own
)
# Axolotl's own optimizers (its CustomSupportedOptimizers) that molt does not have: known names, so
# refused by training with that reason (a training-only refusal: `molt preprocess` prepares the data)
AXOLOTL_OPTIMIZERS: tuple[str, ...] = (
    "optimi_adamw", "ao_adamw_4bit", "ao_adamw_8bit", "ao_adamw_fp8", "came_pytorch", "muon", "dion", "sinkgd", "flash_adamw",
    "flash_adam", "flash_sgd", "flash_sgdw", "flash_lion", "q_galore_adamw8bit",
)
LR_SCHEDULERS: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
    "one_cycle", "log_sweep",  # molt's own
)


def _one_of(key: str, value: str, names: tuple[str, ...]) -> str:
    if value in names:
        return value
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"unknown {key} {value!r}{hint}; expected one of {', '.join(names)}")


class LrGroup(TypedDict):
    """One entry of `lr_groups`: the parameters whose names contain one of `modules` train at `lr`.
    A TypedDict, so the train stage reads the same plain dicts the config dumps."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    name: str
    modules: Annotated[list[str], Field(min_length=1)]
    lr: Annotated[float, Field(gt=0)]


RL_METHODS = ("dpo", "ipo", "orpo", "kto", "simpo")


class MoltConfig(BaseModel):
    """The whole config. Unsupported and unknown keys are kept as extras (see module docstring)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    # model and tokenizer
    base_model: str
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
    min_sample_len: int = Field(default=2, ge=1)  # shorter rows are dropped (Axolotl's default too)
    sample_packing: bool = False
    pad_to_sequence_len: bool | None = None  # filled in: defaults to sample_packing
    eval_sample_packing: bool | None = None  # None: as sample_packing
    multipack_real_batches: bool | None = None  # filled in: true unless a varlen attention (flash, flex, xformers)
    sample_packing_group_size: int = Field(default=100_000, ge=1)
    sample_packing_sequentially: bool = False  # next-fit in mix's order instead of first-fit-decreasing
    sample_packing_bin_size: int = Field(default=200, ge=1)
    sample_packing_eff_est: float | None = Field(default=None, gt=0, le=1)
    total_num_tokens: int | None = Field(default=None, ge=0)
    # padding-free batches without packing; unset: on where the model keeps samples apart by position_ids
    batch_flattening: bool | None = None
    group_by_length: bool = False
    curriculum_sampling: bool = False  # train on the rows in the prepared order, epoch after epoch (no shuffle)
    train_on_inputs: bool = False

    # chat templates and tokens
    chat_template: str | None = None  # None: the tokenizer's own; or chatml, llama3, jinja, ...
    chat_template_jinja: str | None = None
    special_tokens: dict[str, str] | None = None  # bos_token, eos_token, pad_token, unk_token
    eot_tokens: list[str] | None = None  # a chat turn's end markers (None: EOS and the built-in templates' markers)
    tokens: list[str] | None = None

    # preference and reward training (TRL's trainers)
    rl: str | None = None  # one of RL_METHODS
    rl_beta: float | None = Field(default=None, gt=0)  # None: TRL's default for the method (0.1; SimPO 2.0)
    dpo_loss_type: list[str] | None = None  # TRL's loss_type, e.g. [ipo] (rl: ipo sets it)
    dpo_loss_weights: list[float] | None = None  # one per dpo_loss_type
    dpo_use_weighting: bool = False
    dpo_label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    rpo_alpha: float | None = Field(default=None, ge=0)
    max_prompt_len: int = Field(default=512, ge=1)  # a prompt's tokens kept (its end), as Axolotl
    orpo_alpha: float | None = Field(default=None, gt=0)  # ORPO's odds-ratio weight (TRL's beta; default 0.1)
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    simpo_gamma: float = Field(default=0.5, ge=0)
    cpo_alpha: float = Field(default=1.0, ge=0)  # SimPO: weight of the NLL term (TRL's CPO default)
    rl_adapter_ref_model: bool = False  # the reference is base + lora_model_dir's adapter, not the bare base
    reward_model: bool = False  # AutoModelForSequenceClassification, Bradley-Terry on chosen / rejected
    process_reward_model: bool = False  # AutoModelForTokenClassification, a label per reasoning step
    num_labels: int | None = Field(default=None, ge=1)  # the classification head's outputs (reward 1, PRM 2)
    center_rewards_coefficient: float | None = None  # TRL's: pulls the reward model's outputs toward zero mean

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
    # Axolotl's default and transformers' (torch >= 2.8): one fused update of all the weights, 6x
    # quicker than the per-tensor loop on CPU, which for a full fine-tune of SmolLM2 is a sixth of the step
    optimizer: str = "adamw_torch_fused"
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
    # the loss without the full logits: molt's chunked linear cross-entropy always (training/chunked_loss.py);
    # these ask for the cut-cross-entropy or Liger kernel instead, used where the package and a CUDA GPU are
    cut_cross_entropy: bool | None = None
    chunked_cross_entropy: bool | None = None
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

    # several processes: FSDP / FSDP2 (torch's, through accelerate and the Trainer) and DDP's settings
    fsdp: list[str] | None = None  # Axolotl's legacy list: full_shard, shard_grad_op, offload, auto_wrap, ...
    fsdp_config: dict[str, Any] | None = None  # keys without the fsdp_ prefix (FSDP_KEYS), as Axolotl's schema keeps them
    fsdp_version: Literal[1, 2] | None = None
    fsdp_final_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] | None = None
    ddp_timeout: int | None = Field(default=None, ge=1)  # seconds a collective waits for the other ranks
    ddp_bucket_cap_mb: int | None = Field(default=None, ge=1)
    ddp_broadcast_buffers: bool | None = None
    ddp_find_unused_parameters: bool | None = None

    # after training: evaluate (molt evaluate), export (molt export), lm-evaluation-harness (molt lm-eval)
    eval_causal_lm_metrics: list[str] | None = None  # sacrebleu, chrf, ter, perplexity, comet: greedy generations scored
    eval_max_new_tokens: int = Field(default=128, ge=1)
    eval_table_size: int | None = Field(default=None, ge=0)  # prompts shown in the report's table (None: 5)
    export_format: Literal["safetensors", "gguf"] = "safetensors"
    export_outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    lm_eval_tasks: list[str] | None = None
    lm_eval_batch_size: int = Field(default=8, ge=1)

    # scaling out: a DeepSpeed config handed to the Trainer (stages/deepspeed_config.py); Ray Train's
    # workers running the train stage (stages/ray_train.py)
    deepspeed: str | dict[str, Any] | None = None  # a DeepSpeed JSON file; after load, its checked contents
    use_ray: bool = False
    ray_num_workers: int = Field(default=1, ge=1)
    resources_per_worker: dict[str, float] | None = None  # None: {GPU: 1} on a cluster with GPUs, else {CPU: 1}
    ray_run_name: str | None = None

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

    # molt behaviour
    strict: bool = False  # unknown keys are errors; CLI overrides may only change keys in the file
    config_warnings: list[str] = Field(default_factory=list, exclude=True, repr=False)
    # with load_config(..., defer_training_refusals=True): what the train stages would refuse
    training_refusals: list[str] = Field(default_factory=list, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _sort_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = _null_means_unset(cls, data)
        notes = list((info.context or {}).get("load_warnings", ()))
        if info.context is not None:
            info.context["notes"] = notes  # a refused config's error carries them (ConfigError.notes)
        _rename_legacy_keys(data)
        _drop_restated_keys(data)
        unknown, problems, training_refusals = _classify_keys(data, notes)
        if (info.context or {}).get("defer_training_refusals") and not problems:
            data["training_refusals"] = training_refusals  # named again if the values or rules fail (config_from_dict)
            info.context["training_refusals"] = list(training_refusals)
        else:
            problems += training_refusals
        if unknown and data.get("strict") is True:
            problems.append(f"strict: true refuses keys that are neither Axolotl nor molt options: {', '.join(unknown)}")
        for note in notes:  # before any refusal, so a refused config shows them too
            warnings.warn(note, MoltConfigWarning, stacklevel=2)
        if problems and info.context is not None:
            # validation goes on, so the values' and rules' problems are found too: config_from_dict
            # reports them all at once (the refused keys stay extras meanwhile, as warned ones do)
            info.context["refused_keys"] = problems
        elif problems:
            raise ValueError("\n".join(problems))
        data["config_warnings"] = notes
        return data

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # Axolotl examples write `adapter:` or `adapter: ""`

    @field_validator("evals_per_epoch", "saves_per_epoch", mode="before")
    @classmethod
    def _zero_per_epoch_is_unset(cls, value: Any) -> Any:
        return None if value == 0 and value is not False else value  # Axolotl: 0 schedules nothing, as unset

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: Any) -> Any:
        if value is True:
            return ["full_shard", "auto_wrap"]  # transformers' fsdp: true
        if value in (False, None, "", []):
            return None
        options = value.split() if isinstance(value, str) else value
        if not isinstance(options, list):
            raise ValueError(f"expected a list of FSDP options ({', '.join(FSDP_OPTIONS)}), got {_short_repr(value)}")
        bad = [o for o in options if o not in FSDP_OPTIONS]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not an FSDP option; use {', '.join(FSDP_OPTIONS)}")
        return options

    @field_validator("fsdp_config", mode="before")
    @classmethod
    def _fsdp_config_keys(cls, value: Any) -> Any:
        return _normalise_fsdp_config(value)

    @model_validator(mode="after")
    def _fsdp_rules(self, info: ValidationInfo) -> "MoltConfig":
        if (self.fsdp_config or {}).get("activation_checkpointing") and self.gradient_checkpointing:
            # as in Axolotl: FSDP's activation checkpointing does the recomputing (the Trainer refuses both at once)
            note = "gradient_checkpointing with fsdp_config.activation_checkpointing: FSDP checkpoints the layers; gradient_checkpointing is not used on top"
            self.gradient_checkpointing = False
            if note not in self.config_warnings:
                self.config_warnings.append(note)
                warnings.warn(note, MoltConfigWarning, stacklevel=2)
        _raise_or_defer(self, [], _fsdp_problems(self), info)  # sharding is training's business alone
        return self

    @field_validator("rl")
    @classmethod
    def _known_rl(cls, value: str | None) -> str | None:
        if value is not None and value not in RL_METHODS:
            raise ValueError(f"rl: {value} is not supported yet: molt trains {', '.join(RL_METHODS)} (online methods such as GRPO generate "
                             "while training, which molt does not)")
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return value if value in AXOLOTL_OPTIMIZERS else _one_of("optimizer", value, OPTIMIZERS)

    @field_validator("lr_scheduler")
    @classmethod
    def _known_lr_scheduler(cls, value: str) -> str:
        return _one_of("lr_scheduler", value, LR_SCHEDULERS)

    @field_validator("val_set_size")
    @classmethod
    def _whole_row_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"expected a fraction of the rows below 1 (e.g. 0.05) or a whole number of rows (e.g. {int(value)}): "
                             "a value of 1 or more is a row count")
        return value

    @field_validator("pretraining_dataset", mode="before")
    @classmethod
    def _pretraining_dataset_shorthand(cls, value: Any) -> Any:
        # Older Axolotl configs give a single dataset path, or a single entry, instead of a list.
        if isinstance(value, str):
            return [{"path": value}]
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _apply_rules(self, info: ValidationInfo) -> "MoltConfig":
        _raise_or_defer(self, *_problems(self), info)
        return self

    @property
    def prepared_path(self) -> str:
        return self.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
# fsdp_config's keys (Axolotl's FSDPConfig, plus FSDP1's prefetch / gather switches its examples
# set and the Trainer reads) and the values each takes; None: any value of the type
FSDP_KEYS: dict[str, tuple[type, tuple | None]] = {
    "fsdp_version": (int, (1, 2)),
    "activation_checkpointing": (bool, None),
    "offload_params": (bool, None),
    "sync_module_states": (bool, None),
    "cpu_ram_efficient_loading": (bool, None),
    "cpu_offload_pin_memory": (bool, None),
    "use_orig_params": (bool, None),
    "state_dict_type": (str, ("FULL_STATE_DICT", "SHARDED_STATE_DICT")),
    "final_state_dict_type": (str, ("FULL_STATE_DICT", "SHARDED_STATE_DICT")),
    "auto_wrap_policy": (str, ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")),
    "transformer_layer_cls_to_wrap": (str, None),
    "min_num_params": (int, None),
    "reshard_after_forward": (bool, None),
    "mixed_precision_policy": (str, None),
    "limit_all_gathers": (bool, None),
    "forward_prefetch": (bool, None),
    "backward_prefetch": (str, ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")),
    # FSDP1's name for the strategy (35 of Axolotl's examples): the same as that entry of `fsdp`
    "sharding_strategy": (str, ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2", "NO_SHARD")),
}


def _normalise_fsdp_config(value: Any) -> dict | None:
    """fsdp_config with Axolotl's two spellings made one: `fsdp_offload_params` and `offload_params`
    are the same key (fsdp_version keeps its prefix; `version` is its short form). Unknown keys and
    values of the wrong kind are refused, each named."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of FSDP settings (e.g. {{fsdp_version: 2, offload_params: false}}), got {_short_repr(value)}")
    out: dict[str, Any] = {}
    problems = []
    for key, item in value.items():
        name = "fsdp_version" if key in ("version", "fsdp_version") else str(key).removeprefix("fsdp_")
        if name not in FSDP_KEYS:
            near = difflib.get_close_matches(name, FSDP_KEYS, n=1)
            problems.append(f"{key}: not an FSDP setting" + (f" (did you mean {near[0]}?)" if near else f"; known: {', '.join(FSDP_KEYS)}"))
            continue
        if name in out and out[name] != item:
            problems.append(f"{key}: given twice, with and without the fsdp_ prefix ({out[name]!r} and {item!r}); keep one")
            continue
        kind, allowed = FSDP_KEYS[name]
        if item is not None:
            if kind is str and name == "transformer_layer_cls_to_wrap" and isinstance(item, list) and all(isinstance(i, str) for i in item):
                pass  # the Trainer takes several classes too
            elif kind is bool and isinstance(item, str) and item.lower() in ("true", "false"):
                item = item.lower() == "true"  # Axolotl's older examples quote them
            elif kind is int and isinstance(item, str) and item.isdigit():
                item = int(item)
            elif not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
                problems.append(f"{key}: expected {kind.__name__}, got {_short_repr(item)}")
                continue
            if allowed is not None and item not in allowed:
                problems.append(f"{key}: {item!r} is not one of {', '.join(map(str, allowed))}")
                continue
        out[name] = item
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _fsdp_problems(cfg: "MoltConfig") -> list[str]:
    """The FSDP combinations torch, accelerate or the Trainer reject, and those molt cannot run,
    found at load rather than after the data is built."""
    config = cfg.fsdp_config or {}
    problems = []
    inner = config.get("fsdp_version")
    if cfg.fsdp_version and inner and cfg.fsdp_version != inner:
        problems.append(f"fsdp_version ({cfg.fsdp_version}) and fsdp_config.fsdp_version ({inner}) differ; keep one")
    if not (cfg.fsdp or cfg.fsdp_config):
        for key in ("fsdp_version", "fsdp_final_state_dict_type"):
            if getattr(cfg, key):
                problems.append(f"{key}: {getattr(cfg, key)} without fsdp_config: set fsdp_config (Axolotl's switch for FSDP) or drop {key}")
        return problems
    version = cfg.fsdp_version or inner or 1
    options = (cfg.fsdp or []) + ([config["sharding_strategy"].lower()] if config.get("sharding_strategy") else [])
    strategies = list(dict.fromkeys(o for o in options if o not in ("offload", "auto_wrap")))
    if len(strategies) > 1:
        problems.append(f"fsdp: {', '.join(strategies)}: one sharding strategy at a time")
    if version == 2 and set(strategies) - {"full_shard", "shard_grad_op"}:
        problems.append(f"fsdp: {strategies[0]} with fsdp_version 2: FSDP2 shards fully (full_shard) or keeps parameters "
                        "gathered after forward (shard_grad_op); the other strategies are FSDP1's (fsdp_version: 1)")
    if version == 2 and strategies and config.get("reshard_after_forward") is not None and config["reshard_after_forward"] != (strategies[0] == "full_shard"):
        problems.append(f"fsdp: {strategies[0]} and fsdp_config.reshard_after_forward: {config['reshard_after_forward']} say opposite things; keep one")
    if config.get("auto_wrap_policy") == "SIZE_BASED_WRAP" and not config.get("min_num_params"):
        problems.append("fsdp_config.auto_wrap_policy: SIZE_BASED_WRAP needs fsdp_config.min_num_params (the parameters of a wrapped module)")
    if config.get("auto_wrap_policy") == "TRANSFORMER_BASED_WRAP" and config.get("min_num_params"):
        problems.append("fsdp_config.min_num_params applies to auto_wrap_policy: SIZE_BASED_WRAP, not TRANSFORMER_BASED_WRAP")
    offload = config.get("offload_params") or "offload" in options
    if config.get("cpu_offload_pin_memory") is False and (version != 2 or not offload):
        problems.append("fsdp_config.cpu_offload_pin_memory: false needs fsdp_version: 2 and offload_params: true (FSDP1 always pins offloaded memory)")
    if offload and "8bit" in str(cfg.optimizer) and version != 2:
        problems.append(f"fsdp_config.offload_params with optimizer: {cfg.optimizer}: FSDP1 offloads the parameters to CPU, where bitsandbytes' 8-bit optimizer cannot step them")
    if version == 2 and cfg.optimizer in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        problems.append(f"optimizer: {cfg.optimizer} with fsdp_version 2: bitsandbytes' 8-bit state does not take FSDP2's DTensor parameters (use adamw_torch)")
    if cfg.load_in_8bit:
        problems.append("fsdp with load_in_8bit: FSDP cannot shard bitsandbytes' int8 weights (use load_in_4bit with adapter: qlora, as Axolotl's FSDP+QLoRA does)")
    if config.get("state_dict_type") == "SHARDED_STATE_DICT" and cfg.save_only_model:
        problems.append("fsdp_config.state_dict_type: SHARDED_STATE_DICT with save_only_model: the Trainer cannot resume a sharded checkpoint without its optimizer state")
    return problems


def _known_keys() -> frozenset[str]:
    return frozenset(MoltConfig.model_fields) - {"config_warnings", "training_refusals"}


def _rename_legacy_keys(data: dict) -> None:
    for old, new in RENAMED_KEYS.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{old} and {new} are the same option (given {data[old]!r} and {data[new]!r}); keep only {new}")
        data[new] = data.pop(old)


def _drop_restated_keys(data: dict) -> None:
    # Keys that only repeat another key: older Axolotl configs name base_model again as
    # base_model_config, newer ones switch ReLoRA on with `relora: true` beside relora_steps.
    if data.get("base_model_config") is not None and data.get("base_model_config") == data.get("base_model"):
        del data["base_model_config"]
    if data.get("relora") is True and data.get("relora_steps"):
        del data["relora"]


def _classify_keys(data: dict, notes: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Add a warning to `notes` for each warned or unknown key; return (unknown keys, refusals,
    refusals of keys only training reads: REFUSED_AT_TRAINING)."""
    unknown: list[str] = []
    refused: list[str] = []
    refused_in_training: list[str] = []

    def sort(key: str, shown: str, value: Any, known: frozenset[str], row: Unsupported | None, names: frozenset[str]) -> None:
        if key in known:
            return
        if row is None:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)  # below: guesses like eta_min → streaming
            hint = f"; did you mean {close[0]}?" if close else ""
            notes.append(f"unknown key: {shown} (not an Axolotl or molt option{hint})")
            unknown.append(shown)
        elif note := unsupported_note(shown, value, row):
            (refused_in_training if row.refused and row.at_training else refused if row.refused else notes).append(note)

    # the names a misspelling may be meant as: every key molt knows, implemented or not
    top_names = _known_keys() | UNSUPPORTED_KEYS | frozenset(RENAMED_KEYS)
    for key, value in data.items():
        sort(key, key, value, _known_keys(), unsupported(key), top_names)
    dataset_keys = frozenset(DatasetConfig.model_fields)
    for list_key in ("datasets", "test_datasets", "pretraining_dataset"):
        entries = data.get(list_key)
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            if not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                sort(key, f"{list_key}[{i}].{key}", value, dataset_keys, unsupported(key, entry=True), dataset_keys | DATASET_UNSUPPORTED_KEYS)
            if isinstance(entry.get("type"), dict):
                for key in entry["type"]:
                    sort(key, f"{list_key}[{i}].type.{key}", None, DATASET_TYPE_KEYS, None, DATASET_TYPE_KEYS)
    return unknown, refused, refused_in_training


# -- cross-field rules ----------------------------------------------------------------------------
# First the steps that fill in or normalise values (in order), then the table of rules, then the few
# checks too particular for a row. Every problem found is reported, each naming its keys and values.


def _resolve_top_chat_template(cfg: MoltConfig) -> None:
    _resolve_chat_template(cfg)


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


def _packing_pads(cfg: MoltConfig) -> None:
    # Axolotl: packed batches are padded to sequence_len unless the user says otherwise.
    if cfg.pad_to_sequence_len is None:
        cfg.pad_to_sequence_len = cfg.sample_packing


VARLEN_ATTENTION_KEYS = ("flash_attention", "flex_attention", "xformers_attention")


def _real_batches_without_varlen_attention(cfg: MoltConfig) -> None:
    # Axolotl: one micro_batch_size x sequence_len row per micro-batch only pays off where attention
    # skips the other samples' blocks (varlen kernels); dense SDPA/eager attention over that row
    # costs micro_batch_size times more, so without those kernels a micro-batch is rows of sequence_len.
    if cfg.multipack_real_batches is None:
        varlen = any(_value(cfg, k) for k in VARLEN_ATTENTION_KEYS)
        varlen = varlen or (cfg.attn_implementation or "").startswith(("flash_attention", "flex_attention"))
        cfg.multipack_real_batches = not varlen


def _deepspeed_contents(cfg: MoltConfig) -> None:
    # the file is read once, here: the train stage (and a Ray worker on another node) get its
    # contents, and the train key hashes them rather than the path
    if cfg.deepspeed is not None:
        cfg.deepspeed = deepspeed_config.load(cfg.deepspeed)


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


def _fsdp_qlora_storage(cfg: MoltConfig) -> None:
    # FSDP shards a module's parameters as one flat tensor of one dtype: bitsandbytes' 4-bit weights
    # are stored in that dtype, not uint8 (Axolotl's FSDP+QLoRA does the same), the compute dtype
    # molt loads the other weights in unless bnb_config_kwargs says otherwise
    if (cfg.fsdp or cfg.fsdp_config) and cfg.load_in_4bit:
        kwargs = dict(cfg.bnb_config_kwargs or {})
        compute = kwargs.get("bnb_4bit_compute_dtype", "float32")
        kwargs.setdefault("bnb_4bit_quant_storage", compute if isinstance(compute, str) else str(compute).removeprefix("torch."))
        cfg.bnb_config_kwargs = kwargs


NORMALISE: list[Callable[[MoltConfig], None]] = [
    _resolve_top_chat_template, _pretraining_dataset_as_completion, _packing_pads, _real_batches_without_varlen_attention, _batch_sizes,
    _deepspeed_contents, _fsdp_qlora_storage,
]

EXCLUDES, REQUIRES = "excludes", "requires"

# (when, EXCLUDES / REQUIRES, condition[, message]): where `when` holds, the condition must not hold
# (EXCLUDES) or must hold (REQUIRES). A condition is `key` (given: not null, false or empty, and not
# its default), `key: a | b` (one of these values; `*` matches any text), or several joined by ` or `.
# The message's {key} fields are the config's values; without one, "a (..) and b (..) are mutually
# exclusive; set only one".
RULES: list[tuple[str, ...]] = [
    ("warmup_steps", EXCLUDES, "warmup_ratio"),
    ("eval_steps", EXCLUDES, "evals_per_epoch"),
    ("save_steps", EXCLUDES, "saves_per_epoch"),
    ("test_datasets", EXCLUDES, "val_set_size", "test_datasets and val_set_size ({val_set_size!r}) are mutually exclusive: "
     "evaluate on test_datasets or on a split of datasets, not both (set val_set_size: 0)"),
    # adapters and quantization
    ("adapter: qlora", REQUIRES, "load_in_4bit", "adapter: qlora requires load_in_4bit: true (got load_in_4bit: {load_in_4bit!r})"),
    ("adapter: qlora", EXCLUDES, "load_in_8bit", "adapter: qlora cannot use load_in_8bit: true (qlora is 4-bit; use adapter: lora for 8-bit)"),
    ("load_in_4bit", REQUIRES, "adapter", "load_in_4bit: true requires an adapter (lora or qlora): a quantized model cannot be fully fine-tuned"),
    ("load_in_8bit", REQUIRES, "adapter", "load_in_8bit: true requires an adapter (lora or qlora): a quantized model cannot be fully fine-tuned"),
    ("loraplus_lr_ratio", REQUIRES, "adapter", "loraplus_lr_ratio ({loraplus_lr_ratio}) sets the learning rates of a LoRA adapter's matrices: needs adapter: lora or qlora"),
    ("loraplus_lr_embedding", REQUIRES, "adapter", "loraplus_lr_embedding ({loraplus_lr_embedding}) sets the learning rates of a LoRA adapter's matrices: needs adapter: lora or qlora"),
    # ReLoRA
    ("relora_steps", REQUIRES, "adapter: lora", "relora_steps ({relora_steps}) needs adapter: lora (got adapter: {adapter!r}): ReLoRA merges and restarts a LoRA adapter"),
    ("relora_steps", EXCLUDES, "load_in_4bit or load_in_8bit", "relora_steps with load_in_4bit / load_in_8bit is not supported yet: merging into a quantized base needs its full weights"),
    ("relora_steps", EXCLUDES, "peft_use_dora", "relora_steps with peft_use_dora: DoRA's magnitude vector is not a low-rank update ReLoRA can merge"),
    ("relora_steps", EXCLUDES, "lr_scheduler: one_cycle", "relora_steps does not work with lr_scheduler: one_cycle (Axolotl's rule); use cosine, linear or constant"),
    ("relora_steps", EXCLUDES, "fsdp or fsdp_config", "relora_steps ({relora_steps}) does not work with fsdp: ReLoRA merges and resets adapters on one process"),
    ("deepspeed", EXCLUDES, "fsdp or fsdp_config", "deepspeed and fsdp / fsdp_config are mutually exclusive; use one"),
    ("fsdp or fsdp_config", EXCLUDES, "rl or reward_model or process_reward_model", "fsdp is not supported yet with rl / reward_model / process_reward_model: "
     "molt hands FSDP to its supervised trainer only (TRL's trainers here run on one process or DDP)"),
    ("deepspeed", EXCLUDES, "rl or reward_model or process_reward_model", "deepspeed is not supported yet with rl / reward_model / process_reward_model: "
     "molt hands DeepSpeed to its supervised trainer only (TRL's trainers here run on one process or DDP)"),
    ("relora_steps", EXCLUDES, "deepspeed", "relora_steps ({relora_steps}) does not work with deepspeed: ReLoRA merges and resets the adapter "
     "and its optimizer state in place, which DeepSpeed's partitioned copies do not see"),
    # preference and reward training (TRL's trainers)
    ("rl", EXCLUDES, "sample_packing", "sample_packing with rl: {rl} is not supported: TRL's preference trainers pad each prompt with its "
     "answers, and packing pairs would let one pair attend to another's (set sample_packing: false)"),
    ("reward_model or process_reward_model", EXCLUDES, "sample_packing", "sample_packing with a reward model is not supported: "
     "each chosen / rejected sequence is scored at its own last token (set sample_packing: false)"),
    ("rl", EXCLUDES, "reward_model or process_reward_model", "rl: {rl} trains a language model; reward_model / process_reward_model train a classifier: set one of them"),
    ("reward_model", EXCLUDES, "process_reward_model", "reward_model and process_reward_model are two kinds of model: set one"),
    *((when, EXCLUDES, key, f"{key} is a setting of molt's supervised trainer, not of TRL's preference and reward trainers")
      for when in ("rl", "reward_model or process_reward_model") for key in ("relora_steps", "loraplus_lr_ratio", "lr_groups", "batch_flattening", "curriculum_sampling")),
    # learning-rate schedule
    ("cosine_min_lr_ratio", REQUIRES, "lr_scheduler: cosine", "cosine_min_lr_ratio ({cosine_min_lr_ratio}) applies to lr_scheduler: cosine, not lr_scheduler: {lr_scheduler}"),
    ("cosine_constant_lr_ratio", REQUIRES, "lr_scheduler: cosine", "cosine_constant_lr_ratio ({cosine_constant_lr_ratio}) applies to lr_scheduler: cosine, not lr_scheduler: {lr_scheduler}"),
    ("lr_quadratic_warmup", REQUIRES, "lr_scheduler: cosine", "lr_quadratic_warmup applies to lr_scheduler: cosine, not lr_scheduler: {lr_scheduler}"),
    ("lr_div_factor", REQUIRES, "lr_scheduler: one_cycle", "lr_div_factor ({lr_div_factor}) applies to lr_scheduler: one_cycle, not lr_scheduler: {lr_scheduler}"),
    ("log_sweep_min_lr", REQUIRES, "lr_scheduler: log_sweep", "log_sweep_min_lr ({log_sweep_min_lr}) applies to lr_scheduler: log_sweep, not lr_scheduler: {lr_scheduler}"),
    ("log_sweep_max_lr", REQUIRES, "lr_scheduler: log_sweep", "log_sweep_max_lr ({log_sweep_max_lr}) applies to lr_scheduler: log_sweep, not lr_scheduler: {lr_scheduler}"),
    ("cosine_constant_lr_ratio", REQUIRES, "cosine_min_lr_ratio", "cosine_constant_lr_ratio ({cosine_constant_lr_ratio}) holds the learning rate at the cosine's floor: "
     "set cosine_min_lr_ratio (the floor) too"),
    ("lr_quadratic_warmup", EXCLUDES, "cosine_min_lr_ratio", "lr_quadratic_warmup and cosine_min_lr_ratio do not combine (the quadratic warm-up's cosine ends at 0); set only one"),
    # optimizer
    ("optim_target_modules", REQUIRES, "optimizer: galore_* | apollo_*", "optim_target_modules names the layers GaLore / APOLLO project: "
     "needs a galore_* or apollo_* optimizer, not {optimizer}"),
    ("optimizer: galore_* | apollo_*", REQUIRES, "optim_target_modules", "optimizer: {optimizer} needs optim_target_modules (the layers it projects, e.g. [attn, mlp] or all-linear)"),
    ("lr_groups", EXCLUDES, "loraplus_lr_ratio", "lr_groups and loraplus_lr_ratio both set the parameters' learning rates; use one"),
    ("lr_groups", EXCLUDES, "optimizer: galore_* | apollo_* | lomo | adalomo", "lr_groups cannot be used with optimizer: {optimizer} (it builds its own parameter groups)"),
    ("optimizer: *_layerwise", EXCLUDES, "lr_scheduler: one_cycle | log_sweep or lr_quadratic_warmup or cosine_constant_lr_ratio",
     "optimizer: {optimizer} steps each layer inside the backward pass with transformers' own schedulers; lr_scheduler: {lr_scheduler} "
     "(and lr_quadratic_warmup / cosine_constant_lr_ratio) cannot drive it"),
    ("optimizer: *_layerwise", EXCLUDES, "gradient_accumulation_steps", "optimizer: {optimizer} updates each layer as soon as its gradient is ready: "
     "gradient_accumulation_steps must be 1 (got {gradient_accumulation_steps})"),
    # precision: the autocast (bf16, fp16) and the weights' dtype (bf16: full, bfloat16, float16, float32)
    ("fp16", EXCLUDES, "bf16: true | full", "fp16: true and bf16: {bf16} are mutually exclusive; set one (bf16: auto picks for you)"),
    ("bf16: full", EXCLUDES, "load_in_4bit or load_in_8bit", "bf16: full casts the weights to bf16, which a 4-/8-bit quantized base cannot be; use bf16: true (mixed precision)"),
    ("bfloat16", EXCLUDES, "float16", "bfloat16: true and float16: true each set the weights' dtype; set one"),
    ("bfloat16", EXCLUDES, "float32", "bfloat16: true and float32: true each set the weights' dtype; set one"),
    ("float16", EXCLUDES, "float32", "float16: true and float32: true each set the weights' dtype; set one"),
    # with load_in_8bit it loads (as in Axolotl), with a note saying what molt does (_bfloat16_with_8bit)
    ("bfloat16", EXCLUDES, "load_in_4bit", "bfloat16: true casts the weights, which a 4-bit quantized base cannot be; use bf16: true (mixed precision)"),
    ("float16", EXCLUDES, "load_in_4bit or load_in_8bit", "float16: true casts the weights, which a 4-/8-bit quantized base cannot be; use bf16: true (mixed precision)"),
    ("float32", EXCLUDES, "load_in_4bit or load_in_8bit", "float32: true casts the weights, which a 4-/8-bit quantized base cannot be; use bf16: true (mixed precision)"),
    ("float16", EXCLUDES, "bf16: true | full", "float16: true contradicts bf16: {bf16}: the weights have one dtype"),
    ("bfloat16", EXCLUDES, "fp16", "bfloat16: true contradicts fp16: true: the weights have one dtype"),
    ("float32", EXCLUDES, "bf16: full", "float32: true contradicts bf16: full: the weights have one dtype"),
    # compilation and kernels
    ("torch_compile_backend", REQUIRES, "torch_compile", "torch_compile_backend ({torch_compile_backend}) applies with torch_compile: true"),
    ("torch_compile_mode", REQUIRES, "torch_compile", "torch_compile_mode ({torch_compile_mode}) applies with torch_compile: true"),
    ("liger_swiglu", EXCLUDES, "liger_glu_activation", "liger_swiglu and liger_glu_activation are the same option (liger_swiglu is the old name); keep liger_glu_activation"),
    # evaluation and saving (Axolotl: an interval means the "steps" strategy)
    ("eval_strategy: no | epoch", EXCLUDES, "eval_steps", "eval_strategy: {eval_strategy} contradicts eval_steps ({eval_steps!r}): an interval means eval_strategy: steps; remove one"),
    ("eval_strategy: no | epoch", EXCLUDES, "evals_per_epoch", "eval_strategy: {eval_strategy} contradicts evals_per_epoch ({evals_per_epoch!r}): "
     "an interval means eval_strategy: steps; remove one"),
    ("save_strategy: no | epoch | best", EXCLUDES, "save_steps", "save_strategy: {save_strategy} contradicts save_steps ({save_steps!r}): an interval means save_strategy: steps; remove one"),
    ("save_strategy: no | epoch | best", EXCLUDES, "saves_per_epoch", "save_strategy: {save_strategy} contradicts saves_per_epoch ({saves_per_epoch!r}): "
     "an interval means save_strategy: steps; remove one"),
]


def _value(cfg: MoltConfig, key: str) -> Any:
    """A key's value: its field, or the extra (an unsupported key) as written; None when absent."""
    return getattr(cfg, key) if key in type(cfg).model_fields else (cfg.model_extra or {}).get(key)


def _given(cfg: MoltConfig, key: str) -> bool:
    value, field = _value(cfg, key), type(cfg).model_fields.get(key)
    if value is None or value is False or value in ("", [], {}):
        return False
    return field is None or value != field.get_default(call_default_factory=True)


def _holds(cfg: MoltConfig, condition: str) -> bool:
    for alternative in condition.split(" or "):
        key, has_values, values = alternative.partition(": ")
        if not has_values and _given(cfg, key):
            return True
        value = _value(cfg, key)
        for wanted in values.split(" | ") if has_values else ():
            wanted = {"true": True, "false": False}.get(wanted, wanted)
            if isinstance(value, str) and isinstance(wanted, str) and fnmatch.fnmatchcase(value, wanted):
                return True
            if value == wanted and isinstance(value, bool) == isinstance(wanted, bool):
                return True
    return False


class _Values(dict):
    """The config's values for a rule's message: "{key}" and "{key!r}" fields."""

    def __init__(self, cfg: MoltConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def __missing__(self, key: str) -> Any:
        return _value(self.cfg, key)


def _broken_rules(cfg: MoltConfig) -> list[tuple[str, str]]:
    """(the rule's `when`, the problem) of each rule the config breaks."""
    problems = []
    for when, relation, condition, *message in RULES:
        if _holds(cfg, when) and _holds(cfg, condition) == (relation == EXCLUDES):
            text = message[0] if message else f"{when} ({{{when}!r}}) and {condition} ({{{condition}!r}}) are mutually exclusive; set only one"
            problems.append((when, text.format_map(_Values(cfg))))
    return problems


def _needs_data(cfg: MoltConfig) -> None:
    if not cfg.datasets and not cfg.pretraining_dataset:
        raise ValueError("datasets (or pretraining_dataset) is required: at least one dataset to train on")


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


def _optimizer_molt_has(cfg: MoltConfig) -> None:
    if cfg.optimizer in AXOLOTL_OPTIMIZERS:
        raise ValueError(f"optimizer: {cfg.optimizer} is not supported yet: it is one of Axolotl's own optimizers, which molt lacks; "
                         "use adamw_torch, adopt_adamw or another optimizer transformers names")


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


def _log_sweep_range(cfg: MoltConfig) -> None:
    low, high = cfg.log_sweep_min_lr or 1e-10, cfg.log_sweep_max_lr or 10.0
    if cfg.lr_scheduler == "log_sweep" and low >= high:
        raise ValueError(f"log_sweep_min_lr ({low}) must be below log_sweep_max_lr ({high})")


def _lr_group_names_differ(cfg: MoltConfig) -> None:
    names = [g["name"] for g in cfg.lr_groups or []]
    if len(set(names)) < len(names):
        raise ValueError(f"lr_groups: group names must differ (got {names})")


ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "xformers_attention": "xformers", "eager_attention": "eager"}


def _one_attention(cfg: MoltConfig) -> None:
    chosen = {f"{k}: true": v for k, v in ATTENTION_FLAGS.items() if getattr(cfg, k)}
    if cfg.attn_implementation:
        chosen[f"attn_implementation: {cfg.attn_implementation}"] = cfg.attn_implementation
    if len(set(chosen.values())) > 1:
        raise ValueError(f"{' and '.join(chosen)} choose different attention kernels; set one")


def _plain_gradient_checkpointing(cfg: MoltConfig) -> None:
    mode = cfg.gradient_checkpointing
    if mode not in (True, False, "offload"):
        raise ValueError(f"gradient_checkpointing: {mode} is not supported yet; use gradient_checkpointing: true, or offload (checkpointed activations kept in CPU memory)")


LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_KEYS = ("liger_rope", "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu")


def _plugins(cfg: MoltConfig) -> None:
    plugins = cfg.plugins or []
    liger = any(p.endswith("LigerPlugin") for p in plugins)
    for name in plugins:
        if not name.endswith(("LigerPlugin", "CutCrossEntropyPlugin")):
            note = f"ignored: plugins: {name} — not supported yet (molt has the Liger kernels: {LIGER_PLUGIN})"
            if note not in cfg.config_warnings:
                cfg.config_warnings.append(note)
                warnings.warn(note, MoltConfigWarning, stacklevel=2)
    given = [k for k in LIGER_KEYS if getattr(cfg, k)]
    if given and not liger:
        raise ValueError(f"{given[0]}: the liger_* keys belong to the Liger plugin: add plugins: [{LIGER_PLUGIN}]")


BFLOAT16_8BIT_NOTE = ("bfloat16: true with load_in_8bit: molt keeps the int8 layers int8 and the other weights in fp32 (PEFT's "
                      "prepare_model_for_kbit_training upcasts them, as in Axolotl); bf16 mixed precision (bf16: true, or auto on a "
                      "bf16 GPU) computes in bf16")


def _bfloat16_with_8bit(cfg: MoltConfig) -> None:
    if cfg.bfloat16 and cfg.load_in_8bit and BFLOAT16_8BIT_NOTE not in cfg.config_warnings:
        cfg.config_warnings.append(BFLOAT16_8BIT_NOTE)
        warnings.warn(BFLOAT16_8BIT_NOTE, MoltConfigWarning, stacklevel=2)


def _best_saves_need_evaluation(cfg: MoltConfig) -> None:
    evaluates = cfg.eval_strategy in ("steps", "epoch") or (cfg.eval_strategy is None and (cfg.eval_steps or cfg.evals_per_epoch))
    if cfg.save_strategy == "best" and not evaluates:
        raise ValueError("save_strategy: best saves when an evaluation improves on the best so far: set eval_steps, evals_per_epoch or eval_strategy")


def _safetensors_only(cfg: MoltConfig) -> None:
    if cfg.save_safetensors is False:
        raise ValueError("save_safetensors: false is not supported: molt writes weights as safetensors only (no pickled .bin files)")


def _deepspeed_fits(cfg: MoltConfig) -> None:
    if isinstance(cfg.deepspeed, dict):
        deepspeed_config.check_against(cfg.deepspeed, cfg)


CHECKS: list[Callable[[MoltConfig], None]] = [
    _needs_data, _loftq_on_plain_lora, _early_stopping_needs_evaluation, _log_sweep_range, _lr_group_names_differ, _one_attention,
    _plain_gradient_checkpointing, _plugins, _bfloat16_with_8bit, _best_saves_need_evaluation, _safetensors_only, _deepspeed_fits,
    _optimizer_molt_has,
]


# problems that only training has (the data stages read none of their keys), deferred as
# REFUSED_AT_TRAINING keys are: the rules whose first key is one of these, and these checks
TRAINING_RULE_KEYS = ("deepspeed", "fsdp or fsdp_config")
TRAINING_CHECKS = frozenset({"_early_stopping_needs_evaluation", "_deepspeed_fits", "_optimizer_molt_has"})


def _problems(cfg: MoltConfig) -> tuple[list[str], list[str]]:
    """Normalise `cfg` in place; the problems of its values, in the order found: (all others,
    those only training has)."""
    problems, training = [], []
    for step in NORMALISE:
        try:
            step(cfg)
        except ValueError as error:
            problems.append(str(error))
    for when, text in _broken_rules(cfg):
        (training if when in TRAINING_RULE_KEYS else problems).append(text)
    for check in CHECKS:
        try:
            check(cfg)
        except ValueError as error:
            (training if check.__name__ in TRAINING_CHECKS else problems).append(str(error))
    return problems, training


def _raise_or_defer(cfg: MoltConfig, problems: list[str], training: list[str], info: ValidationInfo) -> None:
    """Raise the problems; those only training has are kept in `cfg.training_refusals` instead
    when the loader defers them (load_config's defer_training_refusals) and nothing else is wrong."""
    context = info.context or {}
    if context.get("defer_training_refusals") and not problems and not context.get("refused_keys"):
        cfg.training_refusals += [t for t in training if t not in cfg.training_refusals]
        context.setdefault("training_refusals", []).extend(training)
    elif problems or training:
        raise ValueError("\n".join(problems + training))


# -- what a stage reads: typed slices of the one declaration ---------------------------------------
# Each key is declared once, above. A stage module names the keys it reads and gets a frozen model
# whose fields are the config's own (type, default, constraints):
#     Params = stage_params("sequence_len", "train_on_inputs", unkeyed=("dataset_processes",))
#     Spec = dataset_params("Spec", "type", "field_messages")  # a dataset entry's keys, as `dataset=Spec`
# `required`: keys the stage cannot run without (the config may leave them unset: null is refused
# when the stage is planned, not when the config loads). `unkeyed`: keys the stage receives that
# cannot change its output (worker counts, trackers), left out of the params dump and so of its key.


class StageParams(BaseModel):
    """The base of every slice: frozen, so a stage cannot change what it was given."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())


def _slice(name: str, module: str, source: type[BaseModel], keys: tuple[str, ...], required: tuple[str, ...] = (),
           unkeyed: tuple[str, ...] = (), **more: Any) -> type[StageParams]:
    fields: dict[str, Any] = {}
    for key in (*keys, *required, *unkeyed):
        if key in fields:
            raise TypeError(f"{name}: {key} is listed twice")
        info = source.model_fields[key]  # a KeyError here: the stage names a key the config does not declare
        annotation = info.annotation
        if key in required:  # null is the config's "unset": the stage needs a value
            annotation = Union[tuple(a for a in get_args(annotation) if a is not type(None))] if type(None) in get_args(annotation) else annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        exclude = True if key in unkeyed else None
        if key in required:
            fields[key] = (annotation, Field(exclude=exclude))
        elif info.default_factory is not None:
            fields[key] = (annotation, Field(default_factory=info.default_factory, exclude=exclude))
        else:
            fields[key] = (annotation, Field(default=info.default, exclude=exclude))
    return create_model(name, __base__=StageParams, __module__=module, **fields, **more)


def stage_params(*keys: str, required: tuple[str, ...] = (), unkeyed: tuple[str, ...] = (),
                 dataset: type[StageParams] | None = None) -> type[StageParams]:
    """A stage's `Params`: the MoltConfig fields `keys`, `required` and `unkeyed` (see above), plus
    the dataset entry's slice as `dataset` for a stage that runs per dataset."""
    module = sys._getframe(1).f_globals.get("__name__", "__main__")  # as namedtuple does: pickles by name
    more = {"dataset": (dataset, ...)} if dataset is not None else {}
    return _slice("Params", module, MoltConfig, keys, required, unkeyed, **more)


def dataset_params(name: str, *keys: str) -> type[StageParams]:
    """The slice of a dataset entry (DatasetConfig fields) a stage reads, as a model called `name`."""
    module = sys._getframe(1).f_globals.get("__name__", "__main__")
    return _slice(name, module, DatasetConfig, keys)


def slice_params(cls: type[BaseModel], values: dict) -> BaseModel:
    """A stage's Params from the config's values: only its declared fields, nested models sliced
    the same way (a dataset entry), so a stage cannot read a key it did not declare. A value the
    slice refuses (a required key left unset) is a ConfigError, one line per key."""
    picked = {}
    for name, f in cls.model_fields.items():
        if name not in values:
            continue
        value, annotation = values[name], f.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in annotation.model_fields}
        picked[name] = value
    try:
        return cls.model_validate(picked)
    except ValidationError as error:
        stage = cls.__module__.rpartition(".")[2]
        lines = []
        for e in error.errors(include_url=False):
            why = "required" if e["type"] == "missing" or e.get("input", "") is None else f"got {_short_repr(e.get('input'))}: {e['msg']}"
            lines.append(f"{_key_path(e['loc'])}: {why} (the {stage} stage reads it)")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


# -- loading --------------------------------------------------------------------------------------


# A config with every alias written out may hold this many nodes plus scalar characters: nested
# aliases ("billion laughs": each level repeats the one before ten times) stay small in the file and
# in PyYAML's shared objects, but validating or dumping them would expand them until memory runs out.
MAX_EXPANDED_YAML = 1_000_000


class _ExpansionError(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (PyYAML keeps the last one without a word)
    and refuses aliases that would expand the config beyond MAX_EXPANDED_YAML."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []
        self.aliases: list[tuple[str, Any, yaml.Node]] = []  # (anchor, where it is used, the node it names)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        node = super().compose_node(parent, index)
        if alias is not None:
            self.aliases.append((alias.anchor, alias.start_mark, node))
        return node

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and self.aliases:
            self._bound_expansion(node)
        return node

    def _bound_expansion(self, root: yaml.Node) -> None:
        sizes: dict[int, int] = {}
        open_nodes: set[int] = set()

        def size(node: yaml.Node) -> int:  # memoised: linear in the distinct nodes, however large the expansion
            if id(node) in sizes:
                return sizes[id(node)]
            if id(node) in open_nodes:
                anchor, mark, _ = next(a for a in self.aliases if a[2] is node)
                raise _ExpansionError(f"alias *{anchor} refers to the node it is inside (a recursive structure): not a config", mark)
            open_nodes.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                total = 1 + len(node.value)
            elif isinstance(node, yaml.SequenceNode):
                total = 1 + sum(size(child) for child in node.value)
            else:
                total = 1 + sum(size(k) + size(v) for k, v in node.value)
            open_nodes.discard(id(node))
            sizes[id(node)] = total
            return total

        if size(root) > MAX_EXPANDED_YAML:
            anchor, mark, _ = max(self.aliases, key=lambda a: sizes[id(a[2])])  # max keeps the first of equals
            raise _ExpansionError(
                f"alias *{anchor} (with the aliases inside it) expands the config beyond {MAX_EXPANDED_YAML:,} nodes and characters; "
                "expected a config without nested aliases that repeat one another (a \"billion laughs\" file)", mark)

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
    except _ExpansionError as error:
        raise ConfigError(f"{path}: line {error.problem_mark.line + 1}: {error.problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply (expected a config of at most a few hundred levels)") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context
        if "'\\t'" in (problem or ""):
            problem += " (YAML indents with spaces; expected no tab characters in the indentation)"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML error: {error}") from None
    finally:
        loader.dispose()


def _normalize_key(key: str) -> str:
    return key.strip().replace("-", "_")


def load_config(path: str | Path, overrides: dict[str, object] | None = None, defer_training_refusals: bool = False) -> MoltConfig:
    """Read a YAML config, apply `overrides` (e.g. from parse_cli_overrides) and validate it.
    `defer_training_refusals`: refused keys only training reads (REFUSED_AT_TRAINING) do not stop
    the load; they are kept in `training_refusals` (for preparing data only)."""
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
    return config_from_dict(data, source=str(path), load_warnings=notes, defer_training_refusals=defer_training_refusals)


def config_from_dict(data: dict, source: str = "<config>", load_warnings: list[str] = (), defer_training_refusals: bool = False) -> MoltConfig:
    """Validate an already-parsed config; errors become one ConfigError prefixed by `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys, got a {type(data).__name__}")
    bad = [repr(k) for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{source}: config keys must be strings, got {', '.join(bad)}")
    context: dict[str, Any] = {"load_warnings": list(load_warnings), "defer_training_refusals": defer_training_refusals}
    try:
        cfg = MoltConfig.model_validate(data, context=context)
    except ValidationError as error:
        refused = context.get("refused_keys", []) + context.get("training_refusals", []) + _rule_problems_beside(error, data)
        raise ConfigError(_describe(error, source, refused), notes=context.get("notes", context["load_warnings"])) from None
    if context.get("refused_keys"):
        raise ConfigError(_describe(None, source, context["refused_keys"]), notes=cfg.config_warnings)
    return cfg


def _rule_problems_beside(error: ValidationError, data: dict) -> list[str]:
    """The cross-field rules' problems of a config whose values failed: pydantic checks the rules only
    once every value is valid, so they are checked again without the failed keys (at their defaults).
    A problem naming a dropped key is left out: it would speak of the default, not of what was written."""
    failed = {str(e["loc"][0]) for e in error.errors() if e["loc"]}
    if not failed:
        return []  # the rules' own problems: already in `error`
    rest = {k: v for k, v in data.items() if k not in failed}
    rest.setdefault("base_model", "-")  # a required key: its absence is already reported
    if "datasets" in failed and not rest.get("pretraining_dataset"):
        rest["datasets"] = [{"path": "-"}]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MoltConfigWarning)
            MoltConfig.model_validate(rest, context={})
    except ValidationError as second:
        lines = [line for e in second.errors(include_url=False) if not e["loc"] and e["type"] == "value_error"
                 for line in str(e["ctx"]["error"]).splitlines()]
        named = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(failed))) + r")\b")
        return [line for line in lines if not named.search(line)]
    return []


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


def _describe(error: ValidationError | None, source: str, refused: list[str] = ()) -> str:
    """One line per problem: `refused` (keys molt does not implement, rules found beside the values'
    errors) first, then the errors of `error`, grouped by key."""
    by_key: dict[str, tuple[Any, list[str]]] = {"": (None, ["\n".join(refused)])} if refused else {}
    for e in error.errors(include_url=False) if error is not None else ():
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
