"""AppMul selection: the compiled knapsack solver is exact (equals brute force, the numpy Pareto DP
and the ILP), respects the budget, resolves ties by its documented rule, and is never worse than
the genetic baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sliver.ir.errors import DataError, PassError
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


def _brute_tie_rule(costs, values, budget):
    """(value, cost, choice) of the assignment solve_exact must return: largest value, then lowest
    cost, then lexicographically smallest choice (layer 0 first)."""
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(cs[j] for cs, j in zip(costs, choice))
        v = sum(vs[j] for vs, j in zip(values, choice))
        if c <= budget + 1e-12 and (best is None or (-v, c, choice) < (-best[0], best[1], best[2])):
            best = (v, c, choice)
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
    assert sel.choice == [0, 0, 0, 0] and sel.value == 0.0 and sel.cost == 0.0  # the exact multipliers
    # a free candidate that saves energy is taken even at budget 0
    costs[2] = np.array([0.0, 0.0, 1.0, 2.0])
    values[2] = np.array([0.0, 5.0, 7.0, 9.0])
    sel = S.solve_exact(costs, values, 0.0)
    assert sel.choice == [0, 0, 1, 0] and sel.value == 5.0


@pytest.mark.parametrize("seed", range(4))
def test_compiled_equals_brute_force_with_ties(seed):
    """Small integer problems (exact sums, many ties, zero costs, duplicate candidates, negative
    values): the very assignment of the tie rule, not just its value."""
    rng = np.random.default_rng(50 + seed)
    for case in range(40):
        layers = int(rng.integers(1, 6))
        costs = [rng.integers(0, 4, int(rng.integers(1, 6))).astype(float) for _ in range(layers)]
        values = [rng.integers(-1, 5, c.size).astype(float) for c in costs]
        budget = float(rng.choice([0.0, 1.0, 2.0, 3.5, 6.0, np.inf]))
        want = _brute_tie_rule(costs, values, budget)
        if want is None:
            with pytest.raises(DataError, match="no assignment fits"):
                S.solve_exact(costs, values, budget)
            continue
        sel = S.solve_exact(costs, values, budget)
        assert (sel.value, sel.cost, tuple(sel.choice)) == want, (seed, case)


def test_ties_prefer_cheaper_then_lexicographically_first():
    # value 2 at cost 1 three ways: (1, 0), (2, 0) (a duplicate of 1) and (0, 1): the first in
    # lexicographic order wins
    sel = S.solve_exact([np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0])],
                        [np.array([0.0, 2.0, 2.0]), np.array([0.0, 2.0])], 1.0)
    assert sel.choice == [0, 1] and sel.value == 2.0 and sel.cost == 1.0
    # the same value cheaper beats the lexicographic order
    sel = S.solve_exact([np.array([0.0, 1.0, 0.5]), np.array([0.0, 1.0])],
                        [np.array([0.0, 2.0, 2.0]), np.array([0.0, 2.0])], 1.0)
    assert sel.choice == [2, 0] and sel.cost == 0.5
    # identical candidates: the first index
    sel = S.solve_exact([np.array([1.0, 1.0, 1.0])], [np.array([2.0, 2.0, 1.0])], 5.0)
    assert sel.choice == [0]
    sel = S.solve_exact([np.array([2.0, 1.0, 1.0])], [np.array([2.0, 2.0, 2.0])], 5.0)
    assert sel.choice == [1]  # same value, cheaper


def test_compiled_solver_on_random_problems_of_real_shape():
    """Real-table shape (costs ~1e-5, values ~1e7, 17 candidates, 50 layers) against the numpy DP."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        costs = [np.concatenate([[0.0], rng.exponential(1e-5, 16)]) for _ in range(50)]
        values = [np.concatenate([[0.0], np.sqrt(c[1:]) * 1e8 * rng.uniform(0.5, 2) + rng.random(16) * 1e5])
                  for c in costs]
        budget = 1e-4
        sel = S.solve_exact(costs, values, budget)
        ref = S.solve_pareto_numpy(costs, values, budget)
        assert sel.value == pytest.approx(ref.value, rel=1e-12)
        assert sel.cost <= budget + 1e-12
        assert sel.value == pytest.approx(sum(v[j] for v, j in zip(values, sel.choice)), rel=1e-15)


def test_benchmark_reports_both_solvers():
    costs, values = _problem(3, layers=8, choices=10)
    row = S.benchmark(costs, values, 2.0, repeat=1, generations=20)
    assert row["exact_value"] >= row["genetic_value"] - 1e-9
    assert row["exact_ms"] > 0 and row["genetic_ms"] > 0 and row["layers"] == 8


