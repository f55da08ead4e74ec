"""The Hopper form of the GEMM core: TMA tensor descriptors and a persistent grid.

Same contract as :func:`fastvit_kernels.kernels.matmul.gemm` for a *plain* GEMM (no split index, no conversion,
no image bounds: every block GEMM of the ViT and its backward): ``C = epilogue(prologue(A) @ prologue(B))`` with
the LayerNorm / GELU prologues on A or B, and bias, GELU' (backward), GELU with the pre-activation stored,
residual add and A row sums (bias gradients) in the epilogue, as one :class:`fusion.Gemm` describes them — the
flags, their meaning and their numerics are those of ``matmul._matmul_kernel`` (both call the steps of
:mod:`.fusion`).

What differs is how tiles move:

* A, B and C are read / written through host-built TMA tensor descriptors
  (``triton.tools.tensor_descriptor.TensorDescriptor``): the copy engine moves whole tiles into shared memory and
  zero-fills out-of-bounds rows / columns, so the main loop has no address arithmetic and no masks, and Triton's
  sm_90 lowering feeds warpgroup MMA (``wgmma``, HGMMA in the SASS) from the swizzled shared-memory tiles. An
  operand stored transposed (a weight (N, K) used as B, a gradient dY (M, N) used as dY^T) is described in its
  storage order and transposed in registers-free form (``.T`` on the loaded tile).
* The grid is persistent: ``min(#tiles, #SMs)`` programs walk the tiles in the grouped (L2-friendly) order with a
  stride of the grid size, so a launch with more tiles than SMs pays one ramp-up instead of one per wave
  (the persistent-matmul design of Triton's tutorial 09 and of CUTLASS's persistent kernels).

``_matmul_tma_pair_kernel`` is the two-problem form (:func:`matmul.gemm_pair`): the persistent programs walk the
units of both problems as one list, each through the same body (``_tma_tile``). A backward pair joins a
weight-grad GEMM (few tiles, K = B * N tokens) and a dgrad GEMM (many tiles, K = D): walked whole-tile
round-robin, the programs holding weight-grad tiles finish far behind the rest. :func:`pair_schedule` (host side,
also used by the cost model) walks the problem with the longer tiles first and splits it into k-slices whose fp32
partials ``_split_k_reduce_kernel`` sums in a fixed order, so the programs' loads even out (modelled; see there).

When it runs (:func:`fastvit_kernels.backend.gemm_kernel`): ``"auto"`` on a CUDA device of compute capability 9.0+
with a Triton that has host tensor descriptors, for launches whose operands TMA can describe
(:func:`tma_compatible`); ``"tma"`` forces it wherever the operands allow (the interpreter tests, the AOT check);
``"pointer"`` never. Whether it beats the pointer kernel is a GPU measurement (README lists the measurements
made); the AOT check builds it for sm_90 and asserts HGMMA and no spills.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import interpreter_enabled
from . import gemm_configs as cfgs
from . import tuning_record
from ._launch import launch as _launch
from .fusion import PROLOGUE_GELU, Gemm, accumulate, apply_prologues, epilogue, store_rowsum, tile_coords, tile_start

try:  # host-side descriptors: Triton >= 3.4 (3.6 on the GPU machines, 3.9 here)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel runs everywhere
    TensorDescriptor = None

MIN_ARCH = 90  # TMA and warpgroup MMA: Hopper and newer (the AOT check builds this module's kernel for sm_90 only)
INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: fewer than the tiles, so each walks several


def _set_block_shapes(nargs: dict) -> None:
    """Autotune ``pre_hook``: the descriptors' block shapes follow the candidate's tiles (and each operand's storage
    order)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    # the storage order rides on the descriptors themselves: some Triton versions pass a config's pre_hook only
    # the positional arguments and the config's keywords, not the launch's other keywords (A_T / B_T)
    nargs["a_desc"].block_shape = [bk, bm] if nargs["a_desc"].fastvit_transposed else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["b_desc"].fastvit_transposed else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _set_pair_block_shapes(nargs: dict) -> None:
    """Autotune ``pre_hook`` of the pair kernel: both problems' descriptors take the candidate's tiles."""
    for i in (0, 1):
        _set_block_shapes({"a_desc": nargs[f"a{i}_desc"], "b_desc": nargs[f"b{i}_desc"],
                           "c_desc": nargs[f"c{i}_desc"], **{k: nargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}})


