"""The one training loop of sliver: every pass that trains and the zoo recipes run through :func:`fit`.

    from sliver.models.trainer import fit, source
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = fit(model, source(train_set, batch_size=64, seed=0, phase="fine-tune"), opt, epochs=3,
                 teacher=dense, distill=0.5, hooks=[...], ctx=ctx, phase="fine-tune")

What it does, once for everyone:

- epochs over a :class:`Source` whose order per epoch is fixed by ``(seed, phase, epoch)``
  (:func:`epoch_seed`), so two phases of one pass never replay each other's order;
- a progress bar (``ctx.progress``, or ``progress=``), shown by rank 0 only;
- ``zero_grad`` / ``backward`` / ``step`` (and an optional per-step ``scheduler``);
- the default loss: cross-entropy (optionally label-smoothed) + the hooks' ``extra_loss`` terms
  + ``distill`` x T^2 x KL(teacher || student), both softmaxes at ``temperature`` T (Hinton et
  al., 2015; T = 1 is the plain KL), the teacher frozen (eval mode, no gradients, run under
  ``no_grad``);
- one divergence check after every epoch: a non-finite mean loss is a one-line
  :class:`~sliver.ir.errors.PassError` naming what diverged and the fix (lower lr);
- the loss history: the mean loss per epoch is returned and, with a pass context, recorded under
  the single report key ``train_loss`` as ``{phase: [loss per epoch]}`` (rounded to 4 digits;
  a phase trained again in the same pass extends its list).

Hooks (any object; every method is optional) cover what differs between trainers:

==========================  ===============================================================
``start_epoch(epoch)``      before an epoch (schedules that move with the epoch)
``before_batch(batch)``     before the forward (reset per-step state, set the learning rate)
``extra_loss()``            a term added to the default loss (keep-ratio, budget losses)
``after_forward(batch, logits)``  per-example statistics (e.g. which examples were right)
``after_backward()``        a regulariser acting on the gradients
``after_step()``            projections after the update (masks re-applied, proximal shrink)
``end_epoch(epoch, loss)``  after an epoch; returning True stops training early
``finish()``                after the last epoch (also on an error)
==========================  ===============================================================

Devices and processes. Batches are moved to the device of the model's parameters, so the loop runs
unchanged on a GPU when the model is on one. When ``torch.distributed`` is initialised with more
than one process (``torchrun --nproc-per-node N``; gloo on the CPU, nccl on GPUs) the model is
wrapped in DistributedDataParallel for the forward/backward, every rank draws the same epoch order
and takes every world-size-th example of it (as ``DistributedSampler`` does, padding the order by
its head to a multiple of the world size), and the recorded losses are averaged over all ranks, so
every rank sees the same history and the same divergence verdict. DDP broadcasts rank 0's weights
when it wraps the model and averages the gradients, so all ranks stay equal; floating buffers
(BatchNorm statistics) are averaged over the ranks when training ends.

This module lives in ``sliver.models`` because the zoo recipes (:mod:`.training`) use it and
``models`` must not import ``passes``; the passes import it from here.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import PassError

__all__ = ["Batch", "Source", "source", "tensor_source", "fit", "fine_tune", "epoch_seed", "frozen", "frozen_copy",
           "world", "LOSS_KEY"]

LOSS_KEY = "train_loss"


@dataclass
class Batch:
    """One training batch: inputs, targets and the examples' positions in the training set."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Source:
    """Where the trainer reads examples: ``size`` examples, an ``order(epoch)`` (a permutation
    of example positions, the same on every rank) and ``fetch(index) -> (x, y)``.

    ``drop_last`` drops each rank's ragged last batch."""

    def __init__(self, size: int, order: Callable[[int], torch.Tensor], fetch: Callable[[torch.Tensor], tuple],
                 batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise PassError(f"batch_size={batch_size} must be >= 1")
        self.size, self.order, self.fetch = int(size), order, fetch
        self.batch_size, self.drop_last = int(batch_size), drop_last
        self._drawn = None

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's example positions for ``epoch`` (the order is drawn once per epoch)."""
        if self._drawn is None or self._drawn[0] != epoch:
            self._drawn = (epoch, self.order(epoch))
        order = self._drawn[1]
        rank, size = world()
        if size > 1:
            pad = (-len(order)) % size
            order = torch.cat([order, order[:pad]])[rank::size]
        return order

    def steps(self, epoch: int) -> int:
        n = len(self.shard(epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int) -> Iterable[Batch]:
        order = self.shard(epoch)
        stop = (len(order) // self.batch_size) * self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            index = order[start:start + self.batch_size]
            x, y = self.fetch(index)
            yield Batch(x, y, index)


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    """The shuffle seed of ``epoch`` of training ``phase``: ``seed + epoch`` for the unnamed phase,
    and offset by a stable hash of the phase's name otherwise, so that two phases of one pass (a
    sparse training then a fine-tune) draw different orders under the same seed."""
    offset = 0 if not phase else zlib.crc32(phase.encode()) % 1_000_003
    return (int(seed) + offset + int(epoch)) % 2**63


def tensor_source(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int = 0, phase: str = "",
                  shuffle: bool = True, drop_last: bool = False, generator: torch.Generator | None = None) -> Source:
    """A :class:`Source` over two tensors. The order of epoch e is a permutation drawn from
    ``epoch_seed(seed, phase, e)``, or from ``generator`` (advanced in turn) when one is given."""
    n = int(x.shape[0])

    def order(epoch: int) -> torch.Tensor:
        if not shuffle:
            return torch.arange(n)
        if generator is not None:
            return torch.randperm(n, generator=generator)
        gen = torch.Generator().manual_seed(epoch_seed(seed, phase, epoch))
        # the one draw a DataLoader takes for its workers' base seed, so that the order equals
        # ImageSet.loader(shuffle=True, seed=...)'s
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        return torch.randperm(n, generator=gen)

    return Source(n, order, lambda index: (x[index], y[index]), batch_size, drop_last)


def source(data, batch_size: int, *, seed: int = 0, phase: str = "", shuffle: bool = True,
           drop_last: bool = False) -> Source:
    """A :class:`Source` over a data set with ``images`` and ``targets`` tensors (an
    :class:`~sliver.models.data.ImageSet`). The order equals that of ``data.loader(batch_size,
    shuffle=True, seed=epoch_seed(seed, phase, epoch))``."""
    if getattr(data, "targets", None) is None:
        raise PassError(f"training needs labelled data; {data!r} has no targets")
    return tensor_source(data.images, data.targets, batch_size, seed=seed, phase=phase, shuffle=shuffle,
                         drop_last=drop_last)


# -- processes and devices ----------------------------------------------------------------------
def world() -> tuple:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _wrap(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def _all_sum(values: list, device: torch.device) -> list:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# -- teachers ----------------------------------------------------------------------------------
def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter's requires_grad off (in place); returned."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module``: the dense teacher for distillation."""
    return frozen(copy.deepcopy(module))


def _hooks_with(hooks: Sequence, name: str) -> list:
    return [getattr(h, name) for h in hooks if getattr(h, name, None) is not None]


# -- the loop ----------------------------------------------------------------------------------
def fit(model: nn.Module, data: Source, optimizer: torch.optim.Optimizer, *, epochs: int, what: str = "training",
        phase: str = "", hooks: Sequence = (), loss: Callable | None = None, teacher: nn.Module | None = None, distill: float = 0.0,
        temperature: float = 1.0, label_smoothing: float = 0.0, scheduler: Any = None, ctx: Any = None, progress: Callable | None = None,
        find_unused_parameters: bool = False, leave_training: bool = False) -> list:
    """Train ``model`` for ``epochs`` over ``data`` with ``optimizer``; returns the mean loss per
    epoch (averaged over examples and, under DDP, over all ranks).

    ``loss(net, batch)``, when given, replaces the default loss (``net`` is the model as the
    trainer runs it, DDP-wrapped under torchrun: call it, not the bare model, so that gradients are
    averaged). ``what`` names the training in the divergence error (e.g. ``"heatvit fine-tuning"``);
    ``phase`` names it in the report's ``train_loss`` entry and seeds nothing by itself (the
    :class:`Source` carries the order). ``ctx`` (a pass context) supplies the progress bar and
    the report; ``progress(iterable, desc, total)`` overrides its bar. The model is left in eval
    mode unless ``leave_training``."""
    device = _device(model)
    rank, _ = world()
    if teacher is not None:
        teacher = frozen(teacher).to(device)
    bar = progress if progress is not None else getattr(ctx, "progress", None)
    if rank != 0 or bar is None:
        bar = _no_bar
    net = _wrap(model, device, find_unused_parameters)
    extras = _hooks_with(hooks, "extra_loss")
    before, after_fwd = _hooks_with(hooks, "before_batch"), _hooks_with(hooks, "after_forward")
    after_bwd, after_step = _hooks_with(hooks, "after_backward"), _hooks_with(hooks, "after_step")
    history = []
    label = phase or what
    model.train()
    try:
        for epoch in range(epochs):
            for h in _hooks_with(hooks, "start_epoch"):
                h(epoch)
            total, count = 0.0, 0
            batches = bar(data.batches(epoch), f"{label} {epoch + 1}/{epochs}", data.steps(epoch))
            for batch in batches:
                batch = Batch(batch.x.to(device), batch.y.to(device), batch.index)
                for h in before:
                    h(batch)
                if loss is not None:
                    value = loss(net, batch)
                else:
                    logits = net(batch.x)
                    for h in after_fwd:
                        h(batch, logits)
                    value = F.cross_entropy(logits, batch.y, label_smoothing=label_smoothing)
                    for h in extras:
                        value = value + h()
                    if teacher is not None and distill > 0:
                        t = float(temperature)
                        with torch.no_grad():
                            soft = (teacher(batch.x) / t).softmax(dim=-1)
                        kl = F.kl_div((logits / t).log_softmax(dim=-1), soft, reduction="batchmean")
                        value = value + distill * t * t * kl
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                for h in after_bwd:
                    h()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                with torch.no_grad():
                    for h in after_step:
                        h()
                total += float(value.detach()) * len(batch)
                count += len(batch)
            total, count = _all_sum([total, count], device)
            mean = total / max(count, 1)
            history.append(mean)
            if not math.isfinite(mean):
                current = getattr(ctx, "current_pass", None)
                who = f"{current.name} " if getattr(current, "name", None) else ""
                raise PassError(f"{who}{what} diverged (mean loss per epoch {[round(h, 4) for h in history]}); "
                                "lower lr")
            if any([h(epoch, mean) for h in _hooks_with(hooks, "end_epoch")]):
                break
        _average_buffers(model)
    finally:
        for h in _hooks_with(hooks, "finish"):
            h()
        if not leave_training:
            model.eval()
    if ctx is not None and hasattr(ctx, "record"):
        _record(ctx, phase or what, history)
    return history


def fine_tune(module: nn.Module, teacher: nn.Module | None, train_set, ctx, *, epochs: int, lr: float,
              batch_size: int, distill: float = 0.0, temperature: float = 1.0, params=None, weight_decay: float = 0.0,
              loss: Callable | None = None, seed: int | None = None, drop_last: bool = False, progress=None,
              phase: str = "fine-tune", what: str = "fine-tuning") -> list:
    """:func:`fit` with AdamW and a cosine learning rate from ``lr`` to 0 over all steps: the
    fine-tuning of adapruner, of rapq's quantisation-aware epochs and of aftrans. The loss is
    ``loss`` or the default one (cross-entropy + ``distill`` x T^2 x KL(teacher_T || student_T),
    both softmaxes at temperature T; Hinton et al., 2015; T = 1 is the plain KL; no ``teacher``, no
    KL term). ``params``: what to optimise (default: every parameter of ``module`` that requires
    a gradient). ``seed``: the batch order's (default: the pass context's)."""
    params = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    per_epoch = len(train_set) // batch_size if drop_last else math.ceil(len(train_set) / batch_size)
    steps = max(1, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = source(train_set, batch_size, seed=ctx.seed if seed is None else seed, phase=phase, drop_last=drop_last)
    return fit(module, data, opt, epochs=epochs, what=what, phase=phase, loss=loss, teacher=teacher,
               distill=distill if teacher is not None else 0.0, temperature=temperature, scheduler=sched, ctx=ctx,
               progress=progress)


def _average_buffers(model: nn.Module) -> None:
    """Under DDP, average the floating buffers (BatchNorm running statistics) over the ranks at the
    end: DDP broadcasts rank 0's buffers before every forward, but the last forward leaves each
    rank with its own update."""
    _, size = world()
    if size == 1:
        return
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point():
                torch.distributed.all_reduce(b)
                b.div_(size)


def _record(ctx, phase: str, history: list) -> None:
    recorded = getattr(ctx, "recorded", None)
    previous = dict((recorded(LOSS_KEY) if recorded else None) or {})
    previous[phase] = list(previous.get(phase, [])) + [round(h, 4) for h in history]
    ctx.record(LOSS_KEY, previous)


def _no_bar(iterable, desc: str = "", total: int | None = None):
    return iterable
