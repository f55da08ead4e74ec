"""ops.patch_embed_tokens on the Triton path (interpreter): output and every gradient against the fp32 eager
reference (reference.patch_embed_tokens_ref) in both forms (3-D collator, 2-D packed), with MAE token selection,
iBOT masks, per-token position rows with -1 entries and prefix rows; the GEMM core's token steps on the pointer
kernel and the cuBLAS path; deterministic backward; bad inputs rejected before any launch."""

import pytest
import torch

from fastvit_kernels import ops, reference
from fastvit_kernels.backend import use_gemm_impl, use_gemm_kernel
from tests.helpers import DTYPES_INTERPRETER, assert_fwd_bwd_deterministic, assert_fwd_bwd_match, count_launches

NAMES = ["patches", "weight", "bias", "pos", "mask_token", "prefix"]


def _op(patches, weight, bias, pos, mask_token, prefix, **kw):
    return ops.patch_embed_tokens(patches, weight, bias, pos, mask_token=mask_token, prefix=prefix,
                                  backend="triton", **kw)


def _ref(patches, weight, bias, pos, mask_token, prefix, **kw):
    return reference.patch_embed_tokens_ref(patches, weight, bias, pos, mask_token=mask_token, prefix=prefix, **kw)


def _case(form: str, B: int, N: int, K: int, D: int, keep: int | None, masked: bool, with_pos: bool,
          n_prefix: int | None, seqs: int = 3, bias: bool = True, seed: int = 0):
    """(inputs, kwargs) of one call: 3-D (B, N, K) patches, or 2-D (B * N, K) packed into ``seqs`` sequences;
    ``keep`` kept tokens per image (3-D) / in all (2-D) in random order, or None; masks at ~40 %; pos rows with
    about one index in five -1; ``n_prefix`` prefix rows or None."""
    g = torch.Generator().manual_seed(seed)
    R = 11
    if form == "3d":
        patches = torch.randn(B, N, K, generator=g)
        ids = None if keep is None else torch.stack([torch.randperm(N, generator=g)[:keep] for _ in range(B)])
        out_lead = (B, N if keep is None else keep)
        pidx = torch.randint(-1, R, (B, N), generator=g)
        cu = None
    else:
        T = B * N
        patches = torch.randn(T, K, generator=g)
        ids = None if keep is None else torch.randperm(T, generator=g)[:keep]
        out_lead = (T if keep is None else keep,)
        pidx = torch.randint(-1, R, (T,), generator=g)
        t_out = out_lead[0]
        cuts = sorted(torch.randperm(t_out - 1, generator=g)[:seqs - 1].add(1).tolist()) if t_out > seqs else []
        cu = torch.tensor([0, *cuts, t_out], dtype=torch.int32) if n_prefix is not None else None
    pidx[pidx == 0] = -1  # more "no position" entries
    weight = torch.randn(D, K, generator=g) / K ** 0.5
    inputs = [patches, weight, torch.randn(D, generator=g) if bias else None,
              torch.randn(R, D, generator=g) if with_pos else None,
              torch.randn(D, generator=g) if masked else None,
              None if n_prefix is None else torch.randn(n_prefix, D, generator=g)]
    kw = dict(pos_index=pidx if with_pos else None, ids_keep=ids,
              mask=(torch.rand(out_lead, generator=g) < 0.4) if masked else None, cu_seqlens=cu)
    return inputs, kw


# (form, B, N, K, D, keep, masked, with_pos, n_prefix): MAE's 25 % keep ratio (4 of 17) in random order, iBOT masks,
# pos -1 entries, prefix 0 / 1 / 5 rows, one token per image, D = 72 (not a power of two)
CASES = {
    "3d_mae_mask_pos_prefix1": ("3d", 2, 17, 48, 72, 4, True, True, 1),
    "2d_keep_mask_pos_prefix5": ("2d", 2, 17, 48, 72, 9, True, True, 5),
    "3d_all_prefix0_nobias": ("3d", 2, 17, 48, 72, None, False, False, 0),
    "3d_one_token_mask_pos": ("3d", 3, 1, 48, 40, None, True, True, None),
    "2d_all_mask_noprefix": ("2d", 1, 17, 12, 72, None, True, True, None),
}


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    form, B, N, K, D, keep, masked, with_pos, n_prefix = CASES[case]
    inputs, kw = _case(form, B, N, K, D, keep, masked, with_pos, n_prefix, bias=case != "3d_all_prefix0_nobias")
    assert_fwd_bwd_match(_op, _ref, inputs, dtype, NAMES, **kw)


def test_patch_size_16_rgb():
    """K = 3 * 16 * 16 = 768 (a ViT/16's patches), 25 % kept, masks and a class token, fp32."""
    inputs, kw = _case("3d", 2, 16, 768, 24, 4, True, True, 1)
    assert_fwd_bwd_match(_op, _ref, inputs, torch.float32, NAMES, **kw)


