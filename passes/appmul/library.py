"""The AppMul library: every generated multiplier's LUT, error statistics and cost, in one file.

    from sliver.passes.appmul import library
    lib = library.load()                          # the committed library (library.npz + .json)
    m = lib["s4_truncated_k2"]
    m.table[a - m.low, w - m.low]                 # the product the netlist computes
    lib.candidates(bits=4, signed=True)           # exact first, then by energy

Each LUT is the exhaustive simulation of its netlist (:mod:`.multipliers`) over all ``4**n``
operand pairs. Statistics over uniformly distributed operand pairs, with ``e = approx - a*w``:
MAE ``mean|e|``, MRE ``mean(|e| / |a*w|)`` over pairs with ``a*w != 0``, WCE ``max|e|``, bias
``mean e``; ``area`` in um^2 and ``energy`` in toggling um^2 per multiplication (see
:mod:`.netlist`), ``energy_rel`` = energy / energy of the exact multiplier of the same width and
signedness. Designs whose LUT equals an earlier design's are dropped (the cheaper one is kept).

On disk: ``library.npz`` holds one array per multiplier (the raw 2n-bit output codes, uint16,
rows = activation operand, columns = weight operand, in increasing value order) and
``library.json`` the format version, the cell-area constants and every multiplier's spec and
statistics. ``python tools/gen_appmul.py`` regenerates both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ...ir.errors import DataError
from .multipliers import Spec, build, default_specs
from .netlist import CELL_AREA_UM2

FORMAT = "sliver-appmul-library/1"
BITS = tuple(range(2, 9))
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "library")


def operand_range(bits: int, signed: bool) -> tuple:
    """(lowest, highest) operand value."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def operand_grid(bits: int, signed: bool) -> tuple:
    """All operand pairs: (a values, w values) as flat int64 arrays, a-major."""
    lo, hi = operand_range(bits, signed)
    v = np.arange(lo, hi + 1, dtype=np.int64)
    a, w = np.meshgrid(v, v, indexing="ij")
    return a.ravel(), w.ravel()


def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    codes = values & ((1 << width) - 1)
    return ((codes[:, None] >> np.arange(width)) & 1).astype(bool)


