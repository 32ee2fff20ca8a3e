"""The report of a pipeline run: one entry per pass or level conversion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepReport:
    name: str
    level: str
    options: str
    seconds: float
    before: dict | None
    after: dict | None
    max_abs_diff: float | None = None
    ir_path: str | None = None
    notes: dict = field(default_factory=dict)
    #: allowed output change (relative), None when the step may change outputs
    tolerance: float | None = None
    #: a pass that trades accuracy for cost (no tolerance); level conversions are not lossy
    lossy: bool = False
    #: score after this step (filled by an accuracy instrument): {"value", "metric", "dataset", "change"}
    accuracy: dict | None = None


@dataclass
class Report:
    pipeline: str
    seed: int
    before: dict | None = None
    after: dict | None = None
    steps: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def g(stats, key, scale, fmt):
            return fmt.format(stats[key] / scale) if stats else "-"

        scored = any(s.accuracy for s in self.steps)
        acc_head = f"{'score %':>9}" if scored else ""
        rows = [f"pipeline: {self.pipeline or '(empty)'}   seed: {self.seed}"]
        rows.append(f"{'step':<22}{'level':<7}{'time s':>8}{'GMACs':>10}{'M params':>10}{'max|diff|':>11}{acc_head}")
        rows.append(f"{'(input)':<22}{'':<7}{'':>8}{g(self.before, 'macs', 1e9, '{:.4f}'):>10}"
                    f"{g(self.before, 'params', 1e6, '{:.3f}'):>10}{'':>11}")
        for s in self.steps:
            diff = "-" if s.max_abs_diff is None else f"{s.max_abs_diff:.2e}"
            acc = (f"{s.accuracy['value']:>9.2f}" if s.accuracy else f"{'':>9}") if scored else ""
            rows.append(f"{s.name:<22}{s.level:<7}{s.seconds:>8.2f}{g(s.after, 'macs', 1e9, '{:.4f}'):>10}"
                        f"{g(s.after, 'params', 1e6, '{:.3f}'):>10}{diff:>11}{acc}")
        return "\n".join(rows)
