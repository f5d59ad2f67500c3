"""Several processes: the config's fsdp / fsdp_config and ddp_* keys as transformers'
TrainingArguments (the Trainer hands them to accelerate, which wraps the model in torch's FSDP /
FSDP2 or DDP), and the merge of a sharded FSDP checkpoint into one safetensors model.

Axolotl writes `fsdp_config`'s keys with or without the `fsdp_` prefix; stages.config keeps them
without it (its FSDP_KEYS), as Axolotl's schema does, so this module reads one spelling.
"""

from __future__ import annotations

from pathlib import Path

from stages.store import DataError

# molt's (Axolotl's) fsdp_config key -> the one transformers' _process_fsdp_args reads; the others
# it reads under their own name. offload_params is what Axolotl calls FSDP's CPU offload.
_TRAINER_NAMES = {"offload_params": "cpu_offload", "fsdp_version": "version"}
# Axolotl's keys the Trainer has no argument for: they change no weight
_NOT_PASSED = ("final_state_dict_type", "mixed_precision_policy", "cpu_offload_pin_memory", "sharding_strategy")


def fsdp_version(params) -> int:
    """The FSDP version a config asks for: fsdp_version, or fsdp_config's; Axolotl's default is 1
    when fsdp_config is given without one, and molt keeps it (the same config, the same wrapping)."""
    config = getattr(params, "fsdp_config", None) or {}
    return int(getattr(params, "fsdp_version", None) or config.get("fsdp_version") or 1)


def fsdp_enabled(params) -> bool:
    # the preference and reward trainers' params have no fsdp keys (config.py refuses fsdp with them)
    return bool(getattr(params, "fsdp", None) or getattr(params, "fsdp_config", None))


def fsdp_settings(params) -> dict:
    """TrainingArguments `fsdp` and `fsdp_config` (empty without FSDP). The legacy `fsdp` list
    (full_shard, shard_grad_op, hybrid_shard, no_shard, offload, auto_wrap) is turned into
    fsdp_config entries here, as transformers would, so FSDP2 gets its bool reshard_after_forward."""
    if not fsdp_enabled(params):
        return {}
    version = fsdp_version(params)
    config = {_TRAINER_NAMES.get(k, k): v for k, v in (params.fsdp_config or {}).items() if k not in _NOT_PASSED and v is not None}
    config["version"] = version
    options = params.fsdp.split() if isinstance(params.fsdp, str) else list(params.fsdp or [])
    if (params.fsdp_config or {}).get("sharding_strategy"):  # FSDP1's spelling of the same choice
        options.append(params.fsdp_config["sharding_strategy"].lower())
    for option in options:
        if option == "offload":
            config.setdefault("cpu_offload", True)
        elif option in ("full_shard", "shard_grad_op") and version == 2:
            config.setdefault("reshard_after_forward", option == "full_shard")
        elif option in ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard"):
            config.setdefault("reshard_after_forward", option)  # FSDP1's sharding strategy
    if config.get("auto_wrap_policy") is None and config.get("transformer_layer_cls_to_wrap"):
        config["auto_wrap_policy"] = "TRANSFORMER_BASED_WRAP"
    if version == 1 and isinstance(config.get("reshard_after_forward"), bool):
        # Axolotl's FSDP1 reads reshard_after_forward as full_shard (true) or shard_grad_op (false)
        config["reshard_after_forward"] = "full_shard" if config["reshard_after_forward"] else "shard_grad_op"
    return {"fsdp": True, "fsdp_config": config}


def ddp_settings(params) -> dict:
    """TrainingArguments ddp_*: only those the config sets (the Trainer's defaults otherwise)."""
    keys = ("ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters")
    return {k: getattr(params, k) for k in keys if getattr(params, k, None) is not None}


