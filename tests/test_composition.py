"""The composition matrix: every ordered pair of passes from different families, on the tiny models
each applies to, runs and builds with TVM, or is refused at validation with one line.

Families: structure (adapruner, ofa-prune, block-prune), tokens (evit, heatvit, asvit; lvtp on the
segmenter), poly-act, quantisers (rapq, pot-naive), appmul, pot-shift, cleanup. Options are cheap
(no or one epoch, a few calibration images); the models have seeded random weights (tiny_deit
with 4 of its 12 blocks and tiny_mobilenet_v2 with 10 of its 17, :data:`OPTIONS`; what is
checked is that the passes compose, not accuracy; the recipes' accuracy is in
docs/composition.md).

Work is shared: pass A runs once per model and every B runs on its result (a program carries its
facts and history, so ``B`` on ``A``'s result is the pipeline ``A,B``); TVM builds use no schedules
and LLVM at -O0 (the cheapest build, the same lowering) and a result whose ONNX bytes equal one
already built is not built again. An internal exception is a failure of its pair, never an expected outcome.

    python tests/test_composition.py        # prints the whole matrix (outcome per pair)
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import sys

import pytest
import torch

from sliver import backends, ir, models, passes
from sliver.ir import errors
from sliver.models import data as datasets

FAMILY = {
    "adapruner": "structure", "ofa-prune": "structure", "block-prune": "structure",
    "evit": "tokens", "heatvit": "tokens", "asvit": "tokens", "lvtp": "tokens",
    "poly-act": "poly-act",
    "rapq": "quant", "pot-naive": "quant",
    "appmul": "appmul",
    "pot-shift": "pot-shift",
    "cleanup": "cleanup",
}

#: the cheapest options that still exercise each pass's real path
CHEAP = {
    "adapruner": "adapruner{sparse_epochs=0 finetune_epochs=0 batch_size=32 proxy_images=32}",
    "ofa-prune": "ofa-prune{budgets=0.75 search_epochs=1 train_epochs=0 batch_size=32}",
    # the tiling and masking are block-prune's own path; its fine-tuning (5 epochs by default) is the
    # shared trainer's, which the matrix need not pay for on every model
    "block-prune": "block-prune{block=8,4 finetune_epochs=0}",
    "evit": "evit{blocks=1,2 keep=0.7}",
    "heatvit": "heatvit{blocks=1,2 keep=0.7 epochs=0 warm_start=1 batch_size=32}",
    "asvit": "asvit{blocks=1,2 epochs=1 batch_size=32}",
    "lvtp": "lvtp{blocks=1,2}",
    "poly-act": "poly-act",
    "rapq": "rapq{wbits=4 abits=4 calib_images=8 iters=1}",
    "pot-naive": "pot-naive{wbits=4 abits=4 calib_images=8}",
    "appmul": "appmul{images=8}",
    "pot-shift": "pot-shift",
    "cleanup": "cleanup",
}

#: the passes each tiny model is composed with (lvtp only on the segmenter, with every non-token pass)
APPLIES = {
    "tiny_deit": ["block-prune", "evit", "heatvit", "asvit", "poly-act", "rapq", "pot-naive", "appmul",
                  "pot-shift", "cleanup"],
    "tiny_resnet": ["adapruner", "ofa-prune", "block-prune", "rapq", "pot-naive", "appmul", "pot-shift", "cleanup"],
    "tiny_mobilenet_v2": ["adapruner", "ofa-prune", "block-prune", "rapq", "pot-naive", "appmul", "pot-shift",
                          "cleanup"],
    "tiny_segmenter": ["lvtp", "block-prune", "poly-act", "rapq", "pot-naive", "appmul", "pot-shift", "cleanup"],
}

#: training images the passes get (fine-tuning, calibration, sensitivity)
TRAIN_IMAGES = 64


def pairs():
    for model, names in APPLIES.items():
        for a, b in itertools.permutations(names, 2):
            if FAMILY[a] == FAMILY[b]:
                continue
            if model == "tiny_segmenter" and "lvtp" not in (a, b):
                continue
            yield model, a, b


#: zoo options of the matrix's models: tiny_deit with 4 of its 12 identical blocks (every pass's
#: blocks option of CHEAP stays inside them; more copies of one block compose no differently and
#: cost each pair its export, passes and build again: 381 s of the suite's time at depth 12);
#: tiny_mobilenet_v2 with 10 of its 17 inverted residual blocks: every stage and stride kept, and
#: residual additions in three stages (the width-0.35 channels of the zoo model)
OPTIONS = {
    "tiny_deit": {"depth": 4},
    "tiny_mobilenet_v2": {"inverted_residual_setting": (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2), (6, 96, 2, 1), (6, 160, 1, 2), (6, 320, 1, 1))},
}


@functools.lru_cache(maxsize=None)
def _base(model: str):
    torch.manual_seed(0)
    net = models.create(model, **OPTIONS.get(model, {}))
    shape = models.input_shape(model)
    example = torch.from_numpy(
        __import__("numpy").random.default_rng(0).standard_normal(shape).astype("float32"))
    return ir.trace(net, example, name=model)


@functools.lru_cache(maxsize=None)
def _data(model: str) -> dict:
    name = "digit-scenes" if model == "tiny_segmenter" else "digits"
    train = datasets.load(name, "train").take(TRAIN_IMAGES)
    return {"train": train, "val": train, "calib": train}


def _context(model: str):
    return passes.PassContext(data=_data(model), seed=0)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()}"


@functools.lru_cache(maxsize=None)
def _first(model: str, a: str):
    """The program after pass A alone (or the one-line error it raised)."""
    try:
        return passes.parse(CHEAP[a]).run(_base(model), _context(model)).program, None
    except errors.SliverError as e:
        return None, _one_line(e)


_BUILT: dict = {}  # sha256 of ONNX bytes -> outcome of its build

#: the host target with LLVM's optimisations off: the same lowering and code generation, but LLVM
#: no longer spends ~70% of each build optimising code the matrix never runs (12 s -> 3 s for
#: tiny_mobilenet_v2 after appmul)
_TARGET = {**backends.tvm.resolve_target("x86"), "opt-level": 0}


def _build(program) -> str | None:
    """Build ``program`` (onnx level) with TVM, unscheduled; None when it built, else the error."""
    key = hashlib.sha256(program.module.SerializeToString()).hexdigest()
    if key not in _BUILT:
        try:
            backends.tvm.build(program, target=_TARGET, schedule="none")
            _BUILT[key] = None
        except errors.SliverError as e:
            _BUILT[key] = _one_line(e)
    return _BUILT[key]


def outcome(model: str, a: str, b: str) -> tuple:
    """("refused", line) | ("built", "") | ("failed", line) for the pipeline A,B on ``model``."""
    pipe = passes.parse(f"{CHEAP[a]},{CHEAP[b]}")
    base = _base(model)
    try:
        pipe.validate(base.level, base.facts)
    except errors.PassOrderError as e:
        return "refused", str(e)
    after_a, error = _first(model, a)
    if error is not None:
        return "failed", f"{a}: {error}"
    try:
        final = passes.parse(CHEAP[b]).run(after_a, _context(model), lower_to="onnx").program
    except errors.SliverError as e:
        return "failed", f"{b}: {_one_line(e)}"
    error = _build(final)
    if error is not None:
        return "failed", f"tvm build: {error}"
    return "built", ""


@pytest.mark.slow
@pytest.mark.parametrize("model, a, b", list(pairs()), ids=lambda v: v)
def test_pair_runs_and_builds_or_is_refused_at_validation(model, a, b):
    kind, line = outcome(model, a, b)
    if kind == "refused":
        # one line naming the refused pass (and the pass before it when the order is the reason)
        # and the order that works
        assert "\n" not in line and "put " in line, line
        assert f"'{a}' (#1)" in line or f"'{b}' (#2)" in line, line
        if "cannot run after" in line or "level there (after" in line:
            assert f"'{a}'" in line, line
        return
    assert kind == "built", f"{a},{b} on {model}: {line}"


def test_the_matrix_covers_every_family_pair():
    seen = {(FAMILY[a], FAMILY[b]) for _, a, b in pairs()}
    families = set(FAMILY.values())
    assert seen == {(f, g) for f in families for g in families if f != g}
    assert sum(1 for _ in pairs()) == 82 + 48 + 48 + 14


if __name__ == "__main__":  # the whole matrix as a table
    torch.set_num_threads(1)
    counts: dict = {}
    only = sys.argv[1:]  # model names, optionally model:A to run the pairs starting with A
    for model, a, b in pairs():
        if only and model not in only and f"{model}:{a}" not in only:
            continue
        kind, line = outcome(model, a, b)
        counts[kind] = counts.get(kind, 0) + 1
        print(f"{model:<18} {a:>11} -> {b:<11} {kind:<8} {line}", flush=True)
    print(counts, file=sys.stderr)
