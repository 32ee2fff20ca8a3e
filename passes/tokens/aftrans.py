"""aftrans: attention-guided two-scale recognition of small details, after AFTrans (Zhang et al.,
"A Free Lunch from ViT: Adaptive Attention Multi-scale Fusion Transformer for Fine-grained Visual
Recognition", arXiv 2110.01240) and its closest published relative, RAMS-Trans (Hu et al., ACM MM
2021).

The pass turns a trained ViT classifier into a two-scale model that shares one encoder:

1. **global pass**: the encoder on the whole image;
2. **SACM** (selective attention collection): the attention probabilities of the global pass are
   collected across layers, filtered, and turned into one importance score per patch;
3. **region**: the patches whose score passes a threshold, reduced to the 8-connected component
   of the most important patch, give a square box on the image;
4. **crop and resize**: the box is cut out of the input and resized to the input size
   (``GridSample``, bilinear, static output shape);
5. **local pass**: the same encoder (same weights, same CLS token) on the crop;
6. **fusion**: the two passes' logits are averaged (weight ``local_weight`` on the local one);
7. **fine-tuning**: end to end, each scale with its own cross-entropy loss.

The box (top, left, bottom, right, in input pixels) is an output too with ``with_region=true``,
and :func:`regions` / :func:`draw` read it from any aftrans program for pictures
(``tools/compile.py --regions``).

What the sources fix, and what we chose where they leave it open (AFTrans's module details,
threshold, fusion and losses are not public):

- **Attention collection** (``collect``): ``rollout`` is RAMS-Trans's: per layer the head mean
  A, plus the identity for the residual path, rows renormalised, multiplied across the layers
  (R = Â_L ... Â_1); a patch's score is the CLS row of R. ``last`` reads the head-mean CLS row of
  the last collected layer alone (the ablation).
- **Adaptive filter** (``filter=adaptive``): AFTrans filters the attention weights "adaptively by
  the relative importance of the input patches". We read this as: in every collected layer, each
  query keeps only the keys it attends more than its own average (the entries of a row below the
  row's mean are zeroed) before the collection, and a patch is selected when its score exceeds
  ``ratio`` x the mean score of the image's patches (RAMS-Trans's rule; ratio 1.2 as there). Both
  thresholds follow each image's own attention. ``filter=fixed`` is the ablation: unfiltered
  attention and one constant threshold, a patch is selected when its score is at least
  ``threshold`` x the image's highest score.
- **Region, static**: RAMS-Trans crops the bounding box of the largest 8-connected component of
  the selected patches, which needs a data-dependent labelling. We keep the component that holds
  the most important patch instead (usually the largest one, and the one that matters), grown by
  a fixed number of dilation steps restricted to the selected patches (a flood fill; one step is
  a product with the grid's constant 8-neighbourhood matrix, clipped to 1: a MatMul, which every
  backend takes, where a 3x3 MaxPool on the tiny grid failed TVM's layout pass). Half the number
  of patches in steps reaches every patch of any component, so the result is exact. The
  box is then the min/max row and column of that component (masked ReduceMin/ReduceMax), widened by
  ``margin`` patches on each side, made square (side ``max(height, width, min_side patches)``,
  so the digit is not stretched) and moved inside the image. ``box=moments`` replaces the
  min/max by moments (our addition): centre at the score-weighted mean of the component's patch
  centres, side sqrt(12) x the weighted standard deviation (a uniformly covered square of side L
  has standard deviation L / sqrt(12)), so a boundary patch that holds little of the object and
  scores low shrinks the box by less than a whole patch. Everything is static: MatMul, Mul,
  Reduce* and elementwise arithmetic, then one GridSample; no gradient flows through the box.
- **Encoder sharing**: the local pass runs the traced model's own stem (patch embedding, CLS
  token, position embedding), blocks and head. RAMS-Trans gives the local pass a second CLS
  token; we keep one, so the pass needs nothing of the model but its traced graph and works on any
  layout the token passes accept.
- **Fusion**: logits, ``(1 - local_weight) * global + local_weight * local`` (0.5: the mean). The
  traced head stays whole, each scale remains a classifier of its own, and the fused logits are a
  convex combination of two trained ones.
- **Fine-tuning**: loss = CE(global) + CE(local) (RAMS-Trans trains each scale with its own
  cross-entropy), AdamW with a cosine learning rate over ``epochs`` (:func:`fine_tune`, one loop,
  also what the single-scale baseline uses).

Composition with the token passes: run them *before* aftrans (``evit{...}, aftrans{...}``); the
global and the local pass then both run the pruned blocks. SACM collects attention from the
blocks before the first one that changes the token count (notes ``collected``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...ir.errors import DataError, PassError, UnsupportedOpError
from ...ir.program import Program
from ...ir.torch_level import SliverTracer, retrace
from ..infra.base import Pass, option, register
from ..infra.facts import TOKEN_PRUNED, TWO_SCALE
from ..infra.pipeline import Instrument
from ...models.trainer import fine_tune as trainer_fine_tune
from ..transformer import block_with_probs, tokens_in, transformer_blocks, check_blocks
from .lvtp import patch_size_of


# -- SACM ---------------------------------------------------------------------------------------
class SACM(nn.Module):
    """Selective attention collection: attention probabilities of the collected layers ->
    the square box (B, 4) = (top, left, bottom, right) in input pixels (see the module docstring).

    A leaf of the trace (one ``call_module`` node), so that :func:`recording_regions` sees its box
    when the program runs in PyTorch; exported, it is plain static ONNX."""

    def __init__(self, grid: tuple, patch: int, image: tuple, collect: str, filter: str, ratio: float,
                 threshold: float, margin: float, min_side: float, steps: int, box: str = "extent"):
        super().__init__()
        self.grid, self.patch, self.image = tuple(grid), int(patch), tuple(image)
        self.box_rule = box
        self.collect, self.filter = collect, filter
        self.ratio, self.threshold = float(ratio), float(threshold)
        self.margin, self.min_side, self.steps = float(margin), float(min_side), int(steps)
        gh, gw = self.grid
        self.register_buffer("rows", torch.arange(gh, dtype=torch.float32).view(1, gh), persistent=False)
        self.register_buffer("cols", torch.arange(gw, dtype=torch.float32).view(1, gw), persistent=False)
        # 8-neighbourhood (and self) of the patch grid: one dilation step is a product with it
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
        self.register_buffer("adjacency", near.to(torch.float32), persistent=False)
        # one identity for every rollout layer (built per layer it exports as one constant each)
        self.register_buffer("eye", torch.eye(gh * gw + 1), persistent=False)

    def extra_repr(self) -> str:
        return (f"collect={self.collect}, filter={self.filter}, ratio={self.ratio}, threshold={self.threshold}, "
                f"margin={self.margin}, min_side={self.min_side}, steps={self.steps}, box={self.box_rule}")

    def _layer(self, probs: torch.Tensor) -> torch.Tensor:
        a = probs.mean(dim=1)  # (B, N, N): head mean
        if self.filter == "adaptive":
            a = a * (a >= a.mean(dim=-1, keepdim=True)).to(a.dtype)
        return a

    def scores(self, *probs: torch.Tensor) -> torch.Tensor:
        """Patch importance (B, gh * gw): the CLS row of the collected attention."""
        if self.collect == "last":
            return self._layer(probs[-1])[:, 0, 1:]
        rollout = None
        for p in probs:
            a = self._layer(p)
            a = a + self.eye
            a = a / a.sum(dim=-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        return rollout[:, 0, 1:]

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Selected patches (B, 1, gh, gw) in {0, 1}: the 8-connected component of the most
        important patch (ties: of all of them) among those that pass the threshold."""
        top = scores.amax(dim=1, keepdim=True)
        if self.filter == "adaptive":
            selected = scores > self.ratio * scores.mean(dim=1, keepdim=True)
        else:
            selected = scores >= self.threshold * top
        seed = (scores >= top).to(scores.dtype)
        # (ONNX's elementwise Max does not build with TVM 0.27 here: a sum clipped at 1 instead)
        selected = (selected.to(scores.dtype) + seed).clamp(max=1.0)
        component = seed
        for _ in range(self.steps):  # grow into the selected 8-neighbours, one ring per step
            component = (component @ self.adjacency).clamp(max=1.0) * selected
        gh, gw = self.grid
        return component.reshape(-1, 1, gh, gw)

    def box(self, component: torch.Tensor) -> torch.Tensor:
        """The square pixel box around a component (B, 1, gh, gw), inside the image."""
        big = 1e4
        row_any = component.amax(dim=3)[:, 0]  # (B, gh)
        col_any = component.amax(dim=2)[:, 0]  # (B, gw)
        r0 = (self.rows + big * (1 - row_any)).amin(dim=1)
        r1 = (self.rows - big * (1 - row_any)).amax(dim=1)
        c0 = (self.cols + big * (1 - col_any)).amin(dim=1)
        c1 = (self.cols - big * (1 - col_any)).amax(dim=1)
        p = float(self.patch)
        top, bottom = (r0 - self.margin) * p, (r1 + 1 + self.margin) * p
        left, right = (c0 - self.margin) * p, (c1 + 1 + self.margin) * p
        return self._square((top + bottom) / 2, (left + right) / 2, bottom - top, right - left)

    def moments_box(self, component: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The square pixel box from the score-weighted moments of a component: centre at the
        weighted mean of its patch centres, side sqrt(12) x the weighted standard deviation along
        the wider axis (each patch counted as a uniform spread of its own, variance p^2 / 12): the
        side of a uniformly covered square with the same spread, so boundary patches that hold
        little of the object (low scores) pull the side below the patch grid's steps. Then the
        margin, squaring and clamping of :meth:`box`."""
        gh, gw = self.grid
        p = float(self.patch)
        weight = scores.reshape(-1, 1, gh, gw) * component
        weight = weight / weight.sum(dim=(2, 3), keepdim=True)
        along_rows, along_cols = weight.sum(dim=3)[:, 0], weight.sum(dim=2)[:, 0]  # (B, gh), (B, gw)
        rows, cols = (self.rows + 0.5) * p, (self.cols + 0.5) * p
        cy, cx = (along_rows * rows).sum(dim=1), (along_cols * cols).sum(dim=1)
        var_r = (along_rows * (rows - cy[:, None]) ** 2).sum(dim=1) + p * p / 12
        var_c = (along_cols * (cols - cx[:, None]) ** 2).sum(dim=1) + p * p / 12
        pad = 2 * self.margin * p
        return self._square(cy, cx, (12 * var_r).sqrt() + pad, (12 * var_c).sqrt() + pad)

    def _square(self, cy, cx, height, width) -> torch.Tensor:
        """(B, 4) square of side max(height, width, min_side patches) centred at (cy, cx), moved
        inside the image."""
        h, w = self.image
        side = ((height + width + (height - width).abs()) / 2).clamp(min=self.min_side * float(self.patch),
                                                                    max=float(min(h, w)))
        cy = _between(cy, side / 2, h - side / 2)
        cx = _between(cx, side / 2, w - side / 2)
        return torch.stack([cy - side / 2, cx - side / 2, cy + side / 2, cx + side / 2], dim=1)

    def forward(self, *probs: torch.Tensor) -> torch.Tensor:
        scores = self.scores(*probs)
        component = self.mask(scores)
        box = self.moments_box(component, scores) if self.box_rule == "moments" else self.box(component)
        if _REGIONS is not None:
            _REGIONS.append(box.detach().clone())
        return box


def _between(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min(max(x, lo), hi) for tensor bounds, written with abs: a clamp to tensor bounds exports as
    ONNX's elementwise Max/Min, which TVM 0.27 fails to build here ("Invalid SLayout")."""
    x = (x + lo + (x - lo).abs()) / 2
    return (x + hi - (x - hi).abs()) / 2


def crop_resize(images: torch.Tensor, box: torch.Tensor, unit_h: torch.Tensor, unit_w: torch.Tensor) -> torch.Tensor:
    """Bilinear crop of ``box`` (B, 4: top, left, bottom, right in pixels) resized to the input
    size: one GridSample with a static (B, H, W, 2) grid. ``unit_h`` (H,) and ``unit_w`` (W,) are
    the output pixel centres in [0, 1): (i + 0.5) / size."""
    b, _, h, w = images.shape
    top, left, bottom, right = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]
    ys = (top + (bottom - top) * unit_h) * (2.0 / h) - 1.0  # (B, H), align_corners=False coords
    xs = (left + (right - left) * unit_w) * (2.0 / w) - 1.0  # (B, W)
    grid = torch.stack([xs.unsqueeze(1).expand(b, h, w), ys.unsqueeze(2).expand(b, h, w)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -- the two-scale model ------------------------------------------------------------------------
class TwoScaleViT(nn.Module):
    """Global pass, SACM, crop-and-resize, local pass through the same stem, blocks and tail;
    logits fused. ``scales(x)`` gives (global logits, local logits, box) for training."""

    def __init__(self, stem: nn.Module, blocks: list, tail: nn.Module, collected: list, sacm: SACM,
                 local_weight: float, with_region: bool):
        super().__init__()
        self.stem, self.tail, self.sacm = stem, tail, sacm
        self.blocks = nn.ModuleList(blocks)
        self.collected = tuple(collected)
        self.local_weight = float(local_weight)
        self.with_region = bool(with_region)
        h, w = sacm.image
        self.register_buffer("unit_h", (torch.arange(h, dtype=torch.float32) + 0.5) / h, persistent=False)
        self.register_buffer("unit_w", (torch.arange(w, dtype=torch.float32) + 0.5) / w, persistent=False)

    def scales(self, x: torch.Tensor):
        t = self.stem(x)
        probs = []
        for i, block in enumerate(self.blocks):
            if i in self.collected:
                t, p = block_with_probs(block, t)
                probs.append(p)
            else:
                t = block(t)
        global_logits = self.tail(t)
        box = self.sacm(*probs).detach()
        t = self.stem(crop_resize(x, box, self.unit_h, self.unit_w))
        for block in self.blocks:
            t = block(t)
        return global_logits, self.tail(t), box

    def forward(self, x: torch.Tensor):
        g, l, box = self.scales(x)
        logits = (1.0 - self.local_weight) * g + self.local_weight * l
        return (logits, box) if self.with_region else logits


def _subgraph(gm: torch.fx.GraphModule, inputs: dict, output: torch.fx.Node, what: str) -> torch.fx.GraphModule:
    """The part of ``gm`` that computes ``output`` from the ``inputs`` nodes (node -> new
    placeholder name), as a GraphModule sharing ``gm``'s modules and parameters."""
    graph = torch.fx.Graph()
    env = {node: graph.placeholder(name) for node, name in inputs.items()}
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed or node in env:
            continue
        if node.op == "placeholder":
            raise UnsupportedOpError(
                f"pass 'aftrans' cannot split the model: its {what} reads the input image directly; it needs "
                "a ViT classifier whose head reads only the last block's tokens")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[output])
    return torch.fx.GraphModule(gm, graph)


def _split(gm: torch.fx.GraphModule, blocks: list) -> tuple:
    """(stem, block modules, tail) of a ViT whose blocks form one chain."""
    for prev, node in zip(blocks, blocks[1:]):
        if node.args[:1] != (prev,) or len(prev.users) != 1:
            raise UnsupportedOpError(
                "pass 'aftrans' needs the transformer blocks to run one after the other on one token "
                f"stream, but {node.target} does not take {prev.target}'s output alone")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    if len(placeholders) != 1 or not isinstance(outputs, torch.fx.Node):
        raise UnsupportedOpError("pass 'aftrans' needs a model with one image input and one logits output")
    first = blocks[0].args[0]
    if not isinstance(first, torch.fx.Node) or len(blocks[0].args) != 1:
        raise UnsupportedOpError("pass 'aftrans' needs blocks that take one token tensor")
    stem = _subgraph(gm, {placeholders[0]: "x"}, first, "stem")
    tail = _subgraph(gm, {blocks[-1]: "tokens"}, outputs, "head")
    return stem, [gm.get_submodule(n.target) for n in blocks], tail


# -- fine-tuning --------------------------------------------------------------------------------
def scale_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(global) + CE(local) of a :class:`TwoScaleViT`; CE of the logits for any other model."""
    if isinstance(model, TwoScaleViT):
        g, l, _ = model.scales(images)
        return F.cross_entropy(g, labels) + F.cross_entropy(l, labels)
    return F.cross_entropy(model(images), labels)


def fine_tune(model: nn.Module, train_set, *, epochs: int, lr: float, batch_size: int, seed: int,
              weight_decay: float = 0.05, progress=None, ctx=None) -> list:
    """Fine-tune ``model`` on ``train_set`` with :func:`scale_loss`: AdamW, cosine learning rate
    from ``lr`` to 0 over all steps, batches shuffled by ``seed``; the ragged last batch is dropped.
    Returns the mean loss per epoch; the model is left in eval mode. Runs through the trainer
    (:func:`sliver.models.trainer.fine_tune`; with ``ctx``, the losses go to the report's ``train_loss``),
    shared by the pass and the single-scale baseline of the measurements."""
    if getattr(train_set, "task", "classification") != "classification":
        raise DataError(f"aftrans fine-tunes a classifier; {getattr(train_set, 'name', 'the data')} is not a "
                        "classification set (use --data small-digits or digits)")
    return trainer_fine_tune(model, None, train_set, ctx, epochs=epochs, lr=lr, batch_size=batch_size,
                             weight_decay=weight_decay, loss=lambda net, batch: scale_loss(net, batch.x, batch.y),
                             seed=seed, drop_last=True, progress=progress, what="aftrans fine-tuning")


# -- the pass -----------------------------------------------------------------------------------
@dataclasses.dataclass
class AFTransOptions:
    collect: Literal["rollout", "last"] = option(
        "rollout", "attention collection: rollout over the collected layers (RAMS-Trans) or the last layer's CLS row")
    filter: Literal["adaptive", "fixed"] = option(
        "adaptive", "adaptive: per-layer row-mean filter and score > ratio x mean; fixed: score >= threshold x max")
    layers: int = option(0, "collect the first `layers` blocks (0: every block before the first token-count change)", ge=0)
    ratio: float = option(1.2, "adaptive filter: a patch is selected when its score exceeds ratio x the mean", gt=0.0)
    threshold: float = option(0.5, "fixed filter: a patch is selected when its score is >= threshold x the highest",
                              gt=0.0, le=1.0)
    margin: float = option(0.0, "patches added around the selected component on each side", ge=0.0)
    min_side: float = option(2.0, "smallest crop side, in patches", ge=1.0)
    box: Literal["extent", "moments"] = option(
        "moments", "extent: the box of the component's patch rows and columns; moments: centre and side from the "
        "score-weighted mean and spread of its patches (finer than the patch grid)")
    local_weight: float = option(0.5, "fusion: weight of the local pass's logits (global gets 1 - it)", ge=0.0, le=1.0)
    with_region: bool = option(False, "also output the box (B, 4: top, left, bottom, right in pixels)")
    epochs: int = option(3, "end-to-end fine-tuning epochs over the training data (0: none)", ge=0)
    lr: float = option(3e-4, "fine-tuning learning rate (AdamW, cosine)", gt=0.0)
    batch_size: int = option(32, "fine-tuning batch size", ge=1)


@register
class AFTrans(Pass):
    name = "aftrans"
    level = "torch"
    summary = "AFTrans: SACM attention localisation, crop and a second pass of the same encoder, logits fused"
    provides = (TWO_SCALE,)
    Options = AFTransOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        if TWO_SCALE in program.facts:
            raise UnsupportedOpError("pass 'aftrans' runs once: the model is already two-scale")
        gm = program.clone().module
        blocks = transformer_blocks(gm)
        check_blocks(self.name, gm, [])
        out_meta = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        shape = getattr(getattr(out_meta, "meta", {}).get("tensor_meta"), "shape", None)
        if shape is None or len(shape) != 2:
            raise UnsupportedOpError(f"pass 'aftrans' needs a classifier with (B, classes) logits, got output shape "
                                     f"{tuple(shape) if shape is not None else '?'}")
        image_shape = tuple(int(d) for d in program.example_inputs[0].shape)
        grid_tokens = tokens_in(blocks[0]) - 1
        patch = patch_size_of(self.name, image_shape, grid_tokens)
        grid = (image_shape[2] // patch, image_shape[3] // patch)
        # the blocks SACM may read: those before the first that changes the token count
        full = 0
        for node in blocks:
            out = node.meta.get("tensor_meta")
            if tokens_in(node) != grid_tokens + 1 or out is None or int(out.shape[1]) != grid_tokens + 1:
                break
            full += 1
        if full == 0:
            raise UnsupportedOpError("pass 'aftrans' needs at least one block that keeps every token before pruning "
                                     "starts; run the token pass with later blocks")
        depth = min(o.layers, full) if o.layers else full
        if o.layers > full:
            raise PassError(f"pass 'aftrans': layers={o.layers} but only the first {full} blocks see every token; "
                            f"use layers<={full}")
        collected = list(range(depth)) if o.collect == "rollout" else [depth - 1]
        stem, modules, tail = _split(gm, blocks)
        steps = max(1, (grid[0] * grid[1] + 1) // 2)
        sacm = SACM(grid, patch, image_shape[2:], o.collect, o.filter, o.ratio, o.threshold, o.margin,
                    o.min_side, steps, o.box)
        model = TwoScaleViT(stem, modules, tail, collected, sacm, o.local_weight, o.with_region)
        self._check_collected(model, program)
        if o.epochs > 0:
            try:
                model.to(ctx.device)
                fine_tune(model, ctx.training_data(self.name), epochs=o.epochs, lr=o.lr,
                          batch_size=o.batch_size, seed=ctx.seed, ctx=ctx)
            finally:
                model.to("cpu")
        model.eval()
        graph = SliverTracer(leaf_modules=(SACM,)).trace(model)
        traced = torch.fx.GraphModule(model, graph, class_name="TwoScaleViT")
        out = retrace(program, traced)
        before = program.stats().macs
        after = out.stats().macs
        ctx.record("sacm", {"collect": o.collect, "filter": o.filter, "collected": collected, "grid": list(grid),
                            "patch": patch, "flood_steps": steps})
        ctx.record("macs", {"global": int(before), "second_pass": int(after - before), "total": int(after),
                            "second_pass_share": round((after - before) / max(before, 1), 4)})
        return out

    @staticmethod
    def _check_collected(model: TwoScaleViT, program: Program) -> None:
        """The collected blocks are recomputed with timm's block formula to read their attention;
        one-line error if a block computes something else (checked on the example input)."""
        x = torch.as_tensor(program.example_inputs[0])
        with torch.no_grad():
            t = model.stem(x)
            for i, block in enumerate(model.blocks):
                if i > max(model.collected):
                    break
                if i in model.collected:
                    mine, _ = block_with_probs(block, t)
                    theirs = block(t)
                    if tuple(mine.shape) != tuple(theirs.shape) or not torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4):
                        raise UnsupportedOpError(
                            f"pass 'aftrans' reads attention with timm's block formula, but block {i} "
                            f"({type(block).__name__}) computes something else; collect fewer layers (layers=N)")
                    t = theirs
                else:
                    t = block(t)


# -- regions: recording and pictures ------------------------------------------------------------
_REGIONS: list | None = None


@contextlib.contextmanager
def recording_regions():
    """Inside the ``with``, every box SACM computes is appended to the yielded list (B, 4)."""
    global _REGIONS
    saved, _REGIONS = _REGIONS, []
    try:
        yield _REGIONS
    finally:
        _REGIONS = saved


def regions(program: Program, images) -> np.ndarray:
    """The SACM boxes (N, 4: top, left, bottom, right in pixels) of ``images`` (N, C, H, W), run
    through the torch-level aftrans ``program`` in batches of its static batch size."""
    if program.level != "torch" or TWO_SCALE not in program.facts:
        raise PassError("regions need the torch-level program after the aftrans pass")
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    batch = int(program.example_inputs[0].shape[0])
    boxes = []
    with torch.no_grad(), recording_regions() as seen:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, -1, -1, -1)])
            seen.clear()
            program.module(chunk)
            boxes.append(seen[0][:batch - pad])
    return torch.cat(boxes).numpy()


def box_ceiling(boxes, *, grid: tuple = (8, 8), patch: int = 4, image: tuple = (32, 32), margin: float = 0.0,
                min_side: float = 2.0) -> np.ndarray:
    """IoU with each true box (N, 4: top, left, bottom, right, bottom/right exclusive) of the box
    SACM draws when its component is exactly the patches that true box touches: what a perfect
    attention map would score under the patch-aligned box rule (``margin``, squaring,
    ``min_side``). On the small-digit test canvases (digits of 8-14 pixels on a grid of 4-pixel
    patches) a margin of half a patch (the default until 2026-12-07) puts IoU >= 0.5 out of reach
    for almost all of them; without one about two thirds reach it (docs/tokens.md)."""
    boxes = np.asarray(boxes, np.int64)
    gh, gw = grid
    component = torch.zeros(len(boxes), 1, gh, gw)
    for n, (t, l, b, r) in enumerate(boxes.tolist()):
        component[n, 0, t // patch:(b - 1) // patch + 1, l // patch:(r - 1) // patch + 1] = 1.0
    sacm = SACM(grid, patch, image, "rollout", "adaptive", 1.2, 0.5, margin, min_side, 1)
    return iou(sacm.box(component).numpy(), boxes)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes (N, 4: top, left, bottom, right), row by row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    h = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    w = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = h * w
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def draw(program: Program, images, path: str, *, truth=None, mean=0.0, std=1.0, title: str | None = None) -> list:
    """Draw the SACM box (red) of each of ``images`` (N, 3, H, W, normalised with ``mean``/``std``)
    and, when given, the true box (green, ``truth`` (N, 4)) into the PNG at ``path``. Returns the
    boxes as lists of four floats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images = np.asarray(images, dtype=np.float32)
    boxes = regions(program, images)
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(np.clip(images[k] * s + m, 0, 1).transpose(1, 2, 0), interpolation="nearest")
        top, left, bottom, right = boxes[k]
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, color="red", lw=1.2))
        label = ""
        if truth is not None:
            t = np.asarray(truth[k], np.float64)
            ax.add_patch(Rectangle((t[1] - 0.5, t[0] - 0.5), t[3] - t[1], t[2] - t[0], fill=False, color="lime", lw=1.0))
            label = f"IoU {iou(boxes[k:k + 1], t[None])[0]:.2f}"
        ax.set_title(label, fontsize=8)
    fig.suptitle(title or f"{program.name}: SACM regions (red)" + (", true boxes (green)" if truth is not None else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return boxes.tolist()


def draw_small_digits(program: Program, path: str, count: int = 8) -> dict:
    """The SACM regions of ``count`` small-digit test canvases (resized to the model's input) in
    red, their true digit boxes in green, drawn into the PNG at ``path``; returns ``{"file",
    "boxes", "iou"}`` (IoU of each region with its true box)."""
    import os

    from ...models import data as datasets

    if TWO_SCALE not in program.facts:
        raise PassError("the aftrans regions need the aftrans pass in the pipeline")
    canvases = datasets.small_digits("test").take(count)
    _, _, h, w = (int(d) for d in program.example_inputs[0].shape)
    images, truth = canvases.images, canvases.meta["boxes"][:len(canvases)].double()
    if tuple(images.shape[-2:]) != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        truth = truth * torch.tensor([h, w, h, w], dtype=torch.float64) / datasets.SMALL_SIZE
    boxes = draw(program, images.numpy(), path, truth=truth.numpy(), mean=datasets.DIGIT_MEAN, std=datasets.DIGIT_STD)
    return {"file": os.path.basename(path), "boxes": boxes,
            "iou": [round(float(v), 4) for v in iou(np.asarray(boxes), truth.numpy())]}


class Regions(Instrument):
    """A pipeline instrument that draws the aftrans regions of the last torch-level program (just
    before the conversion to ONNX, or the final program) with :func:`draw_small_digits` into the
    PNG at ``path``; ``summary`` is then its result.

        result = pipe.run(program, instruments=[Regions("build/regions.png")])
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.summary: dict | None = None

    def start(self, program, report) -> None:
        if program.level != "torch":
            raise PassError("the aftrans regions need a torch-level model (a zoo name) and the aftrans pass")

    def after(self, step, before, after) -> None:
        if self.summary is None and before.level == "torch" and after.level != "torch":
            self.summary = draw_small_digits(before, self.path)

    def finish(self, program, report) -> None:
        if self.summary is None and program.level == "torch":
            self.summary = draw_small_digits(program, self.path)
