"""`deepspeed:` in a config: the DeepSpeed JSON (ZeRO 1, 2 or 3, with or without CPU offload)
that the train stage hands to transformers' Trainer, checked when the config loads.

molt ships the usual set in stages/deepspeed_configs/ (`molt fetch deepspeed_configs` copies
them). `"auto"` is allowed exactly where the Trainer fills a value in itself
(transformers' HfTrainerDeepSpeedConfig: batch sizes and accumulation from the config, gradient
clipping from max_grad_norm, fp16 / bf16 from the precision, the ZeRO bucket sizes from the
model's hidden size); anywhere else DeepSpeed would receive the string and fail mid-launch.
An `optimizer` or `scheduler` section is refused: DeepSpeed would build its own in place of
molt's `optimizer` / `lr_scheduler`, a different run than the config describes.

Only the standard library: the config loader imports this, and the checks hold whether or not
DeepSpeed is installed on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).resolve().parent / "deepspeed_configs"

# the dotted keys whose "auto" HfTrainerDeepSpeedConfig replaces (trainer_config_process and
# trainer_config_finalize), but for the optimizer's and scheduler's, whose sections are refused
TRAINER_FILLS = frozenset({
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
    "fp16.enabled", "bf16.enabled",
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
})
OFFLOAD_DEVICES = ("cpu", "nvme", "none")
_FETCH_HINT = "`molt fetch deepspeed_configs` copies molt's ZeRO configs into ./deepspeed_configs"


def load(value: str | dict) -> dict:
    """The DeepSpeed config a `deepspeed:` value names (a JSON file, relative to the working
    directory) or holds, checked by check_shape; ValueError naming the file and what is wrong."""
    if isinstance(value, dict):
        ds, where = json.loads(json.dumps(value)), "deepspeed"
    else:
        path = Path(value)
        where = f"deepspeed: {value}"
        if not path.is_file():
            shipped = sorted(p.name for p in SHIPPED.glob("*.json"))
            raise ValueError(f"{where}: no such file (expected a DeepSpeed JSON file; {_FETCH_HINT}: {', '.join(shipped)})")
        try:
            ds = json.loads(path.read_text())
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not a text file ({error.reason})") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    check_shape(ds, where)
    return ds


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def check_shape(ds: Any, where: str) -> None:
    """The keys molt and the Trainer read, with the types they need; "auto" only in TRAINER_FILLS."""
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: expected a JSON object of DeepSpeed settings, got {type(ds).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{where}: a {section!r} section is not supported: molt builds the optimizer and its schedule "
                             "from the config's optimizer / lr_scheduler and hands them to DeepSpeed (remove the section)")
    for key in _autos(ds):
        if key not in TRAINER_FILLS:
            raise ValueError(f"{where}: {key} is \"auto\", which only these keys may be (the Trainer fills them in): {', '.join(sorted(TRAINER_FILLS))}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = ds.get(key, "auto")
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: {key} is {value!r}: expected a positive integer or \"auto\"")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{where}: zero_optimization is {zero!r}: expected an object such as {{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"{where}: zero_optimization.stage is {stage!r}: expected 0, 1, 2 or 3")
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part)
        if offload is None:
            continue
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"{where}: zero_optimization.{part} is {offload!r}: expected {{\"device\": \"cpu\"}} (or nvme with nvme_path, or none)")
        if device == "nvme" and not offload.get("nvme_path"):
            raise ValueError(f"{where}: zero_optimization.{part}.device nvme needs nvme_path (the folder DeepSpeed swaps to)")
        if device != "none" and part == "offload_param" and stage != 3:
            raise ValueError(f"{where}: zero_optimization.offload_param needs stage 3 (only ZeRO-3 partitions the weights), got stage {stage}")
        if device != "none" and stage == 0:
            raise ValueError(f"{where}: zero_optimization.offload_optimizer needs stage 1, 2 or 3 (stage 0 keeps the optimizer state whole)")
    if _enabled(ds, "fp16") is True and _enabled(ds, "bf16") is True:
        raise ValueError(f"{where}: fp16.enabled and bf16.enabled are both true; enable one (or write \"auto\" for both)")


def check_against(ds: dict, cfg: Any) -> None:
    """What the config and the DeepSpeed settings cannot both have; ValueError with the reason."""
    stage = zero_stage(ds)
    if stage == 3 and (cfg.load_in_8bit or cfg.load_in_4bit):
        bits = "load_in_8bit" if cfg.load_in_8bit else "load_in_4bit"
        raise ValueError(f"deepspeed: ZeRO-3 (zero_optimization.stage 3) with {bits} is not supported: ZeRO-3 partitions every weight across "
                         "the processes, and bitsandbytes' quantized layers cannot be partitioned; use ZeRO-1 or ZeRO-2, or unset " + bits)
    fixed = {
        "gradient_accumulation_steps": ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
        "gradient_clipping": ("max_grad_norm", 1.0 if cfg.max_grad_norm is None else cfg.max_grad_norm),
    }
    for key, (ours, value) in fixed.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ValueError(f"deepspeed: {key} is {ds[key]!r} but the config's {ours} is {value!r}; they must agree (write \"auto\" to take the config's)")
    if _enabled(ds, "fp16") is True and cfg.bf16 in (True, "full"):
        raise ValueError(f"deepspeed: fp16.enabled is true but the config has bf16: {cfg.bf16}; write \"auto\" to follow the config")
    if _enabled(ds, "bf16") is True and cfg.bf16 is False:
        raise ValueError("deepspeed: bf16.enabled is true but the config has bf16: false; write \"auto\" to follow the config, or set bf16: true")
    if _enabled(ds, "bf16") is True and cfg.fp16:
        raise ValueError("deepspeed: bf16.enabled is true but the config has fp16: true; write \"auto\" to follow the config")


def _enabled(ds: dict, section: str) -> Any:
    part = ds.get(section)
    return part.get("enabled") if isinstance(part, dict) else None


def _autos(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if value == "auto" else []
