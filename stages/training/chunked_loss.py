"""molt's training loss without the [tokens x vocabulary] logits: the output projection runs only
on the positions that have a label, and there chunk by chunk, with the cross-entropy's gradient
computed in the same pass (linear_cross_entropy). TrainedTokenLoss wires it to a model: the
model's forward is told (transformers' `logits_to_keep` boolean mask) to keep only the labelled
positions, and the output embedding is handed an empty input while its real input, the hidden
states of those positions, is kept for the chunked loss. Exactly the plain loss (token_loss on
the full logits), in less time and memory: SmolLM2's vocabulary is 49,152, so the full logits of
one 2048-token row are 400 MB in fp32.

Three ways, picked once per model by a probe (`mode`):
* "chunked": the output embedding is a plain Linear and its logits are `h @ W.T + b`, optionally
  soft-capped (Gemma 2/3's final_logit_softcapping); the probe checks the model computes exactly
  that. The default.
* "masked": the model computes the logits itself, at the labelled positions only (a LoRA-wrapped
  or otherwise non-plain output layer, a logits transform molt does not know, a model sharded so
  its head's weight is not whole outside its forward).
* "full": the model's forward takes no `logits_to_keep` mask: full logits, token_loss.

In "chunked" mode a config may ask for another kernel of the same loss (Axolotl's keys):
`cut_cross_entropy` (Apple's cut-cross-entropy) or `liger_fused_linear_cross_entropy` /
`liger_cross_entropy` (Liger's fused linear cross-entropy). Both are Triton kernels: used where
their package and a CUDA GPU are, molt's own loss otherwise (`describe` says which ran).

Imports torch: loaded when the stage trains.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from stages.training.loss import IGNORE, token_loss

# the logits of one chunk are at most this many floats (32 MiB in fp32): big enough for an
# efficient matmul, small next to the model
CHUNK_ELEMENTS = 1 << 23
# and at most this many rows: past them a small vocabulary's matmuls gain nothing, while its
# chunk of logits outgrows the CPU's caches (4,096 rows of a 4,096 vocabulary: 1.2x slower)
CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` (soft-capped when `softcap`) against
    `targets`, chunk by chunk. The forward also computes the gradients (softmax minus one-hot,
    back through the projection), so no chunk's logits live past its own iteration and the
    backward only scales them by the incoming gradient: the loss is a scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            z = F.linear(h, w, None if bias is None else bias.to(h.dtype)).float()
            if softcap:
                capped = torch.tanh(z / softcap)
                z = capped * softcap
            lse = torch.logsumexp(z, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            total += (lse - z[rows, t]).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            dz = torch.exp(z.sub_(lse[:, None]))  # softmax, in z's storage
            dz[rows, t] -= 1
            if softcap:
                dz *= 1 - capped * capped
            if want_hidden:
                torch.matmul(dz.to(h.dtype), w, out=grad_hidden[start : start + chunk_rows])
            if want_weight:
                grad_weight.addmm_(dz.t(), h.float())  # in place: no weight-sized temporary per chunk
            if want_bias:
                grad_bias += dz.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.have = (want_hidden, want_weight, want_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = []
        for have, dtype in zip(ctx.have, ctx.dtypes):
            grads.append((next(saved) * grad_total).to(dtype) if have else None)
        return (*grads, None, None, None)


def linear_cross_entropy(hidden, weight, bias, targets, softcap: float | None = None, chunk_rows: int | None = None):
    """Summed cross-entropy of the logits `hidden @ weight.T + bias` ([N, H] hidden, [V, H]
    weight) against `targets` [N], never holding more than `chunk_rows` rows of logits."""
    if chunk_rows is None:
        chunk_rows = min(CHUNK_ROWS, max(1, CHUNK_ELEMENTS // weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk_rows)


def trained_positions(labels):
    """The positions whose next token is trained ([B, T] bool) and those tokens ([N]): position
    t predicts labels[t + 1]."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


