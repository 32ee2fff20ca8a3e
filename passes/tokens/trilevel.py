"""trilevel: Tri-Level E-ViT's training-time sparsity (Kong et al., "Peeling the Onion: Hierarchical
Reduction of Data Redundancy for Efficient Vision Transformer Training", AAAI 2023,
arXiv 2211.10801), and the static model it leaves.

Three levels, each switched off on its own (``keep=1``, ``attn=1``, ``remove=0``):

- Examples (:mod:`sliver.models.forgetting`): a random ``holdout`` of the training set is held
  aside; at scheduled epochs the ``remove`` x |data set| active examples with the fewest
  forgetting events are swapped for random held-aside ones; the training set keeps its size.
- Tokens: in each block of ``blocks`` (0-indexed), after the attention residual and before the MLP,
  the CLS token and the top ``ceil(N r)`` patch tokens by head-averaged CLS attention are kept and
  the rest dropped (no fused token): the sequence shrinks, stage after stage.
- Attention connections: at the same blocks, from the head-averaged patch-to-patch attention among
  the kept tokens, each patch row keeps its top ``ceil(rN a)`` entries; the CLS row and column are
  always kept. The 0/1 mask multiplies the softmax exponentials (normalised as
  ``(e + eps/N) / (sum e + eps)``, the released code's form) of every following block up to and
  including the next pruning block, whose own mask then replaces it.

Schedules (the released code's, scaled to the run): r and a are 1 for the first ``warmup`` x epochs,
then fall on a cosine, per step, to ``keep`` and ``attn`` at ``ramp`` x epochs (10 and 110 of
300 in the paper: warmup 0.0333, ramp 0.3667). Example swaps happen at the start of every
``swap_every`` x epochs up to ``swap_until`` x epochs (30, 60, ..., 150 of 300: 0.1 and 0.5).

Choices where the paper or its code leaves one open, and why:

- Row top-k is exact (``TopK`` indices scattered into zeros): the released code thresholds at the
  k-th value, which keeps more than k entries on ties; an exact count is what a static-shape
  kernel and the FPGA model can rely on.
- The connection mask carries no gradient and the token indices none (as in the code); the kept
  tokens' features do.
- Evaluation and the compiled model use the final ratios with keep counts fixed per stage from the
  traced token count: stage s keeps ``ceil(N_{s-1} keep)`` patch tokens of the ``N_{s-1}`` that
  enter it (the code's ``ceil(N r)`` applied to the current count) and each patch row
  ``ceil(N_s attn)`` connections.
- The pass (``trilevel{...}`` on a trained model) fine-tunes with AdamW at ``lr`` on cross-entropy
  with the same three levels and schedules scaled to its ``epochs``; ``epochs=0`` only rewrites the
  model to its static form (e.g. for a checkpoint trained with ``tools/train.py --sparsity``).

What is left is a static-shape model: ``TopK`` with constant k + ``GatherElements`` for the
tokens, ``TopK`` + ``ScatterElements`` + ``Concat`` for the mask, an ``Exp``/``Mul``/``Div``
softmax; it exports to ONNX and builds with TVM. The FPGA cost model
(``sliver.backends.fpga``) recognises the mask and counts the connections it removes as skippable
work in the masked blocks' Q.K^T and A.V products.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...ir.errors import PassError
from ...ir.program import Program
from ...ir.torch_level import is_transformer_block, retrace
from ...models import trainer
from ...models.forgetting import ForgettingSampler, swap_schedule
from ..infra.base import Pass, option, register
from ..infra.facts import TOKEN_PRUNED
from .common import OnnxTopK, attention_parts, check_blocks, keep_count, residual_branch, select_tokens, tokens_in


# -- the model ----------------------------------------------------------------------------------
class TriLevelState:
    """What the blocks of one model share: the current ratios (training) and the connection mask
    a pruning block leaves for the blocks after it."""

    def __init__(self, keep: float = 1.0, attn: float = 1.0) -> None:
        self.keep, self.attn = keep, attn
        self.mask = None


def connection_mask(patch_attn: torch.Tensor, k: int) -> torch.Tensor:
    """The (B, M+1, M+1) 0/1 mask of the M patch tokens' attention (B, M, M): each patch row keeps
    its top ``k`` entries (ties: lower index first), the CLS row and column are all ones.

    Static ops: ``TopK`` (constant k), ``ScatterElements`` into zeros, ``Concat`` with ones."""
    _, index = OnnxTopK.apply(patch_attn, k)
    rows = torch.zeros_like(patch_attn).scatter(-1, index, 1.0)
    ones_col = torch.ones_like(patch_attn[:, :, :1])
    body = torch.cat([ones_col, rows], dim=2)  # (B, M, M+1)
    top = torch.ones_like(body[:, :1, :])  # the CLS row
    return torch.cat([top, body], dim=1)


class TriLevelBlock(nn.Module):
    """A transformer block under Tri-Level sparsity. It owns the original block's layers under
    their names (checkpoints of the dense model load into it).

    ``prunes``: this block selects tokens and/or builds a new connection mask after its attention;
    ``masked``: its attention reads the mask an earlier pruning block left. ``keep_tokens`` and
    ``attn_keep`` fix the counts (static model); None = from the shared state's current ratios
    (training)."""

    def __init__(self, block: nn.Module, state: TriLevelState, *, prunes: bool, masked: bool, tokens: bool,
                 connections: bool, keep_tokens: int | None = None, attn_keep: int | None = None) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.state = state
        self.prunes, self.masked, self.tokens, self.connections = prunes, masked, tokens, connections
        self.keep_tokens, self.attn_keep = keep_tokens, attn_keep

    def extra_repr(self) -> str:
        return (f"prunes={self.prunes}, masked={self.masked}, keep_tokens={self.keep_tokens}, "
                f"attn_keep={self.attn_keep}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.state.mask if (self.masked and self.connections) else None
        out, probs, _ = attention_parts(self.attn, self.norm1(x), connections=mask)
        x = x + residual_branch(self, "ls1", out)
        if self.prunes:
            n = x.shape[1] - 1
            index = None
            if self.tokens:
                k = self.keep_tokens if self.keep_tokens is not None else keep_count(self.state.keep, n)
                if k < n:
                    cls_attn = probs[:, :, 0, 1:].mean(dim=1)
                    kept, index, _ = select_tokens(x[:, 1:], cls_attn, k)
                    x = torch.cat([x[:, :1], kept], dim=1)
            if self.connections:
                with torch.no_grad():
                    patch = probs[:, :, 1:, 1:].mean(dim=1)
                    if index is not None:
                        rows = index.unsqueeze(-1).expand(-1, -1, patch.shape[-1])
                        patch = torch.gather(patch, 1, rows)
                        patch = torch.gather(patch, 2, index.unsqueeze(1).expand(-1, patch.shape[1], -1))
                    m = patch.shape[-1]
                    a = self.attn_keep if self.attn_keep is not None else keep_count(self.state.attn, m)
                    self.state.mask = connection_mask(patch, a).detach()
        return x + residual_branch(self, "ls2", self.mlp(self.norm2(x)))


def block_names(module: nn.Module) -> list:
    """Qualified names of the transformer blocks of ``module`` (a GraphModule or an eager model),
    in order."""
    names = []
    for name, sub in module.named_modules():
        if name and is_transformer_block(sub) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def install(module: nn.Module, o, *, static_tokens: int | None = None) -> TriLevelState:
    """Replace the blocks of ``module`` from the first pruning block on by :class:`TriLevelBlock`
    sharing one state (blocks that already are Tri-Level blocks, after training, are kept and
    updated). ``static_tokens`` (patch tokens entering the first pruning block) fixes the counts
    from the final ratios (the static model); without it the counts follow the state."""
    names = block_names(module)
    blocks = sorted(o.blocks)
    if not names:
        raise PassError("trilevel needs a vision transformer; the model has no attention blocks")
    if blocks[-1] >= len(names):
        raise PassError(f"trilevel: block {blocks[-1]} is past the model's depth ({len(names)} blocks, 0.."
                        f"{len(names) - 1}); set blocks= within it")
    tokens_on, attn_on = o.keep < 1.0, o.attn < 1.0
    first = module.get_submodule(names[blocks[0]])
    state = first.state if isinstance(first, TriLevelBlock) else TriLevelState()
    state.keep, state.attn, state.mask = o.keep, o.attn, None
    n = static_tokens
    for i, name in enumerate(names[blocks[0]:], start=blocks[0]):
        block = module.get_submodule(name)
        keep_tokens = attn_keep = None
        if i in blocks and n is not None:
            keep_tokens = keep_count(o.keep, n) if tokens_on else n
            attn_keep = keep_count(o.attn, keep_tokens) if attn_on else None
            n = keep_tokens
        if isinstance(block, TriLevelBlock):
            block.keep_tokens, block.attn_keep = keep_tokens, attn_keep
        else:
            module.set_submodule(name, TriLevelBlock(block, state, prunes=i in blocks, masked=i > blocks[0],
                                                     tokens=tokens_on, connections=attn_on, keep_tokens=keep_tokens,
                                                     attn_keep=attn_keep))
    return state


def ratio_at(progress: float, final: float, warmup: float, ramp: float) -> float:
    """The scheduled ratio at ``progress`` (in epochs, fractional): 1 before ``warmup``, ``final``
    from ``ramp`` on, a cosine between (EViT's keep-rate schedule, which the released code uses)."""
    if progress < warmup:
        return 1.0
    if progress >= ramp or ramp <= warmup:
        return final
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (ramp - warmup)))


