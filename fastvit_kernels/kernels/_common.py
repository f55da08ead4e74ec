"""Helpers shared by the kernels: exact-erf GELU and its derivative, and the dot precision per dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@triton.jit
def gelu_erf(x):
    """GELU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016), x in fp32."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gelu_erf_grad(x):
    """d GELU / dx = Phi(x) + x phi(x), with phi the standard normal density; x in fp32."""
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: exact IEEE for fp32 operands (no TF32), the default for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (then larger tiles mean fewer Python steps)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
