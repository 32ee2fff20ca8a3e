"""Quantisation: power-of-two post-training quantisation (rapq, pot-naive), shift-requantised
integer graphs (pot-shift) and polynomial approximations of the nonlinear functions (poly-act).
The quantised layer types themselves are in :mod:`sliver.passes.qlayers` (appmul reads them too)."""

from . import poly_act, pot_shift, rapq  # noqa: F401  (registers the passes)
from .poly_act import PolyAct
from .pot_shift import PotShift
from .rapq import RAPQ, PotNaive