def decode(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """2n-bit output codes -> product values (two's complement when signed)."""
    v = np.asarray(codes, dtype=np.int64)
    if signed:
        v = np.where(v >= 1 << (2 * bits - 1), v - (1 << (2 * bits)), v)
    return v


def simulate(spec: Spec) -> tuple:
    """(LUT codes as a (2^n, 2^n) uint16 array, energy, netlist) from exhaustive simulation."""
    nl = build(spec)
    a, w = operand_grid(spec.bits, spec.signed)
    out, energy = nl.simulate({"a": _bits_of(a, spec.bits), "w": _bits_of(w, spec.bits)}, want_activity=True)
    codes = (out.astype(np.int64) << np.arange(out.shape[1])).sum(axis=1)
    side = 1 << spec.bits
    return codes.reshape(side, side).astype(np.uint16), energy, nl


@dataclass
class AppMul:
    """One multiplier of the library."""

    spec: Spec
    codes: np.ndarray  # (2^n, 2^n) uint16 raw outputs
    stats: dict

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def signed(self) -> bool:
        return self.spec.signed

    @property
    def low(self) -> int:
        return operand_range(self.bits, self.signed)[0]

    @property
    def table(self) -> np.ndarray:
        """(2^n, 2^n) int64 products; ``table[a - low, w - low]``."""
        return decode(self.codes, self.bits, self.signed)

    @property
    def error(self) -> np.ndarray:
        """``table - a*w`` over the operand grid."""
        a, w = operand_grid(self.bits, self.signed)
        return self.table - (a * w).reshape(self.table.shape)

    @property
    def is_exact(self) -> bool:
        return self.spec.family == "exact"

    @property
    def energy_rel(self) -> float:
        return float(self.stats["energy_rel"])


def error_stats(table: np.ndarray, bits: int, signed: bool) -> dict:
    a, w = operand_grid(bits, signed)
    exact = a * w
    e = table.ravel() - exact
    nz = exact != 0
    return {
        "mae": float(np.abs(e).mean()),
        "mre": float((np.abs(e[nz]) / np.abs(exact[nz])).mean()),
        "wce": int(np.abs(e).max()),
        "bias": float(e.mean()),
        "error_var": float(e.var()),
    }


def generate(bits=BITS) -> list:
    """Every multiplier of the library, regenerated from the netlists."""
    out = []
    for n in bits:
        for signed in (False, True):
            seen = {}
            exact_energy = None
            for spec in default_specs(n, signed):
                codes, energy, nl = simulate(spec)
                if spec.family == "exact":
                    exact_energy = energy
                key = codes.tobytes()
                counts = nl.gate_counts()
                stats = error_stats(decode(codes, n, signed), n, signed)
                stats.update(
                    area=round(nl.area(), 4),
                    energy=round(energy, 6),
                    energy_rel=round(energy / exact_energy, 6),
                    gates=counts,
                )
                m = AppMul(spec, codes, stats)
                if key in seen:
                    prev = seen[key]
                    if prev.is_exact or prev.stats["energy"] <= energy:
                        continue
                    out.remove(prev)
                seen[key] = m
                out.append(m)
    return out


class Library:
    """Multipliers by name, with the candidates for a given width and signedness."""

    def __init__(self, multipliers: list, meta: dict | None = None) -> None:
        self.multipliers = list(multipliers)
        self.by_name = {m.name: m for m in self.multipliers}
        self.meta = meta or {}

    def __getitem__(self, name: str) -> AppMul:
        try:
            return self.by_name[name]
        except KeyError:
            raise DataError(
                f"no multiplier {name!r} in the AppMul library; names look like 's4_truncated_k2' "
                "(see library.json or Library.candidates())"
            ) from None

    def __len__(self) -> int:
        return len(self.multipliers)

    def __iter__(self):
        return iter(self.multipliers)

    def exact(self, bits: int, signed: bool) -> AppMul:
        return self[Spec("exact", bits, signed).name]

    def candidates(self, bits: int, signed: bool) -> list:
        """The multipliers for ``bits``-bit operands: the exact one first, then by energy."""
        if bits not in BITS:
            raise DataError(f"the AppMul library covers {BITS[0]}..{BITS[-1]}-bit operands, not {bits}; quantize the layer to 2..8 bits")
        ms = [m for m in self.multipliers if m.bits == bits and m.signed == signed]
        return sorted(ms, key=lambda m: (not m.is_exact, m.stats["energy"], m.name))


def metadata(multipliers: list) -> dict:
    return {
        "format": FORMAT,
        "generator": "tools/gen_appmul.py (sliver.passes.appmul.multipliers)",
        "cell_area_um2": CELL_AREA_UM2,
        "multipliers": [
            {"name": m.name, "family": m.spec.family, "bits": m.bits, "signed": m.signed,
             "params": [list(kv) for kv in m.spec.params], **m.stats}
            for m in multipliers
        ],
    }


def save(multipliers: list, path: str = DEFAULT_PATH) -> None:
    """Write ``path.npz`` (LUT codes) and ``path.json`` (metadata)."""
    np.savez_compressed(path + ".npz", **{m.name: m.codes for m in multipliers})
    with open(path + ".json", "w") as f:
        json.dump(metadata(multipliers), f, indent=1, sort_keys=True)
        f.write("\n")


_CACHE: dict = {}


def load(path: str = DEFAULT_PATH) -> Library:
    """The library saved at ``path`` (default: the committed one), cached per process."""
    path = os.path.abspath(path)
    if path in _CACHE:
        return _CACHE[path]
    if not (os.path.exists(path + ".npz") and os.path.exists(path + ".json")):
        raise DataError(f"no AppMul library at {path}.npz/.json; run python tools/gen_appmul.py")
    with open(path + ".json") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}.json has format {meta.get('format')!r}, expected {FORMAT!r}; run python tools/gen_appmul.py")
    arrays = np.load(path + ".npz")
    out = []
    for entry in meta["multipliers"]:
        spec = Spec(entry["family"], entry["bits"], entry["signed"], tuple((k, v) for k, v in entry["params"]))
        stats = {k: entry[k] for k in ("mae", "mre", "wce", "bias", "error_var", "area", "energy", "energy_rel", "gates")}
        out.append(AppMul(spec, arrays[spec.name], stats))
    lib = Library(out, meta)
    _CACHE[path] = lib
    return lib


def same_as_saved(multipliers: list, path: str = DEFAULT_PATH) -> bool:
    """Whether the library at ``path`` holds exactly these multipliers (LUTs and metadata)."""
    if not (os.path.exists(path + ".npz") and os.path.exists(path + ".json")):
        return False
    with open(path + ".json") as f:
        saved = json.load(f)
    if saved != json.loads(json.dumps(metadata(multipliers), sort_keys=True)):
        return False
    arrays = np.load(path + ".npz")
    if sorted(arrays.files) != sorted(m.name for m in multipliers):
        return False
    return all(np.array_equal(arrays[m.name], m.codes) and arrays[m.name].dtype == m.codes.dtype for m in multipliers)
