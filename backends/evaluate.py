"""Score a model at any level on a named data split: accuracy for classifiers, mIoU for segmenters.

    from sliver.backends.evaluate import evaluate
    acc = evaluate(program)                          # torch level: PyTorch; onnx level: ONNX Runtime
    acc = evaluate(backends.tvm.build(onnx_prog))    # tvm: the compiled artifact, on this machine
    miou = evaluate(seg_program, split="val", task="segmentation")

What runs where:

- a torch-level Program runs its ``GraphModule`` in PyTorch (no grad);
- an onnx-level Program runs in ONNX Runtime (one CPU session for the whole split);
- a tvm-level Program is built for the host (``x86``) first; an :class:`~sliver.backends.tvm.Artifact`
  runs as it is.

Batching: onnx and tvm Programs (and torch.export ones) have static shapes, so they run at the
batch size of the Program's example input (a Program traced at batch 1 is scored image by image;
trace at, say, batch 32 for speed). A torch-level Program traced by torch.fx runs any batch, so it
is scored ``TORCH_BATCH`` images at a time when its own batch is smaller. Its first four images
are also run at the Program's own batch size and must agree with their rows of the first batch
(``np.allclose``, rtol 1e-4, atol 1e-5; the integer emulation of a quantised model agrees
exactly), or else (a module that treats the batch axis as data) the whole split runs at the
Program's batch size. Image by image, scoring the tiny DeiT's stages took most of the ~40 s the
accuracy guard spent in ``make compile``. The last, partial batch is padded by repeating its last
image and the padded outputs are dropped, so every image counts exactly once whatever the batch
size.

The data: ``data`` may be an :class:`~sliver.models.data.ImageSet`, a data set name (``digits``,
``digit-scenes``) or a path (see :func:`sliver.models.data.load`). Without it, ``task`` picks the
set (classification -> digits, segmentation -> digit-scenes), and without a task the model's input
size does (32x32 -> digits, 64x64 -> digit-scenes). Scores are percentages.

(This module lives in ``backends`` because scoring the tvm level needs the TVM backend; it reads
the data sets and scores from ``sliver.models.data``.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..ir.errors import AccuracyDropError, DataError, SliverError
from ..ir.program import Program
from ..models import data as datasets
from . import tvm as tvm_backend

__all__ = ["AccuracyGuard", "Evaluation", "evaluate", "score", "evaluate_before_after", "TASK_DATASETS"]

#: the data set each task is scored on by default
TASK_DATASETS = {"classification": "digits", "segmentation": "digit-scenes"}
_SIZE_DATASETS = {32: "digits", 64: "digit-scenes"}
#: batch of a torch.fx Program's scoring (see the module notes)
TORCH_BATCH = 32


@dataclass(frozen=True)
class Evaluation:
    """A score and what it was measured on."""

    value: float  # percent
    metric: str  # "accuracy" or "miou"
    dataset: str  # e.g. "digits/test"
    level: str  # "torch", "onnx" or "tvm"
    count: int  # images scored
    batch_size: int
    seconds: float

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.metric} {self.value:.2f}% on {self.dataset} ({self.count} images, {self.level} level, "
                f"{self.seconds:.1f} s)")


# -- what to run ------------------------------------------------------------------------------
def _input_shape(target) -> tuple:
    if not isinstance(target, (Program, tvm_backend.Artifact)):
        raise DataError(f"evaluate() takes a sliver Program or a TVM Artifact, got {type(target).__name__}")
    if isinstance(target, Program):
        if len(target.example_inputs) != 1:
            raise DataError(f"{target.name} takes {len(target.example_inputs)} inputs; evaluate() scores "
                            "single-image models")
        return tuple(target.example_inputs[0].shape)
    if len(target.input_shapes) != 1:
        raise DataError(f"{target.name} takes {len(target.input_shapes)} inputs; evaluate() scores single-image models")
    return tuple(target.input_shapes[0])


def _runner(target, threads: int | None):
    """(level, run(batch: np.ndarray) -> first output as np.ndarray) for a Program or an Artifact."""
    if isinstance(target, tvm_backend.Artifact):
        return "tvm", lambda batch: target.run([batch])[0]
    if not isinstance(target, Program):
        raise DataError(f"evaluate() takes a sliver Program or a TVM Artifact, got {type(target).__name__}")
    if target.level == "torch":
        import torch

        module = target.module

        def run_torch(batch):
            with torch.no_grad():
                out = module(torch.from_numpy(batch))
            out = out[0] if isinstance(out, (tuple, list)) else out
            return out.detach().cpu().numpy()

        return "torch", run_torch
    if target.level == "onnx":
        from ..ir.runtime import onnxruntime_session

        session = onnxruntime_session(target.module, threads=threads)
        name = session.get_inputs()[0].name
        return "onnx", lambda batch: session.run(None, {name: batch})[0]
    artifact = tvm_backend.build(target, target="x86")
    return "tvm", lambda batch: artifact.run([batch])[0]


def _resolve_data(data, split: str, task: str | None, shape: tuple) -> datasets.ImageSet:
    if isinstance(data, datasets.ImageSet):
        dataset = data
    else:
        if data is None:
            if task is not None:
                if task not in TASK_DATASETS:
                    raise DataError(f"unknown task {task!r}; tasks: {', '.join(TASK_DATASETS)}")
                data = TASK_DATASETS[task]
            elif len(shape) == 4 and shape[2] == shape[3] and shape[2] in _SIZE_DATASETS:
                data = _SIZE_DATASETS[shape[2]]
            else:
                raise DataError(f"cannot tell which data set fits input {'x'.join(map(str, shape))}; "
                                "pass task='classification' or 'segmentation', or data=...")
        datasets.check_split(split, str(data))
        dataset = datasets.load(data, split)
    if task is not None and dataset.task != task:
        raise DataError(f"{dataset.name} is a {dataset.task} set, not {task}; pass matching data or task")
    if dataset.task not in TASK_DATASETS:
        raise DataError(f"{dataset.name} has no labels to score against; use digits or digit-scenes")
    if tuple(dataset.image_shape) != tuple(shape[1:]):
        raise DataError(f"{dataset.name} images are {'x'.join(map(str, dataset.image_shape))} but the model takes "
                        f"{'x'.join(map(str, shape[1:]))}; pass data that fits the model")
    return dataset


# -- scoring ----------------------------------------------------------------------------------
def score(target, split: str = "test", task: str | None = None, data=None, *, limit: int | None = None,
          threads: int | None = None, progress: bool = False) -> Evaluation:
    """Score ``target`` (a Program at any level, or an Artifact) on ``split``; see the module notes.

    ``limit`` scores only the first ``limit`` images of the split (for quick checks); ``threads``
    sets ONNX Runtime's threads (torch uses its global setting, TVM its own pool).
    """
    shape = _input_shape(target)
    dataset = _resolve_data(data, split, task, shape)
    if limit is not None:
        dataset = dataset.take(limit)
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} is empty; nothing to score")
    level, run = _runner(target, threads)
    metric = datasets.metric_for(dataset.task, dataset.num_classes)
    images = dataset.images
    t0 = time.perf_counter()

    def batch_out(start: int, size: int):
        batch = images[start:start + size].numpy()
        real = batch.shape[0]
        if real < size:  # pad with copies of the last image; their outputs are dropped
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - real, axis=0)])
        try:
            out = run(np.ascontiguousarray(batch, dtype=np.float32))
        except SliverError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"running the {level}-level model on {dataset.name} failed: {msg}") from None
        return np.asarray(out)[:real]

    batch_size, first = int(shape[0]), None
    if level == "torch" and batch_size < TORCH_BATCH and len(dataset) > batch_size and _any_batch(target):
        first = _batched_first(batch_out, batch_size, min(TORCH_BATCH, len(dataset)))
        if first is not None:
            batch_size = first.shape[0]
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"evaluate {level}", unit="batch", leave=False)
    for start in starts:
        out = first if start == 0 and first is not None else batch_out(start, batch_size)
        metric.update(out, dataset.targets[start:start + out.shape[0]])
    return Evaluation(metric.value(), metric.name, dataset.name, level, len(dataset), batch_size,
                      time.perf_counter() - t0)


def _any_batch(program: Program) -> bool:
    """A torch-level Program traced by torch.fx (its graph takes the batch from the input)."""
    from ..ir.torch_level import trace_method

    return trace_method(program) == "fx"


def _batched_first(batch_out, own: int, size: int):
    """The outputs of the first ``size`` images run as one batch, if they agree with the same
    images run at the Program's own batch size ``own`` (see the module notes); else None."""
    try:
        together = batch_out(0, size)
    except SliverError:
        return None
    count = min(4 * own, size)  # a module that mixes the batch changes these rows already
    alone = np.concatenate([batch_out(start, own) for start in range(0, count, own)])[:count]
    if together.shape[0] != size or not np.allclose(together[:count], alone, rtol=1e-4, atol=1e-5):
        return None
    return together


