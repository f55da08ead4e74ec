"""The C++ library's CPU kernels (csrc/cpu/) against the fp32 eager references of fastvit_kernels.reference, in a
process that loads only ``_C``: every output, the auxiliary ones the backward keeps included (fp32 LayerNorm row
statistics, the attention log-sum-exp in log2 units, the fc1 pre-activation). Odd shapes: N = 17, head_dim 72,
D not a power of two, an image side that is not a multiple of P (padded, as timm's dynamic_img_pad)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import reference
from tests.csrc.conftest import run_ops_in_library

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _stats(x: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    if rms:
        return torch.zeros(x.shape[0]), torch.rsqrt(x.pow(2).mean(-1) + eps)
    return x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + eps)


def _lse_log2(qkv: torch.Tensor, H: int, scale: float) -> torch.Tensor:
    B, N, three_d = qkv.shape
    q, k, _ = qkv.float().view(B, N, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4)
    return torch.logsumexp(q @ k.transpose(-2, -1) * scale, dim=-1) / math.log(2.0)


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_classic_forward_ops_match_reference(csrc_library, tmp_path, dtype):
    B, N, D, H, hidden, eps = 2, 17, 144, 2, 200, 1e-6
    scale = (D // H) ** -0.5
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, nw, nb = r(B, N, D), 1 + 0.1 * r(D), 0.1 * r(D)
    qkv_w, qkv_b, proj_w, proj_b = 0.05 * r(3 * D, D), 0.1 * r(3 * D), 0.05 * r(D, D), 0.1 * r(D)
    fc1_w, fc1_b, fc2_w, fc2_b = 0.05 * r(hidden, D), 0.1 * r(hidden), 0.05 * r(D, hidden), 0.1 * r(D)
    qkv = r(B, N, 3 * D)
    x2 = x.view(B * N, D)
    images = torch.randint(0, 256, (B, 3, 30, 26), dtype=torch.uint8)
    pe_w, pe_b, pos, cls, reg = 0.05 * r(D, 3, 8, 8), 0.1 * r(D), 0.1 * r(1, 1 + 2 + 16, D), r(1, 1, D), r(1, 2, D)
    mean_c, std_c = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    norm = torch.stack([1 / (std_c * 255), -mean_c / std_c])
    calls = {
        "attention": ("attention_fwd", (qkv, H, scale)),
        "ln_linear": ("layernorm_linear_fwd", (x2, nw, nb, qkv_w, qkv_b, eps, False)),
        "rms_linear": ("layernorm_linear_fwd", (x2, nw, None, qkv_w, None, eps, True)),
        "linear_res": ("linear_residual_fwd", (x2, proj_w, proj_b, x2)),
        "mlp": ("layernorm_mlp_fwd", (x2, nw, nb, fc1_w, fc1_b, fc2_w, fc2_b, eps, True, False, "none", False)),
        "mlp_tanh_recompute": ("layernorm_mlp_fwd", (x2, nw, None, fc1_w, None, fc2_w, None, eps, False, True,
                                                     "tanh", True)),
        "block": ("attention_block_fwd", (x, nw, nb, qkv_w, qkv_b, proj_w, proj_b, H, scale, eps)),
        "patch_embed": ("patch_embed_fwd", (images, pe_w, pe_b, pos, cls, reg, norm, False)),
        "patch_embed_no_embed_class": ("patch_embed_fwd", (images.float() / 255, pe_w, None, pos[:, 3:], cls,
                                                           None, None, True)),
    }
    got = run_ops_in_library(csrc_library, calls, tmp_path)
    tol = TOL[dtype]

    def close(actual, expected, what):
        assert actual.dtype == (torch.float32 if "stat" in what or "lse" in what else dtype), f"{what}: dtype {actual.dtype}"
        torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")

    out, lse = got["attention"]
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, N)
    close(out, reference.attention_ref(qkv.float(), H, scale), "attention out")
    close(lse, _lse_log2(qkv, H, scale), "attention lse")

    out, mean, rstd = got["ln_linear"]
    close(out, reference.layernorm_linear_ref(*_f32(x2, nw, nb, qkv_w, qkv_b), eps), "ln_linear out")
    em, er = _stats(x2, eps)
    close(mean, em, "ln stat mean")
    close(rstd, er, "ln stat rstd")
    out, mean, rstd = got["rms_linear"]
    close(out, reference.layernorm_linear_ref(*_f32(x2, nw, None, qkv_w, None), eps, norm="rmsnorm"), "rms out")
    em, er = _stats(x2, eps, rms=True)
    assert torch.equal(mean, em)
    close(rstd, er, "rms stat rstd")

    close(got["linear_res"], reference.linear_residual_ref(*_f32(x2, proj_w, proj_b, x2)), "linear_residual")

    out, preact, mean, rstd = got["mlp"]
    close(out, reference.layernorm_mlp_ref(*_f32(x2, nw, nb, fc1_w, fc1_b, fc2_w, fc2_b), eps), "mlp out")
    xf, nwf, nbf, w1f, b1f = _f32(x2, nw, nb, fc1_w, fc1_b)
    close(preact, F.linear(F.layer_norm(xf, (D,), nwf, nbf, eps), w1f, b1f), "mlp preact")
    out, preact, _, _ = got["mlp_tanh_recompute"]
    assert preact.shape == (0, hidden)
    close(out, reference.layernorm_mlp_ref(*_f32(x2, nw, None, fc1_w, None, fc2_w, None), eps, add_residual=False,
                                           approximate="tanh", norm="rmsnorm"), "mlp tanh rms")

    out, qkv_out, o, lse, mean, rstd = got["block"]
    close(out, reference.attention_block_ref(*_f32(x, nw, nb, qkv_w, qkv_b, proj_w, proj_b), H, scale, eps),
          "block out")
    exp_qkv = reference.layernorm_linear_ref(*_f32(x, nw, nb, qkv_w, qkv_b), eps)
    close(qkv_out, exp_qkv, "block qkv")
    close(o, reference.attention_ref(exp_qkv, H, scale), "block o")
    close(lse, _lse_log2(exp_qkv, H, scale), "block lse")

    pe_ref = reference.patch_embed_ref(images, *_f32(pe_w, pe_b, pos, cls), reg_token=reg.float(),
                                       mean=mean_c, std=std_c, dynamic_img_pad=True)
    assert got["patch_embed"].shape == (B, 3 + 16, D) and got["patch_embed"].dtype == dtype
    close(got["patch_embed"], pe_ref, "patch_embed")
    pe_ref = reference.patch_embed_ref(images.float() / 255, *_f32(pe_w, None, pos[:, 3:], cls),
                                       no_embed_class=True, dynamic_img_pad=True)
    close(got["patch_embed_no_embed_class"], pe_ref, "patch_embed no_embed_class")


def test_cpu_kernels_reject_bad_shapes_by_name(csrc_library, tmp_path):
    with pytest.raises(AssertionError, match=r"fastvit::attention_fwd: qkv's last dim must be 3 \* num_heads"):
        run_ops_in_library(csrc_library, {"bad": ("attention_fwd", (torch.randn(1, 2, 10), 2, 1.0))}, tmp_path)
