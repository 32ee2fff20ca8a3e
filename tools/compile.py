#!/usr/bin/env python3
"""Compile a model through a sliver pipeline to a deployable artifact.

    python tools/compile.py deit_tiny --pipeline fold-bn,cleanup --target x86 --out build/deit_tiny
    python tools/compile.py model.onnx --input-shape 1,3,224,224 --pipeline cleanup --out build/m
    python tools/compile.py tiny_deit --data digits --pipeline "evit{blocks=1,2 keep=0.7}" --out build/t
    python tools/compile.py tiny_deit --data digits --recipe int-vit-fpga --target x86,fpga --compare-dense --out build/t
    python tools/compile.py --list-passes
    python tools/compile.py --list-recipes

MODEL is a zoo name (``--list-models``), the path of an ``.onnx`` file (never modified),
``path/to/file.py:factory`` (a function returning an ``nn.Module``) or an exported program
(``.pt2``); ``--weights FILE`` loads a ``.pt``/``.pth`` state dict or a ``.safetensors`` file into a
zoo or factory model, strictly. OUT
receives ``model.onnx`` (the program after the pipeline), ``model.so`` + ``model.json`` (the TVM
artifact), ``report.json`` and, with ``--dump-ir``, ``ir/NN-<step>.txt``. With ``--keep-maps``
(after a token pass) it also receives ``keep_maps.png``: the patches each pruning stage kept, drawn
over a digit (a digit scene for 64x64 models) and scikit-image's astronaut photo. With
``--regions`` (after the aftrans pass) it receives ``regions.png``: the region SACM selected on
eight small-digit test canvases, with the true digit boxes.

``--recipe NAME`` is a named pipeline (``--list-recipes``, ``sliver.passes.recipes``): it expands to
its pipeline text, which the summary and ``report.json`` print back. ``--target x86,fpga`` builds
the x86 artifact and costs the same program on the FPGA model in one run; ``--compare-dense`` also
builds and costs the input model, so the summary shows CPU latency, FPGA latency and energy before
and after. The pipeline runs once, with one pass context built from the flags (``--data``,
``--seed``, ``--device``, progress, and an FPGA cost model from ``--accel``/``--bits`` for
latency-aware options such as ``heatvit{latency=0.5}``); IR dumps, keep maps, regions and the
accuracy guard are instruments on it.

With ``--data`` (``digits``, ``digit-scenes``, ``small-digits``, an ``.npz`` path or an image-folder
tree, one subfolder per class, read with ``--resize``/``--crop``/``--mean``/``--std``) the pipeline's
passes receive that data (splits ``train``/``val``/``calib``) for calibration and fine-tuning, and
the model is scored on ``--split`` before the pipeline, after every pass that may change its
outputs, as the exported program and as the built x86 artifact; the scores go into
``report.json`` under ``accuracy`` (``stages``: one row per scored step), next to the MACs.
``--max-drop POINTS`` stops at the first pass that scores more than POINTS below the input model,
with one line naming it. A tiny zoo model is then used with its trained weights with
``digits``/``digit-scenes``/``small-digits`` (trained once per machine under ``--seed`` and cached,
see ``sliver.models.training.cached``); with data of the user's own, any model is taken with the
weights it has (``--weights``). Passes that train run on ``--device``. OUT is written
atomically: it holds either the complete result or, on failure, whatever it held before.

Errors exit with code 2 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import numpy as np


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compile.py", description="Compile a model through a sliver pipeline.")
    p.add_argument("model", nargs="?",
                   help="zoo model name, path of an .onnx file, path/to/file.py:factory (a function returning an "
                        "nn.Module) or an exported program (.pt2)")
    p.add_argument("--weights", help="checkpoint loaded strictly into the model: a .pt/.pth state dict or .safetensors")
    p.add_argument("--pipeline", default=None, help='pass pipeline, e.g. "fold-bn,cleanup" (default: empty)')
    p.add_argument("--recipe", help="a named pipeline instead of --pipeline (--list-recipes)")
    p.add_argument(
        "--target",
        default="x86",
        help="x86: a TVM artifact for the host CPU (default); arm: a TVM artifact for aarch64 Linux "
        "with NEON (Cortex-A53; needs aarch64-linux-gnu-g++); arm-dotprod: the same for cores with the "
        "dot-product extension (Cortex-A55, +dotprod: integer matmuls/convolutions on sdot); fpga: a "
        "cycle-level cost report on --accel; x86,fpga (or arm,fpga): both for the same program",
    )
    p.add_argument("--accel", default="zcu102", help="FPGA accelerator preset for --target fpga (default: zcu102)")
    p.add_argument("--bits", type=int, default=8, help="bit width of float values on the FPGA model (default: 8)")
    p.add_argument(
        "--nonlinear",
        default="auto",
        choices=["auto", "exact", "poly"],
        help="FPGA nonlinear units; auto: poly after the poly-act pass, else exact",
    )
    p.add_argument("--out", help="output directory")
    p.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--dump-ir", action="store_true", help="write the IR text after every step to OUT/ir/")
    p.add_argument(
        "--keep-maps",
        action="store_true",
        help="draw the token keep maps of each pruning stage over a digit and a photo into OUT/keep_maps.png",
    )
    p.add_argument(
        "--regions",
        action="store_true",
        help="draw the aftrans pass's selected regions (and the true boxes) on small-digit test images into OUT/regions.png",
    )
    p.add_argument(
        "--data",
        help="score before/after on this data and hand it to passes that calibrate or fine-tune: "
        "digits, digit-scenes, small-digits or an .npz path (tiny zoo models then use their trained weights)",
    )
    p.add_argument("--resize", type=int, help="image-folder --data: shorter side after resizing (default: crop / 0.875)")
    p.add_argument("--crop", type=int, help="image-folder --data: centre-crop size (default: the model's input size)")
    p.add_argument("--mean", help="image-folder --data: per-channel mean, e.g. 0.485,0.456,0.406 (ImageNet's by default)")
    p.add_argument("--std", help="image-folder --data: per-channel std, e.g. 0.229,0.224,0.225 (ImageNet's by default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where passes that train or calibrate run (cuda needs a GPU torch can see; default: cpu)")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="with --data: stop at the first pass that scores more than POINTS below the input model")
    p.add_argument("--compare-dense", action="store_true",
                   help="also build/cost the input model, for CPU latency and FPGA latency/energy before and after")
    p.add_argument("--split", default="test", help="split --data is scored on: train, val or test (default: test)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights of zoo models, example inputs and passes")
    p.add_argument("--no-check", action="store_true", help="skip the per-pass numerical checks")
    p.add_argument("--list-passes", action="store_true", help="list the passes and their options, then exit")
    p.add_argument("--list-models", action="store_true", help="list the zoo models, then exit")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes (named pipelines), then exit")
    p.add_argument("--quiet", action="store_true", help="print only the summary (no progress lines)")
    p.add_argument(
        "--progress", action="store_true", help="print progress lines even when stderr is not a terminal"
    )
    return p


def _say(args, msg: str) -> None:
    if _show_progress(args):
        print(f"[sliver] {msg}", file=sys.stderr, flush=True)


def list_passes() -> str:
    from sliver import passes

    lines = []
    for name, cls in passes.registered().items():
        lines.append(f"{name}  ({cls.level} level) {cls.summary}")
        if cls.requires:
            lines.append(f"    requires: {', '.join(cls.requires)}")
        if cls.provides:
            lines.append(f"    provides: {', '.join(cls.provides)}")
        for fact, fix in cls.refuses.items():
            lines.append(f"    refused after: {fact}" + (f" ({fix})" if fix else ""))
        for opt, ty, default, doc in passes.option_docs(cls):
            lines.append(f"    {opt}: {ty}, default {default}. {doc}".rstrip())
    return "\n".join(lines)


def parse_shape(text: str) -> tuple:
    from sliver.ir.errors import ModelInputError

    pieces = text.replace("x", ",").split(",")
    shape = tuple(int(s) for s in pieces) if all(s.strip().isdigit() for s in pieces) else ()
    if not shape or any(d <= 0 for d in shape):
        raise ModelInputError(f"--input-shape {text!r} is not a shape; write it like 1,3,224,224")
    return shape


def load_model(args):
    """(program, torch_module or None) for MODEL."""
    import torch

    from sliver import ir, models
    from sliver.ir.errors import ModelInputError

    shape = parse_shape(args.input_shape) if args.input_shape else None
    kind = model_kind(args.model)
    if kind == "onnx":
        if not os.path.exists(args.model):
            raise ModelInputError(f"no such file: {args.model}")
        if getattr(args, "weights", None):
            raise ModelInputError("--weights loads into a torch model; an .onnx file carries its own weights")
        program = ir.load_onnx(args.model, input_shapes=shape, seed=args.seed)
        return program, None
    name = args.model
    if kind == "factory":
        net = user_module(args.model, seed=args.seed)
        name = args.model.rpartition(":")[2]
        shape = shape or user_input_shape(args)
    elif kind == "pt2":
        net, exported_shape = exported_module(args.model)
        name = os.path.splitext(os.path.basename(args.model))[0]
        shape = shape or exported_shape
    else:
        if args.model not in models.available():
            models.create(args.model)  # raises the zoo's error naming the models there are
        if args.data and not getattr(args, "weights", None) and (_named_data(args) or _has_trained(args.model)):
            net = _trained(args)
        else:
            torch.manual_seed(args.seed)
            net = models.create(args.model)
        shape = shape or models.input_shape(args.model)
    if getattr(args, "weights", None):
        if kind == "pt2":
            raise ModelInputError("--weights loads into a torch model; an exported program (.pt2) carries its own weights")
        load_weights(net, args.weights)
        _say(args, f"loaded weights from {args.weights}")
    if kind != "pt2":  # an exported program's shape is fixed by its export (and it refuses .eval())
        from sliver.ir import resources

        resources.check_input_shape(net, shape, name)  # before the example input is drawn
    example = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    program = ir.trace(net, example, name=name)
    from sliver.ir.torch_level import trace_method

    if trace_method(program) == "export":
        reason = program.module.meta.get("trace_fallback_reason", "")
        _say(args, f"traced {name} with torch.export (torch.fx could not: {reason}); "
                   "token passes need the fx path's whole transformer blocks")
    else:
        _say(args, f"traced {name} with torch.fx")
    return program, net


# -- models of the user's own (kept apart from the rest of compile.py) ----------------------------
def model_kind(spec: str) -> str:
    """``"onnx"``, ``"factory"`` (``file.py:function``), ``"pt2"`` or ``"zoo"``."""
    if spec.endswith(".pt2"):
        return "pt2"
    path, sep, func = spec.rpartition(":")
    if sep and path.endswith(".py") and func.isidentifier():
        return "factory"
    if spec.endswith(".py"):
        from sliver.ir.errors import ModelInputError

        raise ModelInputError(f"{spec} names a file but no factory; write it as {spec}:function_name")
    if spec.endswith(".onnx") or os.sep in spec or os.path.exists(spec):
        return "onnx"
    return "zoo"


def user_module(spec: str, seed: int = 0):
    """Call the factory ``function`` of ``path/to/file.py:function`` (with torch seeded) and return
    the ``nn.Module`` it builds."""
    import importlib.util

    import torch

    from sliver.ir.errors import ModelInputError

    path, _, func = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ModelInputError(f"no such file: {path} (from {spec}); give path/to/file.py:factory")
    module_name = f"sliver_user_{abs(hash(os.path.abspath(path)))}"
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # the file may import its neighbours
    try:
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # its classes pickle and deep-copy like any module's
        loader.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ModelInputError(f"importing {path} failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        sys.path.remove(folder)
    factory = getattr(module, func, None)
    if not callable(factory):
        found = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                          and getattr(v, "__module__", None) == module_name) or "none"
        raise ModelInputError(f"{path} has no function {func!r}; functions defined there: {found}")
    torch.manual_seed(seed)
    try:
        net = factory()
    except Exception as e:
        raise ModelInputError(f"{spec}() failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(net, torch.nn.Module):
        raise ModelInputError(f"{spec}() returned a {type(net).__name__}, not a torch.nn.Module")
    return net.eval()


def user_input_shape(args) -> tuple:
    """A user model's input shape: --input-shape, else 1x3 x --crop (default 224)."""
    side = int(args.crop) if getattr(args, "crop", None) else 224
    return (1, 3, side, side)