# -- options ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TriLevelOptions:
    keep: float = option(0.7, "token keep ratio per stage (1 = token level off)", gt=0.0, le=1.0)
    attn: float = option(0.3, "attention connections kept per patch row (1 = attention level off)", gt=0.0, le=1.0)
    remove: float = option(0.05, "examples swapped per swap, fraction of the data set (0 = example level off)",
                           ge=0.0, lt=1.0)
    blocks: tuple[int, ...] = option((3, 6, 9), "0-indexed pruning blocks", nonempty=True, ge=0)
    holdout: float = option(0.2, "fraction of the training set held aside (example level)", ge=0.0, lt=1.0)
    swap_every: float = option(0.1, "swap period, fraction of the epochs", gt=0.0, le=1.0)
    swap_until: float = option(0.5, "last swap, fraction of the epochs", ge=0.0, le=1.0)
    warmup: float = option(10 / 300, "fraction of the epochs at ratio 1 before the cosine", ge=0.0, le=1.0)
    ramp: float = option(110 / 300, "fraction of the epochs at which keep and attn reach their final values",
                         ge=0.0, le=1.0)
    epochs: int = option(3, "pass: fine-tuning epochs (0: static rewrite only)", ge=0)
    lr: float = option(1e-4, "pass: fine-tuning learning rate (AdamW)", gt=0.0)
    batch_size: int = option(64, "pass: fine-tuning batch size", ge=1)

    def validate(self) -> None:
        if self.remove > self.holdout:
            raise ValueError(f"remove={self.remove} must be <= holdout={self.holdout}: swapped examples come from "
                             "the held-aside pool (remove=0 switches the example level off)")
        if self.warmup > self.ramp:
            raise ValueError(f"warmup={self.warmup} must be <= ramp={self.ramp}")

    @property
    def levels(self) -> dict:
        return {"examples": self.remove > 0, "tokens": self.keep < 1.0, "attention": self.attn < 1.0}


