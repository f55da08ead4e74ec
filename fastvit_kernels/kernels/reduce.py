"""Deterministic column sums: out[n] = sum_m x[m, n], accumulated in fp32 in a fixed order (no atomics), used
for the patch-embedding gradients: ``column_sum`` over the batch (also writing the position-embedding gradient,
converted to the weights' dtype, in the same launch), then ``column_sum_tail`` (the bias gradient: the sum of the
patch rows, with the class / register rows converted in the same launch); and for the GEMM row sums of the cuBLAS
path. ``column_sum``'s ``split`` writes the columns of one input to two outputs.

Order of the sums (both kernels, so their results agree bit for bit): rows are loaded ``BLOCK_M`` at a time into a
(BLOCK_M, BLOCK_N) fp32 accumulator (accumulator row r gets input rows r, r + BLOCK_M, ... in turn), which is
then summed over its rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _column_sum_kernel(
    x_ptr,  # (M, N) input, strides (stride_x_m, stride_x_n)
    out_ptr,  # (SPLIT,) output: columns [0, SPLIT)
    out2_ptr,  # (N - SPLIT,) output: columns [SPLIT, N)
    copy_ptr,  # (N - COPY_FROM,) second output of columns [COPY_FROM, N) in its own dtype (HAS_COPY)
    M, N, SPLIT, COPY_FROM, stride_x_m, stride_x_n,
    HAS_COPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_n
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    first = cols < SPLIT
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=mask_n & first)
    tl.store(out2_ptr + (cols - SPLIT), total.to(out2_ptr.dtype.element_ty), mask=mask_n & (cols >= SPLIT))
    if HAS_COPY:
        tl.store(copy_ptr + (cols - COPY_FROM), total.to(copy_ptr.dtype.element_ty), mask=mask_n & (cols >= COPY_FROM))


@triton.jit
def _column_sum_tail_kernel(
    x_ptr,  # (M, N) input, strides (stride_x_m, stride_x_n)
    out_ptr,  # (N,) sum of rows [HEAD, M)
    head_ptr,  # (HEAD_SPLIT, N) contiguous: rows [0, HEAD_SPLIT) converted to its dtype
    head2_ptr,  # (HEAD - HEAD_SPLIT, N) contiguous: rows [HEAD_SPLIT, HEAD) converted to its dtype
    M, N, HEAD, HEAD_SPLIT, stride_x_m, stride_x_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HEAD: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    col_off = cols[None, :].to(tl.int64) * stride_x_n
    # the sum: the order of _column_sum_kernel on the rows [HEAD, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M - HEAD, BLOCK_M):
        rows = HEAD + m0 + tl.arange(0, BLOCK_M)
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + col_off
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)
    # the head rows, converted
    h = tl.arange(0, BLOCK_HEAD)
    mask = (h < HEAD)[:, None] & mask_n[None, :]
    v = tl.load(x_ptr + h.to(tl.int64)[:, None] * stride_x_m + col_off, mask=mask, other=0.0)
    first = (h < HEAD_SPLIT)[:, None]
    tl.store(head_ptr + h[:, None] * N + cols[None, :], v.to(head_ptr.dtype.element_ty), mask=mask & first)
    tl.store(head2_ptr + (h[:, None] - HEAD_SPLIT) * N + cols[None, :], v.to(head2_ptr.dtype.element_ty),
             mask=mask & ~first)


def _blocks(M: int, N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a column sum over M rows and N columns."""
    return (64 if M >= 64 else triton.next_power_of_2(max(M, 1))), (64 if N >= 64 else triton.next_power_of_2(N))


def column_sum(x: torch.Tensor, out_dtype: torch.dtype | None = None, split: int | None = None,
               copy_dtype: torch.dtype | None = None, copy_from: int = 0):
    """Sum a 2-D tensor x (M, N) over its rows in fp32 (one launch): returns (N,) in ``out_dtype`` (default x's
    dtype); with ``split`` (0 < split < N), two separate tensors: the sums of columns [0, split) and [split, N).

    With ``copy_dtype``, the same launch also writes the sums of columns [copy_from, N) (0 <= copy_from < N)
    converted to ``copy_dtype`` into a second, separate (N - copy_from,) tensor, and the result is the pair
    (the return value above, that copy)."""
    M, N = x.shape
    dtype = out_dtype or x.dtype
    if split is None:
        out = out2 = torch.empty(N, device=x.device, dtype=dtype)
        split = N
    else:
        assert 0 < split < N, f"split must lie in (0, {N}); got {split}"
        out = torch.empty(split, device=x.device, dtype=dtype)
        out2 = torch.empty(N - split, device=x.device, dtype=dtype)
    if copy_dtype is not None:
        assert 0 <= copy_from < N, f"copy_from must lie in [0, {N}); got {copy_from}"
        copy = torch.empty(N - copy_from, device=x.device, dtype=copy_dtype)
    block_m, block_n = _blocks(M, N)
    _launch.launch(
        _column_sum_kernel, (triton.cdiv(N, block_n),),
        x, out, out2, copy if copy_dtype is not None else out, M, N, split, copy_from, x.stride(0), x.stride(1),
        HAS_COPY=copy_dtype is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    result = out if split == N else (out, out2)
    return result if copy_dtype is None else (result, copy)


def column_sum_tail(x: torch.Tensor, head: int, out_dtype: torch.dtype, head_split: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For x (M, N) and 0 <= head < M, in one launch: the fp32 sum of rows [head, M) as (N,) in ``out_dtype``
    (bit-identical to ``column_sum(x[head:], out_dtype)``), and rows [0, head) converted to ``out_dtype``, as two
    separate contiguous tensors: rows [0, head_split) (head_split, N) and rows [head_split, head)
    (head - head_split, N) (0 <= head_split <= head, default head: the second one is empty).
    Returns (sums, first head rows, second head rows)."""
    M, N = x.shape
    head_split = head if head_split is None else head_split
    assert 0 <= head < M and 0 <= head_split <= head, f"need 0 <= head_split <= head < M; got {head_split}, {head}, {M}"
    out = torch.empty(N, device=x.device, dtype=out_dtype)
    first = torch.empty((head_split, N), device=x.device, dtype=out_dtype)
    second = torch.empty((head - head_split, N), device=x.device, dtype=out_dtype)
    block_m, block_n = _blocks(M - head, N)
    _launch.launch(
        _column_sum_tail_kernel, (triton.cdiv(N, block_n),),
        x, out, first if head_split else out, second if head > head_split else out,
        M, N, head, head_split, x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_HEAD=triton.next_power_of_2(max(head, 1)),
    )
    return out, first, second
