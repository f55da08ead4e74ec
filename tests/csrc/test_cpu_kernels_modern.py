"""The C++ library's CPU kernels of the modern ops (csrc/cpu/modern.cpp: SwiGLU MLP, LayerNorm + Linear + RoPE,
varlen / key-masked attention, patch embedding of pre-patchified tokens) against the fp32 eager references of
fastvit_kernels.reference, in a process that loads only ``_C``: every output, auxiliaries included (fp32 norm
statistics, the SwiGLU pre-activation, the attention log-sum-exp in log2 units with the Triton op's zero rows) and
the empty placeholders the Triton ops return. Odd shapes: N = 17, head_dim 72, D and D_hidden not powers of two,
coordinates tables that do not divide the rows, a sequence of length 1, an image without a valid key."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import reference
from tests.csrc.conftest import run_ops_in_library

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


def _stats(x: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    if rms:
        return torch.zeros(x.shape[0]), torch.rsqrt(x.pow(2).mean(-1) + eps)
    return x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + eps)


def _lse_log2(qkv: torch.Tensor, H: int, scale: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N) natural log-sum-exp of the scaled scores / ln 2 over the (valid) keys."""
    B, N, three_d = qkv.shape
    q, k, _ = qkv.float().view(B, N, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-2, -1) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1) / math.log(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modern_forward_ops_match_reference(csrc_library, tmp_path, dtype):
    torch.manual_seed(0)
    B, N, D, H, Dh, eps, heps = 2, 17, 144, 2, 200, 1e-6, 1e-5
    M, hd = B * N, D // H  # head_dim 72
    scale = hd ** -0.5
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, nw, nb = r(M, D), 1 + 0.1 * r(D), 0.1 * r(D)
    # SwiGLU: packed fc1 (2 Dh, D) with the hidden LayerNorm; separate gate / up with RMSNorm and no hidden norm
    w1, b1, w2, b2 = 0.05 * r(2 * Dh, D), 0.1 * r(2 * Dh), 0.05 * r(D, Dh), 0.1 * r(D)
    hw, hb = 1 + 0.1 * r(Dh), 0.1 * r(Dh)
    wg, wu, bu = w1[:Dh].clone(), w1[Dh:].clone(), b1[Dh:].clone()
    # RoPE: per-token (y, x) (a prefix row (0, 0): unrotated) for Nc = N (dense batch) and Nc = 5 (not dividing M)
    qkv_w, qkv_b = 0.05 * r(3 * D, D), 0.1 * r(3 * D)
    coords = torch.cat([torch.zeros(1, 2), torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0),
                                                                       indexing="ij"), -1).reshape(-1, 2)])
    coords5 = torch.randn(5, 2) * 3
    freqs1, freqs_h = torch.rand(1, hd // 2, 2), torch.randn(H, hd // 2, 2)
    # varlen attention: lengths 17, 5, 1, 9
    cu = torch.tensor([0, 17, 22, 23, 32], dtype=torch.int32)
    qkv_p = r(32, 3 * D)
    # masked attention: image 0 all valid; image 1 with holes, last valid key 12 (rows 13.. past kv_end); image 2
    # without a valid key
    qkv_b3 = r(3, N, 3 * D)
    kv = torch.ones(3, N, dtype=torch.bool)
    kv[1, 13:] = False
    kv[1, [2, 5, 6]] = False
    kv[2] = False
    # patch tokens: K = 4 * 4 * 3, D = 120; 3-D with ids_keep / mask / pos / prefix, 2-D packed with cu_seqlens
    K, De, R = 48, 120, 20
    pw, pb, pos, pre, mtok = 0.05 * r(De, K), 0.1 * r(De), r(R, De), r(3, De), r(De)
    patches3 = r(B, N, K)
    pidx3 = torch.randint(-1, R, (B, N))
    keep3 = torch.stack([torch.randperm(N)[:9] for _ in range(B)])
    mask3 = torch.rand(B, 9) < 0.3
    patches2 = r(25, K)
    pidx2 = torch.randint(-1, R, (25,))
    keep2 = torch.randperm(25)[:15]
    mask2 = torch.rand(15) < 0.3
    cu2 = torch.tensor([0, 6, 15], dtype=torch.int32)
    calls = {
        "swiglu_packed": ("swiglu_mlp_fwd", (x, nw, nb, w1, b1, None, None, w2, b2, hw, hb, eps, heps, False, True)),
        "swiglu_separate": ("swiglu_mlp_fwd", (x, nw, None, wg, None, wu, bu, w2, None, None, None, eps, heps, True,
                                               False)),
        "rope_interleaved": ("layernorm_linear_rope_fwd", (x, nw, nb, qkv_w, qkv_b, eps, coords, freqs1, H, False,
                                                           False)),
        "rope_half_rms": ("layernorm_linear_rope_fwd", (x, nw, None, qkv_w, None, eps, coords5, freqs_h, H, True,
                                                        True)),
        "varlen": ("attention_varlen_fwd", (qkv_p, cu, H, scale)),
        "masked": ("attention_masked_fwd", (qkv_b3, kv, H, scale)),
        "tokens3": ("patch_embed_tokens_fwd", (patches3, pw, pb, pos, pidx3, keep3, mask3, mtok, pre, None)),
        "tokens2": ("patch_embed_tokens_fwd", (patches2, pw, None, pos, pidx2, keep2, mask2, mtok, pre[:2], cu2)),
        "tokens_plain": ("patch_embed_tokens_fwd", (patches2, pw, pb, None, None, None, None, None, None, None)),
    }
    got = run_ops_in_library(csrc_library, calls, tmp_path)
    tol = TOL[dtype]

    def close(actual, expected, what, fp32=False):
        assert actual.dtype == (torch.float32 if fp32 else dtype), f"{what}: dtype {actual.dtype}"
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")

    # SwiGLU, packed fc1 + hidden LayerNorm
    out, preact, mean, rstd, hmean, hrstd = got["swiglu_packed"]
    xf, nwf, nbf, w1f, b1f, w2f, b2f, hwf, hbf = _f32(x, nw, nb, w1, b1, w2, b2, hw, hb)
    close(out, reference.swiglu_mlp_ref(xf, nwf, nbf, w1f, b1f, None, None, w2f, b2f, eps, hidden_norm_weight=hwf,
                                        hidden_norm_bias=hbf, hidden_norm_eps=heps), "swiglu packed out")
    pre_ref = F.linear(F.layer_norm(xf, (D,), nwf, nbf, eps), w1f, b1f)
    close(preact, pre_ref, "swiglu packed preact")
    em, er = _stats(x, eps)
    close(mean, em, "swiglu mean", fp32=True)
    close(rstd, er, "swiglu rstd", fp32=True)
    em, er = _stats(F.silu(pre_ref[:, :Dh]) * pre_ref[:, Dh:], heps)
    close(hmean, em, "swiglu hidden mean", fp32=True)
    close(hrstd, er, "swiglu hidden rstd", fp32=True)
    # separate gate / up, RMSNorm, branch only: the hidden statistics are (0,) placeholders
    out, preact, mean, rstd, hmean, hrstd = got["swiglu_separate"]
    wgf, wuf, buf = _f32(wg, wu, bu)
    close(out, reference.swiglu_mlp_ref(xf, nwf, None, wgf, None, wuf, buf, w2f, None, eps, norm="rmsnorm",
                                        add_residual=False), "swiglu separate out")
    h = reference.rms_norm_ref(xf, nwf, None, eps)
    close(preact, torch.cat([F.linear(h, wgf), F.linear(h, wuf, buf)], 1), "swiglu separate preact")
    em, er = _stats(x, eps, rms=True)
    assert torch.equal(mean, em)
    close(rstd, er, "swiglu rms rstd", fp32=True)
    assert hmean.shape == hrstd.shape == (0,) and hmean.dtype == hrstd.dtype == torch.float32

    # LayerNorm + Linear + RoPE
    qkv_wf, qkv_bf = _f32(qkv_w, qkv_b)
    out, mean, rstd = got["rope_interleaved"]
    lin = reference.layernorm_linear_ref(xf, nwf, nbf, qkv_wf, qkv_bf, eps)
    close(out, reference.rope_ref(lin, coords, freqs1, H, "interleaved"), "rope interleaved out")
    em, er = _stats(x, eps)
    close(mean, em, "rope mean", fp32=True)
    close(rstd, er, "rope rstd", fp32=True)
    out, mean, rstd = got["rope_half_rms"]
    lin = reference.layernorm_linear_ref(xf, nwf, None, qkv_wf, None, eps, norm="rmsnorm")
    close(out, reference.rope_ref(lin, coords5, freqs_h, H, "half"), "rope half rms out")
    em, er = _stats(x, eps, rms=True)
    assert torch.equal(mean, em)
    close(rstd, er, "rope rms rstd", fp32=True)

    # varlen attention: out (T, D), lse (H, T)
    out, lse = got["varlen"]
    close(out, reference.attention_varlen_ref(qkv_p.float(), cu, H, scale), "varlen out")
    bounds = cu.tolist()
    lse_ref = torch.cat([_lse_log2(qkv_p[a:b][None], H, scale)[0] for a, b in zip(bounds, bounds[1:])], dim=1)
    close(lse, lse_ref, "varlen lse", fp32=True)

    # masked attention: zero rows for invalid queries; lse over the valid keys before kv_end, 0 from kv_end on
    out, lse = got["masked"]
    close(out, reference.attention_masked_ref(qkv_b3.float(), kv, H, scale), "masked out")
    lse_ref = _lse_log2(qkv_b3, H, scale, kv)
    kv_end = torch.tensor([N, 13, 0])
    lse_ref = torch.where(torch.arange(N)[None, None, :] < kv_end[:, None, None], lse_ref, 0.0)
    assert torch.isfinite(lse).all()
    close(lse, lse_ref, "masked lse", fp32=True)

    # patch embedding of pre-patchified tokens
    pwf, pbf, posf, pref, mtokf = _f32(pw, pb, pos, pre, mtok)
    exp3 = reference.patch_embed_tokens_ref(patches3.float(), pwf, pbf, posf, pidx3, ids_keep=keep3, mask=mask3,
                                            mask_token=mtokf, prefix=pref)
    close(got["tokens3"], exp3, "tokens 3-D")
    exp2 = reference.patch_embed_tokens_ref(patches2.float(), pwf, None, posf, pidx2, ids_keep=keep2, mask=mask2,
                                            mask_token=mtokf, prefix=pref[:2], cu_seqlens=cu2)
    close(got["tokens2"], exp2, "tokens 2-D packed")
    close(got["tokens_plain"], F.linear(patches2.float(), pwf, pbf), "tokens plain")


@pytest.mark.parametrize("op, args, message", [
    ("attention_varlen_fwd", lambda: (torch.randn(10, 12), torch.tensor([0, 4, 9], dtype=torch.int32), 2, 1.0),
     r"fastvit::attention_varlen_fwd: cu_seqlens must start at 0 and end at the token count 10; got 0 \.\.\. 9"),
    ("patch_embed_tokens_fwd", lambda: (torch.randn(2, 5, 6), torch.randn(4, 6), None, None, None,
                                        torch.tensor([[0, 5], [1, 2]]), None, None, None, None),
     r"fastvit::patch_embed_tokens_fwd: ids_keep values must lie in \[0, 5\); got 5"),
    ("layernorm_linear_rope_fwd", lambda: (torch.randn(3, 8), torch.ones(8), None, torch.randn(24, 8), None, 1e-6,
                                           torch.zeros(3, 2), torch.zeros(1, 3, 2), 2, False, False),
     r"fastvit::layernorm_linear_rope_fwd: freqs must be \(1 or num_heads=2, head_dim/2=2, 2\); got \(1, 3, 2\)"),
])
def test_modern_kernels_reject_bad_input_by_name(csrc_library, tmp_path, op, args, message):
    with pytest.raises(AssertionError, match=message):
        run_ops_in_library(csrc_library, {"bad": (op, args())}, tmp_path)
