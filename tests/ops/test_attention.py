"""fastvit_kernels.ops.attention: the Triton path (interpreter on the CPU) against the eager reference.

Forward and d(qkv) are held to a float64 run of ``reference.attention_ref``; fp16 uses the flash-attention 2x rule
(tests/helpers.py) with ``ref_lowp`` = the same reference run in fp16 by PyTorch (CPU fp16 matmul, softmax and
their autograd work in torch 2.x, and at these sizes they are fast). Shapes cover sequence tails (N = 1, 2, 17, 50,
197, 257), full tiles (N = 16, 32, 64: the EVEN_N path), every supported head dim (the chunked ones 40, 48, 72, 80,
88, 96 included) and the packed layout with H > 1, without the full cross product so the file runs in well under a
minute under the interpreter. The host-side tile logic (head-dim chunks, N alignment, autotune candidates) is tested
directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvit_kernels.ops.attention import attention, attention_flops
from fastvit_kernels.reference import attention_ref
from tests.helpers import TOLERANCES, assert_close_to_ref

F32, F16 = torch.float32, torch.float16


def _triton_run(qkv: torch.Tensor, num_heads: int, dout: torch.Tensor | None, scale=None):
    """Forward (and backward with ``dout``, or out.sum() when dout is None) through the Triton path."""
    x = qkv.detach().clone().requires_grad_()
    out = attention(x, num_heads, scale, backend="triton")
    if dout is None:
        out.sum().backward()
    else:
        out.backward(dout)
    return out.detach(), x.grad


def _ref_run(qkv: torch.Tensor, num_heads: int, dout: torch.Tensor | None, scale=None, dtype=torch.float64):
    """The reference's forward and d(qkv) in ``dtype`` on the same inputs."""
    x = qkv.detach().to(dtype).requires_grad_()
    out = attention_ref(x, num_heads, scale)
    if dout is None:
        out.sum().backward()
    else:
        out.backward(dout.to(dtype))
    return out.detach(), x.grad


def _check_against_ref(qkv, num_heads, dout=None, scale=None):
    out, dqkv = _triton_run(qkv, num_heads, dout, scale)
    assert out.dtype == qkv.dtype and dqkv.dtype == qkv.dtype
    ref_out, ref_dqkv = _ref_run(qkv, num_heads, dout, scale)
    low_out = low_dqkv = None
    if qkv.dtype != F32:
        low_out, low_dqkv = _ref_run(qkv, num_heads, dout, scale, dtype=qkv.dtype)
    assert_close_to_ref(out, ref_out, low_out, name="out")
    assert_close_to_ref(dqkv, ref_dqkv, low_dqkv, name="dqkv")
    return out, dqkv


# (B, N, H, head_dim, dtype): every N in {1, 2, 17, 50, 64, 197, 257}, B 1 and 2, H 1 and 2 appear with both dtypes;
# every supported head dim appears at least once (fp16: 32 .. 96, all split into chunks except 32 / 64); N = 16 / 32
# / 64 are whole tiles (the EVEN_N specialisation), 197 and 257 the ViT tails (257 = 4 tiles + 1 row).
CASES = [
    (1, 1, 1, 64, F32),
    (2, 2, 2, 80, F32),
    (1, 17, 2, 48, F32),
    (2, 50, 1, 80, F32),
    (1, 197, 2, 64, F32),
    (2, 64, 2, 80, F32),
    (1, 32, 1, 32, F32),
    (1, 257, 1, 88, F32),
    (1, 197, 1, 72, F32),
    (1, 64, 1, 128, F32),
    (2, 1, 2, 80, F16),
    (1, 2, 1, 64, F16),
    (2, 17, 1, 32, F16),
    (1, 50, 2, 64, F16),
    (1, 197, 1, 80, F16),
    (1, 16, 2, 48, F16),
    (2, 32, 1, 80, F16),
    (1, 257, 1, 72, F16),
    (1, 257, 2, 80, F16),
    (2, 17, 1, 88, F16),
    (1, 64, 1, 40, F16),
    (1, 2, 2, 96, F16),
]


