"""The one GEMM core of the package: C[m, n] = epilogue(sum_k prologue_A(A)[m, k] * prologue_B(B)[k, n]).

Every Linear layer of a ViT block, the patch embedding and all their backward GEMMs are this kernel with
different constexpr flags (docs/design.md, "The GEMM core"):

* operand addressing: each logical index (m, n or k) may be split into three levels,
  ``t -> (t // D1) * s1 + ((t % D1) // D2) * s2 + (t % D2) * s3``. With D1 = tokens per image this walks a
  (B, N, D) tensor whose rows are not evenly spaced (e.g. the patch rows of a (B, 1 + N, D) token tensor); with
  D1 = patches per image and D2 = patches per row it walks image pixels patch by patch, which is how the patch
  embedding gathers its A operand straight from an NCHW image (im2col without a copy). Unsplit axes compile to
  ``t * s1``.
* A / B prologues: LayerNorm ``(v - mean) * rstd * gamma + beta`` from precomputed fp32 row statistics (the
  normalised activations never reach device memory), or exact GELU (recomputing an activation from its saved
  pre-activation), or a dtype conversion to the other operand's dtype (cast on load: e.g. fp32 or uint8 images
  against fp16 weights), or a per-channel affine ``v * scale[c] + shift[c]`` in fp32 then that conversion, with
  channel ``c = feature // D1`` of the operand's split feature index (uint8 pixels -> ``(v / 255 - mean) / std``).
* image bounds: on the operand (A, B or C) whose rows are patch tokens split (image, patch row, patch col) and
  whose columns are pixels split (channel, pixel row, pixel col), pixels outside an H x W image read as 0 after
  the prologue (A, B) or are not written (C): zero padding on the right / bottom without a padded copy.
* epilogue: + bias[n]; * GELU'(aux[m, n]) (backward of GELU); GELU, optionally storing the pre-activation to aux;
  + residual[m, n] (the residual / position-embedding add; the residual may broadcast over the batch).
  Every GELU of a launch (prologue, epilogue, GELU') is the exact erf form or, with GELU_TANH, the tanh
  approximation (PyTorch's ``approximate='tanh'``).
* A row sums: with A_ROWSUM the programs of the first column tile also sum their A tiles over k (fp32, fixed
  order) and write ``sum_k A[m, k]``: a weight-grad GEMM ``dW = dY^T @ X`` yields the bias gradient from the dY
  tiles it already loads (no extra pass over device memory, no partials, no atomics).

* pairs: ``_matmul_pair_kernel`` runs two independent plain GEMMs in one launch (the tiles of problem 0, then those
  of problem 1, each through the same tile body), for the backward's dgrad + wgrad GEMMs that read one gradient
  (:func:`gemm_pair`).

On Hopper, plain GEMMs (every block GEMM; not the patch embedding's split / converting ones) run the same flags in
:mod:`fastvit_kernels.kernels.matmul_tma` (TMA descriptors, persistent grid, warpgroup MMA; ``backend.gemm_kernel``
decides). Tiles follow Triton's matmul tutorial (grouped tile order for L2 reuse). Tile configurations: the
candidates of ``gemm_configs`` (pruned by ``keep``) are autotuned with ``triton.autotune`` on a GPU, keyed on the M
bucket, N, K, the operand dtypes and every constexpr flag; ``FASTVIT_AUTOTUNE=0`` launches the first candidate
instead, and the interpreter always runs one fixed configuration (``INTERPRETER_CONFIG``: few, large tiles = few
Python steps). Every candidate is compiled for sm_80 / sm_90 by ``python -m fastvit_kernels.aot check`` (no spills).
Which candidate wins is a GPU measurement; none has been made yet (2026-11: no GPU available to this work).
Accumulation is fp32; fp32 operands use IEEE dots unless PyTorch's fp32 matmul setting allows TF32, as cuBLAS
(``_common.dot_precision``, read at each launch; ``DOT_PRECISION`` is in the autotune key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_gelu_approximate
from . import _launch, tuning_record
from ._common import (NEWER_TRITON, TRITON_3_6, bias_gelu_epilogue, dot_precision, gelu, interpreting, ln_cols, ln_rows,
                      triton_version)

PROLOGUE_NONE, PROLOGUE_LN, PROLOGUE_GELU, PROLOGUE_CAST, PROLOGUE_AFFINE = 0, 1, 2, 3, 4
IMAGE_BOUNDS_OPERAND = {None: 0, "a": 1, "b": 2, "c": 3}


@triton.jit
def _split_offsets(t, D1, D2, s1, s2, s3, SPLIT: tl.constexpr):
    """Memory offset (int64) of logical indices t (int32) along one axis; see the module docstring.

    The divisions run in int32 (indices and split sizes are < 2**31; int64 division / modulo compile to
    subroutine calls that keep registers live, which the AOT check saw as spills) and only the three level
    indices are widened before the stride products, so offsets of large tensors do not overflow. The launcher
    asserts D2 divides D1, so ``t % D2 == (t % D1) % D2`` comes from the second division's remainder."""
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


# ----------------------------------------------------------------------------------------------------------------
# tile configurations (autotune candidates)
# ----------------------------------------------------------------------------------------------------------------
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)


def keep(cfg: triton.Config, dtype: torch.dtype, split: bool, dgelu: bool = False, b_gelu: bool = False) -> bool:
    """Whether candidate ``cfg`` stays in the autotune set for operands of ``dtype`` (``split``: an index is
    split, the patch-embed GEMMs; ``dgelu``: the GELU' epilogue; ``b_gelu``: GELU on B's load, fc2's weight
    gradient). Each prune below says what found the problem.

    * fp32 (IEEE dots on the FMA units, operand tiles in registers): 4 warps spilled 300-2600 B per thread with a
      B-operand prologue (LayerNorm / GELU) or a split index (AOT check, sm_80 / sm_90, Triton 3.9).
    * split indices: the earlier 128 x 64 / BLOCK_K 16 special cases were needed while ``_split_offsets`` divided
      in int64 (subroutine calls, 24-1400 B spills); with int32 divisions the normal tiles build without spills
      (AOT check, Triton 3.9). A deeper K step still does not fit: 128 x 128 x 64 with 8 warps spilled 24-264 B
      per thread in the patch-embed forward (split m / k + bias + residual, 255 registers) on sm_80 and sm_90.
    * Triton before ``NEWER_TRITON`` (AOT check, Triton 3.6, ViT-B/16 + ViT-H/14 bf16, sm_80 / sm_90): with a split
      index both 16-bit tiles of the newer list spilled 8-640 B per thread (patch 14 worst), while 128 x 64 x 32
      with 8 warps and 64 x 64 x 32 with 4 warps (3 stages) built clean: those are the split list there (see
      :func:`gemm_configs`); the GELU' epilogue spilled 8 B with 128 x 128 x 32 on sm_80.
    * Triton before ``TRITON_3_6`` (AOT check, Triton 3.4, same workload): GELU on B's load with A's row sums
      spilled 8 B with 128 x 64 x 32 / 4 warps on sm_80.
    """
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    if dtype == torch.float32 and cfg.num_warps < 8:
        return False
    if split and bk >= 64 and bm * bn >= 128 * 128:
        return False
    if triton_version() < NEWER_TRITON and dtype != torch.float32:
        if split and (bm, bn, bk, cfg.num_warps) in ((128, 128, 32, 8), (128, 64, 32, 4)):
            return False
        if dgelu and (bm, bn, bk) == (128, 128, 32):
            return False
        if b_gelu and cfg.num_warps < 8 and triton_version() < TRITON_3_6:
            return False
    return True


