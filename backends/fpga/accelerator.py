"""What the FPGA cost model knows about an accelerator: one frozen description per design.

An :class:`Accelerator` is a board (DSPs, LUTs, BRAM, DDR, clock) plus the design we put on it: a
systolic GEMM engine built from DSP slices, an optional second, smaller engine built from LUT
multipliers (approximate and power-of-two products), on-chip buffers, a vector unit for
elementwise work and nonlinear-function units. The formulas that turn these numbers into cycles
live in :mod:`.formulas`; nothing here computes cycles.

Every constant says where it comes from:

- ``[board]``   the device or board data sheet (Xilinx product tables);
- ``[paper]``   a published design (named);
- ``[assumed]`` our own design choice or estimate; change it with :meth:`Accelerator.replace`.

Presets: :data:`ZCU102` (the HeatViT / Auto-ViT-Acc board) and :data:`ZCU104`. Add a preset by
building an ``Accelerator`` and registering it in :data:`PRESETS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from ...ir.errors import BackendError

DATAFLOWS = ("os", "ws", "is")
NONLINEAR_IMPLS = ("exact", "poly")


class AcceleratorError(BackendError):
    """An accelerator description that is inconsistent (too many DSPs, unknown dataflow, ...)."""


@dataclass(frozen=True)
class GemmEngine:
    """A systolic array of ``rows x cols`` processing elements (PEs).

    Attributes:
        rows, cols: PE grid. SCALE-Sim's mapping applies (see :func:`.formulas.systolic_cycles`).
        dataflow: ``"os"`` (output stationary), ``"ws"`` (weight stationary) or ``"is"`` (input
            stationary), as in SCALE-Sim.
        macs_per_pe: bit width -> multiply-accumulates one PE completes per cycle at that width.
            A width between two entries uses the next wider entry (a 6-bit op runs in 8-bit mode).
            The extra products of a packed PE share one operand, so they widen the array along
            its columns: at ``p`` MACs per PE the array behaves as ``rows x (cols * p)``.
        pe_resource: what one PE is built from (``"DSP48E2"``, ``"LUT"``), for the text only.
    """

    rows: int
    cols: int
    dataflow: str
    macs_per_pe: Mapping[int, float]
    pe_resource: str = "DSP48E2"

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise AcceleratorError(f"unknown dataflow {self.dataflow!r}; use one of {', '.join(DATAFLOWS)}")
        if self.rows < 1 or self.cols < 1:
            raise AcceleratorError(f"a GEMM engine needs at least one PE row and column, got {self.rows}x{self.cols}")
        object.__setattr__(self, "macs_per_pe", dict(sorted(self.macs_per_pe.items())))

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def packings(self, bits: int) -> tuple:
        """The packing factors (MACs per PE) an op of ``bits`` may run at, best first.

        An op may always run in a wider mode (an 8-bit product fits the 16-bit multiplier), so
        every entry at or above ``bits`` is allowed; the cost model picks the fastest per op.
        Modes that gang several PEs into one product (fewer than one MAC per PE) are only for
        products too wide for a single PE.
        """
        allowed = {p for width, p in self.macs_per_pe.items() if width >= bits}
        if any(p >= 1 for p in allowed):
            allowed = {p for p in allowed if p >= 1}
        if not allowed:
            widest = max(self.macs_per_pe)
            raise BackendError(
                f"{bits}-bit products do not fit the {self.pe_resource} engine (widest mode {widest} bits); "
                f"cost the program at --bits {widest} or lower")
        return tuple(sorted(allowed, reverse=True))

    def peak_macs_per_cycle(self, bits: int) -> float:
        return self.pes * self.packings(bits)[0]


@dataclass(frozen=True)
class EnergyModel:
    """Dynamic energy per event, in picojoules.

    Source: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
    45 nm figures [paper]: 8-bit integer multiply 0.2 pJ, 32-bit multiply 3.1 pJ, 32-bit add 0.1
    pJ, 32-bit float multiply 3.7 pJ and add 0.9 pJ, 8 KB SRAM 64-bit read 10 pJ, DRAM 1.3-2.6 nJ
    per 64-bit access. They are ASIC numbers used unscaled [assumed]: the FPGA's programmable
    fabric costs several times more per operation, its 16 nm process several times less, and we
    do not pretend to net the two out. Totals are for comparing configurations, not board power
    (HeatViT measures 10.7 W for the whole ZCU102, static and processor system included).
    """

    #: pJ of an 8-bit integer multiply; a b-bit array multiplier scales with b^2 (Horowitz's 8-
    #: and 32-bit figures, 0.2 and 3.1 pJ, follow that law within 4%)
    mult_8bit_pj: float = 0.2
    #: pJ of the accumulate (a 32-bit add) that completes a MAC
    accumulate_pj: float = 0.1
    #: pJ per DDR byte: the midpoint of 1.3-2.6 nJ per 64-bit access, 1.95 nJ / 8 bytes
    ddr_pj_per_byte: float = 243.75
    #: pJ per on-chip buffer byte read or written: 10 pJ per 64-bit access of an 8 KB SRAM (a
    #: BRAM36 holds 4.5 KB)
    onchip_pj_per_byte: float = 1.25
    #: pJ per element through the vector unit: one 32-bit add
    vector_pj_per_element: float = 0.1
    #: pJ per element of a nonlinear function: an exact unit spends about three float multiply-
    #: adds (3 x (3.7 + 0.9) pJ), a second-order integer polynomial about two 16-bit multiplies
    #: and adds (2 x (0.8 + 0.05) pJ) [assumed from Horowitz's figures]
    nonlinear_pj_per_element: Mapping[str, float] = field(
        default_factory=lambda: {"exact": 13.8, "poly": 1.7})
    #: a product on a LUT-built multiplier relative to one on a DSP slice; an approximate
    #: multiplier op may carry its own, smaller ratio (see lowering rule for sliver.AppMatMul)
    lut_mac_ratio: float = 1.0

    def mac_pj(self, bits: int) -> float:
        """Energy of one b-bit multiply-accumulate."""
        return self.mult_8bit_pj * (bits / 8.0) ** 2 + self.accumulate_pj


@dataclass(frozen=True)
class Accelerator:
    """One accelerator design on one board. See the module docstring for the source tags.

    Attributes:
        name: preset name (``"zcu102"``).
        device: the FPGA part, for the text only.
        clock_mhz: fabric clock.
        dsps, luts, bram_bytes: what the device has (for the budget check).
        gemm: the DSP-slice GEMM engine.
        lut_gemm: the LUT-multiplier GEMM engine for approximate / power-of-two products, or None.
        weight_buffer_bytes: on-chip buffer for tiles of the streamed GEMM operand (weights), used
            double-buffered: a tile may use half of it.
        activation_buffer_bytes: on-chip buffer for activations, ping-pong between producer and
            consumer: a tensor stays on chip when it fits in half of it, else it goes to DDR.
        ddr_bytes_per_s, ddr_efficiency: DDR peak bandwidth and the fraction a long burst stream
            sustains.
        vector_lanes: elements per cycle of the vector unit (adds, multiplies, max) at 8 bits;
            the unit is ``8 * vector_lanes`` bits wide, so b-bit elements get ``8/b`` of that.
        nonlinear_lanes: (function, implementation) -> elements per cycle, for ``exp`` (also
            sigmoid, tanh), ``erf`` (GELU), ``rsqrt`` and ``recip`` (one per row of a softmax or
            a norm); implementation ``"exact"`` or ``"poly"`` (second-order integer polynomials
            as in I-BERT and HeatViT: cheaper, so more lanes fit).
        nonlinear_dsps: DSP slices the nonlinear units and the vector unit take (budget check).
        move_bytes_per_cycle: on-chip data movement (transpose, concat, gather) in bytes per cycle.
        op_launch_cycles: fixed cost of starting one non-free op (descriptor fetch, pipeline fill
            of the vector unit).
        energy: the energy model.
    """

    name: str
    device: str
    clock_mhz: float
    dsps: int
    luts: int
    bram_bytes: int
    gemm: GemmEngine
    lut_gemm: GemmEngine | None
    weight_buffer_bytes: int
    activation_buffer_bytes: int
    ddr_bytes_per_s: float
    ddr_efficiency: float
    vector_lanes: int
    nonlinear_lanes: Mapping[tuple, float]
    nonlinear_dsps: int
    move_bytes_per_cycle: int
    op_launch_cycles: int
    energy: EnergyModel = field(default_factory=EnergyModel)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonlinear_lanes", dict(self.nonlinear_lanes))
        if self.gemm.pes + self.nonlinear_dsps > self.dsps:
            raise AcceleratorError(
                f"accelerator {self.name!r} uses {self.gemm.pes} + {self.nonlinear_dsps} DSPs but the "
                f"{self.device} has {self.dsps}; make the GEMM engine smaller")
        if self.weight_buffer_bytes + self.activation_buffer_bytes > self.bram_bytes:
            raise AcceleratorError(
                f"accelerator {self.name!r} asks for {self.weight_buffer_bytes + self.activation_buffer_bytes} "
                f"bytes of buffers but the {self.device} has {self.bram_bytes} bytes of BRAM; shrink them")
        for fn in ("exp", "erf", "rsqrt", "recip"):
            for impl in NONLINEAR_IMPLS:
                if (fn, impl) not in self.nonlinear_lanes:
                    raise AcceleratorError(f"accelerator {self.name!r} gives no lanes for {fn} ({impl})")

    # -- derived quantities ------------------------------------------------------------------
    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def ddr_bytes_per_cycle(self) -> float:
        """Sustained DDR bytes per fabric cycle."""
        return self.ddr_bytes_per_s * self.ddr_efficiency / self.clock_hz

    def cycles_to_ms(self, cycles: float) -> float:
        return cycles / self.clock_hz * 1e3

    def replace(self, **changes) -> "Accelerator":
        """A variant of this design (``ZCU102.replace(clock_mhz=200)``)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        g = self.gemm
        packs = ", ".join(f"{b}-bit x{p:g}" for b, p in g.macs_per_pe.items())
        lines = [
            f"{self.name}: {self.device} at {self.clock_mhz:g} MHz",
            f"  GEMM engine  {g.rows}x{g.cols} {g.pe_resource} PEs, {g.dataflow.upper()} dataflow, "
            f"MACs per PE: {packs}",
        ]
        if self.lut_gemm is not None:
            lines.append(f"  LUT engine   {self.lut_gemm.rows}x{self.lut_gemm.cols} LUT multipliers, "
                         f"{self.lut_gemm.dataflow.upper()} dataflow")
        lines += [
            f"  buffers      weights {self.weight_buffer_bytes // 1024} KiB (double-buffered), "
            f"activations {self.activation_buffer_bytes // 1024} KiB (ping-pong) of {self.bram_bytes // 1024} KiB BRAM",
            f"  DDR          {self.ddr_bytes_per_s / 1e9:g} GB/s x {self.ddr_efficiency:g} = "
            f"{self.ddr_bytes_per_cycle:.1f} B/cycle",
            f"  vector unit  {self.vector_lanes} lanes; nonlinear lanes exact/poly: "
            + ", ".join(f"{fn} {self.nonlinear_lanes[(fn, 'exact')]:g}/{self.nonlinear_lanes[(fn, 'poly')]:g}"
                        for fn in ("exp", "erf", "rsqrt", "recip")),
            f"  DSPs used    {g.pes + self.nonlinear_dsps} of {self.dsps}",
        ]
        return "\n".join(lines)


