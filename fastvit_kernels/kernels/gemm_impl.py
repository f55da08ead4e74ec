"""The second path for the GEMM core's launches, cuBLAS (``torch.matmul``) plus fused elementwise kernels, and the
per-shape rule that picks between the two (docs/design.md, "The GEMM core": where a fused Triton GEMM would lose
to cuBLAS at some shape, the op may choose cuBLAS + fused elementwise kernels there; the choice comes from
measurements, and is visible).

The cuBLAS path of one launch of :func:`fastvit_kernels.kernels.matmul.gemm`:

1. a prologue on A or B (LayerNorm from the fp32 row statistics, or GELU) is applied by one elementwise kernel
   that writes the operand contiguously (the tensor the fused path never stores);
2. ``torch.mm`` (cuBLAS on a GPU; fp32 without TF32 unless the user enabled it, as PyTorch's default);
3. the epilogue (bias, GELU' multiply, GELU with the pre-activation stored, residual add, in the core's order)
   by one elementwise kernel reading the product; without an epilogue cuBLAS writes C directly;
4. A's row sums (``a_rowsum``, the bias gradient of a weight-grad GEMM) by one column-sum launch.

Token selection (:class:`fusion.TokenGather`): A's rows / columns and B's rows are gathered with ``index_select``
before ``torch.mm`` (a negative index: a zero row), and the epilogue kernel substitutes the mask token, adds the
position rows and stores C's rows through the row map (:func:`fusion.token_epilogue`, the Triton forms' step).

It computes what the fused launch computes (same flags, fp32 epilogue math); the product is rounded to the
operand dtype before the epilogue, as eager PyTorch's ``F.linear`` + elementwise ops do. GEMMs with split indices,
image bounds or converting prologues (the patch embedding) have no cuBLAS form and always run on the Triton core.

The rule (:func:`choose`), by :func:`fastvit_kernels.backend.gemm_impl`:

* ``"auto"`` (default): never timed at run time, so the path cannot depend on timing noise and every rank of a
  distributed job takes the same one. A key in the active tuning record (``FASTVIT_TUNING`` or
  :func:`fastvit_kernels.tuning.use_tuning_record`, made on this GPU and Triton version by
  ``python -m fastvit_kernels.tune``) takes the recorded path; else a key in :data:`MEASURED_CHOICES` (offline
  measurements per GPU arch, dtype, shape and fusion) takes that one; else the fused Triton core runs. An entry
  may only come from a measurement (``python -m fastvit_kernels.bench gemm-impl`` prints them); while the table is
  empty, "auto" runs the fused core wherever no tuning record says otherwise.
* ``"measure"``: on a GPU, the first launch of each key times both paths (``triton.testing.do_bench``, after the
  Triton autotuning), ignoring the record and the table, and the faster one serves that key for the rest of the
  process. Timings differ between processes: under ``torch.distributed`` call
  :func:`fastvit_kernels.tuning.sync` afterwards so every rank keeps rank 0's choices. On the CPU interpreter and
  during CUDA graph capture nothing is timed ("auto"'s rule applies).
* ``"triton"`` / ``"cublas"``: forced.

Every choice made is kept in :func:`decisions` (key -> path, why, timings) and logged once per key on the
``fastvit_kernels`` logger, so the path an op took is never hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .._env import gemm_impl as gemm_impl_setting
from .._env import interpreter_enabled
from . import tuning_record
from ._common import gelu
from ._launch import launch
from .fusion import PROLOGUE_GELU, PROLOGUE_LN, Fusion, Gemm, epilogue, gathered, token_epilogue
from .reduce import column_sum

log = logging.getLogger("fastvit_kernels")

# (arch, dtype, M bucket, N, K, fusion) -> "cublas": measured entries only (see the module docstring). Keys as
# :func:`gemm_key` builds them, e.g. ("sm_90", "bfloat16", 16384, 3072, 768, "a_ln+bias+gelu_store").
MEASURED_CHOICES: dict[tuple, str] = {}


@dataclass
class Decision:
    """How one key was decided: ``impl`` ("triton" | "cublas"), ``source`` ("record" | "table" | "default" |
    "measured") and, when measured, the two times in ms."""

    impl: str
    source: str
    ms: dict = field(default_factory=dict)


_decisions: dict[tuple, Decision] = {}
_memo: dict[tuple, str] = {}  # (setting, device, dtype, M, N, K, flags) -> path: one dict lookup per launch


def decisions() -> dict[tuple, Decision]:
    """Every (key -> :class:`Decision`) made in this process so far (a copy)."""
    return dict(_decisions)


def reset_decisions() -> None:
    """Forget the decisions (and so the measurements) made so far."""
    _decisions.clear()
    _memo.clear()


def gemm_key(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, fusion: str) -> tuple:
    """(arch, dtype, M bucket, N, K, fusion): arch "sm_90" etc. for CUDA devices, "cpu" otherwise; M rounded up to
    a power of two (one decision per bucket, as the autotune key)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
    else:
        arch = device.type
    return (arch, str(dtype).replace("torch.", ""), triton.next_power_of_2(max(M, 1)), N, K, fusion)


