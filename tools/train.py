#!/usr/bin/env python3
"""Train a tiny zoo model on sliver's digit data sets and write a checkpoint.

    python tools/train.py tiny_deit --out build/tiny_deit.pt
    python tools/train.py tiny_segmenter --epochs 30 --seed 1 --out build/seg.pt
    python tools/train.py --list
    python tools/train.py tiny_deit --sparsity "trilevel{keep=0.7 attn=0.3 remove=0.05 blocks=3,6,9}"
    torchrun --nproc-per-node 2 tools/train.py tiny_deit --out build/tiny_deit.pt   # DDP (gloo on CPUs)

``--sparsity`` trains with Tri-Level E-ViT's example, token and attention sparsity (the options of
the ``trilevel`` pass; its schedules are scaled to the run's epochs); the checkpoint holds plain
weights, and ``trilevel{epochs=0 ...}`` with the same options gives the trained model its static
form for compiling. ``--train-copies N`` trains on N jittered copies of the training set (augmented
digits), e.g. for timing. Under ``torchrun`` every process trains its shard with
DistributedDataParallel and rank 0 writes the checkpoint.

The checkpoint (written atomically) holds the state_dict, the full training config, the measured
val and test score (accuracy or mIoU, percent) and the training time; load it with
``sliver.models.training.load_checkpoint``. Without ``--out`` it goes to the per-machine cache
(``$SLIVER_CACHE`` or ``.sliver-cache/``) under the key the tests use, so they reuse it.

Errors exit with code 2 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Train a tiny sliver zoo model on the digit data sets.")
    p.add_argument("model", nargs="?", help="tiny zoo model: tiny_deit, tiny_resnet, tiny_mobilenet_v2, "
                                            "tiny_vgg or tiny_segmenter")
    p.add_argument("--epochs", type=int, help="training epochs (default: the model's recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and augmentation (default 0)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the model's recipe)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the model's recipe)")
    p.add_argument("--threads", type=int, help="torch threads while training (default: the recipe's, 2)")
    p.add_argument("--out", help="checkpoint path (default: the per-machine cache)")
    p.add_argument("--val-every", type=int, default=0, help="score the val split every N epochs")
    p.add_argument("--list", action="store_true", help="list the models and their default recipes, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sparsity", help='training-time sparsity, e.g. "trilevel{keep=0.7 attn=0.3 remove=0.05}"')
    p.add_argument("--train-copies", type=int, help="train on N jittered copies of the training set (default 1)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sliver.ir.errors import ModelInputError, SliverError
    from sliver.models import training

    try:
        if args.list:
            for name, config in training.DEFAULTS.items():
                print(f"{name:<20}{json.dumps(config.describe())}")
            return 0
        if not args.model:
            raise ModelInputError(f"no MODEL given; trainable: {', '.join(training.DEFAULTS)}")
        overrides = {"epochs": args.epochs, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
                     "threads": args.threads, "train_copies": args.train_copies}
        config = training.config_for(args.model, **overrides)
        extensions = sparsity_extensions(args.sparsity, config.seed)
        if extensions and not args.out:
            raise ModelInputError("--sparsity needs --out: the per-machine cache holds dense recipes only")
        out = args.out or training.cached_path(config)
        if os.path.isdir(out):
            raise ModelInputError(f"--out {out} is a directory; give a file path such as {out}/{args.model}.pt")
        with distributed():
            result = training.train(config, progress=not args.quiet, val_every=args.val_every,
                                    extensions=extensions)
            if args.sparsity:
                result.extra["sparsity"] = args.sparsity
            path = training.save_checkpoint(result, out) if rank() == 0 else out
    except SliverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if rank() == 0:
        print(f"{result.summary()}\nwrote {path}")
    return 0


def sparsity_extensions(spec, seed: int) -> list:
    """The trainer extensions of a ``--sparsity`` spec (today: one ``trilevel{...}``)."""
    if not spec:
        return []
    from sliver import passes
    from sliver.ir.errors import PipelineError
    from sliver.passes.tokens.trilevel import TriLevel, TriLevelTraining

    steps = passes.parse(spec).passes
    if len(steps) != 1 or not isinstance(steps[0], TriLevel):
        raise PipelineError(f"--sparsity {spec!r}: give one trilevel{{...}} (the training-time method sliver has)")
    return [TriLevelTraining(steps[0].options, seed=seed)]


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class distributed:
    """Under torchrun (WORLD_SIZE > 1 in the environment): a process group for the run (gloo:
    the CPU, where the zoo recipe trains), destroyed afterwards; otherwise nothing."""

    def __enter__(self):
        import torch.distributed as dist

        self.started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.started:
            dist.init_process_group("gloo")  # the zoo recipe trains on the CPU
        return self

    def __exit__(self, *exc):
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
        return False


if __name__ == "__main__":
    sys.exit(main())
