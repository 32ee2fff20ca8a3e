"""The pass context: what a pass may need besides the program.

- ``data``: calibration / fine-tuning / evaluation data: a data set (``sliver.models.data``) or a
  mapping split name -> data set; passes read it through :meth:`training_data`;
- ``seed`` and ``rng``: passes are deterministic under the seed; the manager re-seeds torch,
  numpy and ``random`` with it before every pass;
- ``progress(iterable, desc)``: a progress bar for long work (tqdm, on when asked);
- ``cost_model``: a latency/energy model for latency-aware choices (filled by the caller, e.g.
  ``sliver.backends.fpga``; passes never import backends themselves);
- ``record(key, value)``: statistics a pass wants in the report.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np


class PassContext:
    def __init__(self, data: Any = None, seed: int = 0, progress: bool = False, cost_model: Any = None, **extra: Any):
        self.data = data
        self.seed = int(seed)
        self.show_progress = bool(progress)
        self.cost_model = cost_model
        self.extra = dict(extra)
        self.rng = np.random.default_rng(self.seed)
        self.current_pass = None
        self._notes: dict = {}

    # called by the pipeline runner
    def _begin(self, p) -> None:
        import torch

        self.current_pass = p
        self._notes = {}
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)
        self.rng = np.random.default_rng(self.seed)

    def _end(self) -> dict:
        notes, self._notes, self.current_pass = self._notes, {}, None
        return notes

    # for passes
    def training_data(self, pass_name: str):
        """The training split from ``data``: a data set itself, or a mapping with a ``"train"``
        entry (e.g. ``{"train": data.digits("train"), "val": data.digits("val")}``). Passes that
        train (token selectors, thresholds, fine-tuning) call this; without data it is a one-line
        error naming the pass and the fix."""
        from ...ir.errors import PassError

        data = self.data
        if isinstance(data, dict):
            data = data.get("train")
        if data is None:
            raise PassError(
                f"pass {pass_name!r} trains and needs data: run the pipeline with "
                "data=sliver.models.data.digits('train') (or --data digits), or set its epochs=0"
            )
        return data

    def record(self, key: str, value: Any) -> None:
        """Add a statistic to this pass's entry in the report (JSON-serialisable values)."""
        self._notes[key] = value

    def recorded(self, key: str, default: Any = None) -> Any:
        """What this pass has recorded under ``key`` so far (``default`` if nothing)."""
        return self._notes.get(key, default)

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
        if not self.show_progress:
            return iterable
        from tqdm import tqdm

        name = self.current_pass.name if self.current_pass is not None else ""
        return tqdm(iterable, desc=f"{name}: {desc}" if desc else name, total=total, leave=False)
