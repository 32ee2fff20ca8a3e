"""The small real data sets sliver trains and judges its tiny models on; nothing is downloaded.

- :func:`digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as a classification
  set, resized to 32x32 (bilinear), copied to 3 channels and normalised. The train/val/test split
  (60/20/20, stratified by class) is fixed: it is drawn once from a constant seed, so the test
  set is the same on every machine and for every training seed.
- :func:`digit_scenes`: 64x64 scenes made from the same digits, 1-4 per scene, each scaled to
  24-32 pixels and placed in its own quadrant at a random offset (so they never overlap). Every
  pixel is labelled with its digit (0-9) where the digit's thickened stroke is, and
  :data:`BACKGROUND` (10) elsewhere. A scene split only uses digits of the matching
  classification split, so no test digit is seen in training.
- :func:`small_digits`: 32x32 canvases with one digit drawn small (8-14 pixels) at a random
  position among clutter (halves of 1-3 other digits, pixel noise); the label is the whole
  digit's class and ``meta["boxes"]`` keeps its true box for judging localisation. A split only
  uses digits (target and clutter) of the matching classification split.
- :func:`photos`: scikit-image's bundled sample photographs (or image files of your own),
  centre-cropped to a square, resized and normalised with the ImageNet statistics.

Scores: :class:`Accuracy` and :class:`MeanIoU` accumulate a task's score batch by batch
(:func:`metric_for` picks the one for a task); training and ``sliver.backends.evaluate`` share them.

Every split is an :class:`ImageSet`: plain tensors (``images``, ``targets``) that also act as a
``torch.utils.data.Dataset``; ``ImageSet.loader()`` gives a DataLoader. Split names are ``train``,
``val``, ``test`` and ``calib`` (the first :data:`CALIB_SIZE` training images, in a fixed random
order, for passes that calibrate). :func:`load` resolves the names the command line uses
(``digits``, ``digit-scenes``, ``small-digits``, ``photos`` or a path). Unknown names and missing paths raise
:class:`~sliver.ir.errors.DataError` with a one-line message.

The sets are built once per process and cached; an ``ImageSet`` shares its tensors with the cache,
so treat them as read-only (copy before editing in place).
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.errors import DataError

__all__ = [
    "ImageSet", "check_fits", "digits", "digit_scenes", "small_digits", "more_digit_scenes", "photos", "load", "calibration", "check_split",
    "SPLITS", "DATASETS", "PHOTO_NAMES", "BACKGROUND", "CALIB_SIZE", "DIGIT_MEAN", "DIGIT_STD",
    "IMAGENET_MEAN", "IMAGENET_STD", "Accuracy", "MeanIoU", "metric_for",
]

SPLITS = ("train", "val", "test", "calib")
DATASETS = ("digits", "digit-scenes", "small-digits", "photos")
#: the labelled sets built here (what ``--data NAME`` names; the tiny zoo models train on them)
NAMED = ("digits", "digit-scenes", "small-digits")

#: seed of the digit split and of the scene layouts; a constant, so the test set never moves
SPLIT_SEED = 20240601
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
CALIB_SIZE = 256
DIGIT_SIZE = 32
#: mean and standard deviation of the resized digits' pixels (0..1), rounded; used for scenes too
DIGIT_MEAN = 0.30
DIGIT_STD = 0.32

SCENE_SIZE = 64
SCENE_COUNTS = {"train": 2000, "val": 300, "test": 300}
SCENE_DIGITS = (1, 4)  # digits per scene, inclusive
SCENE_DIGIT_SIZES = (24, 32)  # side of a placed digit in pixels, inclusive
#: a scene pixel belongs to a digit where the digit's ink, blurred (Gaussian, MASK_SIGMA in 8x8-pixel
#: units) and scaled like the digit, is above MASK_THRESHOLD: the label is the thickened stroke, a
#: shape the tiny segmenter's 8x8 patch grid can resolve (the bare stroke is thinner than a patch)
MASK_SIGMA = 0.75
MASK_THRESHOLD = 0.15
BACKGROUND = 10  # label of background pixels; classes 0-9 are the digits

#: the canvas is the tiny models' 32x32 input, so a model trained on :func:`digits` (where a digit
#: fills the image) reads it as it is; a target covers 6-19% of the canvas's area
SMALL_SIZE = 32
SMALL_COUNTS = {"train": 10000, "val": 400, "test": 400}
SMALL_DIGIT_SIZES = (8, 14)  # side of the target digit in pixels, inclusive
SMALL_FRAGMENTS = (1, 3)  # clutter fragments per canvas, inclusive
SMALL_FRAGMENT_SIZES = (8, 14)  # side of the digit a fragment is cut from, inclusive
SMALL_NOISE = 0.08  # standard deviation of the pixel noise (0..1 units, before normalising)

PHOTO_NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "immunohistochemistry", "retina", "moon", "coins")
PHOTO_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


# -- the set type -----------------------------------------------------------------------------
@dataclass(eq=False)
class ImageSet(torch.utils.data.Dataset):
    """One split of a data set as tensors, usable as a torch Dataset.

    Attributes:
        name: ``"<dataset>/<split>"``, e.g. ``"digits/test"``.
        task: ``"classification"``, ``"segmentation"`` or ``"images"`` (no targets).
        images: float32 (N, 3, H, W), normalised.
        targets: int64 class labels (N,), per-pixel labels (N, H, W), or None.
        num_classes: number of target classes (0 when there are no targets).
        class_names: one name per class.
    """

    name: str
    task: str
    images: torch.Tensor
    targets: torch.Tensor | None = None
    num_classes: int = 0
    class_names: tuple = ()
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index):
        if self.targets is None:
            return self.images[index]
        return self.images[index], self.targets[index]

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def take(self, count: int) -> "ImageSet":
        """The first ``count`` items as a set of their own (views, no copy)."""
        count = max(0, min(int(count), len(self)))
        targets = None if self.targets is None else self.targets[:count]
        return ImageSet(f"{self.name}[:{count}]", self.task, self.images[:count], targets,
                        self.num_classes, self.class_names, dict(self.meta))

    def loader(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> torch.utils.data.DataLoader:
        """A single-process DataLoader; with ``shuffle`` the order is fixed by ``seed``."""
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return torch.utils.data.DataLoader(self, batch_size=int(batch_size), shuffle=shuffle,
                                           generator=generator, drop_last=drop_last, num_workers=0)

    def batches(self, batch_size: int = 64):
        """Yield (images, targets-or-None) in order, as tensors; cheaper than a DataLoader."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.images[start:stop], None if self.targets is None else self.targets[start:stop]

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.image_shape))
        return f"ImageSet({self.name!r}, {self.task}, {len(self)} x {shape})"


