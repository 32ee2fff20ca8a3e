"""lvtp: training-free progressive token pruning for segmentation ViTs, guided by multi-scale
Tsallis entropy of attention and low-level (Sobel edge) features, after LVTP (Ouyang et al., "Back
to Fundamentals: Low-Level Visual Features Guided Progressive Token Pruning", arXiv 2504.17996,
Journal of Systems Architecture 168, 2025).

A dense-prediction model needs every patch token at its decoder, so a pruned token is not thrown
away: it is *parked* with the features it had when it was pruned and put back at its grid position
after the last block (the decoder, and the final norm before it, see the full grid again). Only the
blocks after a pruning stage run on fewer tokens.

At each chosen block (a *stage*) the block runs in full; then each active patch token j gets

- a semantic score H_j from the attention of that block: the Tsallis entropy
  S_q(p) = (1 - sum_i p_i^q) / (q - 1) (Shannon's entropy at q = 1, the paper's formula) of token
  j's attention row p over the n keys, for every q in ``q``, each divided by its largest value (the
  uniform row's, (1 - n^(1-q)) / (q - 1)) so the scales are comparable, averaged over heads, and
  mixed with *dynamic* weights w_q proportional to the spread (standard deviation over the image's
  tokens) of that scale: the scale that separates this image's tokens best weighs most. With
  ``keep_entropy=low`` (default) H_j is one minus that entropy: a token whose attention
  concentrates on a few keys ranks first, one whose attention is spread evenly over the image
  ranks last and is parked first (the same reading as the attention-entropy patch-pruning
  criterion of arXiv 2604.03803: concentrated attention = informative, spread = redundant).
  ``keep_entropy=high`` is the opposite reading. Which one LVTP uses is not in the material we
  have (the paper's abstract gives only the formula), so we measured both on the trained tiny segmenter
  (val scenes, dense 85.28% mIoU): the entropy score alone at blocks 1,2,3 keep 0.7 gives 59.6%
  keeping low entropy and 11.0% keeping high entropy (the flat background of a digit scene
  attends everywhere, the digit strokes attend to a few keys); with the edge score mixed in,
  low keeps 1-2 points more mIoU at every schedule tried;
- a low-level score E_j: the mean Sobel gradient magnitude of the input image inside the token's
  patch (grey level; the image border gets no gradient), divided by the image's largest patch value;
- the combined score s_j = (1 - edge_weight) H_j + edge_weight E_j.

Twice clustering: (1) two-means on s splits the tokens into an informative and a redundant group;
(2) two-means on E *within the redundant group* finds its edge tokens, which are protected. The
informative and protected tokens rank first (rank = 1[informative or protected] + s), so the
static top-k keeps them before any other token. The paper gives neither the q set, the weights nor
the clustering algorithm (they are not public): the q set {0.5, 1, 2}, the
spread-proportional weights, the mixing and the fixed-iteration one-dimensional two-means (four
Lloyd steps from the extremes, static shapes) are our choices.

Where to prune: the first stage is block 2 (``blocks=2,3``). A parked token reaches the decoder
with the features of the block that parked it, and the decoder reads the last block's feature
space: on the trained tiny segmenter (val scenes, dense 85.28%), giving *only the ink-free tokens*
(by the ground truth, an oracle selection) the features of block b instead of the final ones
gives 60.3 / 66.2 / 83.2 / 85.1 / 85.2% mIoU for b = 0 / 1 / 2 / 3 / 4. Parking after block 0 or
1 cannot keep the mIoU whatever the score; after block 2 the far-from-ink background can go. The
same oracle shows what static shapes cost: parking the ink-free tokens that touch no ink after
block 2 and the other ink-free tokens after block 3 loses 0.15 point at ~0.78 of the MACs, but
only with a per-image token count (on average 18.5 and 31.5 of 64 tokens, up to 62 of 64 tokens
carry ink); with the static counts of ``keep`` 0.72 the same oracle ranking loses 2.5 points.

Inference modes: ``static`` (default; what compile.py lowers): stage s keeps k = ceil(keep * n)
of its n active patch tokens, fixed at compile time (one TopK with constant k = n for the ranking,
then GatherElements), and the grid is restored with one ScatterElements, so ONNX export and the TVM
build have static shapes. ``adaptive`` (PyTorch, batch 1): keep exactly the informative and
protected tokens, a per-image count (see :meth:`LVTPStage.adaptive_choice`: the edge clusters are
taken over the whole image, and every stage but the last also keeps the neighbours of kept
tokens). This is the mode that keeps the tiny segmenter's mIoU: with the defaults, val 85.28 ->
84.51% (-0.77) at 0.770 of the MACs on average (0.941 at most), test 83.68 -> 82.77% (-0.91) at
0.773; static mode at about the same MACs loses about 4 points (see above).
"""

