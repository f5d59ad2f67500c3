"""The config keys every training stage reads (train, train_preference, train_reward), by what
they set: the model and its adapter, batches and schedule, precision, evaluation and saving,
trackers. A stage's Params lists these groups plus its own method's keys."""

MODEL = (
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "lora_modules_to_save",
    "lora_fan_in_fan_out", "lora_model_dir", "peft_use_dora", "peft_layers_to_transform", "unfrozen_parameters",
    "load_in_4bit", "load_in_8bit", "bnb_config_kwargs", "trust_remote_code", "model_type", "overrides_of_model_config",
    "overrides_of_model_kwargs", "resize_token_embeddings_to_32x", "peft",
)
SCHEDULE = (
    "micro_batch_size", "gradient_accumulation_steps", "eval_batch_size", "num_epochs", "max_steps", "optimizer", "lr_scheduler",
    "warmup_steps", "warmup_ratio", "cosine_min_lr_ratio", "lr_scheduler_kwargs", "adam_beta1", "adam_beta2", "adam_epsilon",
    "optim_args", "optim_target_modules", "weight_decay", "max_grad_norm", "seed", "neftune_noise_alpha",
)
PRECISION = (
    "bf16", "fp16", "tf32", "bfloat16", "float16", "float32", "attn_implementation", "flash_attention", "sdp_attention",
    "xformers_attention", "eager_attention", "torch_compile", "torch_compile_backend", "torch_compile_mode", "plugins", "liger_rope",
    "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu", "gradient_checkpointing", "gradient_checkpointing_kwargs",
)
EVALUATION = (
    "logging_steps", "eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch", "save_total_limit", "early_stopping_patience",
    "loss_watchdog_threshold", "loss_watchdog_patience", "eval_strategy", "save_strategy", "metric_for_best_model", "greater_is_better",
    "save_safetensors", "save_only_model", "profiler_steps", "profiler_steps_start",
)
# where a run is reported, not what it computes (their logs live outside the artifact)
TRACKERS = (
    "use_tensorboard", "wandb_project", "wandb_name", "wandb_entity", "wandb_mode", "wandb_run_id", "wandb_watch", "wandb_log_model",
    "use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "use_comet", "comet_mode", "comet_project_name",
)
