"""The C++ library's CPU backward kernels (csrc/cpu/classic_bwd.cpp) in a process that loads only ``_C``: every
gradient output against ``torch.autograd.grad`` of the eager references of fastvit_kernels.reference (fp32; bf16
results by the 2x rule of fastvit_kernels.accuracy, with the reference also run in bf16), from the tensors the
forward ops save (fp32 row statistics, the attention log-sum-exp in log2 units, qkv / o / the fc1
pre-activation in the input dtype). The outputs the ops return without a counterpart (a (0,) bias gradient
without a bias, empty image / weight gradients when not asked for) are checked for their shape; the bias
gradients the ops return also without a bias (dbeta of a norm without bias, db1 / db2 of the MLP, dbias of
patch_embed) are held to the gradient of a zero bias. Odd shapes: N = 17, head_dim 72, D = 144 and a hidden
size of 200 (not powers of two), a 30 x 26 image at P = 8 (zero-padded to whole patches)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import reference
from tests.csrc.conftest import run_ops_in_library
from tests.helpers import assert_close_to_ref

B, N, D, H, HIDDEN, EPS = 2, 17, 144, 2, 200, 1e-6
SCALE = (D // H) ** -0.5
MEAN_C, STD_C = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])


def _stats(x: torch.Tensor, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's saved fp32 row statistics (mean, rstd = 1 / sqrt(var + eps)); RMSNorm: mean 0."""
    x = x.float()
    if rms:
        return torch.zeros(x.shape[0]), torch.rsqrt(x.pow(2).mean(-1) + EPS)
    return x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + EPS)


def _lse_log2(qkv: torch.Tensor) -> torch.Tensor:
    Bq, Nq, three_d = qkv.shape
    q, k, _ = qkv.float().view(Bq, Nq, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4)
    return torch.logsumexp(q @ k.transpose(-2, -1) * SCALE, dim=-1) / math.log(2.0)