@pytest.fixture(params=["split", "fused"])
def bwd_plan(request, monkeypatch):
    """Run the test under each backward launch plan (kernels/attention.py: three launches, or one program per
    (batch, head)), whatever B * H the test uses."""
    from fastvit_kernels.kernels import attention as kernels

    monkeypatch.setattr(kernels, "FUSED_BWD_MIN_HEADS", 1 if request.param == "fused" else 1 << 30)
    return request.param


@pytest.mark.parametrize("B,N,H,head_dim,dtype", CASES, ids=[f"B{c[0]}-N{c[1]}-H{c[2]}-hd{c[3]}-{str(c[4])[6:]}"
                                                             for c in CASES])
def test_forward_backward_match_reference(device, B, N, H, head_dim, dtype, bwd_plan):
    qkv = torch.randn(B, N, 3 * H * head_dim, device=device, dtype=dtype)
    dout = torch.randn(B, N, H * head_dim, device=device, dtype=dtype)
    _check_against_ref(qkv, H, dout)


@pytest.mark.parametrize("head_dim", [32, 40, 48, 64, 72, 80, 88, 96, 128])
def test_every_supported_head_dim(device, head_dim):
    qkv = torch.randn(1, 17, 3 * 2 * head_dim, device=device, dtype=F32)
    dout = torch.randn(1, 17, 2 * head_dim, device=device, dtype=F32)
    _check_against_ref(qkv, 2, dout)


def test_lse_is_log2_sum_exp(device):
    """The saved statistic: lse[b, h, i] = logsumexp_j(scale * q_i . k_j) * log2(e), fp32, (B, H, N)."""
    B, N, H, hd, scale = 2, 17, 2, 80, 0.2
    qkv = torch.randn(B, N, 3 * H * hd, device=device)
    out, lse = torch.ops.fastvit.attention_fwd(qkv, H, scale)
    q, k, _ = qkv.double().reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.logsumexp(scale * q @ k.transpose(-2, -1), dim=-1) / math.log(2.0)
    assert lse.shape == (B, H, N) and lse.dtype == F32
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out, attention_ref(qkv, H, scale), **TOLERANCES[F32])


@pytest.mark.parametrize("dtype", [F32, F16])
def test_expanded_output_grad(device, dtype):
    """out.sum().backward() delivers an expanded (stride 0) grad; the op must make it dense."""
    qkv = torch.randn(2, 17, 3 * 2 * 64, device=device, dtype=dtype)
    _check_against_ref(qkv, 2, dout=None)


def test_transposed_output_grad(device):
    B, N, H, hd = 2, 17, 2, 48
    qkv = torch.randn(B, N, 3 * H * hd, device=device)
    dout = torch.randn(B, H * hd, N, device=device).transpose(1, 2)  # (B, N, D) with column stride N
    assert dout.stride(-1) != 1
    _check_against_ref(qkv, H, dout)


def test_strided_qkv_inputs(device):
    """A qkv with a padded row stride (used as is) and one with a non-unit column stride (copied)."""
    B, N, H, hd = 2, 17, 2, 40
    D = H * hd
    dout = torch.randn(B, N, D, device=device)
    wide = torch.randn(B, N, 3 * D + 24, device=device)[:, :, 5:5 + 3 * D]  # stride(1) = 3 * D + 24
    assert wide.stride(-1) == 1 and not wide.is_contiguous()
    _check_against_ref(wide, H, dout)
    transposed = torch.randn(B, 3 * D, N, device=device).transpose(1, 2)
    assert transposed.stride(-1) != 1
    _check_against_ref(transposed, H, dout)