def _can_measure(device: torch.device) -> bool:
    """Timings mean something on a GPU only (the interpreter's are Python's), and cannot be taken while a CUDA graph
    is being captured."""
    return device.type == "cuda" and not interpreter_enabled() and not torch.cuda.is_current_stream_capturing()


def _time_ms(fn) -> float:
    """Median time of ``fn`` in ms on the current CUDA stream (warm-up and autotuning excluded)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def choose(key: tuple, device: torch.device, run_triton, run_cublas) -> str:
    """The path ("triton" | "cublas") for a launch with ``key`` (see the module docstring); ``run_triton`` /
    ``run_cublas`` run the launch each way (used only by "measure"; each is idempotent).

    Raises:
        ValueError: a bad ``FASTVIT_GEMM_IMPL``.
    """
    setting = gemm_impl_setting()
    if setting in ("triton", "cublas"):
        return setting
    known = _decisions.get(key)
    want_measure = setting == "measure" and _can_measure(device)
    if known is not None and (known.source == "measured" or not want_measure):
        return known.impl
    recorded = None if want_measure else tuning_record.lookup(tuning_record.GEMM_IMPL, key, device)
    if want_measure:
        ms = {"triton": _time_ms(run_triton), "cublas": _time_ms(run_cublas)}
        decision = Decision(min(ms, key=ms.get), "measured", ms)
    elif recorded is not None:
        decision = Decision(recorded["impl"], "record")
    elif key in MEASURED_CHOICES:
        decision = Decision(MEASURED_CHOICES[key], "table")
    else:
        decision = Decision("triton", "default")
    _decisions[key] = decision
    log.info("fastvit_kernels GEMM %s -> %s (%s%s)", key, decision.impl, decision.source,
             f": {decision.ms}" if decision.ms else "")
    return decision.impl


def choose_for_launch(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, fusion: Fusion, run_triton,
                      run_cublas) -> str:
    """:func:`choose` for one launch described by its shape and ``fusion`` (:class:`fusion.Fusion`), memoised: the
    key is built and the rule consulted on the first sighting of a (setting, device, dtype, M, N, K, fusion) only,
    so the per-launch cost on the hot path is one dict lookup.

    Raises:
        ValueError: a bad ``FASTVIT_GEMM_IMPL``.
    """
    setting = gemm_impl_setting()
    if setting in ("triton", "cublas"):
        return setting
    raw = (setting, device, dtype, M, N, K, fusion)
    impl = _memo.get(raw)
    if impl is None:
        key = gemm_key(device, dtype, M, N, K, fusion.name)
        impl = _memo[raw] = choose(key, device, run_triton, run_cublas)
    return impl


# ----------------------------------------------------------------------------------------------------------------
# the elementwise kernels of the cuBLAS path
# ----------------------------------------------------------------------------------------------------------------
def tile_grid(R: int, C: int, block_r: int, block_c: int) -> tuple[int]:
    """Grid of the elementwise kernels below: one program per (block_r x block_c) tile of an (R, C) matrix, on one
    axis (column tile fastest; decoded by ``_tile_of_program``). A 2-D grid would put one extent on axis 1, which
    CUDA caps at 65,535 (4.2 M columns at 64 per tile, e.g. a transposed token operand); axis 0 allows 2**31 - 1."""
    return (triton.cdiv(R, block_r) * triton.cdiv(C, block_c),)


@triton.jit
def _tile_of_program(C, BLOCK_C: tl.constexpr):
    """(row tile, column tile) of this program in a :func:`tile_grid` launch over C columns."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_r = pid // n_c
    return pid_r, pid - pid_r * n_c


