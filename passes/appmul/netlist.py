"""Gate-level netlists: a builder with constant folding and an exhaustive bit-parallel simulator.

A :class:`Netlist` is a list of two-input gates (``AND``, ``OR``, ``XOR``), inverters (``NOT``) and
2:1 multiplexers (``MUX``) over primary inputs. Wires are integers; ``0`` and ``1`` are the constant
wires, so a multiplier generator that drops a partial-product bit simply passes the constant 0 and
the builder folds away every gate that no longer computes anything (``AND(x, 0) = 0``,
``XOR(x, 0) = x``, ...). Identical gates are shared (structural hashing). The gate counts that
remain are those of the circuit a synthesis tool would keep, which is what the area and energy
estimates read.

:meth:`Netlist.simulate` evaluates the netlist on numpy boolean vectors, one lane per input
pattern; the multiplier library feeds it every operand pair at once (``4**n`` lanes for n-bit
operands), so each LUT entry is the netlist's own output, not a formula.

Area and energy constants (:data:`CELL_AREA_UM2`): cell areas of the X1 drive-strength cells of the
Nangate 45 nm Open Cell Library (FreePDK45), in square micrometres: INV 0.532, AND2 1.064,
OR2 1.064, XOR2 1.596, MUX2 1.862. Dynamic energy is ``alpha * C * V^2`` per gate; we take a gate's
switched capacitance proportional to its cell area (a standard first-order proxy) and its activity
``alpha = 2 p (1 - p)`` from the signal probability ``p`` measured in the exhaustive simulation
(uniform, independent operands between two consecutive multiplications). The energy of a
multiplier is therefore reported in relative units (um^2 of toggling cell area per
multiplication); only ratios between multipliers are used.
"""

from __future__ import annotations

import numpy as np

#: X1 cell areas of the Nangate 45 nm Open Cell Library, um^2 (see the module docstring)
CELL_AREA_UM2 = {"NOT": 0.532, "AND": 1.064, "OR": 1.064, "XOR": 1.596, "MUX": 1.862}

ZERO, ONE = 0, 1


