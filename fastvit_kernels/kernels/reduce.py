"""Deterministic column sums: out[n] = sum_m x[m, n], accumulated in fp32 in a fixed order (no atomics), used
for bias gradients, position-embedding gradients (sum over the batch) and LayerNorm dgamma / dbeta partials."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _column_sum_kernel(
    x_ptr,  # (M, N) input, strides (stride_x_m, stride_x_n)
    out_ptr,  # (N,) output
    M, N, stride_x_m, stride_x_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_n
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


def column_sum(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum a 2-D tensor x (M, N) over its rows: returns (N,) in ``out_dtype`` (default x's dtype)."""
    M, N = x.shape
    out = torch.empty(N, device=x.device, dtype=out_dtype or x.dtype)
    block_n = 64 if N >= 64 else triton.next_power_of_2(N)
    block_m = 64 if M >= 64 else triton.next_power_of_2(max(M, 1))
    _column_sum_kernel[(triton.cdiv(N, block_n),)](
        x, out, M, N, x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out
