"""layernorm_linear and linear_residual on the Triton path against the fp32 eager reference: outputs and all
gradients, odd row counts (1, 197, 2 * 197), widths not a power of two, no-bias variants, awkward incoming
gradients, determinism, input checks and opcheck."""

import pytest
import torch

from fastvit_kernels.ops import layernorm_linear, linear_residual
from fastvit_kernels.reference import layernorm_linear_ref, linear_residual_ref
from helpers import DTYPES_INTERPRETER, assert_fwd_bwd_deterministic, assert_fwd_bwd_match, fwd_bwd

LN_NAMES = ["x", "norm_weight", "norm_bias", "weight", "bias"]
RES_NAMES = ["x", "weight", "bias", "residual"]


def ln_inputs(B, N, D, N_out, device, bias=True, scale=1.0):
    return [
        scale * torch.randn(B, N, D, device=device) + 0.5,  # mean != 0: the prologue must subtract it
        1 + 0.1 * torch.randn(D, device=device),
        0.1 * torch.randn(D, device=device),
        torch.randn(N_out, D, device=device) / D**0.5,
        0.1 * torch.randn(N_out, device=device) if bias else None,
    ]


def res_inputs(B, N, K, N_out, device, bias=True):
    return [
        torch.randn(B, N, K, device=device),
        torch.randn(N_out, K, device=device) / K**0.5,
        0.1 * torch.randn(N_out, device=device) if bias else None,
        torch.randn(B, N, N_out, device=device),
    ]


def ln_op(*args, **kw):
    return layernorm_linear(*args, backend="triton", **kw)


def res_op(*args, **kw):
    return linear_residual(*args, backend="triton", **kw)


# (B, N, D, N_out): M = 1, 197, 2 * 197 rows; D in {64, 96, 80}; N_out = 3 * D (qkv) or D (proj)
SHAPES = [(1, 1, 64, 192), (1, 197, 96, 96), (2, 197, 80, 240)]


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("B,N,D,N_out", SHAPES)
def test_layernorm_linear_matches_reference(B, N, D, N_out, dtype, device):
    inputs = ln_inputs(B, N, D, N_out, device)
    assert_fwd_bwd_match(ln_op, layernorm_linear_ref, inputs, dtype, LN_NAMES)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("B,N,D,N_out", SHAPES)
def test_linear_residual_matches_reference(B, N, D, N_out, dtype, device):
    inputs = res_inputs(B, N, D, N_out, device)
    assert_fwd_bwd_match(res_op, linear_residual_ref, inputs, dtype, RES_NAMES)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_no_bias(dtype, device):
    assert_fwd_bwd_match(ln_op, layernorm_linear_ref, ln_inputs(2, 17, 80, 240, device, bias=False), dtype,
                         LN_NAMES)
    assert_fwd_bwd_match(res_op, linear_residual_ref, res_inputs(2, 17, 80, 80, device, bias=False), dtype,
                         RES_NAMES)


def test_large_magnitude_input(device):
    out = assert_fwd_bwd_match(ln_op, layernorm_linear_ref, ln_inputs(1, 17, 64, 192, device, scale=30.0),
                               torch.float32, LN_NAMES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op,ref,make,names", [(ln_op, layernorm_linear_ref, ln_inputs, LN_NAMES),
                                               (res_op, linear_residual_ref, res_inputs, RES_NAMES)])
def test_expanded_and_noncontiguous_grads(op, ref, make, names, device):
    inputs = make(2, 17, 48, 144, device)
    cpu = [None if t is None else t.cpu() for t in inputs]
    # out.sum().backward() hands the op an expanded (stride-0) gradient
    for g in (None, torch.randn(144, 17, 2, device=device).permute(2, 1, 0)):  # then a transposed view
        assert g is None or not g.is_contiguous()
        _, grads = fwd_bwd(op, inputs, g)
        _, ref_grads = fwd_bwd(ref, cpu, None if g is None else g.cpu())
        for n, a, r in zip(names, grads, ref_grads):
            torch.testing.assert_close(a.cpu(), r, atol=2e-5, rtol=2e-4, msg=lambda m: f"{n}: {m}")


