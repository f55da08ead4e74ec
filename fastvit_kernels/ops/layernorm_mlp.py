"""The MLP half of a pre-norm ViT block as one differentiable op: ``x + fc2(GELU(fc1(LayerNorm(x))))``, or with
RMSNorm (``norm="rmsnorm"``) in place of the LayerNorm.

Forward (three launches): fp32 row statistics -> fc1 GEMM with the LayerNorm applied in its A-operand prologue
(normalised activations never stored) and bias + GELU (exact erf by default, or the tanh approximation) in its
epilogue, which also stores the pre-activation -> fc2 GEMM with bias and the residual add in its epilogue.

Backward: fc2 weight grad from a GEMM that recomputes GELU(pre-activation) in its B prologue and fc2 dgrad with
the GELU' multiply in its epilogue (one launch on the Hopper kernel: ``matmul.gemm_pair``); fc1 weight grad from a
GEMM that recomputes LayerNorm(x) in its B prologue and fc1 dgrad (one launch); LayerNorm backward with the
residual gradient added, whose launch also reduces the gamma / beta grads (per-program fp32 partials, summed by a
two-level tree inside the kernel). The bias grads come from the weight-grad GEMMs (row sums of the dY^T / dH^T
tiles they load: no extra pass over device memory). All reductions are fp32 in a fixed order (deterministic).
Saved for backward: x, the pre-activation (B, N, D_hidden) and the fp32 row stats.

``recompute=True`` saves only x and the row stats (no (B, N, D_hidden) tensor between forward and backward) and
recomputes the pre-activation in backward with the same fc1 GEMM (LayerNorm prologue + bias, no GELU): one more
GEMM of M * D * D_hidden multiply-adds per step for 2 * M * D_hidden fewer bytes kept, for memory-bound large
batches. With one tile configuration per shape (the interpreter, or FASTVIT_AUTOTUNE=0 on a GPU) the recomputed
pre-activation, and so every gradient, is bit-identical to the default's; with autotuning the two fc1 launches
(with / without the GELU epilogue) are tuned separately and may sum K in different tiles (rounding-level
differences).

RMSNorm (Zhang & Sennrich 2019; timm's ``RmsNorm``): the row statistics kernel writes a zero mean and the RMS
rstd (``layernorm.row_stats(rms=True)``), so the same LayerNorm prologue applies it (with a zero beta when the norm
has no bias), and the backward is ``layernorm_bwd(rms=True)``.

References: Vaswani et al. 2017 (transformer MLP), Hendrycks & Gimpel 2016 (GELU), Ba et al. 2016 (LayerNorm);
the GEMM fusions: docs/design.md, "The GEMM core".
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import (autocast_inputs, check_gelu_approximate, check_norm_input, check_same, check_tensor,
                       check_triton_dtype)
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import resolve_backend
from ._instrument import instrumented
from ._layout import norm_bias_or_zeros, rows


# ----------------------------------------------------------------------------------------------------------------
# custom ops (2-D tokens: M = B * N rows)
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::layernorm_mlp_fwd", mutates_args=())
@launches_on_input_device
def _layernorm_mlp_fwd(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    eps: float, add_residual: bool, recompute: bool, approximate: str, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`layernorm_mlp` on 2-D tokens: x (M, D) -> (out (M, D), preact (M, D_hidden) the
    fc1 pre-activation, or an empty (0, D_hidden) with ``recompute``, mean (M,) fp32, rstd (M,) fp32 norm2's row
    statistics; ``rms``: RMSNorm's, mean = 0); out and preact in x's dtype; out is the branch alone when
    ``add_residual`` is False. All but out are kept for the backward and not differentiable."""
    from ..kernels.layernorm import row_stats
    from ..kernels.fusion import LayerNorm, Operand
    from ..kernels.matmul import linear

    mean, rstd = row_stats(x, eps, rms=rms)
    preact = torch.empty((0 if recompute else x.shape[0], fc1_weight.shape[0]), device=x.device, dtype=x.dtype)
    act = linear(x, fc1_weight, fc1_bias, ln=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight,
                                                                                                   norm_bias)),
                 gelu=True,
                 store_preact=None if recompute else preact, gelu_approximate=approximate)
    out = linear(act, fc2_weight, fc2_bias, residual=Operand.matrix(x) if add_residual else None)
    return out, preact, mean, rstd


@_layernorm_mlp_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, add_residual, recompute,
      approximate, rms=False):
    M = x.shape[0]
    stats = x.new_empty((M,), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty((0 if recompute else M, fc1_weight.shape[0])), stats,
            torch.empty_like(stats))


