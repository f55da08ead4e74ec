"""The two Linear layers of a pre-norm ViT block's attention half, each fused with its neighbours on the GEMM core:

* :func:`layernorm_linear` -- ``Linear(LayerNorm(x))`` (norm1 + qkv). Forward (two launches): fp32 row statistics,
  then the GEMM with the LayerNorm applied in its A-operand prologue (the normalised activations never reach
  device memory) and the bias in its epilogue. Backward: dW from a GEMM that recomputes LayerNorm(x) in its B
  prologue and also yields db as the row sums of the dY^T tiles it loads (no extra pass over dY), and d
  LayerNorm(x) = dY @ W, the two in one launch (``matmul.gemm_pair``); then the LayerNorm backward (dgamma / dbeta
  reduced deterministically in fp32). Saved for backward: x and the fp32 row statistics.
* :func:`linear_residual` -- ``residual + Linear(x)`` (proj + the attention residual add). Forward: one GEMM with
  bias and residual in its epilogue. Backward (one launch, ``matmul.gemm_pair``): dx = dY @ W and dW = dY^T @ x,
  which also yields db from the row sums of its dY^T tiles; the residual's gradient is dY itself (no kernel).
  Saved for backward: x.

References: Ba et al. 2016 (LayerNorm), Vaswani et al. 2017 (residual pre-norm transformer block); the GEMM
fusions: docs/design.md, "The GEMM core" (the "norm1 + qkv" and "proj" rows of its table).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import autocast_inputs, check_norm_input, check_same, check_tensor, check_triton_dtype
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import resolve_backend
from ._instrument import instrumented
from ._layout import norm_bias_or_zeros, rows


# ----------------------------------------------------------------------------------------------------------------
# custom ops: LayerNorm + Linear (2-D tokens: M = B * N rows)
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::layernorm_linear_fwd", mutates_args=())
@launches_on_input_device
def _layernorm_linear_fwd(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], weight: torch.Tensor,
    bias: Optional[torch.Tensor], eps: float, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`layernorm_linear` on 2-D tokens: x (M, D) -> (out (M, N_out) in x's dtype,
    mean (M,) fp32, rstd (M,) fp32); mean and rstd (the LayerNorm row statistics, rstd = 1 / sqrt(var + eps))
    are kept for the backward and not differentiable. ``rms``: the norm is RMSNorm (mean = 0; the LayerNorm
    prologue applies it, with a zero beta when ``norm_bias`` is None)."""
    from ..kernels.layernorm import row_stats
    from ..kernels.fusion import LayerNorm
    from ..kernels.matmul import linear

    mean, rstd = row_stats(x, eps, rms=rms)
    out = linear(x, weight, bias, ln=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight, norm_bias)))
    return out, mean, rstd


@_layernorm_linear_fwd.register_fake
def _(x, norm_weight, norm_bias, weight, bias, eps, rms=False):
    M = x.shape[0]
    stats = x.new_empty((M,), dtype=torch.float32)
    return x.new_empty((M, weight.shape[0])), stats, torch.empty_like(stats)


def layernorm_linear_grads(dout: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                           norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, weight: torch.Tensor,
                           has_bias: bool, dres: torch.Tensor | None = None, rms: bool = False) -> tuple:
    """Triton backward of ``Linear(LayerNorm(x))`` (+ ``dres``, a gradient reaching x by another path, added by the
    LayerNorm backward kernel): dout (M, N_out), x (M, D) -> (dx, dgamma, dbeta, dW, db); db is (0,) without a
    bias. Launches: the dW / d LayerNorm(x) GEMM pair (one, or two where ``gemm_pair`` runs them one by one), the
    fill of the LayerNorm backward's ticket counters, the LayerNorm backward."""
    from ..kernels.layernorm import layernorm_bwd
    from ..kernels.fusion import LayerNorm
    from ..kernels.matmul import linear_backward

    M, D = x.shape
    N = weight.shape[0]
    wdt = weight.dtype
    # one launch for two GEMMs that read dY: dW = dY^T @ LayerNorm(x) (normalisation recomputed on load) with
    # db = sum_m dY from its A tiles, and d LayerNorm(x) = dY @ W; then the LayerNorm backward
    dw = torch.empty((N, D), device=x.device, dtype=wdt)
    db = torch.empty((N if has_bias else 0,), device=x.device, dtype=wdt)
    dln = torch.empty((M, D), device=x.device, dtype=x.dtype)
    linear_backward(dout, x, weight, dln, dw, db if has_bias else None,
                    x_prologue=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight, norm_bias)))
    dx, dgamma, dbeta = layernorm_bwd(x, dln, norm_weight, mean, rstd, dres=dres, rms=rms)
    return dx, dgamma, dbeta, dw, db