def test_noncontiguous_inputs(device):
    # x and residual as transposed views (copied to rows by the op), weight transposed
    x = torch.randn(64, 17, 2, device=device).permute(2, 1, 0)
    res = torch.randn(96, 17, 2, device=device).permute(2, 1, 0)
    w = torch.randn(64, 96, device=device).t()
    b = torch.randn(96, device=device)
    torch.testing.assert_close(res_op(x, w, b, res), linear_residual_ref(x, w, b, res), atol=2e-5, rtol=2e-4)
    nw, nb = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.testing.assert_close(ln_op(x, nw, nb, w, b), layernorm_linear_ref(x, nw, nb, w, b), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("op,make", [(ln_op, ln_inputs), (res_op, res_inputs)])
def test_deterministic(op, make, device):
    assert_fwd_bwd_deterministic(op, make(2, 50, 64, 192, device), torch.randn(2, 50, 192, device=device))


def test_torch_backend_is_the_reference(device):
    inputs = ln_inputs(2, 5, 32, 96, device)
    torch.testing.assert_close(layernorm_linear(*inputs, backend="torch"), layernorm_linear_ref(*inputs),
                               atol=0, rtol=0)
    inputs = res_inputs(2, 5, 32, 32, device)
    torch.testing.assert_close(linear_residual(*inputs, backend="torch"), linear_residual_ref(*inputs),
                               atol=0, rtol=0)


def test_bad_inputs_raise_before_launch(device):
    x, nw, nb, w, b = ln_inputs(1, 3, 32, 96, device)
    with pytest.raises(ValueError, match=r"weight must have shape \(N_out, D=32\); got \(96, 31\)"):
        ln_op(x, nw, nb, w[:, :31], b)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(D=32,\); got \(5,\)"):
        ln_op(x, nw[:5], nb, w, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(N_out=96,\); got \(95,\)"):
        ln_op(x, nw, nb, w, b[:95])
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        ln_op(x, nw, nb, w.half(), b)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ln_op(x.long(), nw, nb, w, b)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ln_op(x, nw, nb, w, b, eps=0.0)
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        ln_op(x[0, 0], nw, nb, w, b)
    x, w, b, r = res_inputs(1, 3, 32, 48, device)
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 3, 48\) .*; got \(1, 3, 32\)"):
        res_op(x, w, b, r[..., :32])
    with pytest.raises(ValueError, match=r"weight must have shape \(N_out, K=32\); got \(32, 48\)"):
        res_op(x, w.t(), b, r)
    with pytest.raises(ValueError, match="residual has dtype torch.float16 but x has dtype torch.float32"):
        res_op(x, w, b, r.half())
    if device == "cpu":
        with pytest.raises(TypeError, match="Triton interpreter does not support bfloat16"):
            res_op(x.bfloat16(), w.bfloat16(), b.bfloat16(), r.bfloat16())


def test_opcheck(device):
    from fastvit_kernels.ops.linear import _layernorm_linear_fwd, _linear_residual_fwd

    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    x, nw, nb, w, b = ln_inputs(1, 5, 16, 48, device)
    args = (x.reshape(5, 16).requires_grad_(), nw.requires_grad_(), nb.requires_grad_(), w.requires_grad_(),
            b.requires_grad_(), 1e-6)
    torch.library.opcheck(_layernorm_linear_fwd, args, test_utils=utils)
    x, w, b, r = res_inputs(1, 5, 16, 24, device)
    args = (x.reshape(5, 16).requires_grad_(), w.requires_grad_(), b.requires_grad_(),
            r.reshape(5, 24).requires_grad_())
    torch.library.opcheck(_linear_residual_fwd, args, test_utils=utils)
    torch.library.opcheck(_linear_residual_fwd, (args[0], args[1], None, args[3]), test_utils=utils)


def _rms_ref(x, nw, nb, w, b):
    return layernorm_linear_ref(x, nw, nb, w, b, 1e-6, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("norm_bias", [False, True])
def test_rmsnorm_linear_matches_reference(norm_bias, dtype, device):
    """norm="rmsnorm" (AIMv2's norm1 + qkv): timm's RmsNorm has no bias; a bias is accepted too."""
    inputs = ln_inputs(2, 17, 80, 240, device)
    if not norm_bias:
        inputs[2] = None
    assert_fwd_bwd_match(lambda *a: ln_op(*a, norm="rmsnorm"), _rms_ref, inputs, dtype, LN_NAMES)


def test_bad_norm_raises(device):
    with pytest.raises(ValueError, match="norm must be"):
        ln_op(*ln_inputs(1, 5, 64, 192, device), norm="batchnorm")
