"""trilevel: Tri-Level E-ViT (examples, tokens, attention connections): the forgetting counter and
the swap on constructed histories, the mask's row counts, the static model (ONNX, TVM, FPGA
skipped work), a short fine-tune through the pass, and two-process DDP with one swap decision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_trainer import torchrun

from sliver import backends, ir, models, passes
from sliver.ir.errors import PipelineError
from sliver.models import data
from sliver.models.forgetting import ForgettingSampler, forgetting_events, swap_schedule
from sliver.passes.tokens.trilevel import connection_mask, ratio_at


def test_forgetting_events_on_a_constructed_history():
    # rows: presentations (epochs); columns: examples; -1 = not presented
    history = torch.tensor([
        [1, 0, 1, 0, -1, 1],
        [0, 0, 1, 1, -1, 1],
        [1, 0, 0, 0, 1, -1],
        [0, 0, 1, 1, 0, 0],
    ])
    # ex0: 1->0 twice; ex1: never right -> 4 presentations; ex2: one drop; ex3: 1->0 once (row 1->2);
    # ex4: presented twice, 1->0 once; ex5: 1,1,(absent),0 -> one drop across the gap
    assert forgetting_events(history).tolist() == [2, 4, 1, 1, 1, 1]


def test_swap_removes_the_least_forgotten_and_keeps_the_size():
    s = ForgettingSampler(20, holdout=0.25, remove=0.1, seed=0)
    active = torch.nonzero(s.active).flatten()
    pool = set(torch.nonzero(~s.active).flatten().tolist())
    assert len(active) == 15 and len(pool) == 5 and s.count == 2
    # epochs of records: every active example right then wrong (one event) except two that stay right
    # (no event, the unforgettable ones) and one never right (maximum)
    steady, never = active[3].item(), active[7].item()
    steady2 = active[11].item()
    for epoch in range(3):
        right = torch.tensor([epoch % 2 == 0] * len(active))
        right[active == steady] = True
        right[active == steady2] = True
        right[active == never] = False
        s.record(active, right)
        s.close_epoch()
    counts = s.counts()
    assert counts[steady] == 0 and counts[steady2] == 0 and counts[never] == 3
    assert all(counts[i] == 1 for i in active.tolist() if i not in (steady, steady2, never))
    swap = s.swap(epoch=3)
    assert sorted(swap["removed"]) == sorted([steady, steady2])
    assert len(swap["added"]) == 2 and set(swap["added"]) <= pool
    assert int(s.active.sum()) == 15  # constant training-set size
    assert not s.active[steady] and not s.active[steady2]  # the removed ones joined the pool
    assert set(torch.nonzero(~s.active).flatten().tolist()) == (pool - set(swap["added"])) | {steady, steady2}
    assert s.history == [] and int(s.counts().sum()) == 0  # statistics reset


def test_wrapped_source_reads_only_active_examples():
    x, y = torch.arange(20.0)[:, None], torch.arange(20)
    from sliver.models import trainer
    s = ForgettingSampler(20, holdout=0.25, remove=0.1, seed=1)
    src = s.wrap(trainer.tensor_source(x, y, 4, seed=0))
    seen = torch.cat([b.index for b in src.batches(0)])
    assert sorted(seen.tolist()) == sorted(torch.nonzero(s.active).flatten().tolist())


def test_schedules_scale_with_the_epochs():
    assert swap_schedule(300, 0.1, 0.5) == (30, 60, 90, 120, 150)  # the released code's swap epochs
    assert swap_schedule(10, 0.1, 0.5) == (1, 2, 3, 4, 5)
    assert ratio_at(5, 0.7, 10, 110) == 1.0 and ratio_at(110, 0.7, 10, 110) == 0.7
    assert ratio_at(60, 0.7, 10, 110) == pytest.approx(0.85)  # half way down the cosine


def test_mask_rows_keep_their_top_k_and_cls():
    torch.manual_seed(0)
    attn = torch.rand(2, 9, 9).softmax(dim=-1)
    mask = connection_mask(attn, 3)
    assert mask.shape == (2, 10, 10)
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, :, 0] == 1)  # CLS row and column
    assert torch.all(mask[:, 1:, 1:].sum(dim=-1) == 3)  # k per patch row, exactly
    top = attn.topk(3, dim=-1).indices
    assert torch.all(torch.gather(mask[:, 1:, 1:], 2, top) == 1)


def test_bad_options_are_one_line_errors():
    with pytest.raises(PipelineError, match="remove"):
        passes.parse("trilevel{remove=0.3 holdout=0.2}")
    with pytest.raises(PipelineError, match="attn"):
        passes.parse("trilevel{attn=0}")


def _expected_skipped(n0=64, heads=4, head_dim=16, depth=12, blocks=(3, 6, 9), keep=0.7, attn=0.3):
    """MACs a sparse kernel skips: in every block after the first pruning block, Q.K^T and A.V over
    rows = M + 1 tokens keep ceil(mean kept per row) of the rows keys."""
    total, m, k = 0, n0, None
    for i in range(depth):
        if k is not None:
            rows = m + 1
            kept = math.ceil(((m + 1) + m * (k + 1)) / rows)
            total += 2 * heads * rows * head_dim * (rows - kept)
        if i in blocks:
            m = math.ceil(keep * m)
            k = math.ceil(attn * m)
    return total


def test_static_model_counts_and_fpga_skips_masked_connections():
    from sliver.backends import fpga

    torch.manual_seed(0)
    prog = ir.trace(models.create("tiny_deit").eval(), torch.zeros(1, 3, 32, 32), name="tiny_deit")
    result = passes.parse("trilevel{epochs=0}").run(prog, lower_to="onnx")
    assert result.report.steps[0].notes["tokens"] == [
        {"block": 3, "kept": 45, "attn_kept_per_row": 14}, {"block": 6, "kept": 32, "attn_kept_per_row": 10},
        {"block": 9, "kept": 23, "attn_kept_per_row": 7}]
    ops = [n.op_type for n in result.program.module.graph.node]
    assert ops.count("TopK") == 6 and ops.count("ScatterElements") == 3
    report = fpga.cost(result.program)
    assert report.skipped_macs == _expected_skipped()
    tokens_only = fpga.cost(passes.parse("trilevel{epochs=0 attn=1}").run(prog, lower_to="onnx").program)
    assert tokens_only.skipped_macs == 0
    assert report.macs == tokens_only.macs - report.skipped_macs  # the mask removes exactly those


@pytest.mark.slow
def test_static_model_builds_with_tvm_within_1e_4():
    torch.manual_seed(0)
    prog = ir.trace(models.create("tiny_deit").eval(), torch.zeros(2, 3, 32, 32), name="tiny_deit")
    spec = "trilevel{epochs=0 blocks=3,6,9}"
    onnx_prog = passes.parse(spec).run(prog, lower_to="onnx").program
    torch_prog = passes.parse(spec).run(prog).program
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    artifact = backends.tvm.build(onnx_prog)
    np.testing.assert_allclose(artifact.run([x])[0], torch_prog.run([x])[0], atol=1e-4, rtol=0)


def test_fine_tune_pass_swaps_examples_and_keeps_the_set_size():
    torch.manual_seed(0)
    prog = ir.trace(models.create("tiny_deit").eval(), torch.zeros(1, 3, 32, 32), name="tiny_deit")
    train = data.digits("train").take(96)
    spec = ("trilevel{epochs=2 batch_size=32 blocks=2,5 remove=0.1 holdout=0.25 swap_every=0.5 swap_until=1 "
            "warmup=0 ramp=0.5}")
    result = passes.parse(spec).run(prog, data={"train": train}, check=False)
    notes = result.report.steps[0].notes
    assert notes["swaps"] == [{"epoch": 1, "swapped": 10}] and notes["active_examples"] == 72
    assert len(notes["train_loss"]["fine-tune"]) == 2
    x = torch.zeros(1, 3, 32, 32)
    assert result.program.module(x).shape == (1, 10)


def test_two_processes_take_the_same_swap_decisions(tmp_path):
    torchrun(tmp_path, "trilevel")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["swaps"] == r1["swaps"] and [s["epoch"] for s in r0["swaps"]] == [1, 2]
    assert all(len(s["removed"]) == len(s["added"]) == 19 for s in r0["swaps"])
    assert torch.equal(r0["active"], r1["active"]) and int(r0["active"].sum()) == 144
    # the statistics were gathered over both ranks: every active example has a record on both
    assert torch.equal(r0["history"], r1["history"])
    assert torch.all(r0["history"][:, r0["active"]] >= 0)
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
