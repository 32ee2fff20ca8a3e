"""Token keep maps: stage selections composed back to the patch grid, and compile.py --keep-maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from sliver import passes
from sliver.passes import keep_maps
from sliver.passes.transformer import attention_with_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evit_keep_maps_follow_the_class_attention(make_program):
    """Two EViT stages on the tiny DeiT, recomputed by hand: stage 1 keeps the top-k patches by CLS
    attention; stage 2 ranks stage 1's kept patches (and the fused token, which has no grid cell)."""
    prog = make_program("tiny_deit")
    out = passes.parse("evit{blocks=1,3 keep=0.5}").run(prog, check=False).program
    image = torch.from_numpy(prog.example_inputs[0][0])
    maps = keep_maps.keep_maps(out, image)
    assert [m.shape for m in maps] == [(8, 8), (8, 8)]
    gm = out.module
    with torch.no_grad():
        x = image[None]
        tokens = torch.cat([gm.cls_token.expand(1, -1, -1), gm.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1) + gm.pos_embed
        tokens = gm.get_submodule("blocks.0")(tokens)
        stage1 = gm.get_submodule("blocks.1")
        _, probs = attention_with_probs(stage1.attn, stage1.norm1(tokens))
        first = probs[0, :, 0, 1:].mean(0).argsort(descending=True, stable=True)[:32]
        tokens = gm.get_submodule("blocks.2")(stage1(tokens))
        stage2 = gm.get_submodule("blocks.3")
        _, probs = attention_with_probs(stage2.attn, stage2.norm1(tokens))
        second = probs[0, :, 0, 1:].mean(0).argsort(descending=True, stable=True)[:17]  # ceil(0.5 * 33)
    expected1 = np.zeros(64, bool)
    expected1[first.numpy()] = True
    grid = np.concatenate([first.numpy(), [-1]])  # stage 2's patch tokens: stage 1's kept, then the fused one
    expected2 = np.zeros(64, bool)
    expected2[[g for g in grid[second.numpy()] if g >= 0]] = True
    assert np.array_equal(maps[0].ravel(), expected1) and maps[0].sum() == 32
    assert np.array_equal(maps[1].ravel(), expected2) and not (maps[1] & ~maps[0]).any()


def test_compile_writes_keep_maps(tmp_path):
    out = tmp_path / "build"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compile.py"), "tiny_segmenter", "--pipeline",
         "lvtp{blocks=1,2 keep=0.6}", "--target", "fpga", "--keep-maps", "--no-check", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "keep maps" in proc.stdout and (out / "keep_maps.png").stat().st_size > 10_000
    report = json.loads((out / "report.json").read_text())
    assert report["keep_maps"]["kept_per_stage"] == {"digit": [39, 24], "photo": [39, 24]}  # ceil(0.6 * 64), ceil(0.6 * 39)
    assert [s["name"] for s in report["steps"]] == ["lvtp", "to-onnx"] and report["pipeline"] == "lvtp{blocks=1,2 keep=0.6}"
    assert report["after"]["macs"] < report["before"]["macs"]
