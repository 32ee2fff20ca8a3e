"""Token pruning for vision transformers: evit, heatvit, asvit, lvtp, trilevel (and the keep maps that draw
what they kept). Shared selection code is in :mod:`.common`."""

from . import asvit, evit, heatvit, keep_maps, lvtp, trilevel  # noqa: F401  (registers the passes)
from .asvit import ASViT
from .evit import EViT
from .heatvit import HeatViT
from .lvtp import LVTP
from .trilevel import TriLevel
