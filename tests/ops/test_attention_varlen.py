"""fastvit_kernels.ops.attention with ``cu_seqlens`` (packed variable-length sequences) and ``key_valid`` (padded
batch with a key-padding mask): the Triton path (interpreter on the CPU) against the eager references.

Forward and d(qkv) are held to a float64 run of ``reference.attention_varlen_ref`` (a per-sequence loop of the
dense reference) / ``reference.attention_masked_ref``; fp16 uses the flash-attention 2x rule (tests/helpers.py)
with the same reference run in fp16 by PyTorch. Lengths mix 1, 2, 17, 197 and 257 (the long ones with one head of
width 16, to keep the interpreter fast); the chunked head dims 72 / 80 / 88 run on short sequences. Both backward
plans run (fused: one program per (sequence, head); split: pre-pass + dK / dV + dQ), forced through
``FUSED_BWD_MIN_HEADS`` as in tests/ops/test_attention.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastvit_kernels.ops.attention import attention, attention_varlen_flops
from fastvit_kernels.reference import attention_masked_ref, attention_varlen_ref
from tests.helpers import TOLERANCES, assert_close_to_ref

F32, F16 = torch.float32, torch.float16


def _cu(lengths, device) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _run(fn, qkv, dout):
    """(out, d(qkv)) of ``fn(x)`` with x a leaf copy of qkv, backward with ``dout``."""
    x = qkv.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad


def _check(triton_fn, ref_fn, qkv, dout):
    """The Triton op against the reference in float64 (and, for fp16, the reference in fp16 for the 2x rule)."""
    out, dqkv = _run(triton_fn, qkv, dout)
    assert out.dtype == qkv.dtype and dqkv.dtype == qkv.dtype
    ref_out, ref_dqkv = _run(ref_fn, qkv.double(), dout)
    low_out = low_dqkv = None
    if qkv.dtype != F32:
        low_out, low_dqkv = _run(ref_fn, qkv, dout)
    assert_close_to_ref(out, ref_out, low_out, name="out")
    assert_close_to_ref(dqkv, ref_dqkv, low_dqkv, name="dqkv")
    return out, dqkv


@pytest.fixture(params=["split", "fused"])
def bwd_plan(request, monkeypatch):
    """Run the test under each backward plan, whatever S * H (or B * H) it uses."""
    from fastvit_kernels.kernels import attention as kernels

    monkeypatch.setattr(kernels, "FUSED_BWD_MIN_HEADS", 1 if request.param == "fused" else 1 << 30)
    return request.param


# (sequence lengths, H, head_dim, dtype)
VARLEN_CASES = [
    ([1, 2, 17, 197, 257, 577], 1, 16, F32),
    ([257, 17, 1, 197, 2], 1, 16, F16),
    ([5, 17, 2, 9], 2, 72, F32),
    ([17, 3, 9], 1, 80, F16),
    ([2, 11], 1, 88, F32),
    ([33], 2, 64, F32),  # one sequence
    ([1, 1, 1, 1, 1, 1], 2, 32, F16),  # every sequence one token
]


@pytest.mark.parametrize("lengths,H,head_dim,dtype", VARLEN_CASES,
                         ids=[f"S{len(c[0])}-T{sum(c[0])}-H{c[1]}-hd{c[2]}-{str(c[3])[6:]}" for c in VARLEN_CASES])
def test_varlen_matches_per_sequence_reference(device, lengths, H, head_dim, dtype, bwd_plan):
    cu = _cu(lengths, device)
    T = sum(lengths)
    qkv = torch.randn(T, 3 * H * head_dim, device=device, dtype=dtype)
    dout = torch.randn(T, H * head_dim, device=device, dtype=dtype)
    _check(lambda x: attention(x, H, cu_seqlens=cu, backend="triton"),
           lambda x: attention_varlen_ref(x, cu.cpu(), H), qkv, dout)


def test_varlen_many_sequences_loop(device, monkeypatch):
    """More sequences than one in-kernel chunk of cu_seqlens (MAX_SEQ_CHUNK lowered to 16, so 40 sequences take
    three steps of the tile-count loop); split plan (40 * 1 heads < FUSED_BWD_MIN_HEADS)."""
    from fastvit_kernels.kernels import attention as kernels

    monkeypatch.setattr(kernels, "MAX_SEQ_CHUNK", 16)
    assert kernels.seq_chunk(40) == 16
    lengths = [1 + (7 * i) % 5 for i in range(40)]
    cu = _cu(lengths, device)
    T, H, hd = sum(lengths), 1, 16
    qkv = torch.randn(T, 3 * H * hd, device=device)
    dout = torch.randn(T, H * hd, device=device)
    _check(lambda x: attention(x, H, cu_seqlens=cu, backend="triton"),
           lambda x: attention_varlen_ref(x, cu.cpu(), H), qkv, dout)


def test_varlen_lse_is_per_sequence_log2_sum_exp(device):
    """The saved statistic: lse (H, T) fp32, lse[h, t] = logsumexp over t's own sequence * log2(e)."""
    lengths, H, hd, scale = [3, 17, 1], 2, 16, 0.3
    cu = _cu(lengths, device)
    qkv = torch.randn(sum(lengths), 3 * H * hd, device=device)
    out, lse = torch.ops.fastvit.attention_varlen_fwd(qkv, cu, H, scale)
    assert lse.shape == (H, sum(lengths)) and lse.dtype == F32
    q, k, _ = qkv.double().reshape(-1, 3, H, hd).permute(1, 2, 0, 3).unbind(0)  # (H, T, hd)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        ref = torch.logsumexp(scale * q[:, a:b] @ k[:, a:b].transpose(-2, -1), dim=-1) / math.log(2.0)
        torch.testing.assert_close(lse[:, a:b].double(), ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_bit_identical_repeats(device, dtype, bwd_plan):
    lengths, H, hd = [17, 2, 40], 2, 48
    cu = _cu(lengths, device)
    qkv = torch.randn(sum(lengths), 3 * H * hd, device=device, dtype=dtype)
    dout = torch.randn(sum(lengths), H * hd, device=device, dtype=dtype)
    kv = torch.rand(3, 40, device=device) > 0.3
    padded = torch.randn(3, 40, 3 * H * hd, device=device, dtype=dtype)
    dpad = torch.randn(3, 40, H * hd, device=device, dtype=dtype)
    for fn, x, g in ((lambda t: attention(t, H, cu_seqlens=cu, backend="triton"), qkv, dout),
                     (lambda t: attention(t, H, key_valid=kv, backend="triton"), padded, dpad)):
        out1, d1 = _run(fn, x, g)
        out2, d2 = _run(fn, x, g)
        assert torch.equal(out1, out2) and torch.equal(d1, d2)


# ---- key-padding form ------------------------------------------------------------------------------------------
def _holes_mask(device) -> torch.Tensor:
    """(4, 37): random holes; no valid token; a prefix of 30 (NaFlex's layout); only the last token valid."""
    kv = torch.rand(4, 37, device=device) > 0.4
    kv[1] = False
    kv[2] = torch.arange(37, device=device) < 30
    kv[3] = torch.arange(37, device=device) == 36
    return kv


@pytest.mark.parametrize("head_dim,dtype", [(40, F32), (80, F16), (64, F16)])
def test_masked_matches_reference(device, head_dim, dtype, bwd_plan):
    kv = _holes_mask(device)
    B, N, H = kv.shape[0], kv.shape[1], 2
    qkv = torch.randn(B, N, 3 * H * head_dim, device=device, dtype=dtype)
    dout = torch.randn(B, N, H * head_dim, device=device, dtype=dtype)
    out, dqkv = _check(lambda x: attention(x, H, key_valid=kv, backend="triton"),
                       lambda x: attention_masked_ref(x, kv.cpu(), H), qkv, dout)
    # invalid tokens: exactly zero output rows and zero gradient rows (q, k and v); all finite
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    assert (out[~kv] == 0).all() and (dqkv[~kv] == 0).all()
    assert (out[kv] != 0).any(dim=-1).all()


def test_packed_and_padded_agree(device, bwd_plan):
    """The same sequences packed (cu_seqlens) and padded to N with a prefix key mask give the same outputs and
    gradients per sequence (the padded rows: zero). Lengths and N are chosen so that both forms use the same tiles
    (average length and N in the same bucket)."""
    lengths, H, hd, N = [50, 30, 41], 2, 24 * 2, 50
    cu = _cu(lengths, device)
    T = sum(lengths)
    qkv = torch.randn(T, 3 * H * hd, device=device)
    dout = torch.randn(T, H * hd, device=device)
    padded = torch.zeros(len(lengths), N, 3 * H * hd, device=device)
    dpad = torch.zeros(len(lengths), N, H * hd, device=device)
    kv = torch.zeros(len(lengths), N, dtype=torch.bool, device=device)
    for s, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        padded[s, :b - a], dpad[s, :b - a], kv[s, :b - a] = qkv[a:b], dout[a:b], True
    out, dqkv = _run(lambda x: attention(x, H, cu_seqlens=cu, backend="triton"), qkv, dout)
    pout, pdqkv = _run(lambda x: attention(x, H, key_valid=kv, backend="triton"), padded, dpad)
    for s, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        torch.testing.assert_close(pout[s, :b - a], out[a:b], **TOLERANCES[F32])
        torch.testing.assert_close(pdqkv[s, :b - a], dqkv[a:b], **TOLERANCES[F32])
        assert (pout[s, b - a:] == 0).all() and (pdqkv[s, b - a:] == 0).all()


def test_kv_end_bound(device):
    from fastvit_kernels.kernels.attention import kv_end

    kv = _holes_mask(device)
    want = [int(torch.nonzero(r).max()) + 1 if r.any() else 0 for r in kv.cpu()]
    assert kv_end(kv).tolist() == want and kv_end(kv).dtype == torch.int32
    assert want[1:] == [0, 30, 37]


# ---- custom ops, compile, FLOPs -------------------------------------------------------------------------------
def test_opcheck_custom_ops(device):
    cu = _cu([3, 1, 4], device)
    qkv = torch.randn(8, 3 * 16, device=device)
    torch.library.opcheck(torch.ops.fastvit.attention_varlen_fwd.default, (qkv, cu, 1, 0.3))
    out, lse = torch.ops.fastvit.attention_varlen_fwd(qkv, cu, 1, 0.3)
    torch.library.opcheck(torch.ops.fastvit.attention_varlen_bwd.default,
                          (torch.randn_like(out), qkv, cu, out, lse, 1, 0.3))
    kv = torch.tensor([[True, False, True, True], [False, False, False, False]], device=device)
    qkv = torch.randn(2, 4, 3 * 16, device=device)
    torch.library.opcheck(torch.ops.fastvit.attention_masked_fwd.default, (qkv, kv, 1, 0.3))
    out, lse = torch.ops.fastvit.attention_masked_fwd(qkv, kv, 1, 0.3)
    torch.library.opcheck(torch.ops.fastvit.attention_masked_bwd.default,
                          (torch.randn_like(out), qkv, kv, out, lse, 1, 0.3))


def test_torch_compile_fullgraph_no_recompile(device):
    """One graph, and new cu_seqlens values with the same shapes (token-budget packing: T and S fixed) reuse it:
    the launch grid depends on the shapes only, and no value of cu_seqlens is read on the host while tracing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    H, hd, T = 2, 16, 24
    compiled = torch.compile(lambda t, cu: attention(t, H, cu_seqlens=cu, backend="triton"), fullgraph=True,
                             backend=counter)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([10, 4, 10], [1, 22, 1], [8, 8, 8]):
            cu = _cu(lengths, device)
            qkv = torch.randn(T, 3 * H * hd, device=device)
            dout = torch.randn(T, H * hd, device=device)
            out, dqkv = _run(lambda x: compiled(x, cu), qkv, dout)
            ref_out, ref_dqkv = _run(lambda x: attention(x, H, cu_seqlens=cu, backend="triton"), qkv, dout)
            assert torch.equal(out, ref_out) and torch.equal(dqkv, ref_dqkv)
    assert counter.frame_count == 1


def test_attention_varlen_flops():
    assert attention_varlen_flops([1, 2, 197], 12, 64) == 4 * 12 * 64 * (1 + 4 + 197 * 197)
    assert attention_varlen_flops([], 1, 8) == 0
    with pytest.raises(ValueError, match="non-negative"):
        attention_varlen_flops([3, -1], 1, 8)
    from fastvit_kernels.ops.attention import FLOP_FORMULAS

    # shapes only: S equal sequences of T / S tokens (T = 394 = 2 x 197 here)
    fwd = FLOP_FORMULAS["attention_varlen_fwd"]((394, 3 * 768), (3,), 12, 0.125)
    assert fwd == attention_varlen_flops([197, 197], 12, 64)
    assert FLOP_FORMULAS["attention_varlen_bwd"]((394, 768), (394, 3 * 768), (3,), (394, 768), (12, 394), 12,
                                                 0.125) == 2 * fwd
    assert FLOP_FORMULAS["attention_masked_fwd"]((2, 197, 3 * 768), (2, 197), 12, 0.125) == fwd


# ---- bad inputs: clear errors before any launch ----------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    from fastvit_kernels.kernels import attention as kernels

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input checks")

    monkeypatch.setattr(kernels, "attention_seq_fwd", launched)


BAD_CU = [
    # (cu_seqlens builder(device), qkv shape, error, message fragment)
    (lambda d: torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=d), (8, 48), ValueError, "increase strictly"),
    (lambda d: torch.tensor([0, 4, 4, 8], dtype=torch.int32, device=d), (8, 48), ValueError, "increase strictly"),
    (lambda d: torch.tensor([1, 4, 8], dtype=torch.int32, device=d), (8, 48), ValueError, "start at 0"),
    (lambda d: torch.tensor([0, 4, 7], dtype=torch.int32, device=d), (8, 48), ValueError, "end at T=8"),
    (lambda d: torch.tensor([0, 4, 8], dtype=torch.int64, device=d), (8, 48), TypeError, "int32"),
    (lambda d: torch.tensor([[0, 4, 8]], dtype=torch.int32, device=d), (8, 48), ValueError, "1-D"),
    (lambda d: torch.tensor([0], dtype=torch.int32, device=d), (8, 48), ValueError, r"S \+ 1 >= 2"),
    (lambda d: torch.tensor([0, 4, 8], dtype=torch.int32, device="meta"), (8, 48), ValueError, "device"),
    (lambda d: [0, 4, 8], (8, 48), TypeError, "torch.Tensor"),
    (lambda d: torch.tensor([0, 4, 8], dtype=torch.int32, device=d), (1, 8, 48), ValueError, "2-D"),
]


@pytest.mark.parametrize("make_cu,shape,error,match", BAD_CU)
def test_bad_cu_seqlens_raise_before_launch(device, no_launch, make_cu, shape, error, match):
    qkv = torch.randn(shape, device=device)
    with pytest.raises(error, match=match):
        attention(qkv, 1, cu_seqlens=make_cu(device), backend="triton")


BAD_KEY_VALID = [
    (lambda d: torch.ones(2, 8, dtype=torch.uint8, device=d), TypeError, "bool"),
    (lambda d: torch.ones(2, 7, dtype=torch.bool, device=d), ValueError, r"\(B, N\)"),
    (lambda d: torch.ones(8, dtype=torch.bool, device=d), ValueError, r"\(B, N\)"),
    (lambda d: torch.ones(2, 8, dtype=torch.bool, device="meta"), ValueError, "device"),
    (lambda d: [[True] * 8] * 2, TypeError, "bool tensor"),
]


@pytest.mark.parametrize("make_kv,error,match", BAD_KEY_VALID)
def test_bad_key_valid_raise_before_launch(device, no_launch, make_kv, error, match):
    qkv = torch.randn(2, 8, 48, device=device)
    with pytest.raises(error, match=match):
        attention(qkv, 1, key_valid=make_kv(device), backend="triton")


def test_cu_seqlens_values_read_once_per_tensor_version(device, no_launch, monkeypatch):
    # a packed model passes one cu_seqlens to every block: its values are read to the host once, and again only
    # after an in-place write, which must still be caught
    op_module = importlib.import_module("fastvit_kernels.ops.attention")  # the module, not the function
    reads = []
    real = op_module._remember_validated
    monkeypatch.setattr(op_module, "_remember_validated", lambda t, total: (reads.append(total), real(t, total)))
    cu = _cu([3, 5], device)
    for _ in range(3):
        assert op_module.check_cu_seqlens(cu, 8, cu.device) == 2
    assert reads == [8]
    with pytest.raises(ValueError, match="end at T=9"):
        op_module.check_cu_seqlens(cu, 9, cu.device)  # another T: checked again
    cu[1] = 9
    with pytest.raises(ValueError, match="increase strictly"):
        attention(torch.randn(8, 48, device=device), 1, cu_seqlens=cu, backend="triton")


def test_cu_seqlens_and_key_valid_are_exclusive(device, no_launch):
    qkv = torch.randn(8, 48, device=device)
    with pytest.raises(ValueError, match="exclusive"):
        attention(qkv, 1, cu_seqlens=_cu([8], device), key_valid=torch.ones(1, 8, dtype=torch.bool),
                  backend="triton")


def test_torch_backend_is_the_reference(device):
    # the packed form's torch path is a batched padded computation: the per-sequence loop's values and gradients
    cu = _cu([3, 1, 5], device)
    qkv = torch.randn(9, 96, device=device, requires_grad=True)
    got, want = attention(qkv, 2, cu_seqlens=cu, backend="torch"), attention_varlen_ref(qkv, cu, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, qkv, g)[0], torch.autograd.grad(want, qkv, g)[0],
                               rtol=1e-6, atol=1e-6)
    qkv = torch.randn(8, 96, device=device)
    kv = torch.rand(2, 4, device=device) > 0.5
    qkv = qkv.reshape(2, 4, 96)
    assert torch.equal(attention(qkv, 2, key_valid=kv, backend="torch"), attention_masked_ref(qkv, kv, 2))


# ---- host-side schedule and tiles ------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [16, 64, 128])
def test_packed_blocks_bounds_the_tiles(block):
    """The grid's row blocks (from T and S only) cover every sequence's blocks, with at most S - 1 to spare."""
    from fastvit_kernels.kernels.attention import packed_blocks

    g = torch.Generator().manual_seed(1)
    for S in (1, 2, 7, 100):
        for _ in range(20):
            lengths = torch.randint(1, 300, (S,), generator=g).tolist()
            need = sum(-(-n // block) for n in lengths)
            have = packed_blocks(sum(lengths), S, block)
            assert need <= have <= need + S - 1, (lengths, block)


def test_sequence_forward_prunes_the_spilling_tiles():
    from fastvit_kernels.kernels.attention import attention_configs

    for hd in (64, 80):
        dense = attention_configs("fwd", hd, F16, None, 256)
        seq = attention_configs("fwd", hd, F16, None, 256, seq=True)
        assert seq and all(c.kwargs["BLOCK_N"] <= 64 for c in seq)
        assert any(c.kwargs["BLOCK_N"] == 128 for c in dense)
