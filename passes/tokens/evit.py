"""evit: EViT's training-free token reorganisation (Liang et al., "Not All Patches Are What You
Need", ICLR 2022), the baseline the learned selectors are compared with.

At each chosen block, after its attention, the patch tokens are ranked by the attention the CLS
token pays them (averaged over heads); the top ``k = ceil(keep * N)`` are kept, and the others are
fused into one token, their average weighted by that same attention. The MLP then runs on
CLS + kept + fused, so every later block sees ``k + 2`` tokens. k is fixed at compile time from
the traced token count (static shapes: TopK with a constant k + GatherElements).

Defaults follow EViT's DeiT setting: blocks 3, 6, 9 (0-indexed), keep 0.7.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...ir.program import Program
from ...ir.torch_level import retrace
from ..infra.base import Pass, option, register
from ..infra.facts import TOKEN_PRUNED
from .common import (
    attention_step,
    check_blocks,
    keep_count,
    mlp_step,
    select_tokens,
    tokens_in,
    weighted_rest,
)


class EViTBlock(nn.Module):
    """A transformer block that keeps its top-k attentive patch tokens and fuses the rest.

    It owns the original block's layers under the same names (``norm1``, ``attn``, ``norm2``,
    ``mlp``, ... or torchvision's ``ln_1``, ``self_attention``, ...), so checkpoints of the dense
    model still load into it and the block's layout adapter reads it."""

    def __init__(self, block: nn.Module, keep_tokens: int):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.keep_tokens = keep_tokens

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, probs, _ = attention_step(self, x)
        cls_attn = probs[:, :, 0, 1:].mean(dim=1)  # (B, N): attention of CLS to each patch
        patches = x[:, 1:]
        kept, _, kept_scores = select_tokens(patches, cls_attn, self.keep_tokens)
        fused = weighted_rest(patches, cls_attn, kept, kept_scores)
        x = torch.cat([x[:, :1], kept, fused], dim=1)
        return mlp_step(self, x)


@dataclasses.dataclass
class EViTOptions:
    blocks: tuple[int, ...] = option((3, 6, 9), "0-indexed blocks that prune after their attention", nonempty=True)
    keep: float = option(0.7, "fraction of patch tokens kept at each stage, in (0, 1]", gt=0.0, le=1.0)


@register
class EViT(Pass):
    name = "evit"
    level = "torch"
    summary = "EViT: keep the top-k patch tokens by CLS attention, fuse the rest (training-free)"
    provides = (TOKEN_PRUNED,)
    Options = EViTOptions

    def run(self, program: Program, ctx) -> Program:
        program = program.clone()
        gm = program.module
        nodes = check_blocks(self.name, gm, self.options.blocks)
        if self.options.keep >= 1.0:
            ctx.record("tokens", [])
            return program
        schedule = []
        tokens = None
        for index, node in zip(sorted(self.options.blocks), nodes):
            # tokens entering this stage: the traced count, or what the previous stage left
            # (blocks between stages keep the count)
            n_in = tokens_in(node) if tokens is None else tokens
            k = keep_count(self.options.keep, n_in - 1)
            gm.set_submodule(node.target, EViTBlock(gm.get_submodule(node.target), k))
            tokens = k + 2
            schedule.append({"block": index, "tokens_in": n_in, "kept": k, "tokens_out": tokens})
        ctx.record("tokens", schedule)
        return retrace(program, gm)