# -- training -----------------------------------------------------------------------------------
class TriLevelTraining:
    """Tri-Level sparsity as a trainer extension: ``prepare(net, epochs)`` installs the blocks,
    ``wrap(source)`` restricts the examples to the sampler's active set, and the trainer hooks
    move the ratios on their schedules and keep the forgetting statistics.

        tri = TriLevelTraining(options, seed=0)
        net = tri.prepare(net, epochs)
        trainer.fit(net, tri.wrap(trainer.source(train_set, 64)), opt, epochs=epochs, hooks=[tri])
    """

    def __init__(self, options: TriLevelOptions, seed: int = 0) -> None:
        self.options, self.seed = options, seed
        self.state = None
        self.sampler = None
        self.source = None
        self.epochs = 0
        self.progress = 0.0

    def prepare(self, net: nn.Module, epochs: int) -> nn.Module:
        self.epochs = int(epochs)
        self.state = install(net, self.options)
        return net

    def wrap(self, source: trainer.Source) -> trainer.Source:
        o = self.options
        if o.remove > 0:
            self.sampler = ForgettingSampler(source.size, holdout=o.holdout, remove=o.remove, seed=self.seed,
                                             swap_epochs=swap_schedule(self.epochs, o.swap_every, o.swap_until))
            source = self.sampler.wrap(source)
        self.source = source
        return source

    def _set(self, progress: float) -> None:
        o, e = self.options, self.epochs
        self.progress = progress
        self.state.keep = ratio_at(progress, o.keep, o.warmup * e, o.ramp * e)
        self.state.attn = ratio_at(progress, o.attn, o.warmup * e, o.ramp * e)

    # trainer hooks
    def start_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.start_epoch(epoch)
        self._epoch, self._step = epoch, 0
        self._steps = max(1, self.source.steps(epoch)) if self.source is not None else 1

    def before_batch(self, batch) -> None:
        self._set(self._epoch + self._step / self._steps)
        self._step += 1

    def after_forward(self, batch, logits) -> None:
        if self.sampler is not None:
            self.sampler.after_forward(batch, logits)

    def end_epoch(self, epoch: int, loss: float) -> bool:
        if self.sampler is not None:
            self.sampler.end_epoch(epoch, loss)
        return False

    def finish(self) -> None:
        if self.state is not None:  # evaluation runs at the final ratios
            self.state.keep, self.state.attn = self.options.keep, self.options.attn

    def report(self) -> dict:
        out = {"levels": self.options.levels}
        if self.sampler is not None:
            out["swaps"] = [{"epoch": s["epoch"], "swapped": len(s["removed"])} for s in self.sampler.swaps]
            out["active_examples"] = int(self.sampler.active.sum())
        return out