@triton.jit
def _operand_prologue_kernel(
    x_ptr,  # logical (R, C) operand, strides (stride_r, stride_c)
    out_ptr,  # (R, C) contiguous output, in the dot's dtype
    mean_ptr, rstd_ptr,  # (R,) fp32 LayerNorm statistics (LN)
    gamma_ptr, beta_ptr,  # (C,) LayerNorm affine (LN)
    R, C, stride_r, stride_c,
    LN: tl.constexpr, GELU: tl.constexpr, GELU_TANH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = _tile_of_program(C, BLOCK_C)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    if LN:
        mu = tl.load(mean_ptr + rows, mask=rows < R, other=0.0)
        rs = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)
        g = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        v = (v - mu[:, None]) * rs[:, None] * g[None, :] + b[None, :]
    if GELU:
        v = gelu(v, GELU_TANH)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_epilogue_kernel(
    p_ptr,  # (M, N) contiguous product from cuBLAS
    c_ptr,  # logical (M, N) output, strides (stride_c_m, stride_c_n)
    bias_ptr,  # (N,)
    aux_ptr,  # (M, N) contiguous pre-activation: read (DGELU) or written (STORE_PREACT)
    res_ptr,  # logical (M, N) residual, strides (stride_r_m, stride_r_n)
    c_rows_ptr,  # (M,) C row map (MAP_C_ROWS)
    tok_mask_ptr, mask_token_ptr, pos_ptr, pos_index_ptr,  # token steps, as in matmul._matmul_split_kernel
    M, N, stride_c_m, stride_c_n, stride_r_m, stride_r_n, stride_pos,
    HAS_BIAS: tl.constexpr, DGELU: tl.constexpr, ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GELU_TANH: tl.constexpr,
    MAP_C_ROWS: tl.constexpr, MASK_TOKEN: tl.constexpr, POS_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the GEMM core's epilogue, in its order, on a product read from memory
    pid_m, pid_n = _tile_of_program(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask = mask_m[:, None] & mask_n[None, :]
    m64 = offs_m.to(tl.int64)[:, None]
    acc = tl.load(p_ptr + m64 * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS, DGELU, ACT_GELU, STORE_PREACT,
                   GELU_TANH)
    acc = token_epilogue(acc, offs_m, mask_m, offs_n, mask_n, tok_mask_ptr, mask_token_ptr, pos_ptr, pos_index_ptr,
                         stride_pos, MASK_TOKEN, POS_ROWS)
    n64 = offs_n.to(tl.int64)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + m64 * stride_r_m + n64 * stride_r_n, mask=mask, other=0.0).to(tl.float32)
    c_m, c_ok = gathered(c_rows_ptr, offs_m, mask_m, MAP_C_ROWS)
    c64 = c_m.to(tl.int64)[:, None]
    tl.store(c_ptr + c64 * stride_c_m + n64 * stride_c_n, acc.to(c_ptr.dtype.element_ty),
             mask=c_ok[:, None] & mask_n[None, :])


def _view(op, R: int, C: int) -> torch.Tensor:
    """An unsplit Operand as a strided (R, C) tensor view (no copy)."""
    t = op.tensor
    return torch.as_strided(t, (R, C), (op.rows, op.cols), t.storage_offset())


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    """``x`` with its rows (dim 0) / columns (dim 1) gathered by ``idx`` (a negative index: zeros), or ``x``."""
    if idx is None:
        return x
    ok = idx >= 0
    out = x.index_select(dim, idx.clamp(min=0))
    keep = ok[:, None] if dim == 0 else ok[None, :]
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _prologue(x: torch.Tensor, kind: int, ln, gelu_tanh: bool, dtype: torch.dtype) -> torch.Tensor:
    """The operand ``x`` (R, C) with its prologue (``kind``: fusion.PROLOGUE_LN / _GELU) applied, contiguous."""
    R, C = x.shape
    out = torch.empty((R, C), device=x.device, dtype=dtype)
    if R == 0 or C == 0:
        return out
    dummy = out
    launch(_operand_prologue_kernel, tile_grid(R, C, 32, 64), x, out, ln.mean if ln else dummy,
           ln.rstd if ln else dummy, ln.weight if ln else dummy, ln.bias if ln else dummy, R, C, x.stride(0),
           x.stride(1), LN=kind == PROLOGUE_LN.value, GELU=kind == PROLOGUE_GELU.value, GELU_TANH=gelu_tanh,
           BLOCK_R=32, BLOCK_C=64)
    return out


def cublas_gemm(g: Gemm) -> torch.Tensor:
    """The cuBLAS path of one GEMM-core launch: ``C = epilogue(prologue(A) @ prologue(B))`` as the plain
    :class:`fusion.Gemm` ``g`` describes it (see the module docstring), the same computation as
    :func:`fastvit_kernels.kernels.matmul.gemm` of ``g``: a LayerNorm / GELU prologue by one elementwise kernel
    per operand, ``torch.mm``, the epilogue steps by one elementwise kernel, A's row sums by one column sum.

    Returns:
        ``g.c.tensor``. The product is rounded to the operand dtype before the epilogue (as eager ``F.linear``).

    Token steps (:class:`fusion.TokenGather`, mask token, position rows): the operands are gathered with
    ``index_select`` (the gathered axes' memory extents are the operand tensors' own), the epilogue kernel does the
    rest.

    Raises:
        ValueError: ``g`` has no cuBLAS form (a split index, conversion, image bounds, SwiGLU or RoPE).
    """
    f, ep, M, N, K = g.fusion, g.epilogue, g.M, g.N, g.K
    if not f.cublas_form:
        raise ValueError(f"g: cublas_gemm takes plain GEMMs (token steps allowed) only; got fusion {f.name}")
    dtype = g.a.tensor.dtype
    gt = g.gather
    A = _take(_take(_view(g.a, _extent(g.a, 0, M, gt.a_rows), _extent(g.a, 1, K, gt.a_cols)), 0, gt.a_rows), 1,
              gt.a_cols)
    B = _take(_view(g.b, _extent(g.b, 0, K, gt.b_rows), N), 0, gt.b_rows)
    if f.a_prologue:
        A = _prologue(A, f.a_prologue, g.a_prologue if f.a_prologue == PROLOGUE_LN.value else None, f.gelu_tanh, dtype)
    if f.b_prologue:
        B = _prologue(B, f.b_prologue, g.b_prologue if f.b_prologue == PROLOGUE_LN.value else None, f.gelu_tanh, dtype)
    if ep.a_rowsum is not None:  # sum over k of prologue(A): the columns of A^T (K, M)
        ep.a_rowsum.copy_(column_sum(A.t(), torch.float32))
    C = _view(g.c, _extent(g.c, 0, M, gt.c_rows), N)
    if not (f.bias or f.gelu_grad or f.gelu or f.residual or f.tokens):
        if C.is_contiguous():
            torch.mm(A, B, out=C)
        else:
            C.copy_(torch.mm(A, B))
        return g.c.tensor
    P = torch.mm(A, B).contiguous()
    R = _view(ep.residual, M, N) if ep.residual is not None else None
    bias, _, aux, *_ = g.pointers()
    _, _, _, c_rows, tok_mask, mask_token, pos, pos_index = g.token_pointers()
    launch(_gemm_epilogue_kernel, tile_grid(M, N, 32, 64), P, C, bias, aux, R if R is not None else P, c_rows,
           tok_mask, mask_token, pos, pos_index, M, N, C.stride(0), C.stride(1), R.stride(0) if R is not None else 0,
           R.stride(1) if R is not None else 0, ep.pos.stride(0) if ep.pos is not None else 0,
           HAS_BIAS=f.bias, DGELU=f.gelu_grad, ACT_GELU=f.gelu, STORE_PREACT=f.store_preact, HAS_RESIDUAL=f.residual,
           GELU_TANH=f.gelu_tanh, MAP_C_ROWS=f.c_rows, MASK_TOKEN=f.mask_token, POS_ROWS=f.pos_rows,
           BLOCK_M=32, BLOCK_N=64)
    return g.c.tensor


def _extent(op, axis: int, logical: int, idx: torch.Tensor | None) -> int:
    """Memory extent of an operand axis: the logical length, or for a gathered axis the rows / columns the operand
    tensor holds along it (its elements over the other stride, for the 2-D operands the token ops pass)."""
    if idx is None:
        return logical
    t = op.tensor
    stride = op.rows if axis == 0 else op.cols
    other = op.cols if axis == 0 else op.rows
    # a 2-D tensor viewed straight or transposed: the gathered axis is the dim with this stride
    dim = next(d for d in range(t.dim()) if t.stride(d) == stride and (t.dim() == 1 or t.stride(1 - d) == other))
    return t.shape[dim]
