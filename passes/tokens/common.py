"""What every token-pruning pass shares: static token selection, the training-time policy, and the
distillation fine-tune. Block layouts live in :mod:`sliver.passes.transformer`. Token counts are static: a pass reads the count entering each
block from the traced shapes and fixes every keep count at compile time (``topk`` with a constant
``k`` plus ``gather``), so the pruned model exports to ONNX and builds with TVM with static shapes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.fx
from torch import nn

from ...ir.errors import OptionValueError, PassError, UnsupportedOpError
from ...models.trainer import fit, frozen_copy, source  # noqa: F401  (frozen_copy: the teacher of every token pass)
from ..transformer import (  # noqa: F401  (the layout and selection helpers every token pass uses)
    OnnxTopK,
    TokenFusion,
    attention_parts,
    attention_step,
    attention_with_probs,
    block_dims,
    check_blocks,
    keep_count,
    layout_of,
    mlp_step,
    record_selection,
    recording_selections,
    residual_branch,
    select_tokens,
    tokens_in,
    transformer_blocks,
    weighted_rest,
)


# -- training with a token policy ---------------------------------------------------------------
class TokenPolicy:
    """Shared training-time state: the keep policy over the current tokens (B, T), 1 = kept, and
    each pruning stage's kept fraction per image (what the ratio/budget losses read)."""

    def __init__(self) -> None:
        self.policy = None
        self.stage_fractions: list = []  # per stage: kept fraction of its patch tokens (B,)
        self.stage_kept: list = []  # per stage: kept patch tokens (B,)
        self.block_tokens: list = []  # per policy block: tokens it processed (B,)

    def reset(self) -> None:
        self.policy, self.stage_fractions, self.stage_kept, self.block_tokens = None, [], [], []


class PolicyBlock(nn.Module):
    """Training-time wrapper: runs a block with attention restricted to the kept tokens and
    records the number of kept tokens it processed (per image)."""

    def __init__(self, block: nn.Module, state: TokenPolicy):
        super().__init__()
        self.block = block
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        policy = self.state.policy
        if policy is None:
            return self.block(x)
        self.state.block_tokens.append(policy.sum(dim=1))
        x, _, _ = attention_step(self.block, x, policy)
        return mlp_step(self.block, x)


@contextlib.contextmanager
def policy_mode(gm, first_target: str, stages):
    """Run ``gm`` with a token policy inside the ``with``: every block from ``first_target`` on
    becomes a :class:`PolicyBlock` and the pruning ``stages`` switch to ``"train"`` mode, sharing
    the yielded :class:`TokenPolicy`. On exit the blocks are restored, the stages are back in
    ``"static"`` mode and ``gm`` is in eval mode."""
    state = TokenPolicy()
    blocks = transformer_blocks(gm)
    start = [n.target for n in blocks].index(first_target)
    originals = {}
    for node in blocks[start:]:
        module = gm.get_submodule(node.target)
        if module in stages:
            continue  # a stage handles the policy itself
        originals[node.target] = module
        gm.set_submodule(node.target, PolicyBlock(module, state))
    for s in stages:
        s.mode, s.state = "train", state
    try:
        yield state
    finally:
        gm.eval()
        state.reset()
        for target, module in originals.items():
            gm.set_submodule(target, module)
        for s in stages:
            s.mode, s.state = "static", None


def distill_fine_tune(gm, teacher, first_target: str, stages, stage_params, extra_loss, train_set, ctx, *,
                      epochs: int, lr: float, batch_size: int, distill_weight: float, name: str,
                      stage_lr: float | None = None, stage_weight_decay: float = 0.01) -> list:
    """Fine-tune ``gm`` with a token policy through the trainer (:func:`sliver.models.trainer.fit`):
    every block from ``first_target`` on runs as a :class:`PolicyBlock`, the pruning ``stages``
    run in ``"train"`` mode sharing one :class:`TokenPolicy`. Loss = cross-entropy +
    ``extra_loss(state)`` + ``distill_weight`` x KL(student || teacher). The stages' own parameters
    learn at ``stage_lr`` (default ``lr``) with ``stage_weight_decay``, the dense layers at
    ``lr``/10 (AdamW, weight decay 0.01). The blocks are restored and the stages left in eval mode
    afterwards. Runs on ``ctx.device`` (the trainer moves each batch to the student's device) and
    leaves both modules on the CPU. Returns the mean loss per epoch (also in the report's
    ``train_loss``)."""
    stage_ids = {id(p) for p in stage_params}
    dense_params = [p for p in gm.parameters() if id(p) not in stage_ids]
    opt = torch.optim.AdamW(
        [{"params": stage_params, "lr": lr if stage_lr is None else stage_lr, "weight_decay": stage_weight_decay},
         {"params": dense_params, "lr": lr / 10}],
        weight_decay=0.01,
    )
    device = getattr(ctx, "device", torch.device("cpu"))
    try:
        gm.to(device)
        teacher.to(device)
        with policy_mode(gm, first_target, stages) as state:
            hook = _PolicyHook(state, extra_loss)
            return fit(gm, source(train_set, batch_size, seed=ctx.seed), opt, epochs=epochs,
                       what="fine-tuning", phase="fine-tune", hooks=[hook], teacher=teacher,
                       distill=distill_weight, ctx=ctx)
    finally:
        gm.to("cpu")
        teacher.to("cpu")


class _PolicyHook:
    """Trainer hooks of a token-policy fine-tune: a fresh policy per batch, the pass's own loss."""

    def __init__(self, state: TokenPolicy, extra_loss) -> None:
        self.state, self._extra = state, extra_loss

    def before_batch(self, batch) -> None:
        self.state.reset()

    def extra_loss(self):
        return self._extra(self.state)
