"""rapq / pot-naive: power-of-two post-training quantisation (torch level).

RAPQ (Yao et al., IJCAI 2022, arXiv 2204.12322) restricts every scale to a power of two, so that
the deployed network needs only integer multiply-accumulates and shifts, and keeps accuracy by
choosing the exponents with the network in the loop rather than layer by layer from each layer's
own range. What this pass does, in order:

1. BatchNorm is folded into the convolution before it (exact); its scales ``gamma`` are kept as
   each output channel's importance in the reconstruction loss: a channel's squared error is
   divided by ``gamma_c^2``, i.e. measured in the normalised units the BN worked in. (RAPQ derives
   the exponent ``p`` of its ``|pred - target|^p`` loss from the block's BN statistics; the formula
   is not in the paper text we have, so sliver keeps ``p = 2`` and puts the BN statistics into the
   per-channel weights - documented choice.)
2. Every conv / linear becomes a :class:`~sliver.passes.qlayers.QLayer` (per-output-channel weight
   exponents, per-tensor input exponent, zero-points 0), attention's two activation matmuls become
   :class:`~sliver.passes.qlayers.QMatMul`, and an 8-bit quantiser is put on the model output. The
   first and the last layer get ``first_last_bits`` (8 by default, as in RAPQ); every activation
   of an attention sub-block (its input into ``qkv``, q, k, the softmax probabilities, v, and the
   heads' output into ``proj``) gets ``attn_bits`` (8 by default; weights keep ``wbits``): on the
   tiny DeiT at W4A4 these quantisers hold most of the loss, the probabilities above all (README);
   ``layer_bits`` sets any layer's widths (mixed precision) and overrides both.
3. Calibration, layer by layer in execution order. The input of the layer being calibrated comes
   from the network whose earlier layers are already quantised, and the target is the float
   network's output of that layer, so each choice compensates the error upstream (the
   network-level adjustment of RAPQ, done greedily in execution order). Token stages (top-k
   selection, e.g. after ``evit``) keep the float network's tokens on the same images while the
   layers are fitted (:class:`~sliver.passes.transformer.SelectionReplay`): the quantised
   network's scores differ slightly, its kept tokens come in another order, and a layer fitted
   to another token's target is fitted to noise (on the trained tiny DeiT after
   ``evit{blocks=3,6,9 keep=0.6}``, W4A4, one thread: 88.6% without, 91.4% with; evit alone 93.3%):

   - exponents initialised per layer at the minimum-MSE power of two (activations per tensor,
     weights per channel), then adjusted jointly: the input exponent over ``e0 - 1 .. e0 + 1`` and,
     for each, every channel's weight exponent over ``-1 / 0 / +1`` of its start, keeping the
     combination with the smallest BN-weighted output error. A smaller exponent clips less and
     rounds coarser; the output error decides the trade between rounding and clipping;
   - weight rounding learned (AdaRound-style, as RAPQ's official code does for its exponent
     rounding): a rectified-sigmoid up/down choice per weight, regularised towards 0/1 with an
     annealed exponent, then frozen. Everything ends as integers: exponents are Python ints /
     int64 tensors, weights int8 tensors, zero-points 0.

4. Optionally (``epochs`` > 0; sliver's addition, RAPQ itself is post-training), quantisation-aware
   fine-tuning with the exponents frozen: the float weights and biases are trained through the
   power-of-two grids with straight-through rounding (:func:`~sliver.passes.qlayers.trainable_weights`),
   on cross-entropy plus a KL term to the float model, and the integers re-derived at the end.

``pot-naive`` is the baseline: every exponent from its own tensor's range (the scale
``max|x| / qmax`` rounded to the nearest power of two), weights rounded to nearest.

The result runs the exact integer reference (:mod:`sliver.passes.quant`, exact mode) and exports
to standard QDQ ONNX; ``pot-shift`` turns that into an integer-only graph.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import is_attention, retrace
from ...models.trainer import fine_tune, frozen_copy
from ..infra.base import Pass, option, register
from ..infra.context import as_pass_data
from ..fold_bn import fold_batchnorm
from ..infra.facts import APPMUL, QUANTIZED_POT, ROUNDING_FACT
from ..transformer import SelectionReplay, TokenFusion
from .poly_act import PolyGELU
from ..qlayers import (
    PoTQuantizer,
    QGELU,
    QLayerNorm,
    QSoftmax,
    QTokenEmbed,
    QTokenFusion,
    nonlinear_modules,
    QConv2d,
    QLayer,
    QLinear,
    QMatMul,
    int_range,
    mse_exponent,
    nearest_exponent,
    quant_layers,
    quantize_pot,
    set_exact,
    trainable_weights,
)

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)


def _bits_option(value, name: str = "bit widths") -> None:
    if not 2 <= value <= 8:
        raise ValueError(f"{name} must be 2..8, got {value}; use e.g. wbits=4 abits=4")


@dataclasses.dataclass
class NaiveOptions:
    """Options of ``pot-naive``; ``rapq`` has the same ones plus ``iters``."""

    wbits: int = option(4, "weight bits (2..8), per output channel")
    abits: int = option(4, "activation bits (2..8), per tensor")
    first_last_bits: int = option(8, "bits of the first and last layer (weights and inputs); 0: same as the rest")
    layer_bits: tuple[str, ...] = option((), "per-layer widths name:wbits:abits, comma-separated (mixed precision)")
    calib_images: int = option(128, "calibration images taken from the data", ge=1)
    attn_bits: int = option(8, "activation bits of attention (inputs of qkv and proj, q, k, "
                            "softmax output, v); 0: abits")
    int_nonlinear: bool = option(True, "ViTs: LayerNorm, softmax, GELU, class token and position embedding on "
                                 "integers (I-BERT), so that pot-shift can make the model integer-only")

    iters = 0  # pot-naive rounds to nearest (not an option)
    epochs = 0  # nor fine-tunes

    def validate(self) -> None:
        # every width is checked by one rule (also the widths inside layer_bits); first_last_bits
        # and attn_bits may also be 0 (= the default width), which no single bound can say
        _bits_option(self.wbits)
        _bits_option(self.abits)
        for name in ("first_last_bits", "attn_bits"):
            if getattr(self, name):
                _bits_option(getattr(self, name), f"{name} (0 or a width)")
        for item in self.layer_bits:
            parts = item.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                raise ValueError(f"layer_bits item {item!r} is not name:wbits:abits (e.g. layer1.0.conv1:2:4)")
            _bits_option(int(parts[1]))
            _bits_option(int(parts[2]))


@dataclasses.dataclass
class RAPQOptions(NaiveOptions):
    iters: int = option(100, "weight-rounding steps per layer (0: nearest)", ge=0)
    epochs: int = option(0, "quantisation-aware fine-tuning epochs after calibration (labelled training data): "
                         "the float weights and biases trained through the frozen power-of-two grids with "
                         "straight-through rounding, distilled from the float model; 0: post-training only", ge=0)
    lr: float = option(3e-4, "learning rate of those epochs (AdamW, cosine to 0)", gt=0.0)
    distill: float = option(0.5, "weight of the KL term to the float model in those epochs", ge=0.0)
    batch_size: int = option(64, "batch size of those epochs", ge=1)


# ------------------------------------------------------------------------------------------------
# model preparation


class QAttention(nn.Module):
    """sliver's/timm's attention with quantised activation matmuls (same parameters)."""

    def __init__(self, attn: nn.Module, abits: int):
        super().__init__()
        self.num_heads = attn.num_heads
        # timm's / the zoo's attention carry head_dim and scale; poly-act's PolyAttention (and
        # other wrappers) may not: both follow from the qkv width
        self.head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * attn.num_heads)
        self.scale = getattr(attn, "scale", None) or self.head_dim ** -0.5
        self.qkv, self.proj = attn.qkv, attn.proj
        self.qk = QMatMul(abits)
        self.av = QMatMul(abits, signed_a=False)
        # float softmax until calibrated (int_nonlinear). I-BERT's i-exp is the polynomial of
        # poly-act's softmax (the same constants), so a PolyAttention becomes this integer softmax;
        # its d2 = 2^-k scales the probabilities, i.e. adds k to their exponent (exact)
        try:
            self.softmax = QSoftmax(out_scale=getattr(attn, "d2", 1.0))
        except ValueError as e:
            raise PassError(f"rapq: {e}") from None

    # the protocol of sliver.passes.transformer.attention_parts: a block that computes attention
    # itself (evit's) runs these quantised ops
    def score_product(self, q: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
        return self.qk(q, k_t)

    def attention_probs(self, scores: torch.Tensor) -> torch.Tensor:
        return self.softmax(scores)

    def context_product(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.av(probs, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = self.softmax(self.qk(q, k.transpose(-2, -1)))
        x = self.av(attn, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_modules(gm: torch.fx.GraphModule, abits: int, int_nonlinear: bool = False) -> None:
    """Swap attention, conv and linear modules for their quantised versions, in place; with
    ``int_nonlinear`` also LayerNorm, GELU and a ViT's class token / position embedding for their
    integer versions (:mod:`sliver.passes.quant`)."""
    if int_nonlinear:
        for name, m in list(gm.named_modules()):
            if isinstance(m, nn.LayerNorm):
                _set_module(gm, name, QLayerNorm(m))
            elif isinstance(m, nn.GELU):
                if getattr(m, "approximate", "none") != "none":
                    raise PassError(f"rapq: {name!r} is a tanh GELU; the integer GELU is the erf one")
                _set_module(gm, name, QGELU())
            elif isinstance(m, PolyGELU):
                # poly-act's GELU is I-BERT's i-GELU polynomial, the integer GELU's own (d1 = 1)
                if m.d1 != 1.0:
                    raise PassError(f"rapq: {name!r} is poly-act's GELU with d1={m.d1}; the integer GELU "
                                    "has d1=1: run poly-act{d1=1} before rapq")
                _set_module(gm, name, QGELU())
            elif isinstance(m, TokenFusion):
                # a token pass's selection: top-k on integer scores, integer gather and fused token
                _set_module(gm, name, QTokenFusion(m))
        _integer_token_embed(gm)
    for name, m in list(gm.named_modules()):
        if name and is_attention(m) and hasattr(m, "qkv") and hasattr(m, "proj") and not isinstance(m, QAttention):
            _set_module(gm, name, QAttention(m, abits))
    for name, m in list(gm.named_modules()):
        if isinstance(m, nn.Conv2d):
            _set_module(gm, name, QConv2d(m))
        elif isinstance(m, nn.Linear):
            _set_module(gm, name, QLinear(m))
    for name, m in gm.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            raise PassError(f"rapq: layer {name!r} ({type(m).__name__}) has no power-of-two quantised version; "
                            "only Conv2d, Linear and attention matmuls are quantised")


def _integer_token_embed(gm: torch.fx.GraphModule) -> None:
    """``cat((cls_token.expand(B, -1, -1), x), 1) + pos_embed`` -> ``QTokenEmbed`` (in place)."""
    import operator

    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target is not operator.add or len(add.args) != 2:
            continue
        cat, pos = add.args
        if not (isinstance(pos, torch.fx.Node) and pos.op == "get_attr" and isinstance(cat, torch.fx.Node)
                and cat.op == "call_function" and cat.target is torch.cat and len(cat.users) == 1):
            continue
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if len(parts) != 2 or dim != 1 or parts[0].op != "call_method" or parts[0].target != "expand":
            continue
        cls = parts[0].args[0]
        if not (isinstance(cls, torch.fx.Node) and cls.op == "get_attr"):
            continue
        name = "token_embed"
        gm.add_submodule(name, QTokenEmbed(gm.get_parameter(cls.target), gm.get_parameter(pos.target)))
        with gm.graph.inserting_before(add):
            node = gm.graph.call_module(name, (parts[1],))
        add.replace_all_uses_with(node)
        gm.graph.erase_node(add)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return


def add_output_quantizer(gm: torch.fx.GraphModule) -> PoTQuantizer:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if not isinstance(value, torch.fx.Node):
        raise PassError("rapq: the model must return one tensor")
    quantizer = PoTQuantizer(8, True)
    gm.add_submodule("output_quantizer", quantizer)
    with gm.graph.inserting_before(output):
        node = gm.graph.call_module("output_quantizer", (value,))
    output.args = (node,)
    return quantizer


# ------------------------------------------------------------------------------------------------
# calibration helpers


class _Stop(Exception):
    pass


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, batch: int = 64, want_output: bool = False):
    """Run ``model`` on ``x`` and return the inputs (tuple) given to ``module`` (and its output)."""
    got_in, got_out = [], []

    def hook(mod, args, out):
        got_in.append(tuple(a.detach() for a in args))
        got_out.append(out.detach())
        if not want_output:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                try:
                    model(x[i:i + batch])
                except _Stop:
                    pass
    finally:
        handle.remove()
    inputs = tuple(torch.cat([g[k] for g in got_in]) for k in range(len(got_in[0])))
    return inputs, torch.cat(got_out)


def _run_hooked(model: nn.Module, modules: list, x: torch.Tensor, batch: int, on_output) -> None:
    """Run ``model`` over ``x`` in batches, calling ``on_output(k, args, out)`` after every
    forward of ``modules[k]``; the hooks are removed afterwards whatever happens."""
    handles = [m.register_forward_hook(lambda mod, args, out, k=k: on_output(k, args, out))
               for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()


def _capture_all(model: nn.Module, modules: list, x: torch.Tensor, batch: int = 64) -> list:
    """(input minima per argument, output) of every module in ``modules`` from one run of ``model``."""
    got = [([], []) for _ in modules]

    def keep(k, args, out):
        got[k][0].append(tuple(a.detach() for a in args))
        got[k][1].append(out.detach())

    _run_hooked(model, modules, x, batch, keep)
    result = []
    for ins, outs in got:
        minima = tuple(torch.stack([g[a].min() for g in ins]) for a in range(len(ins[0])))
        result.append((minima, torch.cat(outs)))
    return result


def _capture_full(model: nn.Module, modules: list, x: torch.Tensor, batch: int = 64) -> list:
    """(max |input|, max |output|) of every module in ``modules`` (one-argument modules) from
    one run of ``model``, as 0-d tensors (what the range calibration needs)."""
    got = [[[], 0.0] for _ in modules]

    def widen(k, args, out):
        seen = [float(a.detach().abs().max()) for a in args if isinstance(a, torch.Tensor)]
        got[k][0] = [max(a, b) for a, b in zip(got[k][0], seen)] if got[k][0] else seen
        got[k][1] = max(got[k][1], float(out.detach().abs().max()))

    _run_hooked(model, modules, x, batch, widen)
    return [([torch.tensor(a) for a in ins] if ins else [torch.tensor(0.0)], torch.tensor(b)) for ins, b in got]


def _execution_order(model: nn.Module, x: torch.Tensor) -> list:
    order, handles = [], []
    for name, m in quant_layers(model):
        handles.append(m.register_forward_hook(lambda mod, a, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    seen = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return seen


def _channel_loss(pred: torch.Tensor, target: torch.Tensor, axis: int, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per output channel (channels on ``axis``), times the channel weights."""
    err = (pred - target) ** 2
    dims = [d for d in range(err.dim()) if d != axis % err.dim()]
    per = err.mean(dim=dims)
    return per if weight is None else per * weight


