"""Multiplier generators: exact and approximate n x n multipliers as gate-level netlists.

Every generator returns a :class:`~.netlist.Netlist` with inputs ``a`` (the activation operand)
and ``w`` (the weight operand), ``n`` bits each, and ``2n`` output bits (the product modulo
``2^(2n)``, read as two's complement for signed multipliers). Operands are both unsigned
(``0 .. 2^n - 1``) or both signed two's complement (``-2^(n-1) .. 2^(n-1) - 1``).

Families (``Spec.family``) and their parameters:

- ``exact``: the array multiplier. Unsigned: partial products ``a_j AND w_i`` at column ``i + j``.
  Signed: the modified Baugh-Wooley array (Baugh & Wooley, IEEE Trans. Computers C-22(12), 1973):
  partial products with the sign bit of exactly one operand are inverted, and constant ones are
  added at columns ``n`` and ``2n - 1``. The array is summed by carry-save full adders with
  carries rippling to the next column (:meth:`Netlist.sum_columns`).
- ``truncated{k}``: direct truncation: every partial-product bit (and constant) of weight below
  ``2^k`` is omitted, with its adder cells; no correction constant, so the error is one-sided.
- ``broken{h,v}``: the broken-array multiplier (BAM; Mahdiani et al., IEEE TCAS-I 57(4), 2010):
  the cells of the partial-product rows ``i < h`` (horizontal break level) and of the columns
  ``i + j < v`` (vertical break level) are omitted. The paper leaves the exact geometry to the
  figure; we take the union of the two regions (so ``h = 0`` reduces to truncation).
- ``perforated{s,m}``: partial-product perforation (Zervakis et al., IEEE TVLSI 24(10), 2016):
  rows ``s .. s + m - 1`` of the array (the weight bits ``w_s..``) are not generated at all. For
  signed multipliers the sign row is never perforated (``s + m <= n - 1``).
- ``log{t}``: Mitchell's logarithmic multiplier (Mitchell, IRE Trans. Electronic Computers
  EC-11(4), 1962): ``x = 2^k (1 + f)``, ``log2 x ~ k + f``; the two approximate logarithms are
  added and the antilogarithm ``2^(k_a + k_b + c) (1 + frac)`` is taken, where ``c`` is the carry
  of ``f_a + f_b`` (this is Mitchell's two-case formula in one adder). Hardware: a leading-zero
  normaliser per operand (shift stages of 4, 2, 1), a fraction adder keeping the top ``t`` bits of
  each fraction (``t = n - 1`` is Mitchell's full-precision form), a characteristic adder, a
  barrel shifter and a zero detector. Signed operands go through sign-magnitude conversion
  (conditional two's complement) and the product is negated when the signs differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .netlist import ONE, ZERO, Netlist

FAMILIES = ("exact", "truncated", "broken", "perforated", "log")


@dataclass(frozen=True)
class Spec:
    """One multiplier design: family, operand width, signedness and the family's parameters."""

    family: str
    bits: int
    signed: bool
    params: tuple = ()  # ((name, value), ...) in the family's order

    @property
    def name(self) -> str:
        head = f"{'s' if self.signed else 'u'}{self.bits}_{self.family}"
        return head + "".join(f"_{k}{v}" for k, v in self.params)

    def param(self, key: str) -> int:
        return dict(self.params)[key]


def _partial_products(nl: Netlist, a: list, w: list, n: int, signed: bool, keep) -> list:
    """Columns (LSB first, 2n of them) of the partial-product array; ``keep(i, j)`` says whether
    the bit of row i (w_i) and column j (a_j) exists; constants are kept when ``keep(None, col)``."""
    cols = [[] for _ in range(2 * n)]
    for i in range(n):
        for j in range(n):
            if not keep(i, j):
                continue
            bit = nl.AND(a[j], w[i])
            if signed and ((i == n - 1) != (j == n - 1)):
                bit = nl.NOT(bit)
            cols[i + j].append(bit)
    if signed:
        for col in (n, 2 * n - 1):
            if keep(None, col):
                cols[col].append(ONE)
    return cols


def _array(spec: Spec, keep) -> Netlist:
    n = spec.bits
    nl = Netlist()
    a = nl.add_input("a", n)
    w = nl.add_input("w", n)
    nl.set_outputs(nl.sum_columns(_partial_products(nl, a, w, n, spec.signed, keep)))
    return nl


def _normalise(nl: Netlist, x: list, n: int) -> tuple:
    """Leading-zero normalisation of an n-bit unsigned value: (shifted bits with the leading one
    at position n-1, leading-zero count bits LSB first). Stages shift by 4, 2, 1 (those <= n-1)."""
    cur = list(x)
    lz = []
    step = 1
    while step * 2 <= n - 1:
        step *= 2
    stages = []
    while step >= 1:
        stages.append(step)
        step //= 2
    for step in stages:
        top_zero = nl.NOT(nl.any(cur[n - step:]))
        cur = [nl.MUX(top_zero, cur[i], cur[i - step] if i >= step else ZERO) for i in range(n)]
        lz.append((step, top_zero))
    count = [ZERO] * 3
    for step, bit in lz:
        count[step.bit_length() - 1] = bit
    return cur, count