@fastvit_op("fastvit::layernorm_linear_bwd", mutates_args=())
@launches_on_input_device
def _layernorm_linear_bwd(
    dout: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: Optional[torch.Tensor], weight: torch.Tensor, has_bias: bool, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_linear_grads(dout, x, mean, rstd, norm_weight, norm_bias, weight, has_bias, rms=rms)


@_layernorm_linear_bwd.register_fake
def _(dout, x, mean, rstd, norm_weight, norm_bias, weight, has_bias, rms=False):
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_weight),
            torch.empty_like(weight), weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _ln_setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradient tensors for the saved-only outputs
    ctx.has_bias = bias is not None
    ctx.has_norm_bias = norm_bias is not None
    ctx.rms = rms


def _ln_backward(ctx, dout, _dmean, _drstd):
    if dout is None:
        return (None,) * 7
    x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
    dx, dgamma, dbeta, dw, db = _layernorm_linear_bwd(dout.contiguous(), x, mean, rstd, norm_weight, norm_bias,
                                                      weight, ctx.has_bias, ctx.rms)
    return (dx, dgamma, dbeta if ctx.has_norm_bias else None, dw, db if ctx.has_bias else None, None, None)


_layernorm_linear_fwd.register_autograd(_ln_backward, setup_context=_ln_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# custom ops: LayerNorm + Linear + 2D RoPE of the q / k columns (norm1 + qkv of EVA-02 / DINOv3 / PE blocks)
# ----------------------------------------------------------------------------------------------------------------
def _rope(coords: torch.Tensor, freqs: torch.Tensor, num_heads: int, D_qkv: int, half: bool):
    from ..kernels.fusion import Rope

    return Rope(coords, freqs, num_heads, D_qkv // num_heads, "half" if half else "interleaved")


@fastvit_op("fastvit::layernorm_linear_rope_fwd", mutates_args=())
@launches_on_input_device
def _layernorm_linear_rope_fwd(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], weight: torch.Tensor,
    bias: Optional[torch.Tensor], eps: float, coords: torch.Tensor, freqs: torch.Tensor, num_heads: int, half: bool,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`layernorm_linear` with RoPE: x (M, D) -> (qkv (M, 3 * D_qkv) with q and k rotated
    in the GEMM epilogue, mean (M,) fp32, rstd (M,) fp32)."""
    from ..kernels.layernorm import row_stats
    from ..kernels.fusion import LayerNorm
    from ..kernels.matmul import linear

    mean, rstd = row_stats(x, eps, rms=rms)
    out = linear(x, weight, bias, ln=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight, norm_bias)),
                 rope=_rope(coords, freqs, num_heads, weight.shape[0] // 3, half))
    return out, mean, rstd


@_layernorm_linear_rope_fwd.register_fake
def _(x, norm_weight, norm_bias, weight, bias, eps, coords, freqs, num_heads, half, rms=False):
    M = x.shape[0]
    stats = x.new_empty((M,), dtype=torch.float32)
    return x.new_empty((M, weight.shape[0])), stats, torch.empty_like(stats)


@fastvit_op("fastvit::layernorm_linear_rope_bwd", mutates_args=())
@launches_on_input_device
def _layernorm_linear_rope_bwd(
    dout: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: Optional[torch.Tensor], weight: torch.Tensor, has_bias: bool, coords: torch.Tensor,
    freqs: torch.Tensor, num_heads: int, half: bool, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta, dW, db) from d(rotated qkv): both GEMMs un-rotate dout's q / k columns as they load
    them (``matmul.linear_backward`` with ``rope``), so d(qkv before RoPE) is never stored."""
    from ..kernels.layernorm import layernorm_bwd
    from ..kernels.fusion import LayerNorm
    from ..kernels.matmul import linear_backward

    M, D = x.shape
    N = weight.shape[0]
    dw = torch.empty((N, D), device=x.device, dtype=weight.dtype)
    db = torch.empty((N if has_bias else 0,), device=x.device, dtype=weight.dtype)
    dln = torch.empty((M, D), device=x.device, dtype=x.dtype)
    linear_backward(dout, x, weight, dln, dw, db if has_bias else None,
                    x_prologue=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight, norm_bias)),
                    rope=_rope(coords, freqs, num_heads, N // 3, half))
    dx, dgamma, dbeta = layernorm_bwd(x, dln, norm_weight, mean, rstd, rms=rms)
    return dx, dgamma, dbeta, dw, db


@_layernorm_linear_rope_bwd.register_fake
def _(dout, x, mean, rstd, norm_weight, norm_bias, weight, has_bias, coords, freqs, num_heads, half, rms=False):
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_weight),
            torch.empty_like(weight), weight.new_empty((weight.shape[0] if has_bias else 0,)))


