"""The tolerance rule of fastvit_kernels.accuracy: where it passes and where it fails."""

import pytest
import torch

from fastvit_kernels.accuracy import TOLERANCES, compare, compare_fwd_bwd


def test_fp32_elementwise_atol_plus_rtol():
    ref = torch.tensor([0.0, 10.0, -3.0])
    tol = TOLERANCES[torch.float32]
    scale = 10.0  # max(1, max|ref|)
    just_in = ref + torch.tensor([tol["atol"] * scale, tol["atol"] * scale + tol["rtol"] * 10.0, 0.0]) * 0.99
    assert compare(just_in, ref).ok
    # the relative allowance of the large entry does not carry over to the zero entry
    out = ref + torch.tensor([tol["atol"] * scale * 1.5, 0.0, 0.0])
    c = compare(out, ref, name="y")
    assert not c.ok and 1.4 < c.ratio < 1.6 and c.message.startswith("y: max error")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_twice_torchs_error(dtype):
    ref = torch.zeros(4)
    lowp = torch.tensor([0.0, 0.1, 0.0, 0.0])  # torch's own error: 0.1
    atol = TOLERANCES[dtype]["atol"]
    assert compare(torch.tensor([0.0, 0.2 + 0.9 * atol, 0.0, 0.0]).to(dtype), ref, lowp).ok is True
    c = compare(torch.tensor([0.0, 0.0, 0.25 + atol, 0.0]).to(dtype), ref, lowp)
    assert not c.ok and c.ratio > 1 and "torch's" in c.message
    assert compare(torch.tensor([0.0, 0.0, 0.25 + atol, 0.0]).to(dtype), ref, lowp, factor=3.0).ok
    with pytest.raises(ValueError, match="needs ref_lowp"):
        compare(ref.to(dtype), ref)


def test_non_finite_and_shape_mismatch_fail():
    ref = torch.zeros(3)
    assert not compare(torch.tensor([0.0, float("nan"), 0.0]), ref).ok
    c = compare(torch.zeros(2), ref)
    assert not c.ok and "shape" in c.message


def test_compare_fwd_bwd_checks_every_gradient():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    ref = lambda x, w: x @ w  # noqa: E731
    _, results = compare_fwd_bwd(ref, ref, [x, w], torch.float32, ["x", "w"])
    assert [r.name for r in results] == ["output", "grad x", "grad w"] and all(r.ok for r in results)
    # a wrong gradient for w only: the forward and grad x still pass
    def wrong_w(x, w):  # forward x @ w (the added term is exactly 0) with grad w doubled
        return x @ w.detach() + x.detach() @ (2 * w - 2 * w.detach())
    _, results = compare_fwd_bwd(wrong_w, ref, [x, w], torch.float32, ["x", "w"])
    assert [r.ok for r in results] == [True, True, False]
    # an input the reference gets no gradient for must get none
    _, results = compare_fwd_bwd(lambda x, w: x @ w, lambda x, w: x @ w.detach(), [x, w], torch.float32, ["x", "w"])
    assert results[-1].name == "grad w" and not results[-1].ok and "should be None" in results[-1].message
