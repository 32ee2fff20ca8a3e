"""Short, reproducible training of the tiny zoo models on the digit data sets.

    from sliver.models import training
    result = training.train("tiny_deit", seed=0)            # config defaults for that model
    training.save_checkpoint(result, "build/tiny_deit.pt")  # atomic
    net, ckpt = training.load_checkpoint("build/tiny_deit.pt")

Each tiny model has a default :class:`TrainConfig` (:data:`DEFAULTS`) chosen to reach its goal
(>= 97% test accuracy on digits, >= 80% mIoU on digit scenes) within two minutes on two CPU cores.
Training is deterministic under ``seed`` for a given machine and torch build: the seed fixes the
initial weights, the batch order and the augmentation. The recipe is AdamW with a linear warm-up
and a cosine decay, label smoothing for the classifiers, and random affine jitter of the inputs
(segmentation labels move with their scene; the segmenter also sees freshly drawn training
scenes every epoch). ViTs start from sine-cosine position codes and mimetic attention weights
(see :func:`_prepare`): with the zoo's timm init they do not learn the digits in the budget. The
model kept is the one after the last epoch; the test split is measured once, at the end, and
never steers training.

:func:`cached` is the train-once-per-machine entry point used by the tests: a checkpoint in
``$SLIVER_CACHE`` (default ``<repo>/.sliver-cache``) keyed by model, seed and a hash of the
training code and config, trained when it is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import CheckpointError, DataError, ModelInputError
from ..ir.fileio import sha256_file, write_atomic
from . import data as datasets
from . import trainer
from .zoo import create, entry

__all__ = ["TrainConfig", "TrainResult", "DEFAULTS", "config_for", "train", "evaluate_module",
           "save_checkpoint", "load_checkpoint", "cached", "cached_path", "cache_dir", "code_hash",
           "sincos_position_embedding", "mimetic_attention_init", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "sliver-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; its hash is part of the checkpoint cache key."""

    model: str
    dataset: str = "digits"  # digits | digit-scenes
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    max_shift: float = 3.0  # random translation, in pixels
    max_rotation: float = 10.0  # random rotation, in degrees
    max_scale: float = 0.1  # random zoom in [1 - s, 1 + s]
    fresh_scenes: bool = False  # digit-scenes: draw new training scenes (same digits) every epoch
    vit_init: str = "mimetic"  # ViTs: "mimetic" (sine-cosine positions, mimetic attention) or "zoo"
    seed: int = 0
    threads: int = 2  # torch intra-op threads while training
    train_copies: int = 1  # >1: the training set is that many jittered copies of itself (augmented digits)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


DEFAULTS: dict = {
    "tiny_deit": TrainConfig("tiny_deit", epochs=10, batch_size=32, lr=1e-3),
    "tiny_resnet": TrainConfig("tiny_resnet", epochs=12, lr=2e-3),
    "tiny_mobilenet_v2": TrainConfig("tiny_mobilenet_v2", epochs=15, batch_size=32, lr=3e-3),
    "tiny_vgg": TrainConfig("tiny_vgg", epochs=30, batch_size=32, lr=3e-3, weight_decay=0.0),
    "tiny_segmenter": TrainConfig("tiny_segmenter", dataset="digit-scenes", epochs=24, batch_size=32, lr=3e-3,
                                  weight_decay=0.01, label_smoothing=0.0, max_shift=6.0, max_rotation=0.0,
                                  max_scale=0.0, fresh_scenes=True),
}


