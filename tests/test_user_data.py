"""The user's own data and checkpoints from the command line: image-folder trees (built here from
digits PNGs), file.py:factory and .pt2 models, --weights."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from sliver.ir import errors
from sliver.models import image_folder as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import compile as cli  # noqa: E402


def _folder(root, per_class=6, side=20, classes=4):
    from sklearn.datasets import load_digits

    d = load_digits()
    for label in range(classes):
        os.makedirs(root / f"c{label}", exist_ok=True)
        for j, i in enumerate(np.flatnonzero(d.target == label)[:per_class]):
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).resize((side, side + 4), Image.BILINEAR).save(root / f"c{label}" / f"{j}.png")
    return root


def test_splits_are_fixed_disjoint_and_streamed(tmp_path):
    root = _folder(tmp_path / "tree")
    t = F.Transform(crop=16)
    sets = F.folder_splits(root, transform=t, seed=3)
    again = F.folder_splits(root, transform=t, seed=3)
    other = F.folder_splits(root, transform=t, seed=4)
    paths = {s: sets[s].images.paths for s in sets}
    assert [len(paths[s]) for s in ("train", "val", "test")] == [16, 4, 4]  # 6 per class: round(20%) = 1 val, 1 test
    assert not set(paths["train"]) & set(paths["val"]) and not set(paths["train"]) & set(paths["test"])
    assert not set(paths["val"]) & set(paths["test"])
    assert paths == {s: again[s].images.paths for s in again}
    assert paths["test"] != other["test"].images.paths
    assert isinstance(sets["train"].images, F.LazyImages)  # nothing loaded up front
    assert sets["test"].class_names == ("c0", "c1", "c2", "c3") and sets["test"].num_classes == 4
    assert [int(sets["test"].targets[i]) for i in range(len(paths["test"]))] == [
        int(os.path.basename(os.path.dirname(p))[1:]) for p in paths["test"]]
    batch = sets["test"].images[1:4]
    assert batch.shape == (3, 3, 16, 16)
    # one file through the transform by hand: shorter side -> round(16 / 0.875) = 18, centre crop, ImageNet norm
    with Image.open(paths["test"][1]) as img:
        img = img.convert("RGB").resize((18, round(24 * 18 / 20)), Image.BILINEAR)
        left, top = (18 - 16) // 2, (img.size[1] - 16) // 2
        a = np.asarray(img.crop((left, top, left + 16, top + 16)), np.float32) / 255
    expected = (a - np.asarray(F.IMAGENET_MEAN, np.float32)) / np.asarray(F.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(batch[0].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    loader_batch = next(iter(sets["test"].loader(4)))
    np.testing.assert_allclose(loader_batch[0][1:3].numpy(), batch[:2].numpy())


def test_bad_image_empty_class_and_sizes_are_one_line(tmp_path):
    root = _folder(tmp_path / "tree")
    (root / "c1" / "broken.png").write_bytes(b"not an image")
    sets = F.folder_splits(root, transform=F.Transform(crop=16), seed=0)
    with pytest.raises(errors.DataError, match=r"cannot read image .*broken\.png"):
        for s in ("train", "val", "test"):
            F.verify(sets[s])
    os.remove(root / "c1" / "broken.png")
    os.makedirs(root / "c9")
    with pytest.raises(errors.DataError, match=r"class folder .*c9 has no images"):
        F.folder_splits(root)
    os.rmdir(root / "c9")
    with pytest.raises(errors.DataError, match="resize 10 must be >= crop 16"):
        F.folder_splits(root, transform=F.Transform(crop=16, resize=10))
    from sliver.backends.evaluate import score
    from sliver.ir import trace

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    prog = trace(net, torch.randn(1, 3, 32, 32))
    with pytest.raises(errors.DataError, match="tree/test images are 3x16x16 but the model takes 3x32x32"):
        score(prog, data=sets["test"])


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))

    def build():
        return Small()
''')


def _factory(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY)
    return str(path)


def test_weights_load_strictly_with_one_line_errors(tmp_path):
    net = cli.user_module(_factory(tmp_path) + ":build")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    cli.load_weights(net, str(tmp_path / "ddp.pt"))
    torch.testing.assert_close(net.state_dict()["conv.weight"], state["conv.weight"])
    bad = dict(state)
    del bad["fc.bias"]
    bad["head.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(errors.ModelInputError, match=r"bad\.pth does not fit Small: missing 1 key\(s\): fc\.bias; "
                                                      r"unexpected 1 key\(s\): head\.weight"):
        cli.load_weights(net, str(tmp_path / "bad.pth"))
    torch.save(net, tmp_path / "pickled.pt")  # a whole pickled module is refused by weights_only=True
    with pytest.raises(errors.ModelInputError, match="weights_only=True"):
        cli.load_weights(net, str(tmp_path / "pickled.pt"))
    try:
        import safetensors  # noqa: F401
    except ImportError:
        (tmp_path / "w.safetensors").write_bytes(b"")
        with pytest.raises(errors.ModelInputError, match="install the safetensors package"):
            cli.load_weights(net, str(tmp_path / "w.safetensors"))
    with pytest.raises(errors.ModelInputError, match="has no function 'make'; functions defined there: Small, build"):
        cli.user_module(_factory(tmp_path) + ":make")


def test_compile_factory_weights_and_image_folder_end_to_end(tmp_path, capsys):
    """~15 s: rapq + pot-shift on a 32x32 model, one TVM build, scores before/after on the test split."""
    root = _folder(tmp_path / "tree", per_class=10, side=32)
    factory = _factory(tmp_path)
    torch.manual_seed(1)
    net = cli.user_module(factory + ":build", seed=5)
    torch.save(net.state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    code = cli.main([f"{factory}:build", "--weights", str(tmp_path / "ckpt.pt"), "--data", str(root),
                     "--input-shape", "1,3,32,32", "--pipeline", "rapq{wbits=8 abits=8},pot-shift",
                     "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    # the score before is the loaded checkpoint's own accuracy on the folder's test split
    test = F.image_folder(root, "test", transform=F.Transform(crop=32), seed=0)
    with torch.no_grad():
        own = (net(test.images[:]).argmax(1) == test.targets).float().mean().item() * 100
    assert acc["before"] == pytest.approx(own) and acc["count"] == len(test) == 8
    assert acc["dataset"] == "tree/test" and 0 <= acc["after"] <= 100
    assert "accuracy" in capsys.readouterr().out


def test_compile_takes_an_exported_program(tmp_path, capsys):
    net = cli.user_module(_factory(tmp_path) + ":build")
    ep = torch.export.export(net, (torch.randn(1, 3, 24, 24),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    code = cli.main([str(tmp_path / "m.pt2"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input_shapes"] == [[1, 3, 24, 24]] and report["max_abs_diff"]["tvm_vs_input_model"] < 1e-4
    assert cli.main([str(tmp_path / "m.pt2"), "--weights", "x.pt", "--out", str(tmp_path / "o2")]) == 2
    assert "carries its own weights" in capsys.readouterr().err


def test_cuda_without_gpu_is_refused_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["tiny_resnet", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: torch sees no GPU" in err
    assert not (tmp_path / "o").exists()
