"""The SwiGLU MLP half of a pre-norm block as one differentiable op: ``x + fc2(hnorm(silu(gate) * up))`` with
``(gate, up) = fc1(norm(x))``, the MLP of the ViTs pretrained with SwiGLU (EVA-02, the SigLIP-2 / AIMv2 style
models; timm's ``SwiGLU`` with separate ``fc1_g`` / ``fc1_x`` and ``SwiGLUPacked`` with one packed ``fc1``), with a
LayerNorm or an RMSNorm before fc1 and an optional LayerNorm on the hidden activations (EVA-02's ``scale_mlp``).

Forward (three launches; four with the hidden norm): fp32 row statistics of x (LayerNorm's, or RMSNorm's with a
zero mean) -> ONE fc1 GEMM over both halves: each A tile of x is loaded and normalised once (the norm in the
A-operand prologue; normalised activations never stored) and meets the gate weights' tile and the up weights'
tile at the same (k, n) in two dots, into two fp32 accumulators, so a gate column and its up column land in the
same output tile; the epilogue adds both biases, stores the (gate | up) pre-activation (M, 2 * D_hidden) and
writes hidden = silu(gate) * up -> (hidden norm: fp32 row statistics of the hidden) -> fc2 GEMM (the hidden norm
in its A prologue) with bias and the residual add in its epilogue.

Backward, without the hidden norm: the GEMM producing dH = dY @ W2 writes, in its epilogue, d gate = dH * up *
silu'(gate) and d up = dH * silu(gate) from the stored pre-activation, into one (M, 2 * D_hidden) gradient (dH
itself is never stored); the fc2 weight-grad GEMM dW2 = dY^T @ (silu(gate) * up) recomputes the hidden on load
(its B prologue reads the gate and up tiles of the stored pre-activation) with db2 from its A row sums; then the
fc1 backward as one packed Linear of 2 * D_hidden outputs: dW1 = d(gate | up)^T @ norm(x) (the norm recomputed on
load, db1 from its row sums) and d norm(x) = d(gate | up) @ [W_gate; W_up] (one launch for the two), and the norm
backward with the residual gradient added (deterministic dgamma / dbeta). With the hidden norm: the hidden is
recomputed by one elementwise launch (it is the norm backward's input), fc2's backward pair recomputes the
normalised hidden on load, the LayerNorm backward gives d hidden, and one elementwise launch forms d gate / d up.

Saved for backward: x, the (M, 2 * D_hidden) pre-activation and fp32 row statistics (two (M,) vectors per norm):
nothing activated or normalised that can be recomputed. Weight and bias gradients are deterministic (fp32 row
sums / fixed-order trees, no atomics).

Weight layouts: the op takes the gate and up weights either as two (D_hidden, D) tensors (``SwiGLU``'s fc1_g /
fc1_x, or two row-halves of ``SwiGLUPacked``'s fc1.weight) or as the packed (2 * D_hidden, D) fc1.weight
(``up_weight=None``). The forward reads either form in place. The backward's d norm(x) GEMM reads the weights as
one packed (2 * D_hidden, D) operand: the packed tensor itself, two halves adjacent in memory (the two views of
one fc1.weight) seen as one, or else (two separate tensors) a copy of the two concatenated (2 * D_hidden * D
elements per step; a second GEMM pass over the (M, D) gradient would cost more). The packed form returns packed
gradients (no scatter of two half-gradients into the packed parameter).

References: Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU); Fang et al. 2023, EVA-02 (SwiGLU with the
hidden LayerNorm); Zhang & Sennrich 2019 (RMSNorm); the GEMM fusions: docs/design.md, "The GEMM core".
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


def _halves(w: torch.Tensor, up: Optional[torch.Tensor]) -> tuple:
    """(gate, up) of a packed (2 Dh, ...) tensor (``up`` None) or the given pair."""
    if up is not None:
        return w, up
    h = w.shape[0] // 2
    return w[:h], w[h:]


def _packed_weight(gate: torch.Tensor, up: Optional[torch.Tensor]) -> torch.Tensor:
    """The (2 Dh, D) packed fc1 weight for the backward's d norm(x) GEMM: ``gate`` itself when already packed, a
    view when the two halves are adjacent rows of one tensor (no copy), else their concatenation."""
    if up is None:
        return gate
    Dh, D = gate.shape
    if (gate.device.type != "meta" and gate.is_contiguous() and up.is_contiguous() and gate.device == up.device
            and gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
            and up.storage_offset() == gate.storage_offset() + Dh * D):
        return gate.as_strided((2 * Dh, D), (D, 1), gate.storage_offset())
    return torch.cat([gate, up])


# ----------------------------------------------------------------------------------------------------------------
# custom ops (2-D tokens: M = B * N rows)
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::swiglu_mlp_fwd", mutates_args=())
@launches_on_input_device
def _swiglu_mlp_fwd(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], gate_weight: torch.Tensor,
    gate_bias: Optional[torch.Tensor], up_weight: Optional[torch.Tensor], up_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], hidden_norm_weight: Optional[torch.Tensor],
    hidden_norm_bias: Optional[torch.Tensor], eps: float, hidden_norm_eps: float, rms: bool, add_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`swiglu_mlp` on 2-D tokens x (M, D) -> (out (M, D), preact (M, 2 * D_hidden) the
    (gate | up) pre-activation, mean, rstd (M,) fp32 the pre-norm's row statistics, hmean, hrstd (M,) fp32 the
    hidden norm's, or (0,) without one). ``up_weight`` None: gate_weight / gate_bias are the packed fc1."""
    from ..kernels.fusion import LayerNorm, Operand
    from ..kernels.layernorm import row_stats
    from ..kernels.matmul import linear, swiglu_linear

    M = x.shape[0]
    wg, wu = _halves(gate_weight, up_weight)
    if up_weight is None:  # packed fc1: the bias (if any) is packed too
        bg, bu = _halves(gate_bias, None) if gate_bias is not None else (None, None)
    else:
        bg, bu = gate_bias, up_bias
    mean, rstd = row_stats(x, eps, rms=rms)
    preact = torch.empty((M, 2 * wg.shape[0]), device=x.device, dtype=x.dtype)
    hidden = swiglu_linear(x, wg, wu, bg, bu, ln=LayerNorm(mean, rstd, norm_weight,
                                                           norm_bias_or_zeros(norm_weight, norm_bias)),
                           store_preact=preact)
    residual = Operand.matrix(x) if add_residual else None
    if hidden_norm_weight is None:
        hmean, hrstd = mean.new_empty((0,)), mean.new_empty((0,))  # two tensors: outputs may not alias
        out = linear(hidden, fc2_weight, fc2_bias, residual=residual)
    else:
        hmean, hrstd = row_stats(hidden, hidden_norm_eps)
        out = linear(hidden, fc2_weight, fc2_bias, residual=residual,
                     ln=LayerNorm(hmean, hrstd, hidden_norm_weight,
                                  norm_bias_or_zeros(hidden_norm_weight, hidden_norm_bias)))
    return out, preact, mean, rstd, hmean, hrstd


