"""poly-act: HeatViT's polynomial GELU/exp and piecewise-linear sigmoid under fixed point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sliver import backends, ir, passes
from sliver.passes.quant.poly_act import approximation_errors, fixed_point, poly_exp, poly_gelu, poly_softmax, pwl_sigmoid


def test_forms_at_known_points():
    x = torch.tensor([0.0, 1.0, -1.0, 3.0, -3.0, 5.0, 7.0], dtype=torch.float64)
    assert pwl_sigmoid(x, 0).tolist() == [0.5, 0.75, 0.25, 3 / 32 + 27 / 32, 1 - (3 / 32 + 27 / 32), 1.0, 1.0]
    assert poly_exp(torch.tensor([0.0], dtype=torch.float64), 0).item() == pytest.approx(0.3585 * 1.353**2 + 0.344)
    # exp(-k ln2) = 2^-k exactly up to the quadratic's value at p = 0
    ln2 = np.log(2.0)
    e = poly_exp(torch.tensor([-3 * ln2], dtype=torch.float64), 0).item()
    assert e == pytest.approx((0.3585 * 1.353**2 + 0.344) / 8, rel=1e-9)
    # GELU: the erf approximation saturates at |u| >= 1.769
    assert poly_gelu(torch.tensor([4.0], dtype=torch.float64), 0).item() == pytest.approx(4.0)
    assert poly_gelu(torch.tensor([-4.0], dtype=torch.float64), 0).item() == pytest.approx(0.0)
    assert poly_gelu(torch.tensor([4.0], dtype=torch.float64), 0, d1=0.5).item() == pytest.approx(3.0)


def test_fixed_point_grid():
    x = torch.tensor([0.03, 0.04, 7.99, 100.0, -100.0])
    # 8 bits over [-8, 8): 4 fractional bits, step 1/16, saturating at -128/16 and 127/16
    assert fixed_point(x, 8, 8.0).tolist() == [0.0, 0.0625, 8 - 1 / 16, 127 / 16, -8.0]
    assert torch.equal(fixed_point(x, 0, 8.0), x)


def test_error_over_the_operating_range():
    exact_inputs = approximation_errors(0)
    assert exact_inputs["gelu"]["max_abs_error"] < 0.02 and exact_inputs["gelu"]["mean_abs_error"] < 0.004
    assert exact_inputs["exp"]["max_abs_error"] < 0.0025
    assert exact_inputs["sigmoid"]["max_abs_error"] < 0.02
    eight_bit = approximation_errors(8)
    # 8-bit inputs add at most half a step (1/32 for GELU) times the slope; the mean stays small
    assert eight_bit["gelu"]["max_abs_error"] <= 0.0625 + 1e-9 and eight_bit["gelu"]["mean_abs_error"] < 0.011
    for name in ("gelu", "exp", "sigmoid"):
        assert eight_bit[name]["mean_abs_error"] >= exact_inputs[name]["mean_abs_error"] - 1e-12


def test_softmax_rows_sum_to_d2():
    x = torch.randn(3, 7, 9) * 4
    for d2 in (1.0, 0.5):
        s = poly_softmax(x, -1, 0, d2)
        torch.testing.assert_close(s.sum(-1), torch.full((3, 7), d2), atol=1e-6, rtol=0)
        assert (s - d2 * F.softmax(x, -1)).abs().max() < 0.01


class UserNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.act = torch.nn.GELU()

    def forward(self, x):
        y = self.act(self.fc(x))
        return torch.sigmoid(y) + F.softmax(y, dim=-1) + F.gelu(x)


def test_replaces_modules_functions_and_attention_softmax(make_program):
    res = passes.parse("poly-act").run(ir.trace(UserNet(), torch.randn(2, 8)))
    assert res.report.steps[0].notes["replaced"] == {"gelu": 2, "softmax": 1, "sigmoid": 1}
    vit = passes.parse("poly-act{bits=8}").run(make_program("tiny_deit"))
    notes = vit.report.steps[0].notes
    assert notes["replaced"] == {"gelu": 12, "softmax": 12, "sigmoid": 0}
    assert set(notes["errors"]) == {"gelu", "exp", "sigmoid"}
    assert 0 < vit.report.steps[0].max_abs_diff < 0.5  # lossy: reported, not enforced


def test_exports_and_builds_with_tvm_after_evit(make_program):
    """poly-act quantises attention, so CLS scores tie: torch, ONNX Runtime and TVM must still
    choose the same tokens (ONNX TopK's rule: lower index first)."""
    result = passes.parse("evit,poly-act").run(make_program("tiny_deit"), lower_to="onnx")
    onnx_prog = result.program
    torch_prog = passes.parse("evit,poly-act").run(make_program("tiny_deit")).program
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = torch_prog.run([x])[0]
    np.testing.assert_allclose(onnx_prog.run([x])[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(backends.tvm.build(onnx_prog).run([x])[0], ref, atol=1e-4, rtol=0)


def test_bad_options():
    from sliver.ir import errors

    with pytest.raises(errors.OptionValueError, match="bits=20 must lie in 0..16"):
        passes.parse("poly-act{bits=20}")
    with pytest.raises(errors.OptionValueError, match="d1 and d2"):
        passes.parse("poly-act{d1=0}")


def test_fixed_point_rounds_alike_with_and_without_gradients_and_passes_them_through():
    x = torch.linspace(-5.0, 5.0, 1001)
    plain = fixed_point(x, 8, 4.0)
    xg = x.clone().requires_grad_(True)
    y = fixed_point(xg, 8, 4.0)
    assert torch.equal(y.detach(), plain)  # the same grid values, bit for bit
    y.sum().backward()
    inside = (x >= -4.0) & (x < 4.0 - 2.0 ** -4)  # saturated values get no gradient
    assert torch.equal(xg.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(xg.grad[x > 4.1], torch.zeros(int((x > 4.1).sum())))
