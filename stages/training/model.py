"""The model train and merge start from, loaded the same way by both.

`model_type` names the transformers class (AutoModelForCausalLM unless set; any class transformers
exports, e.g. LlamaForCausalLM or AutoModelForSequenceClassification). `overrides_of_model_config`
changes the model's config before the weights load (rope_scaling, num_labels, ...);
`overrides_of_model_kwargs` goes to from_pretrained. Custom modelling code runs only with
`trust_remote_code`. The embeddings grow to the tokenizer's vocabulary when tokens were added
(to the next multiple of 32 with `resize_token_embeddings_to_32x`). The adapter is a new LoRA
(optionally LoftQ-initialised, `peft: {loftq_config: {loftq_bits: 4}}`), the one in
`lora_model_dir`, or the trained one that merge folds in.

`params` is the calling stage's Params; a field the stage does not declare counts as unset.
Heavy imports stay inside the functions: a fully cached run must not import torch.
"""

from __future__ import annotations

from pathlib import Path

from stages.store import DataError

CAUSAL_LM = "AutoModelForCausalLM"
# from_pretrained arguments molt decides itself (precision, placement, quantization, custom code)
MOLT_LOAD_KWARGS = frozenset({"config", "quantization_config", "device_map", "trust_remote_code", "load_in_4bit", "load_in_8bit"})
LOFTQ_BITS = (4,)


def _get(params, name: str, default=None):
    return getattr(params, name, default)


def model_class(model_type: str | None):
    """The transformers class `model_type` names (AutoModelForCausalLM when unset)."""
    import transformers

    name = model_type or CAUSAL_LM
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DataError(f"model_type {name!r}: not a transformers model class (e.g. AutoModelForCausalLM, LlamaForCausalLM, AutoModelForSequenceClassification)")
    return cls


def is_causal_lm(model_type: str | None) -> bool:
    """Whether `model_type` (a valid class name, else DataError) is a causal language model."""
    return model_class(model_type).__name__.endswith("ForCausalLM")


