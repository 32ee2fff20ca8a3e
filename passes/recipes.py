"""Recipes: named, documented pipelines for the common goals.

    from sliver import passes
    text = passes.recipes.get("int-vit-fpga").pipeline      # pipeline text
    result = passes.recipes.parse("int-cnn").run(program, data=data.context_data("digits"))

    python tools/compile.py tiny_deit --data digits --recipe int-vit-fpga --out build/t
    python tools/compile.py --list-recipes

A recipe is pipeline text and nothing else: ``--recipe NAME`` expands to it, the report and the
summary print the text back, and ``--pipeline`` with that text does exactly the same. The texts
are tuned on the tiny zoo models and digits (block indices name blocks of a 12-block ViT; a model
of another depth needs its own ``blocks=``); on another model, start from the recipe's text and
adjust it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.errors import PipelineError


@dataclass(frozen=True)
class Recipe:
    name: str
    goal: str  # one line: what the result is and where it runs
    models: str  # the models it is meant for
    pipeline: str  # pipeline text (canonical form)
    notes: str = ""  # how it was chosen, what it trades

    def parse(self):
        from .infra.pipeline import parse

        return parse(self.pipeline)


_RECIPES = (
    Recipe(
        name="int-vit-fpga",
        goal="integer-only ViT for the FPGA: top-k token selection on integer scores, polynomial nonlinears, "
        "power-of-two W4A4, approximate multipliers, scales folded into shifts",
        models="ViTs (tiny_deit, deit_*)",
        pipeline="evit{blocks=3,6,9 keep=0.6 epochs=2},poly-act,rapq{wbits=4 abits=4},appmul,pot-shift",
        notes="EViT's selection (keep the patches the CLS token attends to most, fuse the rest) at blocks 3, 6 "
        "and 9 keeps 60% per stage (0.58x the MACs) and is fine-tuned for 2 epochs; its scores and fusion "
        "become integer ops under rapq, so pot-shift makes the whole model integer-only. HeatViT's learned "
        "selectors score with float ops (softmax, sigmoid, norms) that have no integer form, so pot-shift "
        "refuses to follow them. poly-act before the quantiser so that it quantises the approximations it "
        "will run; appmul picks multipliers on the quantised layers. Measured on the trained tiny DeiT "
        "(digits): 97.78% -> 96.39% (two threads; 97.78% with one), -41.7% MACs, integer-only "
        "(docs/composition.md).",
    ),
    Recipe(
        name="int-cnn",
        goal="integer-only CNN: channel pruning, power-of-two W4A4, approximate multipliers, shifts",
        models="CNNs (tiny_resnet, tiny_mobilenet_v2, resnet18, ...)",
        pipeline="adapruner,rapq{wbits=4 abits=4 epochs=4},appmul{costs=probe max_drop=1.0},pot-shift,cleanup",
        notes="AdaPruner removes ~1/3 of the MACs and fine-tunes; the quantiser then calibrates the pruned "
        "network and fine-tunes it for 4 quantisation-aware epochs (pruning and W4A4 together cost "
        "MobileNetV2 most of its accuracy after calibration alone); appmul substitutes multipliers per layer, choosing the budget by accuracy on the held-out "
        "val split (within 1 point of exact multipliers; probe costs), and pot-shift folds every scale into "
        "shifts. Needs data with a val split (--data digits). Measured on digits test (docs/composition.md): "
        "tiny_resnet -33.6% MACs, -0.56 points, 11.8% multiplier energy saved (at W4A4 an approximate "
        "product errs about as much as the operands' own rounding); tiny_mobilenet_v2 -33.0% MACs, -0.83 "
        "points before appmul but -2.50 after it (its multipliers, chosen on the val split, cost test "
        "images), 2.8% saved.",
    ),
    Recipe(
        name="float-vit-cpu",
        goal="float ViT for a CPU: token pruning only (no quantisation), built by TVM",
        models="ViTs (tiny_deit, deit_*)",
        pipeline="evit{blocks=3,6,9 keep=0.7}",
        notes="EViT needs no training: it keeps the patches the CLS token attends to most and fuses the rest "
        "into one token, so every later block runs on fewer tokens.",
    ),
)

RECIPES: dict = {r.name: r for r in _RECIPES}


def get(name: str) -> Recipe:
    """The recipe called ``name`` (a one-line error naming the recipes otherwise)."""
    try:
        return RECIPES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PipelineError(f"unknown recipe {name!r}; {hint}recipes: {', '.join(RECIPES)} (--list-recipes)") from None


def parse(name: str):
    """The :class:`~sliver.passes.Pipeline` of recipe ``name``."""
    return get(name).parse()


def describe() -> str:
    """Every recipe with its goal and pipeline text (what ``--list-recipes`` prints)."""
    lines = []
    for r in _RECIPES:
        lines += [f"{r.name}  {r.goal}", f"    for: {r.models}", f"    pipeline: {r.pipeline}"]
    return "\n".join(lines)
