"""AppMul emulation: sum_v f_v(A) @ 1[W == v] is bit-exact against a per-product LUT gather,
the exact multiplier reproduces integer arithmetic, and bias compensation removes the mean error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sliver.ir.errors import PassError
from sliver.passes.appmul import library as L
from sliver.passes.appmul.emulate import AppMulLayer


@pytest.fixture(scope="module")
def lib():
    return L.load()


def _gather_conv(layer, x_int, table):
    """Reference: every product looked up in the LUT, one by one (unfold + gather)."""
    lo = layer.low
    ph, pw = layer.padding
    xp = F.pad(x_int.to(torch.int64), (pw, pw, ph, ph))
    kh, kw = layer.weight_int.shape[2:]
    g = layer.groups
    out = []
    cin = xp.shape[1] // g
    oc = layer.weight_int.shape[0] // g
    for gi in range(g):
        cols = F.unfold(xp[:, gi * cin : (gi + 1) * cin].double(), (kh, kw), stride=layer.stride).long()
        w = layer.weight_int[gi * oc : (gi + 1) * oc].reshape(oc, -1)
        out.append(table[cols.unsqueeze(1) - lo, w[None, :, :, None] - lo].sum(2))
    b = x_int.shape[0]
    y = torch.cat(out, 1)
    h = (x_int.shape[2] + 2 * ph - kh) // layer.stride[0] + 1
    return y.reshape(b, -1, h, y.shape[-1] // h)


@pytest.mark.parametrize("name,groups,stride", [("s5_truncated_k3", 1, 2), ("s4_log_t1", 2, 1), ("s6_broken_h2_v6", 1, 1)])
def test_conv_decomposition_is_bit_exact(lib, name, groups, stride):
    torch.manual_seed(0)
    m = lib[name]
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups)
    layer = AppMulLayer(conv, m.bits, 0.05)
    layer.set_multiplier(m)
    x_int = layer.quantize_input(torch.randn(2, 4, 7, 7) * 0.3)
    got = layer.accumulate(x_int)
    want = _gather_conv(layer, x_int, torch.from_numpy(m.table))
    assert torch.equal(got.to(torch.int64), want)
    # the padding goes through the multiplier as a = 0 (not necessarily 0 for approximate designs)
    assert got.dtype == torch.float32


def test_bit_factor_plan_matches_the_lookup_for_every_library_multiplier(lib):
    """The emulation computes bilinear multipliers by the lowering's bit-factor plan (exact product
    plus error parts, one product) instead of one product per weight value: bit-exact against
    the per-product lookup for every multiplier of the library, on a padded, strided, dilated
    convolution and a linear layer; the logarithmic ones have no plan and keep the decomposition."""
    torch.manual_seed(3)
    planned = 0
    for m in lib:
        name = m.name
        if m.is_exact or not m.signed:
            continue
        conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=1)
        layer = AppMulLayer(conv, m.bits, 0.05)
        layer.set_multiplier(m)
        x_int = layer.quantize_input(torch.randn(2, 3, 9, 9) * 0.4)
        table = torch.from_numpy(m.table)
        has_plan = layer._plan() is not None
        assert has_plan == (not name.startswith(f"s{m.bits}_log")), name
        planned += has_plan
        got = layer.accumulate(x_int)
        assert torch.equal(got.to(torch.int64), _gather_conv(layer, x_int, table)), name
        assert got.dtype == layer._dtype(int(table.abs().max()) + 1)  # the dtype the dequantisation multiplies
        lin = AppMulLayer(nn.Linear(11, 4), m.bits, 0.05)
        lin.set_multiplier(m)
        x_int = lin.quantize_input(torch.randn(3, 11))
        want = table[x_int.long().unsqueeze(-2) - m.low, lin.weight_int[None] - m.low].sum(-1)
        assert torch.equal(lin.accumulate(x_int).to(torch.int64), want), name
    assert planned >= 20


def test_linear_decomposition_is_bit_exact(lib):
    torch.manual_seed(1)
    m = lib["s8_log_t5"]
    layer = AppMulLayer(nn.Linear(24, 5), 8, 0.02)
    layer.set_multiplier(m)
    x_int = layer.quantize_input(torch.randn(3, 4, 24))
    table = torch.from_numpy(m.table)
    want = table[x_int.long().unsqueeze(-2) - m.low, layer.weight_int[None, None] - m.low].sum(-1)
    assert torch.equal(layer.accumulate(x_int).to(torch.int64), want)


def test_exact_multiplier_is_integer_arithmetic(lib):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = AppMulLayer(conv, 6, 0.1)
    x = torch.randn(2, 3, 6, 6)
    x_int = layer.quantize_input(x)
    plain = layer.accumulate(x_int)
    assert torch.equal(plain, layer.accumulate(x_int, decompose=True))
    want = F.conv2d(x_int.double(), layer.weight_int.double(), None, 1, 1)
    assert torch.equal(plain.double(), want)
    # forward = dequantised integer conv plus bias; close to the float conv at 6 bits
    y = layer(x)
    ref = want * (0.1 * layer.weight_scale.double()).view(1, -1, 1, 1) + conv.bias.detach().double().view(1, -1, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert (y - conv(x)).abs().max() < 0.1 * conv(x).abs().max()


def test_compensation_removes_the_mean_error(lib):
    torch.manual_seed(3)
    m = lib["s6_truncated_k5"]
    layer = AppMulLayer(nn.Linear(32, 16), 6, 0.05)
    x = torch.randn(512, 32)
    x_int = layer.quantize_input(x)
    hist = np.bincount((x_int.long() - layer.low).reshape(-1).numpy(), minlength=64)
    layer.act_hist = hist / hist.sum()
    exact = layer.accumulate(x_int)
    layer.set_multiplier(m)
    raw_err = (layer.accumulate(x_int) - exact).mean(0)
    layer.set_multiplier(m, compensate=True)
    comp_err = (layer(x) - layer.bias) / (layer.act_scale * layer.weight_scale) - exact
    assert raw_err.abs().mean() > 20
    assert comp_err.mean(0).abs().mean() < 0.1 * raw_err.abs().mean()


def test_mismatched_multiplier_is_a_typed_error(lib):
    layer = AppMulLayer(nn.Linear(4, 4), 5, 0.1)
    with pytest.raises(PassError, match="s5_"):
        layer.set_multiplier(lib["s6_exact"])
    with pytest.raises(PassError, match="2..8"):
        AppMulLayer(nn.Linear(4, 4), 9, 0.1)