def evaluate(target, split: str = "test", task: str | None = None, data=None, **options) -> float:
    """Accuracy (classification) or mIoU (segmentation), in percent, of ``target`` on ``split``.

    ``target`` is a Program at the torch, onnx or tvm level, or a built TVM Artifact. Options are
    those of :func:`score`, which also says how long it took and on what.
    """
    return score(target, split, task, data, **options).value


def evaluate_before_after(before: Program, after, *, data="digits", split: str = "test",
                          artifact=None, task: str | None = None, limit: int | None = None) -> dict:
    """Score a model before and after a pipeline, as a JSON-ready dict for a report.

    ``before`` and ``after`` are Programs (any level); ``artifact`` (optional) is the TVM build of
    ``after``, scored too. Returns ``{"dataset", "metric", "before", "after", "change"[, "tvm"],
    "count", "seconds"}`` with scores in percent and ``change = after - before``.
    """
    first = score(before, split, task, data, limit=limit)
    second = score(after, split, task, data, limit=limit)
    report = {
        "dataset": first.dataset,
        "metric": first.metric,
        "before": first.value,
        "after": second.value,
        "change": second.value - first.value,
        "levels": {"before": first.level, "after": second.level},
        "count": first.count,
        "seconds": first.seconds + second.seconds,
    }
    if artifact is not None:
        built = score(artifact, split, task, data, limit=limit)
        report["tvm"] = built.value
        report["seconds"] += built.seconds
    return report