@fastvit_op("fastvit::layernorm_mlp_bwd", mutates_args=())
@launches_on_input_device
def _layernorm_mlp_bwd(
    dout: torch.Tensor, x: torch.Tensor, preact: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, add_residual: bool, recompute: bool,
    approximate: str, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dgamma, dbeta, dW1, db1, dW2, db2) (dbeta: the column sums of the norm's output gradient,
    also without a norm bias). ``recompute``: ``preact`` is empty and is recomputed here by the forward's fc1 GEMM
    without its GELU (fc1_bias is only read then). ``rms``: the norm is RMSNorm (``mean`` holds zeros)."""
    from ..kernels.layernorm import layernorm_bwd
    from ..kernels.fusion import Gelu, LayerNorm
    from ..kernels.matmul import linear, linear_backward

    M, D = x.shape
    Dh = fc1_weight.shape[0]
    wdt = fc1_weight.dtype
    norm_bias = norm_bias_or_zeros(norm_weight, norm_bias)
    if recompute:  # the same launch as the forward's fc1 GEMM, minus the GELU
        preact = linear(x, fc1_weight, fc1_bias, ln=LayerNorm(mean, rstd, norm_weight, norm_bias))
    # fc2, one launch for two GEMMs that read dY: dW2 = dY^T @ GELU(preact) (GELU recomputed on load) with
    # db2 = sum_m dY from its A tiles, and dH = (dY @ W2) * GELU'(preact)
    dw2 = torch.empty((D, Dh), device=x.device, dtype=wdt)
    db2 = torch.empty((D,), device=x.device, dtype=wdt)
    dh = torch.empty((M, Dh), device=x.device, dtype=x.dtype)
    linear_backward(dout, preact, fc2_weight, dh, dw2, db2, x_prologue=Gelu(), dx_gelu_grad_of=preact,
                    gelu_approximate=approximate)
    # fc1, one launch for two GEMMs that read dH: dW1 = dH^T @ LayerNorm(x) (normalisation recomputed on load)
    # with db1 = sum_m dH from its A tiles, and d LayerNorm(x) = dH @ W1
    dw1 = torch.empty((Dh, D), device=x.device, dtype=wdt)
    db1 = torch.empty((Dh,), device=x.device, dtype=wdt)
    dln = torch.empty((M, D), device=x.device, dtype=x.dtype)
    linear_backward(dh, x, fc1_weight, dln, dw1, db1, x_prologue=LayerNorm(mean, rstd, norm_weight, norm_bias))
    # LayerNorm backward (+ dY through the residual)
    dx, dgamma, dbeta = layernorm_bwd(x, dln, norm_weight, mean, rstd, dres=dout if add_residual else None, rms=rms)
    return dx, dgamma, dbeta, dw1, db1, dw2, db2


@_layernorm_mlp_bwd.register_fake
def _(dout, x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, add_residual,
      recompute, approximate, rms=False):
    Dh = fc1_weight.shape[0]
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_weight),
            torch.empty_like(fc1_weight), fc1_weight.new_empty((Dh,)), torch.empty_like(fc2_weight),
            fc2_weight.new_empty((fc2_weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, add_residual, recompute,
     approximate, rms) = inputs
    _, preact, mean, rstd = output  # preact is (0, D_hidden) with recompute: nothing large is kept
    ctx.save_for_backward(x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight)
    ctx.mark_non_differentiable(preact, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradient tensors for the saved-only outputs
    ctx.add_residual = add_residual
    ctx.recompute = recompute
    ctx.approximate = approximate
    ctx.rms = rms
    ctx.has_bias = (norm_bias is not None, fc1_bias is not None, fc2_bias is not None)


def _backward(ctx, dout, _dpreact, _dmean, _drstd):
    if dout is None:
        return (None,) * 12
    x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight = ctx.saved_tensors
    dx, dgamma, dbeta, dw1, db1, dw2, db2 = _layernorm_mlp_bwd(
        dout.contiguous(), x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
        ctx.add_residual, ctx.recompute, ctx.approximate, ctx.rms,
    )
    nb, b1, b2 = ctx.has_bias
    return (dx, dgamma, dbeta if nb else None, dw1, db1 if b1 else None, dw2, db2 if b2 else None,
            None, None, None, None, None)


_layernorm_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------------
@instrumented("layernorm_mlp")
def layernorm_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    add_residual: bool = True,
    recompute: bool = False,
    approximate: str = "none",
    norm: str = "layernorm",
    backend: str | None = None,
) -> torch.Tensor:
    """``x + fc2(GELU(fc1(norm(x))))``: the MLP half of a pre-norm ViT block, fused (see module docstring).

    Args:
        x: (B, N, D) (any leading dims), fp32 | fp16 | bf16 (bf16 on GPU only).
        norm_weight, norm_bias: (D,) the norm's gamma and beta; norm_bias may be None (a norm without bias, as
            timm's RmsNorm).
        fc1_weight: (D_hidden, D); fc1_bias: (D_hidden,) or None.
        fc2_weight: (D, D_hidden); fc2_bias: (D,) or None.
        eps: LayerNorm epsilon (> 0; timm's ViT uses 1e-6).
        add_residual: False returns only the branch ``fc2(GELU(fc1(LayerNorm(x))))`` (for stochastic depth).
        recompute: keep only x and the fp32 row stats for backward and recompute the (B, N, D_hidden)
            pre-activation there (one extra fc1 GEMM; see the module docstring). Same gradients as the default.
            No effect on the "torch" backend.
        approximate: the GELU form, as ``torch.nn.GELU``: "none" (exact erf, timm's default) or "tanh"
            (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``), used in forward and in every GELU / GELU'
            recomputed by the backward.
        norm: "layernorm" (``F.layer_norm``, timm's default) or "rmsnorm" (timm's ``RmsNorm``: ``x * rsqrt(mean(x^2)
            + eps) * weight``; :func:`fastvit_kernels.reference.rms_norm_ref`).
        backend: "auto" | "triton" | "torch" (see :mod:`fastvit_kernels.backend`).

    Returns:
        (B, N, D) in x's dtype. Under ``torch.autocast`` inputs are cast to the autocast dtype first.
        Norm statistics and all accumulations are fp32; GELU (and its derivative) evaluated in fp32.

    Raises:
        TypeError: a non-floating input; bf16 on the CPU interpreter.
        ValueError: shapes that do not chain (names the argument, expected and actual shape), mixed dtypes or
            devices, eps <= 0, approximate not "none" / "tanh", norm not "layernorm" / "rmsnorm".
        RuntimeError: backend="triton" where Triton cannot run.
    """
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = autocast_inputs(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias
    )
    D = check_norm_input(x, norm_weight, norm_bias, eps, norm)
    check_tensor("fc1_weight", fc1_weight, (None, D), f"(D_hidden, D={D})")
    Dh = fc1_weight.shape[0]
    if fc1_bias is not None:
        check_tensor("fc1_bias", fc1_bias, (Dh,), f"(D_hidden={Dh},)")
    check_tensor("fc2_weight", fc2_weight, (D, Dh), f"(D={D}, D_hidden={Dh})")
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias, (D,), f"(D={D},)")
    check_same("x", x, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
               fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    check_gelu_approximate(approximate)
    if resolve_backend(x.device, backend) == "torch":
        return reference.layernorm_mlp_ref(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                           eps, add_residual, approximate, norm)
    check_triton_dtype("x", x)
    out = _layernorm_mlp_fwd(rows(x, D), norm_weight, norm_bias, fc1_weight.contiguous(), fc1_bias,
                             fc2_weight.contiguous(), fc2_bias, float(eps), bool(add_residual), bool(recompute),
                             approximate, norm == "rmsnorm")[0]
    return out.view(x.shape)


def mlp_flops(M: int, D: int, D_hidden: int) -> int:
    """Model FLOPs of the MLP's two GEMMs over M tokens, fc1 (D -> D_hidden) and fc2 (D_hidden -> D), 2 per
    multiply-add: ``4 * M * D * D_hidden`` (an int). The backward counts 2x this; GELU and LayerNorm are not
    counted (Chowdhery et al., PaLM 2022, appendix B)."""
    return 4 * M * D * D_hidden


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _layernorm_mlp_fwd_flop(x, norm_weight, norm_bias, fc1_weight, *args, out_shape=None, **kwargs) -> int:
    M, D = x
    return mlp_flops(M, D, fc1_weight[0])


def _layernorm_mlp_bwd_flop(dout, x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, *args,
                            out_shape=None, **kwargs) -> int:
    M, D = x
    return 2 * mlp_flops(M, D, fc1_weight[0])


FLOP_FORMULAS = {"layernorm_mlp_fwd": _layernorm_mlp_fwd_flop, "layernorm_mlp_bwd": _layernorm_mlp_bwd_flop}
