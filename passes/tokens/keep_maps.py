"""Token keep maps: which patches each pruning stage of a token-pruned ViT kept, on the patch grid,
and pictures of them drawn over the input.

    from sliver.passes import keep_maps
    maps = keep_maps.keep_maps(program, image)          # [(grid_h, grid_w) bool per stage]
    keep_maps.draw(program, keep_maps.default_images(program), "build/keep_maps.png")

The program is a torch-level Program after a token pass (evit, heatvit, asvit, lvtp) in either
inference mode. It runs once per image while :func:`sliver.passes.tokens.recording_selections` is
on; every stage reports the positions it kept among its own patch tokens, and the positions are
composed stage after stage back to the grid (an EViT fused token or a HeatViT package token has no
grid position: keeping it marks nothing). A patch counts as kept at stage s when it survived stages
1..s. ``tools/compile.py --keep-maps`` writes the picture for the compiled pipeline.
"""

from __future__ import annotations

import numpy as np
import torch

from ...ir.errors import ModelInputError, PassError
from ..infra.pipeline import Instrument
from ...ir.program import Program
from .lvtp import patch_size_of
from .common import recording_selections, tokens_in, transformer_blocks

#: colour pruned patches are blended towards (visible on dark digits and on photos alike)
PRUNED_TINT = np.array([0.15, 0.25, 0.75])


def grid_shape(program: Program) -> tuple:
    """(grid_h, grid_w, patch) of a ViT program: its first block sees CLS + grid_h * grid_w tokens."""
    blocks = transformer_blocks(program.module)
    if not blocks:
        raise PassError(f"{program.name} has no transformer blocks, so it has no token keep maps")
    grid = tokens_in(blocks[0]) - 1
    shape = program.example_inputs[0].shape
    patch = patch_size_of("keep-maps", shape, grid)
    return int(shape[2]) // patch, int(shape[3]) // patch, patch


def keep_maps(program: Program, image) -> list:
    """One bool array (grid_h, grid_w) per pruning stage, in execution order: the patches of
    ``image`` (C, H, W) still kept after that stage."""
    if program.level != "torch":
        raise PassError(f"keep maps need the torch-level program (after the token passes), not the {program.level} level")
    grid_h, grid_w, _ = grid_shape(program)
    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    batch = int(program.example_inputs[0].shape[0])
    inputs = image.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
    with torch.no_grad(), recording_selections() as selections:
        program.module(inputs)
    if not selections:
        raise PassError(f"{program.name} made no token selection: run a token-pruning pass (evit, heatvit, asvit, lvtp) first")
    positions = np.arange(grid_h * grid_w)  # grid position of each patch token of the current stage
    maps = []
    for index in selections:
        picked = index[0].cpu().numpy()
        picked = picked[picked < len(positions)]  # a fused / package token has no grid position
        kept = positions[picked]
        keep = np.zeros(grid_h * grid_w, dtype=bool)
        keep[kept[kept >= 0]] = True
        maps.append(keep.reshape(grid_h, grid_w))
        # the next stage's patch tokens: the kept ones in order, then any fused / package token
        positions = np.concatenate([kept, np.full(len(index[0]) + 2, -1)])
    return maps


def default_images(program: Program) -> list:
    """(title, image (3, H, W), mean, std) pairs for the pictures: a digit (a digit scene for 64x64
    models) and scikit-image's astronaut photo, resized to the model's input."""
    from ...models import data

    _, _, h, w = (int(d) for d in program.example_inputs[0].shape)
    ink = data.digit_scenes("test") if (h, w) == (64, 64) else data.digits("test")
    photo = data.photos(["astronaut"], size=max(h, w))
    out = []
    for title, images, meta in (("digit", ink.images[:1], ink.meta), ("photo", photo.images[:1], photo.meta)):
        if tuple(images.shape[-2:]) != (h, w):
            images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        out.append((title, images[0], meta.get("mean", 0.0), meta.get("std", 1.0)))
    return out


def _displayable(image: torch.Tensor, mean, std) -> np.ndarray:
    """(H, W, 3) in 0..1 from a normalised (3, H, W) image."""
    x = image.detach().cpu().numpy().astype(np.float64)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    return np.clip(x * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def draw(program: Program, images, path: str, title: str | None = None) -> dict:
    """Draw the keep maps of ``images`` (from :func:`default_images`) into the PNG at ``path``: a
    row per image, the input first and then one panel per stage with the pruned patches tinted blue.
    Returns ``{image title: [kept patches per stage]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_h, grid_w, patch = grid_shape(program)
    rows = [(name, image, _displayable(image, mean, std), keep_maps(program, image)) for name, image, mean, std in images]
    stages = len(rows[0][3])
    fig, axes = plt.subplots(len(rows), stages + 1, figsize=(2.2 * (stages + 1), 2.3 * len(rows)), squeeze=False)
    counts = {}
    for r, (name, _, picture, maps) in enumerate(rows):
        axes[r][0].imshow(picture, interpolation="nearest")
        axes[r][0].set_title(f"{name}: input", fontsize=8)
        counts[name] = [int(m.sum()) for m in maps]
        for s, keep in enumerate(maps, start=1):
            mask = np.kron(keep, np.ones((patch, patch)))[..., None]
            shown = picture * mask + (1 - mask) * (0.35 * picture + 0.65 * PRUNED_TINT)
            axes[r][s].imshow(shown, interpolation="nearest")
            axes[r][s].set_title(f"stage {s}: {int(keep.sum())}/{grid_h * grid_w} kept", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"{program.name}: token keep maps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return counts


class KeepMaps(Instrument):
    """A pipeline instrument that draws the keep maps of the last torch-level program (the one
    the token passes left, just before the conversion to ONNX, or the final program) into the PNG
    at ``path`` (:func:`draw` on :func:`default_images`). ``kept`` is then ``{image title: [kept
    patches per stage]}``.

        result = pipe.run(program, data=..., instruments=[KeepMaps("build/keep_maps.png")])
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept: dict | None = None

    def start(self, program, report) -> None:
        if program.level != "torch":
            raise ModelInputError("keep maps need a torch-level model (a zoo name) and a token pass (evit, heatvit, asvit, lvtp)")

    def after(self, step, before, after) -> None:
        if self.kept is None and before.level == "torch" and after.level != "torch":
            self._draw(before)

    def finish(self, program, report) -> None:
        if self.kept is None and program.level == "torch":
            self._draw(program)

    def _draw(self, program) -> None:
        self.kept = draw(program, default_images(program), self.path)