def test_bad_problems_are_typed_errors():
    with pytest.raises(DataError, match="clip negative"):
        S.solve_exact([np.array([0.0, -1.0])], [np.array([0.0, 1.0])], 1.0)
    with pytest.raises(DataError, match="layer 1: costs must be finite"):
        S.solve_exact([np.zeros(2), np.array([0.0, np.nan])], [np.zeros(2), np.zeros(2)], 1.0)
    with pytest.raises(DataError, match="no assignment fits budget 0.5: the cheapest one costs 1"):
        S.solve_exact([np.array([1.0, 2.0])], [np.array([0.0, 1.0])], 0.5)
    with pytest.raises(DataError, match="layer 0: costs and values must be equal-length"):
        S.solve_exact([np.array([1.0, 2.0])], [np.array([0.0, 1.0, 2.0])], 0.5)
    with pytest.raises(DataError, match="layer 0: costs and values must be equal-length"):
        S.solve_exact([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5)
    with pytest.raises(DataError, match="one cost and one value list per layer"):
        S.solve_exact([], [], 0.5)
    with pytest.raises(DataError, match="budget must be >= 0"):
        S.solve_exact([np.zeros(1)], [np.zeros(1)], float("nan"))
    with pytest.raises(DataError, match="numeric"):
        S.solve_exact([["a", "b"]], [[0.0, 1.0]], 1.0)


def test_other_inputs_are_converted():
    """Python lists, int arrays and strided views give the same answer as float64 arrays."""
    costs, values = _problem(4, layers=5, choices=5)
    want = S.solve_exact(costs, values, 2.0)
    assert S.solve_exact([c.tolist() for c in costs], [v.tolist() for v in values], 2.0) == want
    wide = [np.repeat(c, 2)[::2] for c in costs]  # non-contiguous views of the same numbers
    assert S.solve_exact(wide, values, 2.0) == want
    ints = S.solve_exact([np.array([0, 1, 2])], [np.array([0, 5, 9])], 1)
    assert ints.choice == [1] and ints.value == 5.0


def test_missing_extension_is_a_typed_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mckp(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_mckp" in fromlist:
            raise ImportError("No module named '_mckp'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(S, "_EXT", None)
    monkeypatch.setattr(builtins, "__import__", no_mckp)
    with pytest.raises(PassError, match="make setup"):
        S.solve_exact([np.zeros(1)], [np.zeros(1)], 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_exact_solvers_agree_on_large_problems(seed):
    """40 layers: the compiled solver, the numpy DP with and without its LP-bound pruning and
    HiGHS reach the same optimum; the compiled solver's choice fits and has the value it reports."""
    costs, values = _problem(200 + seed, layers=40, choices=15)
    budget = 3.0 + seed
    sel = S.solve_exact(costs, values, budget)
    bounded = S.solve_pareto_numpy(costs, values, budget)
    plain = S.solve_pareto_numpy(costs, values, budget, bound=False)
    ilp = S.solve_milp(costs, values, budget)
    assert sel.value == pytest.approx(bounded.value, rel=1e-12)
    assert bounded.value == pytest.approx(plain.value, rel=1e-12)
    assert sel.value == pytest.approx(ilp.value, rel=1e-7)
    assert sel.cost <= budget + 1e-12
    assert sel.cost == pytest.approx(sum(c[j] for c, j in zip(costs, sel.choice)), rel=1e-15)
    assert sel.value == pytest.approx(sum(v[j] for v, j in zip(values, sel.choice)), rel=1e-15)


def test_strongly_correlated_problem():
    """value ~ 10 x cost + noise (the hard MCKP case, slopes nearly equal): equals the numpy DP."""
    rng = np.random.default_rng(5)
    costs = [np.concatenate([[0.0], rng.random(9)]) for _ in range(25)]
    values = [c * 10 + rng.random(10) * 0.1 for c in costs]
    sel = S.solve_exact(costs, values, 7.0)
    ref = S.solve_pareto_numpy(costs, values, 7.0)
    assert sel.value == pytest.approx(ref.value, rel=1e-12)
    assert sel.cost <= 7.0 + 1e-12


def test_suffix_bound_is_an_upper_bound():
    costs, values = _problem(9, layers=6, choices=6)
    fronts = [(c[S._pareto(c, v)], v[S._pareto(c, v)]) for c, v in zip(costs, values)]
    bounds = S._SuffixBound(fronts, 2.0)
    for l in range(7):
        for room in (0.0, 0.5, 1.0, 2.0, 5.0):
            best = _brute(costs[l:], values[l:], room)[0] if l < 6 else 0.0
            assert bounds.bound(l, np.array([room]))[0] >= best - 1e-9
    assert bounds.incumbent <= _brute(costs, values, 2.0)[0] + 1e-9
