"""Structure pruning: channel groups (:mod:`.channels`), adapruner, ofa-prune and block-prune."""

from . import adapruner, block_prune, ofa_prune  # noqa: F401  (registers the passes)
from .adapruner import AdaPruner
from .block_prune import BlockPrune
from .ofa_prune import OFAPrune