def _log_unsigned(nl: Netlist, a: list, w: list, n: int, t: int) -> list:
    """Mitchell product of two unsigned n-bit values, 2n output bits."""
    if n == 1:
        return [nl.AND(a[0], w[0]), ZERO]
    norm_a, lz_a = _normalise(nl, a, n)
    norm_b, lz_b = _normalise(nl, w, n)
    # fractions: the n-1 bits below the leading one, keeping the top t of them
    frac_a = [ZERO] * (n - 1 - t) + norm_a[n - 1 - t : n - 1]
    frac_b = [ZERO] * (n - 1 - t) + norm_b[n - 1 - t : n - 1]
    fsum = nl.ripple_add(frac_a, frac_b, width=n)  # n-1 fraction bits and the carry c
    mantissa = fsum[: n - 1] + [ONE]  # 1.frac, n bits
    carry = fsum[n - 1]
    # characteristic k_a + k_b + c = 2(n-1) - lz_a - lz_b + c, computed as
    # 2(n-1) + c + ~lz_a + ~lz_b + 2 - 2*8 (three-bit counts, two's complement), in 5 bits
    width = 5
    inv_a = [nl.NOT(b) for b in lz_a] + [ONE] * (width - 3)
    inv_b = [nl.NOT(b) for b in lz_b] + [ONE] * (width - 3)
    const = (2 * (n - 1) + 2) % (1 << width)
    const_bits = [ONE if (const >> i) & 1 else ZERO for i in range(width)]
    k = nl.ripple_add(inv_a, inv_b, carry_in=carry, width=width)
    k = nl.ripple_add(k, const_bits, width=width)
    shift_bits = k[: (2 * n - 1).bit_length()]
    wide = nl.shift_left(mantissa, shift_bits, 3 * n - 1)
    product = wide[n - 1 : 3 * n - 1]
    nonzero = nl.AND(nl.any(a), nl.any(w))
    return [nl.AND(b, nonzero) for b in product]


def _log(spec: Spec) -> Netlist:
    n, t = spec.bits, spec.param("t")
    nl = Netlist()
    a = nl.add_input("a", n)
    w = nl.add_input("w", n)
    if not spec.signed:
        nl.set_outputs(_log_unsigned(nl, a, w, n, t))
        return nl
    sa, sw = a[n - 1], w[n - 1]
    mag_a = nl.negate_if(sa, a)  # |a| as n-bit unsigned (|-2^(n-1)| = 2^(n-1) fits)
    mag_w = nl.negate_if(sw, w)
    product = _log_unsigned(nl, mag_a, mag_w, n, t)
    nl.set_outputs(nl.negate_if(nl.XOR(sa, sw), product))
    return nl


def build(spec: Spec) -> Netlist:
    """The netlist of ``spec``."""
    n = spec.bits
    if spec.family == "exact":
        return _array(spec, lambda i, j: True)
    if spec.family == "truncated":
        k = spec.param("k")
        return _array(spec, lambda i, j: (j >= k) if i is None else (i + j >= k))
    if spec.family == "broken":
        h, v = spec.param("h"), spec.param("v")
        return _array(spec, lambda i, j: True if i is None else not (i < h or i + j < v))
    if spec.family == "perforated":
        s, m = spec.param("s"), spec.param("m")
        return _array(spec, lambda i, j: True if i is None else not (s <= i < s + m))
    if spec.family == "log":
        return _log(spec)
    raise ValueError(f"unknown multiplier family {spec.family!r}; families: {', '.join(FAMILIES)}")


def default_specs(bits: int, signed: bool) -> list:
    """The library's designs for one operand width and signedness (before de-duplication)."""
    n = bits
    sign_rows = n - 1 if signed else n  # rows that may be removed
    specs = [Spec("exact", n, signed)]
    for k in range(1, n + 1):
        specs.append(Spec("truncated", n, signed, (("k", k),)))
    for h in (1, 2):
        for v in (n - 1, n, n + 1):
            if h < sign_rows and v > h:
                specs.append(Spec("broken", n, signed, (("h", h), ("v", v))))
    for s, m in ((0, 1), (0, 2), (1, 1), (1, 2)):
        if s + m < sign_rows or (not signed and s + m < n):
            specs.append(Spec("perforated", n, signed, (("s", s), ("m", m))))
    for t in sorted({n - 1, max(1, n - 3)}, reverse=True):
        if n >= 2:
            specs.append(Spec("log", n, signed, (("t", t),)))
    return specs
