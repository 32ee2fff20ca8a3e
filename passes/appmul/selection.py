"""Choosing one multiplier per layer: an exact multiple-choice knapsack and a genetic baseline.

The problem (FAMES, arXiv 2411.18055, Sec. "AppMul selection"; the paper does not publish its
solver): layer ``l`` picks one candidate ``j`` with energy saving ``value[l][j] >= 0`` and
accuracy cost ``cost[l][j]`` (the Taylor estimate of the loss increase, :mod:`.sensitivity`);
maximise the total saving subject to ``sum cost <= budget``. This is the multiple-choice knapsack
problem (MCKP). Costs must be non-negative (negative Taylor estimates are clipped to 0 by the
caller: a predicted gain is not banked); a total cost within ``budget + 1e-12`` fits.

:func:`solve_exact` is the solver the pass uses: compiled C (``_mckp.c``, built when sliver is
installed) that combines the LP relaxation bound of the MCKP (every layer's upper convex hull,
segments taken greedily by slope; Sinha & Zemel 1979), a Lagrangian reduction that fixes layers
and drops candidates that cannot reach a target value (Dudzinski & Walukiewicz 1987), and a
dynamic program over Pareto fronts of partial assignments pruned by the LP bound of the layers
still to come, for targets lowered from the LP bound to a greedy feasible assignment; the
algorithm and why it is exact are described at the top of ``_mckp.c``. Ties: of the assignments
with the largest value the cheapest, of those the lexicographically smallest choice list (layer
0 first); exact when the sums are exact in floating point, otherwise up to their rounding.

:func:`solve_pareto_numpy` is the earlier pure-numpy solver (the same Pareto-front DP with the
LP-bound pruning, without the reduction) and :func:`solve_milp` states the problem as a 0-1
integer program for ``scipy.optimize.milp`` (HiGHS); both serve as independent checks.

:func:`genetic` is the baseline of the kind FAMES compares against (ALWANN-style evolutionary
search over per-layer multiplier assignments): tournament selection, uniform crossover, per-gene
mutation, elitism, and a death penalty-like objective ``value - big * max(0, cost - budget)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.errors import DataError, PassError


@dataclass
class Selection:
    choice: list  # chosen candidate index per layer
    value: float
    cost: float


def _check(costs, values, budget):
    if len(costs) != len(values) or not costs:
        raise DataError("selection needs one cost and one value list per layer (and at least one layer)")
    out_c, out_v = [], []
    for l, (c, v) in enumerate(zip(costs, values)):
        c = np.asarray(c, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        if c.shape != v.shape or c.ndim != 1 or c.size == 0:
            raise DataError(f"layer {l}: costs and values must be equal-length 1-D lists")
        if (c < 0).any() or not np.isfinite(c).all() or not np.isfinite(v).all():
            raise DataError(f"layer {l}: costs must be finite and >= 0 (clip negative Taylor estimates to 0)")
        out_c.append(c)
        out_v.append(v)
    if not budget >= 0:
        raise DataError(f"the accuracy budget must be >= 0, got {budget}")
    if sum(c.min() for c in out_c) > budget:
        raise DataError(f"no assignment fits budget {budget}: the cheapest one costs {sum(c.min() for c in out_c):.4g}")
    return out_c, out_v


def _pareto(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated (cost, value) pairs, by increasing cost."""
    order = np.lexsort((-v, c))
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], v[order][:-1]]))
    return order[v[order] > best_before]


