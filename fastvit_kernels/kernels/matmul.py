"""The one GEMM core of the package: C[m, n] = epilogue(sum_k prologue_A(A)[m, k] * prologue_B(B)[k, n]).

Every Linear layer of a ViT block, the patch embedding and all their backward GEMMs are this core, each launch
described by one :class:`~fastvit_kernels.kernels.fusion.Gemm` (operands and their index map, A / B prologue,
epilogue steps; docs/design.md, "The GEMM core"). The description is read by the core's kernel forms:

* ``_matmul_kernel``: the pointer kernel for plain GEMMs (one stride per axis: every block GEMM and its backward);
  one program per output tile, tiles in the grouped order. It is also the body of ``_matmul_pair_kernel``, which
  runs two independent plain GEMMs in one launch (the tiles of problem 0, then those of problem 1: a grouped GEMM
  of two problems, for the backward's dgrad + wgrad GEMMs that read one gradient, :func:`gemm_pair`).
* ``_matmul_split_kernel``: the patch embedding's GEMMs. Each logical index (m, n or k) may be split into three
  levels, ``t -> (t // D1) * s1 + ((t % D1) // D2) * s2 + (t % D2) * s3``: with D1 = tokens per image this walks
  a (B, N, D) tensor whose rows are not evenly spaced (the patch rows of a (B, 1 + N, D) token tensor); with D1 =
  patches per image and D2 = patches per row it walks image pixels patch by patch (im2col without a copy). An
  operand may be converted on load (cast, or a per-channel affine then the cast: uint8 pixels ->
  ``(v / 255 - mean) / std``), and pixels outside an H x W image read as 0 (A, B) or are not written (C).
* ``_matmul_split_kernel`` also carries token selection (:class:`~.fusion.TokenGather`: rows of A / columns of A
  / rows of B gathered by index tensors, C's rows stored through a row map) and the mask-token / position-row
  epilogue steps, for :func:`fastvit_kernels.ops.patch_embed_tokens`;
* ``_matmul_rope_kernel``: GEMMs with 2D RoPE on their qkv axis (:class:`~.fusion.Rope`): the qkv GEMM rotating
  q / k in its epilogue, and its two backward GEMMs un-rotating d(qkv) as they load it;
* on Hopper, plain GEMMs run the same description on :mod:`fastvit_kernels.kernels.matmul_tma` (TMA descriptors,
  persistent grid, warpgroup MMA); ``FASTVIT_GEMM_KERNEL`` decides (:func:`fastvit_kernels.backend.gemm_kernel`);
* plain GEMMs may instead run as cuBLAS + fused elementwise kernels (:mod:`fastvit_kernels.kernels.gemm_impl`),
  by a per-shape rule that is never timed by default.

Prologues, epilogue steps and the tile order are the ``@triton.jit`` helpers of :mod:`.fusion`, shared by every
form. Tile candidates: :mod:`.gemm_configs`. Accumulation is fp32; fp32 operands use IEEE dots unless PyTorch's
fp32 matmul setting allows TF32, as cuBLAS (``_common.dot_precision``, read at each launch; ``DOT_PRECISION`` is
in the autotune key). Every launch is idempotent (C and the stored pre-activation are written, never read back;
no launch writes an operand it reads), so autotuning may rerun it without reset_to_zero / restore_value.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._env import gemm_kernel, gemm_pairs
from . import gemm_configs as cfgs
from . import matmul_tma, tuning_record
from ._common import dot_precision, triton_version
from ._launch import launch
from .fusion import (BOUNDS_A, BOUNDS_B, BOUNDS_C, BOUNDS_OF, PROLOGUE_AFFINE, PROLOGUE_CAST, PROLOGUE_GELU,
                     PROLOGUE_LN, PROLOGUE_SWIGLU, ROPE_A_COLS, ROPE_A_ROWS, ROPE_OUT, Epilogue, Gelu, Gemm, LayerNorm,
                     Operand, Rope, accumulate, apply_prologues, epilogue, gathered, pair_plan, token_epilogue, rope_coords, rope_freqs, rope_index,
                     rope_rotate_out, rope_unrotate, store_rowsum, swiglu_epilogue, swiglu_grad_epilogue,
                     swiglu_operand, tile_coords, tile_start)


@triton.jit
def _split_offsets(t, D1, D2, s1, s2, s3, SPLIT: tl.constexpr):
    """Memory offset (int64) of logical indices t (int32) along one axis; see the module docstring.

    The divisions run in int32 (indices and split sizes are < 2**31; int64 division / modulo compile to
    subroutine calls that keep registers live, which the AOT check saw as spills) and only the three level
    indices are widened before the stride products, so offsets of large tensors do not overflow. The launcher
    checks that D2 divides D1, so ``t % D2 == (t % D1) % D2`` comes from the second division's remainder."""
    if SPLIT:
        t = t.to(tl.int32)
        q1 = t // D1
        r1 = t - q1 * D1
        q2 = r1 // D2
        r2 = r1 - q2 * D2
        return q1.to(tl.int64) * s1 + q2.to(tl.int64) * s2 + r2.to(tl.int64) * s3
    else:
        return t.to(tl.int64) * s1


