"""The one GEMM core of the package: C[m, n] = epilogue(sum_k prologue_A(A)[m, k] * prologue_B(B)[k, n]).

Every Linear layer of a ViT block, the patch embedding and all their backward GEMMs are this kernel with
different constexpr flags (DESIGN.md, "One GEMM core, many fusions"):

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

On Hopper, plain GEMMs (every block GEMM; not the patch embedding's split / converting ones) run the same flags in
:mod:`fastvit_kernels.kernels.matmul_tma` (TMA descriptors, persistent grid, warpgroup MMA; ``backend.gemm_kernel``
decides). Tiles follow Triton's matmul tutorial (grouped tile order for L2 reuse). Tile configurations: the
candidates of ``gemm_configs`` (pruned by ``keep``) are autotuned with ``triton.autotune`` on a GPU, keyed on the M
bucket, N, K, the operand dtypes and every constexpr flag; ``FASTVIT_AUTOTUNE=0`` launches the first candidate
instead, and the interpreter always runs one fixed configuration (``INTERPRETER_CONFIG``: few, large tiles = few
Python steps). Every candidate is compiled for sm_80 / sm_90 by ``python -m fastvit_kernels.aot check`` (no spills).
Which candidate wins is a GPU measurement; none has been made yet (2026-11: no GPU available to this work).
Accumulation is fp32; fp32 operands use IEEE dots (no TF32) so the CPU interpreter tests can be tight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_gelu_approximate
from ._common import bias_gelu_epilogue, dot_precision, gelu, interpreting, ln_cols, ln_rows

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


def keep(cfg: triton.Config, dtype: torch.dtype, split: bool) -> bool:
    """Whether candidate ``cfg`` stays in the autotune set for operands of ``dtype`` (``split``: an index is
    split, the patch-embed GEMMs). Each prune below says what found the problem.

    * fp32 (IEEE dots on the FMA units, operand tiles in registers): 4 warps spilled 300-2600 B per thread with a
      B-operand prologue (LayerNorm / GELU) or a split index (AOT check, sm_80 / sm_90, Triton 3.9).
    * split indices: the earlier 128 x 64 / BLOCK_K 16 special cases were needed while ``_split_offsets`` divided
      in int64 (subroutine calls, 24-1400 B spills); with int32 divisions the normal tiles build without spills
      (AOT check, 2026-11). A deeper K step still does not fit: 128 x 128 x 64 with 8 warps spilled 24-264 B per
      thread in the patch-embed forward (split m / k + bias + residual, 255 registers) on sm_80 and sm_90.
    """
    if dtype == torch.float32 and cfg.num_warps < 8:
        return False
    if split and cfg.kwargs["BLOCK_K"] >= 64 and cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] >= 128 * 128:
        return False
    return True


def gemm_configs(dtype: torch.dtype, split: bool = False, arch: int | None = None) -> list[triton.Config]:
    """Autotune candidates for the GEMM core, the default candidate first: ``triton.Config`` with BLOCK_M / BLOCK_N /
    BLOCK_K / GROUP_M, num_warps, num_stages. ``dtype``: the dot's operand dtype (fp16 and bf16 share a list);
    ``split``: an index is split; ``arch``: compute capability (80, 90, ...) — the lists are the same for sm_80 and
    sm_90 today (the AOT check builds every candidate for both; the recorder that traces the launches has no
    device to ask), the argument is there for a target-specific list when measurements call for one.

    fp32 (IEEE dots, the FMA units): one 64 x 64 x 32 tile with 8 warps; 2 stages, but 1 stage where an index is
    split: the patch-embed fp32 launches left 8-16 B on the stack with 2 stages (AOT check, sm_80 / sm_90, Triton
    3.9, 2026-11), none with 1.

    The 16-bit list starts from Triton's matmul tutorial (03) tiles: 128 x 128 x 32 with 8 warps and 3 stages
    (the tile v1 shipped), a deeper K step, and a narrower N tile with 4 warps for launches with few tiles.
    """
    del arch  # same candidates on every target (see docstring)
    if dtype == torch.float32:
        cands = [(64, 64, 32, 8, 1)] if split else [(64, 64, 32, 8, 2)]
    else:
        cands = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4)]
    out = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in cands]
    out = [c for c in out if keep(c, dtype, split)]
    assert out, f"no GEMM configuration survives keep() for {dtype}, split={split}"
    return out


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, split: bool = False) -> dict:
    """The configuration one launch uses without autotuning, as launch keywords: ``INTERPRETER_CONFIG`` under the
    interpreter, else the first surviving candidate of :func:`gemm_configs`. M, N, K: the problem size (unused
    today; kept for shape-dependent defaults)."""
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    c = gemm_configs(dtype, split)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _config_id(c: triton.Config) -> tuple:
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


# the union of every dtype's / split's candidates: what the autotuner holds; _prune_configs picks one list per launch
_ALL_CONFIGS = list({_config_id(c): c for dt in (torch.float32, torch.float16) for sp in (False, True)
                     for c in gemm_configs(dt, sp)}.values())


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the autotuner: the candidates of this launch's dot dtype and split, in
    :func:`gemm_configs` order (the dot dtype is B's when A is converted on load, else A's)."""
    a_converted = kwargs.get("A_PROLOGUE") in (PROLOGUE_CAST, PROLOGUE_AFFINE)
    dtype = named_args["b_ptr" if a_converted else "a_ptr"].dtype
    split = bool(kwargs.get("SPLIT_M") or kwargs.get("SPLIT_N") or kwargs.get("SPLIT_K"))
    by_id = {_config_id(c): c for c in configs}
    return [by_id[_config_id(c)] for c in gemm_configs(dtype, split) if _config_id(c) in by_id]


