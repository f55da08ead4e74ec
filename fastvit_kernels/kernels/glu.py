"""Elementwise SwiGLU kernels (Shazeer 2020, "GLU Variants Improve Transformer") for the one place the GEMM core
cannot form SwiGLU or its derivative in a GEMM's prologue / epilogue: the backward of a SwiGLU MLP with a norm on
its hidden activations (EVA-02's ``scale_mlp``), where the hidden must be materialised for the norm's backward and
the SwiGLU derivative follows that backward rather than a GEMM.

Both read the stored (M, 2 * D_hidden) pre-activation in timm's packed layout (gate in columns [0, D_hidden), up in
[D_hidden, 2 * D_hidden)) and compute in fp32 with the GEMM core's helpers (:func:`fusion.silu`,
:func:`fusion.swiglu_grad`), so they match the fused steps exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .fusion import silu, swiglu_grad

_BLOCK_R, _BLOCK_C = 16, 64


@triton.jit
def _swiglu_kernel(
    pre_ptr,  # (M, 2 * Dh) contiguous (gate | up) pre-activation
    dh_ptr,  # (M, Dh) contiguous incoming gradient (BACKWARD)
    out_ptr,  # (M, Dh) hidden silu(gate) * up, or (BACKWARD) (M, 2 * Dh) (d gate | d up); contiguous
    M, Dh,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n_c = tl.cdiv(Dh, BLOCK_C)
    rows = (pid // n_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < Dh)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    pre = pre_ptr + r64 * (2 * Dh) + cols[None, :]
    gate = tl.load(pre, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(pre + Dh, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        dh = tl.load(dh_ptr + r64 * Dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d_gate, d_up = swiglu_grad(dh, gate, up)
        out = out_ptr + r64 * (2 * Dh) + cols[None, :]
        tl.store(out, d_gate.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + Dh, d_up.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + r64 * Dh + cols[None, :], (silu(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def _grid(M: int, Dh: int) -> tuple[int]:
    return (triton.cdiv(M, _BLOCK_R) * triton.cdiv(Dh, _BLOCK_C),)


def swiglu(preact: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a contiguous (M, 2 * D_hidden) (gate | up) pre-activation: (M, D_hidden) in its
    dtype, one launch (fp32 math, rounded once)."""
    M, Dh = preact.shape[0], preact.shape[1] // 2
    out = torch.empty((M, Dh), device=preact.device, dtype=preact.dtype)
    if out.numel():
        launch(_swiglu_kernel, _grid(M, Dh), preact, out, out, M, Dh, BACKWARD=False, BLOCK_R=_BLOCK_R,
               BLOCK_C=_BLOCK_C)
    return out


def swiglu_backward(dh: torch.Tensor, preact: torch.Tensor) -> torch.Tensor:
    """The gradient of the (M, 2 * D_hidden) (gate | up) pre-activation from dh = d(silu(gate) * up) (M, D_hidden),
    both contiguous: (d gate | d up) = (dh * up * silu'(gate) | dh * silu(gate)), (M, 2 * D_hidden) in dh's dtype,
    one launch (fp32 math)."""
    M, Dh = dh.shape
    out = torch.empty((M, 2 * Dh), device=dh.device, dtype=dh.dtype)
    if out.numel():
        launch(_swiglu_kernel, _grid(M, Dh), preact, dh, out, M, Dh, BACKWARD=True, BLOCK_R=_BLOCK_R,
               BLOCK_C=_BLOCK_C)
    return out