def exported_module(path: str):
    """(module, input shape) of an exported program (``torch.export.save``)."""
    import torch

    from sliver.ir.errors import ModelInputError

    if not os.path.isfile(path):
        raise ModelInputError(f"no such file: {path}")
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise ModelInputError(f"{path} is not an exported program (torch.export.save): {_first_line(e)}") from None
    shapes = [tuple(n.meta["val"].shape) for n in ep.graph.nodes
              if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs and "val" in n.meta]
    if len(shapes) != 1:
        raise ModelInputError(f"{path} takes {len(shapes)} tensor inputs; compile.py compiles models with one image input")
    return ep.module(), tuple(int(d) for d in shapes[0])


def load_weights(net, path: str) -> None:
    """Load a checkpoint into ``net`` strictly. ``.pt``/``.pth``: a state dict saved with
    ``torch.save`` (read with ``weights_only=True``; a dict holding it under ``state_dict`` or
    ``model`` is unwrapped, and a ``module.`` prefix on every key, as DistributedDataParallel
    saves, is dropped); ``.safetensors`` needs the ``safetensors`` package."""
    import torch

    from sliver.ir.errors import ModelInputError

    if not os.path.isfile(path):
        raise ModelInputError(f"no such checkpoint: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelInputError(f"{path} is a .safetensors file; install the safetensors package "
                                  "(pip install safetensors) or save the state dict with torch.save") from None
        try:
            state = load_file(path, device="cpu")
        except Exception as e:
            raise ModelInputError(f"{path} is not a readable .safetensors file: {_first_line(e)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelInputError(f"{path} is not a state dict torch.load can read safely (weights_only=True): "
                                  f"{_first_line(e)}; save model.state_dict() with torch.save") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelInputError(f"{path} does not hold a state dict (name -> tensor); save model.state_dict()")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (checkpoint vs model): {few(mismatched)}")
        raise ModelInputError(f"{path} does not fit {type(net).__name__}: {'; '.join(parts)}; "
                              "load the checkpoint of this architecture")
    net.load_state_dict(state, strict=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _has_trained(name: str) -> bool:
    from sliver.models import training

    return name in training.DEFAULTS


def _named_data(args) -> bool:
    from sliver.models import data

    return args.data.replace("_", "-") in data.NAMED


def _trained(args):
    """The zoo model's trained weights for ``--data`` (trained and cached on first use)."""
    from sliver.ir.errors import ModelInputError
    from sliver.models import training

    if args.model not in training.DEFAULTS:
        raise ModelInputError(
            f"--data scores trained weights, but zoo model {args.model!r} has only random ones; "
            f"use a tiny model ({', '.join(training.DEFAULTS)}) or an .onnx file of your own"
        )
    _say(args, f"loading trained {args.model} (training it first if this machine has no checkpoint)")
    return training.trained_for(args.model, args.data.replace("_", "-"), seed=args.seed, progress=_show_progress(args))


def load_data(args):
    """The pass context's data for ``--data``: ``{"train", "val", "calib"}`` (a named set), the
    splits of an image-folder tree, or the one set in an ``.npz`` file for all three; the split to
    score is checked here, before any work."""
    from sliver.models import data as datasets

    if not args.data:
        return None
    datasets.check_split(args.split, args.data)
    if args.split == "calib":
        from sliver.ir.errors import DataError

        raise DataError("--split calib is the calibration subset of train; score on train, val or test")
    from sliver.models.image_folder import is_image_folder

    if is_image_folder(args.data):
        return load_folder_data(args)
    return datasets.context_data(args.data)


# -- data of the user's own (kept apart from the rest of compile.py) ------------------------------
def load_folder_data(args) -> dict:
    """The splits of an image-folder tree under ``--seed`` with the --resize/--crop/--mean/--std
    transform, each image read once now (so a bad file fails before any work) and streamed later.
    The split scored (``--split``) is kept on ``args.score_data``."""
    from sliver.models.image_folder import Transform, folder_splits, verify

    crop = args.crop or _model_input_side(args)
    transform = Transform(crop=crop, resize=args.resize, mean=_triple(args.mean, "--mean") or Transform.mean,
                          std=_triple(args.std, "--std") or Transform.std)
    sets = folder_splits(args.data, transform=transform, seed=args.seed)
    total = sum(len(sets[s]) for s in ("train", "val", "test"))
    _say(args, f"{args.data}: {sets['test'].num_classes} classes, {total} images "
               f"(train {len(sets['train'])}, val {len(sets['val'])}, test {len(sets['test'])}), "
               f"resize {transform.resize_to}, crop {crop}; checking every image")
    for split in ("train", "val", "test"):
        verify(sets[split], _progress_of(args, f"check {split}"))
    args.score_data = sets[args.split]
    return {k: sets[k] for k in ("train", "val", "calib")}


def _model_input_side(args) -> int:
    if args.input_shape:
        return int(parse_shape(args.input_shape)[-1])
    if model_kind(args.model or "") == "zoo":
        from sliver import models

        if args.model in models.available():
            return int(models.input_shape(args.model)[-1])
    return 224


def _triple(text, option):
    if not text:
        return None
    from sliver.ir.errors import DataError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DataError(f"{option} {text!r} needs three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return values


def _progress_of(args, desc):
    if not _show_progress(args):
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False)


def check_device(args) -> str:
    """``--device``: cuda only where torch sees a GPU."""
    import torch

    from sliver.ir.errors import ModelInputError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ModelInputError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); use --device cpu")
    return args.device


