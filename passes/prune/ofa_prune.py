"""ofa-prune: a once-for-all cohort of channel-pruned networks for several (FLOPs budget, input
resolution) pairs (after OFARPruning, "Once-for-All Budgeted Pruning Considering Input
Resolution", arXiv 2012.00996).

1. Early structure search. The dense network is trained with L1 on its BN gammas (network
   slimming, as in :mod:`.adapruner`); after every epoch each pair's structure is fitted to its
   budget by the global-threshold bisection of :class:`.channels.WidthPlan`, at the pair's own
   resolution. The search stops when, for every pair, the cosine similarity between the 0/1
   channel masks of two successive epochs reaches ``stable`` (the paper's early-bird signal), or
   after ``search_epochs``.
2. Joint training. The pairs' sub-networks share the dense weights: a sub-network is the dense
   network with its pruned channels masked to zero after their BatchNorms (for coupled groups every
   BN of the group is masked, so this equals the sliced network exactly). Every step runs all
   pairs on the batch resized to their resolutions and sums their losses, the narrowest pairs
   distilled from the widest one's predictions (KL); ``train_epochs`` epochs.
3. The cohort. Each pair's sub-network is sliced into its own Program with a (1, C, r, r) example
   input, and its BN statistics are re-estimated on 256 training images at its resolution (the
   pairs shared running statistics during joint training; without this the 0.5@32 member of a
   tiny ResNet scored 18.6% on digits test, measured).

A pass returns one Program: ``ofa-prune`` returns the pair named by ``select`` (index into the
pairs, in budgets-major order), and puts the whole cohort in ``ctx.extra["ofa-prune"]`` as
``{(budget, resolution): Program}``; its report records every pair's MACs and resolution.
:func:`cohort` runs the pass through a pipeline and returns that mapping.

A budget is a fraction of the dense model's MACs at the program's own input resolution, so a
lower resolution leaves room for more channels (the paper's point); a pair whose resolution alone
meets the budget keeps every channel.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import propagate_shapes, retrace
from ...models.trainer import fit, source
from .adapruner import channel_importance, prunable_graph, recalibrate_bn, sparse_train
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, CHANNEL_PRUNED, QUANTIZED_POT
from .channels import ChannelGraph, WidthPlan, unit_scores


@dataclasses.dataclass
class OFAPruneOptions:
    budgets: tuple[float, ...] = option((0.5, 0.75), "MACs budgets, fractions of the dense model's at its own resolution", gt=0.0, le=1.0, nonempty=True)
    resolutions: tuple[int, ...] = option((), "input sizes (square); default: the program's own", ge=8, why="pixels")
    search_epochs: int = option(3, "most epochs of the structure search", ge=1)
    stable: float = option(0.99, "mask cosine similarity that ends the search", gt=0.0, le=1.0)
    sparsity: float = option(0.5, "L1 on BN gammas (proximal lr x sparsity)", ge=0.0)
    train_epochs: int = option(2, "epochs of joint sub-network training", ge=0)
    lr: float = option(1e-3, "learning rate", gt=0.0)
    batch_size: int = option(64, "batch size", ge=1)
    round_to: int = option(1, "channel counts rounded up to multiples of this", ge=1)
    select: int = option(0, "which pair the pass returns (budgets-major)", ge=0)


def _at_resolution(program: Program, size: int) -> Program:
    x = program.example_inputs[0]
    if x.ndim != 4:
        raise PassError(f"ofa-prune needs one NCHW image input, {program.name} has shape {x.shape}")
    if size == x.shape[-1] and size == x.shape[-2]:
        return program
    gm = copy.deepcopy(program.module)
    inputs = (np.zeros(x.shape[:2] + (size, size), np.float32),)
    propagate_shapes(gm, inputs)
    return program.replace(module=gm, example_inputs=inputs)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float), b.astype(float)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


class _MaskedBN:
    """Forward hooks multiplying each prunable group's BN outputs by the current pair's mask."""

    def __init__(self, gm, graph: ChannelGraph) -> None:
        self.gm, self.graph, self.mask, self.handles = gm, graph, None, []
        per_bn = {}
        for g in graph.groups:
            for target, channel in g.bns:
                per_bn.setdefault(target, []).append((g, channel))
        for target, parts in per_bn.items():
            self.handles.append(gm.get_submodule(target).register_forward_hook(self._hook(parts)))

    def _hook(self, parts):
        def hook(module, inputs, output):
            if self.mask is None:
                return output
            scale = torch.ones(output.shape[1])
            for g, channel in parts:
                scale[torch.as_tensor(channel)] = torch.from_numpy(self.mask[g.units].astype(np.float32))
            return output * scale.view(1, -1, *([1] * (output.dim() - 2)))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@register
class OFAPrune(Pass):
    name = "ofa-prune"
    level = "torch"
    summary = "once-for-all cohort of pruned networks for (FLOPs budget, resolution) pairs"
    provides = (CHANNEL_PRUNED,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = OFAPruneOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        base_size = int(program.example_inputs[0].shape[-1])
        resolutions = o.resolutions or (base_size,)
        pairs = [(b, r) for b in o.budgets for r in resolutions]
        if not 0 <= o.select < len(pairs):
            raise PassError(f"ofa-prune: select={o.select} but there are {len(pairs)} (budget, resolution) pairs")
        program = program.clone()
        gm = program.module
        graph = prunable_graph(self.name, program)
        if not all(g.bns for g in graph.groups):
            raise PassError("ofa-prune masks channels after their BatchNorms; every prunable group of "
                            f"{program.name} needs one (use adapruner for networks without BN)")
        train_set = ctx.training_data(self.name)
        dense = int(program.stats().macs)
        views = {r: _at_resolution(program.replace(module=gm), r) for r in resolutions}
        graphs = {r: ChannelGraph(views[r].module) for r in resolutions}
        fixed = {r: int(views[r].stats().macs) - graphs[r].macs(graphs[r].full_mask()) for r in resolutions}

        def structures():
            importance, _ = channel_importance(gm, graph)
            l1 = unit_scores(gm, graph, "l1-norm")
            masks = {}
            for b, r in pairs:
                g_r = graphs[r]
                dense_r = fixed[r] + g_r.macs(g_r.full_mask())
                plan = WidthPlan(g_r, importance, l1, importance, o.round_to, 1)
                if dense_r <= b * dense:
                    masks[(b, r)] = g_r.full_mask()
                else:
                    masks[(b, r)] = plan.fit(b * dense, fixed[r], dense_r, 1.0, what=f"budget {b} at {r}px").keep
            return masks

        search = {"previous": None, "masks": None, "epochs": 0}
        similarity = []

        def searched(epoch: int, loss: float) -> bool:  # after every sparse-training epoch
            masks = structures()
            search["epochs"], previous, search["previous"] = epoch + 1, search["previous"], masks
            if previous is None:
                return False
            sims = min(_cosine(previous[p], masks[p]) for p in pairs)
            similarity.append(round(sims, 4))
            return sims >= o.stable

        sparse_train(gm, graph, train_set, ctx, epochs=o.search_epochs, sparsity=o.sparsity, lr=o.lr,
                     batch_size=o.batch_size, end_epoch=searched)
        masks, epochs = search["previous"], search["epochs"]
        ctx.record("search_epochs", epochs)
        ctx.record("mask_similarity", similarity)
        if o.train_epochs:
            self._joint_train(gm, graph, masks, pairs, train_set, ctx)
        members, table = {}, {}
        for b, r in pairs:
            view = views[r]
            pruned = graphs[r].sliced(_with_weights(view.module, gm), masks[(b, r)])
            # the pairs shared BN running statistics while training; each member gets its own
            # (post-training BN calibration, as US-Nets/OFA do for sub-networks)
            images = train_set.images[: min(len(train_set), 256)]
            if images.shape[-1] != r:
                images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
            recalibrate_bn(pruned, images, o.batch_size)
            prog = retrace(view, pruned)
            members[(b, r)] = prog
            table[f"{b}@{r}"] = round(prog.stats().macs / dense, 4)
        ctx.record("macs_ratio", table)
        ctx.extra[self.name] = members
        return members[pairs[o.select]]

    def _joint_train(self, gm, graph, masks, pairs, train_set, ctx) -> list:
        """Every step runs all pairs (widest first) on the batch at their resolutions; the loss is
        the sum of their cross-entropies plus KL of each narrower pair to the widest one's
        (detached) predictions."""
        o = self.options
        hooks = _MaskedBN(gm, graph)
        widest = max(pairs, key=lambda p: (masks[p].sum(), p[1]))
        order = [widest] + [p for p in pairs if p != widest]

        def joint_loss(net, batch):
            loss, teacher = 0.0, None
            for pair in order:
                hooks.mask = masks[pair]
                x = batch.x if batch.x.shape[-1] == pair[1] else F.interpolate(
                    batch.x, size=(pair[1], pair[1]), mode="bilinear", align_corners=False)
                logits = net(x)
                loss = loss + F.cross_entropy(logits, batch.y)
                if teacher is None:
                    teacher = logits.detach().softmax(dim=-1)
                else:
                    loss = loss + F.kl_div(logits.log_softmax(dim=-1), teacher, reduction="batchmean")
            return loss

        try:
            return fit(gm, source(train_set, o.batch_size, seed=ctx.seed, phase="joint"),
                       torch.optim.AdamW(gm.parameters(), lr=o.lr, weight_decay=0.0), epochs=o.train_epochs,
                       what="joint training", phase="joint", loss=joint_loss, ctx=ctx)
        finally:
            hooks.remove()


def _with_weights(view_module, trained):
    """The view's graph (traced shapes at its resolution) carrying the trained weights."""
    module = copy.deepcopy(view_module)
    module.load_state_dict(trained.state_dict())
    return module


def cohort(program: Program, data, seed: int = 0, **options) -> dict:
    """Run ``ofa-prune`` with ``options`` through a pipeline; returns {(budget, resolution): Program}."""
    from ..infra.context import PassContext
    from ..infra.pipeline import Pipeline

    ctx = PassContext(data=data, seed=seed)
    Pipeline([OFAPrune(**options)]).run(program, ctx, check=False)
    return ctx.extra[OFAPrune.name]

