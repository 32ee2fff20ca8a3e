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
from ..infra.facts import APPMUL, QUANTIZED_POT, TOKEN_PRUNED
from .common import (
    attention_step,
    check_blocks,
    fit,
    frozen_copy,
    keep_count,
    mlp_step,
    source,
    tokens_in,
    TokenFusion,
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
        self.fusion = TokenFusion(keep_tokens)

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, probs, _ = attention_step(self, x)
        cls_attn = probs[:, :, 0, 1:].mean(dim=1)  # (B, N): attention of CLS to each patch
        x = self.fusion(x, cls_attn)  # CLS, the top-k patches, their fused rest
        return mlp_step(self, x)


@dataclasses.dataclass
class EViTOptions:
    blocks: tuple[int, ...] = option((3, 6, 9), "0-indexed blocks that prune after their attention", nonempty=True)
    keep: float = option(0.7, "fraction of patch tokens kept at each stage, in (0, 1]", gt=0.0, le=1.0)
    epochs: int = option(0, "fine-tuning epochs with the tokens pruned (EViT trains so); 0 = training-free", ge=0)
    lr: float = option(1e-4, "fine-tuning learning rate (AdamW)", gt=0.0)
    batch_size: int = option(32, "fine-tuning batch size", ge=1)
    distill_weight: float = option(0.5, "weight of the KL loss to the dense model", ge=0.0)


@register
class EViT(Pass):
    name = "evit"
    level = "torch"
    summary = "EViT: keep the top-k patch tokens by CLS attention, fuse the rest (training-free)"
    provides = (TOKEN_PRUNED,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = EViTOptions

    def run(self, program: Program, ctx) -> Program:
        program = program.clone()
        gm = program.module
        nodes = check_blocks(self.name, gm, self.options.blocks)
        if self.options.keep >= 1.0:
            ctx.record("tokens", [])
            return program
        train_set = ctx.training_data(self.name) if self.options.epochs > 0 else None
        teacher = frozen_copy(gm) if train_set is not None else None
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
        if train_set is not None:
            gm.recompile()
            _fine_tune(gm, teacher, self.options, train_set, ctx)
        return retrace(program, gm)


def _fine_tune(gm, teacher, o, train_set, ctx) -> list:
    """EViT fine-tunes the network with the token reorganisation in place (Liang et al., ICLR
    2022, Sec. 4: the selection is not learned, the backbone learns to work with it). Here: the
    static top-k selection itself (gradients reach the kept tokens through the gather and the
    fused token through its weights), loss = cross-entropy + ``distill_weight`` x KL to the dense
    model (DeiT-style soft distillation, as the learned selectors of sliver use), AdamW, through
    the trainer (:func:`sliver.models.trainer.fit`, report key ``train_loss``) on ``ctx.device``.
    Returns the mean loss per epoch."""
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=o.lr, weight_decay=0.01)
    try:
        gm.to(ctx.device)
        return fit(gm, source(train_set, o.batch_size, seed=ctx.seed, phase="fine-tune"), opt, epochs=o.epochs,
                   what="evit fine-tuning", phase="fine-tune", teacher=teacher, distill=o.distill_weight, ctx=ctx)
    finally:
        gm.to("cpu")