class Netlist:
    """A combinational netlist built gate by gate (see the module docstring)."""

    def __init__(self) -> None:
        # gates[i] = (kind, in0, in1, in2) for wire i + first_gate; inputs are wires too
        self.n_wires = 2  # the constants
        self.inputs: dict = {}  # name -> list of wires (LSB first)
        self.input_wires: list = []
        self.gates: list = []  # (out, kind, a, b, s)
        self._hash: dict = {}
        self._inverse: dict = {}
        self.outputs: list = []

    # -- inputs -------------------------------------------------------------------------------
    def add_input(self, name: str, width: int) -> list:
        wires = list(range(self.n_wires, self.n_wires + width))
        self.n_wires += width
        self.inputs[name] = wires
        self.input_wires.extend(wires)
        return wires

    def _new(self, kind: str, a: int, b: int = -1, s: int = -1) -> int:
        key = (kind, a, b, s)
        if key in self._hash:
            return self._hash[key]
        out = self.n_wires
        self.n_wires += 1
        self.gates.append((out, kind, a, b, s))
        self._hash[key] = out
        return out

    # -- gates, with constant folding ------------------------------------------------------------
    def NOT(self, a: int) -> int:
        if a in (ZERO, ONE):
            return ONE - a
        if a in self._inverse:  # NOT(NOT(x)) = x
            return self._inverse[a]
        out = self._new("NOT", a)
        self._inverse[out] = a
        return out

    def AND(self, a: int, b: int) -> int:
        if a == ZERO or b == ZERO:
            return ZERO
        if a == ONE:
            return b
        if b == ONE or a == b:
            return a
        return self._new("AND", min(a, b), max(a, b))

    def OR(self, a: int, b: int) -> int:
        if a == ONE or b == ONE:
            return ONE
        if a == ZERO:
            return b
        if b == ZERO or a == b:
            return a
        return self._new("OR", min(a, b), max(a, b))

    def XOR(self, a: int, b: int) -> int:
        if a == ZERO:
            return b
        if b == ZERO:
            return a
        if a == ONE:
            return self.NOT(b)
        if b == ONE:
            return self.NOT(a)
        if a == b:
            return ZERO
        return self._new("XOR", min(a, b), max(a, b))

    def MUX(self, s: int, a: int, b: int) -> int:
        """``b if s else a``."""
        if s == ZERO or a == b:
            return a
        if s == ONE:
            return b
        if a == ZERO and b == ONE:
            return s
        if a == ZERO:
            return self.AND(s, b)
        if b == ZERO:
            return self.AND(self.NOT(s), a)
        if b == ONE:
            return self.OR(s, a)
        return self._new("MUX", a, b, s)

    # -- arithmetic blocks ---------------------------------------------------------------------
    def half_adder(self, a: int, b: int) -> tuple:
        return self.XOR(a, b), self.AND(a, b)

    def full_adder(self, a: int, b: int, c: int) -> tuple:
        p = self.XOR(a, b)
        return self.XOR(p, c), self.OR(self.AND(a, b), self.AND(p, c))

    def ripple_add(self, a: list, b: list, carry_in: int = ZERO, width: int | None = None) -> list:
        """``a + b + carry_in`` (LSB-first bit lists, zero-extended) truncated to ``width`` bits
        (default: one more than the longer operand)."""
        width = width if width is not None else max(len(a), len(b)) + 1
        out, c = [], carry_in
        for i in range(width):
            x = a[i] if i < len(a) else ZERO
            y = b[i] if i < len(b) else ZERO
            s, c = self.full_adder(x, y, c)
            out.append(s)
        return out

    def negate_if(self, sign: int, bits: list) -> list:
        """Two's complement negation of ``bits`` when ``sign`` is 1 (XOR, then add ``sign``)."""
        flipped = [self.XOR(b, sign) for b in bits]
        return self.ripple_add(flipped, [], carry_in=sign, width=len(bits))

    def shift_left(self, bits: list, amount: list, width: int) -> list:
        """Logarithmic barrel shifter: ``bits << amount`` (amount LSB first), ``width`` bits out."""
        cur = list(bits[:width]) + [ZERO] * max(0, width - len(bits))
        for k, s in enumerate(amount):
            step = 1 << k
            cur = [self.MUX(s, cur[i], cur[i - step] if i >= step else ZERO) for i in range(width)]
        return cur

    def any(self, bits: list) -> int:
        out = ZERO
        for b in bits:
            out = self.OR(out, b)
        return out

    def sum_columns(self, columns: list) -> list:
        """Add the bits of each column (column i has weight 2^i): full adders on three bits, a
        half adder on the last two, carries going to the next column (carry-save compression of
        a partial-product array). Returns one bit per column, as many as ``columns``."""
        cols = [list(c) for c in columns]
        out = []
        for i in range(len(cols)):
            bits = [b for b in cols[i] if b != ZERO]
            while len(bits) > 1:
                if len(bits) >= 3:
                    s, c = self.full_adder(bits.pop(0), bits.pop(0), bits.pop(0))
                else:
                    s, c = self.half_adder(bits.pop(0), bits.pop(0))
                bits.append(s)
                if c != ZERO and i + 1 < len(cols):
                    cols[i + 1].append(c)
            out.append(bits[0] if bits else ZERO)
        return out

    # -- analysis ------------------------------------------------------------------------------
    def set_outputs(self, bits: list) -> None:
        self.outputs = list(bits)

    def live_gates(self) -> list:
        """Gates in the transitive fan-in of the outputs (the rest would be removed by synthesis)."""
        need = set(self.outputs)
        live = []
        for out, kind, a, b, s in reversed(self.gates):
            if out in need:
                live.append((out, kind, a, b, s))
                need.update(w for w in (a, b, s) if w >= 0)
        return live[::-1]

    def gate_counts(self) -> dict:
        counts = {k: 0 for k in CELL_AREA_UM2}
        for _, kind, _, _, _ in self.live_gates():
            counts[kind] += 1
        return counts

    def area(self) -> float:
        return float(sum(CELL_AREA_UM2[k] * n for k, n in self.gate_counts().items()))

    def simulate(self, values: dict, want_activity: bool = False):
        """Evaluate on boolean lanes. ``values``: input name -> bool array (lanes, width).
        Returns the outputs as a (lanes, n_out) bool array, and with ``want_activity`` also the
        switching energy estimate (sum over live gates of 2 p (1 - p) times cell area)."""
        lanes = next(iter(values.values())).shape[0]
        wire = {ZERO: np.zeros(lanes, bool), ONE: np.ones(lanes, bool)}
        for name, wires in self.inputs.items():
            v = values[name]
            for i, w in enumerate(wires):
                wire[w] = v[:, i]
        energy = 0.0
        for out, kind, a, b, s in self.live_gates():
            if kind == "NOT":
                r = ~wire[a]
            elif kind == "AND":
                r = wire[a] & wire[b]
            elif kind == "OR":
                r = wire[a] | wire[b]
            elif kind == "XOR":
                r = wire[a] ^ wire[b]
            else:  # MUX
                r = np.where(wire[s], wire[b], wire[a])
            wire[out] = r
            if want_activity:
                p = float(r.mean())
                energy += 2.0 * p * (1.0 - p) * CELL_AREA_UM2[kind]
        result = np.stack([wire[w] for w in self.outputs], axis=1)
        return (result, energy) if want_activity else result
