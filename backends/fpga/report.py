"""The FPGA cost report: per-op cycles, per-layer sums, totals, JSON, a text table and a bar chart.

    report = fpga.cost(program)              # -> Report
    print(report)                            # totals and the per-layer table
    print(report.table(ops=True, top=15))    # the 15 costliest ops
    report.save("build/deit_small")          # fpga_report.json + fpga_layers.png, atomically

A *layer* groups the ops of one module by their ONNX node names: ``/blocks.3/attn/qkv/MatMul``
belongs to ``blocks.3``, ``/layer1/layer1.0/conv1/Conv`` to ``layer1.0``; ops outside any module
form ``(top)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .accelerator import Accelerator
from .formulas import OpCost

UNITS = ("gemm", "lut-gemm", "nonlinear", "vector", "move", "fused")
_COLOURS = {"gemm": "#3b6ea5", "lut-gemm": "#7aa6d6", "nonlinear": "#d9822b", "vector": "#e3b448",
            "move": "#8c8c8c", "fused": "#c9c9c9"}


def layer_of(node_name: str) -> str:
    """The layer an ONNX node belongs to, from its scoped name (see the module docstring)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return "(top)"
    first = parts[0]
    if len(parts) > 2 and parts[1].startswith(first + "."):
        return parts[1]
    return first


