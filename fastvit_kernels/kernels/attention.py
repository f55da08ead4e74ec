"""Multi-head softmax attention on a packed qkv tensor: Triton forward and backward kernels and their launchers.

What: ``out = softmax(scale * q k^T) v`` per (batch, head), reading q, k, v straight out of the qkv Linear's output
``(B, N, 3 * D)`` = ``(B, N, 3, H, head_dim)`` (no permute copies) and writing ``out`` as ``(B, N, D)`` with head
h at columns ``h * head_dim`` (the layout the output projection reads). The backward writes d(qkv) in the same
packed layout. No autograd here: :mod:`fastvit_kernels.ops.attention` wraps these launchers.

Algorithm: FlashAttention-2 (T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023). Forward: one program per (query block, batch * head) streams over key blocks with an online
softmax (running max ``m``, running sum ``l``, fp32 accumulator) and saves the log-sum-exp. Backward: recompute the
probabilities from q, k and the saved log-sum-exp; a preprocess kernel computes ``delta = rowsum(dO * O)``; one
kernel per key block accumulates dK and dV over all query blocks, another per query block accumulates dQ over all
key blocks. No atomics, so results are deterministic (bit-identical across runs).

Numerics:
* exp2 everywhere, with log2(e) folded into the softmax scale (``qk_scale = scale * log2(e)``).
* The saved log-sum-exp ``lse`` is (B, H, N) fp32 in **log2 units**: ``lse[b, h, i] = log2(sum_j 2^(qk_scale *
  q_i . k_j))`` = natural-log LSE * log2(e). ``P_ij = exp2(qk_scale * q_i . k_j - lse_i)``.
* Key tails are masked with a finite value (-1e30), never -inf, so no NaN/Inf for any N >= 1 (N = 1 included).
* fp32 accumulators and softmax statistics; P and dS are cast to the input dtype before their dots so fp16/bf16
  use tensor cores. fp32 inputs use IEEE fp32 dots (``input_precision="ieee"``, no TF32), so fp32 results match
  an fp32 reference up to summation order.

Caveats (v1, 2026-11):
* head_dim that is not a power of two (40, 48, 72, 80, 88, 96) is padded to the next power of two in registers
  (``BLOCK_D``) with a column mask; e.g. head_dim 80 does the work of 128. A later issue splits the head dim into
  power-of-two chunks instead.
* Block sizes are fixed per (N, head_dim) by :func:`_attention_config`, not autotuned yet.
* The column stride of every tensor must be 1 (the op in ``ops/`` guarantees it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
# Finite "minus infinity" for masked scores: exp2(MASK_VALUE - m) == 0, and never inf - inf = NaN.
MASK_VALUE: tl.constexpr = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _attention_config(N: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for one attention call (fixed in v1; autotuning comes later).

    Args:
        N: sequence length.
        head_dim: per-head width.
        dtype: the input dtype.

    Returns:
        dict with BLOCK_M (query rows per tile), BLOCK_N (key rows per tile), BLOCK_D (head_dim padded to a power of
        two), num_warps, num_stages.

    Chosen from ahead-of-time sm_90 / sm_80 builds at ViT-B/L/H shapes with Triton 3.6 and 3.9 (ptxas register
    and spill counts), no timings yet: fp16/bf16 64 x 64 tiles use wgmma / mma.sync; with 4 warps the dK/dV kernel
    hit 255 registers and spilled a little (Triton 3.6, sm_90); 8 warps remove that except 12 bytes left at
    BLOCK_D = 128 with Triton 3.6 on sm_90 (none with 3.9). IEEE fp32 dots run on the FMA units with their operand
    tiles in registers, so fp32 takes smaller tiles: 64 x 64 spilled up to 40 KB per thread at head_dim 128;
    32 x 32 (8 warps, 1 stage) and, for BLOCK_D = 128, 16 x 16 do not spill with 8 warps (with 4 warps the AOT
    check, ``python -m fastvit_kernels.aot check``, found 16 B of spills at head_dim 80 with Triton 3.9: dK/dV on
    sm_80, and the forward on sm_90 with 1 stage).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    # 16 is tl.dot's minimum tile edge; small N takes small tiles (less masked work; fewer interpreter steps).
    block = 16 if N <= 16 else 32 if N <= 32 else 64
    if dtype == torch.float32:
        if block_d <= 64:
            return dict(BLOCK_M=min(block, 32), BLOCK_N=min(block, 32), BLOCK_D=block_d, num_warps=8, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=8 if block == 64 else 4, num_stages=2)


@triton.jit
def _load_tile(ptrs, offs_rows, offs_d, N, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= N and columns >= HEAD_DIM (masks only where needed)."""
    if EVEN_N:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < N, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, tile, offs_rows, offs_d, N, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr,
                EVEN_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, skipping rows >= N and columns >= HEAD_DIM."""
    if EVEN_N:
        if EVEN_D:
            tl.store(ptrs, tile)
        else:
            tl.store(ptrs, tile, mask=offs_d[None, :] < HEAD_DIM)
    else:
        if EVEN_D:
            tl.store(ptrs, tile, mask=offs_rows[:, None] < N)
        else:
            tl.store(ptrs, tile, mask=(offs_rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _load_row(ptrs, offs_rows, N, EVEN_N: tl.constexpr):
    """Load a (rows,) fp32 vector (lse or delta), zero-filling rows >= N."""
    if EVEN_N:
        row = tl.load(ptrs)
    else:
        row = tl.load(ptrs, mask=offs_rows < N, other=0.0)
    return row


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    QKV,  # (B, N, 3 * D) input: q | k | v, head h of each at column h * HEAD_DIM of its third
    Out,  # (B, N, D) output, input dtype; head h at columns h * HEAD_DIM
    Lse,  # (B, H, N) fp32 output: log2-sum-exp2 of each query row's scaled scores
    qk_scale,  # fp32 scalar: softmax scale * log2(e)
    stride_qkv_b, stride_qkv_n,  # strides of QKV over B and N (column stride is 1)
    stride_out_b, stride_out_n,  # strides of Out over B and N (column stride is 1)
    stride_lse_b, stride_lse_h,  # strides of Lse over B and H (stride over N is 1)
    N,  # sequence length
    H,  # number of heads
    D,  # model width H * HEAD_DIM: offset of k (D) and v (2 * D) in a qkv row
    HEAD_DIM: tl.constexpr,  # per-head width
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (columns >= HEAD_DIM are masked)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    EVEN_N: tl.constexpr,  # N is a multiple of BLOCK_M and BLOCK_N: no sequence-tail masks
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs, else "tf32" (ignored)
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = QKV + b * stride_qkv_b + h * HEAD_DIM
    q_ptrs = qkv_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :]
    k_ptrs = qkv_base + D + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = qkv_base + 2 * D + offs_n[:, None] * stride_qkv_n + offs_d[None, :]

    q = _load_tile(q_ptrs, offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_qkv_n, offs_kn, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(offs_kn[None, :] < N, s, MASK_VALUE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + start_n * stride_qkv_n, offs_kn, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    # l_i >= 1 for every row (the row max contributes exp2(0)), so the division and log2 are safe.
    acc = acc / l_i[:, None]
    out_ptrs = Out + b * stride_out_b + h * HEAD_DIM + offs_m[:, None] * stride_out_n + offs_d[None, :]
    _store_tile(out_ptrs, acc.to(Out.dtype.element_ty), offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    lse_ptrs = Lse + b * stride_lse_b + h * stride_lse_h + offs_m
    if EVEN_N:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i))
    else:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=offs_m < N)


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out,  # (B, N, D) forward output, input dtype
    DOut,  # (B, N, D) gradient of the output, input dtype
    Delta,  # (B, H, N) fp32 output: delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]
    stride_out_b, stride_out_n,  # strides of Out over B and N (column stride is 1)
    stride_do_b, stride_do_n,  # strides of DOut over B and N (column stride is 1)
    stride_delta_b, stride_delta_h,  # strides of Delta over B and H (stride over N is 1)
    N,  # sequence length
    H,  # number of heads
    HEAD_DIM: tl.constexpr,  # per-head width
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows per program
    EVEN_N: tl.constexpr,  # N is a multiple of BLOCK_M
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = Out + b * stride_out_b + h * HEAD_DIM + offs_m[:, None] * stride_out_n + offs_d[None, :]
    do_ptrs = DOut + b * stride_do_b + h * HEAD_DIM + offs_m[:, None] * stride_do_n + offs_d[None, :]
    o = _load_tile(o_ptrs, offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D).to(tl.float32)
    do = _load_tile(do_ptrs, offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    delta_ptrs = Delta + b * stride_delta_b + h * stride_delta_h + offs_m
    if EVEN_N:
        tl.store(delta_ptrs, delta)
    else:
        tl.store(delta_ptrs, delta, mask=offs_m < N)


@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV,  # (B, N, 3 * D) forward input (q | k | v)
    DOut,  # (B, N, D) gradient of the output, input dtype
    Lse,  # (B, H, N) fp32 log2-sum-exp2 saved by the forward
    Delta,  # (B, H, N) fp32 rowsum(dO * O) from the preprocess kernel
    DQKV,  # (B, N, 3 * D) output: this kernel writes the dk and dv thirds
    qk_scale,  # fp32 scalar: softmax scale * log2(e)
    sm_scale,  # fp32 scalar: softmax scale (dK = sm_scale * dS^T Q)
    stride_qkv_b, stride_qkv_n,  # strides of QKV over B and N (column stride is 1)
    stride_do_b, stride_do_n,  # strides of DOut over B and N (column stride is 1)
    stride_lse_b, stride_lse_h,  # strides of Lse and Delta over B and H (stride over N is 1)
    stride_dqkv_b, stride_dqkv_n,  # strides of DQKV over B and N (column stride is 1)
    N,  # sequence length
    H,  # number of heads
    D,  # model width H * HEAD_DIM
    HEAD_DIM: tl.constexpr,  # per-head width
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows per program
    EVEN_N: tl.constexpr,  # N is a multiple of BLOCK_M and BLOCK_N
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs, else "tf32" (ignored)
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = QKV + b * stride_qkv_b + h * HEAD_DIM
    k = _load_tile(qkv_base + D + offs_n[:, None] * stride_qkv_n + offs_d[None, :],
                   offs_n, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    v = _load_tile(qkv_base + 2 * D + offs_n[:, None] * stride_qkv_n + offs_d[None, :],
                   offs_n, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    q_ptrs = qkv_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :]
    do_ptrs = DOut + b * stride_do_b + h * HEAD_DIM + offs_m[:, None] * stride_do_n + offs_d[None, :]
    lse_ptrs = Lse + b * stride_lse_b + h * stride_lse_h + offs_m
    delta_ptrs = Delta + b * stride_lse_b + h * stride_lse_h + offs_m

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_qm = start_m + offs_m
        q = _load_tile(q_ptrs + start_m * stride_qkv_n, offs_qm, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        do = _load_tile(do_ptrs + start_m * stride_do_n, offs_qm, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        lse = _load_row(lse_ptrs + start_m, offs_qm, N, EVEN_N)
        delta = _load_row(delta_ptrs + start_m, offs_qm, N, EVEN_N)
        # Transposed probabilities P^T (BLOCK_N, BLOCK_M), recomputed from q, k and the saved lse.
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        if not EVEN_N:
            # Padded key rows (offs_n >= N) are never stored, but exp2(0 - lse) there can be inf (see the dq
            # kernel); mask them so no inf / NaN is ever formed.
            s_t = tl.where(offs_n[:, None] < N, s_t, MASK_VALUE)
        # Padded query columns (offs_qm >= N) need no mask: q, lse, dO and delta load as 0 there, so p_t is
        # exp2(0) = 1 (finite) and both its dV and its dS terms are multiplied by dO = 0 / (dp_t - delta) = 0.
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)

    dk = dk * sm_scale
    dqkv_base = DQKV + b * stride_dqkv_b + h * HEAD_DIM + offs_n[:, None] * stride_dqkv_n + offs_d[None, :]
    _store_tile(dqkv_base + D, dk.to(DQKV.dtype.element_ty), offs_n, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    _store_tile(dqkv_base + 2 * D, dv.to(DQKV.dtype.element_ty), offs_n, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)


@triton.jit
def _attention_bwd_dq_kernel(
    QKV,  # (B, N, 3 * D) forward input (q | k | v)
    DOut,  # (B, N, D) gradient of the output, input dtype
    Lse,  # (B, H, N) fp32 log2-sum-exp2 saved by the forward
    Delta,  # (B, H, N) fp32 rowsum(dO * O) from the preprocess kernel
    DQKV,  # (B, N, 3 * D) output: this kernel writes the dq third
    qk_scale,  # fp32 scalar: softmax scale * log2(e)
    sm_scale,  # fp32 scalar: softmax scale (dQ = sm_scale * dS K)
    stride_qkv_b, stride_qkv_n,  # strides of QKV over B and N (column stride is 1)
    stride_do_b, stride_do_n,  # strides of DOut over B and N (column stride is 1)
    stride_lse_b, stride_lse_h,  # strides of Lse and Delta over B and H (stride over N is 1)
    stride_dqkv_b, stride_dqkv_n,  # strides of DQKV over B and N (column stride is 1)
    N,  # sequence length
    H,  # number of heads
    D,  # model width H * HEAD_DIM
    HEAD_DIM: tl.constexpr,  # per-head width
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    EVEN_N: tl.constexpr,  # N is a multiple of BLOCK_M and BLOCK_N
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs, else "tf32" (ignored)
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = QKV + b * stride_qkv_b + h * HEAD_DIM
    q = _load_tile(qkv_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :],
                   offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    do = _load_tile(DOut + b * stride_do_b + h * HEAD_DIM + offs_m[:, None] * stride_do_n + offs_d[None, :],
                    offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
    lse = _load_row(Lse + b * stride_lse_b + h * stride_lse_h + offs_m, offs_m, N, EVEN_N)
    delta = _load_row(Delta + b * stride_lse_b + h * stride_lse_h + offs_m, offs_m, N, EVEN_N)
    k_ptrs = qkv_base + D + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = qkv_base + 2 * D + offs_n[:, None] * stride_qkv_n + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_qkv_n, offs_kn, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        v = _load_tile(v_ptrs + start_n * stride_qkv_n, offs_kn, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if not EVEN_N:
            # Padded keys load k = v = 0, so s = 0 and exp2(0 - lse) would overflow to inf when every real score
            # is very negative (inf * 0 = NaN in dS @ K). The finite mask value makes their P exactly 0.
            s = tl.where(offs_kn[None, :] < N, s, MASK_VALUE)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQKV + b * stride_dqkv_b + h * HEAD_DIM + offs_m[:, None] * stride_dqkv_n + offs_d[None, :]
    _store_tile(dq_ptrs, dq.to(DQKV.dtype.element_ty), offs_m, offs_d, N, HEAD_DIM, EVEN_N, EVEN_D)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention on a packed qkv tensor.

    Args:
        qkv: (B, N, 3 * D), D = num_heads * head_dim, column stride 1; fp32 | fp16 | bf16 (validated by the op).
        num_heads: H.
        scale: softmax scale (> 0).

    Returns:
        out: (B, N, D), qkv's dtype, head h at columns h * head_dim.
        lse: (B, H, N) fp32 log2-sum-exp2 of the scaled scores (see the file header), for the backward.
    """
    B, N, three_d = qkv.shape
    D = three_d // 3
    head_dim = D // num_heads
    out = torch.empty((B, N, D), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    if B == 0:  # empty batch: nothing to launch (a zero-size grid is an error on some drivers)
        return out, lse
    assert qkv.dim() == 3 and qkv.stride(-1) == 1, (tuple(qkv.shape), qkv.stride())
    assert three_d == 3 * D and D == num_heads * head_dim and N >= 1
    cfg = _attention_config(N, head_dim, qkv.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(N, block_m), B * num_heads)
    _attention_fwd_kernel[grid](
        qkv, out, lse, float(scale) * LOG2E,
        qkv.stride(0), qkv.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        N, num_heads, D,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=block_m, BLOCK_N=block_n,
        EVEN_N=(N % block_m == 0 and N % block_n == 0), INPUT_PRECISION=dot_precision(qkv.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                  scale: float) -> torch.Tensor:
    """Backward attention: d(qkv) from the output gradient and what the forward saved.

    Args:
        dout: (B, N, D) gradient of ``out``, qkv's dtype, column stride 1.
        qkv: (B, N, 3 * D) forward input. out: (B, N, D) forward output. lse: (B, H, N) fp32 from the forward.
        num_heads: H. scale: the forward's softmax scale.

    Returns:
        dqkv: (B, N, 3 * D), qkv's dtype, same packed layout as qkv (dq | dk | dv).
    """
    if qkv.shape[0] == 0:  # empty batch: nothing to launch
        return torch.empty_like(qkv, memory_format=torch.contiguous_format)
    assert qkv.dim() == 3 and qkv.stride(-1) == 1 and out.stride(-1) == 1 and dout.stride(-1) == 1
    B, N, three_d = qkv.shape
    D = three_d // 3
    head_dim = D // num_heads
    assert dout.shape == out.shape == (B, N, D) and dout.dtype == out.dtype == qkv.dtype
    assert lse.shape == (B, num_heads, N) and lse.dtype == torch.float32 and lse.stride(-1) == 1
    cfg = _attention_config(N, head_dim, qkv.dtype)
    block_m, block_n, block_d = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    even_n = N % block_m == 0 and N % block_n == 0
    precision = dot_precision(qkv.dtype)

    delta = torch.empty_like(lse)
    _attention_bwd_preprocess_kernel[(triton.cdiv(N, block_m), B * num_heads)](
        out, dout, delta,
        out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1),
        delta.stride(0), delta.stride(1),
        N, num_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, EVEN_N=N % block_m == 0,
    )
    assert delta.stride() == lse.stride()  # the bwd kernels share stride_lse_* between Lse and Delta

    # Every element of dqkv is written: dq by the dq kernel, dk and dv by the dkdv kernel (all heads, all rows).
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    qk_scale = float(scale) * LOG2E
    common = (
        qkv.stride(0), qkv.stride(1),
        dout.stride(0), dout.stride(1),
        lse.stride(0), lse.stride(1),
        dqkv.stride(0), dqkv.stride(1),
        N, num_heads, D,
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=even_n,
                INPUT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _attention_bwd_dkdv_kernel[(triton.cdiv(N, block_n), B * num_heads)](
        qkv, dout, lse, delta, dqkv, qk_scale, float(scale), *common, **meta)
    _attention_bwd_dq_kernel[(triton.cdiv(N, block_m), B * num_heads)](
        qkv, dout, lse, delta, dqkv, qk_scale, float(scale), *common, **meta)
    return dqkv
