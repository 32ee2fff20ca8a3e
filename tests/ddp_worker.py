"""Worker of the two-process trainer tests, started by ``torch.distributed.run`` (torchrun):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py OUT_DIR [trilevel|rapq]

Each rank trains the zoo's tiny ResNet (plain) or tiny DeiT (``trilevel``: tri-level sparsity
with example swaps) on a few digits through :func:`sliver.models.trainer.fit` under gloo, or
(``rapq``) runs ``rapq`` with quantisation-aware epochs on the tiny ResNet through the pass
manager, and writes ``OUT_DIR/rank<r>.pt`` with its final weights, loss history and (trilevel)
swap decisions.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from sliver.models import create, data, trainer

    train_set = data.digits("train").take(192)
    extra = {}
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    if mode == "trilevel":
        from sliver.passes.tokens.trilevel import TriLevel, TriLevelTraining

        options = TriLevel(keep=0.7, attn=0.5, remove=0.1, blocks=(1, 2), holdout=0.25, swap_every=0.34,
                                  swap_until=1.0, warmup=0.0, ramp=0.5).options
        tri = TriLevelTraining(options, seed=0)
        net = tri.prepare(create("tiny_deit"), 3)
        source = tri.wrap(trainer.source(train_set, 32, seed=0))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses = trainer.fit(net, source, opt, epochs=3, hooks=[tri])
        extra = {"swaps": tri.sampler.swaps, "active": tri.sampler.active.clone(),
                 "history": torch.stack(tri.sampler.history)}
    elif mode == "rapq":
        from sliver import ir, passes

        torch.manual_seed(0)  # every rank quantises the same model, as every rank of a real job does
        net = create("tiny_resnet").eval()
        prog = ir.trace(net, train_set.images[:1], name="tiny_resnet")
        res = passes.parse("rapq{wbits=4 abits=4 calib_images=16 iters=0 epochs=2 batch_size=32}").run(
            prog, data=train_set, check=False)
        net = res.program.module
        losses = res.report.steps[-1].notes["train_loss"]["quantisation-aware"]
    else:
        net = create("tiny_resnet")
        gen = torch.Generator().manual_seed(7)  # the same masks on every rank
        masks = {n: (torch.rand(p.shape, generator=gen) > 0.5).float() for n, p in net.named_parameters()
                 if p.ndim == 4}
        params = dict(net.named_parameters())

        class Masks:  # exercises an after-step hook under DDP
            def after_step(self):
                for n, m in masks.items():
                    params[n].mul_(m)

        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        losses = trainer.fit(net, trainer.source(train_set, 32, seed=0), opt, epochs=2, hooks=[Masks()])
    torch.save({"state": net.state_dict(), "losses": losses, "world": dist.get_world_size(), **extra},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain")
