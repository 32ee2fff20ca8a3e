"""A user's images as a data set: an image-folder tree (one subfolder per class, as torchvision's
``ImageFolder`` reads it), streamed from disk.

    root/
      cat/  a.jpg b.png ...
      dog/  c.jpg ...

Classes are the subfolders in sorted order (label i = i-th name). Each image is read when it is
needed (a DataLoader batch, a slice of ``images``), converted to RGB, resized so its shorter side
is ``resize`` pixels (bilinear), centre-cropped to ``crop`` x ``crop`` and normalised with
``mean``/``std`` (ImageNet's by default; ``resize`` defaults to ``crop / 0.875``, the usual
ImageNet evaluation transform). Nothing holds the whole set in memory: only the file list and the
labels are kept.

Splits are fixed under a seed: within every class the files (in sorted order) are permuted by
``numpy.random.default_rng(seed)`` and cut 60/20/20 into train/val/test (at least one test image
per class with three or more images); ``calib`` is the first :data:`~sliver.models.data.CALIB_SIZE`
training images in a fixed random order. Bad images, empty classes and images smaller than the
crop give one-line :class:`~sliver.ir.errors.DataError` s naming the file or folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..ir.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Transform:
    """Resize (shorter side), centre crop, normalise: the evaluation transform of an image."""

    crop: int = 224
    resize: int | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def resize_to(self) -> int:
        return int(self.resize) if self.resize else int(round(self.crop / 0.875))

    def check(self) -> None:
        if self.crop <= 0 or self.resize_to < self.crop:
            raise DataError(f"resize {self.resize_to} must be >= crop {self.crop} > 0; set --resize and --crop")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise DataError(f"mean {self.mean} and std {self.std} need three values each, std > 0")

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                side = self.resize_to
                if w <= h:
                    size = (side, max(side, int(round(h * side / w))))
                else:
                    size = (max(side, int(round(w * side / h))), side)
                img = img.resize(size, Image.BILINEAR)
                left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
                img = img.crop((left, top, left + self.crop, top + self.crop))
                array = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot read image {path}: {reason}; remove or replace the file") from None
        if array.shape != (self.crop, self.crop, 3):
            raise DataError(f"image {path} gives shape {array.shape} after resize/crop, expected "
                            f"{(self.crop, self.crop, 3)}; check the file")
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def scan(root: str) -> tuple:
    """(class names, [(path, label), ...]) of an image-folder tree, in sorted order."""
    if not os.path.isdir(root):
        raise DataError(f"no such directory: {root}; --data takes a folder with one subfolder per class")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; put each class's images in a subfolder (root/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it")
        items += [(os.path.join(folder, f), label) for f in files]
    return tuple(classes), items


def is_image_folder(path: str) -> bool:
    """True when ``path`` is a directory whose subfolders hold images (an image-folder tree)."""
    if not os.path.isdir(path):
        return False
    for d in os.listdir(path):
        sub = os.path.join(path, d)
        if os.path.isdir(sub) and any(f.lower().endswith(IMAGE_SUFFIXES) for f in os.listdir(sub)):
            return True
    return False


def split_indices(labels: np.ndarray, seed: int, calib_size: int) -> dict:
    """Per-class 60/20/20 train/val/test indices (fixed by ``seed``) and the calib subset."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = int(round(n * SPLIT_FRACTIONS[2])) or (1 if n >= 3 else 0)
        n_val = int(round(n * SPLIT_FRACTIONS[1])) or (1 if n >= 3 else 0)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    out = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    order = np.random.default_rng(seed + 1).permutation(len(out["train"]))
    out["calib"] = out["train"][order][:calib_size]
    return out


class LazyImages:
    """The images of a split as a read-only, lazily loaded (N, 3, crop, crop) array: indexing
    with an int, a slice or an index list reads just those files."""

    def __init__(self, paths: list, transform: Transform):
        self.paths = list(paths)
        self.transform = transform
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.transform.crop, self.transform.crop))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.transform(self.paths[index])
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        chosen = self.paths[index] if isinstance(index, slice) else [self.paths[i] for i in index]
        if not chosen:
            return torch.zeros((0, 3, self.transform.crop, self.transform.crop))
        return torch.stack([self.transform(p) for p in chosen])

    def subset(self, count: int) -> "LazyImages":
        return LazyImages(self.paths[:count], self.transform)


def image_folder(root: str | os.PathLike, split: str = "test", *, transform: Transform | None = None,
                 seed: int = 0, calib_size: int = 256):
    """One split of an image-folder tree as an :class:`~sliver.models.data.ImageSet` whose images
    are read from disk on demand."""
    from .data import ImageSet, check_split

    root = os.fspath(root)
    check_split(split, root)
    transform = transform or Transform()
    transform.check()
    classes, items = scan(root)
    labels = np.asarray([label for _, label in items], np.int64)
    index = split_indices(labels, seed, calib_size)[split]
    if len(index) == 0:
        raise DataError(f"the {split} split of {root} is empty; add images (each class needs >= 3 for a test split)")
    paths = [items[i][0] for i in index]
    return FolderSet(
        name=f"{os.path.basename(os.path.normpath(root))}/{split}",
        task="classification",
        images=LazyImages(paths, transform),
        targets=torch.from_numpy(labels[index]),
        num_classes=len(classes),
        class_names=classes,
        meta={"root": root, "split": split, "seed": seed, "crop": transform.crop, "resize": transform.resize_to,
              "mean": transform.mean, "std": transform.std},
    )


def folder_splits(root: str | os.PathLike, *, transform: Transform | None = None, seed: int = 0,
                  calib_size: int = 256) -> dict:
    """``{"train", "val", "calib", "test"}`` of an image-folder tree (for the pass context and
    scoring). Every file is opened once here, so a bad image fails now, naming the file, rather
    than in the middle of a pass."""
    sets = {s: image_folder(root, s, transform=transform, seed=seed, calib_size=calib_size)
            for s in ("train", "val", "calib", "test")}
    return sets


def verify(image_set, progress=None) -> None:
    """Read every image of ``image_set`` once (one at a time, nothing kept) so that a bad file is
    reported before any work."""
    images = image_set.images
    steps = range(len(images))
    for i in (progress(steps) if progress else steps):
        images[i]


def _folder_set_class():
    from .data import ImageSet

    class FolderSet(ImageSet):
        """An :class:`ImageSet` whose ``images`` are :class:`LazyImages` (read from disk)."""

        def take(self, count: int):
            count = max(0, min(int(count), len(self)))
            return FolderSet(f"{self.name}[:{count}]", self.task, self.images.subset(count), self.targets[:count],
                             self.num_classes, self.class_names, dict(self.meta))

        def __repr__(self) -> str:
            return f"FolderSet({self.name!r}, {len(self)} x 3x{self.images.shape[2]}x{self.images.shape[3]}, streamed)"

    return FolderSet


FolderSet = _folder_set_class()