def test_frozen_patches_and_weight_skip_their_gemms(monkeypatch):
    """Patches that do not require grad get none; a frozen weight skips the weight GEMM (the bias gradient then
    comes from a segment sum) and both agree with the reference."""
    from fastvit_kernels.kernels import patch_tokens

    inputs, kw = _case("3d", 2, 17, 48, 72, 4, True, True, 1)
    gemms = []
    real = patch_tokens.gemm
    monkeypatch.setattr(patch_tokens, "gemm", lambda g: (gemms.append(g.fusion.name), real(g))[1])
    patches, weight, bias, pos, tok, pre = inputs
    leaves = [t.clone().requires_grad_() for t in (bias, pos, tok, pre)]
    out = _op(patches, weight, *leaves, **kw)
    out.backward(torch.ones_like(out))
    ref_leaves = [t.clone().requires_grad_() for t in (bias, pos, tok, pre)]
    ref = _ref(patches, weight, *ref_leaves, **kw)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert gemms == ["bias+a_rows+c_rows+mask_token+pos_rows"]  # the forward only


def test_backward_is_bit_identical_across_runs():
    inputs, kw = _case("2d", 2, 17, 48, 72, 20, True, True, 2)
    assert_fwd_bwd_deterministic(_op, inputs, **kw)


def test_cublas_path_matches_reference():
    """Every GEMM of the op forced onto the cuBLAS path (index_select around torch.mm, the token steps in its
    epilogue kernel): output and gradients as the reference."""
    inputs, kw = _case("3d", 2, 17, 48, 72, 5, True, True, 2)
    with use_gemm_impl("cublas"):
        assert_fwd_bwd_match(_op, _ref, inputs, torch.float32, NAMES, **kw)


def _token_gemm(M=9, K=24, N=40, T=20, R=6):
    """A forward-style token GEMM (row gather, row map with a -1, mask token, position rows with a -1) and its
    expected result from eager torch."""
    from fastvit_kernels.kernels.fusion import Epilogue, Gemm, Operand, TokenGather

    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    src = torch.randperm(T, generator=g)[:M].to(torch.int32)
    c_rows = torch.randperm(M + 4, generator=g)[:M]
    c_rows[2] = -1
    mask = torch.rand(M, generator=g) < 0.5
    tok, pos = torch.randn(N, generator=g), torch.randn(R, N, generator=g)
    pidx = torch.randint(-1, R, (M,), generator=g)
    out = torch.full((M + 4, N), 7.0)
    spec = Gemm(Operand.matrix(x), Operand.matrix_t(w), Operand.matrix(out), M, N, K,
                epilogue=Epilogue(bias=b, mask=mask, mask_token=tok, pos=pos, pos_index=pidx),
                gather=TokenGather(a_rows=src, c_rows=c_rows))
    y = torch.where(mask[:, None], tok, x[src.long()] @ w.t() + b) + pos[pidx.clamp(min=0)] * (pidx >= 0)[:, None]
    want = torch.full((M + 4, N), 7.0)
    keep = c_rows >= 0
    want[c_rows[keep]] = y[keep]
    return spec, want


@pytest.mark.parametrize("path", ["pointer", "cublas"])
def test_gemm_core_token_steps(path):
    """The record's token steps on the pointer kernel and on gemm_impl.cublas_gemm called directly: the same
    result; a row mapped to -1 is not written."""
    from fastvit_kernels.kernels import gemm_impl, matmul

    spec, want = _token_gemm()
    if path == "pointer":
        with use_gemm_impl("triton"), use_gemm_kernel("tma"):  # TMA forced, yet a gather must take the pointer form
            assert matmul.route(spec)[0] == "pointer" and "gather" in matmul.route(spec)[1]
            matmul.gemm(spec)
    else:
        gemm_impl.cublas_gemm(spec)
    torch.testing.assert_close(spec.c.tensor, want, rtol=1e-5, atol=1e-5)