def peft_task_type(model_type: str | None) -> str:
    """peft's task type for the class: it decides which heads stay trainable next to the adapter
    (a classifier's `score` is new, so it trains with SEQ_CLS / TOKEN_CLS)."""
    name = model_type or CAUSAL_LM
    if name.endswith("SequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("TokenClassification"):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def model_config(params, model_dir: Path):
    """The model's config with `overrides_of_model_config` applied. `rope_scaling` (Axolotl's
    spelling) is merged into transformers 5's `rope_parameters`, which also holds rope_theta."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=bool(_get(params, "trust_remote_code")))
    for key, value in (_get(params, "overrides_of_model_config") or {}).items():
        if key == "rope_scaling" and hasattr(config, "rope_parameters") and isinstance(value, dict):
            value = {("rope_type" if k == "type" else k): v for k, v in value.items()}
            key, value = "rope_parameters", {**(config.rope_parameters or {}), **value}
        elif not hasattr(config, key):
            raise DataError(f"overrides_of_model_config: {key!r} is not a setting of {type(config).__name__} ({config.model_type})")
        setattr(config, key, value)
    return config


def load_kwargs(params) -> dict:
    """`overrides_of_model_kwargs`, minus what molt sets itself."""
    kwargs = dict(_get(params, "overrides_of_model_kwargs") or {})
    clash = sorted(MOLT_LOAD_KWARGS & set(kwargs))
    if clash:
        raise DataError(f"overrides_of_model_kwargs: {', '.join(clash)} are set by molt (use load_in_4bit / load_in_8bit / bnb_config_kwargs, trust_remote_code, overrides_of_model_config)")
    return kwargs


def quantization_config(params):
    """bitsandbytes settings for `load_in_4bit` (QLoRA: nf4, double quantization, fp32 compute on
    CPU, as Axolotl's defaults; `bnb_config_kwargs` overrides them) or `load_in_8bit`; None when
    the model is loaded in full precision."""
    import torch
    from transformers import BitsAndBytesConfig

    if _get(params, "load_in_4bit"):
        settings = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": torch.float32}
        settings.update(_get(params, "bnb_config_kwargs") or {})
        if isinstance(settings["bnb_4bit_compute_dtype"], str):
            settings["bnb_4bit_compute_dtype"] = getattr(torch, settings["bnb_4bit_compute_dtype"])
        return BitsAndBytesConfig(load_in_4bit=True, **settings)
    if _get(params, "load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True, **(_get(params, "bnb_config_kwargs") or {}))
    return None


def embedding_rows(vocab_size: int, to_32x: bool) -> int:
    """The embedding rows for a vocabulary: itself, or the next multiple of 32 (tensor-core friendly)."""
    return -(-vocab_size // 32) * 32 if to_32x else vocab_size


def load_base(params, model_dir: Path, vocab_size: int, quantize: bool = True):
    """The base model in fp32 (or quantized by bitsandbytes when `quantize` and the params ask),
    with its embeddings grown to the tokenizer's vocabulary."""
    import torch

    cls = model_class(_get(params, "model_type"))
    extra = load_kwargs(params)
    quantized = quantization_config(params) if quantize else None
    if quantized is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DataError("load_in_4bit / load_in_8bit need bitsandbytes: pip install bitsandbytes") from None
        # the quantized weights must stay where bitsandbytes put them; the Trainer does not move them
        extra.update(quantization_config=quantized, device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    extra.setdefault("dtype", torch.float32)
    trust = bool(_get(params, "trust_remote_code"))
    model = cls.from_pretrained(model_dir, config=model_config(params, model_dir), trust_remote_code=trust, **extra)
    if quantized is not None:
        same_4bit_kernel_in_eval(model)
    model.config.use_cache = False  # a KV cache would also switch off packed-sequence masking
    rows = embedding_rows(vocab_size, bool(_get(params, "resize_token_embeddings_to_32x")))
    if rows > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(rows)
    return model


def same_4bit_kernel_in_eval(model) -> None:
    """Keep bitsandbytes' 4-bit layers on the kernel they train with when they evaluate on CPU.

    Since bitsandbytes 0.49, a Linear4bit on a CPU with AVX512-BF16 repacks its weight in place,
    the first time it runs in eval mode without gradients, for a bf16 inference kernel. That
    kernel needs in_features a multiple of the quantization block (64) and out_features a
    multiple of 32 (a small model fails: "shape '[32, 0]' is invalid"), computes in bf16 instead
    of `bnb_4bit_compute_dtype`, and the weight stays repacked: the training steps after an
    evaluation would go through the inference kernel, which passes no gradient back to the
    layers below. The flag is per layer; switching it off keeps the dequantize-and-matmul path,
    so evaluation computes what training computes, on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_for_training(params, model_dir: Path, vocab_size: int):
    """The model the Trainer gets: the base (quantized and prepared for k-bit training when asked)
    with a new or continued LoRA adapter, or with only `unfrozen_parameters` trainable."""
    model = load_base(params, model_dir, vocab_size)
    grown = vocab_size > _base_vocab(model_dir)
    if quantization_config(params) is not None:
        from peft import prepare_model_for_kbit_training

        # freezes the quantized base, upcasts norms and the head to fp32; checkpointing is set by the Trainer
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    adapter = _get(params, "adapter")
    if adapter in ("lora", "qlora"):
        if grown:
            _require_trainable_embeddings(params, model)
        return with_adapter(params, model)
    if adapter:
        raise DataError(f"adapter {adapter!r}: molt trains lora, qlora or (no adapter) full models")
    if _get(params, "peft"):
        raise DataError("peft (loftq_config) initialises a LoRA adapter: set adapter: lora")
    if _get(params, "unfrozen_parameters"):
        freeze_except(model, _get(params, "unfrozen_parameters"))
    return model


def _base_vocab(model_dir: Path) -> int:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0)


def _require_trainable_embeddings(params, model) -> None:
    """Added tokens start with untrained embedding rows; a LoRA adapter leaves the embeddings
    frozen unless they are in lora_modules_to_save (Axolotl refuses the same)."""
    names = {n: m for n, m in model.named_modules()}
    wanted = [n.rsplit(".", 1)[-1] for n, m in names.items() if m is model.get_input_embeddings() or m is model.get_output_embeddings()]
    missing = [w for w in dict.fromkeys(wanted) if w not in (_get(params, "lora_modules_to_save") or [])]
    if missing:
        raise DataError(
            f"tokens / special_tokens add tokens to the vocabulary: with a LoRA adapter their embeddings only train if "
            f"lora_modules_to_save includes {', '.join(dict.fromkeys(wanted))} (missing: {', '.join(missing)})"
        )


def with_adapter(params, model):
    """A new LoRA adapter, or the one in `lora_model_dir` made trainable again (continued training:
    its own r, targets and layers, so the config's lora_* keys do not apply to it)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if _get(params, "unfrozen_parameters"):
        raise DataError("unfrozen_parameters selects weights for full fine-tuning; with an adapter only the adapter trains (unset adapter or unfrozen_parameters)")
    lora_model_dir = _get(params, "lora_model_dir")
    if lora_model_dir:
        if not (Path(lora_model_dir) / "adapter_config.json").exists():
            raise DataError(f"lora_model_dir {lora_model_dir}: no adapter_config.json there (not a peft adapter)")
        model = PeftModel.from_pretrained(model, lora_model_dir, is_trainable=True)
        if loftq_bits(params):
            quantize_lora_bases(model, loftq_bits(params))
        return model
    # a string is a regex that peft matches against whole module names; a list names modules
    targets = _get(params, "lora_target_modules") or ("all-linear" if _get(params, "lora_target_linear") else None)
    layers = _get(params, "peft_layers_to_transform")
    if layers is not None and isinstance(targets, str) and targets != "all-linear":
        raise DataError("peft_layers_to_transform needs lora_target_modules as a list of module names, not a regex")
    task = peft_task_type(_get(params, "model_type"))
    # a classifier's new head trains in full (peft keeps it in modules_to_save), so no LoRA on it
    exclude = ["score", "classifier"] if task != "CAUSAL_LM" and targets == "all-linear" else None
    config = LoraConfig(
        r=_get(params, "lora_r", 8),
        lora_alpha=_get(params, "lora_alpha", 16),
        lora_dropout=_get(params, "lora_dropout", 0.0),
        target_modules=targets,
        modules_to_save=_get(params, "lora_modules_to_save"),
        fan_in_fan_out=bool(_get(params, "lora_fan_in_fan_out")),
        use_dora=bool(_get(params, "peft_use_dora")),
        layers_to_transform=layers,
        exclude_modules=exclude,
        task_type=task,
    )
    model = get_peft_model(model, config)
    if loftq_bits(params):
        loftq_initialise(model, loftq_bits(params))
    return model


def freeze_except(model, patterns: list[str]) -> None:
    """Full fine-tuning of only the parameters whose name matches one of the regexes (re.match from
    the start of the name, as Axolotl); a pattern that matches nothing is a config error, not a no-op."""
    import re

    compiled = [re.compile(p) for p in patterns]
    used = set()
    for name, param in model.named_parameters():
        hits = {p.pattern for p in compiled if p.match(name)}
        param.requires_grad_(bool(hits))
        used |= hits
    unused = [p for p in patterns if p not in used]
    if unused:
        raise DataError(f"unfrozen_parameters: {', '.join(unused)} match no parameter of the model (names look like {next(iter(dict(model.named_parameters())))})")


def with_trained_adapter(params, model, adapter_dir: Path):
    """The trained adapter on its base, as it was trained (a LoftQ adapter on the LoftQ-quantized
    weights it was fitted to)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir)
    if loftq_bits(params):
        quantize_lora_bases(model, loftq_bits(params))
    return model


# -- LoftQ ---------------------------------------------------------------------------------------
# peft's own LoftQ initialisation (init_lora_weights="loftq") computes on a CUDA/XPU device only;
# molt does the same fit with bitsandbytes' CPU-capable NF4 quantizer, on any device.


def loftq_bits(params) -> int | None:
    loftq = (_get(params, "peft") or {}).get("loftq_config")
    if loftq is None:
        return None
    bits = (loftq or {}).get("loftq_bits", 4)
    if bits not in LOFTQ_BITS:
        raise DataError(f"peft.loftq_config.loftq_bits: {bits}; molt implements LoftQ with {', '.join(map(str, LOFTQ_BITS))}-bit NF4")
    return bits


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "weight") and module.get_base_layer().weight.dim() == 2:
            yield name, module


def _nf4_round_trip(weight):
    """The weight as 4-bit NF4 (blocks of 64) represents it, back in its own dtype."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=64, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def quantize_lora_bases(model, bits: int) -> None:
    """Replace the base weight under every LoRA layer by its NF4 round trip (what LoftQ trains
    against); deterministic, so a saved LoftQ adapter finds the same base again."""
    import torch

    with torch.no_grad():
        for _, layer in _lora_layers(model):
            base = layer.get_base_layer().weight
            base.copy_(_nf4_round_trip(base))


def loftq_initialise(model, bits: int, adapter: str = "default") -> None:
    """LoftQ (arXiv:2310.08659), one alternation: the base weight W becomes its NF4 round trip Q,
    and the adapter starts as the best rank-r fit of the quantization error, scaling·B·A ≈ W − Q
    (truncated SVD), so the model starts close to the full-precision one instead of to Q."""
    import torch

    with torch.no_grad():
        for name, layer in _lora_layers(model):
            if adapter not in layer.lora_A:
                continue
            base = layer.get_base_layer().weight
            weight = base.detach().float()
            if layer.fan_in_fan_out:
                weight = weight.T
            quantized = _nf4_round_trip(weight)
            u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
            r = layer.r[adapter]
            root = torch.sqrt(s[:r] / layer.scaling[adapter])
            layer.lora_B[adapter].weight.copy_(u[:, :r] * root)
            layer.lora_A[adapter].weight.copy_(root[:, None] * vh[:r])
            base.copy_((quantized.T if layer.fan_in_fan_out else quantized).to(base.dtype))


# -- packed samples --------------------------------------------------------------------------------


def keeps_samples_apart(model) -> bool:
    """Packed rows rely on the model restarting attention where position_ids restart (transformers
    builds a block-diagonal mask from them). A model that ignores them would let samples attend to
    each other: probe with one short sequence twice in a row and compare the copies."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([[11, 22, 33, 44, 11, 22, 33, 44]], device=device)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    first, second = logits[0, :4], logits[0, 4:]
    return torch.allclose(first, second, atol=1e-4 + 1e-3 * float(first.abs().max()))


def check_packed_masking(model) -> None:
    """Refuse packed rows for a model that does not keep their samples apart."""
    if not keeps_samples_apart(model):
        raise DataError(
            f"{type(model).__name__} does not keep packed samples apart (its attention ignores the restarting position_ids): "
            "set sample_packing: false and batch_flattening: false for this model"
        )