def _autotune_enabled() -> bool:
    """Autotune on a GPU unless FASTVIT_AUTOTUNE=0 (then the first candidate runs); never under the interpreter."""
    return not interpreting() and os.environ.get("FASTVIT_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


# every constexpr flag of the kernel and the shape; the autotuner adds the tensor arguments' dtypes itself
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "SPLIT_M", "SPLIT_N", "SPLIT_K", "A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS",
                 "DGELU", "ACT_GELU", "STORE_PREACT", "HAS_RESIDUAL", "GELU_TANH", "A_ROWSUM", "IMG_BOUNDS",
                 "DOT_PRECISION"]


# Autotuning reruns the kernel: every launch is idempotent (C and the stored pre-activation are written, never
# read back; no launch writes an operand it reads), so no reset_to_zero / restore_value is needed.
@triton.autotune(configs=_ALL_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _matmul_kernel(
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
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-tiles share their B column-tiles in L2
    pid = tl.program_id(0)
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


def gemm(
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
) -> torch.Tensor:
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
    if M == 0 or N == 0:
        return c.tensor
    ln = a_ln or b_ln
    affine = a_affine or b_affine
    aux = dgelu_preact if dgelu_preact is not None else store_preact
    if aux is not None:
        assert aux.is_contiguous() and aux.numel() == M * N
    dummy = c.tensor
    def axes(op: Operand | None, row_split, col_split) -> tuple:
        if op is None:
            return (0,) * 6
        return (*_axis(op.rows, row_split), *_axis(op.cols, col_split))

    if _autotune_enabled():
        kernel, cfg = _matmul_kernel, {}  # the autotuner picks the tiles (candidates: gemm_configs)
    else:
        # the plain @triton.jit kernel with a fixed configuration (the AOT recorder, which stands in for the
        # autotuner, has no .fn and expands the candidates itself)
        kernel = getattr(_matmul_kernel, "fn", _matmul_kernel)
        cfg = gemm_config(M, N, K, compute_dtype, split=(m_split, n_split, k_split) != (None, None, None))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    plain = not (a_conv or b_conv or image_bounds is not None or (m_split, n_split, k_split) != (None, None, None))
    use_tma = plain and _use_tma(c.tensor.device, a, b, c, residual, M, N, K)

    def _launch_tma():
        matmul_tma.launch(
            a, b, c, M, N, K, bias=bias, residual=residual, aux=aux, a_rowsum=a_rowsum, ln=ln,
            a_prologue=_prologue(a_ln, a_gelu, False, None), b_prologue=_prologue(b_ln, b_gelu, False, None),
            flags=dict(HAS_BIAS=bias is not None, DGELU=dgelu_preact is not None, ACT_GELU=gelu,
                       STORE_PREACT=store_preact is not None, HAS_RESIDUAL=residual is not None,
                       GELU_TANH=gelu_tanh, A_ROWSUM=a_rowsum is not None),
            dot_precision=dot_precision(compute_dtype), autotune=_autotune_enabled(), config=cfg)

    def launch_triton():
        if use_tma and not _TMA_FAILED:
            try:
                _launch_tma()
                return
            except _TMA_BUILD_ERRORS as err:
                from .. import backend

                if backend.gemm_kernel() == "tma":
                    raise  # forced: no fallback
                _tma_failed(err)
        kernel[grid](
            a.tensor, b.tensor, c.tensor,
            bias if bias is not None else dummy,
            residual.tensor if residual is not None else dummy,
            aux if aux is not None else dummy,
            a_rowsum if a_rowsum is not None else dummy,
            ln.mean if ln is not None else dummy, ln.rstd if ln is not None else dummy,
            ln.weight if ln is not None else (affine.scale if affine is not None else dummy),
            ln.bias if ln is not None else (affine.shift if affine is not None else dummy),
            M, N, K, triton.next_power_of_2(M),
            image_bounds.height if image_bounds is not None else 0,
            image_bounds.width if image_bounds is not None else 0,
            *(m_split or (1, 1)), *(n_split or (1, 1)), *(k_split or (1, 1)),
            *axes(a, m_split, k_split), *axes(b, k_split, n_split), *axes(c, m_split, n_split),
            *axes(residual, m_split, n_split),
            SPLIT_M=m_split is not None, SPLIT_N=n_split is not None, SPLIT_K=k_split is not None,
            A_PROLOGUE=_prologue(a_ln, a_gelu, a_cast, a_affine),
            B_PROLOGUE=_prologue(b_ln, b_gelu, b_cast, b_affine),
            HAS_BIAS=bias is not None, DGELU=dgelu_preact is not None, ACT_GELU=gelu,
            STORE_PREACT=store_preact is not None, HAS_RESIDUAL=residual is not None,
            GELU_TANH=gelu_tanh, A_ROWSUM=a_rowsum is not None,
            IMG_BOUNDS=IMAGE_BOUNDS_OPERAND[image_bounds.operand if image_bounds is not None else None],
            DOT_PRECISION=dot_precision(compute_dtype),
            **cfg,
        )

    if plain:
        # a plain GEMM also has a cuBLAS form: the shape-aware rule of gemm_impl picks the path
        from . import gemm_impl

        cublas_kw = dict(a_ln=a_ln, b_ln=b_ln, a_gelu=a_gelu, b_gelu=b_gelu, bias=bias, dgelu_preact=dgelu_preact,
                         gelu_on=gelu, store_preact=store_preact, residual=residual, gelu_tanh=gelu_tanh,
                         a_rowsum=a_rowsum)
        flags = dict(a_ln=a_ln is not None, b_ln=b_ln is not None, a_gelu=a_gelu, b_gelu=b_gelu,
                     bias=bias is not None, dgelu=dgelu_preact is not None, gelu_store=store_preact is not None,
                     gelu_only=gelu and store_preact is None, residual=residual is not None, gelu_tanh=gelu_tanh,
                     a_rowsum=a_rowsum is not None)

        def launch_cublas():
            gemm_impl.cublas_gemm(a, b, c, M, N, K, **cublas_kw)

        path = gemm_impl.choose_for_launch(c.tensor.device, compute_dtype, M, N, K, flags, launch_triton,
                                           launch_cublas)
        if path == "cublas":
            launch_cublas()
            return c.tensor
    launch_triton()
    return c.tensor


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **fusions) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x (M, K), weight (N, K) -> (M, N) in x's dtype, with optional fusions
    (``a_ln``, ``gelu``, ``store_preact``, ``residual`` as in :func:`gemm`)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return gemm(Operand.matrix(x), Operand.matrix_t(weight), Operand.matrix(out), M, N, K, bias=bias, **fusions)


# the Hopper form of this core (imported last: it builds its candidates from gemm_configs above)
from . import matmul_tma  # noqa: E402
