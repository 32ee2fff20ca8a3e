"""The AppMul library: LUTs equal their netlists' exhaustive simulation, exact LUTs equal a*w,
statistics recomputed from the LUTs, and the committed file equals its regeneration."""

from __future__ import annotations

import numpy as np
import pytest

from sliver.ir.errors import DataError
from sliver.passes.appmul import library as L
from sliver.passes.appmul.multipliers import Spec, build
from sliver.passes.appmul.netlist import Netlist


@pytest.fixture(scope="module")
def lib():
    return L.load()


def _simulate_lane_by_lane(m, pairs):
    """Simulate the netlist one operand pair at a time (independent of the vectorised grid)."""
    nl = build(m.spec)
    n = m.bits
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    w = np.array([p[1] for p in pairs], dtype=np.int64)
    bits_a = ((a[:, None] & ((1 << n) - 1)) >> np.arange(n)) & 1
    bits_w = ((w[:, None] & ((1 << n) - 1)) >> np.arange(n)) & 1
    out = nl.simulate({"a": bits_a.astype(bool), "w": bits_w.astype(bool)})
    codes = (out.astype(np.int64) << np.arange(2 * n)).sum(axis=1)
    return L.decode(codes, n, m.signed)


def test_every_lut_equals_its_netlist_simulation(lib):
    assert len(lib) > 150
    for m in lib:
        codes, _, _ = L.simulate(m.spec)
        assert codes.dtype == np.uint16 and codes.shape == (1 << m.bits, 1 << m.bits)
        assert np.array_equal(codes, m.codes), m.name


def test_lut_matches_pairwise_simulation_on_samples(lib):
    rng = np.random.default_rng(0)
    for name in ("s8_log_t7", "u8_broken_h2_v8", "s5_perforated_s1_m1", "u3_truncated_k2", "s2_exact"):
        m = lib[name]
        lo, hi = L.operand_range(m.bits, m.signed)
        pairs = [tuple(int(v) for v in rng.integers(lo, hi + 1, 2)) for _ in range(64)] + [(lo, lo), (hi, lo), (0, hi)]
        got = _simulate_lane_by_lane(m, pairs)
        want = np.array([m.table[a - lo, w - lo] for a, w in pairs])
        assert np.array_equal(got, want), name


def test_exact_multipliers_compute_a_times_w(lib):
    for n in L.BITS:
        for signed in (False, True):
            m = lib.exact(n, signed)
            a, w = L.operand_grid(n, signed)
            assert np.array_equal(m.table.ravel(), a * w), m.name
            assert m.stats["mae"] == 0 and m.stats["wce"] == 0 and m.energy_rel == 1.0


def test_mitchell_lut_equals_the_formula():
    """log{t}: Mitchell's two-case formula with fractions truncated to t bits, floor of the result."""
    n, t = 6, 3
    for signed in (False, True):
        codes, _, _ = L.simulate(Spec("log", n, signed, (("t", t),)))
        table = L.decode(codes, n, signed).ravel()
        a, w = L.operand_grid(n, signed)
        want = []
        for x, y in zip(a.tolist(), w.tolist()):
            ax, ay = abs(x), abs(y)
            if ax == 0 or ay == 0:
                want.append(0)
                continue
            ka, kb = ax.bit_length() - 1, ay.bit_length() - 1
            fa = ((ax - (1 << ka)) << (n - 1 - ka)) >> (n - 1 - t)  # t-bit fractions
            fb = ((ay - (1 << kb)) << (n - 1 - kb)) >> (n - 1 - t)
            f = fa + fb
            if f < (1 << t):
                p = ((1 << t) + f) << (ka + kb) >> t
            else:
                p = f << (ka + kb + 1) >> t
            want.append(p if (x < 0) == (y < 0) else -p)
        assert np.array_equal(table, np.array(want)), signed


def test_statistics_recomputed_from_luts(lib):
    m = lib["s6_truncated_k4"]
    a, w = L.operand_grid(6, True)
    e = m.table.ravel() - a * w
    assert m.stats["mae"] == pytest.approx(np.abs(e).mean())
    assert m.stats["wce"] == np.abs(e).max()
    assert m.stats["bias"] == pytest.approx(e.mean())
    nz = a * w != 0
    assert m.stats["mre"] == pytest.approx((np.abs(e[nz]) / np.abs((a * w)[nz])).mean())
    # truncation only removes positive partial products of an unsigned array: error <= 0
    assert (lib["u6_truncated_k4"].error <= 0).all()


def test_approximations_are_cheaper_and_ordered(lib):
    for n in (4, 8):
        for signed in (False, True):
            ks = [lib[f"{'s' if signed else 'u'}{n}_truncated_k{k}"] for k in range(1, n)]
            energies = [m.stats["energy"] for m in ks]
            areas = [m.stats["area"] for m in ks]
            maes = [m.stats["mae"] for m in ks]
            assert energies == sorted(energies, reverse=True) and areas == sorted(areas, reverse=True)
            assert maes == sorted(maes)
            assert energies[-1] < lib.exact(n, signed).stats["energy"] * 0.75


def test_constant_folding_removes_omitted_cells():
    nl = Netlist()
    x = nl.add_input("x", 2)
    assert nl.AND(x[0], 0) == 0 and nl.XOR(x[0], 0) == x[0] and nl.NOT(nl.NOT(x[1])) == x[1]
    assert nl.MUX(1, x[0], x[1]) == x[1] and nl.AND(x[0], x[1]) == nl.AND(x[1], x[0])
    exact = build(Spec("exact", 8, False)).gate_counts()
    trunc = build(Spec("truncated", 8, False, (("k", 4),))).gate_counts()
    assert exact["AND"] == 168 and trunc["AND"] < exact["AND"]


def test_committed_library_equals_regeneration(lib):
    assert L.same_as_saved(L.generate())
    assert lib.meta["format"] == L.FORMAT


def test_unknown_names_and_widths_are_typed_errors(lib):
    with pytest.raises(DataError, match="s4_truncated_k2"):
        lib["s4_nonsense"]
    with pytest.raises(DataError, match="2..8 bits"):
        lib.candidates(bits=9, signed=True)
