"""Linear layers and SwiGLU MLPs that keep less for the backward pass and launch fewer kernels,
with exactly the arithmetic of the modules they stand in for.

* A LoRA-wrapped Linear (peft, one active adapter, no DoRA, a plain frozen base):
  `x @ W.T + b + s * (dropout(x) @ A.T) @ B.T` with the LoRA term added by the same matmul that
  computes it (addmm's alpha), instead of peft's separate matmul, scale and add, each a kernel and
  an autograd node. It keeps x and the rank-r `dropout(x) @ A.T`, as peft does; with lora_dropout,
  the dropout mask as one byte an element where peft keeps dropout(x) and the mask as floats. The
  mask is drawn as torch's own dropout draws it, so the same seed gives the same numbers.
* A gated MLP `down(silu(gate(x)) * up(x))` (Llama, Mistral, Qwen2, ... with SiLU), its three
  projections plain Linears or such LoRA Linears: it keeps x, gate(x) and up(x) and recomputes
  silu and the product in the backward pass (a few elementwise passes), where autograd keeps
  silu(gate), the product and the down projection's input besides: a third less memory per
  token for the whole model, the MLP's activations being most of it.

`install(model)` swaps the forward of each module that qualifies, once, after checking on a
random input that the swapped forward gives the module's own output; a module that differs, or
is not in plain training (merged adapter, adapters disabled, autocast, quantized or sharded
weights), keeps or falls back to its own forward. Imports torch: loaded when the stage trains.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _lora_parts(module):
    """(W, bias, A, B, scale, dropout) of a peft LoRA Linear whose forward this module can
    replace (dropout: its nn.Dropout, None for none), or (W, bias, None, None, 0, None) for a
    plain Linear; None when neither."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias, None, None, 0.0, None
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        return None
    active = getattr(module, "active_adapters", None)
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False) or not active or len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or getattr(module, "use_dora", {}).get(name) or getattr(module, "fan_in_fan_out", False):
        return None
    dropout = module.lora_dropout[name]
    if type(dropout) not in (torch.nn.Identity, torch.nn.Dropout) or getattr(module, "lora_variant", {}).get(name) is not None:
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    return base.weight, base.bias, a.weight, b.weight, float(module.scaling[name]), dropout if type(dropout) is torch.nn.Dropout else None


def _noise(mask, p, dtype):
    """torch's dropout factor from its mask: 0 or 1 / (1 - p), divided as torch divides it."""
    return mask.to(dtype).div_(1 - p)


def _forward(x2, weight, bias, a, b, scale, p=0.0):
    """One projection of 2-D x: the output, dropout(x) @ A.T (None without LoRA) and the dropout
    mask (None without dropout)."""
    out = F.linear(x2, weight, bias)
    if a is None:
        return out, None, None
    mask = None
    if p > 0:  # as torch's dropout on CPU: a Bernoulli draw the size of x, divided, multiplied
        noise = torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p)
        xa = (x2 * noise) @ a.t()
        mask = noise != 0
    else:
        xa = x2 @ a.t()
    return out.addmm_(xa, b.t(), alpha=scale), xa, mask


def _backward(g2, x2, xa, weight, bias, a, b, scale, needs, mask=None, p=0.0):
    """Gradients of one projection: (grad_x, grad_weight, grad_bias, grad_a, grad_b) for the
    output gradient g2; `needs` says which of x, weight, bias, a, b want one."""
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    gb = g2 @ b if a is not None else None
    noise = _noise(mask, p, x2.dtype) if mask is not None else None
    if needs[0]:
        grad_x = g2 @ weight
        if gb is not None and noise is None:
            grad_x.addmm_(gb, a, alpha=scale)
        elif gb is not None:
            grad_x.add_((gb @ a).mul_(scale).mul_(noise))
    if needs[1]:
        grad_w = g2.t() @ x2
    if needs[2] and bias is not None:
        grad_bias = g2.sum(0)
    if a is not None and needs[3]:
        grad_a = (gb.t() @ (x2 if noise is None else x2 * noise)).mul_(scale)
    if a is not None and needs[4]:
        grad_b = (g2.t() @ xa).mul_(scale)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, p):
        x2 = x.reshape(-1, x.shape[-1])
        out, xa, mask = _forward(x2, weight, bias, a, b, scale, p)
        ctx.save_for_backward(x2, xa, mask, weight, bias, a, b)
        ctx.scale, ctx.p, ctx.shape = scale, p, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, mask, weight, bias, a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        grads = _backward(grad.reshape(-1, grad.shape[-1]), x2, xa, weight, bias, a, b, ctx.scale, needs, mask, ctx.p)
        grad_x = grads[0].view(ctx.shape) if grads[0] is not None else None
        return (grad_x, *grads[1:], None, None)


