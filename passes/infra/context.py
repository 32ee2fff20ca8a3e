"""The pass context: what a pass may need besides the program.

- ``data``: calibration / fine-tuning / evaluation data: a data set (``sliver.models.data``) or a
  mapping split name -> data set; passes read it through :meth:`training_data`;
- ``seed`` and ``rng``: passes are deterministic under the seed; the manager re-seeds torch,
  numpy and ``random`` with it before every pass;
- ``progress(iterable, desc)``: a progress bar for long work (tqdm, on when asked);
- ``cost_model``: a latency/energy model for latency-aware choices (filled by the caller, e.g.
  ``sliver.backends.fpga``; passes never import backends themselves);
- ``record(key, value)``: statistics a pass wants in the report;
- ``device``: where passes that train or calibrate run (``"cpu"`` or ``"cuda"``); they move the
  module and each batch there with :meth:`to_device` and hand back a CPU program.

``data`` may also be any ``torch.utils.data.Dataset`` of (image, label) pairs:
:meth:`training_data` wraps it so that passes read it like sliver's own sets (``loader``,
``batches``, ``take``, ``images``, ``targets``), item by item, never all at once.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np


class PassContext:
    def __init__(self, data: Any = None, seed: int = 0, progress: bool = False, cost_model: Any = None,
                 device: Any = "cpu", **extra: Any):
        self.data = data
        self.device = device_of(device)
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
        return as_pass_data(data)

    def to_device(self, *values):
        """``values`` (tensors or modules) on :attr:`device`; one value comes back bare."""
        moved = tuple(v.to(self.device) for v in values)
        return moved[0] if len(moved) == 1 else moved

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


def device_of(device) -> "Any":
    """A ``torch.device`` for ``device``; a one-line error for cuda where torch sees no GPU."""
    import torch

    from ...ir.errors import PassError

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PassError("device cuda: torch sees no GPU on this machine; use device='cpu'")
    return device


def as_pass_data(data):
    """``data`` as passes read it: sliver's own sets as they are, any other
    ``torch.utils.data.Dataset`` of (image, label) pairs wrapped in :class:`DatasetView`."""
    import torch

    if hasattr(data, "loader") and hasattr(data, "batches"):
        return data
    if isinstance(data, torch.utils.data.Dataset):
        return DatasetView(data)
    from ...ir.errors import PassError

    raise PassError(f"pass data must be a torch.utils.data.Dataset or a sliver data set, got {type(data).__name__}")


class _LazyItems:
    """Images of a Dataset as an indexable, lazily read array (slices read just those items)."""

    def __init__(self, view: "DatasetView", count: int):
        self.view, self.count = view, count

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self):
        import torch

        return torch.Size((self.count, *self.view.item(0)[0].shape))

    def __getitem__(self, index):
        import torch

        if isinstance(index, int):
            return self.view.item(index)[0]
        indices = range(self.count)[index] if isinstance(index, slice) else [int(i) for i in index]
        return torch.stack([self.view.item(i)[0] for i in indices])


class DatasetView:
    """A user's ``torch.utils.data.Dataset`` of (image tensor, int label) pairs with the reading
    interface of sliver's sets. Items are read when a pass asks for them."""

    task = "classification"

    def __init__(self, dataset, count: int | None = None):
        self.dataset = dataset
        self.count = len(dataset) if count is None else count
        self.name = type(dataset).__name__
        self.meta: dict = {}

    def __len__(self) -> int:
        return self.count

    def item(self, index: int):
        import torch

        value = self.dataset[index]
        if not isinstance(value, (tuple, list)) or len(value) < 2:
            from ...ir.errors import PassError

            raise PassError(f"{self.name}[{index}] is not an (image, label) pair; a pass's data set must yield both")
        image, label = value[0], value[1]
        return torch.as_tensor(image, dtype=torch.float32), torch.as_tensor(label, dtype=torch.int64)

    def __getitem__(self, index):
        return self.item(index)

    @property
    def images(self):
        return _LazyItems(self, self.count)

    @property
    def targets(self):
        import torch

        return torch.stack([self.item(i)[1] for i in range(self.count)])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.item(0)[0].shape)

    @property
    def num_classes(self) -> int:
        return int(self.targets.max()) + 1 if self.count else 0

    def take(self, count: int) -> "DatasetView":
        return DatasetView(self.dataset, max(0, min(int(count), self.count)))

    def loader(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        import torch

        subset = torch.utils.data.Subset(self, range(self.count))
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return torch.utils.data.DataLoader(subset, batch_size=int(batch_size), shuffle=shuffle,
                                           generator=generator, drop_last=drop_last, num_workers=0)

    def batches(self, batch_size: int = 64):
        for start in range(0, self.count, batch_size):
            stop = min(start + batch_size, self.count)
            pairs = [self.item(i) for i in range(start, stop)]
            import torch

            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
