"""How the model computes: precision (`bf16`, `fp16`, `tf32`), the attention kernel, torch.compile
and the Liger kernels.

Precision, as Axolotl resolves it, except where a CPU cannot do what it asks:
  * `bf16: auto` (the default): bf16 mixed precision on a GPU that supports it, else fp16 on a
    GPU (Axolotl's fallback); fp32 on CPU (CPU bf16 autocast is slow without AMX / AVX512-BF16
    and would change the numbers for nothing);
  * `bf16: true`: bf16 autocast over fp32 weights, on GPU or CPU;
  * `bf16: full`: the weights themselves in bf16 (pure bf16 training and evaluation);
  * `fp16: true`: fp16 mixed precision with loss scaling on a GPU; on CPU it falls back to fp32
    with a warning (accelerate has no fp16 autocast on CPU: the Trainer would silently run fp32);
  * `tf32: true`: TF32 matmuls on Ampere or newer GPUs; nothing to do on CPU (a note says so);
  * `bfloat16` / `float16` / `float32: true`: the weights' own dtype, as Axolotl loads them.

Attention: `attn_implementation` (transformers' names) or Axolotl's flags: `flash_attention` →
flash_attention_2, `sdp_attention` → sdpa, `eager_attention` → eager, `xformers_attention` →
PyTorch's memory-efficient SDPA kernel (xformers' algorithm; the flag still needs xformers and a
GPU, as in Axolotl). Unset: transformers' default (sdpa where the model supports it). Packed
rows stay apart with every kernel: transformers builds a block-diagonal mask from the restarting
position_ids for eager and sdpa, and cu_seqlens for flash-attention.
"""

from __future__ import annotations

import importlib.util

from stages.store import DataError

ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "xformers_attention": "xformers", "eager_attention": "eager"}
ATTENTION_NAMES = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# kernel: (python module, pip package) it needs besides a CUDA GPU
GPU_KERNELS = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface", "flash-attn-3"), "xformers": ("xformers", "xformers")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_settings(params, log) -> dict:
    """TrainingArguments for `bf16` / `fp16` / `tf32` on this machine (see the module docstring);
    `log` is told where CPU cannot do what the config asks."""
    import torch

    cuda = _cuda()
    bf16, fp16 = params.bf16, bool(params.fp16)
    if bf16 == "auto" and params.float16:
        bf16 = False  # fp16 weights: no autocast on top
    elif bf16 == "auto":
        bf16 = False if fp16 else (cuda and torch.cuda.is_bf16_supported())
        fp16 = fp16 or (cuda and not bf16)
    if fp16 and not cuda:
        log("warning: fp16: true needs a CUDA GPU (fp16 mixed precision with loss scaling); training in fp32 on CPU (bf16: true uses CPU bf16 autocast)")
        fp16 = False
    settings: dict = {}
    if bf16 == "full":
        settings["bf16_full_eval"] = True  # the weights are bf16 already (cast_weights); no autocast
    elif bf16:
        settings["bf16"] = True
    elif fp16:
        settings["fp16"] = True
    if settings and not cuda:
        settings["use_cpu"] = True  # transformers only allows bf16 on CPU when told it is on CPU
    if params.tf32 and not cuda:
        log("note: tf32: true changes CUDA matmuls only; nothing to do on CPU")
    elif params.tf32 is not None and cuda:
        settings["tf32"] = bool(params.tf32)
    return settings


def cast_weights(model, params) -> None:
    """`bf16: full` or `bfloat16: true`: the model's floating-point weights (adapter included) in
    bf16; `float16: true`: in fp16 (Axolotl's pure half-precision weights, without autocast)."""
    import torch

    if getattr(model, "is_loaded_in_8bit", False):
        return  # bfloat16 with load_in_8bit: int8 layers cannot be cast; the rest stays as loaded (see config.py's note)
    if params.bf16 == "full" or params.bfloat16:
        model.to(torch.bfloat16)
    elif params.float16:
        model.to(torch.float16)