def _show_progress(args) -> bool:
    return not args.quiet and (args.progress or sys.stderr.isatty())


def staged_output(out: str):
    """A staging directory beside ``out`` that replaces it whole on success, atomically
    (``sliver.ir.fileio.staged_dir``): a kill at any moment leaves ``out`` as it was or complete.
    Once the new result is in place, Ctrl-C and SIGTERM no longer stop the run (:func:`_ignore_interrupts`)."""
    from sliver.ir.errors import ModelInputError
    from sliver.ir.fileio import staged_dir

    if os.path.exists(out) and not os.path.isdir(out):
        raise ModelInputError(f"--out {os.path.abspath(out)} exists and is not a directory")
    return staged_dir(out, on_commit=_ignore_interrupts)


def _write_atomic(path: str, data: bytes) -> None:
    from sliver.ir.fileio import write_atomic

    write_atomic(path, data)


def _check_data_fits(program, data, outputs) -> None:
    """Before any work: ``--data`` fits the model (image size, labels among its classes)."""
    from sliver.models import data as datasets

    if data is not None and len(program.input_shapes) == 1:
        classes = int(outputs[0].shape[1]) if outputs and outputs[0].ndim >= 2 else None
        for split in ("train", "val"):
            datasets.check_fits(data[split], program.input_shapes[0], classes)