#: output positions (im2col rows) a layer is reconstructed on
ROWS = 2048


def _rows(layer: QLayer, x: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """The layer as a matrix product: im2col rows of its input ``x``, or rows of its output ``out``
    (one row per output position, channels last)."""
    if isinstance(layer, QConv2d):
        if out is not None:
            return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    t = out if out is not None else x
    return t.reshape(-1, t.shape[-1])


def _rows_op(layer: QLayer, patches: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """The layer's output rows from its im2col rows (grouped convolutions per group)."""
    if isinstance(layer, QConv2d) and layer.groups > 1:
        g = layer.groups
        out = torch.einsum("rgk,gok->rgo", patches.reshape(len(patches), g, -1), w.reshape(g, w.shape[0] // g, -1))
        out = out.reshape(len(patches), -1)
    else:
        out = patches @ w.reshape(w.shape[0], -1).t()
    return out if bias is None else out + bias


def _weight_exponents_mse(w: torch.Tensor, bits: int, span: int = 2) -> torch.Tensor:
    """Per output channel, the exponent minimising the weight quantisation MSE."""
    flat = w.reshape(w.shape[0], -1)
    start = torch.tensor([nearest_exponent(float(m), bits, True) for m in flat.abs().amax(1)], dtype=torch.int64)
    best = start.clone()
    best_err = torch.full((w.shape[0],), float("inf"))
    for d in range(-span, span + 1):
        e = (start + d).to(flat.dtype)[:, None]
        err = ((quantize_pot(flat, e, bits, True) * torch.pow(2.0, -e) - flat) ** 2).sum(1)
        better = err < best_err
        best[better], best_err[better] = start[better] + d, err[better]
    return best


def _nearest_weights(w: torch.Tensor, exponent: torch.Tensor, bits: int) -> torch.Tensor:
    e = exponent.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
    return quantize_pot(w, e, bits, True)


# ------------------------------------------------------------------------------------------------
# the passes


@register
class RAPQ(Pass):
    name = "rapq"
    level = "torch"
    summary = "power-of-two post-training quantisation (RAPQ): integer exponents, learned rounding"
    provides = (QUANTIZED_POT, ROUNDING_FACT)
    refuses = {APPMUL: ""}
    check_tolerance = None
    Options = RAPQOptions
    method = "rapq"

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        torch.set_num_threads(min(2, torch.get_num_threads()))
        data = ctx.data
        if isinstance(data, dict):
            data = data.get("calib", data.get("train"))
        if data is None:
            raise PassError(f"pass {self.name!r} calibrates and needs data: run the pipeline with "
                            "data=sliver.models.data.calibration('digits') (or --data digits)")
        if isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
            x = torch.as_tensor(data)
        else:  # sliver's sets and any torch Dataset; [:] reads images streamed from disk
            data = as_pass_data(data)
            x = data.take(min(o.calib_images, len(data))).images[:]
        x = torch.as_tensor(x).float()
        shape = tuple(program.example_inputs[0].shape[1:])
        if tuple(x.shape[1:]) != shape:
            raise PassError(f"pass {self.name!r}: calibration images are {tuple(x.shape[1:])} but the model takes "
                            f"{shape}; give calibration data of the model's input size")
        train_set = self._training_set(ctx) if o.epochs else None
        t0 = time.perf_counter()
        program = program.clone()
        gm = program.module
        teacher = frozen_copy(gm) if train_set is not None else None
        gammas = fold_batchnorm(gm)
        gm.recompile()
        quantize_modules(gm, o.abits, o.int_nonlinear)
        out_quant = add_output_quantizer(gm)
        gm.recompile()
        gm.eval()
        layers = dict(quant_layers(gm))
        order = _execution_order(gm, x)
        self._assign_bits(gm, layers, order)
        fed_by_input = self._fed_by_input(gm)
        for name in fed_by_input:
            if isinstance(layers[name], QLayer):
                layers[name].input_quantizer.half_even = True
        for name, gamma in gammas.items():
            layers[name].channel_weight.copy_(1.0 / (gamma.abs() + 1e-3) ** 2)

        # float targets of every layer, from the float network (nothing quantised yet), in one run
        out_quant.enabled = False
        replay = SelectionReplay(gm)  # token stages keep the float network's tokens while layers are fitted
        with replay.recording():
            targets = _capture_all(gm, [layers[n] for n in order], x)
        for name, (inputs, _) in zip(order, targets):
            if isinstance(layers[name], QLayer):
                layers[name].input_quantizer.signed = bool(inputs[0].min() < 0)
            else:
                layers[name].quantizer_a.signed = bool(inputs[0].min() < 0)
                layers[name].quantizer_b.signed = bool(inputs[1].min() < 0)
        targets = {name: out for name, (_, out) in zip(order, targets)}
        # the integer non-linearities: 16-bit exponents from the float network's ranges. They stay
        # in float while the layers are calibrated (their 16-bit integer versions differ from float
        # by ~1e-3, GELU by up to 0.018, far below the 4/8-bit layer errors being compensated; in
        # integers they made the per-layer calibration 10x slower: 311 s vs 22 s on tiny_deit W4A4,
        # measured) and are switched to integers before the output quantiser is calibrated
        nonlinear = nonlinear_modules(gm) if o.int_nonlinear else []
        for (name, m), (ins, outs) in zip(nonlinear, _capture_full(gm, [m for _, m in nonlinear], x)):
            if isinstance(m, QTokenFusion):
                m.calibrate(*ins[:2])  # token and score ranges
            else:
                m.calibrate(ins[0], outs)
            m.quantized = False
        total_err = 0.0
        for name in ctx.progress(order, desc="calibrating layers"):
            layer = layers[name]
            with replay.replaying():
                inputs, _ = _capture(gm, layer, x)
            if isinstance(layer, QLayer):
                total_err += self._calibrate_layer(layer, inputs[0], targets[name])
            else:
                self._calibrate_matmul(layer, inputs, targets[name])
        for _, m in nonlinear:
            m.quantized = True
        with torch.no_grad():
            final = torch.cat([gm(x[i:i + 64]) for i in range(0, len(x), 64)])
        out_quant.enabled = True
        out_quant.exponent = (nearest_exponent(float(final.abs().max()), 8, True) if self.method == "naive"
                              else mse_exponent(final, 8, True))
        set_exact(gm, True)
        seconds = time.perf_counter() - t0
        ctx.record("layers", len(order))
        ctx.record("calibration_seconds", round(seconds, 2))
        if train_set is not None:
            t0 = time.perf_counter()
            with trainable_weights(gm) as params:
                fine_tune(gm, teacher, train_set, ctx, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                          distill=o.distill, params=params, phase="quantisation-aware",
                          what="rapq quantisation-aware fine-tuning")
            ctx.record("fine_tuning_seconds", round(time.perf_counter() - t0, 2))
        ctx.record("bits", {n: ([layers[n].wbits, layers[n].abits] if isinstance(layers[n], QLayer)
                                else [layers[n].quantizer_b.bits, layers[n].quantizer_a.bits]) for n in order})
        return retrace(program, gm)

    # -- setup ------------------------------------------------------------------------------
    def _assign_bits(self, gm, layers: dict, order: list) -> None:
        o = self.options
        per_layer = {}
        for item in o.layer_bits:
            name, w, a = item.split(":")
            if name not in layers:
                raise PassError(f"pass {self.name!r}: layer_bits names {name!r}, which is not a quantised layer; "
                                f"layers: {', '.join(order)}")
            per_layer[name] = (int(w), int(a))
        weighted = [n for n in order if isinstance(layers[n], QLayer)]
        ends = {weighted[0], weighted[-1]} if weighted and o.first_last_bits else set()
        for name in order:
            m = layers[name]
            w, a = per_layer.get(name, (o.first_last_bits, o.first_last_bits) if name in ends else (o.wbits, o.abits))
            m.abits = a
            if isinstance(m, QLayer):
                m.wbits = w
                m.input_quantizer.bits = a
            else:
                m.quantizer_a.bits = m.quantizer_b.bits = a
        # every activation of the attention sub-block (the LayerNorm output into qkv, q, k, the
        # softmax probabilities, v, and the heads' output that proj reads) gets its own width:
        # measured on tiny_deit W4A4 (README) they hold most of the loss - above all the
        # probabilities, which are in [0, 1] and mostly near 0, where a 4-bit power-of-two grid
        # (steps of 1/16 at best) sets them to zero. Weights keep wbits. layer_bits overrides.
        if o.attn_bits:
            for name, m in gm.named_modules():
                if isinstance(m, QAttention):
                    for leaf, part in (("qk", m.qk), ("av", m.av)):
                        if f"{name}.{leaf}" not in per_layer:
                            part.abits = part.quantizer_a.bits = part.quantizer_b.bits = o.attn_bits
                    for leaf in ("qkv", "proj"):
                        if f"{name}.{leaf}" not in per_layer and f"{name}.{leaf}" not in ends:
                            lin = getattr(m, leaf)
                            lin.abits = lin.input_quantizer.bits = o.attn_bits
        # a token selector's own layers (heatvit's selector MLP: a module with ``keep_scores`` and a
        # token-fusion stage) decide which tokens every later block sees: a wrong choice is not a
        # small error that later layers compensate. At 4 bits its two keep logits resolve a few
        # grid steps, so keep scores tie and top-k falls back to the token order. Like attention's
        # activations, its weights and activations get attn_bits (it is a few hundred MACs per
        # token); layer_bits overrides.
        if o.attn_bits:
            for name, m in gm.named_modules():
                if hasattr(m, "keep_scores") and any(isinstance(c, QTokenFusion) for c in m.children()):
                    for sub, layer in m.named_modules():
                        full = f"{name}.{sub}"
                        if isinstance(layer, QLayer) and full not in per_layer and full not in ends:
                            layer.wbits = layer.abits = layer.input_quantizer.bits = max(o.attn_bits, layer.wbits)

    def _training_set(self, ctx):
        data = ctx.training_data(self.name)
        if getattr(data, "targets", None) is None:
            raise PassError(f"pass {self.name!r}: epochs={self.options.epochs} fine-tunes on labelled data; give "
                            "data with labels (e.g. --data digits) or set epochs=0")
        return data

    @staticmethod
    def _fed_by_input(gm) -> set:
        names = set()
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.args and isinstance(node.args[0], torch.fx.Node):
                if node.args[0].op == "placeholder" and isinstance(gm.get_submodule(node.target), QLayer):
                    names.add(node.target)
        return names

    # -- per layer --------------------------------------------------------------------------
    def _calibrate_layer(self, layer: QLayer, x: torch.Tensor, target: torch.Tensor) -> float:
        q = layer.input_quantizer
        w = layer.weight.detach()
        weight = layer.channel_weight
        if self.method == "naive":
            q.exponent = nearest_exponent(float(x.abs().max()), q.bits, q.signed)
            flat = w.reshape(w.shape[0], -1).abs().amax(1)
            we = torch.tensor([nearest_exponent(float(m), layer.wbits, True) for m in flat], dtype=torch.int64)
            layer.set_weights(we, _nearest_weights(w, we, layer.wbits))
            return 0.0
        # the layer as a matrix product on a fixed sample of output positions (im2col rows)
        gen = torch.Generator().manual_seed(0)
        rows_t = _rows(layer, None, target)
        pick = torch.randperm(rows_t.shape[0], generator=gen)[:ROWS]
        rows_t = rows_t[pick]
        e0 = mse_exponent(x, q.bits, q.signed)
        w0 = _weight_exponents_mse(w, layer.wbits)
        best = None
        with torch.no_grad():
            for ea in (e0 - 1, e0, e0 + 1):
                q.exponent = ea
                patches = _rows(layer, q(x), None)[pick]
                losses, options = [], []
                for d in (-1, 0, 1):
                    we = w0 + d
                    layer.set_weights(we, _nearest_weights(w, we, layer.wbits))
                    pred = _rows_op(layer, patches, layer.weight_dequantized(), layer.bias_dequantized())
                    losses.append(_channel_loss(pred, rows_t, -1, weight))
                    options.append(we)
                losses = torch.stack(losses)  # (3, channels)
                choice = losses.argmin(0)
                total = float(losses.gather(0, choice[None]).sum())
                if best is None or total < best[0]:
                    we = torch.stack(options).gather(0, choice[None])[0]
                    best = (total, ea, we, patches)
        _, ea, we, patches = best
        q.exponent = ea
        layer.set_weights(we, _nearest_weights(w, we, layer.wbits))
        if self.options.iters > 0:
            self._learn_rounding(layer, patches, rows_t, weight)
        return best[0]

    def _learn_rounding(self, layer: QLayer, patches: torch.Tensor, target: torch.Tensor, weight) -> None:
        """AdaRound-style learned up/down rounding of the weights at fixed integer exponents
        (Nagel et al., ICML 2020: rectified sigmoid, regulariser 1 - |2h - 1|^beta with beta
        annealed from 20 to 2 after a 20% warm-up), on the layer's im2col rows."""
        iters = self.options.iters
        w = layer.weight.detach()
        e = layer.weight_exponent.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
        scale = torch.pow(2.0, -e)
        lo, hi = int_range(layer.wbits, True)
        scaled = w / scale
        floor = torch.floor(scaled)
        rest = (scaled - floor).clamp(0.01, 0.99)
        v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        opt = torch.optim.Adam([v], lr=1e-2)
        bias = layer.bias_dequantized()
        gen = torch.Generator().manual_seed(1)
        batch = min(512, len(patches))
        with torch.no_grad():
            start = float(_channel_loss(_rows_op(layer, patches, layer.weight_dequantized(), bias), target, -1,
                                        weight).mean())
        lam = 0.01 * max(start, 1e-12)
        warm = int(0.2 * iters)
        for it in range(iters):
            idx = torch.randint(0, len(patches), (batch,), generator=gen)
            h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
            wq = torch.clamp(floor + h, lo, hi) * scale
            loss = _channel_loss(_rows_op(layer, patches[idx], wq, bias), target[idx], -1, weight).mean()
            if it >= warm:
                beta = 20 - (20 - 2) * (it - warm) / max(1, iters - warm)
                loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            learned = torch.clamp(floor + (v >= 0).to(w.dtype), lo, hi)
            cand_loss = float(_channel_loss(_rows_op(layer, patches, learned * scale, bias), target, -1, weight).mean())
            if cand_loss <= start:  # keep nearest rounding where learning did not help
                layer.set_weights(layer.weight_exponent.clone(), learned)

    def _calibrate_matmul(self, layer: QMatMul, inputs, target) -> None:
        a, b = inputs
        qa, qb = layer.quantizer_a, layer.quantizer_b
        layer.quantized = True
        if self.method == "naive":
            qa.exponent = nearest_exponent(float(a.abs().max()), qa.bits, qa.signed)
            qb.exponent = nearest_exponent(float(b.abs().max()), qb.bits, qb.signed)
            return
        ea0, eb0 = mse_exponent(a, qa.bits, qa.signed), mse_exponent(b, qb.bits, qb.signed)
        best = None
        with torch.no_grad():
            for ea in (ea0 - 1, ea0, ea0 + 1):
                for eb in (eb0 - 1, eb0, eb0 + 1):
                    qa.exponent, qb.exponent = ea, eb
                    err = float(((qa(a) @ qb(b) - target) ** 2).mean())
                    if best is None or err < best[0]:
                        best = (err, ea, eb)
        qa.exponent, qb.exponent = best[1], best[2]


@register
class PotNaive(RAPQ):
    name = "pot-naive"
    summary = "power-of-two quantisation baseline: per-layer nearest exponents, nearest rounding"
    Options = NaiveOptions
    method = "naive"