@_swiglu_mlp_fwd.register_fake
def _(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, fc2_bias,
      hidden_norm_weight, hidden_norm_bias, eps, hidden_norm_eps, rms, add_residual):
    M = x.shape[0]
    Dh = fc2_weight.shape[1]
    stats = x.new_empty((M,), dtype=torch.float32)
    hstats = x.new_empty((0 if hidden_norm_weight is None else M,), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty((M, 2 * Dh)), stats, torch.empty_like(stats), hstats,
            torch.empty_like(hstats))


@fastvit_op("fastvit::swiglu_mlp_bwd", mutates_args=())
@launches_on_input_device
def _swiglu_mlp_bwd(
    dout: torch.Tensor, x: torch.Tensor, preact: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    hmean: torch.Tensor, hrstd: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor],
    gate_weight: torch.Tensor, up_weight: Optional[torch.Tensor], fc2_weight: torch.Tensor,
    hidden_norm_weight: Optional[torch.Tensor], hidden_norm_bias: Optional[torch.Tensor], rms: bool,
    add_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients (dx, dgamma, dbeta, dW1 (2 * D_hidden, D) packed (gate rows first), db1 (2 * D_hidden,), dW2, db2,
    d hidden-norm gamma, d hidden-norm beta) ((0,) for the last two without a hidden norm)."""
    from ..kernels.fusion import Epilogue, Gemm, LayerNorm, Operand, SwiGLU
    from ..kernels.glu import swiglu, swiglu_backward
    from ..kernels.layernorm import layernorm_bwd
    from ..kernels.matmul import gemm_pair, linear_backward

    M, D = x.shape
    Dh = fc2_weight.shape[1]
    wdt = fc2_weight.dtype
    dw2 = torch.empty((D, Dh), device=x.device, dtype=wdt)
    db2 = torch.empty((D,), device=x.device, dtype=wdt)
    if hidden_norm_weight is None:
        dhw, dhb = x.new_empty((0,), dtype=wdt), x.new_empty((0,), dtype=wdt)
        # fc2: dW2 = dY^T @ (silu(gate) * up) with the hidden recomputed on load (B's SwiGLU prologue over the two
        # halves of the stored pre-activation) and db2 = sum_m dY from its A tiles; d(gate | up) = the SwiGLU
        # derivative of dH = dY @ W2, formed in that GEMM's epilogue (two output tiles per dH tile)
        dpre = torch.empty((M, 2 * Dh), device=x.device, dtype=x.dtype)
        gemm_pair(Gemm(Operand.matrix_t(dout), Operand.matrix(preact[:, :Dh]), Operand.matrix(dw2), D, Dh, M,
                       b_prologue=SwiGLU(), b2=Operand.matrix(preact[:, Dh:]), epilogue=Epilogue(a_rowsum=db2)),
                  Gemm(Operand.matrix(dout), Operand.matrix(fc2_weight), Operand.matrix(dpre), M, Dh, D,
                       epilogue=Epilogue(swiglu_grad_of=preact)))
    else:
        hidden = swiglu(preact)  # the hidden norm's input, recomputed (not kept from the forward)
        hnorm = LayerNorm(hmean, hrstd, hidden_norm_weight, norm_bias_or_zeros(hidden_norm_weight, hidden_norm_bias))
        dhn = torch.empty((M, Dh), device=x.device, dtype=x.dtype)
        linear_backward(dout, hidden, fc2_weight, dhn, dw2, db2, x_prologue=hnorm)
        dh, dhw, dhb = layernorm_bwd(hidden, dhn, hidden_norm_weight, hmean, hrstd)
        dpre = swiglu_backward(dh, preact)
    # fc1 as one packed Linear (2 Dh outputs): dW1 = d(gate | up)^T @ norm(x) (normalisation recomputed on load)
    # with db1 from its A tiles, and d norm(x) = d(gate | up) @ [W_gate; W_up]
    dw1 = torch.empty((2 * Dh, D), device=x.device, dtype=wdt)
    db1 = torch.empty((2 * Dh,), device=x.device, dtype=wdt)
    dln = torch.empty((M, D), device=x.device, dtype=x.dtype)
    linear_backward(dpre, x, _packed_weight(gate_weight, up_weight), dln, dw1, db1,
                    x_prologue=LayerNorm(mean, rstd, norm_weight, norm_bias_or_zeros(norm_weight, norm_bias)))
    dx, dgamma, dbeta = layernorm_bwd(x, dln, norm_weight, mean, rstd, dres=dout if add_residual else None, rms=rms)
    return dx, dgamma, dbeta, dw1, db1, dw2, db2, dhw, dhb


@_swiglu_mlp_bwd.register_fake
def _(dout, x, preact, mean, rstd, hmean, hrstd, norm_weight, norm_bias, gate_weight, up_weight, fc2_weight,
      hidden_norm_weight, hidden_norm_bias, rms, add_residual):
    D, Dh = fc2_weight.shape
    hn = 0 if hidden_norm_weight is None else Dh
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_weight),
            fc2_weight.new_empty((2 * Dh, D)), fc2_weight.new_empty((2 * Dh,)), torch.empty_like(fc2_weight),
            fc2_weight.new_empty((D,)), fc2_weight.new_empty((hn,)), fc2_weight.new_empty((hn,)))


def _setup_context(ctx, inputs, output):
    (x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, fc2_bias,
     hidden_norm_weight, hidden_norm_bias, eps, hidden_norm_eps, rms, add_residual) = inputs
    _, preact, mean, rstd, hmean, hrstd = output
    ctx.save_for_backward(x, preact, mean, rstd, hmean, hrstd, norm_weight, norm_bias, gate_weight, up_weight,
                          fc2_weight, hidden_norm_weight, hidden_norm_bias)
    ctx.mark_non_differentiable(preact, mean, rstd, hmean, hrstd)
    ctx.set_materialize_grads(False)
    ctx.rms = rms
    ctx.add_residual = add_residual
    ctx.has = tuple(t is not None for t in (norm_bias, gate_bias, up_weight, up_bias, fc2_bias, hidden_norm_weight,
                                            hidden_norm_bias))


def _backward(ctx, dout, *_saved_only):
    if dout is None:
        return (None,) * 15
    (x, preact, mean, rstd, hmean, hrstd, norm_weight, norm_bias, gate_weight, up_weight, fc2_weight,
     hidden_norm_weight, hidden_norm_bias) = ctx.saved_tensors
    dx, dgamma, dbeta, dw1, db1, dw2, db2, dhw, dhb = _swiglu_mlp_bwd(
        dout.contiguous(), x, preact, mean, rstd, hmean, hrstd, norm_weight, norm_bias, gate_weight, up_weight,
        fc2_weight, hidden_norm_weight, hidden_norm_bias, ctx.rms, ctx.add_residual,
    )
    has_nb, has_bg, separate, has_bu, has_b2, has_hw, has_hb = ctx.has
    Dh = fc2_weight.shape[1]
    if separate:  # two half-gradients (views of the packed buffer) for the two weights / biases
        d_gate_w, d_up_w, d_gate_b, d_up_b = dw1[:Dh], dw1[Dh:], db1[:Dh], db1[Dh:]
    else:
        d_gate_w, d_up_w, d_gate_b, d_up_b = dw1, None, db1, None
    return (dx, dgamma, dbeta if has_nb else None, d_gate_w, d_gate_b if has_bg else None, d_up_w,
            d_up_b if has_bu else None, dw2, db2 if has_b2 else None, dhw if has_hw else None,
            dhb if has_hb else None, None, None, None, None)


_swiglu_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------------
def _check(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, fc2_bias, eps, norm,
           hidden_norm_weight, hidden_norm_bias, hidden_norm_eps) -> tuple[int, int]:
    """The input checks of :func:`swiglu_mlp` (before any launch). Returns (D, D_hidden)."""
    D = check_norm_input(x, norm_weight, norm_bias, eps, norm)
    if up_weight is None:  # packed fc1
        if up_bias is not None:
            raise ValueError("up_bias must be None when up_weight is None (the packed fc1: gate_bias holds both "
                             f"halves); got shape {tuple(up_bias.shape)}")
        check_tensor("gate_weight", gate_weight, (None, D), f"(2 * D_hidden, D={D}) (packed fc1, up_weight=None)")
        if gate_weight.shape[0] % 2:
            raise ValueError(f"gate_weight must have shape (2 * D_hidden, D={D}) (packed fc1, up_weight=None): an "
                             f"even number of rows; got {tuple(gate_weight.shape)}")
        Dh = gate_weight.shape[0] // 2
        if gate_bias is not None:
            check_tensor("gate_bias", gate_bias, (2 * Dh,), f"(2 * D_hidden={2 * Dh},) (packed fc1)")
    else:
        check_tensor("gate_weight", gate_weight, (None, D), f"(D_hidden, D={D})")
        Dh = gate_weight.shape[0]
        check_tensor("up_weight", up_weight, (Dh, D), f"(D_hidden={Dh}, D={D})")
        if gate_bias is not None:
            check_tensor("gate_bias", gate_bias, (Dh,), f"(D_hidden={Dh},)")
        if up_bias is not None:
            check_tensor("up_bias", up_bias, (Dh,), f"(D_hidden={Dh},)")
    check_tensor("fc2_weight", fc2_weight, (D, Dh), f"(D={D}, D_hidden={Dh})")
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias, (D,), f"(D={D},)")
    if hidden_norm_weight is None and hidden_norm_bias is not None:
        raise ValueError("hidden_norm_bias needs hidden_norm_weight (the hidden LayerNorm's gamma); got None")
    if hidden_norm_weight is not None:
        check_tensor("hidden_norm_weight", hidden_norm_weight, (Dh,), f"(D_hidden={Dh},)")
        if hidden_norm_bias is not None:
            check_tensor("hidden_norm_bias", hidden_norm_bias, (Dh,), f"(D_hidden={Dh},)")
        if not hidden_norm_eps > 0:
            raise ValueError(f"hidden_norm_eps must be > 0; got {hidden_norm_eps}")
    check_same("x", x, norm_weight=norm_weight, norm_bias=norm_bias, gate_weight=gate_weight, gate_bias=gate_bias,
               up_weight=up_weight, up_bias=up_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
               hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias)
    return D, Dh


@instrumented("swiglu_mlp")
def swiglu_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    norm: str = "layernorm",
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_norm_eps: float = 1e-6,
    add_residual: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """``x + fc2(hnorm(silu(gate) * up))``, ``(gate, up) = fc1(norm(x))``: the SwiGLU MLP half of a pre-norm block,
    fused (see the module docstring), as timm's ``SwiGLU`` / ``SwiGLUPacked`` after the block's norm2.

    Args:
        x: (B, N, D) (any leading dims), fp32 | fp16 | bf16 (bf16 on GPU only).
        norm_weight: (D,) the pre-norm's gamma; norm_bias: (D,) or None (timm's RmsNorm has none).
        gate_weight, gate_bias: the gate Linear (timm ``SwiGLU.fc1_g``): (D_hidden, D), (D_hidden,) or None. With
            ``up_weight=None``, the packed fc1 of ``SwiGLUPacked`` instead: (2 * D_hidden, D) and (2 * D_hidden,)
            or None, the gate in the first D_hidden rows (timm: ``x1, x2 = fc1(x).chunk(2, -1); silu(x1) * x2``).
        up_weight, up_bias: the up Linear (``SwiGLU.fc1_x``): (D_hidden, D), (D_hidden,) or None; both None for
            the packed fc1. Two views ``fc1.weight[:D_hidden]`` / ``fc1.weight[D_hidden:]`` of a packed weight
            also work, copy-free.
        fc2_weight: (D, D_hidden); fc2_bias: (D,) or None.
        eps: the pre-norm's epsilon (> 0).
        norm: "layernorm" (timm's default) or "rmsnorm" (timm's ``RmsNorm``: ``x * rsqrt(mean(x^2) + eps) *
            weight``).
        hidden_norm_weight, hidden_norm_bias: (D_hidden,) the LayerNorm on the hidden activations before fc2
            (timm's ``SwiGLU.norm`` / ``GluMlp.norm``, EVA-02's ``scale_mlp``); None (default): none. The bias may
            be None with a weight.
        hidden_norm_eps: that LayerNorm's epsilon (> 0).
        add_residual: False returns only the branch (for stochastic depth).
        backend: "auto" | "triton" | "torch" (see :mod:`fastvit_kernels.backend`).

    Returns:
        (B, N, D) in x's dtype. Under ``torch.autocast`` inputs are cast to the autocast dtype first. Norm
        statistics and all accumulations are fp32; SiLU and its derivative evaluated in fp32.

    Raises:
        TypeError: a non-floating input; bf16 on the CPU interpreter.
        ValueError: shapes that do not chain (names the argument, expected and actual shape), an odd packed fc1,
            up_bias with the packed fc1, a hidden-norm bias without its weight, mixed dtypes or devices, eps /
            hidden_norm_eps <= 0, norm not "layernorm" / "rmsnorm".
        RuntimeError: backend="triton" where Triton cannot run.
    """
    (x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, fc2_bias, hidden_norm_weight,
     hidden_norm_bias) = autocast_inputs(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias,
                                         fc2_weight, fc2_bias, hidden_norm_weight, hidden_norm_bias)
    D, _ = _check(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, fc2_bias, eps,
                  norm, hidden_norm_weight, hidden_norm_bias, hidden_norm_eps)
    if resolve_backend(x.device, backend) == "torch":
        return reference.swiglu_mlp_ref(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias,
                                        fc2_weight, fc2_bias, eps, norm=norm, hidden_norm_weight=hidden_norm_weight,
                                        hidden_norm_bias=hidden_norm_bias, hidden_norm_eps=hidden_norm_eps,
                                        add_residual=add_residual)
    check_triton_dtype("x", x)
    out = _swiglu_mlp_fwd(rows(x, D), norm_weight, norm_bias, gate_weight.contiguous(), gate_bias,
                          None if up_weight is None else up_weight.contiguous(), up_bias, fc2_weight.contiguous(),
                          fc2_bias, hidden_norm_weight, hidden_norm_bias, float(eps), float(hidden_norm_eps),
                          norm == "rmsnorm", bool(add_residual))[0]
    return out.view(x.shape)


def swiglu_mlp_flops(M: int, D: int, D_hidden: int) -> int:
    """Model FLOPs of the SwiGLU MLP's GEMMs over M tokens, 2 per multiply-add: fc1 (D -> 2 * D_hidden, gate and
    up) ``4 * M * D * D_hidden`` plus fc2 (D_hidden -> D) ``2 * M * D * D_hidden``: ``6 * M * D * D_hidden`` (an
    int). The backward counts 2x this; SiLU, the products and the norms are not counted (Chowdhery et al., PaLM
    2022, appendix B)."""
    return 6 * M * D * D_hidden


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _swiglu_mlp_fwd_flop(x, norm_weight, norm_bias, gate_weight, gate_bias, up_weight, up_bias, fc2_weight, *args,
                         out_shape=None, **kwargs) -> int:
    M, D = x
    return swiglu_mlp_flops(M, D, fc2_weight[1])


def _swiglu_mlp_bwd_flop(dout, x, preact, mean, rstd, hmean, hrstd, norm_weight, norm_bias, gate_weight, up_weight,
                         fc2_weight, *args, out_shape=None, **kwargs) -> int:
    M, D = x
    return 2 * swiglu_mlp_flops(M, D, fc2_weight[1])


FLOP_FORMULAS = {"swiglu_mlp_fwd": _swiglu_mlp_fwd_flop, "swiglu_mlp_bwd": _swiglu_mlp_bwd_flop}