def attention_implementation(params, log) -> str | None:
    """The transformers attn_implementation the config asks for (None: the model's default);
    refused when its package or a CUDA GPU is missing. `log` is told what xformers_attention runs."""
    name = params.attn_implementation or next((v for k, v in ATTENTION_FLAGS.items() if getattr(params, k)), None)
    if name is None:
        return None
    if name not in ATTENTION_NAMES and name != "xformers":
        raise DataError(f"attn_implementation: {name!r} is not an attention kernel; use one of {', '.join(ATTENTION_NAMES)}")
    if name in GPU_KERNELS:
        module, package = GPU_KERNELS[name]
        missing = [f"the package {package} (pip install {package})"] if importlib.util.find_spec(module) is None else []
        if not _cuda():
            missing.append("a CUDA GPU")
        if missing:
            asked = f"attn_implementation: {name}" if params.attn_implementation else next(f"{k}: true" for k, v in ATTENTION_FLAGS.items() if v == name)
            raise DataError(f"{asked} needs {' and '.join(missing)}; on CPU use sdp_attention: true (or leave attention unset)")
    if name == "flex_attention" and not _cuda():
        raise DataError("attn_implementation: flex_attention needs a CUDA GPU (PyTorch's FlexAttention has no backward pass on CPU); on CPU use sdp_attention: true")
    if name == "xformers":
        log("note: xformers_attention runs PyTorch's memory-efficient SDPA kernel (xformers' algorithm) through attn_implementation: sdpa")
        return "sdpa"
    return name


def set_attention(model, params, log) -> None:
    """The kernel the config asks for; where that is SDPA (asked for or the model's default) on
    CPU, SDPA per packed sample (training/segment_attention.py): the same attention, without the
    block-diagonal mask that sends SDPA to its slow general kernel and costs a row's full length."""
    name = attention_implementation(params, log)
    if name is not None:
        model.set_attn_implementation(name)
    if model.config._attn_implementation == "sdpa" and not _cuda():
        from stages.training.segment_attention import NAME

        model.set_attn_implementation(NAME)


def compile_settings(params) -> dict:
    """TrainingArguments for `torch_compile` with its backend and mode (inductor and default
    unless set). `auto` turns it on with a GPU only: Axolotl turns it on for any torch >= 2.5.1,
    but inductor compiling the training step on CPU took minutes even for a 2-layer test model."""
    on = _cuda() if params.torch_compile == "auto" else bool(params.torch_compile)
    if not on:
        return {}
    settings = {"torch_compile": True}
    if params.torch_compile_backend:
        settings["torch_compile_backend"] = params.torch_compile_backend
    if params.torch_compile_mode:
        settings["torch_compile_mode"] = params.torch_compile_mode
    return settings


# Liger's Triton kernels (plugins: [axolotl.integrations.liger.LigerPlugin]); the Trainer patches
# the model with them. Its loss kernels are refused at config load (molt computes the loss).
LIGER_KERNELS = {"liger_rope": "rope", "liger_rms_norm": "rms_norm", "liger_layer_norm": "layer_norm", "liger_glu_activation": "swiglu", "liger_swiglu": "swiglu"}


def liger_settings(params) -> dict:
    """TrainingArguments for the liger_* kernels; refused without liger-kernel or a CUDA GPU."""
    chosen = [key for key in LIGER_KERNELS if getattr(params, key)]
    if not chosen:
        return {}
    missing = ["the package liger-kernel (pip install liger-kernel)"] if importlib.util.find_spec("liger_kernel") is None else []
    if not _cuda():
        missing.append("a CUDA GPU (they are Triton kernels)")
    if missing:
        raise DataError(f"{', '.join(chosen)}: the Liger kernels need {' and '.join(missing)}; unset the liger_* keys on this machine")
    kernels = {kernel: False for kernel in LIGER_KERNELS.values()} | {"cross_entropy": False, "fused_linear_cross_entropy": False}
    kernels.update({LIGER_KERNELS[key]: True for key in chosen})
    return {"use_liger_kernel": True, "liger_kernel_config": kernels}


def offloaded_activations(params):
    """`gradient_checkpointing: offload`: the tensors the forward pass keeps for the backward one
    (with checkpointing, each layer's input) wait in CPU memory, not on the GPU (Axolotl's
    activation offloading; on a CPU-only machine they are there already)."""
    import contextlib

    import torch

    if params.gradient_checkpointing != "offload":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