def config_for(model: str, **overrides) -> TrainConfig:
    """The default config of ``model`` with ``overrides`` (e.g. ``epochs=5, seed=1``) applied."""
    if model not in DEFAULTS:
        entry(model)  # an unknown zoo name gets the zoo's own error
        raise ModelInputError(f"no training recipe for zoo model {model!r}; trainable: {', '.join(DEFAULTS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ModelInputError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    config = dataclasses.replace(DEFAULTS[model], **{k: v for k, v in overrides.items() if v is not None})
    if config.epochs < 1 or config.batch_size < 1 or config.threads < 1 or config.train_copies < 1:
        raise ModelInputError("epochs, batch_size, threads and train_copies must be positive integers")
    return config


@dataclass
class TrainResult:
    """A trained model (eval mode) with what was measured on it."""

    model: nn.Module
    config: TrainConfig
    metric: str  # "accuracy" or "miou", in percent
    scores: dict  # split -> score in percent ("val", "test")
    train_seconds: float
    losses: list = field(default_factory=list)  # mean training loss per epoch
    val_history: list = field(default_factory=list)  # (epoch, val score) when asked for
    cpu_seconds: float = 0.0  # CPU time of the training loop, all threads (wall time depends on load)
    extra: dict = field(default_factory=dict)  # what extensions report (e.g. tri-level swaps), kept in the checkpoint

    def summary(self) -> str:
        scores = ", ".join(f"{k} {self.metric} {v:.2f}%" for k, v in self.scores.items())
        return (f"{self.config.model} (seed {self.config.seed}): {scores}; trained in {self.train_seconds:.1f} s "
                f"({self.cpu_seconds:.1f} s CPU, {self.config.threads} threads)")


# -- initialisation -----------------------------------------------------------------------------
def sincos_position_embedding(grid: tuple, dim: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D sine-cosine position codes (MAE's layout): half of the
    channels encode the row, half the column, each as sines and cosines of geometric frequencies."""
    if dim % 4:
        raise ModelInputError(f"a 2-D sine-cosine position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def _factor(matrix: torch.Tensor) -> tuple:
    """(left, right) with left @ right == matrix, the singular values split evenly between them."""
    u, sv, vh = torch.linalg.svd(matrix)
    root = sv.sqrt()
    return u * root, root[:, None] * vh


def mimetic_attention_init(attn: nn.Module, gen: torch.Generator, self_weight: float = 0.7,
                           noise: float = 0.7, value_weight: float = 0.4, value_noise: float = 0.4) -> None:
    """Set an attention module's q/k/v/proj weights so that it starts out looking like a trained one.

    Trained ViTs show two patterns: the query-key product W_q^T W_k is close to a positive multiple
    of the identity (a token attends to tokens similar to itself, and with position codes in the
    tokens that means its neighbours), and the value-projection product W_proj W_v is close to a
    negative multiple of it. Drawing the products as ``noise * Z / sqrt(D) + self_weight * I`` and
    ``value_noise * Z / sqrt(D) - value_weight * I`` and factoring them by SVD gives attention
    maps that are local from the first step. The idea and default strengths are from Trockman and
    Kolter, "Mimetic Initialization of Self-Attention Layers" (ICML 2023).
    """
    dim = attn.qkv.in_features
    eye = torch.eye(dim)
    qk = noise * torch.randn(dim, dim, generator=gen) / dim ** 0.5 + self_weight * eye
    left, right = _factor(qk)  # q . k = x^T W_q^T W_k x, so W_q^T = left and W_k = right
    vo = value_noise * torch.randn(dim, dim, generator=gen) / dim ** 0.5 - value_weight * eye
    proj, value = _factor(vo)  # W_proj @ W_v = vo
    with torch.no_grad():
        attn.qkv.weight[:dim] = left.T
        attn.qkv.weight[dim:2 * dim] = right
        attn.qkv.weight[2 * dim:] = value
        attn.proj.weight.copy_(proj)


def _prepare(net: nn.Module, config: TrainConfig) -> nn.Module:
    """Training-recipe changes to the initial values of a freshly built model (never its layout).

    With the zoo's timm-style init a ViT barely learns in a two-minute budget on a thousand
    digits: ``pos_embed`` (std 0.02) is far below the patch embeddings, so tokens hardly know
    where they are, and attention starts uniform, so the CLS token sees only an average. Starting
    from sine-cosine position codes (as MAE does) and mimetic attention weights gives the blocks
    local, position-aware attention from step one (tiny_deit: ~50% -> ~96% val accuracy after 250
    steps). Everything stays trainable; CNNs are left as built.
    """
    if config.vit_init not in ("mimetic", "zoo"):
        raise ModelInputError(f"unknown vit_init {config.vit_init!r}; use mimetic or zoo")
    pos = getattr(net, "pos_embed", None)
    if config.vit_init == "zoo" or not isinstance(pos, nn.Parameter):
        return net
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        pos.zero_()
        pos[0, 1:] = sincos_position_embedding(net.grid_size, pos.shape[-1])
    for module in net.modules():
        if hasattr(module, "qkv") and hasattr(module, "proj") and isinstance(module.qkv, nn.Linear):
            mimetic_attention_init(module, gen)
    return net


# -- augmentation -----------------------------------------------------------------------------
def _random_affine(batch: int, config: TrainConfig, size: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, 2, 3) affine matrices for F.affine_grid: rotation, zoom and translation."""
    u = torch.rand(batch, 4, generator=gen) * 2 - 1  # uniform in [-1, 1)
    angle = u[:, 0] * math.radians(config.max_rotation)
    scale = 1 + u[:, 1] * config.max_scale
    shift = u[:, 2:] * (2 * config.max_shift / size)  # affine_grid's coordinates span 2 per image
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def _augment(images, targets, config: TrainConfig, background: float, gen: torch.Generator):
    """Jitter a batch; pixels that come from outside the image read as background."""
    if not (config.max_shift or config.max_rotation or config.max_scale):
        return images, targets
    theta = _random_affine(images.shape[0], config, images.shape[-1], gen)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + background
    if targets.ndim == 3:  # segmentation: move the labels with the pixels, background outside
        shifted = F.grid_sample((targets[:, None].float() + 1), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[:, 0].long() - 1
        targets = torch.where(shifted < 0, torch.full_like(shifted, datasets.BACKGROUND), shifted)
    return moved, targets


# -- training ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_module(net: nn.Module, dataset: datasets.ImageSet, batch_size: int = 128) -> float:
    """Score (percent) of an eager torch module on ``dataset`` (accuracy or mIoU, by its task)."""
    metric = datasets.metric_for(dataset.task, dataset.num_classes)
    was_training = net.training
    net.eval()
    for images, targets in dataset.batches(batch_size):
        metric.update(net(images), targets)
    net.train(was_training)
    return metric.value()


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: str | TrainConfig, *, progress: bool = True, val_every: int = 0, extensions=(),
          **overrides) -> TrainResult:
    """Train a tiny zoo model from scratch; ``overrides`` change its default config.

    ``val_every=k`` scores the val split every k epochs (shown on the progress bar and kept in
    ``TrainResult.val_history``); it only reads the model, so the weights do not change with it.
    ``extensions`` change what is trained (e.g. Tri-Level sparsity): each may define
    ``prepare(net, epochs) -> net`` (called on the freshly initialised model), ``wrap(source) ->
    source`` (the training examples) and any :mod:`.trainer` hook. The loop is
    :func:`.trainer.fit`, so the recipe runs under ``torchrun`` with DDP as the passes do.
    """
    config = model if isinstance(model, TrainConfig) else config_for(model, **overrides)
    data = {"train": augmented(datasets.load(config.dataset, "train"), config)}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        net = _prepare(create(config.model), config).train()
        for ext in extensions:
            net = ext.prepare(net, config.epochs) if hasattr(ext, "prepare") else net
        gen = torch.Generator().manual_seed(config.seed)
        # only weight matrices decay; norms, biases, position codes and the CLS token do not
        def decays(name, param):
            return param.ndim >= 2 and "pos_embed" not in name and "token" not in name

        decay = [p for n, p in net.named_parameters() if decays(n, p)]
        others = [p for n, p in net.named_parameters() if not decays(n, p)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": others, "weight_decay": 0.0}], lr=config.lr)
        size = len(data["train"])
        background = float(data["train"].images.min())

        def fetch(index):  # the batch's examples, jittered with the run's generator
            train_set = data["train"]
            return _augment(train_set.images[index], train_set.targets[index], config, background, gen)

        source = trainer.Source(size, lambda epoch: torch.randperm(len(data["train"]), generator=gen), fetch,
                                config.batch_size, drop_last=True)  # drop the ragged last batch
        for ext in extensions:
            source = ext.wrap(source) if hasattr(ext, "wrap") else source
        recipe = _Recipe(config, data, opt, source.steps(0))
        val_set = datasets.load(config.dataset, "val") if val_every else None
        val_history = []

        def validate(epoch: int, loss: float) -> None:
            if val_every and (epoch + 1) % val_every == 0:
                val_history.append((epoch + 1, evaluate_module(net, val_set)))
                print(f"{config.model} epoch {epoch + 1}: val {val_history[-1][1]:.2f}", file=sys.stderr, flush=True)

        recipe.end_epoch = validate
        t0, cpu0 = time.perf_counter(), time.process_time()
        losses = trainer.fit(net, source, opt, epochs=config.epochs, what=f"training {config.model}",
                             hooks=[recipe, *extensions], label_smoothing=config.label_smoothing,
                             progress=_progress(f"train {config.model}", progress))
        train_seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        net.eval()
        scores = {split: evaluate_module(net, datasets.load(config.dataset, split)) for split in ("val", "test")}
    finally:
        torch.set_num_threads(saved_threads)
    metric = "accuracy" if data["train"].task == "classification" else "miou"
    extra = {}
    for ext in extensions:
        extra.update(ext.report() if hasattr(ext, "report") else {})
    return TrainResult(net, config, metric, scores, train_seconds, losses, val_history, cpu_seconds, extra)


def augmented(train_set: datasets.ImageSet, config: TrainConfig) -> datasets.ImageSet:
    """The training set as ``config.train_copies`` copies: the first as it is, each other one
    jittered once by the recipe's random affine (drawn from a generator seeded by the config's
    seed), so a larger "augmented digits" set has distinct examples. Online jitter still applies."""
    if config.train_copies == 1:
        return train_set
    gen = torch.Generator().manual_seed(10007 * config.seed + 17)
    background = float(train_set.images.min())
    images, targets = [train_set.images], [train_set.targets]
    for _ in range(config.train_copies - 1):
        x, y = _augment(train_set.images, train_set.targets, config, background, gen)
        images.append(x)
        targets.append(y)
    return datasets.ImageSet(f"{train_set.name}x{config.train_copies}", train_set.task, torch.cat(images),
                             torch.cat(targets), train_set.num_classes, train_set.class_names, dict(train_set.meta))


class _Recipe:
    """Trainer hooks of the zoo recipe: linear warm-up then cosine learning rate per step, and
    fresh digit scenes every epoch when the config asks for them."""

    def __init__(self, config: TrainConfig, data: dict, opt, steps_per_epoch: int) -> None:
        self.config, self.data, self.opt = config, data, opt
        self.total = steps_per_epoch * config.epochs
        self.warmup = int(config.warmup_epochs * steps_per_epoch)
        self.step = 0

    def start_epoch(self, epoch: int) -> None:
        config = self.config
        if config.fresh_scenes and epoch > 0:
            if config.dataset != "digit-scenes":
                raise ModelInputError("fresh_scenes needs dataset digit-scenes")
            self.data["train"] = datasets.more_digit_scenes("train", len(self.data["train"]),
                                                            seed=config.seed * 10007 + epoch)

    def before_batch(self, batch) -> None:
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.step, self.total, self.warmup, self.config.lr)
        self.step += 1


def _progress(desc: str, enabled: bool):
    """A progress callable for the trainer (one tqdm bar per epoch), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    def bar(iterable, label: str = "", total: int | None = None):
        return tqdm(iterable, desc=f"{desc} {label.split()[-1]}", total=total, unit="step", leave=False,
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)

    return bar


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(result: TrainResult, path: str | os.PathLike) -> str:
    """Write ``result`` to ``path`` atomically: state_dict, config, scores, training time."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": result.config.model,
        "config": result.config.describe(),
        "state_dict": result.model.state_dict(),
        "metric": result.metric,
        "scores": dict(result.scores),
        "train_seconds": result.train_seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "losses": list(result.losses),
        "code_hash": code_hash(result.config),
        "extra": dict(result.extra),
        "torch_version": str(torch.__version__),
    }
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(path))
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple:
    """(model in eval mode, checkpoint dict) from a file written by :func:`save_checkpoint`.

    The file is read with ``torch.load(weights_only=True)``: only tensors and plain data are
    unpickled, so a checkpoint that would run code when loaded is refused, never executed.
    Anything that is not an intact sliver checkpoint whose weights fit its zoo model raises
    :class:`~sliver.ir.errors.CheckpointError`."""
    import pickle

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"no such checkpoint: {path}; write one with tools/train.py MODEL --out {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; give the .pt file tools/train.py wrote")
    retrain = f"retrain it with tools/train.py MODEL --out {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain data; loading it could run code, "
                f"so sliver refuses it (checkpoints are read with weights_only=True): {retrain}") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt, or a pickle of Python "
                              f"objects); {retrain}") from None
    except Exception:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated); {retrain}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a sliver checkpoint (format {CHECKPOINT_FORMAT}); retrain with tools/train.py")
    state = checkpoint.get("state_dict")
    if not isinstance(checkpoint.get("model"), str) or not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} lacks the model name or its state_dict of tensors; {retrain}")
    net = create(checkpoint["model"])
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
                   or state[k].dtype != expected[k].dtype)
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected
                else f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)} {state[wrong[0]].dtype}")
        raise CheckpointError(f"the weights in {path} do not fit zoo model {checkpoint['model']!r} ({what}); {retrain}")
    net.load_state_dict(state)
    return net.eval(), checkpoint