def _ref_grads(fn, args: dict, wrt: list[str], dout: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of ``fn(**args)`` w.r.t. the arguments ``wrt`` for the output gradient ``dout``, every float
    tensor argument cast to ``dtype`` first."""
    a = {k: v.detach().to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    for k in wrt:
        a[k] = a[k].requires_grad_()
    return list(torch.autograd.grad(fn(**a), [a[k] for k in wrt], dout.to(dtype)))


class Case:
    """One backward call: the op's arguments, and which of its outputs are which reference gradients."""

    def __init__(self, op: str, args: tuple, ref_fn, ref_args: dict, outputs: list, dout: torch.Tensor):
        """outputs: per op output, a reference argument name (held to its gradient) or a shape (an output
        that must be that empty shape)."""
        self.op, self.args, self.ref_fn, self.ref_args, self.outputs, self.dout = op, args, ref_fn, ref_args, \
            outputs, dout

    def check(self, got, dtype: torch.dtype, label: str) -> None:
        got = got if isinstance(got, (tuple, list)) else (got,)
        assert len(got) == len(self.outputs), f"{label}: {len(got)} outputs, expected {len(self.outputs)}"
        wrt = [o for o in self.outputs if isinstance(o, str)]
        ref32 = dict(zip(wrt, _ref_grads(self.ref_fn, self.ref_args, wrt, self.dout, torch.float32)))
        lowp = {} if dtype == torch.float32 else dict(zip(wrt, _ref_grads(self.ref_fn, self.ref_args, wrt,
                                                                          self.dout, dtype)))
        for i, (actual, what) in enumerate(zip(got, self.outputs)):
            if not isinstance(what, str):
                assert tuple(actual.shape) == tuple(what), f"{label} output {i}: shape {tuple(actual.shape)} != {what}"
                continue
            assert actual.dtype == dtype, f"{label} d{what}: dtype {actual.dtype}, expected {dtype}"
            assert_close_to_ref(actual, ref32[what], lowp.get(what), name=f"{label} d{what}")


def _cases(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    zeros = lambda n: torch.zeros(n, dtype=dtype)  # noqa: E731
    M = B * N
    x = r(M, D)
    nw, nb = 1 + 0.1 * r(D), 0.1 * r(D)
    qkv_w, qkv_b, proj_w, proj_b = 0.05 * r(3 * D, D), 0.1 * r(3 * D), 0.05 * r(D, D), 0.1 * r(D)
    fc1_w, fc1_b, fc2_w, fc2_b = 0.05 * r(HIDDEN, D), 0.1 * r(HIDDEN), 0.05 * r(D, HIDDEN), 0.1 * r(D)
    cases = {}

    # norm1 + qkv: LayerNorm with biases; RMSNorm without a norm bias (dbeta: a zero bias's gradient) or Linear bias
    mean, rstd = _stats(x)
    dqkv = r(M, 3 * D)
    cases["ln_linear"] = Case(
        "layernorm_linear_bwd", (dqkv, x, mean, rstd, nw, nb, qkv_w, True, False), reference.layernorm_linear_ref,
        dict(x=x, norm_weight=nw, norm_bias=nb, weight=qkv_w, bias=qkv_b, eps=EPS),
        ["x", "norm_weight", "norm_bias", "weight", "bias"], dqkv)
    mean0, rstd_rms = _stats(x, rms=True)
    cases["rms_linear_no_bias"] = Case(
        "layernorm_linear_bwd", (dqkv, x, mean0, rstd_rms, nw, None, qkv_w, False, True),
        reference.layernorm_linear_ref,
        dict(x=x, norm_weight=nw, norm_bias=zeros(D), weight=qkv_w, bias=None, eps=EPS, norm="rmsnorm"),
        ["x", "norm_weight", "norm_bias", "weight", (0,)], dqkv)

    # proj + residual (the residual's gradient is dout itself: not an output of the op)
    dy = r(M, D)
    res = r(M, D)
    cases["linear_res"] = Case(
        "linear_residual_bwd", (dy, x, proj_w, True), reference.linear_residual_ref,
        dict(x=x, weight=proj_w, bias=proj_b, residual=res), ["x", "weight", "bias"], dy)
    cases["linear_res_no_bias"] = Case(
        "linear_residual_bwd", (dy, x, proj_w, False), reference.linear_residual_ref,
        dict(x=x, weight=proj_w, bias=None, residual=res), ["x", "weight", (0,)], dy)

    # attention, from qkv, the output and lse (log2 units) as the forward saves them
    qkv = r(B, N, 3 * D)
    o = reference.attention_ref(qkv.float(), H, SCALE).to(dtype)
    do = r(B, N, D)
    cases["attention"] = Case("attention_bwd", (do, qkv, o, _lse_log2(qkv), H, SCALE), reference.attention_ref,
                              dict(qkv=qkv, num_heads=H, scale=SCALE), ["qkv"], do)

    # norm2 + MLP: LayerNorm, all biases, residual, the stored pre-activation, exact GELU; and RMSNorm without norm /
    # fc2 bias, no residual, the pre-activation recomputed, tanh GELU
    xf = x.float()
    preact = F.linear(F.layer_norm(xf, (D,), nw.float(), nb.float(), EPS), fc1_w.float(), fc1_b.float()).to(dtype)
    cases["mlp"] = Case(
        "layernorm_mlp_bwd", (dy, x, preact, mean, rstd, nw, nb, fc1_w, fc1_b, fc2_w, True, False, "none", False),
        reference.layernorm_mlp_ref,
        dict(x=x, norm_weight=nw, norm_bias=nb, fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b,
             eps=EPS),
        ["x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"], dy)
    cases["mlp_rms_recompute_tanh"] = Case(
        "layernorm_mlp_bwd", (dy, x, x.new_empty(0, HIDDEN), mean0, rstd_rms, nw, None, fc1_w, fc1_b, fc2_w, False,
                              True, "tanh", True),
        reference.layernorm_mlp_ref,
        dict(x=x, norm_weight=nw, norm_bias=zeros(D), fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w,
             fc2_bias=zeros(D), eps=EPS, add_residual=False, approximate="tanh", norm="rmsnorm"),
        ["x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"], dy)

    # the attention half, from the qkv, o, lse and statistics the forward saves; with and without the two biases
    x3 = x.view(B, N, D)
    dout3 = r(B, N, D)
    for label, qb, pb in (("block", qkv_b, proj_b), ("block_no_bias", None, None)):
        qkv_s = reference.layernorm_linear_ref(*[None if t is None else t.float() for t in (x3, nw, nb, qkv_w, qb)],
                                               EPS).to(dtype)
        o_s = reference.attention_ref(qkv_s.float(), H, SCALE).to(dtype)
        cases[label] = Case(
            "attention_block_bwd", (dout3, x3, qkv_s, o_s, _lse_log2(qkv_s), mean, rstd, nw, nb, qkv_w, proj_w,
                                    qb is not None, pb is not None, H, SCALE),
            reference.attention_block_ref,
            dict(x=x3, norm_weight=nw, norm_bias=nb, qkv_weight=qkv_w, qkv_bias=qb, proj_weight=proj_w,
                 proj_bias=pb, num_heads=H, scale=SCALE, eps=EPS),
            ["x", "norm_weight", "norm_bias", "qkv_weight", "qkv_bias" if qb is not None else (0,), "proj_weight",
             "proj_bias" if pb is not None else (0,)], dout3)

    # patch embedding of a 30 x 26 image at P = 8 (a 4 x 4 grid, zero-padded): uint8 pixels with the normalisation
    # constants, class + 2 register tokens, weight gradient only; then channels_last float images needing their
    # gradient, class token only, no_embed_class, no weight gradient (dbias: a zero bias's gradient)
    P, Np = 8, 16
    pe_w, pe_b = 0.05 * r(D, 3, P, P), 0.1 * r(D)
    images = torch.randint(0, 256, (B, 3, 30, 26), dtype=torch.uint8)
    norm_u8 = torch.stack([1 / (STD_C * 255), -MEAN_C / STD_C])
    pos, cls, reg = 0.1 * r(1, 3 + Np, D), r(1, 1, D), r(1, 2, D)
    dpe = r(B, 3 + Np, D)
    cases["patch_embed"] = Case(
        "patch_embed_bwd", (dpe, images, pe_w, norm_u8, 1, 2, False, True, False), reference.patch_embed_ref,
        dict(images=images, weight=pe_w, bias=pe_b, pos_embed=pos, cls_token=cls, reg_token=reg, mean=MEAN_C.tolist(),
             std=STD_C.tolist(), dynamic_img_pad=True),
        [(0,), "weight", "bias", "pos_embed", "cls_token", "reg_token"], dpe)
    images_f = torch.rand(B, 3, 30, 26, dtype=dtype).contiguous(memory_format=torch.channels_last)
    norm_f = torch.stack([1 / STD_C, -MEAN_C / STD_C])
    dpe1 = r(B, 1 + Np, D)
    cases["patch_embed_images_grad"] = Case(
        "patch_embed_bwd", (dpe1, images_f, pe_w, norm_f, 1, 0, True, False, True), reference.patch_embed_ref,
        dict(images=images_f, weight=pe_w, bias=zeros(D), pos_embed=pos[:, 3:], cls_token=cls, no_embed_class=True,
             mean=MEAN_C.tolist(), std=STD_C.tolist(), dynamic_img_pad=True),
        ["images", (0,), "bias", "pos_embed", "cls_token", (0,)], dpe1)
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_classic_backward_ops_match_reference_gradients(csrc_library, tmp_path, dtype):
    cases = _cases(dtype)
    got = run_ops_in_library(csrc_library, {k: (c.op, c.args) for k, c in cases.items()}, tmp_path)
    for label, case in cases.items():
        case.check(got[label], dtype, label)
    # the image gradient keeps the images' memory format, as the op's fake (torch.empty_like(images))
    assert got["patch_embed_images_grad"][0].is_contiguous(memory_format=torch.channels_last)


def test_cpu_backward_kernels_reject_bad_shapes_by_name(csrc_library, tmp_path):
    qkv = torch.randn(1, 5, 12)
    bad_lse = torch.randn(1, 2, 4)
    with pytest.raises(AssertionError, match=r"fastvit::attention_bwd: lse must have shape \(1, 2, 5\); got "
                                             r"\(1, 2, 4\)"):
        run_ops_in_library(csrc_library, {"bad": ("attention_bwd", (torch.randn(1, 5, 4), qkv,
                                                                    torch.randn(1, 5, 4), bad_lse, 2, 1.0))},
                           tmp_path)
