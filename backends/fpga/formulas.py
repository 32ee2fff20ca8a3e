"""Every formula of the FPGA cost model, in one place.

The lowering (:mod:`.lowering`) turns each ONNX node into one piece of *work*: a
:class:`GemmWork` (matrix products, convolutions as implicit GEMMs) or a :class:`StreamWork`
(passes of elements through the vector unit, the nonlinear units or the move engine). This module
turns work into cycles and energy. Ops run one after the other (layer by layer), as in the
HeatViT and Auto-ViT-Acc accelerators, so a program's latency is the sum of its ops' cycles.

GEMM compute: SCALE-Sim's systolic model
----------------------------------------
For a GEMM ``M x K`` by ``K x N`` on an ``R x C`` array, SCALE-Sim (Samajdar et al., "A
systematic methodology for characterizing scalability of DNN accelerators using SCALE-Sim",
ISPASS 2020; its ``systolic_compute_{os,ws,is}`` classes) maps two operand dimensions onto the
array (``Sr`` on rows, ``Sc`` on columns) and streams the third (``T``) through it:

=========================  ======  ======  ======
dataflow                    Sr      Sc      T
=========================  ======  ======  ======
output stationary (os)      M       N       K
weight stationary (ws)      K       N       M
input stationary (is)       K       M       N
=========================  ======  ======  ======

The array covers ``ceil(Sr/R) * ceil(Sc/C)`` folds one after another. A fold costs
``R + C + T - 2`` cycles in OS (operands skew in over ``R - 1`` and ``C - 1`` cycles, ``T`` steps
of accumulation, outputs drain) and ``2R + C + T - 2`` in WS/IS (``R`` more cycles to preload the
stationary operand). SCALE-Sim's report counts from cycle 0 and so prints one less (its full
simulator prints 32003 for the 32x32 DeiT-T qkv example where the formula gives 32004).

DSP packing: a PE doing ``p`` products that share one operand widens the array to ``R x pC``
(``Accelerator.gemm.macs_per_pe``), and it is costed as SCALE-Sim would cost an ``R x pC``
array. That is conservative: the packed outputs of a physical design drain over ``C`` columns,
not ``pC``. An op may also run in a wider, less packed mode; the model takes the fastest mode per
op, so fewer bits never cost more cycles.

GEMM memory: tiles with double buffering
----------------------------------------
Activations stay in the on-chip activation buffer when they fit (half of it: producer and consumer
ping-pong); weights, graph inputs/outputs and activations that do not fit live in DDR. The
streamed operand ``B`` (``K x N``, the weights of a layer) is cut into tiles that fit half of the
weight buffer. Tile edges along a dimension the array maps spatially are multiples of the array
size, so tiling adds no folds; a streamed (temporal) dimension is split only when nothing else
fits, and each piece then pays its own fill and drain. With two tile buffers, loading tile ``t+1``
overlaps computing tile ``t``::

    cycles = launch + load(first tile) + batch * sum_t max(compute_t, memory_t)

The first tile of a layer's weights does not depend on the op before it, so it is fetched while
that op runs; only a first tile that depends on earlier results is an unhidden load.

``compute_t`` is the SCALE-Sim count of the tile's sub-GEMM; ``memory_t`` is the DDR bytes the
tile moves (its share of ``B`` and, when they live in DDR, of ``A`` and of the output) divided by
the sustained DDR bytes per cycle. ``A`` in DDR is loaded once with the first tile when it fits
on chip; otherwise the cheaper of two schedules is taken: re-read ``A`` with every tile, or cut
``M`` into chunks whose ``A`` fits and stream ``B`` once per chunk.

Grouped convolutions may instead run *channel-parallel* (each PE an independent MAC on its own
channel and pixels, ``ceil(MACs / (PEs x p))`` cycles): a depthwise convolution's per-group GEMM
has one output column, so the systolic mapping would leave all but one column idle. The model
takes whichever mapping is faster.

Streams: vector unit, nonlinear units, moves
---------------------------------------------
A pass of ``n`` elements through a unit of ``L`` lanes takes ``ceil(n / L)`` cycles (the vector
unit is a fixed number of bits wide: 16-bit elements get half the lanes of 8-bit ones); moves take
``ceil(bytes / move_bytes_per_cycle)``. An op's passes run back to back (softmax: max, exp and
sum, scale, plus one reciprocal per row; LayerNorm: statistics, one reciprocal square root per
row, normalise; top-k token selection: a bitonic network, ``n * ceil(log2 n)`` element steps,
then a move of the kept tokens). Its DDR traffic overlaps them::

    cycles = launch + max(sum of passes, ddr_bytes / ddr_bytes_per_cycle)

Elementwise ops whose other operands are constants (bias, scale, requantisation, shifts, clips)
are *fused*: they run in the output stage of the op that produced their input and cost only the
DDR traffic of their constants. Chains of elementwise ops (a GELU exported as ``Div, Erf, Add,
Mul, Mul``, a polynomial approximation exported as a dozen arithmetic ops) stream through one
pipeline::

    cycles = launch + max(slowest member's passes, sum of members' DDR cycles)

Layout ops (reshape, squeeze, a gather of one slice at a constant index) and ops on constants
only (folded at compile time) are *free*; transposes, concatenations, slices and token gathers
are moves.

Energy
------
``macs * mac_pj(bits) + ddr_bytes * ddr_pj + onchip_bytes * onchip_pj + elements * unit_pj``
with the constants of :class:`.accelerator.EnergyModel` (Horowitz, ISSCC 2014).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, log2

from .accelerator import Accelerator, GemmEngine

# -- work: what one op asks of the hardware ---------------------------------------------------


@dataclass(frozen=True)
class GemmWork:
    """``batch`` independent GEMMs ``(m x k) @ (k x n)`` at ``bits``.

    ``a_bytes``, ``b_bytes``, ``out_bytes``: bytes of one GEMM's operands and result as they are
    stored (a convolution's ``A`` is its input feature map, not the im2col expansion: the line
    buffer reads each input pixel once). ``*_ddr``: whether each lives in DDR. ``engine``:
    ``"dsp"`` or ``"lut"``. ``energy_ratio``: energy of one product relative to an exact one on
    that engine (approximate multipliers are cheaper).
    """

    batch: int
    m: int
    k: int
    n: int
    bits: int
    a_bytes: float
    b_bytes: float
    out_bytes: float
    a_ddr: bool
    b_ddr: bool
    out_ddr: bool
    engine: str = "dsp"
    energy_ratio: float = 1.0
    extra_ddr_bytes: float = 0.0  # e.g. a bias vector, loaded once
    grouped: bool = False  # the batch is a grouped convolution's groups (channel-parallel allowed)
    b_constant: bool = False  # B is a weight: its first tile is prefetched during the previous op
    skipped_macs: int = 0  # dense MACs this work leaves out (masked attention connections)

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n


@dataclass(frozen=True)
class StreamWork:
    """Passes of elements through the vector / nonlinear units or the move engine.

    ``passes``: ``(unit, amount)`` pairs, unit one of ``vector``, ``exp``, ``erf``, ``rsqrt``,
    ``recip`` (amount in elements) or ``move`` (amount in bytes). A nonlinear unit may name its
    implementation (``"exp/poly"``): an op whose arithmetic is a polynomial by definition (sliver's
    integer softmax, GELU, LayerNorm) uses it whatever the model's ``nonlinear`` setting is. ``kind``: ``"vector"``,
    ``"nonlinear"``, ``"move"``, ``"fused"`` or ``"free"``.
    """

    kind: str
    passes: tuple = ()
    ddr_bytes: float = 0.0
    onchip_bytes: float = 0.0
    bits: int = 8


FREE = StreamWork("free")

# -- results ----------------------------------------------------------------------------------


@dataclass
class OpCost:
    """Cycles and energy of one op. ``bound`` is ``compute``, ``memory``, ``fused`` or ``free``;
    ``unit`` is ``gemm``, ``lut-gemm``, ``vector``, ``nonlinear``, ``move``, ``fused`` or
    ``free``; ``utilisation`` is MACs over (cycles x the engine's peak MACs per cycle at the
    op's bit width), 0 for ops without MACs. The ops of an elementwise pipeline keep their own
    ``compute_cycles``, but the pipeline's ``cycles`` are charged to its slowest member and the
    others show 0 (unit ``fused``)."""

    name: str
    op: str
    layer: str
    unit: str
    cycles: float
    compute_cycles: float
    memory_cycles: float
    bound: str
    bits: int
    macs: int = 0
    ddr_bytes: float = 0.0
    onchip_bytes: float = 0.0
    energy_pj: float = 0.0
    utilisation: float = 0.0
    detail: str = ""
    #: for GEMMs: batch, m, k, n and the array mode used (rows, cols, dataflow, pack, tile)
    gemm: dict | None = None
    #: MACs of the dense op that a sparse kernel skips (attention connections a mask removes)
    skipped_macs: int = 0

    def to_dict(self) -> dict:
        out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        if self.gemm is None:
            del out["gemm"]
        if not self.skipped_macs:
            del out["skipped_macs"]
        return out


# -- the systolic array (SCALE-Sim) -----------------------------------------------------------


def systolic_dims(m: int, k: int, n: int, dataflow: str) -> tuple:
    """(Sr, Sc, T) of a GEMM M x K x N under a dataflow, as SCALE-Sim maps it."""
    return {"os": (m, n, k), "ws": (k, n, m), "is": (k, m, n)}[dataflow]


def fold_cycles(rows: int, cols: int, t: int, dataflow: str) -> int:
    """Cycles of one fold: skew in, ``t`` steps, drain; WS/IS also preload ``rows`` cycles."""
    return (rows + cols + t - 2) if dataflow == "os" else (2 * rows + cols + t - 2)


def systolic_cycles(m: int, k: int, n: int, rows: int, cols: int, dataflow: str) -> int:
    """Compute cycles of one GEMM on a ``rows x cols`` array (SCALE-Sim's count plus one)."""
    sr, sc, t = systolic_dims(m, k, n, dataflow)
    return fold_cycles(rows, cols, t, dataflow) * ceil(sr / rows) * ceil(sc / cols)


# -- GEMM tiling and double buffering ---------------------------------------------------------


def _largest_fitting(total: int, other: int, align: int | None, cap_elems: float) -> int:
    """Largest tile edge <= total (a multiple of ``align`` if given) whose tile fits ``cap_elems``."""
    limit = int(cap_elems // max(other, 1))
    if total <= limit:
        return total
    if align:
        return max((limit // align) * align, min(align, total))
    return max(limit, 1)


def tile_plan(k: int, n: int, bytes_per_elem: float, rows: int, cols: int, dataflow: str,
              capacity_bytes: float) -> tuple:
    """Tile edges ``(tk, tn)`` of the streamed operand ``B`` (``k x n``).

    Spatial dimensions are cut at multiples of the array edge they map to (no extra folds); the
    temporal one is cut only if a tile still does not fit.
    """
    cap = capacity_bytes / max(bytes_per_elem, 1e-9)
    k_align = rows if dataflow in ("ws", "is") else None  # K is spatial (rows) in WS and IS
    n_align = cols if dataflow in ("os", "ws") else None  # N is spatial (cols) in OS and WS
    order = ("n", "k") if n_align else ("k", "n")  # shrink a spatial dimension first
    tk, tn = k, n
    for _ in range(2):  # spatial pass, then temporal pass
        for dim in order:
            if tk * tn <= cap:
                return tk, tn
            if dim == "n":
                tn = _largest_fitting(n, tk, n_align, cap)
            else:
                tk = _largest_fitting(k, tn, k_align, cap)
        n_align = k_align = None  # second round: anything that fits
    return tk, tn


def _splits(total: int, tile: int) -> list:
    """[(edge, count)] of the tiles covering ``total`` with edge ``tile``."""
    full, rest = divmod(total, tile)
    return [(e, c) for e, c in ((tile, full), (rest, 1)) if c and e]


def _gemm_mode(work: GemmWork, accel: Accelerator, engine: GemmEngine, pack: float) -> dict:
    """One GEMM at one packing mode: tiles of ``B``, each max(compute, memory), double-buffered.

    ``A`` in DDR is loaded once with the first tile when it fits half the activation buffer, else
    re-read with every tile (:func:`gemm_cost` also tries cutting ``M`` instead)."""
    bw = accel.ddr_bytes_per_cycle
    rows, cols, df = engine.rows, max(1, int(engine.cols * pack)), engine.dataflow
    a_once = work.a_bytes if work.a_ddr and work.a_bytes <= accel.activation_buffer_bytes / 2 else 0.0
    b_elem = work.b_bytes / max(work.k * work.n, 1)
    tk, tn = tile_plan(work.k, work.n, b_elem, rows, cols, df, accel.weight_buffer_bytes / 2)
    compute = tile_bytes = steady = 0.0
    first = None  # (compute, bytes) of the first tile, which also brings A when A is loaded once
    for ek, ck in _splits(work.k, tk):
        for en, cn in _splits(work.n, tn):
            share = (ek * en) / (work.k * work.n)
            bytes_t = work.b_bytes * share if work.b_ddr else 0.0
            bytes_t += work.out_bytes * share if work.out_ddr else 0.0
            if work.a_ddr and not a_once:
                bytes_t += work.a_bytes * ek / work.k  # A re-read for every tile
            c_t = systolic_cycles(work.m, ek, en, rows, cols, df)
            first = (c_t, bytes_t) if first is None else first
            compute += ck * cn * c_t
            tile_bytes += ck * cn * bytes_t
            steady += ck * cn * max(c_t, bytes_t / bw)
    c0, b0 = first
    steady += max(c0, (b0 + a_once) / bw) - max(c0, b0 / bw)  # A rides along with the first tile
    # the first load is not hidden, except a weight tile: weights do not depend on the previous
    # op, so their first tile is fetched while it runs
    prologue = ((0.0 if work.b_constant else b0) + a_once + work.extra_ddr_bytes) / bw
    return {
        "cycles": accel.op_launch_cycles + prologue + work.batch * steady,
        "compute": work.batch * compute,
        "memory": prologue + work.batch * (tile_bytes + a_once) / bw,
        "ddr_bytes": work.extra_ddr_bytes + work.batch * (tile_bytes + a_once),
        "rows": rows, "cols": cols, "pack": pack, "tile": (tk, tn), "dataflow": df, "m_chunk": work.m,
    }


def gemm_cost(work: GemmWork, accel: Accelerator) -> dict:
    """Cycles and DDR bytes of a GEMM work item: the fastest of its engine's packing modes and,
    when ``A`` lives in DDR and does not fit on chip, of two schedules: re-read ``A`` for every
    tile of ``B``, or cut ``M`` into chunks whose ``A`` fits and stream ``B`` once per chunk."""
    engine: GemmEngine = accel.gemm if work.engine == "dsp" else accel.lut_gemm
    best = min((_gemm_mode(work, accel, engine, p) for p in engine.packings(work.bits)),
               key=lambda r: r["cycles"])
    half = accel.activation_buffer_bytes / 2
    if work.a_ddr and work.a_bytes > half and work.m > 1:
        align = {"os": engine.rows, "is": int(engine.cols * engine.packings(work.bits)[0])}.get(engine.dataflow, 1)
        rows_fit = int(half // (work.a_bytes / work.m))
        chunk = max(align, (rows_fit // align) * align) if rows_fit >= align else max(rows_fit, 1)
        parts = [(gemm_cost(_with_m(work, e), accel), c) for e, c in _splits(work.m, chunk)]
        chunked = dict(parts[0][0])
        for key in ("cycles", "compute", "memory", "ddr_bytes"):
            chunked[key] = sum(r[key] * c for r, c in parts)
        chunked["m_chunk"] = chunk
        if chunked["cycles"] < best["cycles"]:
            best = chunked
    if work.grouped:
        lanes = _channel_parallel(work, accel, engine)
        if lanes["cycles"] < best["cycles"]:
            best = lanes
    return best


def _channel_parallel(work: GemmWork, accel: Accelerator, engine: GemmEngine) -> dict:
    """A grouped (depthwise) convolution with every PE an independent MAC unit on its own channel
    and pixels: ``ceil(MACs / (PEs x p))`` cycles against the DDR traffic of all operands."""
    pack = engine.packings(work.bits)[0]
    compute = float(ceil(work.macs / (engine.pes * pack)))
    ddr = work.extra_ddr_bytes + work.batch * sum(
        b for b, in_ddr in ((work.a_bytes, work.a_ddr), (work.b_bytes, work.b_ddr), (work.out_bytes, work.out_ddr))
        if in_ddr)
    memory = ddr / accel.ddr_bytes_per_cycle
    return {"cycles": accel.op_launch_cycles + max(compute, memory), "compute": compute, "memory": memory,
            "ddr_bytes": ddr, "rows": engine.rows, "cols": int(engine.cols * pack), "pack": pack,
            "tile": (work.k, work.n), "dataflow": "channel-parallel", "m_chunk": work.m}


def _with_m(work: GemmWork, m: int) -> GemmWork:
    import dataclasses

    f = m / work.m
    return dataclasses.replace(work, m=m, a_bytes=work.a_bytes * f, out_bytes=work.out_bytes * f)


# -- streams ----------------------------------------------------------------------------------


def stream_lanes(unit: str, accel: Accelerator, nonlinear: str, bits: int = 8) -> float:
    """Elements (bytes, for ``move``) per cycle of a unit. The vector unit has a fixed width, so
    wider elements take more of its lanes (``vector_lanes`` is counted at 8 bits)."""
    if unit == "vector":
        return max(1, accel.vector_lanes * 8 // max(bits, 8))
    if unit == "move":
        return accel.move_bytes_per_cycle
    return accel.nonlinear_lanes[_implementation(unit, nonlinear)]


def _implementation(unit: str, nonlinear: str) -> tuple:
    """``(function, implementation)`` of a nonlinear pass: the unit's own (``"exp/poly"``) or the model's."""
    function, _, own = unit.partition("/")
    return function, own or nonlinear


def stream_cost(work: StreamWork, accel: Accelerator, nonlinear: str) -> dict:
    """Cycles of a stream work item (see the module docstring)."""
    if work.kind == "free":
        return {"cycles": 0.0, "compute": 0.0, "memory": 0.0}
    memory = work.ddr_bytes / accel.ddr_bytes_per_cycle
    if work.kind == "fused":
        return {"cycles": memory, "compute": 0.0, "memory": memory}
    compute = float(sum(ceil(amount / stream_lanes(unit, accel, nonlinear, work.bits))
                        for unit, amount in work.passes))
    return {"cycles": accel.op_launch_cycles + max(compute, memory), "compute": compute, "memory": memory}


def pipeline_cycles(computes, memories, accel: Accelerator) -> float:
    """A chain of elementwise ops that streams element by element through one pipeline (the
    vector unit feeding the nonlinear units and back): the slowest stage sets the pace, and the
    DDR traffic of all of them overlaps it."""
    return accel.op_launch_cycles + max(max(computes), sum(memories))


def sort_passes(n: int) -> int:
    """Element-steps of selecting the top entries of ``n`` scores with a bitonic network."""
    return n * max(1, ceil(log2(max(n, 2))))


# -- energy -----------------------------------------------------------------------------------


def energy_pj(accel: Accelerator, nonlinear: str, *, macs: int = 0, bits: int = 8, ddr_bytes: float = 0.0,
              onchip_bytes: float = 0.0, passes: tuple = (), mac_ratio: float = 1.0) -> float:
    e = accel.energy
    total = macs * e.mac_pj(bits) * mac_ratio + ddr_bytes * e.ddr_pj_per_byte + onchip_bytes * e.onchip_pj_per_byte
    for unit, amount in passes:
        if unit == "vector":
            total += amount * e.vector_pj_per_element
        elif unit == "move":
            continue  # the bytes a move reads and writes are the op's on-chip bytes
        else:
            total += amount * e.nonlinear_pj_per_element[_implementation(unit, nonlinear)[1]]
    return total


__all__ = [
    "FREE", "GemmWork", "OpCost", "StreamWork", "energy_pj", "fold_cycles", "gemm_cost", "pipeline_cycles",
    "sort_passes", "stream_cost", "stream_lanes", "systolic_cycles", "systolic_dims", "tile_plan",
]
