"""FAMES-style approximate multipliers (arXiv 2411.18055).

- :mod:`.netlist`, :mod:`.multipliers`: gate-level netlists of exact and approximate multipliers;
- :mod:`.library`: the generated AppMul library (LUTs from exhaustive simulation, error and
  energy statistics), saved as ``library.npz``/``library.json`` by ``tools/gen_appmul.py``;
- :mod:`.emulate`: integer conv/linear layers computing ``sum_v f_v(A) @ 1[W == v]``;
- :mod:`.sensitivity`: Taylor estimate of each (layer, multiplier) loss increase;
- :mod:`.selection`: exact multiple-choice knapsack (and an ILP check, and a GA baseline);
- :mod:`.substitute`: the ``appmul`` pass.
"""

from . import library, selection  # noqa: F401
from .substitute import AppMulPass

__all__ = ["AppMulPass", "library", "selection"]