@triton.jit
def _image_mask(tok, pix, T_D1, T_D2, P_D1, P_D2, img_h, img_w):
    """(len(tok), len(pix)) mask: pixel ``pix`` of patch token ``tok`` lies inside the img_h x img_w image.
    Tokens split (image, patch row, patch col) by (T_D1, T_D2); pixels (channel, row, col) by (P_D1, P_D2 = P)."""
    h = ((tok % T_D1) // T_D2)[:, None] * P_D2 + ((pix % P_D1) // P_D2)[None, :]
    w = (tok % T_D2)[:, None] * P_D2 + (pix % P_D2)[None, :]
    return (h < img_h) & (w < img_w)


# the fusion constexprs of every form (fusion.Fusion.constexprs), then the dot precision; the autotuner adds the
# tensor arguments' dtypes itself
_FUSION_KEY = ["A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS", "DGELU", "ACT_GELU", "STORE_PREACT", "HAS_RESIDUAL",
               "GELU_TANH", "A_ROWSUM"]
_PLAIN_KEY = ["M_BUCKET", "N", "K", *_FUSION_KEY, "DOT_PRECISION"]
_TOKEN_KEY = ["GATHER_A_ROWS", "GATHER_A_COLS", "GATHER_B_ROWS", "MAP_C_ROWS", "MASK_TOKEN", "POS_ROWS"]
_SPLIT_KEY = [*_PLAIN_KEY, "SPLIT_M", "SPLIT_N", "SPLIT_K", "IMG_BOUNDS", "SWIGLU", "HAS_UP_BIAS", "DSWIGLU",
              *_TOKEN_KEY]
_ROPE_KEY = ["M_BUCKET", "N", "K", "A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS", "A_ROWSUM", "ROPE", "ROPE_HALF",
             "DOT_PRECISION"]
_PAIR_KEY = [f"{k}{i}" for i in (0, 1) for k in ("M_BUCKET", "N", "K", *_FUSION_KEY)] + ["DOT_PRECISION"]


def _candidates(dtype: torch.dtype, kw: dict, split: bool) -> list:
    return cfgs.gemm_configs(dtype, split, dgelu=bool(kw.get("DGELU")),
                             b_gelu=kw.get("B_PROLOGUE") == PROLOGUE_GELU.value,
                             glu=bool(kw.get("SWIGLU") or kw.get("DSWIGLU")
                                      or kw.get("B_PROLOGUE") == PROLOGUE_SWIGLU.value),
                             rope=int(getattr(kw.get("ROPE", 0), "value", kw.get("ROPE", 0)) or 0),
                             residual=bool(kw.get("HAS_RESIDUAL")) and (not kw.get("HAS_BIAS")
                                                                         or kw.get("A_PROLOGUE") == PROLOGUE_LN.value),
                             b_ln=kw.get("B_PROLOGUE") == PROLOGUE_LN.value,
                             gelu_no_bias=bool(kw.get("ACT_GELU")) and not kw.get("HAS_BIAS"))


def _prune_plain(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of ``_matmul_kernel``: the candidates of the operand dtype, in gemm_configs order."""
    return cfgs.pick(configs, _candidates(named_args["a_ptr"].dtype, kwargs, split=False))


def _prune_split(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of ``_matmul_split_kernel``: the candidates of the dot's dtype (B's when A is
    converted on load, else A's) and of whether an index is split; a token step (gather, row map, mask token,
    position rows) takes the split candidates too (gemm_configs.keep: the index loads cost registers as the split
    arithmetic does)."""
    a_converted = kwargs.get("A_PROLOGUE") in (PROLOGUE_CAST.value, PROLOGUE_AFFINE.value)
    dtype = named_args["b_ptr" if a_converted else "a_ptr"].dtype
    split = bool(kwargs.get("SPLIT_M") or kwargs.get("SPLIT_N") or kwargs.get("SPLIT_K"))
    return cfgs.pick(configs, _candidates(dtype, kwargs, split or any(kwargs.get(k) for k in _TOKEN_KEY)))


def _prune_pair(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of ``_matmul_pair_kernel``: :func:`gemm_configs.pair_configs` of the dtype."""
    return cfgs.pick(configs, cfgs.pair_configs(named_args["a0_ptr"].dtype))


# every dtype's / split's / flag's candidates: what the autotuners hold; the prunes pick one list per launch
# (combinations no launch makes are skipped: a residual epilogue joins none of GELU', GELU on B, SwiGLU or RoPE;
# GELU' never meets GELU on B (fc2's backward has them in two GEMMs), nor SwiGLU RoPE; fusion.Gemm refuses the rest)
_ALL_CONFIGS = cfgs.union(cfgs.gemm_configs(dt, sp, dgelu=dg, b_gelu=bg, glu=gl, rope=rp, residual=rs, b_ln=bl,
                                            gelu_no_bias=gn)
                          for dt in (torch.float32, torch.float16) for sp in (False, True) for dg in (False, True)
                          for bg in (False, True) for gl in (False, True) for rp in (0, 1, 2, 3)
                          for rs in (False, True) for bl in (False, True) for gn in (False, True)
                          if not (rs and (dg or bg or gl or rp)) and not (dg and bg) and not (bl and (bg or rs))
                          and not (gl and rp) and not (gn and (dg or gl or rp or rs)))


def _autotuned(name: str, key: list, prune):
    """``triton.autotune`` of one pointer kernel over :data:`_ALL_CONFIGS` (the tuning record, when one is active,
    picks the candidate untimed: kernels/tuning_record.py)."""
    return triton.autotune(configs=_ALL_CONFIGS, key=key, do_bench=tuning_record.bench, prune_configs_by={
        "early_config_prune": tuning_record.tuned_prune(f"matmul.{name}", key, prune)})


@triton.jit
def _matmul_kernel(
    tile0,  # the first program of this problem: tile = program_id - tile0 (0; the pair kernel's second: tiles0)
    a_ptr, b_ptr, c_ptr,  # A: logical (M, K); B: logical (K, N); C: logical (M, N)
    bias_ptr,  # (N,) epilogue bias
    res_ptr,  # logical (M, N) residual added last
    aux_ptr,  # (M, N) contiguous: GELU pre-activation, stored (STORE_PREACT) or read (DGELU)
    rowsum_ptr,  # (M,) A_ROWSUM output: sum over k of prologue(A)[m, k], accumulated in fp32
    mean_ptr, rstd_ptr,  # fp32 LayerNorm row statistics: (M,) for A's prologue, (K,) for B's
    gamma_ptr, beta_ptr,  # LayerNorm affine: (K,) for A's prologue, (N,) for B's
    M, N, K,
    M_BUCKET,  # next power of two >= M: autotune key only (one tuning per bucket, not per batch size)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
    A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr,  # fusion.PROLOGUE_NONE / _LN / _GELU
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr, A_ROWSUM: tl.constexpr,  # fusion.Fusion.constexprs
    DOT_PRECISION: tl.constexpr,  # _common.dot_precision: fp32 "ieee" or "tf32" (PyTorch's setting)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile of a plain GEMM per program (launched alone, and called twice by the pair kernel)."""
    pid_m, pid_n = tile_coords(tl.program_id(0) - tile0, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc, a_sum, p0, p1, p2, p3 = tile_start(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                                            1, A_PROLOGUE, B_PROLOGUE, BLOCK_M, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :]
        a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk, mask=b_mask, other=0.0)
        a, b = apply_prologues(a, b, a_mask, b_mask, offs_k, mask_k, 1, p0, p1, p2, p3, mean_ptr, rstd_ptr,
                               gamma_ptr, beta_ptr, A_PROLOGUE, B_PROLOGUE, GELU_TANH)
        acc, a_sum = accumulate(acc, a_sum, a, b, pid_n, A_ROWSUM, DOT_PRECISION)

    store_rowsum(rowsum_ptr, a_sum, offs_m, mask_m, pid_n, A_ROWSUM)
    mask = mask_m[:, None] & mask_n[None, :]
    acc = epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, ACT_GELU,
                   STORE_PREACT, GELU_TANH)
    m64 = offs_m.to(tl.int64)[:, None]
    n64 = offs_n.to(tl.int64)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + m64 * stride_rm + n64 * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + m64 * stride_cm + n64 * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


_matmul_autotuned = _autotuned("_matmul_kernel", _PLAIN_KEY, _prune_plain)(_matmul_kernel)


@_autotuned("_matmul_pair_kernel", _PAIR_KEY, _prune_pair)
@triton.jit
def _matmul_pair_kernel(
    # problem 0, then problem 1: the arguments of _matmul_kernel after tile0, suffixed 0 / 1 (runtime ones first)
    a0_ptr, b0_ptr, c0_ptr, bias0_ptr, res0_ptr, aux0_ptr, rowsum0_ptr, mean0_ptr, rstd0_ptr, gamma0_ptr, beta0_ptr,
    M0, N0, K0, M_BUCKET0, stride_a0m, stride_a0k, stride_b0k, stride_b0n, stride_c0m, stride_c0n, stride_r0m,
    stride_r0n,
    a1_ptr, b1_ptr, c1_ptr, bias1_ptr, res1_ptr, aux1_ptr, rowsum1_ptr, mean1_ptr, rstd1_ptr, gamma1_ptr, beta1_ptr,
    M1, N1, K1, M_BUCKET1, stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_c1m, stride_c1n, stride_r1m,
    stride_r1n,
    A_PROLOGUE0: tl.constexpr, B_PROLOGUE0: tl.constexpr, HAS_BIAS0: tl.constexpr, DGELU0: tl.constexpr,
    ACT_GELU0: tl.constexpr, STORE_PREACT0: tl.constexpr, HAS_RESIDUAL0: tl.constexpr, GELU_TANH0: tl.constexpr,
    A_ROWSUM0: tl.constexpr,
    A_PROLOGUE1: tl.constexpr, B_PROLOGUE1: tl.constexpr, HAS_BIAS1: tl.constexpr, DGELU1: tl.constexpr,
    ACT_GELU1: tl.constexpr, STORE_PREACT1: tl.constexpr, HAS_RESIDUAL1: tl.constexpr, GELU_TANH1: tl.constexpr,
    A_ROWSUM1: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # the first cdiv(M0, BLOCK_M) * cdiv(N0, BLOCK_N) programs compute problem 0's tiles, the rest problem 1's
    tiles0 = tl.cdiv(M0, BLOCK_M) * tl.cdiv(N0, BLOCK_N)
    if tl.program_id(0) < tiles0:
        _matmul_kernel(0, a0_ptr, b0_ptr, c0_ptr, bias0_ptr, res0_ptr, aux0_ptr, rowsum0_ptr, mean0_ptr, rstd0_ptr,
                       gamma0_ptr, beta0_ptr, M0, N0, K0, M_BUCKET0, stride_a0m, stride_a0k, stride_b0k, stride_b0n,
                       stride_c0m, stride_c0n, stride_r0m, stride_r0n, A_PROLOGUE0, B_PROLOGUE0, HAS_BIAS0, DGELU0,
                       ACT_GELU0, STORE_PREACT0, HAS_RESIDUAL0, GELU_TANH0, A_ROWSUM0, DOT_PRECISION, BLOCK_M,
                       BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _matmul_kernel(tiles0, a1_ptr, b1_ptr, c1_ptr, bias1_ptr, res1_ptr, aux1_ptr, rowsum1_ptr, mean1_ptr,
                       rstd1_ptr, gamma1_ptr, beta1_ptr, M1, N1, K1, M_BUCKET1, stride_a1m, stride_a1k, stride_b1k,
                       stride_b1n, stride_c1m, stride_c1n, stride_r1m, stride_r1n, A_PROLOGUE1, B_PROLOGUE1,
                       HAS_BIAS1, DGELU1, ACT_GELU1, STORE_PREACT1, HAS_RESIDUAL1, GELU_TANH1, A_ROWSUM1,
                       DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@_autotuned("_matmul_split_kernel", _SPLIT_KEY, _prune_split)
@triton.jit
def _matmul_split_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    b2_ptr,  # second B operand (K, N), B's strides: the up weights (SWIGLU) or up pre-activation (B's SwiGLU prologue)
    up_bias_ptr,  # (N,) up bias (HAS_UP_BIAS)
    a_rows_ptr, a_cols_ptr, b_rows_ptr, c_rows_ptr,  # fusion.TokenGather: (M,), (K,), (K,), (M,) int32 / int64
    tok_mask_ptr, mask_token_ptr,  # (M,) uint8 mask, (N,) mask token (MASK_TOKEN)
    pos_ptr, pos_index_ptr,  # (R, N) position rows (row stride stride_pos), (M,) int row index, -1 = none (POS_ROWS)
    M, N, K, M_BUCKET,  # as in _matmul_kernel; gamma / beta may be a channel affine's (scale, shift): (channels,)
    img_h, img_w,  # image height / width in pixels (IMG_BOUNDS)
    M_D1, M_D2, N_D1, N_D2, K_D1, K_D2,  # three-level index splits (used when SPLIT_* is set)
    stride_a_m1, stride_a_m2, stride_a_m3, stride_a_k1, stride_a_k2, stride_a_k3,
    stride_b_k1, stride_b_k2, stride_b_k3, stride_b_n1, stride_b_n2, stride_b_n3,
    stride_c_m1, stride_c_m2, stride_c_m3, stride_c_n1, stride_c_n2, stride_c_n3,
    stride_r_m1, stride_r_m2, stride_r_m3, stride_r_n1, stride_r_n2, stride_r_n3,
    stride_pos,
    A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr,  # any fusion.PROLOGUE_* (affine: channel k // K_D1 / n // N_D1)
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr, A_ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr, SPLIT_K: tl.constexpr,
    IMG_BOUNDS: tl.constexpr,  # fusion.BOUNDS_NONE / _A (m x k) / _B (k x n) / _C (m x n)
    SWIGLU: tl.constexpr, HAS_UP_BIAS: tl.constexpr, DSWIGLU: tl.constexpr,  # fusion.Fusion.glu_constexprs
    GATHER_A_ROWS: tl.constexpr, GATHER_A_COLS: tl.constexpr, GATHER_B_ROWS: tl.constexpr,  # token_constexprs
    MAP_C_ROWS: tl.constexpr, MASK_TOKEN: tl.constexpr, POS_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile per program of a GEMM with split indices, a converted operand or image bounds (the patch
    embedding), or a SwiGLU step; the steps of _matmul_kernel with the three-level addressing.

    SwiGLU (unsplit indices only; fusion.Gemm checks): with SWIGLU the B tile of the gate weights and the b2 tile
    of the up weights at the same (k, n) meet one A tile (loaded and normalised once) in two dots, into two fp32
    accumulators, so each gate column and its up column land in the same output tile and silu(gate) * up is
    formed in the epilogue (fusion.swiglu_epilogue); B's SwiGLU prologue forms silu(B) * B2 on load; with DSWIGLU
    the epilogue writes the two gradient tiles d gate (columns n) and d up (columns N + n) of C.

    Token selection (fusion.TokenGather, unsplit axes only): A's rows / columns and B's rows are read through index
    tensors and C's rows written through one (a negative index: a zero row, a row not written), and the epilogue
    substitutes the mask token and adds gathered position rows after the bias (fusion.token_epilogue)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_m, a_m_ok = gathered(a_rows_ptr, offs_m, mask_m, GATHER_A_ROWS)
    a_row = _split_offsets(a_m, M_D1, M_D2, stride_a_m1, stride_a_m2, stride_a_m3, SPLIT_M)
    b_col = _split_offsets(offs_n, N_D1, N_D2, stride_b_n1, stride_b_n2, stride_b_n3, SPLIT_N)
    acc, a_sum, p0, p1, p2, p3 = tile_start(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                                            N_D1, A_PROLOGUE, B_PROLOGUE, BLOCK_M, BLOCK_N)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up projection's accumulator
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_k, a_k_ok = gathered(a_cols_ptr, offs_k, mask_k, GATHER_A_COLS)
        b_k, b_k_ok = gathered(b_rows_ptr, offs_k, mask_k, GATHER_B_ROWS)
        a_col = _split_offsets(a_k, K_D1, K_D2, stride_a_k1, stride_a_k2, stride_a_k3, SPLIT_K)
        b_row = _split_offsets(b_k, K_D1, K_D2, stride_b_k1, stride_b_k2, stride_b_k3, SPLIT_K)
        a_mask = a_m_ok[:, None] & a_k_ok[None, :]
        if IMG_BOUNDS == BOUNDS_A:
            a_mask = a_mask & _image_mask(offs_m, offs_k, M_D1, M_D2, K_D1, K_D2, img_h, img_w)
        b_mask = b_k_ok[:, None] & mask_n[None, :]
        if IMG_BOUNDS == BOUNDS_B:
            b_mask = b_mask & _image_mask(offs_k, offs_n, K_D1, K_D2, N_D1, N_D2, img_h, img_w)
        a = tl.load(a_ptr + a_row[:, None] + a_col[None, :], mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_row[:, None] + b_col[None, :], mask=b_mask, other=0.0)
        if B_PROLOGUE == PROLOGUE_SWIGLU:
            b2 = tl.load(b2_ptr + b_row[:, None] + b_col[None, :], mask=b_mask, other=0.0)
            b = swiglu_operand(b, b2, a.dtype)
        a, b = apply_prologues(a, b, a_mask, b_mask, offs_k, mask_k, K_D1, p0, p1, p2, p3, mean_ptr, rstd_ptr,
                               gamma_ptr, beta_ptr, A_PROLOGUE, B_PROLOGUE, GELU_TANH)
        acc, a_sum = accumulate(acc, a_sum, a, b, pid_n, A_ROWSUM, DOT_PRECISION)
        if SWIGLU:
            b2 = tl.load(b2_ptr + b_row[:, None] + b_col[None, :], mask=b_mask, other=0.0)
            acc_up = tl.dot(a, b2, acc_up, input_precision=DOT_PRECISION)

    store_rowsum(rowsum_ptr, a_sum, offs_m, mask_m, pid_n, A_ROWSUM)
    mask = mask_m[:, None] & mask_n[None, :]
    if IMG_BOUNDS == BOUNDS_C:
        mask = mask & _image_mask(offs_m, offs_n, M_D1, M_D2, N_D1, N_D2, img_h, img_w)
    if SWIGLU:
        acc = swiglu_epilogue(acc, acc_up, offs_m, offs_n, mask, mask_n, N, bias_ptr, up_bias_ptr, aux_ptr,
                              HAS_BIAS, HAS_UP_BIAS, STORE_PREACT)
    else:
        acc = epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, ACT_GELU,
                       STORE_PREACT, GELU_TANH)
        acc = token_epilogue(acc, offs_m, mask_m, offs_n, mask_n, tok_mask_ptr, mask_token_ptr, pos_ptr,
                             pos_index_ptr, stride_pos, MASK_TOKEN, POS_ROWS)
    if HAS_RESIDUAL:
        r_row = _split_offsets(offs_m, M_D1, M_D2, stride_r_m1, stride_r_m2, stride_r_m3, SPLIT_M)
        r_col = _split_offsets(offs_n, N_D1, N_D2, stride_r_n1, stride_r_n2, stride_r_n3, SPLIT_N)
        acc += tl.load(res_ptr + r_row[:, None] + r_col[None, :], mask=mask, other=0.0).to(tl.float32)
    c_m, c_m_ok = gathered(c_rows_ptr, offs_m, mask_m, MAP_C_ROWS)
    if MAP_C_ROWS:
        mask = mask & c_m_ok[:, None]
    c_row = _split_offsets(c_m, M_D1, M_D2, stride_c_m1, stride_c_m2, stride_c_m3, SPLIT_M)
    c_col = _split_offsets(offs_n, N_D1, N_D2, stride_c_n1, stride_c_n2, stride_c_n3, SPLIT_N)
    if DSWIGLU:  # C is (M, 2N): d gate in columns [0, N), d up in [N, 2N)
        d_gate, d_up = swiglu_grad_epilogue(acc, offs_m, offs_n, mask, N, aux_ptr)
        c_up = _split_offsets(offs_n + N, N_D1, N_D2, stride_c_n1, stride_c_n2, stride_c_n3, SPLIT_N)
        tl.store(c_ptr + c_row[:, None] + c_col[None, :], d_gate.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + c_row[:, None] + c_up[None, :], d_up.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptr + c_row[:, None] + c_col[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@_autotuned("_matmul_rope_kernel", _ROPE_KEY, _prune_plain)
@triton.jit
def _matmul_rope_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,  # as in _matmul_kernel
    coords_ptr,  # (n_coords, 2) fp32 (y, x) per token
    freqs_ptr,  # (1 or H, HEAD_DIM / 2, 2) fp32
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    n_coords,  # rows of coords: token row t uses coords[t % n_coords]
    D, HEAD_DIM,  # D = H * HEAD_DIM: the qkv axis has 3 * D indices, q and k in [0, 2 * D)
    stride_freqs_h,  # 0 (one table for all heads) or HEAD_DIM
    A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr,  # fusion.PROLOGUE_NONE / _LN
    HAS_BIAS: tl.constexpr, A_ROWSUM: tl.constexpr,
    ROPE: tl.constexpr,  # fusion.ROPE_OUT / _A_COLS / _A_ROWS: which axis is the qkv axis (fusion.Rope.role)
    ROPE_HALF: tl.constexpr,  # rotate_half pair layout (else interleaved)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile per program of a GEMM with 2D RoPE on its qkv axis (fusion.Rope): the qkv axis is walked in
    pair order and addressed through ``rope_index``, so a pair's two members are neighbours (the epilogue rotates
    them with a reshape) or one load apart (the prologues load each value's partner too)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mem_m = offs_m
    mem_n = offs_n
    if ROPE == ROPE_A_ROWS:
        mem_m = rope_index(offs_m, D, HEAD_DIM, ROPE_HALF)
        a_partner = a_ptr + rope_index(offs_m ^ 1, D, HEAD_DIM, ROPE_HALF).to(tl.int64)[:, None] * stride_am
        fy, fx = rope_freqs(offs_m, mask_m, freqs_ptr, D, HEAD_DIM, stride_freqs_h)
    if ROPE == ROPE_OUT:
        mem_n = rope_index(offs_n, D, HEAD_DIM, ROPE_HALF)
    if ROPE == ROPE_A_COLS:
        y, x = rope_coords(offs_m, mask_m, coords_ptr, n_coords)
    a_rows = a_ptr + mem_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + mem_n.to(tl.int64)[None, :] * stride_bn
    acc, a_sum, p0, p1, p2, p3 = tile_start(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                                            1, A_PROLOGUE, B_PROLOGUE, BLOCK_M, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mem_k = offs_k
        if ROPE == ROPE_A_COLS:
            mem_k = rope_index(offs_k, D, HEAD_DIM, ROPE_HALF)
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :]
        a = tl.load(a_rows + mem_k.to(tl.int64)[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_cols + mem_k.to(tl.int64)[:, None] * stride_bk, mask=b_mask, other=0.0)
        if ROPE == ROPE_A_COLS:  # d(qkv) columns: each value's pair partner and the (token, pair) angle
            partner = rope_index(offs_k ^ 1, D, HEAD_DIM, ROPE_HALF)
            a_p = tl.load(a_rows + partner.to(tl.int64)[None, :] * stride_ak, mask=a_mask, other=0.0)
            kfy, kfx = rope_freqs(offs_k, mask_k, freqs_ptr, D, HEAD_DIM, stride_freqs_h)
            theta = y[:, None] * kfy[None, :] + x[:, None] * kfx[None, :]
            a = rope_unrotate(a, a_p, theta, (offs_k % 2 == 0)[None, :]).to(a.dtype)
        if ROPE == ROPE_A_ROWS:  # d(qkv)^T rows, tokens along k
            a_p = tl.load(a_partner + offs_k.to(tl.int64)[None, :] * stride_ak, mask=a_mask, other=0.0)
            ky, kx = rope_coords(offs_k, mask_k, coords_ptr, n_coords)
            theta = fy[:, None] * ky[None, :] + fx[:, None] * kx[None, :]
            a = rope_unrotate(a, a_p, theta, (offs_m % 2 == 0)[:, None]).to(a.dtype)
        a, b = apply_prologues(a, b, a_mask, b_mask, offs_k, mask_k, 1, p0, p1, p2, p3, mean_ptr, rstd_ptr,
                               gamma_ptr, beta_ptr, A_PROLOGUE, B_PROLOGUE, False)
        acc, a_sum = accumulate(acc, a_sum, a, b, pid_n, A_ROWSUM, DOT_PRECISION)

    store_rowsum(rowsum_ptr, a_sum, mem_m, mask_m, pid_n, A_ROWSUM)
    mask = mask_m[:, None] & mask_n[None, :]
    acc = epilogue(acc, offs_m, mem_n, mask, mask_n, N, bias_ptr, bias_ptr, HAS_BIAS, False, False, False, False)
    if ROPE == ROPE_OUT:
        acc = rope_rotate_out(acc, offs_m, mask_m, pid_n * BLOCK_N, coords_ptr, freqs_ptr, n_coords, D, HEAD_DIM,
                              stride_freqs_h, BLOCK_M, BLOCK_N)
    tl.store(c_ptr + mem_m.to(tl.int64)[:, None] * stride_cm + mem_n.to(tl.int64)[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# launchers: every one reads the launch's fusion.Gemm
# --------------------------------------------------------------------------------------------------------------
def _plain_args(g: Gemm) -> tuple:
    """The runtime arguments of ``_matmul_kernel`` after ``tile0`` (one problem of the pair kernel)."""
    r = g.epilogue.residual
    return (g.a.tensor, g.b.tensor, g.c.tensor, *g.pointers(), g.M, g.N, g.K, triton.next_power_of_2(g.M),
            g.a.rows, g.a.cols, g.b.rows, g.b.cols, g.c.rows, g.c.cols, r.rows if r else 0, r.cols if r else 0)


def _axis(strides: int | tuple, split: tuple | None) -> tuple:
    """(s1, s2, s3) for the split kernel from an Operand axis and the index's split (see ``Operand``)."""
    if isinstance(strides, tuple):
        if split is None:
            raise ValueError(f"an operand axis with stride triple {strides} needs a split index in Gemm.index")
        return strides
    if split is None:
        return (strides, 0, 0)
    return (split[0] * strides, split[1] * strides, strides)


def _split_args(g: Gemm) -> tuple:
    """The runtime arguments of ``_matmul_split_kernel``."""
    ix, ib = g.index, g.index.image_bounds

    def axes(op: Operand | None, row_split, col_split) -> tuple:
        return (0,) * 6 if op is None else (*_axis(op.rows, row_split), *_axis(op.cols, col_split))

    pos = g.epilogue.pos
    return (g.a.tensor, g.b.tensor, g.c.tensor, *g.pointers(), *g.glu_pointers(), *g.token_pointers(), g.M, g.N, g.K,
            triton.next_power_of_2(g.M), ib.height if ib else 0, ib.width if ib else 0,
            *(ix.m_split or (1, 1)), *(ix.n_split or (1, 1)), *(ix.k_split or (1, 1)),
            *axes(g.a, ix.m_split, ix.k_split), *axes(g.b, ix.k_split, ix.n_split),
            *axes(g.c, ix.m_split, ix.n_split), *axes(g.epilogue.residual, ix.m_split, ix.n_split),
            pos.stride(0) if pos is not None else 0)


def _fixed(kernel, candidates) -> tuple:
    """(kernel, launch keywords): the autotuner and no keywords, or the plain @triton.jit kernel with a fixed
    configuration (FASTVIT_AUTOTUNE=0, the interpreter) from ``candidates()`` (called only then: building the
    candidate list is not hot-path work when the autotuner picks)."""
    if cfgs.autotune_enabled():
        return kernel, {}
    return kernel.fn, cfgs.fixed_config(candidates())


def _tiles(M: int, N: int):
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    return grid


def _rope_args(g: Gemm) -> tuple:
    """The runtime arguments of ``_matmul_rope_kernel``."""
    r = g.rope
    bias, _, _, rowsum, mean, rstd, gamma, beta = g.pointers()
    return (g.a.tensor, g.b.tensor, g.c.tensor, bias, rowsum, mean, rstd, gamma, beta, r.coords, r.freqs,
            g.M, g.N, g.K, triton.next_power_of_2(g.M), g.a.rows, g.a.cols, g.b.rows, g.b.cols, g.c.rows, g.c.cols,
            r.coords.shape[0], r.dim, r.head_dim, 0 if r.freqs.shape[0] == 1 else r.head_dim)


def _launch_pointer(g: Gemm) -> None:
    f = g.fusion
    if f.rope:
        kernel, cfg = _fixed(_matmul_rope_kernel, lambda: _candidates(g.compute_dtype, {**f.constexprs(),
                                                                                         "ROPE": f.rope}, split=False))
        launch(kernel, _tiles(g.M, g.N), *_rope_args(g), A_PROLOGUE=f.a_prologue, B_PROLOGUE=f.b_prologue,
               HAS_BIAS=f.bias, A_ROWSUM=f.a_rowsum, ROPE=f.rope, ROPE_HALF=f.rope_half,
               DOT_PRECISION=dot_precision(g.compute_dtype), **cfg)
        return
    if f.plain:
        kernel, cfg = _fixed(_matmul_autotuned, lambda: _candidates(g.compute_dtype, f.constexprs(), split=False))
        launch(kernel, _tiles(g.M, g.N), 0, *_plain_args(g), **f.constexprs(),
               DOT_PRECISION=dot_precision(g.compute_dtype), **cfg)
        return
    ix = g.index
    kernel, cfg = _fixed(_matmul_split_kernel, lambda: _candidates(g.compute_dtype, {**f.constexprs(),
                                                                                     **f.glu_constexprs()},
                                                                   split=ix.split or f.tokens))
    launch(kernel, _tiles(g.M, g.N), *_split_args(g), **f.constexprs(), DOT_PRECISION=dot_precision(g.compute_dtype),
           SPLIT_M=ix.m_split is not None, SPLIT_N=ix.n_split is not None, SPLIT_K=ix.k_split is not None,
           IMG_BOUNDS=BOUNDS_OF[f.image_bounds], **f.glu_constexprs(), **f.token_constexprs(), **cfg)


def _launch_pointer_pair(g0: Gemm, g1: Gemm) -> None:
    kernel, cfg = _fixed(_matmul_pair_kernel, lambda: cfgs.pair_configs(g0.compute_dtype))
    flags = {f"{k}{i}": v for i, g in enumerate((g0, g1)) for k, v in g.fusion.constexprs().items()}

    def grid(meta):
        return (_tiles(g0.M, g0.N)(meta)[0] + _tiles(g1.M, g1.N)(meta)[0],)

    launch(kernel, grid, *_plain_args(g0), *_plain_args(g1), **flags, DOT_PRECISION=dot_precision(g0.compute_dtype),
           **cfg)


_TMA_CAPABLE: dict = {}  # device -> compute capability >= 9.0 (asked once per device)
_TMA_FAILED = False  # set when the TMA kernel failed to build under "auto": the pointer kernel serves from then on


def _tma_build_errors() -> tuple:
    """Exception types meaning "this Triton could not build / fit the TMA kernel" (not a wrong input)."""
    errors = []
    for mod, name in (("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "OutOfResources")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):  # pragma: no cover - other Triton layouts
            pass
    return tuple(errors) or (RuntimeError,)


_TMA_BUILD_ERRORS = _tma_build_errors()


def _tma_failed(err: Exception) -> None:
    """Under "auto", a TMA kernel that does not build on this GPU / Triton falls back to the pointer kernel for the
    rest of the process, visibly (a warning naming the error and the switch to force either form)."""
    global _TMA_FAILED
    import warnings

    _TMA_FAILED = True
    warnings.warn(f"fastvit_kernels: the TMA GEMM kernel failed to build ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); every GEMM now uses the pointer kernel. "
                  "FASTVIT_GEMM_KERNEL=pointer silences this; =tma raises instead.", RuntimeWarning, stacklevel=3)


def _use_tma(g: Gemm) -> bool:
    """Whether a GEMM runs on the TMA persistent kernel (see :func:`fastvit_kernels.backend.gemm_kernel`)."""
    setting = gemm_kernel()
    if setting == "pointer" or g.fusion.tma_refusal() is not None:
        return False
    if setting == "auto":
        device = g.c.tensor.device
        if device.type != "cuda" or cfgs.interpreter_enabled():
            return False
        if device not in _TMA_CAPABLE:
            _TMA_CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
        if not _TMA_CAPABLE[device]:
            return False
    r = g.epilogue.residual
    return (r is None or r.plain) and matmul_tma.tma_compatible(g.a, g.b, g.c, g.M, g.N, g.K)


def _try_tma(launch_tma) -> bool:
    """Run ``launch_tma``; under "auto" a build failure switches to the pointer kernel (returns False)."""
    try:
        launch_tma()
        return True
    except _TMA_BUILD_ERRORS as err:
        if gemm_kernel() == "tma":
            raise  # forced: no fallback
        _tma_failed(err)
        return False


def _tma_kw(g: Gemm) -> dict:
    """The keywords of :func:`matmul_tma.launch` / ``launch_pair`` besides the description."""
    autotune = cfgs.autotune_enabled()
    config = {} if autotune else cfgs.fixed_config(_candidates(g.compute_dtype, g.fusion.constexprs(), split=False))
    return dict(dot_precision=dot_precision(g.compute_dtype), autotune=autotune, config=config)


def _launch_triton(g: Gemm) -> None:
    if not _TMA_FAILED and _use_tma(g) and _try_tma(lambda: matmul_tma.launch(g, **_tma_kw(g))):
        return
    _launch_pointer(g)


def route(g: Gemm) -> tuple[str, str]:
    """(path, why) of a launch: "cublas", "tma" or "pointer", and the reason. A launch the cuBLAS path can run
    (:attr:`fusion.Fusion.cublas_form`) goes where :mod:`gemm_impl`'s rule says; on the Triton path, a fusion the TMA
    form cannot run (:meth:`fusion.Fusion.tma_refusal`: a row gather / row map, a split index, ...) goes to the
    pointer kernels, and so does a plain one :func:`_use_tma` turns down (setting, device, alignment)."""
    if _route(g) == "cublas":
        return "cublas", "gemm_impl's per-shape rule"
    refusal = g.fusion.tma_refusal()
    if refusal is not None:
        return "pointer", refusal
    if not _TMA_FAILED and _use_tma(g):
        return "tma", "plain GEMM on a TMA-capable GPU"
    return "pointer", "FASTVIT_GEMM_KERNEL, the device or the operand alignment"


def _route(g: Gemm) -> str:
    """"triton" or "cublas" for a launch the cuBLAS path can run, by the shape-aware rule of :mod:`gemm_impl`;
    "triton" otherwise."""
    if not g.fusion.cublas_form:
        return "triton"
    from . import gemm_impl

    return gemm_impl.choose_for_launch(g.c.tensor.device, g.compute_dtype, g.M, g.N, g.K, g.fusion,
                                       lambda: _launch_triton(g), lambda: gemm_impl.cublas_gemm(g))


def gemm(g: Gemm) -> torch.Tensor:
    """Launch ``C = epilogue(prologue(A) @ prologue(B))`` as described by ``g``; returns ``g.c.tensor``.

    A plain GEMM (no split index, conversion or image bounds) runs on this core's pointer or TMA kernel or as
    cuBLAS + fused elementwise kernels, as :func:`fastvit_kernels.kernels.gemm_impl.choose` decides for its (GPU,
    dtype, shape, fusion); the others run on ``_matmul_split_kernel`` (a GEMM with token steps, a row gather or
    row map, may also take the cuBLAS path; never the TMA kernel: :func:`route` says where a launch goes and
    why). ``g`` was validated when built
    (:class:`~fastvit_kernels.kernels.fusion.Gemm` raises ValueError for combinations the core cannot run).
    """
    if not g.empty:
        if _route(g) == "cublas":
            from . import gemm_impl

            gemm_impl.cublas_gemm(g)
        else:
            _launch_triton(g)
    return g.c.tensor


def pair_reason(g0: Gemm, g1: Gemm) -> str | None:
    """None when :func:`gemm_pair` runs ``g0`` and ``g1`` as one launch, else why it runs them one by one: the
    run-time conditions (pairing switched off, an empty problem, different dtypes, either routed to cuBLAS, the two
    on different kernel forms), then :func:`fusion.pair_plan` for the kernel form they share."""
    if gemm_pairs() == "off":
        return "FASTVIT_GEMM_PAIRS=off"
    if g0.empty or g1.empty:
        return "an empty problem"
    if g0.compute_dtype != g1.compute_dtype or g0.a.tensor.dtype != g1.a.tensor.dtype:
        return "different operand dtypes"
    if any(isinstance(g.b_prologue, LayerNorm) for g in (g0, g1)) and \
            any(s % 16 for g in (g0, g1) for op in (g.a, g.b, g.c) for s in (op.rows, op.cols) if s != 1):
        # LayerNorm on B's load with a feature width that is not a multiple of 16, such as a SwiGLU hidden width
        # (ViT-H-sized: 3413; EVA-02-L: 2730): the pointer pair of fc2's backward with its hidden LayerNorm on load
        # left 64-248 B per thread on the stack on sm_80 (AOT check, Triton 3.4 and 3.9)
        return "LayerNorm on B's load with an operand row stride that is not a multiple of 16 elements (spilled)"
    if not (g0.fusion.plain and g1.fusion.plain) or _route(g0) == "cublas" or _route(g1) == "cublas":
        return pair_plan(g0.fusion, g1.fusion, form="pointer", dtype=g0.compute_dtype,
                         triton_version=triton_version()) or "a GEMM routed to cuBLAS"
    tma = not _TMA_FAILED and _use_tma(g0)
    if tma != (not _TMA_FAILED and _use_tma(g1)):
        return "the two GEMMs run on different kernel forms (TMA / pointer)"
    return pair_plan(g0.fusion, g1.fusion, form="tma" if tma else "pointer", dtype=g0.compute_dtype,
                     triton_version=triton_version())


def gemm_pair(g0: Gemm, g1: Gemm) -> None:
    """Two independent GEMMs in ONE launch where they can share one (:func:`pair_reason`: both plain with only
    backward fusions, the same dtype and GELU form, both on the Triton path and on the same kernel form, and
    :func:`fusion.pair_plan` for that form), else two :func:`gemm` launches (also with
    ``FASTVIT_GEMM_PAIRS=off``). The launch runs problem 0's tiles then problem 1's (a grouped GEMM of two
    problems, as CUTLASS's grouped GEMMs; one tile configuration, autotuned for the pair).

    Results are identical either way (same tiles, same k order) when the configuration is the same (always on the
    interpreter; autotuning may pick a different tile for the pair than for either alone), except where the TMA
    form balances its schedule by splitting the long (weight-grad) problem into k-slices
    (:func:`matmul_tma.pair_schedule`, a pure function of the shapes, the SM count and the tile): that problem's
    k sum is then grouped by slice, equal to the one-by-one result within rounding, and still bit-identical from
    run to run (partials summed in a fixed order).

    The two must not depend on each other (neither reads what the other writes). Used for the backward's dgrad +
    wgrad pairs that read the same gradient: (dW2, dH), (dW1, d LayerNorm), proj (dx, dW), qkv (dW, d LayerNorm).
    Whether one launch of both beats two is a GPU measurement (``FASTVIT_GEMM_PAIRS=off`` gives the comparison).
    """
    if pair_reason(g0, g1) is not None:
        gemm(g0)
        gemm(g1)
        return
    if not _TMA_FAILED and _use_tma(g0) and _try_tma(lambda: matmul_tma.launch_pair(g0, g1, **_tma_kw(g0))):
        return
    if pair_plan(g0.fusion, g1.fusion, form="pointer", dtype=g0.compute_dtype, triton_version=triton_version()):
        gemm(g0)  # the TMA kernel failed to build under "auto" and the pointer form does not pair these
        gemm(g1)
        return
    _launch_pointer_pair(g0, g1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, ln: LayerNorm | None = None,
           gelu: bool = False, store_preact: torch.Tensor | None = None, residual: Operand | None = None,
           gelu_approximate: str = "none", rope: Rope | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x (M, K), weight (N, K) -> (M, N) in x's dtype, with optional fusions: ``ln``
    (LayerNorm prologue on x), ``gelu`` (GELU epilogue, storing the pre-activation to ``store_preact`` when given),
    ``residual`` (added last), ``gelu_approximate`` ("none" | "tanh"), ``rope`` (2D RoPE of the output's q / k
    columns after the bias, N = 3 * D; its role is set to "out"), as :class:`fusion.Gemm` describes them."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return gemm(Gemm(Operand.matrix(x), Operand.matrix_t(weight), Operand.matrix(out), M, N, K, a_prologue=ln,
                     epilogue=Epilogue(bias=bias, gelu=gelu, store_preact=store_preact, residual=residual),
                     gelu_approximate=gelu_approximate, rope=_with_role(rope, "out")))


def _with_role(rope: Rope | None, role: str) -> Rope | None:
    return None if rope is None else dataclasses.replace(rope, role=role)


def linear_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor,
                    db: torch.Tensor | None = None, *, x_prologue: LayerNorm | Gelu | None = None,
                    dx_gelu_grad_of: torch.Tensor | None = None, gelu_approximate: str = "none",
                    rope: Rope | None = None) -> None:
    """The two GEMMs of a Linear layer's backward that read its output gradient, as one :func:`gemm_pair`: the
    weight gradient ``dw = dout^T @ x_prologue(x)`` (N, K) with ``db = sum_m dout[m, :]`` from its A tiles
    (``db``: (N,) or None), first (its tiles run the long K = M loop: handed out first, the short ones fill the
    tail), and the input gradient ``dx = dout @ weight`` (M, K), multiplied by GELU'(``dx_gelu_grad_of``) when
    given (the layer before was a GELU). dout (M, N), x (M, K), weight (N, K); outputs are written.

    ``rope``: the forward rotated the output's q / k columns (:func:`linear` with ``rope``): both GEMMs apply the
    inverse rotation to dout's columns as they load it (roles "a_rows" and "a_cols"), so the gradient of the
    pre-rotation output is never stored; they then run as two launches (the pair kernels do not carry RoPE)."""
    M, N = dout.shape
    K = weight.shape[1]
    gemm_pair(Gemm(Operand.matrix_t(dout), Operand.matrix(x), Operand.matrix(dw), N, K, M, b_prologue=x_prologue,
                   epilogue=Epilogue(a_rowsum=db), gelu_approximate=gelu_approximate,
                   rope=_with_role(rope, "a_rows")),
              Gemm(Operand.matrix(dout), Operand.matrix(weight), Operand.matrix(dx), M, K, N,
                   epilogue=Epilogue(gelu_grad_of=dx_gelu_grad_of), gelu_approximate=gelu_approximate,
                   rope=_with_role(rope, "a_cols")))


def swiglu_linear(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                  gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None, *,
                  ln: LayerNorm | None = None, store_preact: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x @ gate_weight.T + gate_bias) * (x @ up_weight.T + up_bias)`` for x (M, K), gate / up weights
    (N, K) (the same strides; two views of one packed (2N, K) weight or two tensors) -> (M, N) in x's dtype, in
    ONE launch: both projections read each A tile once (two accumulators), ``ln`` (LayerNorm / RMSNorm prologue on
    x) applied on load, and the (gate | up) pre-activation stored to ``store_preact`` ((M, 2N) contiguous) when
    given (:attr:`fusion.Epilogue.swiglu`)."""
    M, K = x.shape
    N = gate_weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return gemm(Gemm(Operand.matrix(x), Operand.matrix_t(gate_weight), Operand.matrix(out), M, N, K, a_prologue=ln,
                     b2=Operand.matrix_t(up_weight),
                     epilogue=Epilogue(bias=gate_bias, up_bias=up_bias, swiglu=True, store_preact=store_preact)))
