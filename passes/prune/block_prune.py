"""block-prune: block-structured weight sparsity for convolution and linear layers (after
"Mobile or FPGA? A Comprehensive Evaluation on Energy Efficiency and a Unified Optimization
Framework", ACM TECS 2022, arXiv 2106.09166).

Each dense layer's weight is viewed as its GEMM matrix ``W`` (output channels x reduction, the
reduction of a conv being ``in_channels x kh x kw``) and cut into ``block = rows,cols`` tiles
(``rows`` output channels by ``cols`` reduction elements; tiles at the edges are smaller and a
layer with fewer than ``rows`` outputs uses all of them). In every layer the fraction
``sparsity`` of tiles with the smallest Frobenius norm is set to zero (a uniform per-layer rate:
the paper leaves the allocation open, and a uniform rate keeps each layer's work balanced on the
accelerator). The network is then fine-tuned for ``finetune_epochs`` (5 by default; it needs
data) with the zero tiles held at zero: without fine-tuning the default 50% of tiles destroys a
small network (tiny_resnet on digits: 98.89% -> 10.00%), so a user who wants the raw mask must
ask for it with ``finetune_epochs=0``.

The regular pattern is what hardware can exploit: the FPGA model (``sliver.backends.fpga``)
skips the reduction rows that are zero across a whole column tile of its GEMM array, which the
default ``block=64,4`` produces on the ZCU102's 64-column array. The program stays dense: no
ONNX or TVM op changes, so TVM runs it at dense speed (see the README for the measurement).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import retrace
from ...models.trainer import fit, source
from ..infra.base import Pass, option, register
from ..infra.facts import APPMUL, BLOCK_SPARSE, QUANTIZED_POT


#: default fine-tuning: zeroing half of the tiles without it took the trained tiny_resnet from
#: 98.89% to 10.00% on digits (chance), 2 epochs to 93.33%, 5 epochs to 98.61% (docs/composition.md)
FINETUNE_EPOCHS = 5


@dataclasses.dataclass
class BlockPruneOptions:
    block: tuple[int, ...] = option((64, 4), "tile shape: output channels, reduction elements", ge=1)
    sparsity: float = option(0.5, "fraction of tiles zeroed in each layer", ge=0.0, lt=1.0)
    min_blocks: int = option(4, "layers with fewer tiles stay dense", ge=1)
    finetune_epochs: int = option(FINETUNE_EPOCHS, "masked fine-tuning epochs (needs data; 0: none, and the accuracy is not recovered)", ge=0)
    lr: float = option(1e-3, "fine-tuning learning rate", gt=0.0)
    batch_size: int = option(64, "fine-tuning batch size", ge=1)

    def validate(self) -> None:
        if len(self.block) != 2:
            raise ValueError(f"block={','.join(map(str, self.block))} must be two positive sizes: rows,cols")


def block_mask(matrix: torch.Tensor, block: tuple, sparsity: float) -> torch.Tensor:
    """Keep-mask (same shape as ``matrix``, rows x reduction) zeroing the ``sparsity`` fraction of
    ``block`` tiles with the smallest Frobenius norm (ties: the earlier tile is kept)."""
    rows, cols = matrix.shape
    br, bc = min(block[0], rows), min(block[1], cols)
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = F.pad(matrix.detach().double() ** 2, (0, nc * bc - cols, 0, nr * br - rows))
    norms = padded.reshape(nr, br, nc, bc).sum(dim=(1, 3)).flatten()
    drop = int(round(sparsity * norms.numel()))
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    if drop:
        order = np.lexsort((-np.arange(norms.numel()), norms.numpy()))  # smallest first, later tiles first on ties
        keep[torch.as_tensor(order[:drop])] = False
    tiles = keep.reshape(nr, nc)
    full = tiles.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return full[:rows, :cols]


@register
class BlockPrune(Pass):
    name = "block-prune"
    level = "torch"
    summary = "block-structured weight sparsity (zero tiles) for conv/linear layers"
    provides = (BLOCK_SPARSE,)
    refuses = {QUANTIZED_POT: "", APPMUL: ""}
    Options = BlockPruneOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        masks, zeroed, total = {}, 0, 0
        for name, mod in gm.named_modules():
            dense_conv = isinstance(mod, nn.Conv2d) and mod.groups == 1
            if not (dense_conv or isinstance(mod, nn.Linear)):
                continue
            matrix = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            br, bc = min(o.block[0], matrix.shape[0]), min(o.block[1], matrix.shape[1])
            if -(-matrix.shape[0] // br) * -(-matrix.shape[1] // bc) < o.min_blocks:
                continue
            mask = block_mask(matrix, tuple(o.block), o.sparsity).reshape(mod.weight.shape)
            with torch.no_grad():
                mod.weight.mul_(mask.to(mod.weight.dtype))
            masks[name] = mask
            zeroed += int((~mask).sum())
            total += mask.numel()
        if not masks:
            raise PassError(f"block-prune: no conv/linear layer of {program.name} has {o.min_blocks} tiles of "
                            f"{o.block[0]}x{o.block[1]}; use a smaller block or min_blocks")
        if o.finetune_epochs:
            _masked_fine_tune(gm, masks, ctx.training_data(self.name), ctx, o)
        ctx.record("layers", len(masks))
        ctx.record("weight_sparsity", round(zeroed / total, 4))
        return retrace(program, gm)


def _masked_fine_tune(gm, masks: dict, train_set, ctx, o) -> list:
    """Cross-entropy fine-tune (AdamW) with the zeroed tiles re-applied after every step."""
    return fit(gm, source(train_set, o.batch_size, seed=ctx.seed), torch.optim.AdamW(gm.parameters(), lr=o.lr,
               weight_decay=0.0), epochs=o.finetune_epochs, what="fine-tuning", phase="fine-tune",
               hooks=[_Masks(gm, masks)], ctx=ctx)


class _Masks:
    """Trainer hook: multiply each pruned weight by its keep-mask after every step."""

    def __init__(self, gm, masks: dict) -> None:
        self.pairs = [(gm.get_submodule(name).weight, mask) for name, mask in masks.items()]

    def after_step(self) -> None:
        for w, mask in self.pairs:
            w.mul_(mask.to(w.dtype))
