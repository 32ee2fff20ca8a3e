"""Trained tiny models for the tests: one cached helper, trained once per machine.

    from trained import trained, trained_program
    net, checkpoint = trained("tiny_deit")          # eval-mode module + checkpoint dict
    program = trained_program("tiny_deit", batch=32)

The checkpoints live in the per-machine training cache (``$SLIVER_CACHE`` or ``.sliver-cache/``
at the repository root), keyed by model, seed and a hash of the training code and config (see
``sliver.models.training.cached``). The first call on a cold cache trains with the model's default
recipe (tiny_deit ~35 s, tiny_segmenter ~110 s on two idle cores); later calls, in this process or
any other, load the file. ``python tools/train.py MODEL`` (no ``--out``) fills the same cache.
Nothing is checked in: every checkpoint is rebuilt by that command.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def trained(model: str, seed: int = 0):
    """(module in eval mode, checkpoint dict) of ``model`` trained with its default recipe."""
    from sliver.models import training

    return training.cached(model, seed=seed, progress=True)


@functools.lru_cache(maxsize=None)
def trained_program(model: str, batch: int = 1, seed: int = 0):
    """A torch-level Program of the trained ``model`` with a (batch, C, H, W) example input."""
    from sliver import ir, models

    net, _ = trained(model, seed)
    shape = models.input_shape(model, batch_size=batch)
    return ir.trace(net, torch.zeros(shape), name=model)