def tma_configs(dtype: torch.dtype, pair: bool = False, b_gelu: bool = False) -> list[triton.Config]:
    """Candidates of the TMA kernel (``pair``: of the pair kernel; ``b_gelu``: GELU on a B operand's load), default
    first (:func:`gemm_configs.tma_configs`), each carrying this module's block-shape ``pre_hook``."""
    return cfgs.tma_configs(dtype, pair, _set_pair_block_shapes if pair else _set_block_shapes, b_gelu=b_gelu)


_ALL_TMA_CONFIGS = cfgs.union(tma_configs(dt) for dt in (torch.float32, torch.float16))


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune``: the candidates of this launch's operand dtype, in :func:`tma_configs` order."""
    return cfgs.pick(configs, tma_configs(named_args["a_desc"].base.dtype))


_TMA_KEY = ["M_BUCKET", "N", "K", "A_T", "B_T", "A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS", "DGELU", "ACT_GELU",
            "STORE_PREACT", "HAS_RESIDUAL", "GELU_TANH", "A_ROWSUM", "DOT_PRECISION"]
_ALL_TMA_PAIR_CONFIGS = cfgs.union(tma_configs(dt, pair=True) for dt in (torch.float32, torch.float16))
# the pair kernel's per-problem fusion flags (pairs carry the backward fusions only: fusion.pair_plan)
_TMA_PAIR_FLAGS = ("A_PROLOGUE", "B_PROLOGUE", "HAS_BIAS", "DGELU", "A_ROWSUM")
_TMA_PAIR_KEY = [f"{k}{i}" for i in (0, 1) for k in ("M_BUCKET", "N", "K", "A_T", "B_T", *_TMA_PAIR_FLAGS)]
_TMA_PAIR_KEY += ["SPLIT0", "GELU_TANH", "DOT_PRECISION"]


def _prune_pair(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the pair kernel: the candidates of the operand dtype and of whether a problem
    recomputes GELU on B's load."""
    b_gelu = PROLOGUE_GELU.value in (kwargs.get("B_PROLOGUE0"), kwargs.get("B_PROLOGUE1"))
    return cfgs.pick(configs, tma_configs(named_args["a0_desc"].base.dtype, pair=True, b_gelu=b_gelu))


@triton.jit
def _tma_tile(
    tile, a_desc, b_desc, c_desc, bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    M, N, K, stride_r_m, stride_r_n,
    k_slice, k_slices, ws_ptr, ws_rowsum_ptr,  # PARTIAL: this unit's k-slice of k_slices; fp32 (S, M, N) / (S, M)
    PARTIAL: tl.constexpr,  # sum k-slice k_slice only, into ws_ptr[k_slice] (row sums: ws_rowsum_ptr); no epilogue
    A_T: tl.constexpr, B_T: tl.constexpr, A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr, A_ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile (linear index ``tile`` in the grouped order) of a TMA-kernel problem; arguments as in
    ``_matmul_tma_kernel``. Shared by the one-problem and the pair kernels. With PARTIAL (the pair kernel's split
    problem) it is one (tile, k-slice) unit: BLOCK_K steps :func:`slice_bounds` of the slice, the fp32 sum stored
    unrounded to the partials (rows and columns inside (M, N) only), the epilogue left to
    ``_split_k_reduce_kernel``."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc, a_sum, p0, p1, p2, p3 = tile_start(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                                            1, A_PROLOGUE, B_PROLOGUE, BLOCK_M, BLOCK_N)
    if PARTIAL:
        kt_begin = k_slice * k_tiles // k_slices
        kt_end = (k_slice + 1) * k_tiles // k_slices
    else:
        kt_begin = 0
        kt_end = k_tiles
    for kt in range(kt_begin, kt_end):
        off_k = kt * BLOCK_K
        if A_T:
            a = a_desc.load([off_k, off_m]).T
        else:
            a = a_desc.load([off_m, off_k])
        if B_T:
            b = b_desc.load([off_n, off_k]).T
        else:
            b = b_desc.load([off_k, off_n])
        offs_k = off_k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # the TMA copy zero-fills outside the operands, which the prologues keep at 0; no tile masks (no affine)
        a, b = apply_prologues(a, b, mask_k, mask_k, offs_k, mask_k, 1, p0, p1, p2, p3, mean_ptr, rstd_ptr,
                               gamma_ptr, beta_ptr, A_PROLOGUE, B_PROLOGUE, GELU_TANH)
        acc, a_sum = accumulate(acc, a_sum, a, b, pid_n, A_ROWSUM, DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        ws_rows = k_slice * M + offs_m  # rows of the (S * M, N) partials: S * M < 2**31
        if A_ROWSUM:
            if pid_n == 0:
                tl.store(ws_rowsum_ptr + ws_rows, a_sum, mask=mask_m)
        ws_offs = ws_rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + ws_offs, acc, mask=mask)
    else:
        # ---- epilogue (the flags of _matmul_kernel) ----
        store_rowsum(rowsum_ptr, a_sum, offs_m, mask_m, pid_n, A_ROWSUM)
        acc = epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, ACT_GELU,
                       STORE_PREACT, GELU_TANH)
        if HAS_RESIDUAL:
            r_offs = offs_m.to(tl.int64)[:, None] * stride_r_m + offs_n[None, :] * stride_r_n
            acc += tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))  # the TMA store clips rows / columns outside (M, N)


