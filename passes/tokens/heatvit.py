"""heatvit: HeatViT's attention-based multi-head token selectors (Dong et al., HPCA 2023,
arXiv 2211.08110), trained, then compiled to static shapes.

Selector (inserted before each chosen block; CLS bypasses it). For the patch tokens x split into
heads x_h (d = D / heads):

- local features l_h = GELU(W_l LN(x_h)) of width d/2 (weights shared by the heads);
- a global feature g_h = mean of l_h over the tokens still kept;
- per-head keep/prune logits = MLP([l_h, g_h]) -> 2, keep probability p_h = softmax(.)[keep];
- head weights w_h = sigmoid(W_w mean_d(l_h)) per token; keep score s = sum_h w_h p_h / sum_h w_h.

Pruned tokens are not dropped: they are consolidated into one *package token*, the average of
the pruned tokens weighted by their keep scores; a package token from an earlier selector is
always absorbed into the next one (weighted by its own keep score). A selector outputs
[CLS, kept tokens, package]. The keep counts follow DynamicViT's schedule, which HeatViT shares:
stage s keeps int(N0 * keep^s) of the N0 patch tokens.

Training (needs ``data`` in the pass context): every block from the first selector on runs with
a token *policy* instead of removing tokens: the selector draws a hard keep mask with
Gumbel-Softmax (straight-through), masks multiply across stages, and attention ignores pruned keys
(each token still attends to itself). The loss is cross-entropy + ``ratio_weight`` x the squared
gap between each stage's kept fraction and its target + ``distill_weight`` x KL to the dense model
(weights as in DynamicViT: 2 and 0.5). The selectors learn at ``selector_lr``, the dense layers
at ``lr``/10. Before that, ``warm_start`` epochs fit each selector (backbone frozen) to the dense
model's class-attention top-k at its block (see :func:`_warm_start`, our addition): from random
weights a short fine-tune cannot teach a selector a ranking. On the trained tiny DeiT (digits,
blocks 4,7,10, keep 0.7, 2 epochs on 384 digits, 0.673 of the MACs; dense 98.33%) the warm start
takes the accuracy from 97.22 / 97.50 / 98.06% (seeds 0 / 1 / 2, mean -0.74 point) to 98.61 /
98.06 / 98.33% (mean +0.00).

Inference modes: ``static`` (default; what compile.py lowers): top-k with constant k + gather and
the package token as a weighted sum, static shapes; ``adaptive``: at batch 1, keep exactly the
tokens whose keep score exceeds 0.5 (PyTorch only).

What the paper leaves open and we chose: the shared per-head local MLP, head weights from the
mean local feature, and the package token's weighting by keep score (known only from
secondary descriptions of the method). The 8-bit polynomial nonlinearities are the separate ``poly-act`` pass.

Latency-aware choice (``latency`` > 0): instead of taking ``blocks`` and ``keep`` as given, the
pass reads the block-latency table (token count -> ms of one block) of ``ctx.cost_model`` (e.g.
``sliver.backends.fpga.CostModel``, or any object with ``block_latency_table``) and picks the
selector blocks and keep ratio that meet the latency target; see :func:`latency_aware_schedule`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import retrace
from ...models import trainer
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, FLOAT_TOKEN_SCORES, QUANTIZED_POT, TOKEN_PRUNED
from .common import (
    TokenPolicy,
    attention_step,
    block_dims,
    check_blocks,
    distill_fine_tune,
    frozen_copy,
    record_selection,
    TokenFusion,
    tokens_in,
    transformer_blocks,
    weighted_rest,
)


WARM_START_LR = 1e-2  # selectors are small MLPs fitted from scratch on cached features


class TokenSelector(nn.Module):
    def __init__(self, dim: int, num_heads: int, keep_tokens: int, absorbs_package: bool):
        super().__init__()
        head_dim = dim // num_heads
        half = max(1, head_dim // 2)
        self.num_heads, self.keep_tokens, self.absorbs_package = num_heads, keep_tokens, absorbs_package
        self.norm = nn.LayerNorm(head_dim)
        self.local = nn.Sequential(nn.Linear(head_dim, half), nn.GELU())
        self.decide = nn.Sequential(nn.Linear(2 * half, half), nn.GELU(), nn.Linear(half, 2))
        self.head_weight = nn.Linear(num_heads, num_heads)
        self.mode = "static"
        self.state: TokenPolicy | None = None
        self.fusion = TokenFusion(keep_tokens, absorbs_last=absorbs_package)

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}, absorbs_package={self.absorbs_package}"

    def keep_scores(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Keep score in (0, 1) of every token (B, T); the global feature averages ``mask``ed tokens."""
        b, t, c = tokens.shape
        local = self.local(self.norm(tokens.reshape(b, t, self.num_heads, c // self.num_heads)))
        if mask is None:
            glob = local.mean(dim=1, keepdim=True)
        else:
            m = mask.reshape(b, t, 1, 1)
            glob = (local * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        logits = self.decide(torch.cat([local, glob.expand_as(local)], dim=-1))
        keep_prob = logits.softmax(dim=-1)[..., 0]  # (B, T, H)
        weights = torch.sigmoid(self.head_weight(local.mean(dim=-1)))
        return (weights * keep_prob).sum(dim=-1) / weights.sum(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "train":
            return self._train_forward(x)
        end = x.shape[1] - 1 if self.absorbs_package else x.shape[1]
        others = x[:, 1:]  # patches (and an earlier package at the end)
        scores = self.keep_scores(others)
        patches, patch_scores = x[:, 1:end], scores[:, : end - 1]
        if self.mode == "adaptive":
            if x.shape[0] != 1:
                raise PassError("heatvit's adaptive mode runs at batch 1; use mode=static for batches")
            keep = torch.nonzero(patch_scores[0] > 0.5).flatten()
            record_selection(keep.unsqueeze(0))
            kept, kept_scores = patches[:, keep], patch_scores[:, keep]
        else:  # static: top-k, the rest (and an earlier package) into the package token
            return self.fusion(x, scores)
        package = weighted_rest(others, scores, kept, kept_scores)
        return torch.cat([x[:, :1], kept, package], dim=1)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        b, t, _ = x.shape
        prev = state.policy if state.policy is not None else x.new_ones(b, t)
        end = t - 1 if self.absorbs_package else t
        others = x[:, 1:]
        scores = self.keep_scores(others, prev[:, 1:])
        patch_prev = prev[:, 1:end]
        s = scores[:, : end - 1].clamp(1e-6, 1 - 1e-6)
        hard = F.gumbel_softmax(torch.stack([s.log(), (1 - s).log()], dim=-1), hard=True)[..., 0]
        keep = patch_prev * hard
        pruned_weight = scores[:, : end - 1] * patch_prev * (1 - hard)
        weights = pruned_weight
        if self.absorbs_package:
            weights = torch.cat([weights, scores[:, end - 1 :] * prev[:, end:]], dim=1)
        package = (weights.unsqueeze(1) @ others) / weights.sum(dim=1).clamp_min(1e-6).reshape(b, 1, 1)
        parts = [prev[:, :1], keep]
        if self.absorbs_package:
            parts.append(torch.zeros_like(prev[:, end:]))  # absorbed into the new package
        parts.append(prev.new_ones(b, 1))
        state.policy = torch.cat(parts, dim=1)
        state.stage_fractions.append(keep.mean(dim=1))
        return torch.cat([x, package], dim=1)


@dataclasses.dataclass
class HeatViTOptions:
    blocks: tuple[int, ...] = option((3, 6, 9), "0-indexed blocks to insert a selector before", nonempty=True)
    keep: float = option(0.7, "keep ratio per stage: stage s keeps int(N0 keep^s) tokens", gt=0.0, le=1.0)
    epochs: int = option(3, "fine-tuning epochs over the training data", ge=0)
    lr: float = option(1e-3, "learning rate of the dense layers x 10 (they learn at lr/10)", gt=0.0)
    selector_lr: float = option(1e-3, "learning rate of the selectors", gt=0.0)
    warm_start: int = option(20, "epochs of fitting each selector to the dense model's class-attention top-k before the "
                             "fine-tune (backbone frozen; cheap); 0 = selectors start from random weights", ge=0)
    batch_size: int = option(64, "fine-tuning batch size", ge=1)
    ratio_weight: float = option(2.0, "weight of the keep-ratio loss", ge=0.0)
    distill_weight: float = option(0.5, "weight of the KL loss to the dense model", ge=0.0)
    mode: Literal["static", "adaptive"] = option("static", "static (compiled) or adaptive (PyTorch, batch 1)")
    latency: float = option(0.0, "latency-aware choice: target latency of the blocks as a fraction of the dense ones', from the "
                            "cost model's block-latency table; picks blocks (as given or shifted by one) and keep; 0 = off", ge=0.0, le=1.0, why="0 turns the latency-aware choice off")


@register
class HeatViT(Pass):
    name = "heatvit"
    level = "torch"
    summary = "HeatViT: trained multi-head token selectors with a package token (static top-k)"
    provides = (TOKEN_PRUNED, FLOAT_TOKEN_SCORES)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = HeatViTOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        blocks, keep = o.blocks, o.keep
        check_blocks(self.name, gm, blocks)
        if o.latency > 0:
            blocks, keep = self._latency_aware(gm, ctx)
        nodes = check_blocks(self.name, gm, blocks)
        train_set = ctx.training_data(self.name) if o.epochs > 0 else None
        first = nodes[0]
        n0 = tokens_in(first) - 1
        dim = int(first.args[0].meta["tensor_meta"].shape[-1])
        heads = block_dims(gm.get_submodule(first.target))[1]
        teacher = None if train_set is None else frozen_copy(gm)
        selectors, schedule = [], []
        for stage, (index, node) in enumerate(zip(sorted(blocks), nodes), start=1):
            k = max(1, int(n0 * keep**stage))
            selector = TokenSelector(dim, heads, k, absorbs_package=stage > 1)
            name = f"token_selector_{index}"
            gm.add_submodule(name, selector)
            with gm.graph.inserting_before(node):
                sel_node = gm.graph.call_module(name, (node.args[0],))
            node.replace_input_with(node.args[0], sel_node)
            selectors.append(selector)
            schedule.append({"block": index, "kept": k, "tokens_out": k + 2})
        gm.graph.lint()
        gm.recompile()
        if train_set is not None and o.warm_start > 0:
            fit = _warm_start(teacher, selectors, [n.target for n in nodes], n0, o, train_set, ctx)
            ctx.record("warm_start", fit)
        if train_set is not None:
            _fine_tune(gm, teacher, selectors, nodes, n0, o, train_set, ctx)
        for s in selectors:
            s.mode = o.mode
        ctx.record("tokens", schedule)
        return retrace(program, gm)

    def _latency_aware(self, gm, ctx) -> tuple:
        """(blocks, keep) meeting the latency target on the cost model's block-latency table."""
        o = self.options
        model = ctx.cost_model
        if model is None or not hasattr(model, "block_latency_table"):
            raise PassError(
                f"heatvit{{latency={o.latency}}} needs a cost model with a block-latency table in the pass context: "
                "PassContext(cost_model=sliver.backends.fpga.CostModel()), or set latency=0"
            )
        all_blocks = transformer_blocks(gm)
        first = gm.get_submodule(all_blocks[0].target)
        dim, heads, mlp_ratio = block_dims(first)
        n0 = tokens_in(all_blocks[0]) - 1
        table = model.block_latency_table(dim, heads, mlp_ratio, token_counts=range(2, n0 + 3))
        choice = latency_aware_schedule(table, len(all_blocks), n0, sorted(o.blocks), o.latency)
        if choice is None:
            raise PassError(
                f"heatvit cannot meet latency={o.latency} of the dense blocks at blocks {list(o.blocks)} even keeping "
                "one token per stage; raise latency or prune earlier blocks"
            )
        ctx.record("latency_choice", choice)
        return tuple(choice["blocks"]), choice["keep"]


def schedule_latency_ms(table: dict, depth: int, n0: int, blocks, keep: float) -> float:
    """Latency of the ``depth`` blocks from a {tokens: ms} table when selectors before ``blocks``
    keep int(n0 keep^s) patch tokens at stage s (plus CLS and the package token)."""
    tokens, stage, total = n0 + 1, 0, 0.0
    for i in range(depth):
        if i in blocks:
            stage += 1
            tokens = max(1, int(n0 * keep**stage)) + 2
        total += table[tokens]
    return total


def latency_aware_schedule(table: dict, depth: int, n0: int, blocks, target: float, step: float = 0.01):
    """HeatViT's latency-aware choice of selector blocks and keep ratio, from a block-latency table.

    Candidates: the given ``blocks`` and the same stages shifted one block earlier or later. For
    each, the largest keep ratio (on a ``step`` grid) whose block latency is at most ``target`` x
    the dense blocks' latency; the candidate keeping the most wins (ties: the later blocks), since a
    larger keep ratio loses fewer tokens at each selection. HeatViT picks its stages and ratios
    from latency measured on its board (arXiv 2211.08110, latency-aware multi-stage training); the
    candidate set and the keep-the-most rule are our choices. Returns ``{"blocks", "keep",
    "latency_ratio", "dense_ms", "pruned_ms"}`` or None when no candidate meets the target."""
    dense = depth * table[n0 + 1]
    best = None
    for shift in (-1, 0, 1):
        candidate = [b + shift for b in blocks]
        if candidate[0] < 0 or candidate[-1] >= depth:
            continue
        for i in range(round(1 / step), 0, -1):
            keep = i * step
            ms = schedule_latency_ms(table, depth, n0, candidate, keep)
            if ms <= target * dense + 1e-12:
                key = (keep, sum(candidate))
                if best is None or key > best[0]:
                    best = (key, {"blocks": candidate, "keep": round(keep, 6), "latency_ratio": ms / dense,
                                  "dense_ms": dense, "pruned_ms": ms})
                break
    return None if best is None else best[1]


def _fine_tune(gm, teacher, selectors, nodes, n0, o, train_set, ctx) -> list:
    targets = [s.keep_tokens / n0 for s in selectors]

    def ratio_loss(state):
        return o.ratio_weight * sum((f.mean() - t) ** 2 for f, t in zip(state.stage_fractions, targets))

    selector_params = [p for s in selectors for p in s.parameters()]
    return distill_fine_tune(
        gm, teacher, nodes[0].target, selectors, selector_params, ratio_loss, train_set, ctx,
        epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, distill_weight=o.distill_weight, name="heatvit",
        stage_lr=o.selector_lr,
    )


def _warm_start(teacher, selectors, targets, n0, o, train_set, ctx) -> dict:
    """Fit every selector, before the end-to-end fine-tune, to the dense model's own notion of
    importance: the selector before block b learns (binary cross-entropy) to give keep score 1 to
    the ``keep_tokens`` patch tokens with the largest head-averaged class attention in block b of
    the dense teacher (EViT's score) and 0 to the others, on the teacher's token features at that
    block's input. The backbone does not move; the features are computed once.

    Why: a selector starts from random weights, and a short fine-tune (24 steps on 384 digits)
    cannot teach it a ranking: its Gumbel masks stay close to random and the backbone learns to
    live with random pruning. HeatViT (like DynamicViT) trains its selectors over tens of epochs;
    the warm start gives them, in a fraction of a second, the ranking the trained model already
    has, and the fine-tune then refines it with the task and keep-ratio losses. The warm start is
    our choice, not the paper's. Returns the mean loss per selector before and after the fit and
    how often the fitted selector's top-k agrees with the class-attention top-k."""
    feats = {t: [] for t in targets}
    labels = {t: [] for t in targets}
    hooks = []

    def grab(target, keep_tokens):
        block = teacher.get_submodule(target)

        def hook(module, args):
            x = args[0]
            _, probs, _ = attention_step(block, x)
            cls_attn = probs[:, :, 0, 1:].mean(dim=1)
            top = cls_attn.topk(keep_tokens, dim=1).indices
            feats[target].append(x[:, 1:].detach())
            labels[target].append(torch.zeros_like(cls_attn).scatter(1, top, 1.0))
        return block.register_forward_pre_hook(hook)

    for t, s in zip(targets, selectors):
        hooks.append(grab(t, s.keep_tokens))
    try:
        with torch.no_grad():
            for images, _ in train_set.loader(o.batch_size, shuffle=False):
                teacher(images)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(ctx.seed)
    fit = {"loss_before": [], "loss_after": [], "topk_agreement": []}
    for t, sel in zip(targets, selectors):
        x, y = torch.cat(feats[t]), torch.cat(labels[t])
        scorer = _KeepScores(sel)

        def loss_of(net, batch):
            return F.binary_cross_entropy(net(batch.x).clamp(1e-6, 1 - 1e-6), batch.y)

        with torch.no_grad():
            fit["loss_before"].append(round(loss_of(scorer, trainer.Batch(x, y, None)).item(), 4))
        trainer.fit(scorer, trainer.tensor_source(x, y, o.batch_size, generator=gen),
                    torch.optim.AdamW(sel.parameters(), lr=WARM_START_LR, weight_decay=0.0), epochs=o.warm_start,
                    what="warm start", phase="warm-start", loss=loss_of, ctx=ctx)
        with torch.no_grad():
            fit["loss_after"].append(round(loss_of(scorer, trainer.Batch(x, y, None)).item(), 4))
            top = sel.keep_scores(x).topk(sel.keep_tokens, dim=1).indices
            fit["topk_agreement"].append(round(torch.gather(y, 1, top).mean().item(), 4))
    return fit


class _KeepScores(nn.Module):
    """A selector's keep scores as a module's forward (what the warm start trains, DDP-wrappable)."""

    def __init__(self, selector: TokenSelector) -> None:
        super().__init__()
        self.selector = selector

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.selector.keep_scores(tokens)