class TrainedTokenLoss:
    """The training (and evaluation) loss of a model: summed over the trained tokens, divided by
    `num_items` (token_loss's contract), computed the cheapest exact way the model allows."""

    def __init__(self, model, sharded: bool = False, asked: str | None = None):
        self.head = model.get_output_embeddings()
        self.config = model.config
        self.kept = None  # the hidden states the output embedding was given
        self.hand_empty = False
        self.mode = self._probe(model, sharded)
        self.asked = asked
        self.kernel = asked if self.mode == "chunked" and asked is not None and _kernel_missing(asked) is None else None

    def describe(self) -> str:
        """Which loss runs, in one line (the train stage logs it and keeps it in its manifest)."""
        if self.kernel == "cut_cross_entropy":
            return "cut-cross-entropy's linear cross-entropy kernel on the labelled positions (cut_cross_entropy: true)"
        if self.kernel == "liger":
            return "Liger's fused linear cross-entropy kernel on the labelled positions"
        said = {
            "chunked": "molt's chunked linear cross-entropy on the labelled positions (no full logits)",
            "masked": "the model's logits at the labelled positions only, then cross-entropy",
            "full": "cross-entropy on the model's full logits (its forward takes no logits_to_keep mask)",
        }[self.mode]
        if self.asked is not None:
            why = _kernel_missing(self.asked) if self.mode == "chunked" else f"it needs the plain output layer that {self.mode} mode lacks"
            said += f"; {KERNELS[self.asked][2]} asks for {KERNELS[self.asked][1]}, not used: {why}"
        return said

    def _take(self, module, args):
        self.kept = args[0]
        if self.hand_empty:
            return (args[0][:0],)
        return None

    def _softcap(self):
        return getattr(self.config, "final_logit_softcapping", None) or getattr(getattr(self.config, "text_config", None), "final_logit_softcapping", None)

    def _probe(self, model, sharded: bool) -> str:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        if "logits_to_keep" not in inspect.signature(causal_lm.forward).parameters:
            return "full"
        device = self.head.weight.device if hasattr(self.head, "weight") else next(model.parameters()).device
        ids = torch.tensor([[11, 22, 33, 44, 55, 66]], device=device)
        keep = torch.tensor([[True, False, True, True, False, True]], device=device)
        hook = self.head.register_forward_pre_hook(self._take)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
                if logits.shape[:-1] != (int(keep.sum()),):
                    return "full"
                if sharded or type(self.head) is not torch.nn.Linear:
                    return "masked"
                mine = F.linear(self.kept, self.head.weight, self.head.bias).float()
                if self._softcap():
                    mine = torch.tanh(mine / self._softcap()) * self._softcap()
                exact = torch.allclose(mine, logits.float(), rtol=1e-4, atol=1e-4 * (1 + float(logits.float().abs().max())))
            return "chunked" if exact else "masked"
        except (TypeError, ValueError, IndexError, RuntimeError):
            return "full"  # a forward that cannot take the mask
        finally:
            model.train(was_training)
            hook.remove()
            self.kept = None

    def __call__(self, model, inputs: dict, labels, num_items=None):
        if self.mode == "full":
            return token_loss(model(**inputs), labels, num_items)
        keep, targets = trained_positions(labels)
        if self.mode == "masked":
            logits = model(**inputs, logits_to_keep=keep).logits.float()
            total = F.cross_entropy(logits, targets, reduction="sum")
        else:
            hook = self.head.register_forward_pre_hook(self._take)
            self.hand_empty = True
            try:
                model(**inputs, logits_to_keep=keep)
            finally:
                hook.remove()
                self.hand_empty = False
            hidden, self.kept = self.kept, None
            total = self._chunked(hidden, targets)
        if num_items is None:
            num_items = targets.numel()
        if torch.is_tensor(num_items):
            return total / num_items.to(total.device).clamp(min=1)
        return total / max(1, num_items)

    def _chunked(self, hidden, targets):
        weight, bias, softcap = self.head.weight, self.head.bias, self._softcap()
        if self.kernel == "cut_cross_entropy":
            from cut_cross_entropy import linear_cross_entropy as cut

            return cut(hidden, weight, targets, bias=bias, softcap=softcap, reduction="sum")
        if self.kernel == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap, reduction="sum")
        return linear_cross_entropy(hidden, weight, bias, targets, softcap)


# asked-for kernel: (its module, what it is, the key that asks for it)
KERNELS = {
    "cut_cross_entropy": ("cut_cross_entropy", "cut-cross-entropy's kernel", "cut_cross_entropy: true"),
    "liger": ("liger_kernel", "Liger's fused linear cross-entropy", "liger_fused_linear_cross_entropy / liger_cross_entropy"),
}


def asked_kernel(params) -> str | None:
    """The loss kernel a config asks for (None: molt's own)."""
    if getattr(params, "cut_cross_entropy", None):
        return "cut_cross_entropy"
    if getattr(params, "liger_fused_linear_cross_entropy", None) or getattr(params, "liger_cross_entropy", None):
        return "liger"
    return None


def _kernel_missing(kernel: str) -> str | None:
    import importlib.util

    module, _, _ = KERNELS[kernel]
    missing = [] if importlib.util.find_spec(module) is not None else [f"the package {module.replace('_', '-')}"]
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (it is a Triton kernel)")
    return f"it needs {' and '.join(missing)}" if missing else None
