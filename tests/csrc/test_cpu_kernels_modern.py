"""The C++ library's CPU kernels of the modern ops (csrc/cpu/modern.cpp and modern_bwd.cpp: SwiGLU MLP,
LayerNorm + Linear + RoPE, varlen / key-masked attention, patch embedding of pre-patchified tokens), forward and
backward, in a process that loads only ``_C``, against the eager references of fastvit_kernels.reference (the
backward against torch.autograd of them) by the project's tolerance rule (fastvit_kernels.accuracy: fp32 within
its tolerances, bf16 within 2x PyTorch's own bf16 error). Every output is checked: the auxiliaries the backward
keeps (fp32 norm statistics, the SwiGLU pre-activation, the attention log-sum-exp in log2 units with the Triton
op's zero rows) and the (0,) placeholders of the outputs not produced. Odd shapes: N = 17, head_dim 72, D and
D_hidden not powers of two, coordinate tables that do not divide the rows, a sequence of length 1, an image
without a valid key, a packed keep list that selects a patch twice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import reference
from fastvit_kernels.accuracy import fwd_bwd
from tests.csrc.conftest import run_ops_in_library
from tests.helpers import assert_close_to_ref

# fp32 auxiliaries computed from a bf16-rounded intermediate (the SwiGLU hidden): held to bf16's resolution
LOOSE = dict(atol=3e-2, rtol=3e-2)


def _stats(x: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    if rms:
        return torch.zeros(x.shape[0]), torch.rsqrt(x.pow(2).mean(-1) + eps)
    return x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + eps)


def _lse_log2(qkv: torch.Tensor, H: int, scale: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N) natural log-sum-exp of the scaled scores / ln 2 over the (valid) keys, fp32."""
    B, N, three_d = qkv.shape
    q, k, _ = qkv.float().view(B, N, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-2, -1) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1) / math.log(2.0)