def gemm_configs(dtype: torch.dtype, split: bool = False, arch: int | None = None,
                 dgelu: bool = False, b_gelu: bool = False) -> list[triton.Config]:
    """Autotune candidates for the GEMM core, the default candidate first: ``triton.Config`` with BLOCK_M / BLOCK_N /
    BLOCK_K / GROUP_M, num_warps, num_stages. ``dtype``: the dot's operand dtype (fp16 and bf16 share a list);
    ``split``: an index is split; ``dgelu``, ``b_gelu``: as in :func:`keep`; ``arch``: compute capability (80,
    90, ...) — the lists are the same for sm_80 and sm_90 today (the AOT check builds every candidate for both; the
    recorder that traces the launches has no device to ask), the argument is there for a target-specific list when
    measurements call for one.

    fp32 (IEEE dots, the FMA units): one 64 x 64 x 32 tile with 8 warps; 2 stages, but 1 stage where an index is
    split: the patch-embed fp32 launches left 8-16 B on the stack with 2 stages (AOT check, sm_80 / sm_90, Triton
    3.9), none with 1.

    The 16-bit list starts from Triton's matmul tutorial (03) tiles: 128 x 128 x 32 with 8 warps and 3 stages
    (the tile v1 shipped), a deeper K step, and a narrower N tile with 4 warps for launches with few tiles. Triton
    before ``NEWER_TRITON`` adds two smaller tiles for split indices, the only ones that build clean there (see
    :func:`keep`).
    """
    del arch  # same candidates on every target (see docstring)
    if dtype == torch.float32:
        cands = [(64, 64, 32, 8, 1)] if split else [(64, 64, 32, 8, 2)]
    else:
        cands = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4)]
        if split and triton_version() < NEWER_TRITON:
            cands += [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)]
    out = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in cands]
    out = [c for c in out if keep(c, dtype, split, dgelu, b_gelu)]
    assert out, f"no GEMM configuration survives keep() for {dtype}, split={split}, dgelu={dgelu}, " \
                f"b_gelu={b_gelu}"
    return out


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, split: bool = False, dgelu: bool = False,
                b_gelu: bool = False) -> dict:
    """The configuration one launch uses without autotuning, as launch keywords: ``INTERPRETER_CONFIG`` under the
    interpreter, else the first surviving candidate of :func:`gemm_configs`. M, N, K: the problem size (unused
    today; kept for shape-dependent defaults)."""
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    c = gemm_configs(dtype, split, dgelu=dgelu, b_gelu=b_gelu)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _config_id(c: triton.Config) -> tuple:
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


