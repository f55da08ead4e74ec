"""attention_block (x + proj(MSA(LayerNorm(x))) as one op) on the Triton path: output and every gradient against
the fp32 eager reference (odd token counts, head_dim 80, D not a power of two, no biases), bit-identity with the
three ops it fuses, one launch fewer than they take, input checks, opcheck and torch.compile."""

import collections

import pytest
import torch

from fastvit_kernels.ops import attention, attention_block, layernorm_linear, linear_residual
from fastvit_kernels.reference import attention_ref, layernorm_linear_ref, linear_residual_ref
from helpers import (DTYPES_INTERPRETER, assert_fwd_bwd_deterministic, assert_fwd_bwd_match, count_launches,
                     fwd_bwd)

NAMES = ["x", "norm_weight", "norm_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias"]


def block_inputs(B, N, D, device, bias=True):
    return [
        torch.randn(B, N, D, device=device) + 0.5,
        1 + 0.1 * torch.randn(D, device=device),
        0.1 * torch.randn(D, device=device),
        torch.randn(3 * D, D, device=device) / D**0.5,
        0.1 * torch.randn(3 * D, device=device) if bias else None,
        torch.randn(D, D, device=device) / D**0.5,
        0.1 * torch.randn(D, device=device) if bias else None,
    ]


def ref(x, nw, nb, wq, bq, wp, bp, num_heads, scale=None, eps=1e-6):
    """timm's attention half, composed from the eager reference pieces."""
    o = attention_ref(layernorm_linear_ref(x, nw, nb, wq, bq, eps), num_heads, scale)
    return linear_residual_ref(o, wp, bp, x)


def op(*args, **kw):
    return attention_block(*args, backend="triton", **kw)


def three_ops(x, nw, nb, wq, bq, wp, bp, num_heads, scale=None, eps=1e-6, *, backend=None):
    """The attention half as the three public ops attention_block fuses."""
    qkv = layernorm_linear(x, nw, nb, wq, bq, eps, backend=backend)
    return linear_residual(attention(qkv, num_heads, scale, backend=backend), wp, bp, x, backend=backend)


# (B, N, D, H): N = 1, 17, 197 tokens; head_dim 32, 80 (ViT-H's) with D = 160 not a power of two, 64
SHAPES = [(2, 1, 64, 2), (1, 17, 160, 2), (2, 197, 64, 1)]


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("B,N,D,H", SHAPES)
def test_matches_reference(B, N, D, H, dtype, device):
    assert_fwd_bwd_match(op, ref, block_inputs(B, N, D, device), dtype, NAMES, num_heads=H)