class _Checker:
    """Holds the library's results in ``dtype`` to a reference function run on the same inputs in fp32 (and, for
    bf16, in bf16: the 2x rule's PyTorch error)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def _runs(self, fn, inputs, grad_out):
        dts = [torch.float32] + ([self.dtype] if self.dtype != torch.float32 else [])
        if grad_out is None:
            with torch.no_grad():
                return [fn(*[None if t is None else t.to(dt) for t in inputs]) for dt in dts]
        return [fwd_bwd(fn, inputs, grad_out, dt)[1] for dt in dts]

    def output(self, actual, what, fn, *inputs):
        """``actual`` (in dtype) against ``fn(*inputs)``; ``inputs`` are floating tensors or None (index tensors
        and fp32-only tables belong in ``fn``'s closure)."""
        ref, *lowp = self._runs(fn, inputs, None)
        self.held(actual, ref, lowp[0] if lowp else None, what)

    def grads(self, actuals, picks, what, fn, inputs, grad_out):
        """Each of ``actuals`` against the autograd gradients of ``fn(*inputs)`` (``fwd_bwd``: a list per input):
        its pick is an input position, a function of that list, or None (the op returns a (0,) placeholder)."""
        ref, *lowp = self._runs(fn, inputs, grad_out)
        for i, (actual, pick) in enumerate(zip(actuals, picks)):
            if pick is None:
                assert actual.shape == (0,) and actual.dtype == self.dtype, f"{what} #{i}: not a (0,) placeholder"
                continue
            get = pick if callable(pick) else (lambda g, k=pick: g[k])
            self.held(actual, get(ref), get(lowp[0]) if lowp else None, f"{what} grad #{i}")

    def held(self, actual, ref, lowp, what):
        assert actual.dtype == self.dtype, f"{what}: dtype {actual.dtype}"
        assert_close_to_ref(actual, ref, lowp, name=what)


def _fp32_aux(actual, expected, what, loose=False):
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    if loose:
        torch.testing.assert_close(actual, expected.float(), **LOOSE, msg=lambda m: f"{what}: {m}")
    else:
        assert_close_to_ref(actual, expected.float(), name=what)


def _inputs(dtype):
    """The shared test inputs (seeded): shapes with N = 17, head_dim 72, D = 144, D_hidden = 200."""
    torch.manual_seed(0)
    B, N, D, H, Dh = 2, 17, 144, 2, 200
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    t = dict(B=B, N=N, D=D, H=H, Dh=Dh, M=B * N, hd=D // H, eps=1e-6, heps=1e-5, scale=(D // H) ** -0.5)
    t.update(x=r(B * N, D), nw=1 + 0.1 * r(D), nb=0.1 * r(D), zb=torch.zeros(D, dtype=dtype))
    t.update(w1=0.05 * r(2 * Dh, D), b1=0.1 * r(2 * Dh), w2=0.05 * r(D, Dh), b2=0.1 * r(D), hw=1 + 0.1 * r(Dh),
             hb=0.1 * r(Dh))
    t.update(wg=t["w1"][:Dh].clone(), wu=t["w1"][Dh:].clone(), bg=t["b1"][:Dh].clone(), bu=t["b1"][Dh:].clone())
    # RoPE: per-token (y, x), a prefix row (0, 0) (unrotated); Nc = N (dense batch) and Nc = 5 (not dividing M)
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    t.update(qkv_w=0.05 * r(3 * D, D), qkv_b=0.1 * r(3 * D), coords=torch.cat([torch.zeros(1, 2), grid]),
             coords5=torch.randn(5, 2) * 3, freqs1=torch.rand(1, D // H // 2, 2),
             freqs_h=torch.randn(H, D // H // 2, 2))
    # varlen attention: lengths 17, 5, 1, 9; masked: image 0 all valid, image 1 with holes and its last valid key
    # at 12 (rows 13.. past kv_end), image 2 without a valid key
    kv = torch.ones(3, N, dtype=torch.bool)
    kv[1, 13:] = False
    kv[1, [2, 5, 6]] = False
    kv[2] = False
    t.update(cu=torch.tensor([0, 17, 22, 23, 32], dtype=torch.int32), qkv_p=r(32, 3 * D), qkv_b3=r(3, N, 3 * D),
             kv=kv, kv_end=torch.tensor([N, 13, 0]))
    # patch tokens: K = 4 * 4 * 3, D = 120; 3-D with ids_keep / mask / pos / prefix, 2-D packed with cu_seqlens
    # (a keep list with repeats)
    K, De, R = 48, 120, 20
    t.update(K=K, De=De, R=R, pw=0.05 * r(De, K), pb=0.1 * r(De), pos=r(R, De), pre=r(3, De), mtok=r(De),
             patches3=r(B, N, K), pidx3=torch.randint(-1, R, (B, N)),
             keep3=torch.stack([torch.randperm(N)[:9] for _ in range(B)]), mask3=torch.rand(B, 9) < 0.3,
             patches2=r(25, K), pidx2=torch.randint(-1, R, (25,)), keep2=torch.randint(0, 25, (15,)),
             mask2=torch.rand(15) < 0.3, cu2=torch.tensor([0, 6, 15], dtype=torch.int32))
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modern_forward_ops_match_reference(csrc_library, tmp_path, dtype):
    t = _inputs(dtype)
    x, nw, nb, H, Dh, D, eps, heps, scale = (t[k] for k in ("x", "nw", "nb", "H", "Dh", "D", "eps", "heps", "scale"))
    calls = {
        "swiglu_packed": ("swiglu_mlp_fwd", (x, nw, nb, t["w1"], t["b1"], None, None, t["w2"], t["b2"], t["hw"],
                                             t["hb"], eps, heps, False, True)),
        "swiglu_separate": ("swiglu_mlp_fwd", (x, nw, None, t["wg"], None, t["wu"], t["bu"], t["w2"], None, None,
                                               None, eps, heps, True, False)),
        "rope_interleaved": ("layernorm_linear_rope_fwd", (x, nw, nb, t["qkv_w"], t["qkv_b"], eps, t["coords"],
                                                           t["freqs1"], H, False, False)),
        "rope_half_rms": ("layernorm_linear_rope_fwd", (x, nw, None, t["qkv_w"], None, eps, t["coords5"],
                                                        t["freqs_h"], H, True, True)),
        "varlen": ("attention_varlen_fwd", (t["qkv_p"], t["cu"], H, scale)),
        "masked": ("attention_masked_fwd", (t["qkv_b3"], t["kv"], H, scale)),
        "tokens3": ("patch_embed_tokens_fwd", (t["patches3"], t["pw"], t["pb"], t["pos"], t["pidx3"], t["keep3"],
                                               t["mask3"], t["mtok"], t["pre"], None)),
        "tokens2": ("patch_embed_tokens_fwd", (t["patches2"], t["pw"], None, t["pos"], t["pidx2"], t["keep2"],
                                               t["mask2"], t["mtok"], t["pre"][:2], t["cu2"])),
        "tokens_plain": ("patch_embed_tokens_fwd", (t["patches2"], t["pw"], t["pb"], None, None, None, None, None,
                                                    None, None)),
    }
    got = run_ops_in_library(csrc_library, calls, tmp_path)
    c = _Checker(dtype)

    # SwiGLU, packed fc1 + hidden LayerNorm: out, preact, stats, hidden stats
    out, preact, mean, rstd, hmean, hrstd = got["swiglu_packed"]
    c.output(out, "swiglu packed out", lambda *a: reference.swiglu_mlp_ref(
        *a[:5], None, None, *a[5:7], eps, hidden_norm_weight=a[7], hidden_norm_bias=a[8], hidden_norm_eps=heps),
        x, nw, nb, t["w1"], t["b1"], t["w2"], t["b2"], t["hw"], t["hb"])
    pre_fn = lambda x, nw, nb, w, b: F.linear(F.layer_norm(x, (D,), nw, nb, eps), w, b)  # noqa: E731
    c.output(preact, "swiglu packed preact", pre_fn, x, nw, nb, t["w1"], t["b1"])
    em, er = _stats(x, eps)
    _fp32_aux(mean, em, "swiglu mean")
    _fp32_aux(rstd, er, "swiglu rstd")
    pre32 = pre_fn(*[v.float() for v in (x, nw, nb, t["w1"], t["b1"])])
    em, er = _stats(F.silu(pre32[:, :Dh]) * pre32[:, Dh:], heps)
    _fp32_aux(hmean, em, "swiglu hidden mean", loose=dtype != torch.float32)
    _fp32_aux(hrstd, er, "swiglu hidden rstd", loose=dtype != torch.float32)
    # separate gate / up, RMSNorm, branch only: the hidden statistics are (0,) placeholders
    out, preact, mean, rstd, hmean, hrstd = got["swiglu_separate"]
    c.output(out, "swiglu separate out", lambda *a: reference.swiglu_mlp_ref(
        a[0], a[1], None, a[2], None, a[3], a[4], a[5], None, eps, norm="rmsnorm", add_residual=False),
        x, nw, t["wg"], t["wu"], t["bu"], t["w2"])
    c.output(preact, "swiglu separate preact", lambda x, nw, wg, wu, bu: torch.cat(
        [F.linear(reference.rms_norm_ref(x, nw, None, eps), wg), F.linear(reference.rms_norm_ref(x, nw, None, eps),
                                                                          wu, bu)], 1), x, nw, t["wg"], t["wu"], t["bu"])
    em, er = _stats(x, eps, rms=True)
    assert torch.equal(mean, em)
    _fp32_aux(rstd, er, "swiglu rms rstd")
    assert hmean.shape == hrstd.shape == (0,) and hmean.dtype == hrstd.dtype == torch.float32

    # LayerNorm + Linear + RoPE
    out, mean, rstd = got["rope_interleaved"]
    c.output(out, "rope interleaved out", lambda *a: reference.rope_ref(
        reference.layernorm_linear_ref(*a, eps), t["coords"], t["freqs1"], H, "interleaved"),
        x, nw, nb, t["qkv_w"], t["qkv_b"])
    em, er = _stats(x, eps)
    _fp32_aux(mean, em, "rope mean")
    _fp32_aux(rstd, er, "rope rstd")
    out, mean, rstd = got["rope_half_rms"]
    c.output(out, "rope half rms out", lambda *a: reference.rope_ref(
        reference.layernorm_linear_ref(a[0], a[1], None, a[2], None, eps, norm="rmsnorm"), t["coords5"],
        t["freqs_h"], H, "half"), x, nw, t["qkv_w"])
    em, er = _stats(x, eps, rms=True)
    assert torch.equal(mean, em)
    _fp32_aux(rstd, er, "rope rms rstd")

    # varlen attention: out (T, D), lse (H, T)
    out, lse = got["varlen"]
    c.output(out, "varlen out", lambda q: reference.attention_varlen_ref(q, t["cu"], H, scale), t["qkv_p"])
    bounds = t["cu"].tolist()
    _fp32_aux(lse, torch.cat([_lse_log2(t["qkv_p"][a:b][None], H, scale)[0] for a, b in zip(bounds, bounds[1:])],
                             dim=1), "varlen lse")

    # masked attention: zero rows for invalid queries; lse over the valid keys before kv_end, 0 from kv_end on
    out, lse = got["masked"]
    c.output(out, "masked out", lambda q: reference.attention_masked_ref(q, t["kv"], H, scale), t["qkv_b3"])
    lse_ref = _lse_log2(t["qkv_b3"], H, scale, t["kv"])
    lse_ref = torch.where(torch.arange(t["N"])[None, None, :] < t["kv_end"][:, None, None], lse_ref, 0.0)
    assert torch.isfinite(lse).all()
    _fp32_aux(lse, lse_ref, "masked lse")

    # patch embedding of pre-patchified tokens
    c.output(got["tokens3"], "tokens 3-D", lambda p, w, b, pos, tok, pre: reference.patch_embed_tokens_ref(
        p, w, b, pos, t["pidx3"], ids_keep=t["keep3"], mask=t["mask3"], mask_token=tok, prefix=pre),
        t["patches3"], t["pw"], t["pb"], t["pos"], t["mtok"], t["pre"])
    c.output(got["tokens2"], "tokens 2-D", lambda p, w, pos, tok, pre: reference.patch_embed_tokens_ref(
        p, w, None, pos, t["pidx2"], ids_keep=t["keep2"], mask=t["mask2"], mask_token=tok, prefix=pre,
        cu_seqlens=t["cu2"]), t["patches2"], t["pw"], t["pos"], t["mtok"], t["pre"][:2])
    c.output(got["tokens_plain"], "tokens plain", F.linear, t["patches2"], t["pw"], t["pb"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modern_backward_ops_match_autograd_of_reference(csrc_library, tmp_path, dtype):
    t = _inputs(dtype)
    x, nw, nb, zb, H, Dh, D, N, M, eps, heps, scale = (t[k] for k in ("x", "nw", "nb", "zb", "H", "Dh", "D", "N",
                                                                       "M", "eps", "heps", "scale"))
    torch.manual_seed(1)
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    dy, dqkv_out, do_p, do_b3 = r(M, D), r(M, 3 * D), r(32, D), r(3, N, D)
    d3, d2, d_plain = r(t["B"], 3 + 9, t["De"]), r(15 + 2 * 2, t["De"]), r(25, t["De"])
    # the forward's saved tensors, from the fp32 reference math, in the op's dtypes
    f = {k: t[k].float() for k in ("x", "nw", "nb", "w1", "b1")}
    pre_ln = F.linear(F.layer_norm(f["x"], (D,), f["nw"], f["nb"], eps), f["w1"], f["b1"])
    pre_rms = F.linear(reference.rms_norm_ref(f["x"], f["nw"], None, eps), f["w1"], f["b1"])
    hmean, hrstd = _stats((F.silu(pre_ln[:, :Dh]) * pre_ln[:, Dh:]).to(dtype), heps)
    mean, rstd = _stats(x, eps)
    mean0, rstd_rms = _stats(x, eps, rms=True)
    empty = torch.empty(0)
    every = [True] * 6
    calls = {
        "swiglu_packed": ("swiglu_mlp_bwd", (dy, x, pre_ln.to(dtype), mean, rstd, hmean, hrstd, nw, nb, t["w1"],
                                             None, t["w2"], t["hw"], t["hb"], False, True)),
        "swiglu_separate": ("swiglu_mlp_bwd", (dy, x, pre_rms.to(dtype), mean0, rstd_rms, empty, empty, nw, None,
                                               t["wg"], t["wu"], t["w2"], None, None, True, False)),
        "rope_interleaved": ("layernorm_linear_rope_bwd", (dqkv_out, x, mean, rstd, nw, nb, t["qkv_w"], True,
                                                           t["coords"], t["freqs1"], H, False, False)),
        "rope_half_rms": ("layernorm_linear_rope_bwd", (dqkv_out, x, mean0, rstd_rms, nw, None, t["qkv_w"], False,
                                                        t["coords5"], t["freqs_h"], H, True, True)),
        # out and lse as the forward would give them are not read by the CPU backward (it recomputes the softmax)
        "varlen": ("attention_varlen_bwd", (do_p, t["qkv_p"], t["cu"], torch.zeros_like(do_p), torch.zeros(H, 32),
                                            H, scale)),
        "masked": ("attention_masked_bwd", (do_b3, t["qkv_b3"], t["kv"], torch.zeros_like(do_b3),
                                            torch.zeros(3, H, N), H, scale)),
        "tokens3": ("patch_embed_tokens_bwd", (d3, t["patches3"], t["pw"], t["R"], t["pidx3"], t["keep3"],
                                               t["mask3"], 3, None, every)),
        "tokens2": ("patch_embed_tokens_bwd", (d2, t["patches2"], t["pw"], t["R"], t["pidx2"], t["keep2"],
                                               t["mask2"], 2, t["cu2"], every)),
        "tokens_plain": ("patch_embed_tokens_bwd", (d_plain, t["patches2"], t["pw"], 0, None, None, None, 0, None,
                                                    [True, True, False, False, False, False])),
    }
    got = run_ops_in_library(csrc_library, calls, tmp_path)
    c = _Checker(dtype)

    # SwiGLU, packed fc1 + hidden LayerNorm + residual: (dx, dgamma, dbeta, dW1, db1, dW2, db2, dhw, dhb)
    c.grads(got["swiglu_packed"], range(9), "swiglu packed", lambda *a: reference.swiglu_mlp_ref(
        *a[:5], None, None, *a[5:7], eps, hidden_norm_weight=a[7], hidden_norm_bias=a[8], hidden_norm_eps=heps),
        [x, nw, nb, t["w1"], t["b1"], t["w2"], t["b2"], t["hw"], t["hb"]], dy)
    # separate gate / up, RMSNorm (dbeta: the gradient of a zero bias), branch only; dW1 / db1 packed (gate rows
    # first); no hidden norm: (0,) placeholders
    c.grads(got["swiglu_separate"], [0, 1, 2, lambda g: torch.cat([g[3], g[5]]), lambda g: torch.cat([g[4], g[6]]),
                                     7, 8, None, None], "swiglu separate",
            lambda *a: reference.swiglu_mlp_ref(*a, eps, norm="rmsnorm", add_residual=False),
            [x, nw, zb, t["wg"], t["bg"], t["wu"], t["bu"], t["w2"], t["b2"]], dy)

    # LayerNorm + Linear + RoPE: (dx, dgamma, dbeta, dW, db)
    c.grads(got["rope_interleaved"], range(5), "rope interleaved", lambda *a: reference.rope_ref(
        reference.layernorm_linear_ref(*a, eps), t["coords"], t["freqs1"], H, "interleaved"),
        [x, nw, nb, t["qkv_w"], t["qkv_b"]], dqkv_out)
    c.grads(got["rope_half_rms"], [0, 1, 2, 3, None], "rope half rms", lambda *a: reference.rope_ref(
        reference.layernorm_linear_ref(*a, eps, norm="rmsnorm"), t["coords5"], t["freqs_h"], H, "half"),
        [x, nw, zb, t["qkv_w"], None], dqkv_out)

    # attention
    c.grads([got["varlen"]], [0], "varlen dqkv", lambda q: reference.attention_varlen_ref(q, t["cu"], H, scale),
            [t["qkv_p"]], do_p)
    # the image without a valid key: its outputs are constant 0 (zero gradient); autograd of the reference's
    # nan_to_num of an all -inf softmax row gives NaN there, so the reference runs on the other two images
    assert torch.equal(got["masked"][2], torch.zeros(N, 3 * D, dtype=dtype))
    c.grads([got["masked"][:2]], [0], "masked dqkv", lambda q: reference.attention_masked_ref(
        q, t["kv"][:2], H, scale), [t["qkv_b3"][:2]], do_b3[:2])

    # patch tokens: (d patches, d weight, d bias, d pos, d mask_token, d prefix)
    c.grads(got["tokens3"], range(6), "tokens 3-D", lambda p, w, b, pos, tok, pre: reference.patch_embed_tokens_ref(
        p, w, b, pos, t["pidx3"], ids_keep=t["keep3"], mask=t["mask3"], mask_token=tok, prefix=pre),
        [t["patches3"], t["pw"], t["pb"], t["pos"], t["mtok"], t["pre"]], d3)
    c.grads(got["tokens2"], range(6), "tokens 2-D", lambda p, w, b, pos, tok, pre: reference.patch_embed_tokens_ref(
        p, w, b, pos, t["pidx2"], ids_keep=t["keep2"], mask=t["mask2"], mask_token=tok, prefix=pre,
        cu_seqlens=t["cu2"]), [t["patches2"], t["pw"], t["pb"], t["pos"], t["mtok"], t["pre"][:2]], d2)
    c.grads(got["tokens_plain"], [0, 1, None, None, None, None], "tokens plain", F.linear,
            [t["patches2"], t["pw"]], d_plain)


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