def check_fsdp(params, model, world_size: int) -> None:
    """What FSDP cannot do here, said before the Trainer starts. accelerate's FSDP1 plugin needs a
    GPU-like device (it places each rank's shard on one) and refuses CPU processes; FSDP2 shards over
    gloo. transformer_layer_cls_to_wrap must name classes of this model: accelerate would fail at
    the first step with a bare "could not find the transformer layer class"."""
    if not fsdp_enabled(params):
        return
    import torch

    if world_size > 1 and fsdp_version(params) == 1 and not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DataError("fsdp_version 1 on CPU processes: accelerate's FSDP1 needs a CUDA / XPU device for each rank's shard; "
                        "use fsdp_version: 2 (FSDP2 shards over gloo on CPU) or train on GPUs")
    offload = (params.fsdp_config or {}).get("offload_params") or "offload" in (params.fsdp or [])
    if world_size > 1 and offload and not torch.cuda.is_available():
        raise DataError("fsdp offload_params on CPU processes: the shards already live in CPU memory, and FSDP's offload "
                        "moves them between a GPU and the CPU; drop offload_params (or fsdp's offload) here")
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if len(dtypes) > 1 and fsdp_version(params) == 1:  # FSDP1 flattens a wrapped module's parameters into one tensor of one dtype (FSDP2 shards each alone)
        hint = " (4-bit weights: set bnb_config_kwargs.bnb_4bit_quant_storage to the other weights' dtype)" if "uint8" in dtypes else ""
        raise DataError(f"fsdp_version 1: the model's parameters are of several dtypes ({', '.join(sorted(dtypes))}), which FSDP cannot shard together{hint}")
    names = (params.fsdp_config or {}).get("transformer_layer_cls_to_wrap")
    if not names:
        return
    wanted = [names] if isinstance(names, str) else list(names)
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in wanted if n not in present]
    if missing:
        layers = sorted(n for n in present if n.endswith(("Layer", "Block")))
        raise DataError(f"fsdp_config.transformer_layer_cls_to_wrap: {', '.join(missing)} is not a module class of this model (its layers: {', '.join(layers) or 'none found'})")


def check_resume(params, checkpoint: str | None, world_size: int) -> None:
    """A FULL_STATE_DICT checkpoint is loaded by accelerate on rank 0 and broadcast: over gloo on
    CPU processes that load never returns under FSDP2 (seen with torch 2.13 / accelerate 1.15), so
    it is refused instead of hanging; a SHARDED_STATE_DICT one loads on every rank and resumes."""
    if checkpoint is None or world_size < 2 or not fsdp_enabled(params):
        return
    import torch

    if not torch.cuda.is_available() and not list(Path(checkpoint).glob("pytorch_model_fsdp_*")):
        raise DataError(f"resume_from_checkpoint {checkpoint}: a FULL_STATE_DICT checkpoint does not resume under FSDP on CPU processes "
                        "(accelerate's load waits forever over gloo); train with fsdp_config.state_dict_type: SHARDED_STATE_DICT to resume here")


def merge_sharded_weights(checkpoint: Path, out: Path) -> Path:
    """One safetensors model from a SHARDED_STATE_DICT checkpoint (`pytorch_model_fsdp_0/`, the
    torch.distributed.checkpoint files each rank wrote), by accelerate's merge_fsdp_weights, which
    reads them on one process. Returns the written file."""
    from accelerate.utils import merge_fsdp_weights

    shards = sorted(p for p in Path(checkpoint).glob("pytorch_model_fsdp_*") if p.is_dir())
    if not shards:
        raise DataError(f"{checkpoint}: no pytorch_model_fsdp_* folder: not a checkpoint of fsdp_state_dict_type: SHARDED_STATE_DICT")
    out.mkdir(parents=True, exist_ok=True)
    merge_fsdp_weights(str(shards[0]), str(out), safe_serialization=True)
    written = sorted(out.glob("*.safetensors"))
    if not written:
        raise DataError(f"{shards[0]}: accelerate's merge_fsdp_weights wrote no safetensors file to {out}")
    return written[0]


def shard_on_cpu(trainer) -> bool:
    """FSDP on CPU processes (gloo): accelerate makes a CPU process group MULTI_CPU and drops the
    FSDP plugin the Trainer hands it (its FSDP branch lists the GPU kinds only), though torch's
    FSDP / FSDP2 shard over gloo. Puts the plugin back so accelerate's own FSDP preparation,
    saving and loading run; returns whether FSDP is on. Called right after the Trainer made its
    Accelerator, before anything is prepared."""
    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None or trainer.args.fsdp_plugin_args is None:
        return getattr(state, "fsdp_plugin", None) is not None
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if state.distributed_type != DistributedType.MULTI_CPU:
        return False  # one process: the Trainer trains unsharded (nothing to shard over)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    # here accelerate's get_state_dict hands back FSDP2's DTensor shards, which the Trainer's
    # FULL_STATE_DICT checkpoints (and the final save) cannot write: gathered whole on every rank
    sharded_state_dict = trainer.accelerator.get_state_dict
    trainer.accelerator.get_state_dict = lambda model, unwrap=True: _whole(sharded_state_dict(model, unwrap))
    return True


def _whole(state: dict) -> dict:
    from torch.distributed.tensor import DTensor

    # plain CPU copies: safetensors cannot address the storage of a gathered tensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu").clone().contiguous() for k, v in state.items()}


def gathered_state_dict(trainer) -> dict:
    """The whole weights of a sharded model, as plain CPU tensors; every rank must call it (the
    gather is collective). accelerate's get_state_dict, whose FSDP2 path can hand back the DTensor
    shards on CPU processes: those are gathered here (full_tensor), and every tensor copied, since
    safetensors cannot address the storage of a gathered one."""
    return _whole(trainer.accelerator.get_state_dict(trainer.model))