# -- the pass -----------------------------------------------------------------------------------
@register
class TriLevel(Pass):
    name = "trilevel"
    level = "torch"
    summary = "Tri-Level E-ViT: example, token and attention-connection sparsity; fine-tune + static top-k model"
    provides = (TOKEN_PRUNED,)
    Options = TriLevelOptions

    def run(self, program: Program, ctx) -> Program:
        o = self.options
        program = program.clone()
        gm = program.module
        nodes = check_blocks(self.name, gm, o.blocks)
        n0 = tokens_in(nodes[0]) - 1
        if o.epochs > 0:
            train_set = ctx.training_data(self.name)
            tri = TriLevelTraining(o, seed=ctx.seed)
            tri.prepare(gm, o.epochs)
            source = tri.wrap(trainer.source(train_set, o.batch_size, seed=ctx.seed))
            trainer.fit(gm, source, torch.optim.AdamW(gm.parameters(), lr=o.lr, weight_decay=0.0), epochs=o.epochs,
                        what="fine-tuning", phase="fine-tune", hooks=[tri], ctx=ctx)
            for key, value in tri.report().items():
                ctx.record(key, value)
        install(gm, o, static_tokens=n0)
        ctx.record("tokens", static_schedule(gm))
        return retrace(program, gm)


def static_schedule(module: nn.Module) -> list:
    """Per pruning block of a static Tri-Level model: patch tokens in, kept, connections per row."""
    out = []
    for i, name in enumerate(block_names(module)):
        block = module.get_submodule(name)
        if isinstance(block, TriLevelBlock) and block.prunes:
            out.append({"block": i, "kept": block.keep_tokens, "attn_kept_per_row": block.attn_keep})
    return out