def rope_freqs_grad(qkv: torch.Tensor, dqkv: torch.Tensor, coords: torch.Tensor, num_heads: int, layout: str,
                    shared: bool) -> torch.Tensor:
    """Gradient of a RoPE's frequency table (learnable in timm's ``RotaryEmbeddingMixed``) from the rotated qkv
    (M, 3 * D) and its gradient: per pair (a, b), d theta = d_b * out_a - d_a * out_b, summed over q and k, then
    d freqs[h, j] = sum_m (y_m, x_m) * d theta[m, h, j] (summed over heads when ``shared``: Hr = 1). Eager fp32
    (one read of qkv and d(qkv)); only run when the table requires a gradient. Returns (Hr, head_dim / 2, 2)."""
    M = qkv.shape[0]
    D = qkv.shape[1] // 3
    hd = D // num_heads
    o = qkv[:, :2 * D].float().view(M, 2, num_heads, hd)
    d = dqkv[:, :2 * D].float().view(M, 2, num_heads, hd)
    sl = (slice(0, None, 2), slice(1, None, 2)) if layout == "interleaved" else (slice(0, hd // 2),
                                                                                 slice(hd // 2, None))
    dtheta = (d[..., sl[1]] * o[..., sl[0]] - d[..., sl[0]] * o[..., sl[1]]).sum(1)  # (M, H, hd / 2)
    c = coords[torch.arange(M, device=coords.device) % coords.shape[0]]  # (M, 2)
    g = torch.einsum("mhj,mc->hjc", dtheta, c)
    return g.sum(0, keepdim=True) if shared else g


def _rope_setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, weight, bias, eps, coords, freqs, num_heads, half, rms = inputs
    out, mean, rstd = output
    ctx.freqs_grad = ctx.needs_input_grad[7]
    saved = (x, mean, rstd, norm_weight, norm_bias, weight, coords, freqs)
    # the rotated qkv is kept only for a learnable table's gradient (the attention keeps it anyway)
    ctx.save_for_backward(*saved, *((out,) if ctx.freqs_grad else ()))
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.has_norm_bias = norm_bias is not None
    ctx.num_heads, ctx.half, ctx.rms = num_heads, half, rms


def _rope_backward(ctx, dout, _dmean, _drstd):
    if dout is None:
        return (None,) * 11
    x, mean, rstd, norm_weight, norm_bias, weight, coords, freqs, *out = ctx.saved_tensors
    dout = dout.contiguous()
    dx, dgamma, dbeta, dw, db = _layernorm_linear_rope_bwd(dout, x, mean, rstd, norm_weight, norm_bias, weight,
                                                           ctx.has_bias, coords, freqs, ctx.num_heads, ctx.half,
                                                           ctx.rms)
    dfreqs = None
    if ctx.freqs_grad:
        dfreqs = rope_freqs_grad(out[0], dout, coords, ctx.num_heads, "half" if ctx.half else "interleaved",
                                 shared=freqs.shape[0] == 1).to(freqs.dtype)
    return (dx, dgamma, dbeta if ctx.has_norm_bias else None, dw, db if ctx.has_bias else None, None, None, dfreqs,
            None, None, None)


_layernorm_linear_rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# custom ops: Linear + residual
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::linear_residual_fwd", mutates_args=())
@launches_on_input_device
def _linear_residual_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
) -> torch.Tensor:
    """Triton forward of :func:`linear_residual` on 2-D tokens: x (M, K), residual (M, N_out) -> out (M, N_out)
    in x's dtype (one tensor, not a tuple; the backward keeps x and the weight)."""
    from ..kernels.fusion import Operand
    from ..kernels.matmul import linear

    return linear(x, weight, bias, residual=Operand.matrix(residual))


@_linear_residual_fwd.register_fake
def _(x, weight, bias, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_grads(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool) -> tuple:
    """Triton backward of ``Linear(x)``: dout (M, N_out), x (M, K) -> (dx, dW, db), db (0,) without a bias; one
    launch (the dx / dW GEMM pair)."""
    from ..kernels.matmul import linear_backward

    M, K = x.shape
    N = weight.shape[0]
    wdt = weight.dtype
    # one launch for two GEMMs that read dY: dW = dY^T @ x with db = sum_m dY from its A tiles, and dx = dY @ W
    # (in every pair the weight-grad GEMM, whose tiles run the long K = M loop, comes first: its tiles are handed out
    # first, the short ones fill the tail)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
    dw = torch.empty((N, K), device=x.device, dtype=wdt)
    db = torch.empty((N if has_bias else 0,), device=x.device, dtype=wdt)
    linear_backward(dout, x, weight, dx, dw, db if has_bias else None)
    return dx, dw, db


@fastvit_op("fastvit::linear_residual_bwd", mutates_args=())
@launches_on_input_device
def _linear_residual_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_grads(dout, x, weight, has_bias)


@_linear_residual_bwd.register_fake
def _(dout, x, weight, has_bias):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0] if has_bias else 0,))


