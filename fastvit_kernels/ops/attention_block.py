"""The attention half of a pre-norm ViT block as one differentiable op: ``x + proj(MSA(LayerNorm(x)))``.

It runs the same kernels as the three ops it stands for (:func:`~fastvit_kernels.ops.layernorm_linear` for norm1 +
qkv, :func:`~fastvit_kernels.ops.attention`, :func:`~fastvit_kernels.ops.linear_residual` for proj + residual);
what being one op buys is in the backward. The block input x feeds two places, the LayerNorm and the residual
add, so with three ops autograd adds their gradients in a separate elementwise kernel (reading two (B, N, D)
tensors, writing one). Here the gradient through the residual (dY itself) is handed to the LayerNorm-backward
kernel, which adds it while it writes dx: one launch and two (B, N, D) passes over device memory fewer per block.

Forward (four launches): fp32 row statistics; the qkv GEMM with the LayerNorm in its A prologue and the bias in
its epilogue; FlashAttention-2 forward; the proj GEMM with bias and residual in its epilogue.
Backward: the proj dx / dW GEMM pair (one launch; db from the dW GEMM's row sums); the attention backward (one or
three launches, see :func:`fastvit_kernels.kernels.attention.attention_bwd`); the qkv dW / d LayerNorm GEMM pair
(one launch); the LayerNorm backward with dY added (one launch).
Saved for backward (the same tensors the three ops keep): x, qkv, the attention output, its log-sum-exp and the
LayerNorm row statistics.

Instrumentation: forward and backward report their three phases (norm1 + qkv, attention, proj + residual) through
:func:`fastvit_kernels.ops._instrument.op_scope` under the names of the public ops they equal, so an observer (the
training-step profiler) can time the op classes of the attention half separately although it is one op.

References: Dosovitskiy et al. 2021 (ViT block, eq. 2), Ba et al. 2016 (LayerNorm), Dao 2023 (FlashAttention-2);
the GEMM fusions: docs/design.md, "The GEMM core".
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import autocast_inputs, check_layernorm_input, check_same, check_tensor, check_triton_dtype
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import resolve_backend
from ._instrument import instrumented, op_scope
from .attention import attention_flops, check_heads
from .linear import layernorm_linear_grads, linear_flops, linear_grads


# ----------------------------------------------------------------------------------------------------------------
# custom ops (x: (B, N, D), contiguous)
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::attention_block_fwd", mutates_args=())
@launches_on_input_device
def _attention_block_fwd(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor], proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], num_heads: int,
    scale: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`attention_block`: x (B, N, D) -> (out (B, N, D), qkv (B, N, 3 * D) the qkv
    Linear's output, o (B, N, D) the attention output before proj, lse (B, H, N) fp32 log-sum-exp in log2 units,
    mean (M,) fp32, rstd (M,) fp32 norm1's row statistics, M = B * N); out, qkv and o in x's dtype. All but out
    are kept for the backward and not differentiable."""
    from ..kernels.attention import attention_fwd
    from ..kernels.layernorm import row_stats
    from ..kernels.fusion import LayerNorm, Operand
    from ..kernels.matmul import linear

    B, N, D = x.shape
    x2d = x.view(B * N, D)
    # each phase reports as the public op it computes (ops._instrument), so an observer can tell them apart
    with op_scope("layernorm_linear"):
        mean, rstd = row_stats(x2d, eps)
        qkv = linear(x2d, qkv_weight, qkv_bias, ln=LayerNorm(mean, rstd, norm_weight, norm_bias))
        qkv = qkv.view(B, N, 3 * D)
    with op_scope("attention"):
        o, lse = attention_fwd(qkv, num_heads, scale)
    with op_scope("linear_residual"):
        out = linear(o.view(B * N, D), proj_weight, proj_bias, residual=Operand.matrix(x2d))
    return out.view(B, N, D), qkv, o, lse, mean, rstd


@_attention_block_fwd.register_fake
def _(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, scale, eps):
    B, N, D = x.shape
    stats = x.new_empty((B * N,), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty((B, N, 3 * D)), torch.empty_like(x),
            x.new_empty((B, num_heads, N), dtype=torch.float32), stats, torch.empty_like(stats))


