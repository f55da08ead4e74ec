"""LayerNorm pieces that live outside the GEMMs (Ba et al., "Layer Normalization", 2016):

* ``row_stats``: fp32 mean and rstd = 1 / sqrt(var + eps) per row; the GEMM's A-operand prologue applies the
  normalisation from them, so normalised activations never reach device memory.
* ``layernorm_bwd``: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + d_residual with g = dy * gamma, and
  dgamma / dbeta as per-program fp32 partial sums (at most ``BWD_PROGRAMS`` programs, each looping over row blocks
  ``pid, pid + programs, ...``) reduced afterwards by one column-sum launch in a fixed order (deterministic: no
  atomics; the partition depends only on the shape, not on the device).

A whole row (D <= 8192) is held in one tile; rows are processed ``ROWS`` at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reduce import column_sum


@triton.jit
def _layernorm_stats_kernel(
    x_ptr,  # (M, D) input rows, row stride stride_x_m, unit column stride
    mean_ptr, rstd_ptr,  # (M,) fp32 outputs
    M, D, stride_x_m, eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < M
    mask = mask_r[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(var + eps), mask=mask_r)


@triton.jit
def _layernorm_bwd_kernel(
    x_ptr,  # (M, D) LayerNorm input
    dy_ptr,  # (M, D) gradient w.r.t. the LayerNorm output
    dres_ptr,  # (M, D) gradient arriving through the residual path, added to dx (HAS_DRES)
    gamma_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) output
    part_ptr,  # (num_programs, 2 * D) fp32 per-program partial sums: dgamma in [0, D), dbeta in [D, 2D)
    M, D, stride_x_m, stride_dy_m, stride_dres_m, stride_dx_m,
    HAS_DRES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask_c = cols < D
    gamma = tl.load(gamma_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dgamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, ROWS), n_prog):
        rows = blk * ROWS + tl.arange(0, ROWS)
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r64 * stride_x_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * gamma[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + r64 * stride_dres_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64 * stride_dx_m + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dgamma += tl.sum(dy * xhat, axis=0)
        dbeta += tl.sum(dy, axis=0)
    tl.store(part_ptr + pid * 2 * D + cols, dgamma, mask=mask_c)
    tl.store(part_ptr + pid * 2 * D + D + cols, dbeta, mask=mask_c)


BWD_PROGRAMS = 256  # at most this many LayerNorm-backward programs (partial rows); fixed, so results do not
#                    depend on the device (about two waves of an H100's 132 SMs)


def _rows_per_program(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 4096 // block_d)), block_d


def row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mean, rstd) of each row of x (M, D) (unit column stride). Returns two (M,) fp32 tensors."""
    M, D = x.shape
    assert x.stride(1) == 1
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    rows, block_d = _rows_per_program(D)
    _layernorm_stats_kernel[(triton.cdiv(M, rows),)](x, mean, rstd, M, D, x.stride(0), eps, ROWS=rows, BLOCK_D=block_d)
    return mean, rstd


def layernorm_bwd(
    x: torch.Tensor, dy: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    dres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm backward for x, dy (M, D) (unit column strides). Returns dx (M, D) in x's dtype (plus dres when
    given) and dgamma, dbeta (D,) in gamma's dtype, reduced deterministically in fp32 (two launches in all)."""
    M, D = x.shape
    rows, block_d = _rows_per_program(D)
    n_prog = max(1, min(triton.cdiv(M, rows), BWD_PROGRAMS))
    dx = torch.empty_like(x)
    part = torch.empty((n_prog, 2 * D), device=x.device, dtype=torch.float32)
    _layernorm_bwd_kernel[(n_prog,)](
        x, dy, dres if dres is not None else dy, gamma, mean, rstd, dx, part,
        M, D, x.stride(0), dy.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
        HAS_DRES=dres is not None, ROWS=rows, BLOCK_D=block_d,
    )
    dgamma, dbeta = column_sum(part, gamma.dtype, split=D)
    return dx, dgamma, dbeta