def test_no_biases_and_custom_scale(device):
    inputs = block_inputs(2, 17, 64, device, bias=False)
    assert_fwd_bwd_match(op, ref, inputs, torch.float32, NAMES, num_heads=2, scale=0.3, eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_same_bits_as_the_three_ops_and_one_launch_fewer(dtype, device, monkeypatch):
    """The fused op runs the same kernels in the same order: output and weight gradients bit-identical to
    layernorm_linear -> attention -> linear_residual (dx too in fp32; in fp16 it is rounded once instead of
    twice); its backward has no separate gradient-accumulation add (the
    LayerNorm backward adds the residual's gradient), so it launches exactly one kernel fewer."""
    inputs = block_inputs(2, 17, 64, device)
    g = torch.randn(2, 17, 64, device=device)
    with count_launches(monkeypatch) as counts:
        out, grads = fwd_bwd(op, inputs, g, dtype, num_heads=2)
        fused = collections.Counter(counts)
        out3, grads3 = fwd_bwd(three_ops, inputs, g, dtype, num_heads=2, backend="triton")
        three = counts - fused
    assert torch.equal(out, out3)
    for name, a, b in zip(NAMES, grads, grads3):
        if name == "x" and dtype != torch.float32:
            # the fused LayerNorm backward adds dY in fp32 and rounds once; the three ops round, then add in fp16
            torch.testing.assert_close(a, b, atol=1e-3, rtol=2 * torch.finfo(dtype).eps)
        else:
            assert torch.equal(a, b), name
    # kernels only (the custom ops' own dispatches are not launches)
    fused, three = ({k: v for k, v in c.items() if not k.startswith("fastvit.")} for c in (fused, three))
    assert fused["_attention_fwd_kernel"] == 1 and fused["_layernorm_bwd_kernel"] == 1, fused
    diff = collections.Counter(three) - collections.Counter(fused)
    assert dict(diff) == {"aten.add": 1} and not collections.Counter(fused) - collections.Counter(three), (fused, three)


def test_deterministic(device):
    assert_fwd_bwd_deterministic(op, block_inputs(2, 50, 64, device), torch.randn(2, 50, 64, device=device),
                                 num_heads=2)


def test_torch_backend_is_the_reference(device):
    inputs = block_inputs(2, 5, 32, device)
    assert torch.equal(attention_block(*inputs, 2, backend="torch"), ref(*inputs, 2))


def test_bad_inputs_raise_before_launch(device, monkeypatch):
    import importlib

    mod = importlib.import_module("fastvit_kernels.ops.attention_block")  # the module (ops exports the function)

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(mod, "_attention_block_fwd", no_launch)
    x, nw, nb, wq, bq, wp, bp = block_inputs(1, 3, 32, device)
    with pytest.raises(ValueError, match=r"qkv_weight must have shape \(3\*D=96, D=32\); got \(96, 31\)"):
        op(x, nw, nb, wq[:, :31], bq, wp, bp, 2)
    with pytest.raises(ValueError, match=r"qkv_bias must have shape \(3\*D=96,\); got \(95,\)"):
        op(x, nw, nb, wq, bq[:95], wp, bp, 2)
    with pytest.raises(ValueError, match=r"proj_weight must have shape \(D=32, D=32\); got \(32, 31\)"):
        op(x, nw, nb, wq, bq, wp[:, :31], bp, 2)
    with pytest.raises(ValueError, match=r"proj_bias must have shape \(D=32,\); got \(3,\)"):
        op(x, nw, nb, wq, bq, wp, bp[:3], 2)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(D=32,\); got \(5,\)"):
        op(x, nw[:5], nb, wq, bq, wp, bp, 2)
    with pytest.raises(ValueError, match="D divisible by num_heads=3; got"):
        op(x, nw, nb, wq, bq, wp, bp, 3)
    with pytest.raises(ValueError, match="head_dim=4"):
        op(x, nw, nb, wq, bq, wp, bp, 8)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        op(x, nw, nb, wq, bq, wp, bp, 2.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        op(x, nw, nb, wq, bq, wp, bp, 2, scale=0.0)
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\) with N >= 1; got \(3, 32\)"):
        op(x[0], nw, nb, wq, bq, wp, bp, 2)
    with pytest.raises(ValueError, match="eps must be > 0"):
        op(x, nw, nb, wq, bq, wp, bp, 2, eps=0.0)
    with pytest.raises(ValueError, match="proj_weight has dtype torch.float16 but x has dtype torch.float32"):
        op(x, nw, nb, wq, bq, wp.half(), bp, 2)
    if device == "cpu":
        with pytest.raises(TypeError, match="Triton interpreter does not support bfloat16"):
            op(*[t.bfloat16() for t in (x, nw, nb, wq, bq, wp, bp)], 2)


def test_opcheck(device):
    from fastvit_kernels.ops.attention_block import _attention_block_fwd

    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    x, nw, nb, wq, bq, wp, bp = [t.requires_grad_() for t in block_inputs(1, 5, 16, device)]
    torch.library.opcheck(_attention_block_fwd, (x, nw, nb, wq, bq, wp, bp, 2, 8**-0.5, 1e-6), test_utils=utils)
    torch.library.opcheck(_attention_block_fwd, (x, nw, nb, wq, None, wp, None, 2, 8**-0.5, 1e-6),
                          test_utils=utils)


def test_compile_fullgraph(device):
    inputs = block_inputs(1, 5, 16, device)

    def f(*a):
        return op(*a, num_heads=2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, grads = fwd_bwd(compiled, inputs)
    out_e, grads_e = fwd_bwd(f, inputs)
    assert torch.equal(out, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_e))
