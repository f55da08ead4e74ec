"""Deterministic column sums: out[n] = sum_m x[m, n], accumulated in fp32 in a fixed order (no atomics), used
for position-embedding gradients (sum over the batch) and to reduce per-program partial sums (LayerNorm dgamma and
dbeta in one launch: the columns of one partial buffer are split between two outputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _column_sum_kernel(
    x_ptr,  # (M, N) input, strides (stride_x_m, stride_x_n)
    out_ptr,  # (SPLIT,) output: columns [0, SPLIT)
    out2_ptr,  # (N - SPLIT,) output: columns [SPLIT, N)
    M, N, SPLIT, stride_x_m, stride_x_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_n
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty)
    first = cols < SPLIT
    tl.store(out_ptr + cols, total, mask=mask_n & first)
    tl.store(out2_ptr + (cols - SPLIT), total, mask=mask_n & (cols >= SPLIT))


def column_sum(x: torch.Tensor, out_dtype: torch.dtype | None = None, split: int | None = None):
    """Sum a 2-D tensor x (M, N) over its rows: returns (N,) in ``out_dtype`` (default x's dtype); with ``split``
    (0 < split < N), two separate tensors: the sums of columns [0, split) and [split, N) (one launch)."""
    M, N = x.shape
    dtype = out_dtype or x.dtype
    if split is None:
        out = out2 = torch.empty(N, device=x.device, dtype=dtype)
        split = N
    else:
        assert 0 < split < N, f"split must lie in (0, {N}); got {split}"
        out = torch.empty(split, device=x.device, dtype=dtype)
        out2 = torch.empty(N - split, device=x.device, dtype=dtype)
    block_n = 64 if N >= 64 else triton.next_power_of_2(N)
    block_m = 64 if M >= 64 else triton.next_power_of_2(max(M, 1))
    _column_sum_kernel[(triton.cdiv(N, block_n),)](
        x, out, out2, M, N, split, x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out if split == N else (out, out2)