# like _matmul_kernel, every launch is idempotent, so autotuning may rerun it
@triton.autotune(configs=_ALL_TMA_CONFIGS, key=_TMA_KEY, do_bench=tuning_record.bench, prune_configs_by={
    "early_config_prune": tuning_record.tuned_prune("matmul_tma._matmul_tma_kernel", _TMA_KEY, _prune)})
@triton.jit
def _matmul_tma_kernel(
    a_desc, b_desc, c_desc,  # TMA descriptors: A (M, K) or, A_T, its storage (K, M); B (K, N) or, B_T, (N, K); C (M, N)
    bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,  # as in _matmul_kernel
    M, N, K,
    M_BUCKET,  # next power of two >= M: autotune key only
    stride_r_m, stride_r_n,  # residual strides (elements)
    A_T: tl.constexpr, B_T: tl.constexpr,  # the operand is stored transposed (its descriptor is in storage order)
    A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr,  # fusion.PROLOGUE_NONE / _LN / _GELU
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr, A_ROWSUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        _tma_tile(tile, a_desc, b_desc, c_desc, bias_ptr, res_ptr, aux_ptr, rowsum_ptr, mean_ptr, rstd_ptr, gamma_ptr,
                  beta_ptr, M, N, K, stride_r_m, stride_r_n, 0, 1, rowsum_ptr, rowsum_ptr, False, A_T, B_T, A_PROLOGUE,
                  B_PROLOGUE, HAS_BIAS, DGELU, ACT_GELU, STORE_PREACT, HAS_RESIDUAL, GELU_TANH, A_ROWSUM,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.autotune(configs=_ALL_TMA_PAIR_CONFIGS, key=_TMA_PAIR_KEY, do_bench=tuning_record.bench,
                 prune_configs_by={"early_config_prune": tuning_record.tuned_prune(
                     "matmul_tma._matmul_tma_pair_kernel", _TMA_PAIR_KEY, _prune_pair)})
@triton.jit
def _matmul_tma_pair_kernel(
    # problem 0, then problem 1 (arguments as in _matmul_tma_kernel; no residual: pairs are backward GEMMs)
    a0_desc, b0_desc, c0_desc, bias0_ptr, aux0_ptr, rowsum0_ptr, mean0_ptr, rstd0_ptr, gamma0_ptr, beta0_ptr,
    M0, N0, K0, M_BUCKET0,
    a1_desc, b1_desc, c1_desc, bias1_ptr, aux1_ptr, rowsum1_ptr, mean1_ptr, rstd1_ptr, gamma1_ptr, beta1_ptr,
    M1, N1, K1, M_BUCKET1,
    SPLIT0,  # k-slices of problem 0 (pair_schedule; 1: whole tiles)
    ws_ptr, ws_rowsum_ptr,  # PARTIAL0: fp32 partials (SPLIT0, M0, N0) and row-sum partials (SPLIT0, M0)
    A_T0: tl.constexpr, B_T0: tl.constexpr, A_PROLOGUE0: tl.constexpr, B_PROLOGUE0: tl.constexpr,
    HAS_BIAS0: tl.constexpr, DGELU0: tl.constexpr, A_ROWSUM0: tl.constexpr,
    PARTIAL0: tl.constexpr,  # SPLIT0 > 1: problem 0's units write partials; _split_k_reduce_kernel finishes them
    A_T1: tl.constexpr, B_T1: tl.constexpr, A_PROLOGUE1: tl.constexpr, B_PROLOGUE1: tl.constexpr,
    HAS_BIAS1: tl.constexpr, DGELU1: tl.constexpr, A_ROWSUM1: tl.constexpr,
    GELU_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # the persistent programs walk one list of units round-robin: problem 0's (tile, k-slice) units, slice-major
    # (consecutive programs share a k range of the operands in L2), then problem 1's tiles. The launcher puts the
    # problem with the longer units first (pair_schedule): longest first.
    tiles0 = tl.cdiv(M0, BLOCK_M) * tl.cdiv(N0, BLOCK_N)
    units0 = tiles0 * SPLIT0
    num_units = units0 + tl.cdiv(M1, BLOCK_M) * tl.cdiv(N1, BLOCK_N)
    for unit in range(tl.program_id(0), num_units, tl.num_programs(0)):
        if unit < units0:
            k_slice = unit // tiles0
            _tma_tile(unit - k_slice * tiles0, a0_desc, b0_desc, c0_desc, bias0_ptr, bias0_ptr, aux0_ptr,
                      rowsum0_ptr, mean0_ptr, rstd0_ptr, gamma0_ptr, beta0_ptr, M0, N0, K0, 0, 0, k_slice, SPLIT0,
                      ws_ptr, ws_rowsum_ptr, PARTIAL0, A_T0, B_T0, A_PROLOGUE0, B_PROLOGUE0, HAS_BIAS0, DGELU0,
                      False, False, False, GELU_TANH, A_ROWSUM0, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        else:
            _tma_tile(unit - units0, a1_desc, b1_desc, c1_desc, bias1_ptr, bias1_ptr, aux1_ptr, rowsum1_ptr,
                      mean1_ptr, rstd1_ptr, gamma1_ptr, beta1_ptr, M1, N1, K1, 0, 0, 0, 1, ws_ptr, ws_rowsum_ptr,
                      False, A_T1, B_T1, A_PROLOGUE1, B_PROLOGUE1, HAS_BIAS1, DGELU1, False, False, False,
                      GELU_TANH, A_ROWSUM1, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


REDUCE_BLOCK_M, REDUCE_BLOCK_N, REDUCE_WARPS = 64, 64, 4  # a memory-bound pass: small tiles, many programs


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr,  # fp32 (S, M, N) contiguous: one partial product per k-slice
    ws_rowsum_ptr,  # fp32 (S, M) contiguous: partial row sums of A (A_ROWSUM)
    c_ptr,  # (M, N) output, strides stride_c_m / stride_c_n (elements)
    bias_ptr, aux_ptr, rowsum_ptr,  # as in _matmul_kernel: bias (N,), GELU pre-activation (M, N), row sums (M,)
    M, N, S, stride_c_m, stride_c_n,
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, A_ROWSUM: tl.constexpr, GELU_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The second half of a split-K problem of the pair kernel: C = epilogue(sum over s of partial[s]) and the row
    sums, each summed in fp32 in slice order 0, 1, ..., S - 1 (no atomics: the result depends on S, never on
    which program finished first). Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); the pid_n == 0 programs also
    reduce the row sums."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + (offs + s * M * N), mask=mask, other=0.0)  # M * N < 2**31: C's element count
    if A_ROWSUM:
        if pid_n == 0:
            rs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s in range(0, S):
                rs += tl.load(ws_rowsum_ptr + (s * M + offs_m), mask=mask_m, other=0.0)
            tl.store(rowsum_ptr + offs_m, rs.to(rowsum_ptr.dtype.element_ty), mask=mask_m)
    acc = epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, False, False, GELU_TANH)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_c_m + offs_n[None, :].to(tl.int64) * stride_c_n
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# the pair kernel's schedule (host side, pure Python: the launcher and the cost model call the same function)
# ----------------------------------------------------------------------------------------------------------------
REFERENCE_SMS = 132  # H100 SXM / H200: the programs of a launch traced without a GPU (the AOT check, the cost model)
MAX_SPLIT = 16  # at most this many k-slices
MAX_WORKSPACE_BYTES = 128 * 2**20  # and at most this many bytes of fp32 partials (split * M * N * 4)
MIN_SLICE_K_TILES = 16  # a k-slice runs at least this many BLOCK_K steps, so its partial tile's store and re-read
#                         (2 * BLOCK_M * BLOCK_N * 4 bytes) stay below the slice's operand loads
SPLIT_TOLERANCE = 0.02  # the fewest slices whose makespan is within 2 % of the best one


@dataclass(frozen=True)
class PairSchedule:
    """The static schedule of one pair launch (MODELLED: lengths are counted in BLOCK_K steps, every step assumed
    to take the same time; no GPU measured it).

    ``first``: which input problem (0 or 1) the persistent programs walk first (the one with the longer units);
    ``split``: k-slices of that problem (1: not split); ``programs``: the SMs the schedule is for;
    ``grid``: persistent programs launched (``min(programs, units)``);
    ``units``: work units (tiles, or (tile, k-slice) pairs); ``work``: BLOCK_K steps of all units;
    ``makespan``: BLOCK_K steps of the busiest program; ``baseline_makespan``: the same for the unbalanced
    schedule (input order, no split: the kernel before balancing), for comparison."""

    first: int
    split: int
    programs: int
    grid: int
    units: int
    work: int
    makespan: int
    baseline_makespan: int

    @property
    def efficiency(self) -> float:
        """work / (programs * makespan): the busy fraction of the SMs' time until the launch's last program ends."""
        return self.work / (self.programs * self.makespan)

    @property
    def baseline_efficiency(self) -> float:
        """:attr:`efficiency` of the unbalanced schedule (input order, no split)."""
        return self.work / (self.programs * self.baseline_makespan)


def slice_bounds(k_tiles: int, split: int, s: int) -> tuple[int, int]:
    """[begin, end) BLOCK_K steps of k-slice ``s`` of ``split``: ``s * k_tiles // split`` onwards, so slice lengths
    differ by at most one step (the kernel computes the same bounds)."""
    return s * k_tiles // split, (s + 1) * k_tiles // split


def _makespan(long: tuple[int, int], short: tuple[int, int], split: int, programs: int) -> tuple[int, int]:
    """(makespan, grid) of the round-robin walk: unit u goes to program u % grid; the ``long`` problem's (tiles,
    k_tiles) split into ``split`` slices come first (slice-major), then the ``short`` problem's whole tiles."""
    (t0, k0), (t1, k1) = long, short
    u0 = t0 * split
    grid = max(1, min(programs, u0 + t1))
    loads = [0] * grid
    for u in range(u0):
        lo, hi = slice_bounds(k0, split, u // t0)
        loads[u % grid] += hi - lo
    q, r = divmod(t1, grid)
    for p in range(grid):  # the short problem's units u0 .. u0 + t1 - 1, all of length k1
        loads[p] += k1 * (q + (1 if (p - u0) % grid < r else 0))
    return max(loads), grid


@functools.lru_cache(maxsize=1024)
def pair_schedule(problems: tuple, programs: int, block_m: int, block_n: int, block_k: int) -> PairSchedule:
    """The schedule of the pair kernel for ``problems`` = ((M0, N0, K0), (M1, N1, K1)) on ``programs`` persistent
    programs with BLOCK_M x BLOCK_N x BLOCK_K tiles: a pure function of the shapes.

    A weight-grad GEMM (K = B * N tokens, few output tiles) has units hundreds of times longer than the dgrad
    GEMM's (K = D). Walked round-robin, the programs that draw a weight-grad tile also draw their share of dgrad
    tiles and finish last (ViT-B proj, batch 1024, 132 programs: 43 % busy, modelled). Balancing (a static form of
    longest-processing-time-first scheduling, Graham 1969, with split-K as in CUTLASS's split-K GEMMs): the
    problem with more BLOCK_K steps per tile is walked first and is split into ``split`` k-slices, each unit a
    (tile, k-slice) pair writing an fp32 partial tile that a second launch sums in fixed slice order. ``split``
    is the fewest slices in 1 .. ``MAX_SPLIT`` (each slice at least ``MIN_SLICE_K_TILES`` steps, the partials at
    most ``MAX_WORKSPACE_BYTES``) whose makespan is within ``SPLIT_TOLERANCE`` of the smallest (fewer slices: less
    partial traffic and memory). The split problem's
    epilogue (bias, GELU', A row sums) then runs in the reduction, on the summed tile.

    Raises:
        ValueError: a non-positive size, program count or block size.
    """
    if programs < 1 or min(block_m, block_n, block_k) < 1 or len(problems) != 2:
        raise ValueError(f"pair_schedule needs two problems, programs >= 1 and positive blocks; got {problems}, "
                         f"programs={programs}, blocks=({block_m}, {block_n}, {block_k})")
    dims = []
    for i, (m, n, k) in enumerate(problems):
        if min(m, n, k) < 1:
            raise ValueError(f"problem {i}: (M, N, K) must be positive; got {(m, n, k)}")
        dims.append((-(-m // block_m) * -(-n // block_n), -(-k // block_k)))
    work = sum(t * k for t, k in dims)
    first = 1 if dims[1][1] > dims[0][1] else 0
    long, short = dims[first], dims[1 - first]
    baseline, _ = _makespan(dims[0], dims[1], 1, programs)
    m, n, _ = problems[first]
    most = min(MAX_SPLIT, long[1] // MIN_SLICE_K_TILES, MAX_WORKSPACE_BYTES // (m * n * 4))
    candidates = [(split, *_makespan(long, short, split, programs)) for split in range(1, max(1, most) + 1)]
    best = min(span for _, span, _ in candidates)
    split, span, grid = next(c for c in candidates if c[1] <= best * (1 + SPLIT_TOLERANCE))
    return PairSchedule(first=first, split=split, programs=programs, grid=grid, units=long[0] * split + short[0],
                        work=work, makespan=span, baseline_makespan=baseline)


def available() -> bool:
    """Whether the installed Triton has host tensor descriptors (the kernel's only requirement beyond Triton)."""
    return TensorDescriptor is not None


def _storage(t: torch.Tensor, rows_stride: int, cols_stride: int, R: int, C: int):
    """(transposed, shape, strides) of a logical (R, C) operand in storage order for a descriptor, or None when TMA
    cannot describe it: a 16-byte aligned base, one unit-stride axis and the other stride a multiple of 16 bytes
    (an axis of extent 1 is never stepped: its stride is replaced by an aligned one)."""
    align = 16 // t.element_size()
    if t.data_ptr() % 16:
        return None
    if cols_stride == 1 and (R == 1 or rows_stride % align == 0):
        return False, [R, C], [rows_stride if R > 1 else triton.cdiv(C, align) * align, 1]
    if rows_stride == 1 and (C == 1 or cols_stride % align == 0):
        return True, [C, R], [cols_stride if C > 1 else triton.cdiv(R, align) * align, 1]
    return None


def tma_compatible(a, b, c, M: int, N: int, K: int) -> bool:
    """Whether the logical operands ``a`` (M, K), ``b`` (K, N), ``c`` (M, N) (``matmul.Operand``, plain strides) can
    be described by TMA descriptors: each has a unit-stride axis and 16-byte aligned rows, and C is row-major.
    ``TensorDescriptor`` also requires every row pitch to be a multiple of 16 bytes (bf16 / fp16: 8 elements; ViT
    widths 192-1280 and their multiples all are)."""
    if not available() or min(M, N, K) <= 0:
        return False
    if not all(isinstance(op.rows, int) and isinstance(op.cols, int) for op in (a, b, c)):
        return False
    sa = _storage(a.tensor, a.rows, a.cols, M, K)
    sb = _storage(b.tensor, b.rows, b.cols, K, N)
    sc = _storage(c.tensor, c.rows, c.cols, M, N)
    return sa is not None and sb is not None and sc is not None and not sc[0]


def _num_sms(device: torch.device) -> int:
    """Persistent programs of a launch: the device's SMs; ``INTERPRETER_PROGRAMS`` under the interpreter;
    ``REFERENCE_SMS`` for a launch traced on the CPU without it (the AOT check: the schedule, and so which kernel
    variants are built, is that of a Hopper GPU)."""
    if interpreter_enabled():
        return INTERPRETER_PROGRAMS
    if device.type != "cuda":
        return REFERENCE_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _descriptors(a, b, c, M: int, N: int, K: int) -> tuple:
    """(a_desc, b_desc, c_desc, a_t, b_t) for operands that :func:`tma_compatible` accepted; the block shapes are
    placeholders until the configuration is known (pre_hook / :func:`_fixed_config`)."""
    a_t, a_shape, a_strides = _storage(a.tensor, a.rows, a.cols, M, K)
    b_t, b_shape, b_strides = _storage(b.tensor, b.rows, b.cols, K, N)
    _, c_shape, c_strides = _storage(c.tensor, c.rows, c.cols, M, N)
    a_desc = TensorDescriptor(a.tensor, a_shape, a_strides, [16, 16])
    b_desc = TensorDescriptor(b.tensor, b_shape, b_strides, [16, 16])
    c_desc = TensorDescriptor(c.tensor, c_shape, c_strides, [16, 16])
    a_desc.fastvit_transposed, b_desc.fastvit_transposed, c_desc.fastvit_transposed = a_t, b_t, False
    return a_desc, b_desc, c_desc, a_t, b_t


def launch(g: Gemm, *, dot_precision: str, autotune: bool, config: dict) -> None:
    """Launch the TMA kernel for the GEMM ``g`` (plain, operands :func:`tma_compatible` accepted). ``autotune``: let
    ``triton.autotune`` pick the tiles, else use ``config`` (launch keywords, :func:`gemm_configs.fixed_config`)."""
    a_desc, b_desc, c_desc, a_t, b_t = _descriptors(g.a, g.b, g.c, g.M, g.N, g.K)
    n_sms = _num_sms(g.c.tensor.device)
    M, N, r = g.M, g.N, g.epilogue.residual

    def grid(meta):
        return (min(n_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    args = (a_desc, b_desc, c_desc, *g.pointers(), M, N, g.K, triton.next_power_of_2(M), r.rows if r else 0,
            r.cols if r else 0)
    kw = dict(A_T=a_t, B_T=b_t, DOT_PRECISION=dot_precision, **g.fusion.constexprs())
    if autotune:
        _launch(_matmul_tma_kernel, grid, *args, **kw)
    else:
        cfg = dict(config)
        _set_block_shapes({"a_desc": a_desc, "b_desc": b_desc, "c_desc": c_desc, **cfg})
        _launch(_matmul_tma_kernel.fn, grid, *args, **kw, **cfg)


def launch_pair(g0: Gemm, g1: Gemm, *, dot_precision: str, autotune: bool, config: dict) -> None:
    """Launch the pair kernel: two independent GEMMs (both TMA-compatible, without residual / GELU epilogue, with
    the same GELU form: :func:`fusion.pair_plan`) in one persistent launch.

    :func:`pair_schedule` (for this device's SM count and the launch's tiles: ``config``'s, or under autotuning
    the first candidate's) orders the problems longest units first and may split that problem into k-slices;
    then its fp32 partials go to a workspace of ``split * M * (N + 1) * 4`` bytes (``torch.empty`` on the
    launch's device and stream: every element is written before it is read, so no zeroing, and CUDA-graph capture
    allocates it from the graph's pool) and a second launch (``_split_k_reduce_kernel``) sums them in slice order
    and applies that problem's epilogue and row sums. The results are deterministic (bit-identical reruns) but,
    split, not bit-identical to one-by-one launches: the k sum is grouped by slice."""
    tiles_cfg = tma_configs(g0.compute_dtype, pair=True)[0].kwargs if autotune else config
    n_sms = _num_sms(g0.c.tensor.device)
    sched = pair_schedule(((g0.M, g0.N, g0.K), (g1.M, g1.N, g1.K)), n_sms, tiles_cfg["BLOCK_M"],
                          tiles_cfg["BLOCK_N"], tiles_cfg["BLOCK_K"])
    problems = (g0, g1) if sched.first == 0 else (g1, g0)
    split, long = sched.split, problems[0]
    args, kw, descs = [], {}, {}
    for i, g in enumerate(problems):
        a_desc, b_desc, c_desc, a_t, b_t = _descriptors(g.a, g.b, g.c, g.M, g.N, g.K)
        descs.update({f"a{i}_desc": a_desc, f"b{i}_desc": b_desc, f"c{i}_desc": c_desc})
        bias, _, aux, rowsum, *ln = g.pointers()
        args += [a_desc, b_desc, c_desc, bias, aux, rowsum, *ln, g.M, g.N, g.K, triton.next_power_of_2(g.M)]
        f = g.fusion.constexprs()
        kw.update({f"A_T{i}": a_t, f"B_T{i}": b_t, **{f"{k}{i}": f[k] for k in _TMA_PAIR_FLAGS}})
    if split > 1:
        dev = long.c.tensor.device
        ws = torch.empty((split, long.M, long.N), device=dev, dtype=torch.float32)
        ws_rowsum = torch.empty((split, long.M), device=dev, dtype=torch.float32) \
            if long.epilogue.a_rowsum is not None else ws
    else:
        ws = ws_rowsum = long.c.tensor  # unused (PARTIAL0 off)
    args += [split, ws, ws_rowsum]
    kw.update(PARTIAL0=split > 1, GELU_TANH=g0.fusion.gelu_tanh, DOT_PRECISION=dot_precision)
    (m0, n0), (m1, n1) = [(g.M, g.N) for g in problems]

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        units = triton.cdiv(m0, bm) * triton.cdiv(n0, bn) * split + triton.cdiv(m1, bm) * triton.cdiv(n1, bn)
        return (min(n_sms, units),)

    if autotune:
        _launch(_matmul_tma_pair_kernel, grid, *args, **kw)
    else:
        cfg = dict(config)
        _set_pair_block_shapes({**descs, **cfg})
        _launch(_matmul_tma_pair_kernel.fn, grid, *args, **kw, **cfg)
    if split > 1:
        c, f = long.c, long.fusion
        bias, _, aux, rowsum, *_ = long.pointers()
        _launch(_split_k_reduce_kernel, (triton.cdiv(long.M, REDUCE_BLOCK_M), triton.cdiv(long.N, REDUCE_BLOCK_N)),
                ws, ws_rowsum, c.tensor, bias, aux, rowsum, long.M, long.N, split, c.rows, c.cols, HAS_BIAS=f.bias,
                DGELU=f.gelu_grad, A_ROWSUM=f.a_rowsum, GELU_TANH=f.gelu_tanh, BLOCK_M=REDUCE_BLOCK_M,
                BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS)