def test_row_offsets_past_2_31_elements(device):
    """Row offsets ``row * stride_n`` past 2**31 elements, forward and both backward plans (delta pre-pass, dK / dV,
    dQ, fused). A sequence-first qkv view ``(N, B, 3 * D).transpose(0, 1)`` has stride_n = B * 3 * D; here
    stride_n = 2**30, so row 2 of qkv, out and dout starts at element 2**31 while every factor fits in int32. The
    views live in one fp16 buffer of 2**32 + 80 elements (8 GiB of address space; only the rows written here are
    touched, so little is committed), starting at element 2**31: an offset wrapped in int32 arithmetic (row 2 ->
    -2**31) still lands inside the buffer, on elements the test never wrote, so the old int32 code computed wrong
    values instead of faulting. Each result must equal the same kernels' on contiguous copies of the rows (bit for
    bit under the interpreter; to the dtype's tolerance on a GPU, where the strides specialise separate builds)."""
    from fastvit_kernels.kernels.attention import attention_bwd, attention_fwd

    N, H, hd = 3, 1, 16
    D, row, start = H * hd, 2**30, 2**31
    buf = torch.empty(start + (N - 1) * row + 5 * D, device=device, dtype=F16)

    def view(col: int, width: int) -> torch.Tensor:  # (1, N, width) at columns [col, col + width) of each row
        return torch.as_strided(buf, (1, N, width), (N * row, row, 1), start + col)

    qkv, out_v, dout_v = view(0, 3 * D), view(3 * D, D), view(4 * D, D)
    assert qkv.storage_offset() + (N - 1) * qkv.stride(1) == 2**32 > 2**31 > qkv.stride(1)
    qkv.copy_(torch.randn(1, N, 3 * D, device=device))
    dout_v.copy_(torch.randn(1, N, D, device=device))
    qkv_c, dout_c = qkv.contiguous(), dout_v.contiguous()
    scale = hd**-0.5

    out_c, lse_c = attention_fwd(qkv_c, H, scale)
    out, lse = attention_fwd(qkv, H, scale)
    same = torch.equal if device == "cpu" else (lambda a, b: torch.allclose(a, b, **TOLERANCES[a.dtype]))
    assert same(out, out_c) and same(lse, lse_c)
    assert same(attention(qkv, H, backend="triton"), out_c)  # the op passes such a view to the kernels as is
    ref = attention_ref(qkv_c.double(), H, scale)
    assert_close_to_ref(out, ref, attention_ref(qkv_c, H, scale), name="out")

    out_v.copy_(out_c)
    for fused in (False, True):
        dqkv = attention_bwd(dout_v, qkv, out_v, lse_c, H, scale, fused=fused)
        dqkv_c = attention_bwd(dout_c, qkv_c, out_c, lse_c, H, scale, fused=fused)
        assert same(dqkv, dqkv_c), f"fused={fused}"
    del qkv, out_v, dout_v, buf  # the views hold the buffer: release all of them


@pytest.mark.parametrize("dtype", [F32, F16])
def test_bit_identical_repeats(device, dtype, bwd_plan):
    qkv = torch.randn(2, 50, 3 * 2 * 80, device=device, dtype=dtype)
    dout = torch.randn(2, 50, 2 * 80, device=device, dtype=dtype)
    out1, dqkv1 = _triton_run(qkv, 2, dout)
    out2, dqkv2 = _triton_run(qkv, 2, dout)
    assert torch.equal(out1, out2)
    assert torch.equal(dqkv1, dqkv2)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on any inf / NaN formed in numpy
@pytest.mark.parametrize("head_dim,negative", [(64, False), (80, False), (64, True)])
def test_large_magnitude_fp32(device, head_dim, negative, bwd_plan):
    """|x| ~ 30: scores reach ~1e3-1e4, the softmax is nearly one-hot, and fp32 itself loses ~1e-4 relative.

    ``negative``: q > 0 and k < 0, so every score is about -1e4 (log-sum-exp far below 0); with N = 50 the
    padded keys of the last tile would give exp2(0 - lse) = inf in the backward unless they are masked.

    Outputs and grads must stay finite; their error against float64 is held to 4x PyTorch's own fp32 error on the
    same inputs (plus the fp32 atol): near-ties between huge scores make both implementations' errors erratic,
    and FlashAttention's recompute P = exp2(s - lse) adds one rounding of |lse| ~ 1e4 that the eager softmax
    does not have, so the 2x factor of the low-precision rule is too tight by a seed-dependent margin.
    """
    B, N, H = 2, 50, 2
    qkv = 30.0 * torch.randn(B, N, 3 * H * head_dim, device=device)
    if negative:
        D = H * head_dim
        qkv[..., :D].abs_()
        qkv[..., D:2 * D] = -qkv[..., D:2 * D].abs()
    dout = torch.randn(B, N, H * head_dim, device=device)
    out, dqkv = _triton_run(qkv, H, dout)
    ref_out, ref_dqkv = _ref_run(qkv, H, dout)
    f32_out, f32_dqkv = _ref_run(qkv, H, dout, dtype=F32)
    for name, a, r, t in (("out", out, ref_out, f32_out), ("dqkv", dqkv, ref_dqkv, f32_dqkv)):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - r).abs().max().item()
        base = (t.double() - r).abs().max().item()
        bound = 4.0 * base + TOLERANCES[F32]["atol"] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (torch fp32 error {base:.3e})"