# -- names ------------------------------------------------------------------------------------
def _unknown(kind: str, value, valid, what: str = "") -> DataError:
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"unknown {kind} {value!r}{what}{hint}; valid: {', '.join(valid)}")


def check_split(split: str, dataset: str = "digits") -> str:
    """Return ``split`` if it names a split, else raise :class:`DataError`."""
    if split not in SPLITS:
        raise _unknown("split", split, SPLITS, f" for {dataset}")
    return split


# -- digits -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple:
    """scikit-learn's digits: (images (N, 8, 8) float32 in 0..1, labels (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict:
    """Stratified 60/20/20 split of the digits, drawn once from SPLIT_SEED (numpy's PCG64)."""
    _, labels = _raw_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict = {"train": [], "val": [], "test": []}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_val = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    out = {}
    for k, v in parts.items():  # mix the classes, in a fixed order
        out[k] = rng.permutation(np.concatenate(v))
    out["calib"] = out["train"][:CALIB_SIZE]
    return out


def digit_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's ``load_digits()`` of the images of ``split``."""
    return _split_indices()[check_split(split)].copy()


def _normalise_digits(x: torch.Tensor) -> torch.Tensor:
    return (x - DIGIT_MEAN) / DIGIT_STD


@functools.lru_cache(maxsize=None)
def _digits_tensors(split: str) -> tuple:
    images, labels = _raw_digits()
    idx = _split_indices()[split]
    x = torch.from_numpy(images[idx])[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    x = _normalise_digits(x).contiguous()
    return x, torch.from_numpy(labels[idx].copy())


def digits(split: str = "train") -> ImageSet:
    """Handwritten digits as (N, 3, 32, 32) normalised images with labels 0-9.

    Splits: train (1,078 images), val (359), test (360), calib (256 training images).
    """
    check_split(split, "digits")
    x, y = _digits_tensors(split)
    return ImageSet(f"digits/{split}", "classification", x.expand(-1, 3, -1, -1), y, 10,
                    tuple(str(i) for i in range(10)), {"mean": DIGIT_MEAN, "std": DIGIT_STD})


def calibration(dataset: str = "digits", count: int = CALIB_SIZE) -> ImageSet:
    """The calibration images of ``dataset`` (digits, digit-scenes or small-digits): ``count`` training images."""
    return load(dataset, "calib").take(count)


# -- digit scenes -----------------------------------------------------------------------------
def _place(rng: np.random.Generator, sizes: list) -> list:
    """Top-left corners for squares of the given sides, one per quadrant of the scene (the
    quadrants in random order, the square at a random offset inside its own): never overlapping,
    and four always fit. Random placement over the whole scene fits a fourth large digit in
    under a fifth of the scenes that ask for one."""
    half = SCENE_SIZE // 2
    boxes = []
    for side, quadrant in zip(sizes, rng.permutation(4)):
        row, col = divmod(int(quadrant), 2)
        top, left = (int(v) for v in rng.integers(0, half - side + 1, size=2))
        boxes.append((row * half + top, col * half + left, side))
    return boxes


@functools.lru_cache(maxsize=4)
def _scaled_digits(split: str) -> tuple:
    """The split's digits at every scene size: (pool indices, ink {side: (N, side, side)},
    label regions {side: bool (N, side, side)})."""
    from scipy.ndimage import gaussian_filter

    images, _ = _raw_digits()
    pool = _split_indices()[split]
    lo, hi = SCENE_DIGIT_SIZES
    source = torch.from_numpy(images[pool])[:, None]
    blurred = gaussian_filter(images[pool], sigma=(0, MASK_SIGMA, MASK_SIGMA), mode="constant")
    blurred = torch.from_numpy(np.ascontiguousarray(blurred, np.float32))[:, None]

    def scale(x, side):
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()

    ink = {side: scale(source, side) for side in range(lo, hi + 1)}
    regions = {side: scale(blurred, side) > MASK_THRESHOLD for side in range(lo, hi + 1)}
    return pool, ink, regions


def _generate_scenes(split: str, count: int, seed) -> tuple:
    """(images (N, 1, 64, 64) normalised, labels (N, 64, 64), layouts) drawn from ``seed``."""
    _, labels = _raw_digits()
    pool, ink, regions = _scaled_digits(split)
    lo, hi = SCENE_DIGIT_SIZES
    rng = np.random.default_rng(seed)
    canvas = np.zeros((count, SCENE_SIZE, SCENE_SIZE), np.float32)
    masks = np.full((count, SCENE_SIZE, SCENE_SIZE), BACKGROUND, np.int64)
    layouts = []
    for n in range(count):
        placed = []
        k = int(rng.integers(SCENE_DIGITS[0], SCENE_DIGITS[1] + 1))
        sizes = [int(v) for v in rng.integers(lo, hi + 1, size=k)]
        for top, left, side in _place(rng, sizes):
            j = int(rng.integers(len(pool)))
            canvas[n, top:top + side, left:left + side] = ink[side][j]
            window = masks[n, top:top + side, left:left + side]
            window[regions[side][j]] = labels[pool[j]]
            placed.append((int(pool[j]), int(labels[pool[j]]), top, left, side))
        layouts.append(tuple(placed))
    x = _normalise_digits(torch.from_numpy(canvas)[:, None]).contiguous()
    return x, torch.from_numpy(masks), tuple(layouts)


@functools.lru_cache(maxsize=None)
def _scene_tensors(split: str) -> tuple:
    if split == "calib":
        x, y, layouts = _scene_tensors("train")
        return x[:CALIB_SIZE], y[:CALIB_SIZE], layouts[:CALIB_SIZE]
    return _generate_scenes(split, SCENE_COUNTS[split], [SPLIT_SEED, SPLITS.index(split)])


def _scene_set(name: str, x, y, layouts) -> ImageSet:
    return ImageSet(name, "segmentation", x.expand(-1, 3, -1, -1), y, 11,
                    tuple(str(i) for i in range(10)) + ("background",),
                    {"mean": DIGIT_MEAN, "std": DIGIT_STD, "layouts": layouts})


def digit_scenes(split: str = "train") -> ImageSet:
    """64x64 scenes of 1-4 digits with per-pixel labels: 0-9 for digit ink, 10 for background.

    Splits: train (2,000 scenes), val (300), test (300), calib (the first 256 training scenes).
    Deterministic: the same split gives the same scenes on every run. ``meta["layouts"]`` lists,
    per scene, its digits as (index into ``load_digits()``, label, top, left, side).
    """
    check_split(split, "digit-scenes")
    return _scene_set(f"digit-scenes/{split}", *_scene_tensors(split))


def more_digit_scenes(split: str, count: int, seed: int) -> ImageSet:
    """``count`` further scenes made from the digits of ``split`` (not cached): a fresh draw per
    ``seed``, e.g. new training scenes every epoch. Seeds never give the fixed split's scenes."""
    check_split(split, "digit-scenes")
    if split == "calib":
        split = "train"
    if not isinstance(count, int) or count < 1:
        raise DataError(f"count must be a positive int, got {count!r}")
    x, y, layouts = _generate_scenes(split, count, [SPLIT_SEED, SPLITS.index(split), 1, int(seed)])
    return _scene_set(f"digit-scenes/{split}+seed{seed}", x, y, layouts)


# -- small digits in clutter ------------------------------------------------------------------
def _overlap(a, b) -> bool:
    """Whether boxes (top, left, bottom, right), bottom/right exclusive, intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _generate_small(split: str, count: int, seed) -> tuple:
    """(images (N, 1, 32, 32) normalised, labels (N,), boxes (N, 4) int64, layouts) from ``seed``.

    The target digit (side 8-14) goes anywhere on the canvas. Each clutter fragment is one half
    (top, bottom, left or right, chosen at random) of another digit of the split, drawn at side
    8-14 where it does not touch the target's box (up to 20 tries, else left out): a fragment
    never covers or completes the target, and no fragment is a whole digit, so the label is
    unambiguous. Pixel noise is Gaussian, drawn per canvas, and the canvas is clipped to 0..1."""
    images, labels = _raw_digits()
    pool = _split_indices()[split]
    source = torch.from_numpy(images[pool])[:, None]
    lo, hi = SMALL_DIGIT_SIZES
    flo, fhi = SMALL_FRAGMENT_SIZES
    ink = {side: F.interpolate(source, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()
           for side in range(min(lo, flo), max(hi, fhi) + 1)}
    rng = np.random.default_rng(seed)
    canvas = np.zeros((count, SMALL_SIZE, SMALL_SIZE), np.float32)
    targets = np.zeros(count, np.int64)
    boxes = np.zeros((count, 4), np.int64)
    layouts = []
    for n in range(count):
        side = int(rng.integers(lo, hi + 1))
        top, left = (int(v) for v in rng.integers(0, SMALL_SIZE - side + 1, size=2))
        j = int(rng.integers(len(pool)))
        box = (top, left, top + side, left + side)
        placed = [(int(pool[j]), int(labels[pool[j]]), top, left, side, "whole")]
        for _ in range(int(rng.integers(SMALL_FRAGMENTS[0], SMALL_FRAGMENTS[1] + 1))):
            fside = int(rng.integers(flo, fhi + 1))
            k = int(rng.integers(len(pool)))
            half = ("top", "bottom", "left", "right")[int(rng.integers(4))]
            piece = ink[fside][k]
            h = fside // 2
            piece = {"top": piece[:h], "bottom": piece[fside - h:], "left": piece[:, :h],
                     "right": piece[:, fside - h:]}[half]
            for _try in range(20):
                ft = int(rng.integers(0, SMALL_SIZE - piece.shape[0] + 1))
                fl = int(rng.integers(0, SMALL_SIZE - piece.shape[1] + 1))
                if not _overlap(box, (ft, fl, ft + piece.shape[0], fl + piece.shape[1])):
                    window = canvas[n, ft:ft + piece.shape[0], fl:fl + piece.shape[1]]
                    np.maximum(window, piece, out=window)
                    placed.append((int(pool[k]), int(labels[pool[k]]), ft, fl, fside, half))
                    break
        canvas[n, top:top + side, left:left + side] = np.maximum(canvas[n, top:top + side, left:left + side],
                                                                 ink[side][j])
        canvas[n] += rng.standard_normal((SMALL_SIZE, SMALL_SIZE)).astype(np.float32) * SMALL_NOISE
        targets[n] = labels[pool[j]]
        boxes[n] = box
        layouts.append(tuple(placed))
    np.clip(canvas, 0.0, 1.0, out=canvas)
    x = _normalise_digits(torch.from_numpy(canvas)[:, None]).contiguous()
    return x, torch.from_numpy(targets), torch.from_numpy(boxes), tuple(layouts)


@functools.lru_cache(maxsize=None)
def _small_tensors(split: str) -> tuple:
    if split == "calib":
        x, y, boxes, layouts = _small_tensors("train")
        return x[:CALIB_SIZE], y[:CALIB_SIZE], boxes[:CALIB_SIZE], layouts[:CALIB_SIZE]
    return _generate_small(split, SMALL_COUNTS[split], [SPLIT_SEED, SPLITS.index(split), 2])


def small_digits(split: str = "train") -> ImageSet:
    """32x32 canvases, each with one small digit (side 8-14 pixels) at a random position among
    clutter (halves of 1-3 other digits, Gaussian pixel noise); label = that digit (0-9).

    Splits: train (10,000 canvases; the first 2,000 are the whole train split of 2026-12-07), val
    (400), test (400), calib (the first 256 training ones);
    deterministic, and a split only uses the digits of the matching split of :func:`digits`.
    ``meta["boxes"]`` is the target digit's box per canvas, (N, 4) int64 (top, left, bottom,
    right) in pixels, bottom/right exclusive; ``meta["layouts"]`` lists what was drawn, per
    canvas: (index into ``load_digits()``, label, top, left, side, part), target first.
    Normalised like the digits (same mean and standard deviation constants)."""
    check_split(split, "small-digits")
    x, y, boxes, layouts = _small_tensors(split)
    return ImageSet(f"small-digits/{split}", "classification", x.expand(-1, 3, -1, -1), y, 10,
                    tuple(str(i) for i in range(10)),
                    {"mean": DIGIT_MEAN, "std": DIGIT_STD, "boxes": boxes, "layouts": layouts})


# -- photos -----------------------------------------------------------------------------------
def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Any skimage image (gray, RGB, RGBA, bool, uint8) -> float32 (3, size, size) in 0..1."""
    from skimage.transform import resize
    from skimage.util import img_as_float32

    image = img_as_float32(np.asarray(image))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    elif image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"cannot read an image of shape {image.shape}; expected gray, RGB or RGBA")
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    image = resize(image, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _image_files(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
        return files
    return [path]


def photos(names=None, *, size: int = PHOTO_SIZE, path: str | os.PathLike | None = None) -> ImageSet:
    """scikit-image's sample photos (or the image file / directory at ``path``) as (N, 3, S, S).

    Each image is centre-cropped to a square, resized to ``size`` and normalised with the
    ImageNet mean and standard deviation. ``names`` picks sample photos (default: all of
    :data:`PHOTO_NAMES`); there are no targets.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise DataError(f"photo size must be a positive int, got {size!r}")
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise DataError(f"no such image file or directory: {path}")
        from skimage.io import imread

        files = _image_files(path)
        arrays = []
        for f in files:
            try:
                arrays.append(imread(f))
            except Exception as e:
                raise DataError(f"cannot read image {f} (corrupt, truncated or not an image); "
                                "give PNG, JPEG, BMP, TIFF or GIF files") from None
        labels = [os.path.basename(f) for f in files]
        name = f"photos/{os.path.basename(os.path.normpath(path))}"
    else:
        import skimage.data

        labels = list(PHOTO_NAMES if names is None else ([names] if isinstance(names, str) else names))
        for n in labels:
            if n not in PHOTO_NAMES:
                raise _unknown("photo", n, PHOTO_NAMES)
        arrays = [getattr(skimage.data, n)() for n in labels]
        name = "photos"
    x = torch.from_numpy(np.stack([_square_resize(a, size) for a in arrays]))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ImageSet(name, "images", ((x - mean) / std).contiguous(), None, 0, (),
                    {"names": tuple(labels), "mean": IMAGENET_MEAN, "std": IMAGENET_STD})


# -- one resolver for the command line --------------------------------------------------------
def _from_npz(path: str) -> ImageSet:
    """An ``.npz`` of ``images`` (N, C, H, W) and optional ``labels`` (N,) or (N, H, W), checked:
    a readable archive without pickled objects, real-valued finite images, integer labels >= 0."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise DataError(f"{path} has no 'images' array; save images (N, C, H, W) and optional 'labels'")
            images, labels = f["images"], (f["labels"] if "labels" in f else None)
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(f"{path} is not a numeric .npz archive (it is corrupt or holds pickled Python objects, "
                            "which sliver does not load); save plain numeric arrays with np.savez") from None
        raise DataError(f"{path} is not a readable .npz archive (corrupt or truncated); save it again with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError):
        raise DataError(f"{path} is not a readable .npz archive (corrupt or truncated); save it again with np.savez") from None
    if images.dtype.kind not in "biuf":
        raise DataError(f"'images' in {path} has dtype {images.dtype}; save real numbers (float32, N, C, H, W)")
    if images.ndim != 4 or 0 in images.shape:
        raise DataError(f"'images' in {path} has shape {tuple(images.shape)}; expected (N, C, H, W) with N, C, H, W > 0")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(f"'images' in {path} holds NaN or infinite values; save finite pixel values")
    if labels is not None:
        if labels.dtype.kind not in "biu":
            raise DataError(f"'labels' in {path} has dtype {labels.dtype}; save integer class labels")
        if labels.ndim not in (1, 3) or labels.shape[0] != images.shape[0]:
            raise DataError(f"'labels' in {path} has shape {tuple(labels.shape)} for {images.shape[0]} images; "
                            "expected (N,) class labels or (N, H, W) per-pixel labels")
        if labels.ndim == 3 and tuple(labels.shape[1:]) != tuple(images.shape[2:]):
            raise DataError(f"per-pixel 'labels' in {path} are {tuple(labels.shape[1:])} but the images are "
                            f"{tuple(images.shape[2:])}; save one label per pixel")
        if labels.size and int(labels.min()) < 0:
            raise DataError(f"'labels' in {path} include {int(labels.min())}; class labels must be >= 0")
    images = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, np.int64))
    if labels is None:
        task, classes = "images", 0
    elif labels.ndim == 1:
        task, classes = "classification", int(labels.max()) + 1
    else:
        task, classes = "segmentation", int(labels.max()) + 1
    return ImageSet(os.path.basename(path), task, images, labels, classes)


def check_fits(dataset: ImageSet, input_shape, num_outputs: int | None = None) -> None:
    """Refuse a data set whose images do not fit a model's input ``(N, C, H, W)`` or whose labels
    are not classes of its ``num_outputs`` outputs (channels of a segmenter), before any work."""
    want = tuple(int(d) for d in input_shape[1:])
    if tuple(dataset.image_shape) != want:
        raise DataError(f"the images of {dataset.name} are {tuple(dataset.image_shape)} but the model takes "
                        f"{want}; give data of the model's input size (or --input-shape to match the data)")
    if dataset.targets is not None and num_outputs and dataset.num_classes > num_outputs:
        top = int(dataset.targets.max())
        raise DataError(f"{dataset.name} has label {top} but the model has only {num_outputs} classes "
                        f"(0..{num_outputs - 1}); give labels of the model's classes")


def load(spec: str | os.PathLike, split: str = "test") -> ImageSet:
    """A data set by name (``digits``, ``digit-scenes``, ``small-digits``, ``photos``) and split, or from a path.

    A path may be an ``.npz`` file with ``images`` (N, C, H, W, already normalised) and optional
    ``labels`` (N,) or (N, H, W), an image-folder tree (one subfolder per class, streamed from
    disk with ImageNet's 224 evaluation transform, see :mod:`sliver.models.image_folder`), an
    image file, or a directory of images (then: photos, no targets, and ``split`` is ignored).
    """
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(text, str):
        raise DataError(f"a data set is named by a string or a path, got {type(spec).__name__}")
    if text == "digits":
        return digits(split)
    if text in ("digit-scenes", "digit_scenes", "scenes"):
        return digit_scenes(split)
    if text in ("small-digits", "small_digits"):
        return small_digits(split)
    if text == "photos":
        return photos()
    looks_like_path = os.sep in text or "." in os.path.basename(text) or os.path.exists(text)
    if not looks_like_path:
        raise _unknown("data set", text, DATASETS, " (or give a path to an .npz, an image or a directory)")
    if not os.path.exists(text):
        raise DataError(f"no such data file or directory: {text}")
    if text.endswith(".npz"):
        return _from_npz(text)
    from .image_folder import image_folder, is_image_folder

    if is_image_folder(text):
        return image_folder(text, split)
    return photos(path=text)


def context_data(spec: str | os.PathLike) -> dict:
    """The data a pipeline's passes get through the pass context for ``spec``:
    ``{"train", "val", "calib"}`` of a named set (``digits``, ``digit-scenes``, ``small-digits``), or the one
    labelled set of an ``.npz`` file for all three."""
    text = os.fspath(spec)
    named = text.replace("_", "-")
    if named in NAMED:
        return {"train": load(named, "train"), "val": load(named, "val"), "calib": calibration(named)}
    from .image_folder import folder_splits, is_image_folder

    if is_image_folder(text):
        sets = folder_splits(text)
        return {k: sets[k] for k in ("train", "val", "calib")}
    one = load(text)
    if one.task not in ("classification", "segmentation"):
        raise DataError(f"{text} has no labels to train or score with; save 'labels' next to 'images'")
    return {"train": one, "val": one, "calib": one}


# -- scores -----------------------------------------------------------------------------------
class Accuracy:
    """Top-1 accuracy in percent, accumulated over batches of (N, classes) logits."""

    name = "accuracy"

    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = num_classes
        self.correct = 0
        self.total = 0

    def update(self, logits, targets) -> None:
        logits, targets = torch.as_tensor(logits), torch.as_tensor(targets)
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise DataError(f"classification outputs must be (N, classes) for {targets.shape[0]} targets, "
                            f"got {tuple(logits.shape)}; is this a classifier?")
        self.correct += int((logits.argmax(1) == targets).sum())
        self.total += int(targets.shape[0])

    def value(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


class MeanIoU:
    """Mean intersection-over-union in percent over the classes that occur (in labels or
    predictions), from a confusion matrix accumulated over batches of (N, classes, H, W) logits."""

    name = "miou"

    def __init__(self, num_classes: int = 11) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits, targets) -> None:
        logits, targets = torch.as_tensor(logits), torch.as_tensor(targets)
        if logits.ndim != 4 or logits.shape[1] != self.num_classes or logits.shape[2:] != targets.shape[1:]:
            raise DataError(f"segmentation outputs must be (N, {self.num_classes}, H, W) matching labels "
                            f"{tuple(targets.shape)}, got {tuple(logits.shape)}; is this a segmenter?")
        k = self.num_classes
        pairs = targets.reshape(-1).long() * k + logits.argmax(1).reshape(-1)
        self.confusion += torch.bincount(pairs, minlength=k * k).reshape(k, k)

    def per_class(self) -> torch.Tensor:
        """IoU per class (0..1); NaN for a class that occurs nowhere."""
        cm = self.confusion.double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def value(self) -> float:
        iou = self.per_class()
        present = ~torch.isnan(iou)
        return 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0


def metric_for(task: str, num_classes: int):
    """A fresh score accumulator for ``task`` (classification -> Accuracy, segmentation -> MeanIoU)."""
    if task == "classification":
        return Accuracy(num_classes)
    if task == "segmentation":
        return MeanIoU(num_classes)
    raise DataError(f"no score for task {task!r}; tasks with a score: classification, segmentation")
