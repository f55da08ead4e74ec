"""Tensor-layout helpers shared by the ops (no autograd, no kernels)."""

from __future__ import annotations

import torch


def rows(x: torch.Tensor, D: int) -> torch.Tensor:
    """x (..., D) viewed as an (M, D) matrix, M = the product of the leading dims, with unit column stride and
    row stride D, the layout the GEMM kernels' 2-D operands take; copies only when x's strides do not allow
    that view. Same dtype and device as x."""
    x2d = x.reshape(-1, D)
    if x2d.stride(-1) != 1 or x2d.stride(0) != D:
        x2d = x2d.contiguous()
    return x2d


def norm_bias_or_zeros(norm_weight: torch.Tensor, norm_bias: torch.Tensor | None) -> torch.Tensor:
    """The norm's beta for the LayerNorm prologue: ``norm_bias``, or zeros like ``norm_weight`` for a norm without a
    bias (timm's RmsNorm; adding 0 is exact)."""
    return norm_bias if norm_bias is not None else torch.zeros_like(norm_weight)