TARGETS = ("x86", "arm", "arm-dotprod", "fpga")


def parse_targets(text: str) -> list:
    """``--target``: one of x86, arm, arm-dotprod, fpga, or a CPU target and fpga joined by a comma."""
    from sliver.ir.errors import ModelInputError

    targets = [t.strip() for t in text.split(",")]
    if any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets) or \
            sum(t != "fpga" for t in targets) > 1:
        raise ModelInputError(f"--target {text!r}: give x86, arm, arm-dotprod or fpga, or one of x86/arm with fpga "
                              "(x86,fpga; arm-dotprod,fpga too)")
    return targets


def pipeline_of(args):
    """(Pipeline, recipe name or None) from ``--pipeline`` or ``--recipe`` (not both)."""
    from sliver import passes
    from sliver.ir.errors import ModelInputError

    if args.recipe is not None:
        if args.pipeline is not None:
            raise ModelInputError("give --recipe or --pipeline, not both (a recipe is a pipeline: --list-recipes)")
        return passes.recipes.parse(args.recipe), args.recipe
    return passes.parse(args.pipeline or ""), None


def build_context(args, data):
    """The one pass context of the run, from the flags: data, seed, progress, device and the FPGA cost
    model of ``--accel``/``--bits`` (for latency-aware options such as ``heatvit{latency=...}``)."""
    from sliver import passes
    from sliver.backends import fpga

    return passes.PassContext(data=data, seed=args.seed, progress=_show_progress(args), device=args.device,
                              cost_model=fpga.CostModel(accel=args.accel, bits=args.bits))