from __future__ import annotations

import dataclasses
from typing import Literal
import math
import operator

import torch
from torch import nn
import torch.nn.functional as F

from ...ir.errors import PassError, UnsupportedOpError
from ...ir.program import Program
from ...ir.torch_level import retrace
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, QUANTIZED_POT, TOKEN_PRUNED
from .common import (
    OnnxTopK,
    attention_step,
    check_blocks,
    keep_count,
    mlp_step,
    record_selection,
    tokens_in,
    transformer_blocks,
)

LLOYD_STEPS = 4


def tsallis_entropy(probs: torch.Tensor, q: float) -> torch.Tensor:
    """Tsallis entropy S_q of distributions along the last axis, divided by its largest value
    (that of the uniform distribution), so it lies in [0, 1]; q = 1 is Shannon's entropy."""
    n = probs.shape[-1]
    if abs(q - 1.0) < 1e-9:
        return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1) / math.log(n)
    top = (1.0 - n ** (1.0 - q)) / (q - 1.0)
    return (1.0 - probs.clamp_min(0.0).pow(q).sum(dim=-1)) / (q - 1.0) / top


def multiscale_entropy(probs: torch.Tensor, qs) -> torch.Tensor:
    """LVTP's semantic score of each query token: the normalised Tsallis entropies of its attention
    rows (averaged over heads) for every q, mixed with per-image weights proportional to each
    scale's standard deviation over the tokens. probs (B, heads, n, keys) -> (B, n) in [0, 1]."""
    scales = torch.stack([tsallis_entropy(probs, q).mean(dim=1) for q in qs], dim=1)  # (B, Q, n)
    spread = scales.std(dim=-1, keepdim=True) + 1e-6
    weights = spread / spread.sum(dim=1, keepdim=True)
    return (weights * scales).sum(dim=1)


