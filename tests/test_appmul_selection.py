"""AppMul selection: the Pareto-DP knapsack is exact (equals brute force and the ILP), respects the
budget, and is never worse than the genetic baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sliver.ir.errors import DataError
from sliver.passes.appmul import selection as S


def _problem(seed, layers, choices):
    rng = np.random.default_rng(seed)
    costs = [np.concatenate([[0.0], rng.exponential(1.0, choices - 1)]) for _ in range(layers)]
    values = [np.concatenate([[0.0], rng.random(choices - 1) * rng.integers(1, 50)]) for _ in range(layers)]
    return costs, values


def _brute(costs, values, budget):
    best = (-np.inf, None)
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(cs[j] for cs, j in zip(costs, choice))
        v = sum(vs[j] for vs, j in zip(values, choice))
        if c <= budget and v > best[0]:
            best = (v, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_equals_brute_force(seed):
    costs, values = _problem(seed, layers=5, choices=5)
    budget = 1.5 + seed * 0.3
    sel = S.solve_exact(costs, values, budget)
    want, _ = _brute(costs, values, budget)
    assert sel.value == pytest.approx(want, abs=1e-9)
    assert sel.cost <= budget + 1e-12
    # the reported totals are those of the reported choice
    assert sel.value == pytest.approx(sum(v[j] for v, j in zip(values, sel.choice)))
    assert sel.cost == pytest.approx(sum(c[j] for c, j in zip(costs, sel.choice)))


def test_exact_equals_milp_and_beats_or_ties_genetic():
    for seed in range(3):
        costs, values = _problem(100 + seed, layers=14, choices=12)
        budget = 4.0
        dp = S.solve_exact(costs, values, budget)
        ilp = S.solve_milp(costs, values, budget)
        ga = S.genetic(costs, values, budget, seed=seed)
        assert dp.value == pytest.approx(ilp.value, rel=1e-9)
        assert ga.cost <= budget + 1e-12
        assert dp.value >= ga.value - 1e-9


def test_zero_budget_keeps_only_free_choices():
    costs, values = _problem(7, layers=4, choices=4)
    sel = S.solve_exact(costs, values, 0.0)
    assert all(costs[l][j] == 0.0 for l, j in enumerate(sel.choice))


def test_benchmark_reports_both_solvers():
    costs, values = _problem(3, layers=8, choices=10)
    row = S.benchmark(costs, values, 2.0, repeat=1, generations=20)
    assert row["exact_value"] >= row["genetic_value"] - 1e-9
    assert row["exact_ms"] > 0 and row["genetic_ms"] > 0 and row["layers"] == 8


def test_bad_problems_are_typed_errors():
    with pytest.raises(DataError, match="clip negative"):
        S.solve_exact([np.array([0.0, -1.0])], [np.array([0.0, 1.0])], 1.0)
    with pytest.raises(DataError, match="no assignment fits"):
        S.solve_exact([np.array([1.0, 2.0])], [np.array([0.0, 1.0])], 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_lp_bounded_dp_is_exact_on_large_problems(seed):
    """The LP-bound pruning keeps the DP exact: same optimum as the unbounded DP and the ILP."""
    costs, values = _problem(200 + seed, layers=40, choices=15)
    budget = 3.0 + seed
    bounded = S.solve_exact(costs, values, budget)
    plain = S.solve_exact(costs, values, budget, bound=False)
    ilp = S.solve_milp(costs, values, budget)
    assert bounded.value == pytest.approx(plain.value, rel=1e-12)
    assert bounded.value == pytest.approx(ilp.value, rel=1e-7)
    assert bounded.cost <= budget + 1e-12
    assert bounded.value == pytest.approx(sum(v[j] for v, j in zip(values, bounded.choice)))


def test_suffix_bound_is_an_upper_bound():
    costs, values = _problem(9, layers=6, choices=6)
    fronts = [(c[S._pareto(c, v)], v[S._pareto(c, v)]) for c, v in zip(costs, values)]
    bounds = S._SuffixBound(fronts, 2.0)
    for l in range(7):
        for room in (0.0, 0.5, 1.0, 2.0, 5.0):
            best = _brute(costs[l:], values[l:], room)[0] if l < 6 else 0.0
            assert bounds.bound(l, np.array([room]))[0] >= best - 1e-9
    assert bounds.incumbent <= _brute(costs, values, 2.0)[0] + 1e-9