class _GatedMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)); the inputs are x then (W, bias, A, B) of gate, up and down,
    `scales` and `ps` their LoRA scales and dropout probabilities."""

    @staticmethod
    def forward(ctx, x, scales, ps, *parts):
        x2 = x.reshape(-1, x.shape[-1])
        gate, up, down = parts[0:4], parts[4:8], parts[8:12]
        # in the order the module's own forward runs them (gate, up, down): the same dropout draws
        g, ga, gm = _forward(x2, *gate, scales[0], ps[0])
        u, ua, um = _forward(x2, *up, scales[1], ps[1])
        h = F.silu(g).mul_(u)
        y, ha, hm = _forward(h, *down, scales[2], ps[2])
        ctx.save_for_backward(x2, g, u, ga, ua, ha, gm, um, hm, *parts)
        ctx.scales, ctx.ps, ctx.shape = scales, ps, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, g, u, ga, ua, ha, gm, um, hm, *parts = ctx.saved_tensors
        gate, up, down = parts[0:4], parts[4:8], parts[8:12]
        needs = ctx.needs_input_grad
        ps = ctx.ps
        sig = torch.sigmoid(g)
        silu = g * sig
        h = silu * u
        d = _backward(grad.reshape(-1, grad.shape[-1]), h, ha, *down, ctx.scales[2], (True, *needs[11:15]), hm, ps[2])
        del h
        gh = d[0]
        grad_u = gh * silu
        del silu
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        grad_g = gh.mul_(u).mul_(sig.mul_(1 + g * (1 - sig)))
        gg = _backward(grad_g, x2, ga, *gate, ctx.scales[0], (needs[0], *needs[3:7]), gm, ps[0])
        uu = _backward(grad_u, x2, ua, *up, ctx.scales[1], (needs[0], *needs[7:11]), um, ps[1])
        grad_x = None
        if needs[0]:
            grad_x = gg[0].add_(uu[0]).view(ctx.shape)
        return (grad_x, None, None, *gg[1:], *uu[1:], *d[1:])


def _projection_forward(self, x, *args, **kwargs):
    parts = _usable(self, x)
    if parts is None or args or kwargs:
        return self._molt_own_forward(x, *args, **kwargs)
    return _Projection.apply(x, *parts)


def _mlp_forward(self, x):
    parts = [_usable(p, x) for p in (self.gate_proj, self.up_proj, self.down_proj)]
    if any(p is None for p in parts):
        return self._molt_own_forward(x)
    flat = [t for p in parts for t in p[:4]]
    return _GatedMLP.apply(x, tuple(p[4] for p in parts), tuple(p[5] for p in parts), *flat)


def _usable(module, x):
    """(W, bias, A, B, scale, dropout p as of now) for this call, None to use the module's own forward."""
    parts = _lora_parts(module)
    if parts is None or torch.is_autocast_enabled(x.device.type) or x.dtype != parts[0].dtype:
        return None
    dropout = parts[5]
    p = dropout.p if dropout is not None and dropout.training else 0.0
    if p >= 1 or (p > 0 and x.device.type != "cpu"):  # other devices draw dropout masks with kernels of their own
        return None
    parts = (*parts[:5], p)
    if parts[0].requires_grad and parts[2] is not None:
        return None  # a trainable base under an adapter: peft's own forward handles that mix
    if any(t is not None and t.dtype != x.dtype for t in parts[:4]):
        return None
    return parts


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _swap(module, forward, probe) -> bool:
    """Swap in `forward` if it gives the module's own output on `probe` (the same random state
    for both: lora_dropout draws from it in training)."""
    own = module.forward
    module._molt_own_forward = own
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        state = torch.get_rng_state()
        expected = own(probe)
        torch.set_rng_state(state)
        got = forward(module, probe)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        del module._molt_own_forward
        return False
    module.forward = types.MethodType(forward, module)
    return True


def install(model) -> dict:
    """Swap the forward of every gated MLP and LoRA Linear of `model` that qualifies; returns how
    many of each were swapped."""
    count = {"gated_mlp": 0, "lora_linear": 0}
    generator = torch.Generator().manual_seed(0)
    inside = set()
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(module.act_fn):
            parts = [_lora_parts(p) for p in (module.gate_proj, module.up_proj, module.down_proj)]
            if any(p is None for p in parts):
                continue
            w = parts[0][0]
            probe = torch.randn(2, 3, w.shape[1], generator=generator).to(w.dtype)
            if _usable(module.gate_proj, probe) is not None and _swap(module, _mlp_forward, probe):
                count["gated_mlp"] += 1
                inside.update(id(p) for p in (module.gate_proj, module.up_proj, module.down_proj))
    for module in model.modules():
        if id(module) in inside or type(module) is torch.nn.Linear:
            continue
        parts = _lora_parts(module)
        if parts is None:
            continue
        probe = torch.randn(2, 3, parts[0].shape[1], generator=generator).to(parts[0].dtype)
        if _usable(module, probe) is not None and _swap(module, _projection_forward, probe):
            count["lora_linear"] += 1
    return count