def two_means(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-dimensional two-means clustering per row of ``values`` (B, n), restricted to ``mask``
    (bool, B x n) when given: ``LLOYD_STEPS`` Lloyd iterations from the row's extremes. Returns
    the (bool) membership of the upper cluster (always False outside the mask). Static shapes only:
    reductions, comparisons and masked means."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    big = torch.full_like(values, 1e9)
    low = torch.where(mask, values, big).amin(dim=1, keepdim=True)
    high = torch.where(mask, values, -big).amax(dim=1, keepdim=True)
    m = mask.to(values.dtype)
    upper = mask
    for _ in range(LLOYD_STEPS):
        upper = (values > (low + high) / 2) & mask
        u = upper.to(values.dtype)
        high = (values * u).sum(dim=1, keepdim=True) / u.sum(dim=1, keepdim=True).clamp_min(1.0)
        lower = m - u
        low = (values * lower).sum(dim=1, keepdim=True) / lower.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (values > (low + high) / 2) & mask


class PatchEdges(nn.Module):
    """Low-level score of every patch: the mean Sobel gradient magnitude of the grey image inside
    the patch, divided by the image's largest patch value. (B, C, H, W) -> (B, patches) in [0, 1]."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel", torch.stack([gx, gx.t()]).unsqueeze(1))  # (2, 1, 3, 3)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        grey = image.mean(dim=1, keepdim=True)
        grad = F.conv2d(grey, self.sobel)  # valid: no artificial edge at the border
        magnitude = F.pad((grad * grad).sum(dim=1, keepdim=True).sqrt(), (1, 1, 1, 1))
        per_patch = F.avg_pool2d(magnitude, self.patch_size).flatten(1)
        return per_patch / per_patch.amax(dim=1, keepdim=True).clamp_min(1e-6)


class LVTPStage(nn.Module):
    """A transformer block that, after running in full, keeps its most important patch tokens and
    parks the others. Owns the original block's layers under their names.

    forward(x, index, edges) -> (tokens kept with CLS, their grid indices, parked tokens, their
    grid indices); ``index`` (B, n) holds the grid position of each active patch token (None at the
    first stage: all of them, in order), ``edges`` (B, grid) is :class:`PatchEdges`' output."""

    def __init__(self, block: nn.Module, keep_tokens: int, patch_tokens: int, grid_tokens: int, qs, edge_weight: float,
                 keep_entropy: str = "low"):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.keep_tokens, self.patch_tokens = keep_tokens, patch_tokens
        self.qs, self.edge_weight = tuple(qs), edge_weight
        self.keep_entropy = keep_entropy
        self.last_stage = True  # set by the pass: adaptive mode protects neighbours before the last stage
        side = math.isqrt(grid_tokens)
        self.grid_shape = (side, grid_tokens // side)  # (rows, columns) of patches; the pass sets it
        self.register_buffer("grid_index", torch.arange(grid_tokens).reshape(1, -1), persistent=False)
        self.mode = "static"

    def extra_repr(self) -> str:
        return (f"keep_tokens={self.keep_tokens}, patch_tokens={self.patch_tokens}, q={self.qs}, "
                f"edge_weight={self.edge_weight}, keep_entropy={self.keep_entropy}")

    def scores(self, probs: torch.Tensor, edges: torch.Tensor):
        """(rank, combined score, chosen mask) of the active patch tokens."""
        semantic = multiscale_entropy(probs[:, :, 1:, :], self.qs)
        if self.keep_entropy == "low":
            semantic = 1.0 - semantic
        score = (1.0 - self.edge_weight) * semantic + self.edge_weight * edges
        informative = two_means(score)
        protected = two_means(edges, ~informative)
        chosen = informative | protected
        return chosen.to(score.dtype) + score, score, chosen

    def adaptive_choice(self, chosen: torch.Tensor, edges: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The tokens adaptive mode keeps (bool, B x n active tokens): those :meth:`scores` chose,
        plus the edge tokens of the twice clustering of the *whole image's* patch edges (the
        image does not change between stages: clustering only the active tokens would split the
        edge tokens a previous stage kept into strong and weak and park the weak ones), plus, at
        every stage but the last, the tokens next to a kept one (3 x 3 patches on the grid): a
        token beside an object is parked one stage later, since it is where a segment boundary
        falls. ``edges``: (B, grid), ``index``: grid positions of the active tokens (B, n)."""
        upper = two_means(edges)
        edge_tokens = upper | two_means(edges, ~upper)
        chosen = chosen | torch.gather(edge_tokens, 1, index)
        if self.last_stage:
            return chosen
        grid = torch.zeros_like(edges).scatter(1, index, chosen.to(edges.dtype))
        near = F.max_pool2d(grid.reshape(-1, 1, *self.grid_shape), 3, stride=1, padding=1).flatten(1)
        return torch.gather(near, 1, index) > 0

    def forward(self, x: torch.Tensor, index: torch.Tensor | None, edges: torch.Tensor):
        x, probs, _ = attention_step(self, x)
        x = mlp_step(self, x)
        if index is None:
            index = self.grid_index.expand(x.shape[0], -1)
        patch_edges = torch.gather(edges, 1, index)
        rank, _, chosen = self.scores(probs, patch_edges)
        if self.mode == "adaptive":
            if x.shape[0] != 1:
                raise PassError("lvtp's adaptive mode runs at batch 1; use mode=static for batches")
            chosen = self.adaptive_choice(chosen, edges, index)
            kept_at = torch.nonzero(chosen[0]).flatten()
            if kept_at.numel() == 0:
                kept_at = rank[0].argmax().reshape(1)
            parked_at = torch.nonzero(~torch.isin(torch.arange(rank.shape[1]), kept_at)).flatten()
            kept_at, parked_at = kept_at.unsqueeze(0), parked_at.unsqueeze(0)
        else:
            _, order = OnnxTopK.apply(rank, self.patch_tokens)
            kept_at, parked_at = order[:, : self.keep_tokens], order[:, self.keep_tokens :]
        record_selection(kept_at)
        patches = x[:, 1:]
        width = patches.shape[-1]
        kept = torch.gather(patches, 1, kept_at.unsqueeze(-1).expand(-1, -1, width))
        parked = torch.gather(patches, 1, parked_at.unsqueeze(-1).expand(-1, -1, width))
        return (torch.cat([x[:, :1], kept], dim=1), torch.gather(index, 1, kept_at), parked,
                torch.gather(index, 1, parked_at))


class TokenRestore(nn.Module):
    """Put every patch token back at its grid position: the active tokens with their final
    features, each parked token with the features it had when it was pruned. forward(x, index,
    parked_1, index_1, ...) -> (B, 1 + grid, C) with CLS first."""

    def forward(self, x: torch.Tensor, index: torch.Tensor, *parked) -> torch.Tensor:
        tokens = torch.cat([x[:, 1:]] + list(parked[0::2]), dim=1)
        positions = torch.cat([index] + list(parked[1::2]), dim=1)
        # the positions are a permutation of the grid: every slot of ``tokens`` is overwritten
        grid = tokens.scatter(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
        return torch.cat([x[:, :1], grid], dim=1)


@dataclasses.dataclass
class LVTPOptions:
    blocks: tuple[int, ...] = option((2, 3), "0-indexed blocks after which tokens are pruned", nonempty=True)
    keep: float = option(0.7, "fraction of the active patch tokens kept at each stage, in (0, 1]", gt=0.0, le=1.0)
    q: tuple[float, ...] = option((0.5, 1.0, 2.0), "Tsallis entropy indices (q=1: Shannon), each > 0", gt=0.0, nonempty=True)
    edge_weight: float = option(0.5, "weight of the Sobel edge score against the entropy score, in [0, 1]", ge=0.0, le=1.0)
    keep_entropy: Literal["low", "high"] = option("low", "which attention entropy ranks first: low (focused tokens kept) or high")
    mode: Literal["static", "adaptive"] = option("static", "static (compiled) or adaptive (PyTorch, batch 1)")


def patch_size_of(pass_name: str, image_shape, grid_tokens: int) -> int:
    """The square patch side that tiles an (.., H, W) image into ``grid_tokens`` patches."""
    if len(image_shape) != 4:
        raise UnsupportedOpError(f"pass {pass_name!r} needs an image input (B, C, H, W), got shape {tuple(image_shape)}")
    h, w = int(image_shape[2]), int(image_shape[3])
    side = round(math.sqrt(h * w / max(grid_tokens, 1)))
    if side < 1 or h % side or w % side or (h // side) * (w // side) != grid_tokens:
        raise UnsupportedOpError(
            f"pass {pass_name!r} cannot lay {grid_tokens} patch tokens on a {h}x{w} image as a square-patch grid; "
            "it needs a ViT with one CLS token followed by the patch tokens in row-major order"
        )
    return side


@register
class LVTP(Pass):
    name = "lvtp"
    level = "torch"
    summary = "LVTP: training-free progressive token pruning (Tsallis entropy + Sobel edges), grid restored for dense heads"
    provides = (TOKEN_PRUNED,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = LVTPOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        nodes = check_blocks(self.name, gm, o.blocks)
        if o.keep >= 1.0:
            ctx.record("tokens", [])
            return program
        blocks = transformer_blocks(gm)
        images = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(images) != 1:
            raise UnsupportedOpError(f"pass {self.name!r} needs a model with one image input, this one has {len(images)}")
        grid = tokens_in(blocks[0]) - 1
        patch = patch_size_of(self.name, program.example_inputs[0].shape, grid)
        targets = [n.target for n in blocks]
        start, last = targets.index(nodes[0].target), len(blocks) - 1
        for node in blocks[start:last]:
            if len(node.users) != 1:
                raise UnsupportedOpError(
                    f"pass {self.name!r} needs the blocks from block {start} on to feed only the next block "
                    f"({node.target} has {len(node.users)} users); prune after the last tapped block"
                )
        gm.add_submodule("patch_edges", PatchEdges(patch))
        with gm.graph.inserting_after(images[0]):
            edges = gm.graph.call_module("patch_edges", (images[0],))
        stage_index = {n.target: i for i, n in zip(sorted(o.blocks), nodes)}
        index, parked, schedule, active = None, [], [], grid
        x_last = blocks[-1]
        for node in blocks[start:]:
            if node.target not in stage_index:
                continue
            k = keep_count(o.keep, active)
            stage = LVTPStage(gm.get_submodule(node.target), k, active, grid, o.q, o.edge_weight, o.keep_entropy)
            stage.mode = o.mode
            stage.last_stage = node is nodes[-1]
            shape = program.example_inputs[0].shape
            stage.grid_shape = (int(shape[2]) // patch, int(shape[3]) // patch)
            gm.set_submodule(node.target, stage)
            with gm.graph.inserting_after(node):
                outs = [gm.graph.call_function(operator.getitem, (node, i)) for i in range(4)]
            node.replace_all_uses_with(outs[0], delete_user_cb=lambda user: user not in outs)
            node.args = (node.args[0], index, edges)
            index = outs[1]
            parked += [outs[2], outs[3]]
            if node is x_last:
                x_last = outs[0]
            schedule.append({"block": stage_index[node.target], "tokens_in": active + 1, "kept": k, "tokens_out": k + 1})
            active = k
        gm.add_submodule("token_restore", TokenRestore())
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first_user = min(x_last.users, key=order.__getitem__)
        with gm.graph.inserting_before(first_user):
            restored = gm.graph.call_module("token_restore", (x_last, index, *parked))
        x_last.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
        ctx.record("tokens", schedule)
        return retrace(program, gm)