def trained_for(model: str, dataset: str, seed: int = 0, *, progress: bool = False):
    """``model`` (a zoo model with a training recipe) in eval mode with its trained weights
    (:func:`cached`), to be run on the named set ``dataset``: a model trained on digits is not
    run on digit scenes or the other way round (small digits share the digits' 32x32 input)."""
    config = config_for(model, seed=seed)
    if dataset in ("digits", "digit-scenes") and dataset != config.dataset:
        raise ModelInputError(f"{model} is trained on {config.dataset}; use --data {config.dataset}")
    net, _ = cached(model, seed=seed, progress=progress)
    return net.eval()


# -- the per-machine cache --------------------------------------------------------------------
def cache_dir() -> str:
    """``$SLIVER_CACHE`` if set, else ``.sliver-cache`` at the repository root (a source checkout,
    as ``make setup`` installs it), else ``~/.cache/sliver``."""
    env = os.environ.get("SLIVER_CACHE")
    if env:
        return os.path.abspath(env)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(repo, "pyproject.toml")):
        return os.path.join(repo, ".sliver-cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "sliver")


def code_hash(config: TrainConfig) -> str:
    """A short hash of what decides the trained weights: the config, this module, the data module,
    the zoo and the source of the model's class, and the torch version."""
    h = hashlib.sha256()
    h.update(repr(sorted(config.describe().items())).encode())
    h.update(torch.__version__.encode())
    builder = entry(config.model).builder
    for module in (sys.modules[__name__], trainer, datasets, sys.modules[create.__module__],
                   inspect.getmodule(builder)):
        with open(inspect.getsourcefile(module), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_path(config: TrainConfig) -> str:
    """Where :func:`cached` keeps the checkpoint of ``config``:
    ``<cache_dir>/<model>-seed<seed>-<code_hash>.pt``."""
    return os.path.join(cache_dir(), f"{config.model}-seed{config.seed}-{code_hash(config)}.pt")


def cached(model: str, seed: int = 0, *, progress: bool = False, **overrides) -> tuple:
    """(model in eval mode, checkpoint dict): trained once per machine and reused afterwards.

    The key is the model, the seed and :func:`code_hash` (config, training and data code, model
    source, torch version), so a change to any of them trains afresh and a stale checkpoint is
    never used. Processes that need the same entry at once take turns on a lock file: one trains,
    the others wait and load its result. An entry is checked against the SHA-256 recorded beside
    it (``<entry>.sha256``) and loaded with ``weights_only=True``; a corrupt entry is set aside as
    ``<entry>.corrupt`` and trained again.
    """
    config = config_for(model, seed=seed, **overrides)
    path = cached_path(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        if os.path.exists(path):
            try:
                return _load_cache_entry(path)
            except DataError as e:
                import warnings

                warnings.warn(f"sliver: the cached checkpoint {path} is corrupt ({e}); training it again",
                              RuntimeWarning, stacklevel=2)
                os.replace(path, path + ".corrupt")
        save_checkpoint(train(config, progress=progress), path)
        write_atomic(path + ".sha256", (sha256_file(path) + "\n").encode())
        return _load_cache_entry(path)


def _load_cache_entry(path: str) -> tuple:
    """Load a cache entry after checking it against its recorded SHA-256 (an entry from before
    hashes were recorded gets one once it loads)."""
    digest = path + ".sha256"
    actual = sha256_file(path)
    if os.path.exists(digest):
        with open(digest) as f:
            recorded = f.read().strip()
        if recorded != actual:
            raise CheckpointError(f"{path} does not match its recorded SHA-256 (altered or truncated)")
        return load_checkpoint(path)
    loaded = load_checkpoint(path)
    write_atomic(digest, (actual + "\n").encode())
    return loaded


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive advisory lock (flock) on ``path`` for the duration of the block."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