def test_gemm_record_rejects_bad_token_steps():
    from fastvit_kernels.kernels.fusion import Epilogue, Gemm, IndexMap, Operand, TokenGather

    x, w, out = torch.randn(8, 4), torch.randn(6, 4), torch.empty(8, 6)
    args = (Operand.matrix(x), Operand.matrix_t(w), Operand.matrix(out), 8, 6, 4)
    with pytest.raises(ValueError, match="gather.a_rows"):
        Gemm(*args, gather=TokenGather(a_rows=torch.zeros(7, dtype=torch.int64)))
    with pytest.raises(ValueError, match="gather.a_rows"):
        Gemm(*args, gather=TokenGather(a_rows=torch.zeros(8)))
    with pytest.raises(ValueError, match="no split on a gathered axis"):
        Gemm(*args, gather=TokenGather(c_rows=torch.zeros(8, dtype=torch.int64)), index=IndexMap(m_split=(4, 2)))
    with pytest.raises(ValueError, match="mask with mask_token"):
        Gemm(*args, epilogue=Epilogue(mask=torch.zeros(8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="GELU"):
        Gemm(*args, epilogue=Epilogue(gelu=True), gather=TokenGather(a_rows=torch.zeros(8, dtype=torch.int64)))


def _bad_calls():
    inputs, kw = _case("3d", 2, 5, 12, 8, 3, True, True, 1)
    patches, weight, bias, pos, tok, pre = inputs
    ok = dict(kw, mask_token=tok, prefix=pre)
    i2, k2 = _case("2d", 2, 5, 12, 8, 6, False, False, 1)
    return {
        "ids_keep int32": ((patches, weight, bias, pos), dict(ok, ids_keep=kw["ids_keep"].int()), TypeError,
                           "ids_keep must be an int64"),
        "ids_keep out of range": ((patches, weight, bias, pos), dict(ok, ids_keep=kw["ids_keep"] + 5), ValueError,
                                  r"ids_keep values must lie in \[0, 5\)"),
        "ids_keep wrong batch": ((patches, weight, bias, pos), dict(ok, ids_keep=kw["ids_keep"][:1]), ValueError,
                                 "ids_keep must be"),
        "pos_index out of range": ((patches, weight, bias, pos), dict(ok, pos_index=kw["pos_index"] + 11),
                                   ValueError, r"pos_index values must lie in \[-1, 11\)"),
        "pos_index shape": ((patches, weight, bias, pos), dict(ok, pos_index=kw["pos_index"][:, :2]), ValueError,
                            "pos_index must have shape"),
        "mask without mask_token": ((patches, weight, bias, pos), dict(ok, mask_token=None), ValueError,
                                    "mask needs mask_token"),
        "mask_token without mask": ((patches, weight, bias, pos), dict(ok, mask=None), ValueError,
                                    "mask_token given without mask"),
        "mask shape": ((patches, weight, bias, pos), dict(ok, mask=kw["mask"][:, :1]), ValueError,
                       "mask must have the output tokens' shape"),
        "prefix 3-D": ((patches, weight, bias, pos), dict(ok, prefix=pre[None]), ValueError,
                       r"prefix must have shape \(n_prefix, D=8\)"),
        "weight K": ((patches, weight[:, :5], bias, pos), ok, ValueError, "weight must be"),
        "2-D prefix without cu_seqlens": ((i2[0], i2[1], None, None), dict(k2, cu_seqlens=None, prefix=i2[5]),
                                          ValueError, "needs cu_seqlens"),
        "cu_seqlens out of range": ((i2[0], i2[1], None, None),
                                    dict(k2, prefix=i2[5], cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)),
                                    ValueError, "end at T=6"),
        "cu_seqlens int64": ((i2[0], i2[1], None, None), dict(k2, prefix=i2[5], cu_seqlens=k2["cu_seqlens"].long()),
                             TypeError, "int32"),
        "meta tensors": ((patches.to("meta"), weight.to("meta"), None, None), {}, ValueError, "meta device"),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise_before_any_launch(name, monkeypatch):
    args, kw, err, match = BAD[name]
    with count_launches(monkeypatch) as launches, pytest.raises(err, match=match):
        ops.patch_embed_tokens(*args, **kw, backend="triton")
    # no kernel launched (the value checks' host reads are aten reductions / copies, not kernels of the op)
    assert not [k for k in launches if not k.startswith("aten.")], launches


def test_flop_formulas_count_kept_tokens():
    from torch.utils.flop_counter import FlopCounterMode

    inputs, kw = _case("3d", 2, 17, 48, 72, 4, False, False, None)
    patches, weight = inputs[0], inputs[1].requires_grad_()
    with FlopCounterMode(display=False, custom_mapping=ops.flop_formulas()) as counter:
        ops.patch_embed_tokens(patches, weight, None, ids_keep=kw["ids_keep"], backend="triton").sum().backward()
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 48 * 72)  # forward + the weight-gradient GEMM


def test_strided_parameters():
    """Non-contiguous weight / pos / bias views (a transposed weight, every other pos row and bias entry) give the
    reference's result."""
    inputs, kw = _case("3d", 2, 17, 48, 72, 4, True, True, 1)
    patches, weight, bias, pos, tok, pre = inputs
    w_t = weight.t().contiguous().t()
    pos2 = torch.stack([pos, torch.zeros_like(pos)], 1).reshape(-1, pos.shape[1])[::2]
    bias2 = torch.stack([bias, torch.zeros_like(bias)], 1).reshape(-1)[::2]
    assert not (w_t.is_contiguous() or bias2.is_contiguous())
    out = _op(patches, w_t, bias2, pos2, tok, pre, **kw)
    torch.testing.assert_close(out, _ref(patches, weight, bias, pos, tok, pre, **kw), rtol=1e-5, atol=1e-5)