@pytest.mark.parametrize("scale", [0.3, 1])
def test_custom_scale(device, scale):
    qkv = torch.randn(2, 17, 3 * 2 * 64, device=device)
    dout = torch.randn(2, 17, 2 * 64, device=device)
    out, _ = _check_against_ref(qkv, 2, dout, scale=scale)
    default = attention(qkv, 2, backend="triton")
    assert not torch.allclose(out, default), "scale had no effect"


def test_opcheck_custom_ops(device):
    qkv = torch.randn(1, 5, 3 * 32, device=device)
    torch.library.opcheck(torch.ops.fastvit.attention_fwd.default, (qkv, 1, 0.3))
    out, lse = torch.ops.fastvit.attention_fwd(qkv, 1, 0.3)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastvit.attention_bwd.default, (dout, qkv, out, lse, 1, 0.3))


def test_torch_compile_fullgraph(device):
    """The op traces as one graph (custom op + fake + autograd); aot_eager needs no C++/CUDA compiler here."""
    qkv = torch.randn(2, 17, 3 * 2 * 48, device=device)
    dout = torch.randn(2, 17, 2 * 48, device=device)
    x = qkv.clone().requires_grad_()
    compiled = torch.compile(lambda t: attention(t, 2, backend="triton"), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward(dout)
    ref_out, ref_dqkv = _triton_run(qkv, 2, dout)
    assert torch.equal(out.detach(), ref_out)
    assert torch.equal(x.grad, ref_dqkv)


def test_autocast_casts_to_fp16(device):
    qkv = torch.randn(1, 17, 3 * 64, device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=F16):
        out = attention(qkv, 1, backend="triton")
    assert out.dtype == F16
    assert torch.equal(out, attention(qkv.half(), 1, backend="triton"))


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_torch_backend_is_the_reference(device, dtype):
    qkv = torch.randn(2, 17, 3 * 2 * 48, device=device, dtype=dtype)
    assert torch.equal(attention(qkv, 2, backend="torch"), attention_ref(qkv, 2))
    assert torch.equal(attention(qkv, 2, 0.7, backend="torch"), attention_ref(qkv, 2, 0.7))


BAD_INPUTS = [
    # (qkv shape, dtype, num_heads, scale, error, message fragment)
    ((2, 17, 3, 64), F32, 1, None, ValueError, "3-D"),
    ((17, 192), F32, 1, None, ValueError, "3-D"),
    ((1, 5, 100), F32, 1, None, ValueError, "D divisible by num_heads=1"),
    ((1, 5, 300), F32, 3, None, ValueError, "D divisible by num_heads=3; got (1, 5, 300)"),
    ((1, 5, 390), F32, 1, None, ValueError, "head_dim=130"),
    ((1, 5, 216), F32, 2, None, ValueError, "head_dim=36"),
    ((1, 0, 192), F32, 1, None, ValueError, "N >= 1"),
    ((1, 5, 192), F32, 0, None, ValueError, "num_heads must be positive"),
    ((1, 5, 192), F32, 2.0, None, TypeError, "num_heads must be an int"),
    ((1, 5, 192), F32, 1, -0.5, ValueError, "scale must be positive"),
    ((1, 5, 192), F32, 1, 0.0, ValueError, "scale must be positive"),
    ((1, 5, 192), F32, 1, float("nan"), ValueError, "scale must be positive"),
    ((1, 5, 192), F32, 1, float("inf"), ValueError, "scale must be positive"),
    ((1, 5, 192), F32, 1, "0.1", TypeError, "scale must be a real number"),
    ((1, 5, 192), torch.int32, 1, None, TypeError, "float32, float16 or bfloat16"),
]


@pytest.mark.parametrize("shape,dtype,num_heads,scale,error,match", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(device, monkeypatch, shape, dtype, num_heads, scale, error, match):
    from fastvit_kernels.kernels import attention as kernels

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input checks")

    monkeypatch.setattr(kernels, "attention_fwd", launched)
    qkv = torch.ones(shape, device=device, dtype=dtype)
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        attention(qkv, num_heads, scale, backend="triton")


def test_not_a_tensor_raises():
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        attention([[1.0]], 1, backend="triton")


def test_bf16_on_cpu_triton_raises():
    qkv = torch.randn(1, 5, 192, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        attention(qkv, 1, backend="triton")


def test_attention_flops():
    # ViT-B/16 at 224: B=2, N=197, H=12, head_dim=64; QK^T and PV are each 2 * N * N * head_dim per (b, h).
    assert attention_flops(2, 197, 12, 64) == 2 * 12 * 2 * (2 * 197 * 197 * 64)
    assert attention_flops(1, 1, 1, 8) == 32


# --------------------------------------------------------------------------------------------------------------
# host-side tile logic of fastvit_kernels.kernels.attention
# --------------------------------------------------------------------------------------------------------------
SUPPORTED_HEAD_DIMS = list(range(8, 129, 8))  # what the op accepts: multiples of 8 up to 128


def test_head_dim_chunks_examples():
    from fastvit_kernels.kernels.attention import head_dim_chunks

    expected = {32: (32, 0, 0), 40: (32, 16, 0), 48: (32, 16, 0), 64: (64, 0, 0), 72: (64, 16, 0), 80: (64, 16, 0),
                88: (64, 32, 0), 96: (64, 32, 0), 112: (64, 32, 16), 120: (128, 0, 0), 128: (128, 0, 0)}
    assert {hd: head_dim_chunks(hd) for hd in expected} == expected
    with pytest.raises(ValueError, match="head_dim must be in"):
        head_dim_chunks(136)


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_head_dim_chunks_pad_less_than_16(head_dim):
    """Decreasing powers of two >= 16 (0 = absent, only at the end) covering head_dim with < 16 padded columns."""
    from fastvit_kernels.kernels.attention import head_dim_chunks

    chunks = head_dim_chunks(head_dim)
    present = [c for c in chunks if c]
    assert chunks == tuple(present + [0] * (3 - len(present)))
    assert all(c >= 16 and c & (c - 1) == 0 for c in present)
    assert present == sorted(present, reverse=True)
    assert 0 <= sum(present) - head_dim < 16


def test_n_align_gives_even_n_exactly():
    """The kernels' EVEN_N = (N_ALIGN % BLOCK == 0) must equal N % BLOCK == 0 for every tile size and N."""
    from fastvit_kernels.kernels.attention import MAX_BLOCK, n_align, n_bucket

    for N in range(1, 1100):
        for block in (16, 32, 64, 128, 256):
            assert block > MAX_BLOCK or (n_align(N) % block == 0) == (N % block == 0), (N, block)
    assert [n_bucket(N) for N in (1, 17, 197, 256, 257)] == [1, 32, 256, 256, 512]


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq", "fused"])
@pytest.mark.parametrize("dtype", [F32, F16, torch.bfloat16])
def test_attention_configs_pruned(kernel, dtype):
    """Every call gets >= 1 candidate; each kept one passes keep(); low-precision tiles give the sm_90 warpgroup MMA
    64-row multiples on the M side of the dots; nothing longer than the sequence bucket (beyond 64) survives; the
    spilling one-pass forward tile is pruned; the full (un-pruned) list is a superset."""
    from fastvit_kernels.kernels.attention import attention_configs, keep

    from fastvit_kernels.kernels.attention import fused_bwd_builds

    full = attention_configs(kernel, None, None, None, None)
    assert len(full) > 1  # triton.autotune only tunes with more than one config
    for head_dim in (32, 40, 64, 72, 80, 88, 96, 128):
        if kernel == "fused" and not fused_bwd_builds(head_dim, dtype):
            continue  # never launched there by the rule (three-launch plan)
        for bucket in (1, 32, 64, 256, 512, 1024):
            kept = attention_configs(kernel, head_dim, dtype, None, bucket)
            assert kept and all(keep(c, kernel, head_dim, dtype, None, bucket) for c in kept)
            assert {str(c) for c in kept} <= {str(c) for c in full}
            for c in kept:
                bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                assert max(bm, bn) <= max(64, bucket)
                if dtype == F32 and kernel in ("dkdv", "dq"):
                    assert (bm, bn) == (16, 16)  # 32 x 32 spilled on sm_80 (AOT check)
                if dtype != F32:
                    # fused: one tile pair for both loops, the two that build clean (64 x 32, 32 x 64)
                    assert kernel == "fused" or (bn if kernel == "dkdv" else bm) % 64 == 0
                    assert not (kernel == "fwd" and bn == 256)
    hd = 64 if kernel == "fused" else 80
    assert len(attention_configs(kernel, hd, F16, None, 512)) > 1  # a real choice at ViT-H/14's N = 257


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq", "fused"])
def test_autotune_off_takes_the_first_candidate(kernel, monkeypatch):
    """FASTVIT_AUTOTUNE=0 (README): the GPU autotuner's pruning keeps only the first candidate of
    attention_configs (Triton runs a single candidate without benchmarking); unset, every kept candidate is tuned.
    The GPU decoration is built here on the CPU (AUTOTUNE forced on) and only its pruning is called."""
    from fastvit_kernels.kernels import attention as attn

    monkeypatch.setattr(attn, "AUTOTUNE", True)
    tuned = attn._autotuned(kernel)(attn._attention_fwd_kernel)
    qkv = torch.empty(2, 257, 3 * 64, dtype=F16)
    expected = attn.attention_configs(kernel, 64, F16, None, 512)
    assert len(expected) > 1
    monkeypatch.delenv("FASTVIT_AUTOTUNE", raising=False)
    kept = tuned.early_config_prune(tuned.configs, {"QKV": qkv, "N_BUCKET": 512}, HEAD_DIM=64)
    assert [str(c) for c in kept] == [str(c) for c in expected]
    for off in ("0", "OFF", "false"):
        monkeypatch.setenv("FASTVIT_AUTOTUNE", off)
        kept = tuned.early_config_prune(tuned.configs, {"QKV": qkv, "N_BUCKET": 512}, HEAD_DIM=64)
        assert [str(c) for c in kept] == [str(expected[0])]


@pytest.mark.parametrize("N,head_dim,dtype", [(17, 80, F32), (197, 64, F16), (257, 80, F16)])
def test_fused_and_split_backward_plans_agree(device, N, head_dim, dtype):
    """The one-program-per-head backward runs the same block loops as the three-launch plan: on the interpreter
    the two d(qkv) are bit-identical; on a GPU (different tiles may be tuned per kernel) they agree to the dtype's
    tolerance. The rule picks fused from FUSED_BWD_MIN_HEADS (batch * heads) on."""
    from fastvit_kernels.kernels.attention import FUSED_BWD_MIN_HEADS, attention_bwd, attention_fwd, fused_bwd_builds

    B, H = 2, 2
    qkv = torch.randn(B, N, 3 * H * head_dim, device=device, dtype=dtype)
    dout = torch.randn(B, N, H * head_dim, device=device, dtype=dtype)
    out, lse = attention_fwd(qkv, H, head_dim**-0.5)
    fused = attention_bwd(dout, qkv, out, lse, H, head_dim**-0.5, fused=True)
    split = attention_bwd(dout, qkv, out, lse, H, head_dim**-0.5, fused=False)
    if device == "cpu":
        assert torch.equal(fused, split)
    else:
        torch.testing.assert_close(fused, split, **TOLERANCES[dtype])
    assert FUSED_BWD_MIN_HEADS <= 12 * 64  # ViT-B/16 training at batch 64 takes the fused plan ...
    assert fused_bwd_builds(64, torch.bfloat16)  # ... (head_dim 64) ...
    assert not fused_bwd_builds(80, torch.bfloat16) and not fused_bwd_builds(64, F32)  # ... ViT-H and fp32 do not