def _upper_hull(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indices (into the Pareto-sorted ``c``, ``v``: increasing cost and value) of the upper
    concave hull's vertices, from the cheapest point on: slopes strictly decreasing."""
    hull = [0]
    for i in range(1, c.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (v[b] - v[a]) * (c[i] - c[b]) <= (v[i] - v[b]) * (c[b] - c[a]):
                hull.pop()  # b lies on or below the chord a -> i
            else:
                break
        hull.append(i)
    return np.asarray(hull)


class _SuffixBound:
    """LP-relaxation upper bounds of the layers ``l..L-1`` (Sinha & Zemel 1979: the MCKP's LP
    optimum walks each layer's upper convex hull, all layers' hull segments taken greedily by
    decreasing slope value/cost). ``bound(l, r)`` is the largest value layers ``l..`` can add
    with budget ``r`` (-inf where even their cheapest choices do not fit); it is concave and
    piecewise linear in ``r``. All suffixes come from one slope-sorted segment list: suffix
    ``l`` keeps the segments of layers ``>= l``."""

    def __init__(self, fronts: list, budget: float):
        L = len(fronts)
        base_c = np.array([c[0] for c, _ in fronts])
        base_v = np.array([v[0] for _, v in fronts])
        seg_dc, seg_dv, seg_layer = [], [], []
        for l, (c, v) in enumerate(fronts):
            h = _upper_hull(c, v)
            seg_dc.append(np.diff(c[h]))
            seg_dv.append(np.diff(v[h]))
            seg_layer.append(np.full(h.size - 1, l))
        dc, dv, layer = np.concatenate(seg_dc), np.concatenate(seg_dv), np.concatenate(seg_layer)
        order = np.argsort(-(dv / dc), kind="stable")
        dc, dv, layer = dc[order], dv[order], layer[order]
        mask = layer[None, :] >= np.arange(L + 1)[:, None]  # (L + 1, S): suffix l uses layers >= l
        zeros = np.zeros((L + 1, 1))
        self.cum_c = np.concatenate([zeros, np.cumsum(dc * mask, axis=1)], axis=1)
        self.cum_v = np.concatenate([zeros, np.cumsum(dv * mask, axis=1)], axis=1)
        self.base_c = np.concatenate([np.cumsum(base_c[::-1])[::-1], [0.0]])
        self.base_v = np.concatenate([np.cumsum(base_v[::-1])[::-1], [0.0]])
        # a feasible assignment: the LP walk stopped before its first segment that does not fit
        room = budget - self.base_c[0]
        k = int(np.searchsorted(self.cum_c[0], room + 1e-12, side="right"))
        self.incumbent = float(self.base_v[0] + self.cum_v[0][k - 1])

    def bound(self, l: int, room: np.ndarray) -> np.ndarray:
        r = room - self.base_c[l]
        ub = self.base_v[l] + np.interp(r, self.cum_c[l], self.cum_v[l])
        return np.where(r >= -1e-12, ub, -np.inf)


def solve_pareto_numpy(costs: list, values: list, budget: float, bound: bool = True) -> Selection:
    """Exact MCKP by Pareto-front dynamic programming in numpy (the check for :func:`solve_exact`):
    after layer ``l`` the front holds every non-dominated (total cost, total value) of the first
    ``l`` layers; merging the next layer is an outer sum, a sort and a running-maximum filter. A
    partial choice off the front can never complete to a better solution than the front member
    that dominates it, so the final front holds the optimum. Ties are not resolved by
    :func:`solve_exact`'s rule.

    With ``bound`` (the default) the DP also drops every partial assignment whose value plus
    the LP-relaxation bound of the layers still to come (:class:`_SuffixBound`) falls below a
    feasible assignment's value (the LP walk's integer prefix): such a state cannot complete to
    an optimum, so the result is still exact (the same optimum as ``bound=False``, the brute
    force and the ILP; tested), and on 50-layer ViT tables the fronts stay small instead of
    growing to tens of thousands of states."""
    costs, values = _check(costs, values, budget)
    fronts = []
    owns = []
    for c_all, v_all in zip(costs, values):
        # the layer's own dominated candidates can never be chosen: drop them first
        own = _pareto(c_all, v_all)
        owns.append(own)
        fronts.append((c_all[own], v_all[own]))
    limit = budget + 1e-12
    bounds = _SuffixBound(fronts, budget) if bound else None
    floor = None
    if bounds is not None:
        floor = bounds.incumbent - 1e-9 * max(1.0, abs(bounds.incumbent))
    front_c = np.zeros(1)
    front_v = np.zeros(1)
    back = []  # per layer: (parent index, choice) of each front member
    for l, ((c, v), own) in enumerate(zip(fronts, owns)):
        tc = (front_c[:, None] + c[None, :]).ravel()
        tv = (front_v[:, None] + v[None, :]).ravel()
        keep = tc <= limit
        if bounds is not None:
            keep &= tv + bounds.bound(l + 1, budget - tc) >= floor
        idx = np.nonzero(keep)[0]
        tc, tv = tc[idx], tv[idx]
        pareto = _pareto(tc, tv)
        tc, tv, idx = tc[pareto], tv[pareto], idx[pareto]
        back.append((idx // c.size, own[idx % c.size]))
        front_c, front_v = tc, tv
    k = int(np.argmax(front_v))
    total_c, total_v = float(front_c[k]), float(front_v[k])
    choice = []
    for parent, pick in reversed(back):
        choice.append(int(pick[k]))
        k = int(parent[k])
    return Selection(choice[::-1], total_v, total_c)


_EXT = None  # the compiled module, imported on first use
_CONVERT, _INFEASIBLE = 5, 4  # _mckp.c's codes (E_CONVERT, E_INFEASIBLE)
_INPUT_ERRORS = {  # E_LAYERS, E_SHAPE, E_VALUE
    1: "selection needs one cost and one value list per layer (and at least one layer)",
    2: "layer {layer}: costs and values must be equal-length 1-D lists",
    3: "layer {layer}: costs must be finite and >= 0 (clip negative Taylor estimates to 0)",
}


def _extension():
    global _EXT
    if _EXT is None:
        try:
            from . import _mckp
        except ImportError as err:
            raise PassError(f"the compiled knapsack solver sliver.passes.appmul._mckp is not built ({err}); "
                            "reinstall sliver with `make setup` (pip install -e .), which compiles passes/appmul/_mckp.c") from err
        _EXT = _mckp
    return _EXT


def solve_exact(costs: list, values: list, budget: float) -> Selection:
    """Exact MCKP by the compiled solver (module docstring; ``_mckp.c``). ``costs`` and
    ``values``: one 1-D array per layer; float64 C-contiguous arrays go to C as they are, other
    inputs are converted first. Raises :class:`PassError` if the extension is not built."""
    ext = _EXT or _extension()
    if not budget >= 0:
        raise DataError(f"the accuracy budget must be >= 0, got {budget}")
    out = ext.solve(costs, values, budget)
    if out[0] is None and out[1] == _CONVERT:  # not float64 C-contiguous: convert, then solve
        try:
            costs = [np.ascontiguousarray(c, dtype=np.float64) for c in costs]
            values = [np.ascontiguousarray(v, dtype=np.float64) for v in values]
        except (TypeError, ValueError) as err:
            raise DataError(f"selection costs and values must be numeric 1-D lists ({err})") from None
        out = ext.solve(costs, values, budget)
    if out[0] is None:
        code, info = out[1], out[2]
        if code == _INFEASIBLE:
            raise DataError(f"no assignment fits budget {budget}: the cheapest one costs {info:.4g}")
        if code in _INPUT_ERRORS:
            raise DataError(_INPUT_ERRORS[code].format(layer=int(info)))
        raise PassError(f"the exact knapsack solver failed (code {code}); this is a bug in passes/appmul/_mckp.c")
    return Selection(out[0], out[1], out[2])


def solve_milp(costs: list, values: list, budget: float) -> Selection:
    """The same problem as a 0-1 ILP solved by scipy's HiGHS (an independent exact solver)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs, values = _check(costs, values, budget)
    sizes = [c.size for c in costs]
    n = sum(sizes)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for l, s in enumerate(sizes):
        one_each[l, start : start + s] = 1
        start += s
    cons = [LinearConstraint(one_each, 1, 1), LinearConstraint(np.concatenate(costs)[None, :], -np.inf, budget)]
    res = milp(-np.concatenate(values), constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        raise DataError(f"the ILP found no assignment within budget {budget}: {res.message}")
    x = np.round(res.x).astype(int)
    choice, start = [], 0
    for s in sizes:
        choice.append(int(np.argmax(x[start : start + s])))
        start += s
    return _evaluate(costs, values, choice)


def _evaluate(costs, values, choice) -> Selection:
    return Selection(
        list(choice),
        float(sum(v[j] for v, j in zip(values, choice))),
        float(sum(c[j] for c, j in zip(costs, choice))),
    )


def genetic(costs: list, values: list, budget: float, population: int = 100, generations: int = 200,
            mutation: float | None = None, tournament: int = 2, elite: int = 2, seed: int = 0) -> Selection:
    """Genetic-algorithm baseline on the same objective (module docstring); deterministic under seed."""
    costs, values = _check(costs, values, budget)
    rng = np.random.default_rng(seed)
    L = len(costs)
    sizes = np.array([c.size for c in costs])
    width = int(sizes.max())
    C = np.full((L, width), np.inf)
    V = np.zeros((L, width))
    for l, (c, v) in enumerate(zip(costs, values)):
        C[l, : c.size] = c
        V[l, : v.size] = v
    mutation = 1.0 / L if mutation is None else mutation
    big = 10.0 * (V.max(axis=1).sum() + 1.0) / max(budget, 1e-12)
    rows = np.arange(L)

    def fitness(pop):
        cost = C[rows, pop].sum(axis=1)
        value = V[rows, pop].sum(axis=1)
        return value - big * np.maximum(0.0, cost - budget)

    pop = (rng.random((population, L)) * sizes).astype(np.int64)
    pop[0] = [int(np.argmin(c)) for c in costs]  # one feasible individual (the cheapest choices)
    fit = fitness(pop)
    for _ in range(generations):
        order = np.argsort(-fit)
        elites = pop[order[:elite]]
        contenders = rng.integers(0, population, (2, population - elite, tournament))
        winners = []
        for t in range(2):
            f = fit[contenders[t]]
            winners.append(contenders[t][np.arange(population - elite), np.argmax(f, axis=1)])
        mask = rng.random((population - elite, L)) < 0.5
        children = np.where(mask, pop[winners[0]], pop[winners[1]])
        mutate = rng.random(children.shape) < mutation
        children = np.where(mutate, (rng.random(children.shape) * sizes).astype(np.int64), children)
        pop = np.concatenate([elites, children])
        fit = fitness(pop)
    feasible = C[rows, pop].sum(axis=1) <= budget + 1e-12
    best = int(np.argmax(np.where(feasible, fit, -np.inf)))
    return _evaluate(costs, values, pop[best].tolist())


def benchmark(costs: list, values: list, budget: float, repeat: int = 5, seed: int = 0, **ga_options) -> dict:
    """Median wall times (over ``repeat`` calls each) of the exact solver, the GA baseline, the
    numpy Pareto DP and HiGHS on one problem, and their objective values (for tools/bench.py)."""
    import statistics
    import time

    def timed(fn):
        times, result = [], None
        for _ in range(repeat):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), result

    t_exact, exact = timed(lambda: solve_exact(costs, values, budget))
    t_ga, ga = timed(lambda: genetic(costs, values, budget, seed=seed, **ga_options))
    t_milp, ilp = timed(lambda: solve_milp(costs, values, budget))
    t_numpy, pareto = timed(lambda: solve_pareto_numpy(costs, values, budget))
    return {
        "pareto_numpy_ms": t_numpy * 1e3,
        "pareto_numpy_value": pareto.value,
        "milp_ms": t_milp * 1e3,
        "milp_value": ilp.value,
        "layers": len(costs),
        "choices": int(sum(len(c) for c in costs)),
        "exact_ms": t_exact * 1e3,
        "genetic_ms": t_ga * 1e3,
        "speedup": t_ga / t_exact,
        "exact_value": exact.value,
        "genetic_value": ga.value,
        "exact_cost": exact.cost,
        "genetic_cost": ga.cost,
    }