# -- the accuracy guard: a pipeline instrument ------------------------------------------------
from ..passes.infra.pipeline import Instrument  # noqa: E402  (backends may import passes, never the reverse)


class AccuracyGuard(Instrument):
    """Score every stage of a pipeline run and stop it when one costs too much.

        guard = AccuracyGuard(data="digits", split="test", max_drop=1.5)
        pipe.run(program, ctx, instruments=[guard])
        guard.first, guard.last, guard.stages        # Evaluations and one row per stage

    The input program is scored once at the start; then the program after every step that may
    change the outputs (a pass without a tolerance, ``step.lossy``) is scored, and the final
    program (the level that is exported) once more unless the last step was scored already. Each
    score goes into its step (``step.accuracy``). With ``max_drop`` (points), the first stage that
    scores more than ``max_drop`` below the input stops the pipeline with an
    :class:`~sliver.ir.errors.AccuracyDropError` naming that step. Every stage is one pass over
    ``split`` (see :func:`score`); ``limit`` scores only its first images.

    ``score_export=False`` leaves the final stage (the last scored step, or the exported program)
    to the caller, who scores what it built from it with :meth:`score_final` (compile.py: its TVM
    artifact, which computes the program's integers exactly and runs an AppMul program ~100x
    faster than ONNX Runtime runs the standard-op body of ``sliver.AppMatMul``).
    """

    def __init__(self, data="digits", split: str = "test", *, max_drop: float | None = None,
                 task: str | None = None, limit: int | None = None, score_export: bool = True) -> None:
        if max_drop is not None and not max_drop >= 0:
            raise DataError(f"max_drop={max_drop} must be a number of points >= 0")
        self.data, self.split, self.max_drop, self.task, self.limit = data, split, max_drop, task, limit
        self.score_export = score_export
        self._pending = None  # the last step, when the caller scores the final program
        self.first: Evaluation | None = None  # the input program
        self.last: Evaluation | None = None  # the latest scored stage (the final program after the run)
        self.stages: list = []

    def _score(self, program) -> Evaluation:
        return score(program, self.split, self.task, self.data, limit=self.limit)

    def _row(self, name: str, evaluation: Evaluation) -> dict:
        row = {"step": name, "value": evaluation.value, "metric": evaluation.metric, "dataset": evaluation.dataset,
               "level": evaluation.level, "change": evaluation.value - self.first.value}
        self.stages.append(row)
        return row

    def start(self, program, report) -> None:
        self.first = self.last = self._score(program)
        self._row("(input)", self.first)
        self._last_scored = True

    def after(self, step, before, after) -> None:
        self._flush()  # a deferred stage was not the last: score it now
        self._last_scored = False
        if step.lossy:
            if self.score_export:
                self._stage(step, after)
            else:
                self._pending = (step, after)

    def finish(self, program, report) -> None:
        if report.steps and not self._last_scored and self._pending is None:
            if self.score_export:
                self._stage(report.steps[-1], program)
            else:
                self._pending = (report.steps[-1], program)

    def _flush(self) -> None:
        if self._pending is not None:
            step, program = self._pending
            self._pending = None
            self._stage(step, program)

    @property
    def pending(self) -> bool:
        """The final program is left for :meth:`score_final`."""
        return self._pending is not None

    def score_final(self, target) -> None:
        """Score ``target`` (an artifact built from the final program, or the program itself) as
        the final stage, when ``score_export=False`` left it unscored; else nothing to do."""
        if self._pending is not None:
            step, _ = self._pending
            self._pending = None
            self._stage(step, target)

    def _stage(self, step, program) -> None:
        evaluation = self._score(program)
        self.last = evaluation
        step.accuracy = self._row(step.name, evaluation)
        self._last_scored = True
        drop = self.first.value - evaluation.value
        if self.max_drop is not None and drop > self.max_drop:
            what = f"pass {step.name!r}" if step.lossy else f"step {step.name!r} (the exported program)"
            raise AccuracyDropError(
                f"{what} dropped {evaluation.metric} on {evaluation.dataset} from {self.first.value:.2f}% to "
                f"{evaluation.value:.2f}% ({-drop:+.2f} points), more than the allowed {self.max_drop:g} "
                f"(--max-drop); change {step.name}'s options or allow a larger drop"
            )
