"""asvit: AS-ViT's adaptive sparse token pruning with learnable thresholds (Liu et al., IJCAI 2023,
arXiv 2209.13802).

At each chosen block, after its attention, every patch token j gets the head-importance-weighted
class attention

    I_{h,j} = ||(A V)_{h,j}||_2 / sum_h ||(A V)_{h,j}||_2,    score_j = sum_h A_{h,0,j} I_{h,j}

and is kept when ``score_j > theta / N`` (N patch tokens), one learnable threshold theta per
stage, stored in units of the uniform score 1/N so that one learning rate fits every model; pruned tokens are
dropped (the MLP and later blocks see only CLS and the kept tokens).

Training (needs ``data``): tokens are masked, not removed. The mask is the hard decision
``score > theta`` with the gradient of sigmoid((score - theta) / tau), tau = 1e-4 (straight
through); masks multiply across stages and mask attention in every later block. The loss is
CE + ``budget_weight`` x |MACs(kept) / MACs(dense) - budget| + ``distill_weight`` x KL(student ||
teacher), with the MACs of each block computed from its kept token count (weights 2 and 0.5, as in
the paper). Thresholds start at the score quantile that meets the budget on the first batch.

The thresholds learn at their own rate, ``threshold_lr`` (in units of 1/N per step; the dense
layers learn at ``lr``/10), without weight decay. AdamW moves a parameter by about its learning
rate per step, so at 1e-3 (the default, the rate they had before the option existed) a threshold
of ~0.5/N moves by under 0.03/N in a short fine-tune: on the trained tiny DeiT (24 steps) the
"learned" thresholds stayed at their initial quantiles to 0.002 (0.2798, 0.6072, 0.6427 -> 0.2782,
0.6096, 0.6415) and the MACs missed the budget (0.671 for 0.7). With ``threshold_lr=0.05`` they
move (-> 0.2400, 0.6946, 0.6351) and meet it (0.693), accuracy within 0.3 point. On an untrained
(random) model the same rate lets cross-entropy and distillation pull the thresholds under every
score (nothing pruned), which is why 0.05 is not the default.

Inference: ``static`` (compiled): each stage keeps a fixed k, the mean number of tokens over the
threshold on the training data, fixed at compile time (TopK with constant k + gather);
``adaptive`` (PyTorch): at batch 1 exactly the tokens over the threshold; at batch B > 1 the
paper's rule, k = (tokens over threshold across the batch) // B, then top-k per image.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ...ir.program import Program
from ...ir.torch_level import retrace
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, FLOAT_TOKEN_SCORES, QUANTIZED_POT, TOKEN_PRUNED
from .common import (
    attention_step,
    block_dims,
    check_blocks,
    distill_fine_tune,
    frozen_copy,
    policy_mode,
    mlp_step,
    record_selection,
    TokenPolicy,
    select_tokens,
    tokens_in,
    transformer_blocks,
)

TAU = 1e-4


def class_attention_score(probs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """AS-ViT's score of each patch token (B, N-1) from attention probabilities (B, H, N, N) and
    the per-head context A.V (B, H, N, d)."""
    norms = context[:, :, 1:].norm(dim=-1)  # (B, H, N-1)
    importance = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (probs[:, :, 0, 1:] * importance).sum(dim=1)


class ThresholdBlock(nn.Module):
    """A transformer block that prunes, after its attention, the patch tokens scoring under a
    learnable threshold. Owns the original block's layers under their names."""

    def __init__(self, block: nn.Module, keep_tokens: int):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        # the threshold is stored in units of the uniform score 1/N (N patch tokens): class
        # attention scores are ~1/N, so one learning rate fits every model size
        self.threshold = nn.Parameter(torch.ones(()))
        self.keep_tokens = keep_tokens
        self.mode = "static"
        self.state: TokenPolicy | None = None

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}"

    def scores(self, x: torch.Tensor, policy=None):
        x, probs, context = attention_step(self, x, policy)
        return x, class_attention_score(probs, context)

    def cut(self, x: torch.Tensor, policy=None) -> torch.Tensor:
        """The threshold on the raw score scale: theta / N with N the patch tokens present (in
        training, the ones the policy still keeps, per image)."""
        if policy is None:
            return self.threshold / (x.shape[1] - 1)
        return (self.threshold / policy[:, 1:].sum(dim=1).clamp_min(1.0)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "train":
            return self._train_forward(x)
        cut = self.cut(x)
        x, score = self.scores(x)
        patches = x[:, 1:]
        if self.mode == "adaptive":
            over = score > cut
            if x.shape[0] == 1:
                record_selection(torch.nonzero(over[0]).reshape(1, -1))
                kept = patches[:, over[0]]
            else:
                k = max(1, int(over.sum()) // x.shape[0])
                kept = select_tokens(patches, score, k)[0]
        else:
            kept = select_tokens(patches, score, self.keep_tokens)[0]
        x = torch.cat([x[:, :1], kept], dim=1)
        return mlp_step(self, x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        b, n, _ = x.shape
        prev = state.policy if state.policy is not None else x.new_ones(b, n)
        state.block_tokens.append(prev.sum(dim=1))
        cut = self.cut(x, prev)
        x, score = self.scores(x, prev)
        soft = torch.sigmoid((score - cut) / TAU)
        hard = (score > cut).to(x.dtype)
        keep = prev[:, 1:] * (hard + soft - soft.detach())
        state.policy = torch.cat([prev[:, :1], keep], dim=1)
        state.stage_kept.append(keep.sum(dim=1))
        return mlp_step(self, x)  # masked tokens stay in place


@dataclasses.dataclass
class ASViTOptions:
    blocks: tuple[int, ...] = option((4, 7, 10), "0-indexed pruning blocks (AS-ViT: 4,7,10 on DeiT)", nonempty=True)
    budget: float = option(0.7, "target MACs as a fraction of the dense model's, in (0, 1]", gt=0.0, le=1.0)
    epochs: int = option(3, "fine-tuning epochs over the training data", ge=1, why="the thresholds are learned")
    lr: float = option(1e-3, "learning rate of the dense layers x 10 (they learn at lr/10)", gt=0.0)
    threshold_lr: float = option(1e-3, "threshold learning rate, in units of the uniform score 1/N per step (short fine-tunes: 0.05)", gt=0.0)
    batch_size: int = option(64, "fine-tuning batch size", ge=1)
    budget_weight: float = option(2.0, "weight of the MAC-budget loss", ge=0.0)
    distill_weight: float = option(0.5, "weight of the KL loss to the dense model", ge=0.0)
    mode: Literal["static", "adaptive"] = option("static", "static (compiled) or adaptive (PyTorch)")


def block_macs(tokens, dim: int, mlp_ratio: float):
    """MACs of one ViT block on ``tokens`` tokens (qkv, proj, Q.K^T, A.V, MLP)."""
    return (4 + 2 * mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim


@register
class ASViT(Pass):
    name = "asvit"
    level = "torch"
    summary = "AS-ViT: learnable per-stage thresholds on head-weighted class attention, MAC-budget loss"
    provides = (TOKEN_PRUNED, FLOAT_TOKEN_SCORES)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = ASViTOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        nodes = check_blocks(self.name, gm, o.blocks)
        train_set = ctx.training_data(self.name)
        all_blocks = transformer_blocks(gm)
        n0 = tokens_in(all_blocks[0])
        first = gm.get_submodule(all_blocks[0].target)
        dim, _, mlp_ratio = block_dims(first)
        depth = len(all_blocks)
        teacher = frozen_copy(gm)
        stages = []
        for node in nodes:
            stage = ThresholdBlock(gm.get_submodule(node.target), keep_tokens=n0 - 1)
            gm.set_submodule(node.target, stage)
            stages.append(stage)
        dense = depth * block_macs(n0, dim, mlp_ratio)
        first_pruned = [n.target for n in all_blocks].index(nodes[0].target)
        self._init_thresholds(gm, stages, train_set, o, n0, depth, first_pruned, dim, mlp_ratio)
        ctx.record("thresholds_init", [round(s.threshold.item(), 6) for s in stages])

        def budget_loss(state):
            # blocks before the first stage run on all tokens; the others on what the policy kept
            kept = torch.stack(state.block_tokens, dim=1)  # (B, depth - first_pruned)
            macs = first_pruned * block_macs(float(n0), dim, mlp_ratio) + block_macs(kept, dim, mlp_ratio).sum(dim=1)
            return o.budget_weight * (macs.mean() / dense - o.budget).abs()

        distill_fine_tune(
            gm, teacher, nodes[0].target, stages, [s.threshold for s in stages], budget_loss, train_set, ctx,
            epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, distill_weight=o.distill_weight, name=self.name,
            stage_lr=o.threshold_lr, stage_weight_decay=0.0,
        )
        counts = self._calibrate_keep(gm, stages, train_set, o.batch_size)
        for stage, k in zip(stages, counts):
            stage.keep_tokens = k
            stage.mode = o.mode
        ctx.record("thresholds", [round(s.threshold.item(), 6) for s in stages])
        ctx.record("kept", counts)
        return retrace(program, gm)

    @staticmethod
    def _init_thresholds(gm, stages, train_set, o, n0, depth, first_pruned, dim, mlp_ratio) -> None:
        """Start each threshold at the score quantile that keeps a fraction rho of the tokens per
        stage, rho chosen by bisection so that the MAC budget is met."""
        later = depth - first_pruned
        positions = []  # block index (from the first pruned block) where each stage starts pruning
        for s in stages:
            for i, node in enumerate(transformer_blocks(gm)[first_pruned:]):
                if gm.get_submodule(node.target) is s:
                    positions.append(i)

        def macs_ratio(rho: float) -> float:
            tokens, total, stage = float(n0), first_pruned * block_macs(float(n0), dim, mlp_ratio), 0
            for i in range(later):
                total += block_macs(tokens, dim, mlp_ratio)
                if stage < len(positions) and positions[stage] == i:
                    tokens = 1 + rho * (tokens - 1)
                    stage += 1
            return total / (depth * block_macs(float(n0), dim, mlp_ratio))

        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if macs_ratio(mid) < o.budget else (lo, mid)
        rho = hi
        images = next(iter(train_set.loader(o.batch_size, shuffle=True, seed=0)))[0]
        captured = []
        hooks = [s.register_forward_hook(lambda m, i, out, c=captured: c.append(m.scores(i[0])[1])) for s in stages]
        try:
            with torch.no_grad():
                gm(images)  # static mode with k = all tokens: nothing is pruned yet
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for s, score in zip(stages, captured):
                s.threshold.fill_(float(torch.quantile(score.flatten(), 1.0 - rho)) * score.shape[1])

    @staticmethod
    def _calibrate_keep(gm, stages, train_set, batch_size) -> list:
        """Static keep counts: the mean number of tokens over each threshold on the training data
        (thresholds applied in sequence, as at adaptive inference)."""
        totals = [0.0] * len(stages)
        images_seen = 0
        first = next(n.target for n in transformer_blocks(gm) if gm.get_submodule(n.target) is stages[0])
        with torch.no_grad(), policy_mode(gm, first, stages) as state:
            for images, _ in train_set.batches(batch_size):
                state.reset()
                gm(images)
                for i, kept in enumerate(state.stage_kept):
                    totals[i] += float(kept.sum())
                images_seen += images.shape[0]
        return [max(1, round(t / max(images_seen, 1))) for t in totals]