def _res_setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _res_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dout = dout.contiguous()
    dx, dw, db = _linear_residual_bwd(dout, x, weight, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, dout  # d residual = dY


_linear_residual_fwd.register_autograd(_res_backward, setup_context=_res_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------
@instrumented("layernorm_linear")
def layernorm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    rope_coords: torch.Tensor | None = None,
    rope_freqs: torch.Tensor | None = None,
    rope_heads: int | None = None,
    rope_layout: str = "interleaved",
    norm: str = "layernorm",
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), weight, bias)``: norm1 + qkv of a ViT block,
    fused (see module docstring); with ``rope_*``, q and k are then rotated by 2D RoPE as the GEMM stores them;
    ``norm="rmsnorm"``: RMSNorm in place of the LayerNorm.

    Args:
        x: (B, N, D) (any leading dims), fp32 | fp16 | bf16 (bf16 on GPU only).
        norm_weight, norm_bias: (D,) LayerNorm gamma and beta (norm_bias may be None: a norm without bias, as
            timm's RmsNorm).
        weight: (N_out, D) Linear weight (qkv: N_out = 3 * D); bias: (N_out,) or None.
        eps: LayerNorm epsilon (> 0; timm's ViT uses 1e-6).
        rope_coords, rope_freqs, rope_heads, rope_layout: 2D rotary position embedding of the output's q and k
            sections (N_out = 3 * D_qkv; EVA-02, DINOv3, PE): ``rope_coords`` (N, 2) fp32 (y, x) per token of
            x's token axis (prefix tokens (0, 0): unrotated), ``rope_freqs`` (1 or rope_heads, head_dim / 2, 2)
            fp32 (a learnable table gets its gradient), ``rope_heads`` H (head_dim = D_qkv / H, even),
            ``rope_layout`` "interleaved" | "half" (timm's rotate_half). The rotation is the epilogue's last step
            (after the bias); the backward GEMMs apply the inverse rotation to d(qkv) as they load it. Semantics:
            :func:`fastvit_kernels.reference.rope_ref`.
        norm: "layernorm" (``F.layer_norm``) or "rmsnorm" (timm's ``RmsNorm``, Zhang & Sennrich 2019: ``x *
            rsqrt(mean(x^2) + eps) * weight``; AIMv2, InternViT): fp32 row statistics either way, applied in the
            GEMM's A prologue; the backward is the matching norm backward.
        backend: "auto" | "triton" | "torch" (see :mod:`fastvit_kernels.backend`).

    Returns:
        (B, N, N_out) in x's dtype. Under ``torch.autocast`` inputs are cast to the autocast dtype first.
        LayerNorm statistics, the GEMM accumulation and the rotation are fp32; gradients are deterministic (no
        atomics).

    Copies: on the Triton path x is viewed as an (M, D) matrix (M = B * N) and the weight passed as
    ``weight.contiguous()``; each is copied only when its strides do not allow that (e.g. a transposed weight
    view: one (N_out, D) copy per call, its gradient flowing back through the copy).

    Raises:
        TypeError: a non-floating input; bf16 on the CPU interpreter.
        ValueError: shapes that do not chain (names the argument, expected and actual shape), mixed dtypes or
            devices, eps <= 0; a RoPE argument without the others, of the wrong shape / dtype / device, an odd
            head_dim, N_out not 3 * rope_heads * head_dim, or a bad rope_layout.
        RuntimeError: backend="triton" where Triton cannot run.

    Source: LayerNorm by Ba et al. 2016 (timm's ``nn.LayerNorm`` norm1, then the packed qkv ``nn.Linear``);
    fused as the "norm1 + qkv" GEMM of docs/design.md, "The GEMM core"; RoPE by Su et al. 2021 (RoFormer), 2D
    axial as in EVA-02 (Fang et al. 2023) and DINOv3 (Simeoni et al. 2025).
    """
    x, norm_weight, norm_bias, weight, bias = autocast_inputs(x, norm_weight, norm_bias, weight, bias)
    D = check_norm_input(x, norm_weight, norm_bias, eps, norm)
    check_tensor("weight", weight, (None, D), f"(N_out, D={D})")
    N_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N_out,), f"(N_out={N_out},)")
    check_same("x", x, norm_weight=norm_weight, norm_bias=norm_bias, weight=weight, bias=bias)
    rope = _check_rope(x, N_out, rope_coords, rope_freqs, rope_heads, rope_layout)
    if resolve_backend(x.device, backend) == "torch":
        out = reference.layernorm_linear_ref(x, norm_weight, norm_bias, weight, bias, eps, norm)
        return out if rope is None else reference.rope_ref(out, rope_coords, rope_freqs, rope_heads, rope_layout)
    check_triton_dtype("x", x)
    rms = norm == "rmsnorm"
    if rope is not None:
        out = _layernorm_linear_rope_fwd(rows(x, D), norm_weight, norm_bias, weight.contiguous(), bias, float(eps),
                                         rope_coords.contiguous(), rope_freqs.contiguous(), int(rope_heads),
                                         rope_layout == "half", rms)[0]
    else:
        out = _layernorm_linear_fwd(rows(x, D), norm_weight, norm_bias, weight.contiguous(), bias, float(eps),
                                    rms)[0]
    return out.view(*x.shape[:-1], N_out)


def _check_rope(x, N_out, coords, freqs, heads, layout) -> bool | None:
    """Validate :func:`layernorm_linear`'s RoPE arguments (before any launch); None when RoPE is off."""
    given = [a is not None for a in (coords, freqs, heads)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("rope_coords, rope_freqs and rope_heads go together; got "
                         f"rope_coords={'set' if given[0] else None}, rope_freqs={'set' if given[1] else None}, "
                         f"rope_heads={heads}")
    if layout not in ("interleaved", "half"):
        raise ValueError(f"rope_layout must be 'interleaved' or 'half'; got {layout!r}")
    if N_out % 3 or heads <= 0 or (N_out // 3) % heads or (N_out // 3 // heads) % 2:
        raise ValueError(f"RoPE needs N_out = 3 * rope_heads * head_dim with an even head_dim; got N_out={N_out}, "
                         f"rope_heads={heads}")
    hd = N_out // 3 // heads
    n_tok = x.shape[-2] if x.dim() >= 2 else 1
    check_tensor("rope_coords", coords, (n_tok, 2), f"(N={n_tok}, 2): (y, x) per token")
    check_tensor("rope_freqs", freqs, (None, hd // 2, 2), f"(1 or rope_heads={heads}, head_dim/2={hd // 2}, 2)")
    if freqs.shape[0] not in (1, heads):
        raise ValueError(f"rope_freqs must be (1 or rope_heads={heads}, {hd // 2}, 2); got {tuple(freqs.shape)}")
    for name, t in (("rope_coords", coords), ("rope_freqs", freqs)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")
    return True


@instrumented("linear_residual")
def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``: the attention output projection of a ViT block with its bias and the
    residual add in the GEMM epilogue (see module docstring).

    Args:
        x: (B, N, K) (any leading dims; proj: K = D, the attention output), fp32 | fp16 | bf16 (bf16 on GPU only).
        weight: (N_out, K) Linear weight; bias: (N_out,) or None.
        residual: (B, N, N_out), the same leading dims as x (the block input z).
        backend: "auto" | "triton" | "torch" (see :mod:`fastvit_kernels.backend`).

    Returns:
        (B, N, N_out) in x's dtype. Under ``torch.autocast`` inputs are cast to the autocast dtype first.
        Accumulation is fp32 (bias and residual added to the fp32 accumulator, one rounding to x's dtype);
        gradients are deterministic (no atomics).

    Copies: on the Triton path x and residual are viewed as (M, K) / (M, N_out) matrices (M = the product of the
    leading dims) and the weight passed as ``weight.contiguous()``; each is copied only when its strides do not
    allow that (e.g. a transposed weight view: one (N_out, K) copy per call, its gradient flowing back through the
    copy).

    Raises:
        TypeError: a non-floating input; bf16 on the CPU interpreter.
        ValueError: shapes that do not chain (names the argument, expected and actual shape), mixed dtypes or
            devices.
        RuntimeError: backend="triton" where Triton cannot run.

    Source: the residual connection of the pre-norm transformer block (Vaswani et al. 2017; ViT, Dosovitskiy et
    al. 2021, eq. 2: ``z' = MSA(LN(z)) + z``, here its projection and add); fused as the "proj" GEMM of
    docs/design.md, "The GEMM core".
    """
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, N, K) (at least 2-D); got {tuple(x.shape)}")
    K = x.shape[-1]
    check_tensor("weight", weight, (None, K), f"(N_out, K={K})")
    N_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N_out,), f"(N_out={N_out},)")
    out_shape = (*x.shape[:-1], N_out)
    check_tensor("residual", residual, out_shape, f"{out_shape} (x's leading dims, N_out={N_out})")
    check_same("x", x, weight=weight, bias=bias, residual=residual)
    if resolve_backend(x.device, backend) == "torch":
        return reference.linear_residual_ref(x, weight, bias, residual)
    check_triton_dtype("x", x)
    out = _linear_residual_fwd(rows(x, K), weight.contiguous(), bias, rows(residual, N_out))
    return out.view(out_shape)



# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------
def linear_flops(M: int, K: int, N: int) -> int:
    """Model FLOPs of ``(M, K) @ (K, N)`` (a Linear of K -> N features over M tokens), 2 per multiply-add:
    ``2 * M * K * N`` (an int). The backward (input gradient + weight gradient) counts 2x this."""
    return 2 * M * K * N


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _layernorm_linear_fwd_flop(x, norm_weight, norm_bias, weight, *args, out_shape=None, **kwargs) -> int:
    M, D = x
    return linear_flops(M, D, weight[0])


def _layernorm_linear_bwd_flop(dout, x, mean, rstd, norm_weight, norm_bias, weight, *args, out_shape=None,
                               **kwargs) -> int:
    M, D = x
    return 2 * linear_flops(M, D, weight[0])


def _linear_residual_fwd_flop(x, weight, *args, out_shape=None, **kwargs) -> int:
    M, K = x
    return linear_flops(M, K, weight[0])


def _linear_residual_bwd_flop(dout, x, weight, *args, out_shape=None, **kwargs) -> int:
    M, K = x
    return 2 * linear_flops(M, K, weight[0])


FLOP_FORMULAS = {
    "layernorm_linear_fwd": _layernorm_linear_fwd_flop, "layernorm_linear_bwd": _layernorm_linear_bwd_flop,
    # RoPE adds elementwise work only (not counted, as LayerNorm is not)
    "layernorm_linear_rope_fwd": _layernorm_linear_fwd_flop, "layernorm_linear_rope_bwd": _layernorm_linear_bwd_flop,
    "linear_residual_fwd": _linear_residual_fwd_flop, "linear_residual_bwd": _linear_residual_bwd_flop,
}
