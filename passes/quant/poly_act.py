"""poly-act: GELU, softmax and sigmoid replaced by HeatViT's hardware-friendly approximations.

The forms (HeatViT, HPCA 2023, after I-BERT, ICML 2021):

- GELU(x) = 0.5 x (1 + L(x / sqrt 2)), with the second-order erf approximation
  L(u) = sign(u) * d1 * [a (min(|u|, -b) + b)^2 + 1], a = -0.2888, b = -1.769.
  d1 = 1 is I-BERT's erf; HeatViT trains with d1 = 0.5 as a regulariser.
- exp, for softmax: with x~ = x - rowmax (so x~ <= 0), z = floor(-x~ / ln 2), p = x~ + z ln 2
  (p in (-ln 2, 0]), exp(x~) ~ [0.3585 (p + 1.353)^2 + 0.344] * 2^-z; in hardware the 2^-z is a
  right shift by z. softmax = exp / sum(exp), optionally scaled by d2 (HeatViT: 0.5 for attention).
- sigmoid, piecewise linear: y = 1 for |x| >= 5; |x|/32 + 27/32 for 2.375 <= |x| < 5;
  |x|/8 + 5/8 for 1 <= |x| < 2.375; |x|/4 + 1/2 for |x| < 1; and 1 - y for x < 0.

Fixed point: with ``bits`` > 0 the program gets the fact ``rounds-activations`` (its level
conversions then report, not enforce, their numerical check: float re-association in another
runtime can move a value across a rounding step). The input of each function is rounded to a signed ``bits``-bit
fixed-point grid that covers the function's operating range (GELU and sigmoid: [-8, 8), exp:
[-16, 0]), i.e. ``frac = bits - 1 - log2(range)`` fractional bits, saturating outside it; the
polynomial is then evaluated exactly (as I-BERT does with wide integer intermediates). ``bits=0``
keeps float inputs. The pass records the max and mean absolute error of each function over its
operating range (:func:`approximation_errors`).

Where the functions live: ``nn.GELU`` modules and ``F.gelu`` calls in the graph, ``nn.Sigmoid`` /
``torch.sigmoid``, ``softmax`` calls in the graph, and the softmax inside attention modules (the
attention is swapped for :class:`PolyAttention`, which keeps the original layers).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ir.program import Program
from ...ir.torch_level import is_attention, retrace
from ..infra.base import Pass, option, register
from ...ir import opdefs
from ..infra.facts import APPMUL, POLY_ACT, QUANTIZED_POT, ROUNDING_FACT
from ..transformer import ATTENTION_LAYOUTS, ProbsAttention

# I-BERT's constants (second-order erf and exp polynomials): one definition, in sliver.ir.opdefs
GELU_A, GELU_B = opdefs.IERF_A, opdefs.IERF_B
EXP_A, EXP_B, EXP_C = opdefs.IEXP_A, opdefs.IEXP_B, opdefs.IEXP_C
LN2 = math.log(2.0)
RANGES = {"gelu": (-8.0, 8.0), "exp": (-16.0, 0.0), "sigmoid": (-8.0, 8.0)}


def _round_ste(q: torch.Tensor) -> torch.Tensor:
    """``round(q)``. Where gradients are being taken (fine-tuning after poly-act, appmul's
    sensitivity profile) the rounding passes them straight through (the straight-through estimator
    of quantisation-aware training, Bengio et al. 2013); the values are the rounded ones bit for
    bit (``q - q.detach()`` is exactly zero), and traces and exports see the plain ``round``."""
    r = torch.round(q)
    if (q.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export()):
        return r.detach() + (q - q.detach())
    return r


def fixed_point(x: torch.Tensor, bits: int, bound: float) -> torch.Tensor:
    """Round ``x`` to a signed ``bits``-bit fixed-point grid covering [-bound, bound), saturating
    (gradients pass the rounding straight through, see :func:`_round_ste`)."""
    if bits <= 0:
        return x
    frac = bits - 1 - math.ceil(math.log2(bound))
    step = 2.0 ** -frac
    q = torch.clamp(_round_ste(x / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * step


def poly_erf(u: torch.Tensor, d1: float = 1.0) -> torch.Tensor:
    clipped = torch.clamp(u.abs(), max=-GELU_B)
    return torch.sign(u) * d1 * (GELU_A * (clipped + GELU_B) ** 2 + 1.0)


def poly_gelu(x: torch.Tensor, bits: int = 8, d1: float = 1.0) -> torch.Tensor:
    x = fixed_point(x, bits, 8.0)
    return 0.5 * x * (1.0 + poly_erf(x / math.sqrt(2.0), d1))


def poly_exp(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """exp(x) for x <= 0 by the shift-and-quadratic form above."""
    x = fixed_point(torch.clamp(x, min=-16.0), bits, 16.0)
    z = torch.floor(-x / LN2)
    p = x + z * LN2
    return (EXP_A * (p + EXP_B) ** 2 + EXP_C) * torch.pow(2.0, -z)  # 2^-z: a right shift by z


def poly_softmax(x: torch.Tensor, dim: int = -1, bits: int = 8, d2: float = 1.0) -> torch.Tensor:
    e = poly_exp(x - x.amax(dim=dim, keepdim=True), bits)
    return d2 * e / e.sum(dim=dim, keepdim=True)


def pwl_sigmoid(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    x = fixed_point(x, bits, 8.0)
    a = x.abs()
    y = torch.where(
        a >= 5.0,
        torch.ones_like(a),
        torch.where(a >= 2.375, a / 32 + 27 / 32, torch.where(a >= 1.0, a / 8 + 5 / 8, a / 4 + 0.5)),
    )
    return torch.where(x < 0, 1.0 - y, y)


class PolyGELU(nn.Module):
    def __init__(self, bits: int = 8, d1: float = 1.0):
        super().__init__()
        self.bits, self.d1 = bits, d1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, d1={self.d1}"

    def forward(self, x):
        return poly_gelu(x, self.bits, self.d1)


class PWLSigmoid(nn.Module):
    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x):
        return pwl_sigmoid(x, self.bits)


class PolySoftmax(nn.Module):
    def __init__(self, dim: int = -1, bits: int = 8, d2: float = 1.0):
        super().__init__()
        self.dim, self.bits, self.d2 = dim, bits, d2

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, d2={self.d2}"

    def forward(self, x):
        return poly_softmax(x, self.dim, self.bits, self.d2)


class PolyAttention(ProbsAttention):
    """An attention module whose softmax is :func:`poly_softmax`. It owns the original module's
    parameters under their names and answers its call convention (timm's ``attn(x,
    attn_mask=...)``, ``nn.MultiheadAttention``'s ``(q, k, v, need_weights=...)``), so it drops
    into the unchanged block of any layout :mod:`sliver.passes.transformer` knows."""

    def __init__(self, attn: nn.Module, bits: int, d2: float):
        super().__init__(attn)
        self.bits, self.d2 = bits, d2

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, bits={self.bits}, d2={self.d2}"

    def attention_probs(self, scores: torch.Tensor) -> torch.Tensor:
        return poly_softmax(scores, -1, self.bits, self.d2)


def approximation_errors(bits: int, d1: float = 1.0, points: int = 20001) -> dict:
    """Max and mean absolute error of each approximation over its operating range."""
    out = {}
    for name, (lo, hi) in RANGES.items():
        x = torch.linspace(lo, hi, points, dtype=torch.float64)
        if name == "gelu":
            approx, exact = poly_gelu(x, bits, d1), F.gelu(x)
        elif name == "exp":
            approx, exact = poly_exp(x, bits), torch.exp(x)
        else:
            approx, exact = pwl_sigmoid(x, bits), torch.sigmoid(x)
        err = (approx - exact).abs()
        out[name] = {"range": [lo, hi], "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())}
    return out


@dataclasses.dataclass
class PolyActOptions:
    bits: int = option(8, "fixed-point bits of each function's input (0: float)", ge=0, le=16, why="0 keeps float inputs")
    d1: float = option(1.0, "GELU erf factor (HeatViT trains with 0.5)", gt=0.0, le=1.0, why="d1 and d2 are scale factors")
    d2: float = option(1.0, "attention softmax scale (HeatViT trains with 0.5)", gt=0.0, le=1.0, why="d1 and d2 are scale factors")


@register
class PolyAct(Pass):
    name = "poly-act"
    level = "torch"
    summary = "GELU, softmax (exp) and sigmoid -> HeatViT's polynomial / piecewise-linear forms"
    provides = (POLY_ACT,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = PolyActOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        replaced = {"gelu": 0, "softmax": 0, "sigmoid": 0}
        for name, module in list(gm.named_modules()):
            if not name:
                continue
            if isinstance(module, nn.GELU):
                gm.set_submodule(name, PolyGELU(o.bits, o.d1))
                replaced["gelu"] += 1
            elif isinstance(module, nn.Sigmoid):
                gm.set_submodule(name, PWLSigmoid(o.bits))
                replaced["sigmoid"] += 1
            elif isinstance(module, nn.Softmax):
                gm.set_submodule(name, PolySoftmax(module.dim if module.dim is not None else -1, o.bits))
                replaced["softmax"] += 1
            elif (is_attention(module) and not isinstance(module, PolyAttention)
                  and any(layout.fits(module) for layout in ATTENTION_LAYOUTS)):
                gm.set_submodule(name, PolyAttention(module, o.bits, o.d2))
                replaced["softmax"] += 1
        for node in list(gm.graph.nodes):
            fn = _function_replacement(node, o)
            if fn is not None:
                kind, target, args, kwargs = fn
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(target, args, kwargs)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                replaced[kind] += 1
        ctx.record("replaced", replaced)
        ctx.record("errors", approximation_errors(o.bits, o.d1))
        program = retrace(program, gm)
        return program.with_facts(ROUNDING_FACT) if o.bits > 0 else program


def _function_replacement(node, o):
    """(kind, function, args, kwargs) for a functional GELU/sigmoid/softmax node, else None."""
    if node.op == "call_function" and node.target in (F.gelu,) and node.kwargs.get("approximate", "none") == "none":
        return "gelu", poly_gelu, (node.args[0], o.bits, o.d1), {}
    if (node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid)) or (
        node.op == "call_method" and node.target == "sigmoid"
    ):
        return "sigmoid", pwl_sigmoid, (node.args[0], o.bits), {}
    if (node.op == "call_function" and node.target in (F.softmax, torch.softmax)) or (
        node.op == "call_method" and node.target == "softmax"
    ):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else -1)
        return "softmax", poly_softmax, (node.args[0], dim, o.bits), {}
    return None


__all__ = ["PolyAct", "approximation_errors", "poly_gelu", "poly_exp", "poly_softmax", "pwl_sigmoid"]