@dataclass
class Report:
    """The cost of one program on one accelerator at one bit width.

    ``ops`` are in graph order; ``cycles`` is their sum (ops run one after the other).
    ``batch`` is the number of images per run (the input's first dimension)."""

    name: str
    accel: Accelerator
    bits: int
    nonlinear: str
    ops: list = field(default_factory=list)
    batch: int = 1
    seconds: float = 0.0  # wall time of the costing itself

    # -- totals ------------------------------------------------------------------------------
    @property
    def cycles(self) -> float:
        return float(sum(o.cycles for o in self.ops))

    @property
    def latency_ms(self) -> float:
        return self.accel.cycles_to_ms(self.cycles)

    @property
    def fps(self) -> float:
        return self.batch * 1e3 / self.latency_ms if self.cycles else float("inf")

    @property
    def macs(self) -> int:
        return int(sum(o.macs for o in self.ops))

    @property
    def skipped_macs(self) -> int:
        """MACs the dense graph has but a sparse kernel skips (attention connections removed by a
        Tri-Level mask); already left out of :attr:`macs` and the cycles."""
        return int(sum(o.skipped_macs for o in self.ops))

    @property
    def energy_mj(self) -> float:
        return sum(o.energy_pj for o in self.ops) * 1e-9

    @property
    def ddr_bytes(self) -> float:
        return float(sum(o.ddr_bytes for o in self.ops))

    @property
    def utilisation(self) -> float:
        """MACs over (total cycles x the DSP engine's peak MACs per cycle at ``bits``)."""
        peak = self.accel.gemm.peak_macs_per_cycle(self.bits)
        return self.macs / (self.cycles * peak) if self.cycles else 0.0

    def cycles_by(self, key: str) -> dict:
        """Cycles summed by an op attribute (``"unit"``, ``"bound"``, ``"layer"``, ``"op"``)."""
        out: dict = {}
        for o in self.ops:
            out[getattr(o, key)] = out.get(getattr(o, key), 0.0) + o.cycles
        return out

    def layers(self) -> list:
        """[(layer, cycles, {unit: cycles})] in graph order."""
        order: dict = {}
        for o in self.ops:
            entry = order.setdefault(o.layer, {})
            entry[o.unit] = entry.get(o.unit, 0.0) + o.cycles
        return [(name, sum(units.values()), units) for name, units in order.items()]

    def layer_cycles(self, prefix: str) -> float:
        """Cycles of the layers whose name starts with ``prefix`` (``"blocks.3"``)."""
        return float(sum(o.cycles for o in self.ops if o.layer == prefix or o.layer.startswith(prefix + ".")))

    def totals(self) -> dict:
        return {
            "cycles": round(self.cycles),
            "latency_ms": round(self.latency_ms, 4),
            "fps": round(self.fps, 2),
            "macs": self.macs,
            "gmacs_per_s": round(self.macs / (self.latency_ms * 1e6), 2) if self.cycles else 0.0,
            "utilisation": round(self.utilisation, 4),
            "ddr_bytes": round(self.ddr_bytes),
            "energy_mj": round(self.energy_mj, 4),
            "cycles_by_unit": {k: round(v) for k, v in self.cycles_by("unit").items()},
            "cycles_by_bound": {k: round(v) for k, v in self.cycles_by("bound").items()},
            **({"skipped_macs": self.skipped_macs} if self.skipped_macs else {}),
        }

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        a = self.accel
        return {
            "model": self.name,
            "accelerator": {
                "name": a.name, "device": a.device, "clock_mhz": a.clock_mhz,
                "gemm": f"{a.gemm.rows}x{a.gemm.cols} {a.gemm.pe_resource} {a.gemm.dataflow}",
                "ddr_gb_per_s": a.ddr_bytes_per_s / 1e9,
            },
            "bits": self.bits,
            "nonlinear": self.nonlinear,
            "batch": self.batch,
            "costing_seconds": round(self.seconds, 4),
            "totals": self.totals(),
            "layers": [{"layer": n, "cycles": round(c), "ms": round(a.cycles_to_ms(c), 5),
                        "by_unit": {u: round(v) for u, v in units.items()}} for n, c, units in self.layers()],
            "ops": [o.to_dict() for o in self.ops],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        t = self.totals()
        units = ", ".join(f"{u} {100 * c / max(self.cycles, 1):.0f}%" for u, c in
                          sorted(self.cycles_by("unit").items(), key=lambda kv: -kv[1]) if c)
        return (f"{self.name} on {self.accel.name} ({self.accel.clock_mhz:g} MHz), {self.bits}-bit, "
                f"{self.nonlinear} nonlinear: {self.latency_ms:.3f} ms, {self.fps:.1f} FPS, "
                f"{t['gmacs_per_s']:.0f} GMAC/s, utilisation {100 * self.utilisation:.1f}%, "
                f"DDR {self.ddr_bytes / 2**20:.1f} MiB, energy {self.energy_mj:.2f} mJ\n  cycles by unit: {units}")

    def table(self, ops: bool = False, top: int | None = None) -> str:
        """Per-layer table, or per-op table (``ops=True``), costliest first when ``top`` is given."""
        to_ms = self.accel.cycles_to_ms
        if not ops:
            rows = self.layers()
            if top:
                rows = sorted(rows, key=lambda r: -r[1])[:top]
            lines = [f"{'layer':<24}{'cycles':>12}{'ms':>9}{'share':>7}  main unit"]
            for name, c, units in rows:
                main = max(units, key=units.get) if units else "-"
                lines.append(f"{name:<24}{c:>12,.0f}{to_ms(c):>9.3f}{100 * c / max(self.cycles, 1):>6.1f}%  {main}")
            return "\n".join(lines)
        items = [o for o in self.ops if o.unit != "free"]
        if top:
            items = sorted(items, key=lambda o: -o.cycles)[:top]
        lines = [f"{'op':<44}{'unit':<10}{'cycles':>11}{'bound':>9}{'util':>7}{'bits':>5}  detail"]
        for o in items:
            util = f"{100 * o.utilisation:.0f}%" if o.macs else "-"
            lines.append(f"{o.name[-43:]:<44}{o.unit:<10}{o.cycles:>11,.0f}{o.bound:>9}{util:>7}{o.bits:>5}  "
                         f"{o.detail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def plot(self, path: str) -> str:
        """A per-layer bar chart (milliseconds stacked by unit) as a PNG at ``path``; a graph whose
        node names carry no module scopes gets one bar per op for its 40 costliest ops."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layers = self.layers()
        if len(layers) <= 1:  # no module scopes in the node names: the 40 costliest ops instead
            costly = sorted((o for o in self.ops if o.cycles), key=lambda o: -o.cycles)[:40]
            keep = {id(o) for o in costly}
            layers = [(o.name, o.cycles, {o.unit: o.cycles}) for o in self.ops if id(o) in keep]
        names = [n if len(n) <= 28 else "..." + n[-25:] for n, _, _ in layers]
        fig = Figure(figsize=(max(6.0, 0.32 * len(names) + 2), 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        bottom = [0.0] * len(names)
        to_ms = self.accel.cycles_to_ms
        for unit in UNITS:
            heights = [to_ms(units.get(unit, 0.0)) for _, _, units in layers]
            if any(heights):
                ax.bar(range(len(names)), heights, bottom=bottom, color=_COLOURS[unit], label=unit, width=0.8)
                bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{self.name} on {self.accel.name}, {self.bits}-bit: {self.latency_ms:.2f} ms "
                     f"({self.fps:.0f} FPS)", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path

    def save(self, directory: str) -> dict:
        """Write ``fpga_report.json`` and ``fpga_layers.png`` into ``directory`` (created if
        missing); each file is written to a temporary name and renamed, so a reader sees either
        the old file or the complete new one. Returns the two paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {"json": os.path.join(directory, "fpga_report.json"),
                 "chart": os.path.join(directory, "fpga_layers.png")}
        tmp_json, tmp_png = paths["json"] + f".tmp-{os.getpid()}", paths["chart"] + f".tmp-{os.getpid()}"
        try:
            with open(tmp_json, "w") as f:
                f.write(self.to_json())
            self.plot(tmp_png)
            os.replace(tmp_json, paths["json"])
            os.replace(tmp_png, paths["chart"])
        finally:
            for tmp in (tmp_json, tmp_png):
                if os.path.exists(tmp):
                    os.remove(tmp)
        return paths


__all__ = ["OpCost", "Report", "layer_of"]