@fastvit_op("fastvit::attention_block_bwd", mutates_args=())
@launches_on_input_device
def _attention_block_bwd(
    dout: torch.Tensor, x: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor, has_qkv_bias: bool, has_proj_bias: bool, num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dgamma, dbeta, dW_qkv, db_qkv, dW_proj, db_proj); a bias gradient is (0,) without the bias."""
    from ..kernels.attention import attention_bwd

    B, N, D = x.shape
    M = B * N
    dout2d = dout.view(M, D)
    with op_scope("linear_residual"):
        do, dw_proj, db_proj = linear_grads(dout2d, o.view(M, D), proj_weight, has_proj_bias)
    with op_scope("attention"):
        dqkv = attention_bwd(do.view(B, N, D), qkv, o, lse, num_heads, scale)
    with op_scope("layernorm_linear"):
        # the residual's gradient (dY) is added by the LayerNorm-backward kernel as it writes dx
        dx, dgamma, dbeta, dw_qkv, db_qkv = layernorm_linear_grads(dqkv.view(M, 3 * D), x.view(M, D), mean, rstd,
                                                                   norm_weight, norm_bias, qkv_weight, has_qkv_bias,
                                                                   dres=dout2d)
    return dx.view(B, N, D), dgamma, dbeta, dw_qkv, db_qkv, dw_proj, db_proj


@_attention_block_bwd.register_fake
def _(dout, x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight, has_qkv_bias, has_proj_bias,
      num_heads, scale):
    D = x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_bias),
            torch.empty_like(qkv_weight), qkv_weight.new_empty((3 * D if has_qkv_bias else 0,)),
            torch.empty_like(proj_weight), proj_weight.new_empty((D if has_proj_bias else 0,)))


def _setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, scale, eps = inputs
    _, qkv, o, lse, mean, rstd = output
    ctx.save_for_backward(x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight)
    ctx.mark_non_differentiable(qkv, o, lse, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradient tensors for the saved-only outputs
    ctx.has_bias = (qkv_bias is not None, proj_bias is not None)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, dout, _dqkv, _do, _dlse, _dmean, _drstd):
    if dout is None:
        return (None,) * 10
    x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight = ctx.saved_tensors
    has_qkv_bias, has_proj_bias = ctx.has_bias
    dx, dgamma, dbeta, dw_qkv, db_qkv, dw_proj, db_proj = _attention_block_bwd(
        dout.contiguous(), x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight, has_qkv_bias,
        has_proj_bias, ctx.num_heads, ctx.scale)
    return (dx, dgamma, dbeta, dw_qkv, db_qkv if has_qkv_bias else None, dw_proj, db_proj if has_proj_bias else None,
            None, None, None)


_attention_block_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------------
@instrumented("attention_block")
def attention_block(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    num_heads: int,
    scale: float | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x + proj(MSA(LayerNorm(x)))``: the attention half of a pre-norm ViT block (timm's ``Block`` without
    LayerScale, dropout or stochastic depth: ``x + attn(norm1(x))``), as one op (see the module docstring).

    Args:
        x: (B, N, D), fp32 | fp16 | bf16 (bf16 on GPU only). Under ``torch.autocast`` every input is cast to the
            autocast dtype first.
        norm_weight, norm_bias: (D,) norm1's gamma and beta.
        qkv_weight: (3 * D, D), laid out as timm's packed qkv Linear (q, k, v, each heads-major); qkv_bias:
            (3 * D,) or None.
        proj_weight: (D, D); proj_bias: (D,) or None.
        num_heads: H, dividing D, with head_dim = D / H a multiple of 8 in [8, 128].
        scale: softmax scale, positive and finite; default ``head_dim ** -0.5``.
        eps: LayerNorm epsilon (> 0; timm's ViT uses 1e-6).
        backend: "auto" | "triton" | "torch" (see :mod:`fastvit_kernels.backend`).

    Returns:
        (B, N, D) in x's dtype; differentiable with respect to x and every weight. The same result as
        ``linear_residual(attention(layernorm_linear(x, ...), ...), proj_weight, proj_bias, x)`` (the same kernels
        in the same order: the output and the weight gradients are bit-identical on the Triton path; dx is too in
        fp32, and in fp16 / bf16 it is rounded once where the three ops round twice); the torch backend computes
        timm's reference.

    Raises:
        TypeError: a non-floating input; num_heads not an int; scale not a real number; bf16 on the CPU
            interpreter.
        ValueError: x not (B, N, D) with N >= 1; a weight whose shape does not chain (names the argument, the
            expected and the actual shape); mixed dtypes or devices; eps <= 0; bad heads (see num_heads).
        RuntimeError: backend="triton" where Triton cannot run.

    Source: the pre-norm ViT block's attention half (Dosovitskiy et al. 2021, eq. 2; timm's ``Block``); attention
    by FlashAttention-2 (Dao 2023), LayerNorm by Ba et al. 2016.
    """
    x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias = autocast_inputs(
        x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias)
    D = check_layernorm_input(x, norm_weight, norm_bias, eps)
    if x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be (B, N, D) with N >= 1; got {tuple(x.shape)}")
    check_tensor("qkv_weight", qkv_weight, (3 * D, D), f"(3*D={3 * D}, D={D})")
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, (3 * D,), f"(3*D={3 * D},)")
    check_tensor("proj_weight", proj_weight, (D, D), f"(D={D}, D={D})")
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, (D,), f"(D={D},)")
    num_heads, scale = check_heads(D, num_heads, scale, "x must be (B, N, D)", tuple(x.shape))
    check_same("x", x, norm_weight=norm_weight, norm_bias=norm_bias, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
               proj_weight=proj_weight, proj_bias=proj_bias)
    if resolve_backend(x.device, backend) == "torch":
        with op_scope("layernorm_linear"):
            qkv = reference.layernorm_linear_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, eps)
        with op_scope("attention"):
            o = reference.attention_ref(qkv, num_heads, scale)
        with op_scope("linear_residual"):
            return reference.linear_residual_ref(o, proj_weight, proj_bias, x)
    check_triton_dtype("x", x)
    return _attention_block_fwd(x.contiguous(), norm_weight, norm_bias, qkv_weight.contiguous(), qkv_bias,
                                proj_weight.contiguous(), proj_bias, num_heads, scale, float(eps))[0]


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _attention_block_fwd_flop(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads,
                              *args, out_shape=None, **kwargs) -> int:
    B, N, D = x
    M = B * N
    return linear_flops(M, D, 3 * D) + attention_flops(B, N, num_heads, D // num_heads) + linear_flops(M, D, D)


def _attention_block_bwd_flop(dout, x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight,
                              has_qkv_bias, has_proj_bias, num_heads, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_block_fwd_flop(x, None, None, None, None, None, None, num_heads)


FLOP_FORMULAS = {"attention_block_fwd": _attention_block_fwd_flop, "attention_block_bwd": _attention_block_bwd_flop}