def compile_model(args) -> dict:
    from sliver.ir import tvm_level
    from sliver.ir.errors import ModelInputError

    if not args.model:
        raise ModelInputError("no MODEL given: name a zoo model (--list-models) or an .onnx file")
    if not args.out:
        raise ModelInputError("no --out directory given")
    targets = parse_targets(args.target)
    pipeline, recipe = pipeline_of(args)
    check_device(args)
    if args.max_drop is not None and not args.data:
        raise ModelInputError("--max-drop needs --data: the accuracy guard scores every stage on it")
    data = load_data(args)
    ctx = build_context(args, data)
    t0 = time.perf_counter()
    _say(args, f"loading {args.model}")
    program, net = load_model(args)
    pipeline.validate(program.level, program.facts)
    cpu = next((t for t in targets if t != "fpga"), None)
    if program.level == "onnx" and cpu is not None:
        tvm_level.check_importable(program)  # fail before any work, not after the passes
    reference_outputs = program.run()
    _check_data_fits(program, data, reference_outputs)
    report = {"model": args.model, "target": args.target, "seed": args.seed, "pipeline": str(pipeline)}
    if recipe is not None:
        report["recipe"] = recipe
    with staged_output(args.out) as stage:
        _say(args, f"running pipeline {str(pipeline) or '(empty)'}")
        instruments = _instruments(args, stage)
        result = pipeline.run(program, ctx, check=not args.no_check,
                              dump_ir=os.path.join(stage, "ir") if args.dump_ir else None,
                              lower_to="onnx", instruments=list(instruments.values()))
        if "keep_maps" in instruments:
            report["keep_maps"] = {"file": "keep_maps.png", "kept_per_stage": instruments["keep_maps"].kept}
        if "regions" in instruments:
            report["regions"] = instruments["regions"].summary
        final = result.program
        _write_atomic(os.path.join(stage, "model.onnx"), final.module.SerializeToString())
        report.update(
            {
                "input_shapes": [list(s) for s in final.input_shapes],
                "steps": result.report.to_dict()["steps"],
                "before": result.report.before,
                "after": result.report.after,
                "integer_only": "integer-only" in final.facts,
                "files": {"onnx": "model.onnx", "ir": "ir/" if args.dump_ir else None},
            }
        )
        dense = _dense_onnx(program) if args.compare_dense else None
        artifact = None
        if "fpga" in targets:
            report.update(_cost_on_fpga(args, final, stage, dense))
        if cpu is not None:
            built, artifact = _build_with_tvm(args, cpu, final, stage, reference_outputs, dense)
            report.update(built)
        if data is not None:
            report["accuracy"] = _score(args, instruments["accuracy"], artifact, final)
            report["steps"] = result.report.to_dict()["steps"]  # with the final stage's accuracy
        report["total_seconds"] = time.perf_counter() - t0
        _write_atomic(os.path.join(stage, "report.json"), json.dumps(report, indent=2).encode())
    return report


