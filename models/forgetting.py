"""Example-level sparsity for the trainer: train on a fixed-size subset of the training set and
swap its least-forgotten examples for held-aside ones (the example level of Tri-Level E-ViT,
Kong et al., AAAI 2023, arXiv 2211.10801, after Toneva et al., "An Empirical Study of Example
Forgetting during Deep Neural Network Learning", ICLR 2019).

    sampler = ForgettingSampler(len(train_set), holdout=0.2, remove=0.05, swap_epochs=(3, 6), seed=0)
    source = sampler.wrap(trainer.source(train_set, 64, seed=0))
    trainer.fit(net, source, opt, epochs=10, hooks=[sampler])

- At the start a random ``holdout`` fraction of the examples is held aside (the pool); the rest is
  the active set, whose size never changes.
- Every presentation of an active example records whether the model classified it correctly
  (arg-max of the logits of the training forward pass, as the released code does).
- At the start of each epoch in ``swap_epochs``: an example's forgetting events are its correct ->
  wrong transitions over its presentations since the last swap; an example never classified
  correctly gets the maximum (the number of presentations, the released code's convention). The
  ``remove`` x size examples with the fewest events leave the active set (ties broken at random
  under the seed: the paper leaves the order of equal counts open and a fixed index order would
  always drop the same part of the set), as many random pool examples join, the removed ones join
  the pool, and the statistics are reset.

Under DDP (``torchrun``) every rank sees its shard of each epoch. The per-epoch record (one int8
per example: -1 not presented, 0 wrong, 1 right) is all-reduced with MAX at the end of the epoch,
so every rank holds the same counts; the swap is decided on rank 0 and the new active set is
broadcast, so all ranks train on the same examples. A presentation is one epoch: each active
example is shown once per epoch (twice, on two ranks, only when the order is padded to the world
size; then it counts as right if either was).
"""

from __future__ import annotations

import torch

from ..ir.errors import PassError
from .trainer import Source, world

__all__ = ["ForgettingSampler", "forgetting_events", "swap_schedule"]


def forgetting_events(history: torch.Tensor) -> torch.Tensor:
    """Forgetting events per example from a (presentations, N) record of -1 (not presented),
    0 (wrong) and 1 (right): the number of right -> wrong transitions between successive
    presentations; an example never right gets the number of presentations (the maximum)."""
    counts = torch.zeros(history.shape[1], dtype=torch.long)
    last = torch.full((history.shape[1],), -1, dtype=torch.int8)
    right = torch.zeros(history.shape[1], dtype=torch.bool)
    shown = torch.zeros(history.shape[1], dtype=torch.long)
    for row in history.to(torch.int8):
        seen = row >= 0
        counts += (seen & (last == 1) & (row == 0)).long()
        right |= row == 1
        shown += seen.long()
        last = torch.where(seen, row, last)
    return torch.where(right, counts, shown)


