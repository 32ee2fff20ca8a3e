"""Token pruning for vision transformers: evit, heatvit, asvit, lvtp, trilevel (and the keep maps
that draw what they kept); aftrans, the attention-guided second pass over a selected region.
Shared selection code is in :mod:`.common`."""

from . import aftrans, asvit, evit, heatvit, keep_maps, lvtp, trilevel  # noqa: F401  (registers the passes)
from .aftrans import AFTrans
from .asvit import ASViT
from .evit import EViT
from .heatvit import HeatViT
from .lvtp import LVTP
from .trilevel import TriLevel
