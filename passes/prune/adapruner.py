"""adapruner: channel pruning to a FLOPs budget by BN-scale bisection (Liu, Cao, Yao, Sun, Zhang,
"AdaPruner: Adaptive Channel Pruning and Effective Weights Inheritance", arXiv 2109.06397).

Steps, as in the paper, on the dependency-aware channel groups of :mod:`.channels`:

1. Sparse training (network slimming): ``sparse_epochs`` of cross-entropy + ``sparsity`` x the L1
   norm of the BN scales (gamma) of the prunable groups, on the context's training data.
2. Importance. The paper scores a block by the mean of its BN scaling factors. Here a *block* is
   a coupled channel group (e.g. every layer feeding one residual stage) and a channel's importance
   is the mean |gamma| over the group's BatchNorms, so a channel shared through residual adds is
   judged by all the layers that write it. A network without BatchNorm (VGG-16 of the zoo) has no
   gamma: there the importance is the per-layer-normalised L1 norm of the channel's filters (the
   report says which source was used). Ties are broken by that same normalised L1 norm.
3. Bisection: a global threshold drops every channel below it; each group keeps the count above it
   (at least ``min_channels``, rounded up to a multiple of ``round_to``). The threshold is bisected
   over the sorted importances (rank space, see :class:`.channels.WidthPlan`) until the MACs meet
   ``flops`` x the dense MACs from below, within ``tolerance`` (relative); at most
   ceil(log2(channels + 1)) + 1 MAC evaluations (15 for ResNet-50). An unreachable budget is an
   error that names the smallest reachable ratio.
4. Adaptive weight inheritance. The widths fix the structure; which channels of each group survive
   is decided by a criterion: ``l1-norm``, ``bn-scale``, ``geometric-median`` or ``random`` (see
   :func:`.channels.unit_scores`). With ``criterion=auto`` each candidate sub-network is built,
   its BN statistics re-estimated on ``proxy_images`` training images (adaptive BN, EagleEye,
   Li et al. ECCV 2020, the paper leaves the proxy open), and the one with the lowest
   cross-entropy on the validation split (or those training images when no ``val`` split is given)
   is kept.
5. Fine-tuning: ``finetune_epochs`` of AdamW (cosine learning rate) on cross-entropy plus
   ``distill`` x KL divergence to the dense model's predictions. The paper fine-tunes the
   sub-network to convergence; the default, 8 epochs, is where the fine-tuning loss levels off on
   the tiny digits models (tiny MobileNetV2 at 0.67 FLOPs: 0.400, 0.168, 0.122, 0.099, 0.089,
   0.089, 0.092, 0.087 per epoch; stopped at 4 it scored 96.39% against 97.22% at 8, dense 98.06%).
   The distillation runs at ``temperature`` T = 4 (Hinton et al., 2015: both softmaxes at T, the KL
   scaled by T^2 so its gradient keeps the size of T = 1's): on training images the dense model is
   confidently right, and at T = 1 its soft targets say little more than the labels; at T = 4 the
   student also learns how the teacher ranks the wrong classes. Same cost per step. Tiny MobileNetV2
   at 0.67 FLOPs (dense 98.06% test), over 1 and 2 threads and seeds 0, 1, 2: test 96.94, 97.78,
   97.22, 98.33% at T = 1 (mean 97.57, worst 1.11 points below dense) against 97.22, 97.78, 97.78,
   98.61% at T = 4 (mean 97.85, worst 0.83 below); validation mean 97.42% -> 97.91%.

The pruned program is a plain smaller network (sliced weights, no masks): it exports to ONNX and
builds with TVM as it is. ``flops`` counts MACs with sliver's convention (``sliver.ir.stats``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import retrace
from ...models.trainer import fine_tune, fit, frozen_copy, source
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, CHANNEL_PRUNED, QUANTIZED_POT
from .channels import ChannelGraph, WidthPlan, has_bn_everywhere, unit_scores

CRITERIA = ("l1-norm", "bn-scale", "geometric-median", "random")


@dataclasses.dataclass
class AdaPrunerOptions:
    flops: float = option(0.67, "MACs budget as a fraction of the dense model's", gt=0.0, le=1.0, why="a fraction of the dense MACs")
    tolerance: float = option(0.01, "allowed relative shortfall below the budget", gt=0.0, lt=1.0)
    round_to: int = option(1, "channel counts are rounded up to multiples of this", ge=1)
    min_channels: int = option(1, "fewest channels a group keeps", ge=1)
    criterion: Literal["auto", "l1-norm", "bn-scale", "geometric-median", "random"] = option("auto", "weight-inheritance criterion; auto picks by a proxy evaluation")
    sparse_epochs: int = option(1, "epochs of L1-on-gamma sparse training", ge=0)
    sparsity: float = option(0.5, "L1 coefficient on the BN gammas (proximal shrink lr x sparsity per step)", ge=0.0)
    finetune_epochs: int = option(8, "fine-tuning epochs after pruning", ge=0)
    lr: float = option(1e-3, "learning rate (sparse training and fine-tuning)", gt=0.0)
    batch_size: int = option(64, "training batch size", ge=1)
    distill: float = option(1.0, "weight of the KL loss to the dense model", ge=0.0)
    temperature: float = option(4.0, "softmax temperature of the distillation (KL scaled by its square)", gt=0.0)
    proxy_images: int = option(256, "images for BN re-estimation in the proxy", ge=1)


@register
class AdaPruner(Pass):
    name = "adapruner"
    level = "torch"
    summary = "channel pruning to a FLOPs budget: BN-scale bisection, adaptive weight inheritance, fine-tuning"
    provides = (CHANNEL_PRUNED,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = AdaPrunerOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        teacher = frozen_copy(gm)
        graph = prunable_graph(self.name, program)
        dense = int(program.stats().macs)
        fixed = dense - graph.macs(graph.full_mask())
        needs_data = o.sparse_epochs > 0 or o.finetune_epochs > 0 or o.criterion == "auto"
        train_set = ctx.training_data(self.name) if needs_data else None
        if o.sparse_epochs:
            sparse_train(gm, graph, train_set, ctx, epochs=o.sparse_epochs, sparsity=o.sparsity, lr=o.lr,
                         batch_size=o.batch_size)
        importance, source = channel_importance(gm, graph)
        tie_break = unit_scores(gm, graph, "l1-norm")
        candidates = list(candidate_criteria(graph)) if o.criterion == "auto" else [o.criterion]
        first = unit_scores(gm, graph, candidates[0], seed=ctx.seed)
        plan = WidthPlan(graph, importance, tie_break, first, o.round_to, o.min_channels)
        fit = plan.fit(o.flops * dense, fixed, dense, o.tolerance, what="flops budget")
        widths = fit.widths
        masks = {c: WidthPlan(graph, importance, tie_break, unit_scores(gm, graph, c, seed=ctx.seed),
                              o.round_to, o.min_channels).mask(widths=widths) for c in candidates}
        if len(candidates) > 1:
            proxy = {c: proxy_loss(graph.sliced(gm, m), ctx, train_set, o.proxy_images, o.batch_size)
                     for c, m in masks.items()}
            chosen = min(candidates, key=lambda c: (proxy[c], candidates.index(c)))
            ctx.record("proxy_loss", {c: round(v, 4) for c, v in proxy.items()})
        else:
            chosen = candidates[0]
        keep = masks[chosen]
        macs = fixed + graph.macs(keep)
        pruned = graph.sliced(gm, keep)
        if len(candidates) > 1:
            recalibrate_bn(pruned, _images(train_set, o.proxy_images), o.batch_size)
        if o.finetune_epochs:
            fine_tune(pruned, teacher, train_set, ctx, epochs=o.finetune_epochs, lr=o.lr, batch_size=o.batch_size,
                      distill=o.distill, temperature=o.temperature)
        pruned.eval()
        ctx.record("flops_ratio", round(macs / dense, 5))
        ctx.record("flops_evaluations", fit.evaluations)
        ctx.record("threshold", fit.threshold)
        if fit.skipped:
            ctx.record("held_groups", [graph.groups[g].name for g in fit.skipped])
        ctx.record("importance", source)
        ctx.record("criterion", chosen)
        ctx.record("channels", {g.name: int(w) for g, w in zip(graph.groups, widths)})
        return retrace(program, pruned)


# -- shared by the channel-pruning passes ------------------------------------------------------
def prunable_graph(pass_name: str, program: Program) -> ChannelGraph:
    graph = ChannelGraph(program.module)
    if not graph.groups:
        raise PassError(
            f"{pass_name}: {program.name} has no prunable channel group (needs Conv2d/Linear layers whose "
            f"channels reach no graph output unchanged); frozen: {'; '.join(sorted(graph.frozen)[:3])}")
    return graph


def candidate_criteria(graph: ChannelGraph) -> tuple:
    """The inheritance criteria that apply to this network (bn-scale only where every group has a BN)."""
    return tuple(c for c in CRITERIA if c != "bn-scale" or has_bn_everywhere(graph))


def channel_importance(gm, graph: ChannelGraph) -> tuple:
    """(importance per unit, source): mean |gamma| over each group's BNs; the per-layer-normalised
    filter L1 norm for groups without BN. Source counts the groups of each kind."""
    l1 = unit_scores(gm, graph, "l1-norm")
    importance = l1.copy()
    with_bn = 0
    for g in graph.groups:
        if g.bns:
            with_bn += 1
            importance[g.units] = np.mean(
                [gm.get_submodule(t).weight.detach().abs().double().numpy()[ch] for t, ch in g.bns], axis=0)
        else:
            importance[g.units] = l1[g.units] / max(len(g.members), 1)
    return importance, {"bn_gamma_groups": with_bn, "filter_l1_groups": len(graph.groups) - with_bn}


def _gammas(gm, graph: ChannelGraph) -> list:
    seen, out = set(), []
    for g in graph.groups:
        for target, _ in g.bns:
            if target not in seen:
                seen.add(target)
                out.append(gm.get_submodule(target).weight)
    return out


def sparse_train(gm, graph: ChannelGraph, train_set, ctx, *, epochs: int, sparsity: float, lr: float,
                 batch_size: int, end_epoch=None) -> list:
    """Network slimming (Liu et al., ICCV 2017): cross-entropy + ``sparsity`` x sum |gamma| over
    the BNs of the prunable groups. The L1 term is applied as its proximal step after each AdamW
    update (soft-thresholding every gamma by lr x sparsity), which drives unneeded gammas to exactly
    zero instead of oscillating around it. AdamW moves a weight by about lr per step, so sparsity
    near 1 balances the shrinkage against the task gradient of a short schedule (network slimming's
    1e-4 is meant for SGD over 160 epochs). ``end_epoch(epoch, loss)`` is called after every
    epoch; returning True stops the training (ofa-prune's early structure search)."""
    gammas = _gammas(gm, graph)
    if not gammas:
        return []
    hook = _Proximal(gammas, lr * sparsity, end_epoch)
    return fit(gm, source(train_set, batch_size, seed=ctx.seed), torch.optim.AdamW(gm.parameters(), lr=lr,
               weight_decay=0.0), epochs=epochs, what="sparse training", phase="sparse", hooks=[hook], ctx=ctx)


class _Proximal:
    """Trainer hook: soft-threshold the BN gammas by ``shrink`` after every step."""

    def __init__(self, gammas: list, shrink: float, end_epoch=None) -> None:
        self.gammas, self.shrink = gammas, shrink
        if end_epoch is not None:
            self.end_epoch = end_epoch

    def after_step(self) -> None:
        for g in self.gammas:
            g.copy_(g.sign() * (g.abs() - self.shrink).clamp_min(0))


def _images(train_set, count: int) -> torch.Tensor:
    return train_set.images[: min(count, len(train_set))]


@torch.no_grad()
def recalibrate_bn(module: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Re-estimate every BN's running statistics on ``images`` (cumulative average)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for start in range(0, len(images), batch_size):
        module(images[start:start + batch_size])
    module.eval()
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum


@torch.no_grad()
def proxy_loss(module: nn.Module, ctx, train_set, proxy_images: int, batch_size: int) -> float:
    """Cross-entropy of a candidate after adaptive BN, on the val split (or the proxy images)."""
    recalibrate_bn(module, _images(train_set, proxy_images), batch_size)
    data = ctx.data.get("val") if isinstance(ctx.data, dict) and ctx.data.get("val") is not None else None
    data = data if data is not None else train_set.take(proxy_images)
    total, count = 0.0, 0
    for images, labels in data.batches(256):
        total += F.cross_entropy(module(images), labels, reduction="sum").item()
        count += len(labels)
    return total / max(count, 1)