# the union of every dtype's / split's candidates: what the autotuner holds; _prune_configs picks one list per launch
_ALL_CONFIGS = list({_config_id(c): c for dt in (torch.float32, torch.float16) for sp in (False, True)
                     for dg in (False, True) for bg in (False, True)
                     for c in gemm_configs(dt, sp, dgelu=dg, b_gelu=bg)}.values())


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the autotuner: the candidates of this launch's dot dtype and split, in
    :func:`gemm_configs` order (the dot dtype is B's when A is converted on load, else A's)."""
    a_converted = kwargs.get("A_PROLOGUE") in (PROLOGUE_CAST, PROLOGUE_AFFINE)
    dtype = named_args["b_ptr" if a_converted else "a_ptr"].dtype
    split = bool(kwargs.get("SPLIT_M") or kwargs.get("SPLIT_N") or kwargs.get("SPLIT_K"))
    by_id = {_config_id(c): c for c in configs}
    cands = gemm_configs(dtype, split, dgelu=bool(kwargs.get("DGELU")),
                         b_gelu=kwargs.get("B_PROLOGUE") == PROLOGUE_GELU)
    return [by_id[_config_id(c)] for c in cands if _config_id(c) in by_id]


def _autotune_enabled() -> bool:
    """Autotune on a GPU unless FASTVIT_AUTOTUNE=0 (then the first candidate runs); never under the interpreter."""
    return not interpreting() and os.environ.get("FASTVIT_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


# every constexpr flag of the kernel and the shape; the autotuner adds the tensor arguments' dtypes itself
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "SPLIT_M", "SPLIT_N", "SPLIT_K", "A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS",
                 "DGELU", "ACT_GELU", "STORE_PREACT", "HAS_RESIDUAL", "GELU_TANH", "A_ROWSUM", "IMG_BOUNDS",
                 "DOT_PRECISION"]


@triton.jit
def _gemm_tile(
    pid,  # this program's linear tile index (grouped order below)
    a_ptr, b_ptr, c_ptr,  # A: logical (M, K); B: logical (K, N); C: logical (M, N)
    bias_ptr,  # (N,) epilogue bias
    res_ptr,  # logical (M, N) residual added last (may have batch stride 0, e.g. pos_embed)
    aux_ptr,  # (M, N) contiguous: GELU pre-activation, stored (STORE_PREACT) or read (DGELU)
    rowsum_ptr,  # (M,) A_ROWSUM output: sum over k of prologue(A)[m, k], accumulated in fp32
    mean_ptr, rstd_ptr,  # fp32 LayerNorm row statistics: (M,) for the A prologue, (K,) for the B prologue
    gamma_ptr, beta_ptr,  # LayerNorm affine: (K,) for the A prologue, (N,) for the B prologue;
    #                       channel affine (scale, shift): (channels,) fp32
    M, N, K,  # logical problem size
    M_BUCKET,  # next power of two >= M: autotune key only (one tuning per bucket, not per batch size)
    img_h, img_w,  # image height / width in pixels (IMG_BOUNDS)
    M_D1, M_D2, N_D1, N_D2, K_D1, K_D2,  # three-level index splits (used when SPLIT_* is set)
    stride_a_m1, stride_a_m2, stride_a_m3, stride_a_k1, stride_a_k2, stride_a_k3,
    stride_b_k1, stride_b_k2, stride_b_k3, stride_b_n1, stride_b_n2, stride_b_n3,
    stride_c_m1, stride_c_m2, stride_c_m3, stride_c_n1, stride_c_n2, stride_c_n3,
    stride_r_m1, stride_r_m2, stride_r_m3, stride_r_n1, stride_r_n2, stride_r_n3,
    SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr, SPLIT_K: tl.constexpr,
    A_PROLOGUE: tl.constexpr,  # 0 none, 1 LayerNorm (stats by m, affine by k), 2 GELU, 3 cast, 4 channel affine (k)
    B_PROLOGUE: tl.constexpr,  # 0 none, 1 LayerNorm (stats by k, affine by n), 2 GELU, 3 cast, 4 channel affine (n)
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GELU_TANH: tl.constexpr,  # every GELU of this launch (prologue, epilogue, GELU') is the tanh approximation
    A_ROWSUM: tl.constexpr,  # the pid_n == 0 programs also write the row sums of A (a bias gradient, for free)
    IMG_BOUNDS: tl.constexpr,  # 0 none; image-bounds mask on 1 A (m x k), 2 B (k x n), 3 C (m x n)
    DOT_PRECISION: tl.constexpr,  # _common.dot_precision: fp32 "ieee" or "tf32" (PyTorch's setting)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of C: the whole body of ``_matmul_kernel`` (arguments as there), shared with
    ``_matmul_pair_kernel``."""
    # grouped ordering: GROUP_M row-tiles share their B column-tiles in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_row = _split_offsets(offs_m, M_D1, M_D2, stride_a_m1, stride_a_m2, stride_a_m3, SPLIT_M)
    b_col = _split_offsets(offs_n, N_D1, N_D2, stride_b_n1, stride_b_n2, stride_b_n3, SPLIT_N)
    if A_PROLOGUE == 1:
        a_mean = tl.load(mean_ptr + offs_m, mask=mask_m, other=0.0)
        a_rstd = tl.load(rstd_ptr + offs_m, mask=mask_m, other=0.0)
    if B_PROLOGUE == 1:
        b_gamma = tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        b_beta = tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    elif B_PROLOGUE == 4:
        b_scale = tl.load(gamma_ptr + offs_n // N_D1, mask=mask_n, other=0.0).to(tl.float32)
        b_shift = tl.load(beta_ptr + offs_n // N_D1, mask=mask_n, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_col = _split_offsets(offs_k, K_D1, K_D2, stride_a_k1, stride_a_k2, stride_a_k3, SPLIT_K)
        b_row = _split_offsets(offs_k, K_D1, K_D2, stride_b_k1, stride_b_k2, stride_b_k3, SPLIT_K)
        a_mask = mask_m[:, None] & mask_k[None, :]
        if IMG_BOUNDS == 1:
            a_mask = a_mask & _image_mask(offs_m, offs_k, M_D1, M_D2, K_D1, K_D2, img_h, img_w)
        b_mask = mask_k[:, None] & mask_n[None, :]
        if IMG_BOUNDS == 2:
            b_mask = b_mask & _image_mask(offs_k, offs_n, K_D1, K_D2, N_D1, N_D2, img_h, img_w)
        a = tl.load(a_ptr + a_row[:, None] + a_col[None, :], mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_row[:, None] + b_col[None, :], mask=b_mask, other=0.0)
        if A_PROLOGUE == 1:
            a = ln_rows(a, a_mean, a_rstd, gamma_ptr, beta_ptr, offs_k, mask_k, b.dtype)
        elif A_PROLOGUE == 2:
            a = gelu(a.to(tl.float32), GELU_TANH).to(b.dtype)
        elif A_PROLOGUE == 3:
            a = a.to(b.dtype)
        elif A_PROLOGUE == 4:
            a_scale = tl.load(gamma_ptr + offs_k // K_D1, mask=mask_k, other=0.0).to(tl.float32)
            a_shift = tl.load(beta_ptr + offs_k // K_D1, mask=mask_k, other=0.0).to(tl.float32)
            af = a.to(tl.float32) * a_scale[None, :] + a_shift[None, :]
            a = tl.where(a_mask, af, 0.0).to(b.dtype)  # padding (masked pixels) is 0 after normalisation
        if B_PROLOGUE == 1:
            b = ln_cols(b, mean_ptr, rstd_ptr, b_gamma, b_beta, offs_k, mask_k, a.dtype)
        elif B_PROLOGUE == 2:
            b = gelu(b.to(tl.float32), GELU_TANH).to(a.dtype)
        elif B_PROLOGUE == 3:
            b = b.to(a.dtype)
        elif B_PROLOGUE == 4:
            bf = b.to(tl.float32) * b_scale[None, :] + b_shift[None, :]
            b = tl.where(b_mask, bf, 0.0).to(a.dtype)
        if A_ROWSUM:
            if pid_n == 0:  # one program per row tile sums its A rows over the whole K loop: no partials
                a_sum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- epilogue ----
    if A_ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, a_sum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)
    mask = mask_m[:, None] & mask_n[None, :]
    if IMG_BOUNDS == 3:
        mask = mask & _image_mask(offs_m, offs_n, M_D1, M_D2, N_D1, N_D2, img_h, img_w)
    acc = bias_gelu_epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, ACT_GELU,
                             STORE_PREACT, GELU_TANH)
    if HAS_RESIDUAL:
        r_row = _split_offsets(offs_m, M_D1, M_D2, stride_r_m1, stride_r_m2, stride_r_m3, SPLIT_M)
        r_col = _split_offsets(offs_n, N_D1, N_D2, stride_r_n1, stride_r_n2, stride_r_n3, SPLIT_N)
        acc += tl.load(res_ptr + r_row[:, None] + r_col[None, :], mask=mask, other=0.0).to(tl.float32)
    c_row = _split_offsets(offs_m, M_D1, M_D2, stride_c_m1, stride_c_m2, stride_c_m3, SPLIT_M)
    c_col = _split_offsets(offs_n, N_D1, N_D2, stride_c_n1, stride_c_n2, stride_c_n3, SPLIT_N)
    tl.store(c_ptr + c_row[:, None] + c_col[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


# Autotuning reruns the kernel: every launch is idempotent (C and the stored pre-activation are written, never
# read back; no launch writes an operand it reads), so no reset_to_zero / restore_value is needed.
# (the tuning record, when one is active, picks the candidate untimed: kernels/tuning_record.py)
@triton.autotune(configs=_ALL_CONFIGS, key=_AUTOTUNE_KEY, do_bench=tuning_record.bench, prune_configs_by={
    "early_config_prune": tuning_record.tuned_prune("matmul._matmul_kernel", _AUTOTUNE_KEY, _prune_configs)})
@triton.jit
def _matmul_kernel(  # the arguments of _gemm_tile (documented there), minus the tile index
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, M, N, K,
    M_BUCKET, img_h, img_w, M_D1, M_D2, N_D1, N_D2, K_D1, K_D2,
    stride_a_m1, stride_a_m2, stride_a_m3, stride_a_k1, stride_a_k2, stride_a_k3,
    stride_b_k1, stride_b_k2, stride_b_k3, stride_b_n1, stride_b_n2, stride_b_n3,
    stride_c_m1, stride_c_m2, stride_c_m3, stride_c_n1, stride_c_n2, stride_c_n3,
    stride_r_m1, stride_r_m2, stride_r_m3, stride_r_n1, stride_r_n2, stride_r_n3,
    SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr, SPLIT_K: tl.constexpr, A_PROLOGUE: tl.constexpr,
    B_PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr,
    STORE_PREACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr, A_ROWSUM: tl.constexpr,
    IMG_BOUNDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _gemm_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr,
               gamma_ptr, beta_ptr, M, N, K, M_BUCKET, img_h, img_w, M_D1, M_D2, N_D1, N_D2, K_D1, K_D2, stride_a_m1,
               stride_a_m2, stride_a_m3, stride_a_k1, stride_a_k2, stride_a_k3, stride_b_k1, stride_b_k2, stride_b_k3,
               stride_b_n1, stride_b_n2, stride_b_n3, stride_c_m1, stride_c_m2, stride_c_m3, stride_c_n1, stride_c_n2,
               stride_c_n3, stride_r_m1, stride_r_m2, stride_r_m3, stride_r_n1, stride_r_n2, stride_r_n3, SPLIT_M,
               SPLIT_N, SPLIT_K, A_PROLOGUE, B_PROLOGUE, HAS_BIAS, DGELU, ACT_GELU, STORE_PREACT, HAS_RESIDUAL,
               GELU_TANH, A_ROWSUM, IMG_BOUNDS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# the pair kernel's per-problem flags; the pair shares GELU_TANH, DOT_PRECISION and the tile configuration
_PAIR_FLAGS = ("A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS", "DGELU", "A_ROWSUM")
_PAIR_KEY = [f"{k}{i}" for i in (0, 1) for k in ("M_BUCKET", "N", "K", *_PAIR_FLAGS)] + [
    "GELU_TANH", "DOT_PRECISION"]


def pair_configs(dtype: torch.dtype) -> list[triton.Config]:
    """Candidates of the pointer kernel's pair form: those of :func:`gemm_configs` for unsplit operands, without the
    4-warp tile (128 x 64 x 32, 4 warps, 4 stages left 8 B per thread on the stack in the proj pair on sm_80: AOT
    check, Triton 3.9); before ``NEWER_TRITON`` also without the deep K step (128 x 128 x 64 left 8 B in the qkv
    pair, LayerNorm prologue + row sums, on sm_80: AOT check, Triton 3.6)."""
    old = triton_version() < NEWER_TRITON
    return [c for c in gemm_configs(dtype) if c.num_warps >= 8 and not (old and c.kwargs["BLOCK_K"] >= 64)]


def _prune_pair_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the pair kernel: :func:`pair_configs` of the operand dtype."""
    by_id = {_config_id(c): c for c in configs}
    return [by_id[_config_id(c)] for c in pair_configs(named_args["a0_ptr"].dtype) if _config_id(c) in by_id]


@triton.autotune(configs=_ALL_CONFIGS, key=_PAIR_KEY, do_bench=tuning_record.bench, prune_configs_by={
    "early_config_prune": tuning_record.tuned_prune("matmul._matmul_pair_kernel", _PAIR_KEY, _prune_pair_configs)})
@triton.jit
def _matmul_pair_kernel(
    # problem 0, then problem 1: plain (unsplit) operands, each axis one stride; arguments as in _matmul_kernel
    a0_ptr, b0_ptr, c0_ptr, bias0_ptr, aux0_ptr, rowsum0_ptr, mean0_ptr, rstd0_ptr, gamma0_ptr, beta0_ptr,
    M0, N0, K0, M_BUCKET0, stride_a0_m, stride_a0_k, stride_b0_k, stride_b0_n, stride_c0_m, stride_c0_n,
    a1_ptr, b1_ptr, c1_ptr, bias1_ptr, aux1_ptr, rowsum1_ptr, mean1_ptr, rstd1_ptr, gamma1_ptr, beta1_ptr,
    M1, N1, K1, M_BUCKET1, stride_a1_m, stride_a1_k, stride_b1_k, stride_b1_n, stride_c1_m, stride_c1_n,
    A_PROLOGUE0: tl.constexpr, B_PROLOGUE0: tl.constexpr, HAS_BIAS0: tl.constexpr, DGELU0: tl.constexpr,
    A_ROWSUM0: tl.constexpr,
    A_PROLOGUE1: tl.constexpr, B_PROLOGUE1: tl.constexpr, HAS_BIAS1: tl.constexpr, DGELU1: tl.constexpr,
    A_ROWSUM1: tl.constexpr,
    GELU_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # two independent GEMMs in one launch (a grouped GEMM of two problems): the first cdiv(M0, BLOCK_M) *
    # cdiv(N0, BLOCK_N) programs compute problem 0's tiles, the rest problem 1's
    pid = tl.program_id(0)
    tiles0 = tl.cdiv(M0, BLOCK_M) * tl.cdiv(N0, BLOCK_N)
    if pid < tiles0:
        _gemm_tile(pid, a0_ptr, b0_ptr, c0_ptr, bias0_ptr, c0_ptr, aux0_ptr, rowsum0_ptr, mean0_ptr, rstd0_ptr,
                   gamma0_ptr, beta0_ptr, M0, N0, K0, M_BUCKET0, 0, 0, 1, 1, 1, 1, 1, 1,
                   stride_a0_m, 0, 0, stride_a0_k, 0, 0, stride_b0_k, 0, 0, stride_b0_n, 0, 0,
                   stride_c0_m, 0, 0, stride_c0_n, 0, 0, 0, 0, 0, 0, 0, 0, False, False, False,
                   A_PROLOGUE0, B_PROLOGUE0, HAS_BIAS0, DGELU0, False, False, False, GELU_TANH, A_ROWSUM0, 0,
                   DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _gemm_tile(pid - tiles0, a1_ptr, b1_ptr, c1_ptr, bias1_ptr, c1_ptr, aux1_ptr, rowsum1_ptr, mean1_ptr,
                   rstd1_ptr, gamma1_ptr, beta1_ptr, M1, N1, K1, M_BUCKET1, 0, 0, 1, 1, 1, 1, 1, 1,
                   stride_a1_m, 0, 0, stride_a1_k, 0, 0, stride_b1_k, 0, 0, stride_b1_n, 0, 0,
                   stride_c1_m, 0, 0, stride_c1_n, 0, 0, 0, 0, 0, 0, 0, 0, False, False, False,
                   A_PROLOGUE1, B_PROLOGUE1, HAS_BIAS1, DGELU1, False, False, False, GELU_TANH, A_ROWSUM1, 0,
                   DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# --------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """A tensor viewed as a logical matrix. ``rows`` / ``cols`` give each axis's strides in elements: an int for a
    plain axis (the launcher expands it to (D1 * s, D2 * s, s) when that index is split, so plain and split
    operands can share an index), or an (s1, s2, s3) triple for an axis walked through the three-level split."""

    tensor: torch.Tensor
    rows: int | tuple
    cols: int | tuple

    @staticmethod
    def matrix(t: torch.Tensor) -> "Operand":
        """A 2-D tensor as it is: (R, C)."""
        assert t.dim() == 2
        return Operand(t, t.stride(0), t.stride(1))

    @staticmethod
    def matrix_t(t: torch.Tensor) -> "Operand":
        """A 2-D tensor transposed: logical (C, R), no copy."""
        assert t.dim() == 2
        return Operand(t, t.stride(1), t.stride(0))

    def t(self) -> "Operand":
        """The transposed view of this operand."""
        return Operand(self.tensor, self.cols, self.rows)


@dataclass(frozen=True)
class LayerNormPrologue:
    """fp32 row statistics and affine parameters of a LayerNorm applied to an operand as it is loaded."""

    mean: torch.Tensor  # (rows,) fp32
    rstd: torch.Tensor  # (rows,) fp32
    weight: torch.Tensor  # (features,)
    bias: torch.Tensor  # (features,)


@dataclass(frozen=True)
class ChannelAffine:
    """Per-channel ``v * scale[c] + shift[c]`` (fp32) applied to an operand as it is loaded, then converted to the
    other operand's dtype; channel ``c = feature // D1`` of the split feature index (k for A, n for B)."""

    scale: torch.Tensor  # (channels,) fp32
    shift: torch.Tensor  # (channels,) fp32


@dataclass(frozen=True)
class ImageBounds:
    """Pixels outside a height x width image, on the operand ("a", "b" or "c") whose rows are split patch tokens
    and whose columns are split pixels: read as 0 after the prologue (A, B) or not written (C)."""

    operand: str
    height: int
    width: int


def _axis(strides: int | tuple, split: tuple | None) -> tuple:
    """(s1, s2, s3) for the kernel from an Operand axis and the index's split (see ``Operand``)."""
    if isinstance(strides, tuple):
        assert split is not None, "a three-level stride triple needs a split index"
        return strides
    if split is None:
        return (strides, 0, 0)
    return (split[0] * strides, split[1] * strides, strides)


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


def _use_tma(device: torch.device, a: Operand, b: Operand, c: Operand, residual: Operand | None, M: int, N: int,
             K: int) -> bool:
    """Whether a plain GEMM runs on the TMA persistent kernel (see :func:`fastvit_kernels.backend.gemm_kernel`)."""
    from .. import backend

    setting = backend.gemm_kernel()
    if setting == "pointer":
        return False
    if setting == "auto":
        if device.type != "cuda" or interpreting():
            return False
        if device not in _TMA_CAPABLE:
            _TMA_CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
        if not _TMA_CAPABLE[device]:
            return False
    if residual is not None and not (isinstance(residual.rows, int) and isinstance(residual.cols, int)):
        return False
    return matmul_tma.tma_compatible(a, b, c, M, N, K)


def _prologue(ln, gelu: bool, cast: bool, affine) -> int:
    """The A_PROLOGUE / B_PROLOGUE constexpr for one operand's flags."""
    if ln is not None:
        return PROLOGUE_LN
    if gelu:
        return PROLOGUE_GELU
    if affine is not None:
        return PROLOGUE_AFFINE
    return PROLOGUE_CAST if cast else PROLOGUE_NONE


def _prepare(
    a: Operand,
    b: Operand,
    c: Operand,
    M: int,
    N: int,
    K: int,
    *,
    m_split: tuple | None = None,
    n_split: tuple | None = None,
    k_split: tuple | None = None,
    a_ln: LayerNormPrologue | None = None,
    b_ln: LayerNormPrologue | None = None,
    a_gelu: bool = False,
    b_gelu: bool = False,
    bias: torch.Tensor | None = None,
    dgelu_preact: torch.Tensor | None = None,
    gelu: bool = False,
    store_preact: torch.Tensor | None = None,
    residual: Operand | None = None,
    gelu_approximate: str = "none",
    a_rowsum: torch.Tensor | None = None,
    a_cast: bool = False,
    b_cast: bool = False,
    a_affine: ChannelAffine | None = None,
    b_affine: ChannelAffine | None = None,
    image_bounds: ImageBounds | None = None,
) -> "_Launch":
    """Validate one GEMM launch (the arguments of :func:`gemm`, documented there) and gather what each kernel form
    needs."""
    assert not (a_ln is not None and a_gelu) and not (b_ln is not None and b_gelu)
    assert a_ln is None or b_ln is None
    a_conv = a_cast or a_affine is not None
    b_conv = b_cast or b_affine is not None
    assert not (a_conv and b_conv), "convert at most one operand"
    assert not (a_cast and a_affine is not None) and not (b_cast and b_affine is not None)
    assert not (a_conv and (b_ln is not None or b_gelu)) and not (b_conv and (a_ln is not None or a_gelu))
    assert a_conv or b_conv or a.tensor.dtype == b.tensor.dtype, "mixed operand dtypes need a_cast / b_cast"
    assert a_affine is None or k_split is not None
    assert b_affine is None or n_split is not None
    if image_bounds is not None:
        assert image_bounds.operand in ("a", "b", "c")
        need = {"a": (m_split, k_split), "b": (k_split, n_split), "c": (m_split, n_split)}[image_bounds.operand]
        assert all(s is not None for s in need), "image bounds need the token and pixel splits"
    compute_dtype = b.tensor.dtype if a_conv else a.tensor.dtype  # the dtype of the dot's operands
    for name, sp in (("m_split", m_split), ("n_split", n_split), ("k_split", k_split)):
        assert sp is None or (sp[1] > 0 and sp[0] % sp[1] == 0), f"{name}: D2 must divide D1; got {sp}"
    gelu_tanh = check_gelu_approximate(gelu_approximate)
    if a_rowsum is not None:
        assert a_rowsum.is_contiguous() and a_rowsum.numel() == M, "a_rowsum must be a contiguous (M,) tensor"
        assert N > 0, "a_rowsum needs N > 0 (the programs of the first column tile compute it)"
    aux = dgelu_preact if dgelu_preact is not None else store_preact
    if aux is not None:
        assert aux.is_contiguous() and aux.numel() == M * N
    split = (m_split, n_split, k_split) != (None, None, None)
    plain = not (a_conv or b_conv or image_bounds is not None or split)
    return _Launch(
        a=a, b=b, c=c, M=M, N=N, K=K, m_split=m_split, n_split=n_split, k_split=k_split, ln=a_ln or b_ln,
        affine=a_affine or b_affine, bias=bias, aux=aux, residual=residual, a_rowsum=a_rowsum,
        image_bounds=image_bounds, compute_dtype=compute_dtype, plain=plain,
        a_prologue=_prologue(a_ln, a_gelu, a_cast, a_affine), b_prologue=_prologue(b_ln, b_gelu, b_cast, b_affine),
        flags=dict(HAS_BIAS=bias is not None, DGELU=dgelu_preact is not None, ACT_GELU=gelu,
                   STORE_PREACT=store_preact is not None, HAS_RESIDUAL=residual is not None, GELU_TANH=gelu_tanh,
                   A_ROWSUM=a_rowsum is not None),
        cublas_kw=dict(a_ln=a_ln, b_ln=b_ln, a_gelu=a_gelu, b_gelu=b_gelu, bias=bias, dgelu_preact=dgelu_preact,
                       gelu_on=gelu, store_preact=store_preact, residual=residual, gelu_tanh=gelu_tanh,
                       a_rowsum=a_rowsum),
        impl_flags=dict(a_ln=a_ln is not None, b_ln=b_ln is not None, a_gelu=a_gelu, b_gelu=b_gelu,
                        bias=bias is not None, dgelu=dgelu_preact is not None, gelu_store=store_preact is not None,
                        gelu_only=gelu and store_preact is None, residual=residual is not None,
                        gelu_tanh=gelu_tanh, a_rowsum=a_rowsum is not None),
    )


@dataclass
class _Launch:
    """One validated GEMM launch (built by :func:`_prepare`): operands, fusions and the kernels' flags."""

    a: Operand
    b: Operand
    c: Operand
    M: int
    N: int
    K: int
    m_split: tuple | None
    n_split: tuple | None
    k_split: tuple | None
    ln: LayerNormPrologue | None
    affine: ChannelAffine | None
    bias: torch.Tensor | None
    aux: torch.Tensor | None
    residual: Operand | None
    a_rowsum: torch.Tensor | None
    image_bounds: ImageBounds | None
    compute_dtype: torch.dtype
    plain: bool  # no split index, conversion or image bounds: the TMA kernel, the cuBLAS form and pairs apply
    a_prologue: int
    b_prologue: int
    flags: dict  # the epilogue constexprs (HAS_BIAS, DGELU, ACT_GELU, STORE_PREACT, HAS_RESIDUAL, GELU_TANH, A_ROWSUM)
    cublas_kw: dict  # keywords of gemm_impl.cublas_gemm
    impl_flags: dict  # keywords of gemm_impl.fusion_name (the path rule's key)
    use_tma: bool | None = None  # decided on first use

    @property
    def empty(self) -> bool:
        return self.M == 0 or self.N == 0

    def tma(self) -> bool:
        """Whether this (plain) launch runs on the TMA kernel (memoised)."""
        if self.use_tma is None:
            self.use_tma = self.plain and _use_tma(self.c.tensor.device, self.a, self.b, self.c, self.residual,
                                                   self.M, self.N, self.K)
        return self.use_tma

    def tma_kw(self) -> dict:
        """Keywords of :func:`matmul_tma.launch` (and of its pair form) for this launch."""
        return dict(a=self.a, b=self.b, c=self.c, M=self.M, N=self.N, K=self.K, bias=self.bias,
                    residual=self.residual, aux=self.aux, a_rowsum=self.a_rowsum, ln=self.ln,
                    a_prologue=self.a_prologue, b_prologue=self.b_prologue, flags=self.flags)

    def pointer_args(self) -> tuple:
        """The positional runtime arguments of ``_matmul_kernel``."""
        dummy = self.c.tensor
        ln, affine, ib = self.ln, self.affine, self.image_bounds

        def axes(op: Operand | None, row_split, col_split) -> tuple:
            if op is None:
                return (0,) * 6
            return (*_axis(op.rows, row_split), *_axis(op.cols, col_split))

        return (
            self.a.tensor, self.b.tensor, self.c.tensor,
            self.bias if self.bias is not None else dummy,
            self.residual.tensor if self.residual is not None else dummy,
            self.aux if self.aux is not None else dummy,
            self.a_rowsum if self.a_rowsum is not None else dummy,
            ln.mean if ln is not None else dummy, ln.rstd if ln is not None else dummy,
            ln.weight if ln is not None else (affine.scale if affine is not None else dummy),
            ln.bias if ln is not None else (affine.shift if affine is not None else dummy),
            self.M, self.N, self.K, triton.next_power_of_2(self.M),
            ib.height if ib is not None else 0, ib.width if ib is not None else 0,
            *(self.m_split or (1, 1)), *(self.n_split or (1, 1)), *(self.k_split or (1, 1)),
            *axes(self.a, self.m_split, self.k_split), *axes(self.b, self.k_split, self.n_split),
            *axes(self.c, self.m_split, self.n_split), *axes(self.residual, self.m_split, self.n_split),
        )

    def pointer_kw(self) -> dict:
        """The constexpr keywords of ``_matmul_kernel`` (the tile configuration apart)."""
        return dict(SPLIT_M=self.m_split is not None, SPLIT_N=self.n_split is not None,
                    SPLIT_K=self.k_split is not None, A_PROLOGUE=self.a_prologue, B_PROLOGUE=self.b_prologue,
                    **self.flags,
                    IMG_BOUNDS=IMAGE_BOUNDS_OPERAND[self.image_bounds.operand if self.image_bounds else None],
                    DOT_PRECISION=dot_precision(self.compute_dtype))

    def config(self) -> tuple:
        """(kernel, launch keywords): the autotuned kernel and no keywords, or the plain @triton.jit kernel with a
        fixed configuration (FASTVIT_AUTOTUNE=0, the interpreter, the AOT recorder that stands in for the
        autotuner: it has no .fn and expands the candidates itself)."""
        if _autotune_enabled():
            return _matmul_kernel, {}
        cfg = gemm_config(self.M, self.N, self.K, self.compute_dtype,
                          split=(self.m_split, self.n_split, self.k_split) != (None, None, None),
                          dgelu=bool(self.flags["DGELU"]), b_gelu=self.b_prologue == PROLOGUE_GELU)
        return getattr(_matmul_kernel, "fn", _matmul_kernel), cfg


def _launch_pointer(p: _Launch) -> None:
    kernel, cfg = p.config()
    M, N = p.M, p.N

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _launch.launch(kernel, grid, *p.pointer_args(), **p.pointer_kw(), **cfg)


def _try_tma(launch_tma) -> bool:
    """Run ``launch_tma``; under "auto" a build failure switches to the pointer kernel (returns False)."""
    try:
        launch_tma()
        return True
    except _TMA_BUILD_ERRORS as err:
        from .. import backend

        if backend.gemm_kernel() == "tma":
            raise  # forced: no fallback
        _tma_failed(err)
        return False


def _launch_triton(p: _Launch) -> None:
    if p.tma() and not _TMA_FAILED:
        _, cfg = p.config()
        if _try_tma(lambda: matmul_tma.launch(**p.tma_kw(), dot_precision=dot_precision(p.compute_dtype),
                                              autotune=_autotune_enabled(), config=cfg)):
            return
    _launch_pointer(p)


def _launch_cublas(p: _Launch) -> None:
    from . import gemm_impl

    gemm_impl.cublas_gemm(p.a, p.b, p.c, p.M, p.N, p.K, **p.cublas_kw)


def _route(p: _Launch) -> str:
    """"triton" or "cublas" for a plain launch, by the shape-aware rule of :mod:`gemm_impl`; "triton" otherwise."""
    if not p.plain:
        return "triton"
    from . import gemm_impl

    return gemm_impl.choose_for_launch(p.c.tensor.device, p.compute_dtype, p.M, p.N, p.K, p.impl_flags,
                                       lambda: _launch_triton(p), lambda: _launch_cublas(p))


def _run(p: _Launch) -> None:
    if p.empty:
        return
    if _route(p) == "cublas":
        _launch_cublas(p)
    else:
        _launch_triton(p)


def gemm(a: Operand, b: Operand, c: Operand, M: int, N: int, K: int, **fusions) -> torch.Tensor:
    """Launch ``C = epilogue(prologue(A) @ prologue(B))``; returns ``c.tensor``.

    A GEMM without split indices, image bounds or conversions runs on this core or as cuBLAS + fused elementwise
    kernels, as :func:`fastvit_kernels.kernels.gemm_impl.choose` decides for its (GPU, dtype, shape, fusion);
    the others always run on this core.

    Args:
        a, b, c: the logical (M, K), (K, N), (M, N) operands; c is written (and must not alias an operand:
            autotuning reruns the launch).
        m_split / n_split / k_split: (D1, D2) three-level splits of that index, or None.
        a_ln / b_ln: LayerNorm prologue on A (stats per row m, affine per k) or B (stats per k, affine per n).
        a_gelu / b_gelu: exact-GELU prologue on A or B.
        bias: (N,) added in the epilogue.
        dgelu_preact: (M, N) contiguous pre-activation; the product is multiplied by GELU'(preact).
        gelu: apply exact GELU in the epilogue; store_preact: (M, N) contiguous buffer for the pre-activation.
        residual: logical (M, N) operand added last.
        gelu_approximate: "none" (exact erf) or "tanh": the form of every GELU of the launch (the a_gelu / b_gelu
            prologues, the gelu epilogue and GELU' of dgelu_preact).
        a_rowsum: (M,) contiguous output written with ``sum_k prologue(A)[m, k]`` (fp32 accumulation, one program
            per row tile, fixed order: deterministic). A weight-grad GEMM ``dW = dY^T @ X`` gets the bias gradient
            ``sum_m dY[m, :]`` from the A tiles it already loads, without another pass over dY.
        a_cast / b_cast: convert A (B) to the other operand's dtype on load (the dot runs in that dtype).
        a_affine / b_affine: per-channel affine in fp32 on A (channel k // K_D1) or B (channel n // N_D1), then
            that conversion. At most one operand is converted, and the other then has no prologue.
        image_bounds: zero padding of an image operand (see ``ImageBounds``); needs the token / pixel splits.
    """
    _run(_prepare(a, b, c, M, N, K, **fusions))
    return c.tensor


# fusions a pair launch carries (the backward GEMMs'); a GEMM with others runs alone
_PAIR_FUSIONS = {"a_ln", "b_ln", "a_gelu", "b_gelu", "bias", "dgelu_preact", "gelu_approximate", "a_rowsum"}


def pairs_enabled() -> bool:
    """Whether :func:`gemm_pair` may launch two GEMMs as one (:func:`fastvit_kernels.backend.gemm_pairs`)."""
    from .. import backend

    return backend.gemm_pairs() != "off"


def gemm_pair(first: dict, second: dict) -> None:
    """Two independent GEMMs (each given as the keywords of :func:`gemm`: ``a, b, c, M, N, K`` and fusions) in
    ONE launch where they can share one: both plain, with only backward fusions (LayerNorm / GELU prologue, bias,
    GELU', A row sums), the same operand dtype and GELU form, both on the Triton path by the shape-aware rule and
    both on the same kernel form (TMA, 16-bit operands only; or pointer, neither with a GELU prologue). The launch
    runs problem 0's tiles then problem 1's (a grouped GEMM of two problems, as CUTLASS's grouped GEMMs; one tile
    configuration, autotuned for the pair). Otherwise, or with ``FASTVIT_GEMM_PAIRS=off``, they run as two
    :func:`gemm` launches. Results are identical either way (same tiles, same k order) when the configuration is
    the same (always on the interpreter; autotuning may pick a different tile for the pair than for either alone),
    except where the TMA form balances its schedule by splitting the long (weight-grad) problem into k-slices
    (:func:`matmul_tma.pair_schedule`, a pure function of the shapes, the SM count and the tile): that problem's
    k sum is then grouped by slice, equal to the one-by-one result within rounding, and still bit-identical from
    run to run (partials summed in a fixed order).

    The two must not depend on each other (neither reads what the other writes). Used for the backward's dgrad +
    wgrad pairs that read the same gradient: (dW2, dH), (dW1, d LayerNorm), proj (dx, dW), qkv (dW, d LayerNorm).
    Nothing has been timed: whether one launch of both beats two (fewer launches and tail waves, one shared tile
    configuration) is a GPU measurement (``FASTVIT_GEMM_PAIRS=off`` gives the comparison).
    """
    p0, p1 = _prepare(**first), _prepare(**second)
    if p0.empty or p1.empty or not _pairable(first, p0, p1) or not _pairable(second, p0, p1):
        _run(p0)
        _run(p1)
        return
    if _route(p0) == "cublas" or _route(p1) == "cublas" or p0.tma() != p1.tma():
        _run(p0)
        _run(p1)
        return
    if p0.tma() and not _TMA_FAILED:
        if p0.compute_dtype == torch.float32:
            # the TMA kernel's fp32 pair form (IEEE dots on the FMA units) left 8-16 B per thread on the stack on
            # sm_90 (AOT check, Triton 3.9): fp32 pairs run one by one there
            _run(p0)
            _run(p1)
            return
        if triton_version() < TRITON_3_6 and PROLOGUE_GELU in (p0.b_prologue, p1.b_prologue):
            # fc2's pair (dW2 with GELU on load, dH with GELU') spilled 8-96 B per thread with every candidate on
            # sm_90 (AOT check, Triton 3.4): there those two run one by one
            _run(p0)
            _run(p1)
            return
        _, cfg = p0.config()
        if _try_tma(lambda: matmul_tma.launch_pair(p0.tma_kw(), p1.tma_kw(),
                                                   dot_precision=dot_precision(p0.compute_dtype),
                                                   autotune=_autotune_enabled(), config=cfg)):
            return
    # the pointer kernel (also after the TMA kernel failed to build under "auto")
    if PROLOGUE_GELU in (p0.a_prologue, p0.b_prologue, p1.a_prologue, p1.b_prologue):
        # its pair with a GELU prologue (fc2's dW2 with dH) spilled 8 B per thread with every candidate on sm_90
        # (AOT check, Triton 3.9): on the pointer kernel those two run one by one
        _run(p0)
        _run(p1)
        return
    _launch_pointer_pair(p0, p1)


def _pairable(kw: dict, p0: _Launch, p1: _Launch) -> bool:
    extra = set(kw) - {"a", "b", "c", "M", "N", "K"} - _PAIR_FUSIONS
    return (pairs_enabled() and not extra and p0.plain and p1.plain and p0.compute_dtype == p1.compute_dtype
            and p0.a.tensor.dtype == p1.a.tensor.dtype and p0.flags["GELU_TANH"] == p1.flags["GELU_TANH"])


def _launch_pointer_pair(p0: _Launch, p1: _Launch) -> None:
    if _autotune_enabled():
        kernel, cfg = _matmul_pair_kernel, {}
    else:
        kernel = getattr(_matmul_pair_kernel, "fn", _matmul_pair_kernel)
        if interpreting():
            cfg = dict(INTERPRETER_CONFIG)
        else:
            c = pair_configs(p0.compute_dtype)[0]
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)

    def problem(p: _Launch) -> tuple:
        dummy, ln = p.c.tensor, p.ln
        return (p.a.tensor, p.b.tensor, p.c.tensor, p.bias if p.bias is not None else dummy,
                p.aux if p.aux is not None else dummy, p.a_rowsum if p.a_rowsum is not None else dummy,
                *((ln.mean, ln.rstd, ln.weight, ln.bias) if ln is not None else (dummy,) * 4),
                p.M, p.N, p.K, triton.next_power_of_2(p.M), p.a.rows, p.a.cols, p.b.rows, p.b.cols, p.c.rows,
                p.c.cols)

    def flags(p: _Launch, i: int) -> dict:
        return {f"A_PROLOGUE{i}": p.a_prologue, f"B_PROLOGUE{i}": p.b_prologue, f"HAS_BIAS{i}": p.flags["HAS_BIAS"],
                f"DGELU{i}": p.flags["DGELU"], f"A_ROWSUM{i}": p.flags["A_ROWSUM"]}

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        return (triton.cdiv(p0.M, bm) * triton.cdiv(p0.N, bn) + triton.cdiv(p1.M, bm) * triton.cdiv(p1.N, bn),)

    _launch.launch(kernel, grid, *problem(p0), *problem(p1), **flags(p0, 0), **flags(p1, 1),
                   GELU_TANH=p0.flags["GELU_TANH"], DOT_PRECISION=dot_precision(p0.compute_dtype), **cfg)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **fusions) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x (M, K), weight (N, K) -> (M, N) in x's dtype, with optional fusions
    (``a_ln``, ``gelu``, ``store_preact``, ``residual`` as in :func:`gemm`)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return gemm(Operand.matrix(x), Operand.matrix_t(weight), Operand.matrix(out), M, N, K, bias=bias, **fusions)


# the Hopper form of this core (imported last: it builds its candidates from gemm_configs above)
from . import matmul_tma  # noqa: E402
