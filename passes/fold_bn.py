"""fold-bn: fold inference-mode BatchNorm into the convolution or linear layer before it.

For a BatchNorm with running mean mu, variance var, scale gamma, shift beta and epsilon eps after
a layer y = W x + b, the folded layer is W' = W * s, b' = (b - mu) * s + beta with
s = gamma / sqrt(var + eps) (per output channel). The BatchNorm node disappears. Folding happens
only where it is exact: the layer's output feeds nothing but the BatchNorm, the layer module is
called once, and for Linear + BatchNorm1d the features are the channel dimension (2-D input).
BatchNorms elsewhere (after a pooling, or inside a module kept whole) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..ir.program import Program
from ..ir.torch_level import retrace
from .infra.base import Pass, register
from .infra.facts import BN_FOLDED

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register
class FoldBN(Pass):
    name = "fold-bn"
    level = "torch"
    summary = "fold BatchNorm into the preceding conv/linear (exact, inference mode)"
    provides = (BN_FOLDED,)
    check_tolerance = 1e-5

    def run(self, program: Program, ctx) -> Program:
        program = program.clone()
        gm = program.module
        folded = len(fold_batchnorm(gm))
        ctx.record("folded", folded)
        return retrace(program, gm)


def fold_batchnorm(gm: torch.fx.GraphModule) -> dict:
    """Fold every inference BatchNorm of ``gm``'s graph into the conv/linear before it, in place.

    A pair is folded only when the layer is called once and feeds nothing but the BN, the BN is
    called once and has running statistics, and the channel counts agree. Returns layer name ->
    the BN's gamma (``weight``) for each folded pair (RAPQ weights its reconstruction by them).
    """
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    gammas = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BNS):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        if len(prev.users) != 1 or calls.get(prev.target, 0) != 1 or calls.get(node.target, 0) != 1:
            continue
        layer = gm.get_submodule(prev.target)
        bn = gm.get_submodule(node.target)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, _CONVS) and layer.out_channels == bn.num_features:
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        elif isinstance(layer, nn.Linear) and _is_2d(prev) and layer.out_features == bn.num_features:
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            continue
        gammas[prev.target] = bn.weight.detach().clone() if bn.weight is not None else torch.ones(bn.num_features)
        gm.set_submodule(prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    return gammas


def _is_2d(node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and len(getattr(meta, "shape", ())) == 2
