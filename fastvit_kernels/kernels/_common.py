"""Helpers shared by the kernels: GELU (exact erf, or the tanh approximation) and its derivative, and the dot
precision per dtype (fp32: PyTorch's fp32 matmul setting, as cuBLAS follows it)."""

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


_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi)


@triton.jit
def gelu_tanh(x):
    """tanh-approximate GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3) (Hendrycks & Gimpel 2016;
    PyTorch's ``approximate='tanh'``), written as x * sigmoid(2u) (0.5 (1 + tanh u) == sigmoid(2u)); x in fp32."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def gelu_tanh_grad(x):
    """d/dx of :func:`gelu_tanh`: s + 2 x s (1 - s) u' with s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return s + 2.0 * x * s * (1.0 - s) * du


@triton.jit
def gelu(x, TANH: tl.constexpr):
    """GELU in fp32: the exact erf form, or the tanh approximation when TANH."""
    if TANH:
        return gelu_tanh(x)
    else:
        return gelu_erf(x)


@triton.jit
def gelu_grad(x, TANH: tl.constexpr):
    """GELU'(x) in fp32 for the form :func:`gelu` computes."""
    if TANH:
        return gelu_tanh_grad(x)
    else:
        return gelu_erf_grad(x)


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch currently lets fp32 matmuls on CUDA run as TF32, read the way cuBLAS reads it.

    The source is ``torch.backends.cuda.matmul.fp32_precision`` (PyTorch >= 2.9): "tf32" when the user allowed TF32
    through any of the APIs (``torch.set_float32_matmul_precision("high" | "medium")``,
    ``torch.backends.cuda.matmul.allow_tf32 = True``, ``torch.backends.fp32_precision = "tf32"`` or the attribute
    itself), "ieee" / "none" otherwise ("highest", PyTorch's default). Older PyTorch: the legacy
    ``torch.backends.cuda.matmul.allow_tf32``. That attribute is always readable, whereas
    ``torch.get_float32_matmul_precision()`` raises once the legacy and new APIs have been mixed."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None:
        return setting == "tf32"
    return bool(matmul.allow_tf32)


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton: the candidate lists prune by it, because register allocation (and so
    which tiles spill) differs between Triton releases."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# Candidate lists are checked spill-free (``python -m fastvit_kernels.aot check``) on Triton 3.4, 3.6, 3.8 and 3.9:
# the releases before NEWER_TRITON get the extra prunes the 3.6 and 3.8 checks called for, those before TRITON_3_6
# also the ones the 3.4 check called for (the unchecked 3.5 and 3.7 take the prunes of their range).
NEWER_TRITON = (3, 9)
TRITON_3_6 = (3, 6)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for the ``tl.dot`` of a launch whose operands have ``dtype``, decided on the host at
    launch time and passed as a constexpr (so it is part of the compile and autotune keys).

    fp32: "tf32" when PyTorch allows TF32 for fp32 matmuls (:func:`fp32_matmul_allows_tf32`, the setting cuBLAS and
    PyTorch's SDPA math path follow: ``torch.set_float32_matmul_precision("high")`` or
    ``torch.backends.cuda.matmul.allow_tf32 = True``), else "ieee" (exact fp32 products; the default,
    ``"highest"``). fp16 / bf16: "tf32", Triton's default, which has no effect on 16-bit operands. The Triton CPU
    interpreter ignores the precision (its dots are numpy fp32 matmuls)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if fp32_matmul_allows_tf32() else "ieee"
