"""sliver.models.data: the digit split, the digit scenes, the photos, the scores, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sliver.ir.errors import DataError
from sliver.models import data


# -- digits -------------------------------------------------------------------------------------
def test_digit_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    idx = {s: data.digit_indices(s) for s in ("train", "val", "test")}
    assert [len(idx[s]) for s in ("train", "val", "test")] == [1078, 359, 360]
    every = np.concatenate(list(idx.values()))
    assert sorted(every.tolist()) == list(range(1797))  # a partition of the 1,797 images
    for s, part in idx.items():  # every class in every split, in the 60/20/20 proportion
        counts = np.bincount(labels[part], minlength=10)
        share = counts / np.bincount(labels, minlength=10)
        assert np.allclose(share, {"train": 0.6, "val": 0.2, "test": 0.2}[s], atol=0.01), (s, counts)
    # fixed: a checksum of the split, so a change to it is a deliberate one
    assert idx["test"][:5].tolist() == [1664, 1387, 1190, 20, 1361]
    assert int(idx["test"].sum()) == 333120
    calib = data.digit_indices("calib")
    assert len(calib) == data.CALIB_SIZE and set(calib) <= set(idx["train"])


def test_digits_tensors():
    train, test = data.digits("train"), data.digits("test")
    assert train.task == "classification" and train.num_classes == 10
    assert train.images.shape == (1078, 3, 32, 32) and train.images.dtype == torch.float32
    assert test.targets.shape == (360,) and test.targets.dtype == torch.int64
    assert set(test.targets.tolist()) == set(range(10))
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # gray copied to 3 channels
    # normalised with constants close to the training split's own statistics
    assert abs(float(train.images.mean())) < 0.05 and abs(float(train.images.std()) - 1) < 0.05
    # the images are the real digits: 8x8 average pooling gives back scikit-learn's pixels
    from sklearn.datasets import load_digits

    raw = load_digits().images[data.digit_indices("test")[:4]] / 16.0
    pooled = torch.nn.functional.avg_pool2d(test.images[:4, :1] * data.DIGIT_STD + data.DIGIT_MEAN, 4)[:, 0]
    assert np.corrcoef(pooled.numpy().ravel(), raw.ravel())[0, 1] > 0.95


def test_loader_and_batches():
    calib = data.calibration("digits")
    assert len(calib) == data.CALIB_SIZE and calib.image_shape == (3, 32, 32)
    x, y = next(iter(calib.loader(batch_size=16)))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    first = [b[1].tolist() for b in data.digits("val").loader(batch_size=50, shuffle=True, seed=3)]
    again = [b[1].tolist() for b in data.digits("val").loader(batch_size=50, shuffle=True, seed=3)]
    other = [b[1].tolist() for b in data.digits("val").loader(batch_size=50, shuffle=True, seed=4)]
    assert first == again and first != other
    sizes = [len(xb) for xb, _ in data.digits("val").batches(100)]
    assert sizes == [100, 100, 100, 59]
    assert len(data.digits("test").take(10)) == 10


# -- digit scenes -------------------------------------------------------------------------------
def test_digit_scenes_shapes_labels_and_layout():
    scenes = data.digit_scenes("test")
    assert scenes.task == "segmentation" and scenes.num_classes == 11
    assert scenes.images.shape == (300, 3, 64, 64) and scenes.targets.shape == (300, 64, 64)
    assert int(scenes.targets.min()) >= 0 and int(scenes.targets.max()) == data.BACKGROUND
    layouts = scenes.meta["layouts"]
    counts = [len(layout) for layout in layouts]
    assert min(counts) == 1 and max(counts) == 4
    test_pool = set(data.digit_indices("test").tolist())
    for n, layout in enumerate(layouts[:100]):
        boxes = []
        for index, label, top, left, side in layout:
            assert index in test_pool  # test scenes are made of test digits only
            lo, hi = data.SCENE_DIGIT_SIZES
            assert lo <= side <= hi and 0 <= top and top + side <= 64 and 0 <= left and left + side <= 64
            window = scenes.targets[n, top:top + side, left:left + side]
            assert (window == label).any()  # the digit's pixels carry its label
            assert set(window.unique().tolist()) <= {label, data.BACKGROUND}
            boxes.append((top, left, side))
        for i, (t1, l1, s1) in enumerate(boxes):  # no overlap
            for t2, l2, s2 in boxes[i + 1:]:
                assert t1 + s1 <= t2 or t2 + s2 <= t1 or l1 + s1 <= l2 or l2 + s2 <= l1
        outside = torch.ones(64, 64, dtype=torch.bool)
        for t, l, s in boxes:
            outside[t:t + s, l:l + s] = False
        assert (scenes.targets[n][outside] == data.BACKGROUND).all()


def test_digit_scenes_are_deterministic():
    first = data.digit_scenes("val")
    data._scene_tensors.cache_clear()
    data._scaled_digits.cache_clear()
    again = data.digit_scenes("val")
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    assert first.meta["layouts"] == again.meta["layouts"]
    fresh = data.more_digit_scenes("train", 20, seed=1)
    assert torch.equal(fresh.targets, data.more_digit_scenes("train", 20, seed=1).targets)
    assert not torch.equal(fresh.targets, data.more_digit_scenes("train", 20, seed=2).targets)
    train_pool = set(data.digit_indices("train").tolist())
    assert all(d[0] in train_pool for layout in fresh.meta["layouts"] for d in layout)
    assert len(data.digit_scenes("calib")) == data.CALIB_SIZE


# -- photos -------------------------------------------------------------------------------------
def test_photos_from_scikit_image():
    photos = data.photos(size=64)
    assert photos.task == "images" and photos.targets is None
    assert photos.images.shape == (len(data.PHOTO_NAMES), 3, 64, 64)
    assert photos.meta["names"] == data.PHOTO_NAMES
    assert torch.isfinite(photos.images).all() and -3 < float(photos.images.mean()) < 3
    one = data.photos("astronaut", size=32)
    assert one.images.shape == (1, 3, 32, 32) and isinstance(one[0], torch.Tensor)


def test_photos_from_a_path(tmp_path):
    from skimage import data as skdata
    from skimage.io import imsave

    imsave(tmp_path / "coffee.png", skdata.coffee()[::4, ::4])
    imsave(tmp_path / "camera.png", skdata.camera()[::4, ::4])
    (tmp_path / "notes.txt").write_text("not an image")
    folder = data.load(str(tmp_path))
    assert folder.images.shape == (2, 3, 224, 224) and folder.meta["names"] == ("camera.png", "coffee.png")
    assert data.load(str(tmp_path / "coffee.png")).images.shape == (1, 3, 224, 224)


def test_npz_data(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, images=np.zeros((5, 3, 8, 8), np.float32), labels=np.arange(5))
    s = data.load(str(path))
    assert s.task == "classification" and len(s) == 5 and s.num_classes == 5
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(DataError, match="no 'images' array"):
        data.load(str(tmp_path / "bad.npz"))


# -- scores -------------------------------------------------------------------------------------
def test_accuracy_and_miou():
    acc = data.Accuracy()
    acc.update(torch.eye(10)[[1, 2, 3, 3]], torch.tensor([1, 2, 3, 4]))
    assert acc.value() == 75.0
    miou = data.MeanIoU(3)
    labels = torch.tensor([[[0, 0], [1, 2]]])
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    miou.update(perfect, labels)
    assert miou.value() == 100.0
    worse = data.MeanIoU(3)
    wrong = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 2]]]), 3).permute(0, 3, 1, 2).float()
    worse.update(wrong, labels)
    # class 0: 1/2, class 1: 1/2, class 2: 1
    assert worse.value() == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    with pytest.raises(DataError, match="segmentation outputs must be"):
        worse.update(torch.zeros(1, 10), labels)
    with pytest.raises(DataError, match="no score for task"):
        data.metric_for("images", 0)


# -- errors: one line, typed ----------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: data.digits("tset"), "unknown split 'tset' for digits (did you mean 'test'?); valid: train, val, test, calib"),
    (lambda: data.digit_scenes("validation"), "unknown split 'validation' for digit-scenes"),
    (lambda: data.load("digitz"), "unknown data set 'digitz'"),
    (lambda: data.load("/no/such/dir/images.npz"), "no such data file or directory: /no/such/dir/images.npz"),
    (lambda: data.photos(path="/no/such/photo.png"), "no such image file or directory: /no/such/photo.png"),
    (lambda: data.photos("lena"), "unknown photo 'lena'"),
    (lambda: data.photos(size=0), "photo size must be a positive int"),
])
def test_errors_are_one_line_data_errors(call, message):
    with pytest.raises(DataError) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text