def _instruments(args, stage) -> dict:
    """The caller's instruments on the one pipeline run: the accuracy guard (with ``--data``), the
    keep maps (``--keep-maps``) and the aftrans regions (``--regions``). Timing, checks and IR
    dumps are the runner's own."""
    instruments = {}
    if args.data:
        from sliver.backends.evaluate import AccuracyGuard

        data = getattr(args, "score_data", None) or args.data
        # the exported stage is scored by _score: on the host TVM artifact when one is built
        instruments["accuracy"] = AccuracyGuard(data, args.split, max_drop=args.max_drop, score_export=False)
    if args.keep_maps:
        from sliver.passes.tokens.keep_maps import KeepMaps

        instruments["keep_maps"] = KeepMaps(os.path.join(stage, "keep_maps.png"))
    if args.regions:
        from sliver.passes.tokens.aftrans import Regions

        instruments["regions"] = Regions(os.path.join(stage, "regions.png"))
    return instruments


def _dense_onnx(program):
    """The input model at the onnx level (for ``--compare-dense``), converted as the pipeline would."""
    from sliver.ir.convert import convert_step

    while program.level != "onnx":
        program = convert_step(program)
    return program


def _cpu_latency_ms(artifact, inputs, repeat: int = 20) -> float:
    """Median wall time of one run of ``artifact`` on this machine (after two warm-up runs)."""
    import statistics

    run = artifact.runner()
    for _ in range(2):
        run(inputs)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _build_with_tvm(args, target, final, stage, reference_outputs, dense=None) -> dict:
    """Build the TVM artifact into ``stage`` and check it against the references; on the host,
    time it (and, with ``dense``, a build of the input model too)."""
    from sliver import backends

    background = None
    if dense is not None and backends.tvm.is_host(backends.tvm.resolve_target(target)) and (os.cpu_count() or 1) > 1:
        # the input model builds on another core while this one builds the result
        background = backends.tvm.BackgroundBuild(dense, target, os.path.join(stage, ".dense-build"))
    try:
        return _build_and_check(args, target, final, stage, reference_outputs, dense, background)
    finally:
        if background is not None:
            background.cancel()
            shutil.rmtree(background.directory, ignore_errors=True)


def _build_and_check(args, target, final, stage, reference_outputs, dense, background) -> tuple:
    from sliver import backends
    from sliver.ir.runtime import max_abs_diff

    _say(args, f"building with TVM for {target}" + (" (and the input model, on another core)" if background else ""))
    tb = time.perf_counter()
    with _quiet_native_stderr():  # TVM's C++ warnings are not for users
        artifact = backends.tvm.build(final, target=target)
        build_seconds = time.perf_counter() - tb
        paths = artifact.save(stage)
    tvm_outputs, check = None, {}
    if backends.tvm.is_host(artifact.target):
        tvm_outputs = artifact.run(final.example_inputs)
        check["method"] = "run on this machine"
    else:
        # a cross-compiled artifact: its ELF architecture and TVM entry symbols are always
        # checked; it also runs under qemu-user when `make setup-arm` has installed the tools
        check["library"] = backends.tvm.check_library(paths["library"], artifact.target)
        reason = _qemu_unavailable(backends.tvm, final)
        if reason is None:
            _say(args, "running the aarch64 artifact under qemu-user (correctness only)")
            tvm_outputs = backends.tvm.run_with_qemu(stage, final.example_inputs)
            check["method"] = "run under qemu-aarch64-static with backends/runner/run_model (timings meaningless)"
        else:
            check["method"] = "static: ELF architecture and exported symbols only; outputs not compared"
            check["not_run_because"] = reason
    if tvm_outputs is not None:
        diffs = {
            "tvm_vs_onnxruntime": max_abs_diff(tvm_outputs, final.run()),
            "tvm_vs_input_model": max_abs_diff(tvm_outputs, reference_outputs),
        }
    else:
        diffs = None
    latency = None
    if backends.tvm.is_host(artifact.target):
        dense_artifact = None
        if dense is not None:  # built before the timing starts: no build runs beside it
            with _quiet_native_stderr():
                dense_artifact = background.result() if background else backends.tvm.build(dense, target=target)
        _say(args, "timing the artifact on this machine")
        latency = {"after_ms": _cpu_latency_ms(artifact, final.example_inputs)}
        if dense_artifact is not None:
            latency["before_ms"] = _cpu_latency_ms(dense_artifact, dense.example_inputs)
    return {
        "cpu_latency": latency,
        "tvm_target": artifact.target,
        "tvm_build_seconds": build_seconds,
        "check": check,
        "max_abs_diff": diffs,
        "artifact": {"library": os.path.basename(paths["library"]), "description": os.path.basename(paths["description"])},
    }, artifact


