"""LayerNorm pieces that live outside the GEMMs (Ba et al., "Layer Normalization", 2016), and the same for RMSNorm
(Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019; timm's ``RmsNorm``: ``x * rsqrt(mean(x^2) + eps)
* weight``, no mean subtraction):

* ``row_stats``: fp32 mean and rstd = 1 / sqrt(var + eps) per row (``rms=True``: mean = 0 and rstd = 1 /
  sqrt(mean(x^2) + eps)); the GEMM's A-operand prologue applies the normalisation from them, so normalised
  activations never reach device memory. With the zero mean (and a zero beta when the norm has no bias) the
  LayerNorm prologue computes RMSNorm exactly (subtracting and adding 0 are exact), so RMSNorm needs no prologue
  kind of its own.
* ``layernorm_bwd``: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + d_residual with g = dy * gamma, and
  dgamma / dbeta, all in ONE launch (``rms=True``: xhat = x * rstd and no mean(g) term, the RMSNorm backward).
  Each of the P programs (at most ``BWD_PROGRAMS``, each looping over row blocks ``pid, pid + P, ...``) writes
  its fp32 dgamma / dbeta partial row; the P rows are then summed by a two-level "last block done" tree (CUDA's
  threadFenceReduction sample, PyTorch's ``Reduce.cuh`` semaphores), no floating-point atomics:

  1. programs form groups of ``BWD_GROUP`` = 16 consecutive ids (the last group may be smaller); each takes a ticket
     from its group's int32 counter (atomic add, acquire-release, GPU scope), and the group's last program sums the
     group's partial rows in a fixed order (rows 16g, 16g + 1, ...) into an fp32 group row;
  2. that program then takes a ticket from the global counter, and the last of the G = ceil(P / 16) group
     programs sums the G group rows in a fixed order and writes dgamma / dbeta.

  The counters are a zero-filled buffer made for each launch (``ticket_counter``), not persistent state.

  Both sums run ``ROWS`` rows at a time (blocks 0, 1, 2, ... into a (ROWS, BLOCK_D) accumulator, then over its
  rows), so the result depends only on (M, D, P), not on which programs finish last nor on the device:
  deterministic. Each level reads at most 16 rows of 2 * D fp32 (16 * 2 * 768 * 4 B = 98 KB for ViT-B) where a
  single last program would read all P rows (1.5 MiB at P = 256) alone after the others are done; the group sums
  of different groups overlap with the programs still running. With P <= 16 there is one group, whose sum is
  exactly the one-level sum of the P rows.

A whole row (D <= 8192) is held in one tile; rows are processed ``ROWS`` at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _layernorm_stats_kernel(
    x_ptr,  # (M, D) input rows, row stride stride_x_m, unit column stride
    mean_ptr, rstd_ptr,  # (M,) fp32 outputs
    M, D, stride_x_m, eps,
    RMS: tl.constexpr,  # RMSNorm: mean written as 0, rstd from mean(x^2) (no mean subtraction)
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < M
    mask = mask_r[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        var = tl.sum(x * x, axis=1) / D  # the mean square (masked columns load as 0)
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(var + eps), mask=mask_r)


@triton.jit
def _sum_rows(src_ptr, row0, n_rows, D, cols, mask_c, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 sums of rows row0 .. row0 + n_rows - 1 of a (rows, 2 * D) fp32 buffer written by other programs:
    (sum of columns [0, D), sum of columns [D, 2D)), each (BLOCK_D,). Fixed order: ROWS rows at a time into a
    (ROWS, BLOCK_D) accumulator, then over its rows."""
    acc_g = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for p0 in range(0, n_rows, ROWS):
        prow = p0 + tl.arange(0, ROWS)
        pmask = (prow < n_rows)[:, None] & mask_c[None, :]
        src = src_ptr + (row0 + prow).to(tl.int64)[:, None] * 2 * D + cols[None, :]
        # .cg: other programs' rows, read from L2, bypassing this SM's (non-coherent) L1
        acc_g += tl.load(src, mask=pmask, other=0.0, cache_modifier=".cg")
        acc_b += tl.load(src + D, mask=pmask, other=0.0, cache_modifier=".cg")
    return tl.sum(acc_g, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _layernorm_bwd_kernel(
    x_ptr,  # (M, D) LayerNorm input
    dy_ptr,  # (M, D) gradient w.r.t. the LayerNorm output
    dres_ptr,  # (M, D) gradient arriving through the residual path, added to dx (HAS_DRES)
    gamma_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) output
    part_ptr,  # (num_programs, 2 * D) fp32 per-program partial sums: dgamma in [0, D), dbeta in [D, 2D)
    group_part_ptr,  # (cdiv(num_programs, GROUP), 2 * D) fp32 per-group sums of part's rows, same layout
    dgamma_ptr, dbeta_ptr,  # (D,) outputs in gamma's dtype, written by the last group's last program
    counter_ptr,  # (1 + n_groups,) int32, all 0 at launch (fresh for each launch): [0] global, [1 + g] group g
    M, D, stride_x_m, stride_dy_m, stride_dres_m, stride_dx_m,
    HAS_DRES: tl.constexpr,
    RMS: tl.constexpr,  # RMSNorm backward: no mean (mean_ptr is not read), no mean(g) term
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask_c = cols < D
    dgamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if BLOCK_D < 4096:
        gamma_row = tl.load(gamma_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    for blk in range(pid, tl.cdiv(M, ROWS), n_prog):
        if BLOCK_D >= 4096:
            # wide rows re-read gamma per row block (a cache hit) rather than hold it across the loop: one vector
            # fewer live beside dgamma / dbeta (the 4096-wide backward spilled 8 B on sm_90 with it held, Triton
            # 3.4); narrower rows keep it (re-reading it spilled 8 B at 2048 columns on sm_90, Triton 3.8)
            gamma = tl.load(gamma_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
        else:
            gamma = gamma_row
        rows = blk * ROWS + tl.arange(0, ROWS)
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r64 * stride_x_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        g = dy * gamma[None, :]
        if RMS:
            xhat = x * rstd[:, None]  # masked elements load as 0
            c1 = tl.sum(g * xhat, axis=1) / D
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
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
    # two-level "last block done" tree. Before each ticket, a CTA barrier orders every thread's stores before the
    # ticket's release; the program drawing the last ticket acquires them and reads them with .cg loads (from L2,
    # bypassing this SM's non-coherent L1). Level 1: the group's last program sums its GROUP partial rows.
    grp = pid // GROUP
    row0 = grp * GROUP
    group_size = tl.minimum(n_prog - row0, GROUP)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + 1 + grp, 1, sem="acq_rel")
    if ticket == group_size - 1:
        acc_g, acc_b = _sum_rows(part_ptr, row0, group_size, D, cols, mask_c, ROWS, BLOCK_D)
        tl.store(group_part_ptr + grp * 2 * D + cols, acc_g, mask=mask_c)
        tl.store(group_part_ptr + grp * 2 * D + D + cols, acc_b, mask=mask_c)
        # level 2: the last group to finish sums the n_groups group rows
        n_groups = tl.cdiv(n_prog, GROUP)
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == n_groups - 1:
            acc_g, acc_b = _sum_rows(group_part_ptr, 0, n_groups, D, cols, mask_c, ROWS, BLOCK_D)
            tl.store(dgamma_ptr + cols, acc_g.to(dgamma_ptr.dtype.element_ty), mask=mask_c)
            tl.store(dbeta_ptr + cols, acc_b.to(dbeta_ptr.dtype.element_ty), mask=mask_c)


BWD_PROGRAMS = 256  # at most this many LayerNorm-backward programs (partial rows); fixed, so results do not
#                    depend on the device (about two waves of an H100's 132 SMs)
BWD_GROUP = 16  # programs per first-level group of the backward's dgamma / dbeta tree; 256 = 16 groups of 16, so
#                 both levels sum at most 16 rows


def _rows_per_program(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 4096 // block_d)), block_d


def _warps(block_d: int) -> int:
    """Warps of a LayerNorm kernel over rows of ``block_d`` columns: 4, and 16 from 4096 columns (a 4096-wide row
    left 512 B per thread on the stack in the backward with 4 warps, 16-32 B with 8, on sm_80 / sm_90: AOT check,
    Triton 3.4, the SwiGLU hidden norm of a ViT-H-sized MLP)."""
    return 16 if block_d >= 4096 else 4


def bwd_programs(M: int, D: int) -> int:
    """Programs of one :func:`layernorm_bwd` launch over (M, D) rows (= its fp32 partial rows): one per block of
    ``ROWS`` rows, at most ``BWD_PROGRAMS``, each looping over row blocks. Host arithmetic only (the cost model
    calls it without a GPU)."""
    rows, _ = _rows_per_program(D)
    return max(1, min(triton.cdiv(M, rows), BWD_PROGRAMS))


def row_stats(x: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mean, rstd) of each row of x (M, D) (unit column stride, any row stride), in one launch: LayerNorm's
    mean and rstd = 1 / sqrt(var + eps) (biased variance, as ``F.layer_norm``); with ``rms=True`` RMSNorm's
    (timm ``RmsNorm``): mean = 0 and rstd = 1 / sqrt(mean(x^2) + eps), so that the LayerNorm prologue
    (:class:`fusion.LayerNorm`) and :func:`layernorm_bwd` ``(rms=True)`` serve RMSNorm unchanged. Returns two (M,)
    fp32 tensors."""
    M, D = x.shape
    assert x.stride(1) == 1
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    rows, block_d = _rows_per_program(D)
    _launch.launch(_layernorm_stats_kernel, (triton.cdiv(M, rows),), x, mean, rstd, M, D, x.stride(0), eps,
                   RMS=bool(rms), ROWS=rows, BLOCK_D=block_d, num_warps=_warps(block_d))
    return mean, rstd


def ticket_counter(device: torch.device, n_groups: int) -> torch.Tensor:
    """The int32 ticket counters of one ``_layernorm_bwd_kernel`` launch with ``n_groups`` program groups on
    ``device``: a new zero-filled (1 + n_groups,) tensor, [0] the global counter and [1 + g] that of group g.

    A fresh buffer per launch, at the cost of one small fill launch before each LayerNorm backward, rather than a
    persistent buffer reused across launches. A persistent buffer held by module state is unsafe under CUDA graphs:
    under ``torch.compile(mode="reduce-overhead")`` cudagraph trees route every allocation of the warm-up run and
    of the recording into the graph's private memory pool, so a buffer first made there lives in the pool, is kept
    alive by the module state (``check_memory_pool`` fails) and, once the pool is reclaimed for a re-recording, can
    share its memory with another tensor, leaving non-zero tickets and dgamma / dbeta never written. Allocating it
    outside the pool cannot be done reliably from inside the op: the warm-up run is routed to the pool as well,
    and escaping that routing needs the allocator's private interfaces. A fresh buffer is an ordinary tensor of
    the stream and pool it is made in, freed after the launch; inside a captured graph the fill is captured with
    the kernel, so every replay starts from zeros; and a launch never depends on what an earlier (possibly
    interrupted) launch left behind.

    Raises:
        ValueError: n_groups < 1.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1; got {n_groups}")
    return torch.zeros(1 + n_groups, dtype=torch.int32, device=device)


def layernorm_bwd(
    x: torch.Tensor, dy: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
    dres: torch.Tensor | None = None, *, rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm backward in one launch for x, dy (M, D) (unit column strides), gamma (D,), mean / rstd (M,) fp32
    (from ``row_stats``) and optionally dres (M, D) (unit column stride), the gradient arriving through a residual
    path. ``rms=True``: the RMSNorm backward (y = x * rstd * gamma (+ beta), rstd from ``row_stats(x, eps,
    rms=True)``): dx = rstd * (g - xhat * mean(g * xhat)) with xhat = x * rstd; ``mean`` is not read (may be None).
    Returns dx (M, D) in x's dtype (plus dres when given) and dgamma, dbeta (D,) in gamma's dtype (dbeta = the
    column sums of dy: the gradient of a norm bias, which an RMSNorm without bias ignores), summed in
    fp32 by a fixed two-level tree (P = min(ceil(M / ROWS), BWD_PROGRAMS) per-program partial rows, groups of
    BWD_GROUP of them, then the group sums; deterministic: the same bits on every run).

    Scratch: (P, 2D) fp32 partial rows and (ceil(P / BWD_GROUP), 2D) fp32 group rows, each written once and read
    once (by the group's / the global last program), and the (1 + ceil(P / BWD_GROUP),) int32 ``ticket_counter``
    buffer, zero-filled for this launch (one fill launch before the kernel)."""
    M, D = x.shape
    if mean is None and not rms:
        raise ValueError("mean: expected the (M,) fp32 row means of LayerNorm (None only with rms=True); got None")
    rows, block_d = _rows_per_program(D)
    n_prog = bwd_programs(M, D)
    n_groups = triton.cdiv(n_prog, BWD_GROUP)
    counter = ticket_counter(x.device, n_groups)
    dx = torch.empty_like(x)
    part = torch.empty((n_prog, 2 * D), device=x.device, dtype=torch.float32)
    group_part = torch.empty((n_groups, 2 * D), device=x.device, dtype=torch.float32)
    dgamma = torch.empty(D, device=x.device, dtype=gamma.dtype)
    dbeta = torch.empty(D, device=x.device, dtype=gamma.dtype)
    _launch.launch(
        _layernorm_bwd_kernel, (n_prog,),
        x, dy, dres if dres is not None else dy, gamma, rstd if mean is None else mean, rstd, dx, part, group_part,
        dgamma, dbeta, counter,
        M, D, x.stride(0), dy.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
        HAS_DRES=dres is not None, RMS=bool(rms), ROWS=rows, BLOCK_D=block_d, GROUP=BWD_GROUP,
        num_warps=_warps(block_d),
    )
    return dx, dgamma, dbeta
