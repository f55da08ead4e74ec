"""The GEMM core's fusion description (kernels/fusion.py): validation, the tensor-free Fusion, the pair plan."""

import dataclasses

import pytest
import torch

from fastvit_kernels.kernels.fusion import (PROLOGUE_GELU, PROLOGUE_LN, PROLOGUE_SWIGLU, Cast, ChannelAffine, Epilogue,
                                            Fusion, Gelu, Gemm, ImageBounds, IndexMap, LayerNorm, Operand, SwiGLU,
                                            pair_plan)

M, N, K = 6, 5, 4


def _gemm(**kw):
    a, b, c = torch.zeros(M, K), torch.zeros(K, N), torch.zeros(M, N)
    return Gemm(Operand.matrix(a), Operand.matrix(b), Operand.matrix(c), M, N, K, **kw)


def _ln(rows, feats):
    return LayerNorm(torch.zeros(rows), torch.ones(rows), torch.ones(feats), torch.zeros(feats))


@pytest.mark.parametrize("kw,match", [
    (dict(a_prologue=Cast(), b_prologue=Cast()), "at most one converted operand"),
    (dict(a_prologue=Cast(), b_prologue=Gelu()), "no prologue on the operand beside a converted one"),
    (dict(a_prologue=ChannelAffine(torch.ones(1), torch.zeros(1))), "index.k_split"),
    (dict(index=IndexMap(m_split=(6, 4))), "index.m_split"),
    (dict(index=IndexMap(image_bounds=ImageBounds("a", 2, 2))), "index.image_bounds"),
    (dict(index=IndexMap(m_split=(6, 3), k_split=(4, 2), image_bounds=ImageBounds("d", 2, 2))), "operand"),
    (dict(epilogue=Epilogue(gelu=True, gelu_grad_of=torch.zeros(M, N))), "not both"),
    (dict(epilogue=Epilogue(store_preact=torch.zeros(M, N))), "store_preact"),
    (dict(epilogue=Epilogue(gelu=True, store_preact=torch.zeros(M, N).t())), "contiguous"),
    (dict(epilogue=Epilogue(a_rowsum=torch.zeros(M + 1))), "a_rowsum"),
    (dict(gelu_approximate="fast"), "approximate"),
])
def test_invalid_descriptions_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        _gemm(**kw)


def test_mixed_dtypes_need_a_conversion():
    a, b, c = torch.zeros(M, K, dtype=torch.float16), torch.zeros(K, N), torch.zeros(M, N)
    with pytest.raises(ValueError, match="one dtype"):
        Gemm(Operand.matrix(a), Operand.matrix(b), Operand.matrix(c), M, N, K)
    g = Gemm(Operand.matrix(a), Operand.matrix(b), Operand.matrix(c), M, N, K, a_prologue=Cast())
    assert g.compute_dtype == torch.float32 and not g.fusion.plain


def test_fusion_record_name_and_constexprs_round_trip():
    pre = torch.zeros(M, N)
    g = _gemm(a_prologue=_ln(M, K), epilogue=Epilogue(bias=torch.zeros(N), gelu=True, store_preact=pre),
              gelu_approximate="tanh")
    f = g.fusion
    assert f == Fusion(a_prologue=PROLOGUE_LN.value, bias=True, gelu=True, store_preact=True, gelu_tanh=True)
    assert f.name == "a_ln+bias+gelu_store+tanh" and f.plain
    assert f.constexprs()["A_PROLOGUE"] == 1 and f.constexprs()["STORE_PREACT"]
    assert Fusion.from_constexprs(f.constexprs()) == f
    # a pair kernel's suffixed keywords
    pair_kw = {f"{k}1": v for k, v in f.constexprs().items()}
    assert Fusion.from_constexprs(pair_kw, "1") == f
    assert _gemm().fusion.name == "plain"
    # the kernels' tensor arguments: absent ones are C's storage (never read: their flags are off)
    bias, res, aux, rowsum, mean, rstd, gamma, beta = g.pointers()
    assert aux is pre and res is g.c.tensor and rowsum is g.c.tensor and mean is g.a_prologue.mean


BWD = {  # the backward pairs' fusions (ops/linear.py, ops/layernorm_mlp.py)
    "fc2": (Fusion(b_prologue=PROLOGUE_GELU.value, a_rowsum=True), Fusion(gelu_grad=True)),
    "fc1": (Fusion(b_prologue=PROLOGUE_LN.value, a_rowsum=True), Fusion()),
    "proj": (Fusion(a_rowsum=True), Fusion()),
}