def _qemu_unavailable(tvm_backend, final) -> str | None:
    """Why the aarch64 artifact cannot run here under qemu (None when it can)."""
    missing = tvm_backend.missing_arm_tools()
    if missing:
        return f"missing {', '.join(missing)} (make setup-arm installs them)"
    try:
        tvm_backend.arm_runtime(fetch=False)
    except Exception as e:
        return str(e)
    if len(final.example_inputs) != 1 or str(final.example_inputs[0].dtype) != "float32":
        return "the aarch64 runner takes one float32 input"
    return None


def _score(args, guard, artifact, final) -> dict:
    """Accuracy / mIoU before and after the pipeline (from the accuracy guard, which scored every
    stage during the run) and of the host artifact, on ``--split``."""
    from sliver import backends
    from sliver.backends.evaluate import score

    if guard.pending:  # the exported program's stage
        if artifact is not None and backends.tvm.is_host(artifact.target):
            _say(args, f"scoring the artifact on {args.data} {args.split}")
            guard.score_final(artifact)  # on the artifact's integers
        else:
            guard.score_final(final)  # under ONNX Runtime
    first, last = guard.first, guard.last
    result = {"split": args.split, "dataset": first.dataset, "metric": first.metric, "before": first.value,
              "after": last.value, "change": last.value - first.value,
              "levels": {"before": first.level, "after": last.level}, "count": first.count,
              "stages": guard.stages}
    if artifact is not None and backends.tvm.is_host(artifact.target):
        if last.level == "tvm":
            result["tvm"] = last.value
        else:  # the guard scored the last step already (a lossy last pass): score the artifact too
            _say(args, f"scoring the artifact on {args.data} {args.split}")
            data = getattr(args, "score_data", None) or args.data
            result["tvm"] = score(artifact, args.split, data=data).value
    return result


def _cost_on_fpga(args, final, stage, dense=None) -> dict:
    """Cost the final program on the FPGA model; writes fpga_report.json and fpga_layers.png.
    With ``dense`` (the input model at the onnx level) it is costed too, with exact nonlinear units."""
    from sliver.backends import fpga

    nonlinear = args.nonlinear
    if nonlinear == "auto":
        nonlinear = "poly" if "poly-act" in final.facts else "exact"
    _say(args, f"costing on the {args.accel} model at {args.bits} bits ({nonlinear} nonlinear units)")
    fpga_report = fpga.cost(final, accel=args.accel, bits=args.bits, nonlinear=nonlinear)
    fpga_report.save(stage)
    totals = fpga_report.to_dict()["totals"]
    extra = {}
    if dense is not None:
        before = fpga.cost(dense, accel=args.accel, bits=args.bits, nonlinear="exact").totals()
        extra["fpga_before"] = {k: before[k] for k in ("latency_ms", "energy_mj", "macs", "cycles")}
    return {**extra, "fpga": {"accel": args.accel, "bits": args.bits, "nonlinear": nonlinear, **totals},
            "fpga_summary": fpga_report.summary(),
            "fpga_files": ["fpga_report.json", "fpga_layers.png"]}


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence TVM's C++ log lines (``Warning: Scope Saving``) while it builds and writes."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _change(before, after) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def summary(report: dict, out: str) -> str:
    b, a = report["before"], report["after"]
    targets = report["target"].split(",")
    steps = " | ".join(f"{s['name']} {s['seconds']:.2f}s" for s in report["steps"]) or "(none)"
    where = []
    if "tvm_target" in report:
        where.append(f"{targets[0] if targets[0] != 'fpga' else targets[-1]}, {report['tvm_target'].get('mcpu', 'generic')}")
    if "fpga" in report:
        where.append(f"fpga, {report['fpga']['accel']}, {report['fpga']['bits']}-bit")
    recipe = f"  (recipe {report['recipe']})" if "recipe" in report else ""
    lines = [
        f"sliver: {report['model']} -> {out} ({'; '.join(where)})",
        f"  pipeline  {report['pipeline'] or '(empty)'}{recipe}",
        f"  MACs      {b['macs'] / 1e9:.4f} G -> {a['macs'] / 1e9:.4f} G ({_change(b['macs'], a['macs'])})"
        f"   params {b['params'] / 1e6:.3f} M -> {a['params'] / 1e6:.3f} M"
        + ("   integer-only" if report.get("integer_only") else ""),
    ]
    if "accuracy" in report:
        acc = report["accuracy"]
        unit = "%" if acc["metric"] == "accuracy" else "% mIoU"
        tvm = f", TVM artifact {acc['tvm']:.2f}{unit}" if "tvm" in acc else ""
        lines.append(f"  {acc['metric']:<9} {acc['before']:.2f}{unit} -> {acc['after']:.2f}{unit} "
                     f"({acc['change']:+.2f} pt) on {acc['dataset']}{tvm}")
        stages = [f"{st['step']} {st['value']:.2f}" for st in acc.get("stages", [])[1:]]
        if stages:
            lines.append(f"  stages    {' | '.join(stages)}")
    latency = report.get("cpu_latency")
    if latency:
        before = f"{latency['before_ms']:.3f} ms -> " if "before_ms" in latency else ""
        change = f" ({_change(latency['before_ms'], latency['after_ms'])})" if "before_ms" in latency else ""
        lines.append(f"  CPU       {before}{latency['after_ms']:.3f} ms{change} per image, TVM artifact on this machine")
    if "fpga" in report:
        f = report["fpga"]
        fb = report.get("fpga_before")
        if fb:
            lines.append(f"  FPGA      {fb['latency_ms']:.4f} ms -> {f['latency_ms']:.4f} ms "
                         f"({_change(fb['latency_ms'], f['latency_ms'])}), energy {fb['energy_mj']:.4f} mJ -> "
                         f"{f['energy_mj']:.4f} mJ ({_change(fb['energy_mj'], f['energy_mj'])})")
    ir_dir = ", ir/" if report["files"]["ir"] else ""
    lines.append(f"  steps     {steps}" + (f" | tvm-build {report['tvm_build_seconds']:.2f}s" if "tvm_build_seconds" in report else ""))
    if "fpga" in report:
        lines.append("  fpga      " + report["fpga_summary"].replace("\n", "\n            "))
    written = [os.path.join(out, "model.onnx")]
    if "tvm_target" in report:
        diff = report["max_abs_diff"]
        if diff is None:
            lib = report["check"]["library"]
            check = (f"{lib['machine']} ELF with {lib['kernels']} kernels and the VM executable; not run: "
                     f"{report['check']['not_run_because']}")
        else:
            where = " (under qemu)" if "library" in report["check"] else ""
            exact = ", bit-exact" if report.get("integer_only") and diff["tvm_vs_onnxruntime"] == 0 else ""
            check = (f"max|TVM - ONNX Runtime|{where} {diff['tvm_vs_onnxruntime']:.2e}{exact}, "
                     f"max|TVM - input model| {diff['tvm_vs_input_model']:.2e}")
        lines.append(f"  check     {check}")
        written += ["model.so", "model.json"]
    if "fpga" in report:
        written += ["fpga_report.json", "fpga_layers.png"]
    lines.append(f"  wrote     {', '.join(written)}, report.json{ir_dir}")
    if "regions" in report:
        lines.append(f"  regions   {os.path.join(out, 'regions.png')} (IoU with the true boxes: "
                     f"{', '.join(f'{v:.2f}' for v in report['regions']['iou'])})")
    if "keep_maps" in report:
        kept = "; ".join(f"{name} {'/'.join(map(str, counts))}" for name, counts in report["keep_maps"]["kept_per_stage"].items())
        lines.append(f"  keep maps {os.path.join(out, 'keep_maps.png')} (patches kept per stage: {kept})")
    return "\n".join(lines)


