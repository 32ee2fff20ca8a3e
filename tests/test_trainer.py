"""The one trainer (sliver.models.trainer): seeded order, hooks, the divergence check, the loss
report, and two-process DDP training under torchrun (gloo, CPU) ending with equal weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sliver.ir.errors import PassError
from sliver.models import data, trainer
from sliver.passes.infra.context import PassContext

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(out_dir, *args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "ddp_worker.py"), str(out_dir), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_end_with_equal_weights(tmp_path):
    torchrun(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 2  # averaged over both ranks
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
    torch.manual_seed(0)  # rank 0's initial weights: training moved them
    from sliver.models import create
    init = create("tiny_resnet").state_dict()
    assert any(not torch.equal(init[n], v) for n, v in r0["state"].items() if v.is_floating_point())


def test_rapq_quantisation_aware_epochs_under_two_processes(tmp_path):
    """rapq's quantisation-aware epochs under torchrun (gloo): both ranks end on the same integers."""
    torchrun(tmp_path, "rapq")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 2
    ints = [n for n in r0["state"] if n.endswith("weight_int")]
    assert len(ints) == 13
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name


def test_shards_cover_the_order_once_per_rank(monkeypatch):
    src = trainer.tensor_source(torch.arange(10.0)[:, None], torch.arange(10), 4, seed=3)
    full = src.shard(0)
    parts = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(trainer, "world", lambda rank=rank: (rank, 3))
        s = trainer.tensor_source(torch.arange(10.0)[:, None], torch.arange(10), 4, seed=3)
        parts.append(s.shard(0))
    assert [len(p) for p in parts] == [4, 4, 4]  # 10 padded to 12 by the order's head
    assert sorted(torch.cat(parts).tolist()) == sorted(full.tolist() + full[:2].tolist())


def test_order_matches_the_seeded_loader_and_phases_differ():
    train = data.digits("train").take(50)
    src = trainer.source(train, 16, seed=5)
    got = torch.cat([b.y for b in src.batches(1)])
    want = torch.cat([y for _, y in train.loader(16, shuffle=True, seed=6)])
    assert torch.equal(got, want)
    other = trainer.source(train, 16, seed=5, phase="fine-tune")
    assert not torch.equal(other.shard(1), src.shard(1))


def test_hooks_teacher_and_report():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    net, teacher = nn.Linear(8, 3), nn.Linear(8, 3)
    calls = []

    class Hook:
        def start_epoch(self, e): calls.append(("start", e))
        def extra_loss(self): return net.weight.abs().sum() * 0.0 + 1.0  # adds exactly 1 to the loss
        def after_backward(self): calls.append("backward")
        def after_step(self):
            net.bias.zero_()  # a projection after the step
        def end_epoch(self, e, loss):
            calls.append(("end", e))
            return e == 1  # stop after two epochs

    ctx = PassContext(seed=0)
    ctx._begin(type("P", (), {"name": "demo"})())
    losses = trainer.fit(net, trainer.tensor_source(x, y, 16), torch.optim.SGD(net.parameters(), lr=0.1),
                         epochs=5, phase="demo", hooks=[Hook()], teacher=teacher, distill=0.5, ctx=ctx)
    assert len(losses) == 2 and calls.count("backward") == 8 and ("end", 1) in calls and ("start", 2) not in calls
    assert all(loss > 1.0 for loss in losses)
    assert torch.equal(net.bias, torch.zeros(3)) and not net.training
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert ctx.recorded("train_loss") == {"demo": [round(v, 4) for v in losses]}


def test_divergence_is_one_line_pass_error():
    net = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    ctx = PassContext()
    ctx._begin(type("P", (), {"name": "demo"})())
    with pytest.raises(PassError, match=r"^demo fine-tuning diverged .*lower lr$"):
        trainer.fit(net, trainer.tensor_source(x, y, 4), torch.optim.SGD(net.parameters(), lr=1.0), epochs=1,
                    what="fine-tuning", loss=lambda m, b: m(b.x).sum() * float("inf"), ctx=ctx)