class ForgettingSampler:
    """The active subset of a training set and its forgetting statistics (see the module doc).
    A trainer hook (``after_forward``, ``end_epoch``, ``start_epoch``) and a :class:`Source`
    wrapper (:meth:`wrap`)."""

    def __init__(self, size: int, *, holdout: float, remove: float, swap_epochs=(), seed: int = 0) -> None:
        if not 0.0 <= holdout < 1.0 or not 0.0 <= remove <= holdout:
            raise PassError(f"example level: need 0 <= remove ({remove}) <= holdout ({holdout}) < 1; the swapped "
                            "examples come from the held-aside pool")
        self.size, self.seed = int(size), int(seed)
        self.count = int(round(remove * size))  # examples swapped at each swap
        self.swap_epochs = tuple(sorted(set(int(e) for e in swap_epochs)))
        self.gen = torch.Generator().manual_seed(self.seed)
        held = int(round(holdout * size))
        self.active = torch.ones(size, dtype=torch.bool)
        self.active[torch.randperm(size, generator=self.gen)[:held]] = False
        self.swaps: list = []  # one entry per swap: {"epoch", "removed", "added"}
        self._reset()

    # -- statistics --------------------------------------------------------------------------
    def _reset(self) -> None:
        self.history: list = []  # per epoch: (N,) int8 record, -1/0/1
        self.epoch_record = torch.full((self.size,), -1, dtype=torch.int8)

    def record(self, index: torch.Tensor, right: torch.Tensor) -> None:
        """Mark the examples at ``index`` (positions in the full set) right or wrong this epoch."""
        current = self.epoch_record[index]
        self.epoch_record[index] = torch.maximum(current, right.to(torch.int8).cpu())

    def close_epoch(self) -> None:
        """Gather this epoch's record over the ranks and append it to the history."""
        rec = self.epoch_record
        if world()[1] > 1:
            rec = rec.to(torch.int32)
            torch.distributed.all_reduce(rec, op=torch.distributed.ReduceOp.MAX)
            rec = rec.to(torch.int8)
        self.history.append(rec)
        self.epoch_record = torch.full((self.size,), -1, dtype=torch.int8)

    def counts(self) -> torch.Tensor:
        """Forgetting events per example since the last swap (:func:`forgetting_events`)."""
        if not self.history:
            return torch.zeros(self.size, dtype=torch.long)
        return forgetting_events(torch.stack(self.history))

    # -- the swap ----------------------------------------------------------------------------
    def swap(self, epoch: int) -> dict:
        """Replace the ``count`` active examples with the fewest forgetting events by as many random
        pool examples; decided on rank 0 and broadcast. Returns the swap's record."""
        active = self.active.clone()
        if world()[0] == 0:
            counts = self.counts().double()
            members = torch.nonzero(active).flatten()
            tie = torch.rand(len(members), generator=self.gen, dtype=torch.float64)
            order = sorted(range(len(members)), key=lambda i: (counts[members[i]].item(), tie[i].item()))
            removed = members[torch.as_tensor(order[: self.count], dtype=torch.long)]
            pool = torch.nonzero(~active).flatten()
            added = pool[torch.randperm(len(pool), generator=self.gen)[: self.count]]
            active[removed] = False
            active[added] = True
        if world()[1] > 1:
            flags = active.to(torch.uint8)
            torch.distributed.broadcast(flags, src=0)
            active = flags.bool()
        removed = torch.nonzero(self.active & ~active).flatten()
        added = torch.nonzero(~self.active & active).flatten()
        self.active = active
        entry = {"epoch": int(epoch), "removed": removed.tolist(), "added": added.tolist()}
        self.swaps.append(entry)
        self._reset()
        return entry

    # -- trainer hooks -----------------------------------------------------------------------
    def after_forward(self, batch, logits) -> None:
        with torch.no_grad():
            self.record(batch.index, logits.argmax(dim=-1) == batch.y)

    def end_epoch(self, epoch: int, loss: float) -> bool:
        self.close_epoch()
        return False

    def start_epoch(self, epoch: int) -> None:
        if epoch in self.swap_epochs and self.count > 0:
            self.swap(epoch)

    def wrap(self, source: Source) -> Source:
        """``source`` restricted to the active examples (in its own order)."""
        def order(epoch: int) -> torch.Tensor:
            full = source.order(epoch)
            return full[self.active[full]]

        return Source(int(self.active.sum()), order, source.fetch, source.batch_size, source.drop_last)


def swap_schedule(epochs: int, every: float, last: float = 1.0) -> tuple:
    """Epochs (0-based, at whose start a swap happens) every ``every`` x ``epochs`` epochs, before
    ``last`` x ``epochs``: the released code swaps at epochs 30, 60, ..., 150 of 300 (every 0.1,
    last 0.5)."""
    period = max(1, int(round(every * epochs)))
    return tuple(e for e in range(period, epochs, period) if e <= last * epochs + 1e-9)