@pytest.mark.parametrize("form,dtype,version,alone", [
    ("tma", torch.bfloat16, (3, 9), set()),
    ("tma", torch.float32, (3, 9), {"fc2", "fc1", "proj"}),
    ("tma", torch.bfloat16, (3, 4), {"fc2"}),
    ("pointer", torch.bfloat16, (3, 9), {"fc2"}),
    ("pointer", torch.float32, (3, 4), {"fc2"}),
])
def test_pair_plan(form, dtype, version, alone):
    """Which backward pairs share a launch, per kernel form, dtype and Triton version (the AOT check's spills)."""
    got = {name for name, (f0, f1) in BWD.items()
           if pair_plan(f0, f1, form=form, dtype=dtype, triton_version=version) is not None}
    assert got == alone


def test_pair_plan_refuses_forward_fusions():
    plain = Fusion()
    for f in (Fusion(residual=True), Fusion(gelu=True), Fusion(split=True), Fusion(a_prologue=3)):
        assert "do not carry" in pair_plan(plain, f, form="tma", dtype=torch.float16, triton_version=(3, 9))
    tanh = dataclasses.replace(plain, gelu_tanh=True)
    assert "GELU forms" in pair_plan(plain, tanh, form="tma", dtype=torch.float16, triton_version=(3, 9))
    with pytest.raises(ValueError, match="form"):
        pair_plan(plain, plain, form="cublas", dtype=torch.float16, triton_version=(3, 9))


def _b2(**kw):
    return Operand.matrix(torch.zeros(K, N, **kw))


@pytest.mark.parametrize("kw,match", [
    (dict(epilogue=Epilogue(swiglu=True)), "b2"),  # the SwiGLU epilogue needs the up operand
    (dict(b_prologue=SwiGLU()), "b2"),
    (dict(b2=_b2()), "b2"),  # b2 without a SwiGLU step
    (dict(a_prologue=SwiGLU(), b2=_b2()), "SwiGLU on B only"),
    (dict(epilogue=Epilogue(swiglu=True), b2=_b2(dtype=torch.float16)), "b2"),
    (dict(epilogue=Epilogue(swiglu=True), b2=Operand.matrix_t(torch.zeros(N, K))), "strides"),
    (dict(epilogue=Epilogue(up_bias=torch.zeros(N))), "up_bias"),
    (dict(epilogue=Epilogue(swiglu=True, store_preact=torch.zeros(M, N)), b2=_b2()), r"\(6, 10\)"),
    (dict(epilogue=Epilogue(swiglu=True, residual=Operand.matrix(torch.zeros(M, N))), b2=_b2()), "residual"),
    (dict(epilogue=Epilogue(swiglu=True), b2=_b2(), index=IndexMap(m_split=(6, 3))), "split"),
    (dict(epilogue=Epilogue(swiglu=True), b_prologue=SwiGLU(), b2=_b2()), "one SwiGLU step"),
    (dict(epilogue=Epilogue(swiglu_grad_of=torch.zeros(M, 2 * N), bias=torch.zeros(N))), "no bias"),
    (dict(epilogue=Epilogue(swiglu_grad_of=torch.zeros(M, 2 * N)), a_prologue=Gelu()), "without GELU"),
])
def test_invalid_swiglu_descriptions(kw, match):
    with pytest.raises(ValueError, match=match):
        _gemm(**kw)


def test_swiglu_fusions_name_round_trip_and_stay_off_the_other_forms():
    """The SwiGLU fusions: named, round-tripped through the general kernel's constexprs, not plain (so not on the
    TMA kernel, the cuBLAS path or a pair), and the pair plan says why."""
    fwd = _gemm(a_prologue=_ln(M, K), b2=_b2(), epilogue=Epilogue(bias=torch.zeros(N), up_bias=torch.zeros(N),
                                                                  swiglu=True, store_preact=torch.zeros(M, 2 * N)))
    dgrad = _gemm(epilogue=Epilogue(swiglu_grad_of=torch.zeros(M, 2 * N)))
    wgrad = _gemm(b_prologue=SwiGLU(), b2=_b2(), epilogue=Epilogue(a_rowsum=torch.zeros(M)))
    names = [g.fusion.name for g in (fwd, dgrad, wgrad)]
    assert names == ["a_ln+bias+up_bias+swiglu_store", "dswiglu", "b_swiglu+a_rowsum"]
    for g in (fwd, dgrad, wgrad):
        f = g.fusion
        assert f.glu and not f.plain
        assert Fusion.from_constexprs({**f.constexprs(), **f.glu_constexprs()}) == f
        assert "SwiGLU" in pair_plan(f, Fusion(), form="pointer", dtype=torch.float16, triton_version=(3, 9))
    assert wgrad.fusion.b_prologue == PROLOGUE_SWIGLU.value
    b2, up_bias = fwd.glu_pointers()
    assert b2 is fwd.b2.tensor and up_bias is fwd.epilogue.up_bias
    assert dgrad.glu_pointers() == (dgrad.c.tensor, dgrad.c.tensor)
    assert not Fusion().glu and Fusion().glu_constexprs() == dict(SWIGLU=False, HAS_UP_BIAS=False, DSWIGLU=False)