# -- presets ----------------------------------------------------------------------------------
#: MACs per DSP48E2 by operand width. The DSP48E2 has a 27x18 multiplier and a 48-bit
#: accumulator: one product up to 18 bits [board]; two 8-bit products that share one operand
#: (Xilinx WP486, "Deep Learning with INT8 Optimization on Xilinx Devices") [paper]; four 4-bit
#: products sharing one operand, packed with guard bits the same way [assumed]; a 32-bit product
#: takes four DSPs (four 16x16 partial products) [assumed].
DSP48E2_MACS = {4: 4, 8: 2, 16: 1, 32: 0.25}

#: A LUT-built multiplier is made at the width it is given; one product per PE at any width.
LUT_MACS = {2: 1, 4: 1, 8: 1, 16: 1}

_ZCU102_BRAM = 912 * 36 * 1024 // 8  # 912 BRAM36 = 32.1 Mb [board]

ZCU102 = Accelerator(
    name="zcu102",
    device="XCZU9EG (ZCU102)",
    clock_mhz=300.0,  # [paper] HeatViT runs its ZCU102 design at 300 MHz
    dsps=2520,  # [board]
    luts=274_080,  # [board]
    bram_bytes=_ZCU102_BRAM,
    # [assumed] 32x64 DSPs = 2048 (81% of the device), output stationary. Among the 2048-DSP
    # power-of-two shapes and the three SCALE-Sim dataflows, 32x64 OS gives DeiT-S its lowest
    # GEMM cycle count (SCALE-Sim formulas); the rest of the DSPs go to the nonlinear units.
    gemm=GemmEngine(rows=32, cols=64, dataflow="os", macs_per_pe=DSP48E2_MACS),
    # [assumed] 512 LUT multipliers (about 40k LUTs at ~80 LUTs per 8-bit multiplier, 15% of the
    # device), the kind Auto-ViT-Acc uses for its power-of-two quantized share of the work
    lut_gemm=GemmEngine(rows=16, cols=32, dataflow="os", macs_per_pe=LUT_MACS, pe_resource="LUT"),
    weight_buffer_bytes=1024 * 1024,  # [assumed] 2 x 512 KiB weight tiles
    activation_buffer_bytes=2 * 1024 * 1024,  # [assumed] 2 x 1 MiB activations; rest: accumulators, tables
    ddr_bytes_per_s=19.2e9,  # [board] PS DDR4, 64-bit
    ddr_efficiency=0.8,  # [assumed] sustained share of peak for long bursts through the HP ports
    vector_lanes=64,  # [assumed] one 512-bit word of 8-bit elements per cycle
    nonlinear_lanes={
        # [assumed] exact units (fixed-point CORDIC / table + interpolation) are large, so fewer
        # fit; HeatViT's polynomial approximations are a square and a shift, so 4x more lanes.
        ("exp", "exact"): 16, ("exp", "poly"): 64,
        ("erf", "exact"): 16, ("erf", "poly"): 64,
        ("rsqrt", "exact"): 1, ("rsqrt", "poly"): 4,
        ("recip", "exact"): 1, ("recip", "poly"): 4,
    },
    nonlinear_dsps=256,  # [assumed] vector unit, nonlinear units, token selector control
    move_bytes_per_cycle=64,  # [assumed] 512-bit on-chip move engine
    op_launch_cycles=32,  # [assumed]
)

ZCU104 = ZCU102.replace(
    name="zcu104",
    device="XCZU7EV (ZCU104)",
    dsps=1728,  # [board]
    luts=230_400,  # [board]
    bram_bytes=312 * 36 * 1024 // 8 + 96 * 288 * 1024 // 8,  # 312 BRAM36 + 96 URAM288 [board]
    # [assumed] 32x48 = 1536 DSPs, same dataflow and packing as the ZCU102 design
    gemm=GemmEngine(rows=32, cols=48, dataflow="os", macs_per_pe=DSP48E2_MACS),
    nonlinear_dsps=160,  # [assumed]
)

PRESETS: dict = {a.name: a for a in (ZCU102, ZCU104)}


def get_accelerator(accel) -> Accelerator:
    """An :class:`Accelerator` from itself or a preset name."""
    if isinstance(accel, Accelerator):
        return accel
    if isinstance(accel, str) and accel.lower() in PRESETS:
        return PRESETS[accel.lower()]
    raise BackendError(f"unknown accelerator {accel!r}; presets: {', '.join(sorted(PRESETS))}")
