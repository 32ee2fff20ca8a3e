"""Golden IR of every pass alone (those without a golden file in their own tests) and of every
recipe, on seeded random weights with cheap options (the IR text holds structure, shapes and
types, not weight values). ``pytest --update-golden`` rewrites them; review the diff like code."""

from __future__ import annotations

import dataclasses

import pytest

from sliver import passes
from sliver.backends import fpga
from sliver.ir.stats import program_stats
from sliver.models import data as datasets

#: option overrides that make a pass cheap without changing the structure it produces, and keep
#: the text the same on every CPU: no fine-tuning (float rounding differs between CPUs and training
#: amplifies it), and appmul with an unlimited budget, which gives each layer the library's
#: cheapest multiplier (with a finite budget the choice hangs on the sensitivities' last bits)
CHEAP = {
    "heatvit": {"epochs": 0, "warm_start": 0},
    "evit": {"epochs": 0},
    "asvit": {"epochs": 1, "batch_size": 32},
    "adapruner": {"sparse_epochs": 0, "finetune_epochs": 0, "proxy_images": 32, "batch_size": 32},
    "ofa-prune": {"search_epochs": 1, "train_epochs": 0, "batch_size": 32},
    "rapq": {"calib_images": 8, "iters": 1},
    "pot-naive": {"calib_images": 8},
    "appmul": {"images": 8, "budget": 1e9},
}


def cheap(text: str) -> "passes.Pipeline":
    """The pipeline ``text`` with the training / calibration options of :data:`CHEAP`."""
    out = []
    for p in passes.parse(text).passes:
        given = {name: getattr(p.options, name) for name in p.explicit}
        fields = {f.name for f in dataclasses.fields(p.options)}
        given.update({k: v for k, v in CHEAP.get(p.name, {}).items() if k in fields})
        out.append(type(p)(**given))
    return passes.Pipeline(out)


def _context(model: str):
    name = "digit-scenes" if model == "tiny_segmenter" else "digits"
    train = datasets.load(name, "train").take(64)
    return passes.PassContext(data={"train": train, "val": train, "calib": train}, seed=0)


PASSES = [
    ("tiny_deit", "heatvit{blocks=1,2 keep=0.7}"),
    ("tiny_deit", "asvit{blocks=1,2}"),
    ("tiny_deit", "poly-act"),
    ("tiny_deit", "rapq{wbits=4 abits=4}"),
    ("tiny_resnet", "block-prune{block=8,4}"),
    ("tiny_resnet", "ofa-prune{budgets=0.75}"),
    ("tiny_resnet", "rapq{wbits=4 abits=4}"),
    ("tiny_resnet", "pot-naive{wbits=4 abits=4}"),
    ("tiny_resnet", "rapq{wbits=4 abits=4},appmul"),
]


def _name(text: str) -> str:
    return "_".join(p.name.replace("-", "_") for p in passes.parse(text).passes)


@pytest.mark.parametrize("model, text", PASSES, ids=[f"{m}-{_name(t)}" for m, t in PASSES])
def test_pass_golden(model, text, make_program, golden):
    out = cheap(text).run(make_program(model), _context(model)).program
    golden(f"{out.level}/{model}_{_name(text)}", out.text())


RECIPE_MODELS = {"int-vit-fpga": "tiny_deit", "int-cnn": "tiny_resnet", "float-vit-cpu": "tiny_deit"}


def test_every_recipe_has_a_golden_model():
    assert set(RECIPE_MODELS) == set(passes.recipes.RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPE_MODELS))
def test_recipe_golden(name, make_program, golden):
    model = RECIPE_MODELS[name]
    out = cheap(passes.recipes.get(name).pipeline).run(make_program(model), _context(model), lower_to="onnx").program
    golden(f"onnx/recipe_{name.replace('-', '_')}", out.text())
    # every op of every recipe's output has an FPGA cost rule and fits its engines (make compile costs them)
    report = fpga.cost(out, bits=8, nonlinear="poly")
    assert report.macs == program_stats(out).macs