def _interruptible() -> None:
    """Ctrl-C and SIGTERM (a scheduler stopping the job) stop the run, and its staged output is
    removed, until the new result has replaced the output directory (:func:`_ignore_interrupts`)."""
    import signal

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    _set_handlers({signal.SIGTERM: stop})


def _ignore_interrupts() -> None:
    """Called once the new result is in place: the run is complete, so an interrupt from here on
    (during the summary or the interpreter's shutdown) is ignored and the exit status says what the
    directory holds: 0 with the new result, 130 with the one it had."""
    import signal

    _set_handlers({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})


def _set_handlers(handlers: dict) -> None:
    """Install signal handlers; Python sets them on the main thread only, elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def main(argv=None, *, exiting: bool = False) -> int:
    """Run the command line ``argv``; returns the exit status. ``exiting``: the process ends with
    this call (the script), so the interrupt handlers of the run stay in place until it exits;
    called in-process (a notebook, a test), the caller's SIGINT/SIGTERM handlers are restored on
    return."""
    import signal

    args = _parser().parse_args(argv)
    if exiting:
        return _main(args)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(args)
    finally:
        _set_handlers(previous)


def _main(args) -> int:
    from sliver.ir.errors import SliverError

    try:
        if args.list_passes:
            print(list_passes())
            return 0
        if args.list_recipes:
            from sliver import passes

            print(passes.recipes.describe())
            return 0
        if args.list_models:
            from sliver import models

            for name, desc in models.available().items():
                print(f"{name:<20}{desc}")
            return 0
        _interruptible()
        report = compile_model(args)
    except SliverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out or 'the output directory'} was left as it was", file=sys.stderr)
        return 130
    print(summary(report, args.out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(exiting=True))
    except KeyboardInterrupt:  # Ctrl-C before main's own handler is in place
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
