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
key blocks. With many (batch, head) pairs (ViT training batches) the three launches become one: a program per
(batch, head) runs the three loops in sequence (``_attention_bwd_fused_kernel``; ViT's short sequences,
N = 197 / 257, make one head's whole backward a small, L2-resident job). No atomics, so results are deterministic
(bit-identical across runs).

Numerics:
* exp2 everywhere, with log2(e) folded into the softmax scale (``qk_scale = scale * log2(e)``).
* The saved log-sum-exp ``lse`` is (B, H, N) fp32 in **log2 units**: ``lse[b, h, i] = log2(sum_j 2^(qk_scale *
  q_i . k_j))`` = natural-log LSE * log2(e). ``P_ij = exp2(qk_scale * q_i . k_j - lse_i)``.
* Key tails are masked with a finite value (-1e30), never -inf, so no NaN/Inf for any N >= 1 (N = 1 included).
* fp32 accumulators and softmax statistics; P and dS are cast to the input dtype before their dots so fp16/bf16
  use tensor cores. fp32 inputs follow PyTorch's fp32 matmul setting, as cuBLAS and SDPA's math path do
  (:func:`fastvit_kernels.kernels._common.dot_precision`, read at each launch): IEEE fp32 dots under the default
  ``torch.set_float32_matmul_precision("highest")``, so fp32 results match an fp32 reference up to summation
  order; TF32 dots (10-bit mantissa products) when the user allows TF32 ("high" / "medium", or
  ``torch.backends.cuda.matmul.allow_tf32 = True``). The precision is a constexpr and part of the autotune key.
* Addressing: batch offsets are int64; row offsets ``row * stride_n`` are int64 when some tensor's
  ``(N - 1) * stride_n`` reaches 2**31 (a strided view, e.g. sequence-first qkv: the constexpr ROW64, see
  :func:`needs_row64`; that variant is not in the AOT check's trace), int32 otherwise. The grids have one axis
  (:func:`block_head_grid`), so no batch size meets CUDA's 65,535 cap on grid axes 1 / 2.

Head dim: split into up to three power-of-two column chunks ``D0 + D1 + D2`` (:func:`head_dim_chunks`:
the binary decomposition of head_dim rounded up to 16, the smallest ``tl.dot`` edge), so at most 8 columns of any
supported head dim are padding: 80 = 64 + 16, 72 = 64 + 16 (8 masked), 88 = 64 + 32 (8 masked), 40 = 32 + 16
(8 masked), 48 = 32 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16; 32 / 64 / 128 are one chunk. Every dot over the head dim
is a sum of per-chunk dots (``S = q0 k0^T + q1 k1^T``), and O, dV, dK, dQ are accumulated per chunk.

Tiles: on a GPU every kernel except the delta pre-pass is a ``triton.autotune`` over the candidates of
:func:`attention_configs`, pruned per call by :func:`keep`, keyed by the sequence-length bucket ``N_BUCKET``
(next power of two of N), ``N_ALIGN``, ``HEAD_DIM`` and the dtype, so distinct N inside a bucket re-tune or
recompile only when their alignment class differs (``N_ALIGN``, and Triton's own N % 16 specialisation).
``EVEN_N`` (no sequence-tail masks) is derived inside the kernels from the constexpr ``N_ALIGN`` (the
largest power of two <= 256 dividing N), so it is free when N is a multiple of the tiles and costs one compile per
alignment class, not per N. Under the interpreter (``TRITON_INTERPRET=1``) one fixed small config is used
(:func:`_interpreter_config`), so CPU tests stay fast. The candidate lists rest on static evidence only (``python -m
fastvit_kernels.aot check``: builds, no spills, tensor cores; see :func:`keep`), not on GPU timings.

Kernel arguments (each kernel takes the ones it needs, in this order; documented once here):
* ``QKV`` (B, N, 3 * D): the forward input q | k | v, head h of each at column h * HEAD_DIM of its third. ``Out``
  (B, N, D): the forward output, head h at columns h * HEAD_DIM. ``DOut`` (B, N, D): the gradient of Out. ``Lse``
  (B, H, N) fp32: the log2-sum-exp2 of each query row's scaled scores (written by the forward). ``Delta`` (B, H, N)
  fp32: rowsum(dO * O) (written by the pre-pass; by the fused backward, as scratch). ``DQKV`` (B, N, 3 * D): the
  gradient of QKV, same layout. All but Lse and Delta in the input dtype.
* ``qk_scale``: softmax scale * log2(e); ``sm_scale``: the softmax scale (dQ = sm_scale * dS K, dK = sm_scale *
  dS^T Q).
* ``stride_<t>_b``, ``stride_<t>_n``: strides of tensor t over B and N (column stride 1); ``stride_lse_b``,
  ``stride_lse_h``: of Lse over B and H (stride over N 1), shared by Delta (the pre-pass names them
  ``stride_delta_*``).
* ``N``: sequence length; ``H``: heads; ``D``: model width H * HEAD_DIM, the offset of k (D) and v (2 * D) in a qkv
  row; ``N_BUCKET``: :func:`n_bucket` of N, an autotune key only (unused in the kernel).
* constexprs: ``HEAD_DIM`` (per-head width); ``D0``, ``D1``, ``D2`` (the head-dim chunk widths of
  :func:`head_dim_chunks`, 0: absent); ``N_ALIGN`` (:func:`n_align` of N); ``ROW64`` (int64 row offsets, see
  :func:`needs_row64`; else int32); ``BLOCK_M`` / ``BLOCK_N`` (query / key rows, per program or per loop step as
  each kernel says); ``INPUT_PRECISION`` (``tl.dot``'s input_precision from
  :func:`~fastvit_kernels.kernels._common.dot_precision`: fp32 "ieee" or "tf32").

Sequence kernels (``_attention_seq_*``, launched by :func:`attention_seq_fwd` / :func:`attention_seq_bwd`): the
same block functions over packed variable-length sequences (QKV (T, 3 * D), ``Seq`` = cu_seqlens (S + 1,) int32,
Lse (H, T)) or a padded batch with a key-padding mask (QKV (B, N, 3 * D), ``Seq`` = kv_end (B,) int32, ``Valid``
(B, N) uint8, Lse (B, H, N); constexpr ``PADDED``). Sequence s starts at ``s * stride_<t>_s + start * stride_<t>_n``
(packed: stride_s = 0, start = cu_seqlens[s]; padded: the batch stride, start = 0) and has ``length`` rows
(packed: its length; padded: kv_end), which every block function takes as its N (EVEN_N off). The grid (row
blocks, H) comes from the shapes only; each program finds its (sequence, block) in the kernel (:func:`_seq_block`,
``SEQ_CHUNK`` sequences of cu_seqlens per step) and blocks past the sequence exit. ``N``: padded N (packed: T,
unused); ``S``: sequences / images; ``stride_valid_s``: Valid's batch stride.

Caveats: the column stride of every tensor must be 1 (the op in ``ops/`` guarantees it). The tests run the
interpreter path; the autotuned (GPU) launch path is covered by the AOT check (it compiles), not by the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import autotune_requested, interpreter_enabled
from . import _launch, tuning_record
from ._common import NEWER_TRITON, TRITON_3_6, dot_precision, triton_version

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
# Finite "minus infinity" for masked scores: exp2(MASK_VALUE - m) == 0, and never inf - inf = NaN.
MASK_VALUE: tl.constexpr = tl.constexpr(-1.0e30)
MAX_BLOCK = 256  # the largest BLOCK_M / BLOCK_N of any candidate (N_ALIGN is capped here)
# The one-program-per-head backward needs this many (batch, head) programs: about two per SM of a 132-SM H100 (a
# fixed number, not a device query, so a run's plan does not depend on the GPU it lands on).
FUSED_BWD_MIN_HEADS = 256
# Decided once, when the kernels are defined (as Triton decides between compiling and interpreting).
AUTOTUNE = not interpreter_enabled()


# ----------------------------------------------------------------------------------------------------------------
# configuration (host side)
# ----------------------------------------------------------------------------------------------------------------
def head_dim_chunks(head_dim: int) -> tuple[int, int, int]:
    """Split a head dim into power-of-two column chunks for the kernels' dots.

    Args:
        head_dim: per-head width, 1 .. 128 (the op allows multiples of 8 up to 128).

    Returns:
        (D0, D1, D2): decreasing powers of two >= 16, or 0 for an absent chunk, with D0 + D1 + D2 = head_dim rounded
        up to a multiple of 16 (the binary decomposition of that), so fewer than 16 columns are padding; e.g.
        80 -> (64, 16, 0), 88 -> (64, 32, 0), 112 -> (64, 32, 16), 120 -> (128, 0, 0).

    Raises:
        ValueError: head_dim outside [1, 128] (more would need a fourth chunk).
    """
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head_dim must be in [1, 128]; got {head_dim}")
    rest = -(-head_dim // 16) * 16
    chunks = []
    while rest:
        chunks.append(1 << (rest.bit_length() - 1))
        rest -= chunks[-1]
    assert len(chunks) <= 3, (head_dim, chunks)
    return tuple(chunks + [0] * (3 - len(chunks)))


def n_bucket(N: int) -> int:
    """Autotune bucket of a sequence length: the next power of two (197 -> 256, 257 -> 512)."""
    return triton.next_power_of_2(N)


def n_align(N: int) -> int:
    """The largest power of two <= MAX_BLOCK that divides N, or 1 when that is below 16 (the smallest tile).

    A tile of BLOCK rows (a power of two, 16 .. MAX_BLOCK) divides N exactly when ``n_align(N) % BLOCK == 0``, so the
    kernels derive EVEN_N from this constexpr: 197 and 257 -> 1, 192 -> 64, 256 -> 256."""
    a = min(N & -N, MAX_BLOCK)
    return a if a >= 16 else 1


def _device_arch(t: torch.Tensor) -> int | None:
    """Compute capability of a CUDA tensor's device as 80 / 90 / ..., or None off CUDA (the AOT trace)."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def attention_configs(kernel: str, head_dim: int | None, dtype: torch.dtype | None, arch: int | None,
                      n_bkt: int | None, seq: bool = False, padded: bool = False) -> list:
    """Autotune candidates for one attention kernel at one (head_dim, dtype, GPU arch, N bucket).

    Args:
        kernel: "fwd" (BLOCK_M query rows per program, BLOCK_N key rows per step), "dkdv" (BLOCK_N key rows per
            program, BLOCK_M query rows per step), "dq" (as "fwd") or "fused" (the one-program-per-head backward:
            both loops, one tile pair).
        head_dim, dtype, arch (80, 90, ... or None: any), n_bkt (:func:`n_bucket` of N): the call; None in all
            four gives every candidate of the kernel (the autotuner's full list, pruned per call).
        seq: for the sequence kernels (packed / padded, ``_attention_seq_*``), which :func:`keep` prunes further;
            padded: their key-padding form (key-mask loads).

    Returns:
        list of ``triton.Config`` (BLOCK_M, BLOCK_N, num_warps, num_stages) that pass :func:`keep`; never empty.

    fp16 / bf16: the M side of every dot (fwd / dq: BLOCK_M, dkdv: BLOCK_N) is 64 or 128 rows, so sm_90 uses
    warpgroup MMA. BLOCK_N = 256 is the one-pass forward tile (a whole head's K and V in one step) for N <= 256
    (ViT-B/L at 224 px: N = 197); it is listed but pruned by :func:`keep` (it spills). IEEE fp32 dots run on the
    FMA units with their operand tiles in registers, hence the small fp32 tiles; the same tiles serve fp32 with TF32
    dots (the AOT check builds fp32 at PyTorch's default precision, IEEE).
    """
    low = [] if dtype == torch.float32 else {
        "fwd": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 256, 8, 1), (64, 256, 8, 2),
                (128, 256, 8, 1)],
        "dkdv": [(64, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2)],
        "dq": [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 128, 8, 2), (64, 128, 4, 2), (64, 32, 4, 2)],
        # all loops in one program, one tile pair for both (see keep() and fused_bwd_builds for why these two)
        "fused": [(64, 32, 4, 2), (32, 64, 4, 2)],
    }[kernel]
    fp32 = [(32, 32, 8, 1), (16, 16, 8, 1)] if dtype in (torch.float32, None) else []
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
               for bm, bn, w, s in low + fp32]
    if dtype is None:
        return configs
    kept = [c for c in configs if keep(c, kernel, head_dim, dtype, arch, n_bkt, seq, padded)]
    assert kept, (kernel, head_dim, dtype, arch, n_bkt)
    return kept


def keep(config, kernel: str, head_dim: int, dtype: torch.dtype, arch: int | None, n_bkt: int,
         seq: bool = False, padded: bool = False) -> bool:
    """Whether a candidate of :func:`attention_configs` is worth benchmarking for this call (see there for args).

    Pruned, and why (the spill figures are from ``python -m fastvit_kernels.aot check``, Triton 3.9, bf16 at ViT-B/16
    and ViT-H/14 shapes: static, not timings). The AOT trace cannot know the GPU, so it checks the candidates kept
    for ``arch=None`` on every target; a tile that spills on one target is therefore dropped everywhere (no
    candidate is arch-specific; ``arch`` is in the signature so that one can be):
    * fp32: one tile per head dim (no tuning): 32 x 32, 8 warps, 1 stage for the forward up to a chunked width of
      80 (checked at 64 and 80: no spills); 16 x 16 above (32 x 32 spilled at head_dim 128) and for the split
      backward kernels (32 x 32 left 8 B per thread on the stack on sm_80: dkdv at head_dim 64, dq at 80, Triton
      3.9). With 2 stages 16 x 16 spilled 8 B at head_dim 80 on sm_90, so both use 1 stage.
    * tiles longer than the sequence bucket (beyond 64 rows): they only add masked work.
    * fwd BLOCK_N = 256, the one-pass tile for N <= 256: 64 x 256 with 8 warps spilled 16-800 B per thread (all
      but head_dim 64 on sm_90), 128 x 256 64-800 B; 16 warps cap registers at 128 and spilled 0.3-7 KB.
    * dq 64 x 128 (4 or 8 warps): 24-32 B of spills on sm_80.
    * ``seq`` fwd with BLOCK_N = 128 (the sequence forward: runtime length, key-mask loads): 64 x 128 (4 warps)
      spilled 8 B and 128 x 128 (8 warps) 8-24 B on sm_80 (padded at head_dim 64; packed and padded at 80; bf16,
      Triton 3.8); the 64-key tiles build clean.
    * fused: only the two tiles that build clean are listed (see :func:`fused_bwd_builds`).
    * dkdv at a chunked width above 64 (head_dim 80) with BLOCK_M = 64: spilled 16-24 B per thread on Triton 3.6
      (64 x 64 and 64 x 128, 8 warps: sm_80; 64 x 128: sm_90) and 16 B on Triton 3.9 (64 x 128, 8 warps, sm_80,
      with the one-axis grid's decode); the 32-row tiles build clean on every version.
    * Triton before ``NEWER_TRITON`` (AOT check, Triton 3.6, sm_80, head_dim 64): dkdv 64 x 128 with 8 warps and dq
      128 x 32 with 4 warps left 8 B per thread on the stack.
    * Triton before ``TRITON_3_6`` (AOT check, Triton 3.4, sm_80): dkdv with BLOCK_M = 64 also at head_dim 64
      (24 B), fwd 128 x 128 at head_dim 80 (56 B), dq 128 x 64 with 8 warps at head_dim 80 (16 B, with the one-axis
      grid's (row block, batch * head) decode). The key-padding sequence kernels (``padded``: key-mask loads) at
      head_dim 80 there: dkdv 32 x 128 with 8 warps (32 B) and dq 64 x 64 with 8 warps (8 B); dq takes 64 x 32
      with 4 warps instead (clean on sm_80 and sm_90 there), a candidate listed for that case only.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    width = sum(head_dim_chunks(head_dim))
    oldest_padded_wide = seq and padded and width > 64 and triton_version() < TRITON_3_6
    if kernel == "dq" and (bm, bn) == (64, 32) and not oldest_padded_wide:
        return False  # listed only as the replacement below
    if dtype == torch.float32:
        return (bm == 32) == (width <= 80 and kernel not in ("dkdv", "dq"))
    if max(bm, bn) > max(64, n_bkt):
        return False
    if kernel == "fwd" and (bn == 256 or (seq and bn == 128)):
        return False
    if kernel == "dq" and (bm, bn) == (64, 128):
        return False
    if kernel == "dkdv" and bm == 64 and width > 64:
        return False
    if triton_version() < NEWER_TRITON:
        if (kernel, bm, bn) in (("dkdv", 64, 128), ("dq", 128, 32)):
            return False
        oldest = triton_version() < TRITON_3_6
        if kernel == "dkdv" and bm == 64 and oldest:
            return False
        if oldest and ((kernel == "dq" and (bm, bn) == (128, 64) and width > 64)
                       or (kernel == "fwd" and (bm, bn) == (128, 128) and width > 64)):
            return False
        if oldest_padded_wide and ((kernel == "dkdv" and (bm, bn) == (32, 128))
                                   or (kernel == "dq" and (bm, bn, config.num_warps) == (64, 64, 8))):
            return False
    return True


def fused_bwd_builds(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the one-program-per-head backward has a tile that builds without spills on sm_80 and sm_90: fp16 /
    bf16 with a chunked head dim <= 64 (ViT-B/L's 64; 32, 40, 48). Static evidence (``python -m
    fastvit_kernels.aot``, Triton 3.9, bf16, ViT-B/16 and ViT-H/14 shapes): at head_dim 64 the 64 x 32
    and 32 x 64 tiles with 4 warps build clean on both; 64 x 64 spilled 16-40 B per thread on sm_80 (clean on
    sm_90), 128 x 64 184-216 B. At head_dim 80 every tile tried spilled on sm_80 (16-504 B) and all but
    64 x 64 x 8 warps on sm_90; fp32 (IEEE dots, FMA tiles) spilled 32-168 B. Those take the three-launch plan."""
    return dtype in (torch.float16, torch.bfloat16) and sum(head_dim_chunks(head_dim)) <= 64


def _interpreter_config(N: int) -> dict:
    """The one config under the interpreter: tiles of 16 / 32 / 64 rows by N (fewer Python steps than smaller
    tiles, little masked work at small N); warps and stages are ignored by the interpreter."""
    block = 16 if N <= 16 else 32 if N <= 32 else 64
    return dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=1)


def _autotuned(kernel: str, name: str | None = None, key: list[str] | None = None, seq: bool = False):
    """Decorator: ``triton.autotune`` over :func:`attention_configs` on a GPU, the bare kernel under the interpreter.
    With ``FASTVIT_AUTOTUNE=0`` (read when a shape is first launched) the pruning keeps only the first candidate,
    which then runs without benchmarking, as the GEMM core's first candidate does. ``name``: the tuning record's
    kernel name (default ``attention.<kernel>``); ``key``: the autotune key (default the dense kernels'); ``seq``:
    a sequence kernel (see :func:`keep`).

    Not ``reset_to_zero`` / ``restore_value``: the kernels only write outputs they fully overwrite, so re-running one
    while benchmarking is harmless."""
    if not AUTOTUNE:
        return lambda fn: fn

    def prune(configs, nargs, **kwargs):
        qkv = nargs["QKV"]
        kept = attention_configs(kernel, kwargs["HEAD_DIM"], qkv.dtype, _device_arch(qkv), nargs["N_BUCKET"], seq,
                                 bool(kwargs.get("PADDED", False)))
        return kept if autotune_requested() else kept[:1]

    # + the tensors' dtypes (added by Triton)
    key = key or ["N_BUCKET", "N_ALIGN", "HEAD_DIM", "ROW64", "INPUT_PRECISION"]
    # the tuning record, when one is active, picks the candidate untimed (kernels/tuning_record.py)
    return triton.autotune(configs=attention_configs(kernel, None, None, None, None), key=key,
                           do_bench=tuning_record.bench, prune_configs_by={
                               "early_config_prune": tuning_record.tuned_prune(name or f"attention.{kernel}", key,
                                                                               prune)})


# The sequence kernels' autotune key: the average sequence length's bucket (N_BUCKET = n_bucket(T // S), or of N for
# a padded batch), never the lengths themselves (data), plus the static flags.
SEQ_KEY = ["N_BUCKET", "HEAD_DIM", "PADDED", "ROW64", "INPUT_PRECISION"]


# ----------------------------------------------------------------------------------------------------------------
# helpers (device side): a (rows, head_dim) tile as up to three power-of-two column chunks c0 | c1 | c2
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rows(start, BLOCK: tl.constexpr, ROW64: tl.constexpr):
    """Row indices ``start .. start + BLOCK - 1``: int64 when ROW64, so that every offset ``row * stride_n`` formed
    from them is 64-bit, else int32. ROW64 is set by the launcher (:func:`needs_row64`) only for inputs whose
    ``(N - 1) * stride_n`` reaches 2**31 (e.g. a sequence-first qkv view, stride_n = B * 3 * D); the int32 form
    saves registers in the usual launches (always-int64 offsets leave 16 B per thread on the stack in the
    64 x 128 dK / dV tile on sm_80: AOT check, bf16, ViT-B/16, Triton 3.9)."""
    offs = start + tl.arange(0, BLOCK)
    if ROW64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _load_chunk(base, offs_rows, stride_n, N, COL: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                EVEN_N: tl.constexpr):
    """Load columns [COL, COL + WIDTH) of rows ``offs_rows`` (row stride ``stride_n``, columns contiguous from
    ``base``), zero-filling rows >= N (unless EVEN_N) and columns >= HEAD_DIM (masks only where needed)."""
    EVEN_D: tl.constexpr = COL + WIDTH <= HEAD_DIM
    offs_d = COL + tl.arange(0, WIDTH)
    ptrs = base + offs_rows[:, None] * stride_n + offs_d[None, :]  # int64 when the rows are (see _rows)
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
def _store_chunk(base, tile, offs_rows, stride_n, N, COL: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                 EVEN_N: tl.constexpr):
    """Store ``tile`` (rows, WIDTH) as columns [COL, COL + WIDTH), skipping rows >= N and columns >= HEAD_DIM."""
    EVEN_D: tl.constexpr = COL + WIDTH <= HEAD_DIM
    offs_d = COL + tl.arange(0, WIDTH)
    ptrs = base + offs_rows[:, None] * stride_n + offs_d[None, :]  # int64 when the rows are (see _rows)
    tile = tile.to(base.dtype.element_ty)
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
def _load_chunks(base, offs_rows, stride_n, N, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 D2: tl.constexpr, EVEN_N: tl.constexpr):
    """(c0, c1, c2): a (rows, head_dim) tile as column chunks of widths D0, D1, D2 (see :func:`_load_chunk`). An
    absent chunk (width 0) is returned as c0, a placeholder that no caller reads."""
    c0 = _load_chunk(base, offs_rows, stride_n, N, 0, D0, HEAD_DIM, EVEN_N)
    c1 = c0
    c2 = c0
    if D1 > 0:
        c1 = _load_chunk(base, offs_rows, stride_n, N, D0, D1, HEAD_DIM, EVEN_N)
    if D2 > 0:
        c2 = _load_chunk(base, offs_rows, stride_n, N, D0 + D1, D2, HEAD_DIM, EVEN_N)
    return c0, c1, c2


@triton.jit
def _store_chunks(base, c0, c1, c2, offs_rows, stride_n, N, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                  D1: tl.constexpr, D2: tl.constexpr, EVEN_N: tl.constexpr):
    """Store the chunks of a (rows, head_dim) tile in base's dtype (see :func:`_store_chunk`)."""
    _store_chunk(base, c0, offs_rows, stride_n, N, 0, D0, HEAD_DIM, EVEN_N)
    if D1 > 0:
        _store_chunk(base, c1, offs_rows, stride_n, N, D0, D1, HEAD_DIM, EVEN_N)
    if D2 > 0:
        _store_chunk(base, c2, offs_rows, stride_n, N, D0 + D1, D2, HEAD_DIM, EVEN_N)


@triton.jit
def _batch_head(pid_bh, H):
    """(batch as int64, so that batch offsets are 64-bit; head) of a batch * head index."""
    return (pid_bh // H).to(tl.int64), pid_bh % H


@triton.jit
def _block_and_head(N, H, BLOCK: tl.constexpr):
    """(row block, batch, head) of this program in a :func:`block_head_grid` launch (batch and head as
    :func:`_batch_head` gives them): the one grid axis counts row blocks fastest, so the programs of one head are
    adjacent (scheduled together, sharing its K / V in L2)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    pid_bh = pid // num_blocks
    b, h = _batch_head(pid_bh, H)
    return pid - pid_bh * num_blocks, b, h


@triton.jit
def _zeros_chunks(ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """fp32 zero accumulators (ROWS, D0), (ROWS, D1), (ROWS, D2); an absent chunk is the first (never read)."""
    a0 = tl.zeros([ROWS, D0], dtype=tl.float32)
    a1 = a0
    a2 = a0
    if D1 > 0:
        a1 = tl.zeros([ROWS, D1], dtype=tl.float32)
    if D2 > 0:
        a2 = tl.zeros([ROWS, D2], dtype=tl.float32)
    return a0, a1, a2


@triton.jit
def _scale_chunks(a0, a1, a2, factor, D1: tl.constexpr, D2: tl.constexpr):
    """(a0 * factor, a1 * factor, a2 * factor) for the present chunks (factor broadcasts: a scalar or (rows, 1))."""
    a0 = a0 * factor
    if D1 > 0:
        a1 = a1 * factor
    if D2 > 0:
        a2 = a2 * factor
    return a0, a1, a2


@triton.jit
def _dot_nt(a0, a1, a2, b0, b1, b2, D1: tl.constexpr, D2: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a @ b^T over the head dim as the sum of the chunks' dots, fp32: (rows_a, rows_b)."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=INPUT_PRECISION)
    if D1 > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=INPUT_PRECISION)
    if D2 > 0:
        acc = tl.dot(a2, tl.trans(b2), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _dot_acc(acc0, acc1, acc2, p, b0, b1, b2, D1: tl.constexpr, D2: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc_c += p @ b_c per chunk: p (rows, K) in the operand dtype, b_c (K, D_c), acc_c (rows, D_c) fp32."""
    acc0 = tl.dot(p, b0, acc0, input_precision=INPUT_PRECISION)
    if D1 > 0:
        acc1 = tl.dot(p, b1, acc1, input_precision=INPUT_PRECISION)
    if D2 > 0:
        acc2 = tl.dot(p, b2, acc2, input_precision=INPUT_PRECISION)
    return acc0, acc1, acc2


@triton.jit
def _load_row(ptrs, offs_rows, N, EVEN_N: tl.constexpr):
    """Load a (rows,) fp32 vector (lse or delta), zero-filling rows >= N."""
    if EVEN_N:
        row = tl.load(ptrs)
    else:
        row = tl.load(ptrs, mask=offs_rows < N, other=0.0)
    return row


@triton.jit
def _store_row(ptrs, row, offs_rows, N, EVEN_N: tl.constexpr):
    """Store a (rows,) fp32 vector (lse or delta), skipping rows >= N."""
    if EVEN_N:
        tl.store(ptrs, row)
    else:
        tl.store(ptrs, row, mask=offs_rows < N)


@triton.jit
def _key_valid(valid_base, offs_rows, N):
    """(rows,) bool: row < N and its key-padding byte (at ``valid_base + row``) is nonzero."""
    return tl.load(valid_base + offs_rows, mask=offs_rows < N, other=0) != 0


@triton.jit
def _delta_block(o_base, do_base, delta_base, offs_rows, stride_out_n, stride_do_n, N, HEAD_DIM: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, EVEN_N: tl.constexpr):
    """delta = rowsum(dO * O) (fp32) of one row block (rows ``offs_rows``) of one (batch, head), stored into that
    head's row of Delta at ``delta_base`` (the row pointers are formed after the loads, so they hold no registers
    across them)."""
    do0, do1, do2 = _load_chunks(do_base, offs_rows, stride_do_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    o0, o1, o2 = _load_chunks(o_base, offs_rows, stride_out_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    if D2 > 0:
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
    _store_row(delta_base + offs_rows, delta, offs_rows, N, EVEN_N)


@triton.jit
def _dkdv_block(q_base, do_base, dqkv_base, lse_ptrs, delta_ptrs, offs_n, qk_scale, sm_scale, stride_qkv_n,
                stride_do_n, stride_dqkv_n, N, D, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                D2: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, ROW64: tl.constexpr, valid_base, KEY_MASK: tl.constexpr):
    """dK and dV of one key block (rows ``offs_n``) of one (batch, head) over every query block, stored into the dk
    and dv thirds at ``dqkv_base``. ``q_base`` / ``do_base`` / ``dqkv_base``: the head's column 0 in QKV / DOut /
    DQKV; ``lse_ptrs`` / ``delta_ptrs``: that head's rows [0, BLOCK_M) of Lse and Delta (the loop steps them by
    BLOCK_M). With KEY_MASK, the keys whose byte at ``valid_base + row`` is 0 get P = 0 (so dK = dV = 0 there)."""
    if KEY_MASK:
        key_ok = _key_valid(valid_base, offs_n, N)  # once per key block
    k0, k1, k2 = _load_chunks(q_base + D, offs_n, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    v0, v1, v2 = _load_chunks(q_base + 2 * D, offs_n, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    offs_m = _rows(0, BLOCK_M, ROW64)
    dk0, dk1, dk2 = _zeros_chunks(BLOCK_N, D0, D1, D2)
    dv0, dv1, dv2 = _zeros_chunks(BLOCK_N, D0, D1, D2)
    for start_m in range(0, N, BLOCK_M):
        offs_qm = start_m + offs_m
        q0, q1, q2 = _load_chunks(q_base, offs_qm, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        do0, do1, do2 = _load_chunks(do_base, offs_qm, stride_do_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        lse = _load_row(lse_ptrs + start_m, offs_qm, N, EVEN_N)
        delta = _load_row(delta_ptrs + start_m, offs_qm, N, EVEN_N)
        # Transposed probabilities P^T (BLOCK_N, BLOCK_M), recomputed from q, k and the saved lse.
        s_t = _dot_nt(k0, k1, k2, q0, q1, q2, D1, D2, INPUT_PRECISION) * qk_scale
        if KEY_MASK:
            s_t = tl.where(key_ok[:, None], s_t, MASK_VALUE)
        elif not EVEN_N:
            # Padded key rows (offs_n >= N) are never stored, but exp2(0 - lse) there can be inf (see _dq_block);
            # mask them so no inf / NaN is ever formed.
            s_t = tl.where(offs_n[:, None] < N, s_t, MASK_VALUE)
        # Padded query columns (offs_qm >= N) need no mask: q, lse, dO and delta load as 0 there, so p_t is
        # exp2(0) = 1 (finite) and both its dV and its dS terms are multiplied by dO = 0 / (dp_t - delta) = 0.
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv0, dv1, dv2 = _dot_acc(dv0, dv1, dv2, p_t.to(do0.dtype), do0, do1, do2, D1, D2, INPUT_PRECISION)
        dp_t = _dot_nt(v0, v1, v2, do0, do1, do2, D1, D2, INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk0, dk1, dk2 = _dot_acc(dk0, dk1, dk2, ds_t.to(q0.dtype), q0, q1, q2, D1, D2, INPUT_PRECISION)
    dk0, dk1, dk2 = _scale_chunks(dk0, dk1, dk2, sm_scale, D1, D2)
    _store_chunks(dqkv_base + D, dk0, dk1, dk2, offs_n, stride_dqkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    _store_chunks(dqkv_base + 2 * D, dv0, dv1, dv2, offs_n, stride_dqkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)


@triton.jit
def _dq_block(q_base, do_base, dqkv_base, lse_ptrs, delta_ptrs, offs_qm, qk_scale, sm_scale, stride_qkv_n,
              stride_do_n, stride_dqkv_n, N, D, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              D2: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, ROW64: tl.constexpr, valid_base, KEY_MASK: tl.constexpr):
    """dQ of one query block (rows ``offs_qm``) of one (batch, head) over every key block, stored into the dq third
    at ``dqkv_base``. Bases and the key mask as in :func:`_dkdv_block`; ``lse_ptrs`` / ``delta_ptrs``: this block's
    rows of Lse and Delta."""
    q0, q1, q2 = _load_chunks(q_base, offs_qm, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    do0, do1, do2 = _load_chunks(do_base, offs_qm, stride_do_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    lse = _load_row(lse_ptrs, offs_qm, N, EVEN_N)
    delta = _load_row(delta_ptrs, offs_qm, N, EVEN_N)
    offs_n = _rows(0, BLOCK_N, ROW64)
    dq0, dq1, dq2 = _zeros_chunks(BLOCK_M, D0, D1, D2)
    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        k0, k1, k2 = _load_chunks(q_base + D, offs_kn, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        v0, v1, v2 = _load_chunks(q_base + 2 * D, offs_kn, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        s = _dot_nt(q0, q1, q2, k0, k1, k2, D1, D2, INPUT_PRECISION) * qk_scale
        if KEY_MASK:
            s = tl.where(_key_valid(valid_base, offs_kn, N)[None, :], s, MASK_VALUE)
        elif not EVEN_N:
            # Padded keys load k = v = 0, so s = 0 and exp2(0 - lse) would overflow to inf when every real score
            # is very negative (inf * 0 = NaN in dS @ K). The finite mask value makes their P exactly 0.
            s = tl.where(offs_kn[None, :] < N, s, MASK_VALUE)
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot_nt(do0, do1, do2, v0, v1, v2, D1, D2, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq0, dq1, dq2 = _dot_acc(dq0, dq1, dq2, ds.to(k0.dtype), k0, k1, k2, D1, D2, INPUT_PRECISION)
    dq0, dq1, dq2 = _scale_chunks(dq0, dq1, dq2, sm_scale, D1, D2)
    _store_chunks(dqkv_base, dq0, dq1, dq2, offs_qm, stride_dqkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)


# ----------------------------------------------------------------------------------------------------------------
# kernels (arguments: see "Kernel arguments" in the module docstring)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(q_base, out_base, lse_ptrs, valid_base, offs_m, qk_scale, stride_qkv_n, stride_out_n, N, D,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, EVEN_N: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW64: tl.constexpr,
               KEY_MASK: tl.constexpr):
    """Forward of one query block (rows ``offs_m`` of a sequence of N rows) of one head: streams over the keys
    BLOCK_N rows at a time with an online softmax; stores the block's output rows at ``out_base`` (the head's
    column 0 in Out) and its log2-sum-exp2 at ``lse_ptrs`` (this block's rows of Lse). ``q_base``: the head's
    column 0 in QKV (k and v at + D and + 2 * D).

    KEY_MASK: keys whose byte at ``valid_base + row`` is 0 get the score MASK_VALUE, and the output rows of such
    queries are stored as 0. Each row needs one valid key among its N (the launcher makes N the last valid key + 1);
    a leading tile of masked keys then only adds terms that the first valid key's rescale ``alpha = exp2(MASK_VALUE
    - m)`` = 0 removes."""
    offs_n = _rows(0, BLOCK_N, ROW64)
    k_base = q_base + D
    v_base = q_base + 2 * D

    q0, q1, q2 = _load_chunks(q_base, offs_m, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc0, acc1, acc2 = _zeros_chunks(BLOCK_M, D0, D1, D2)

    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        k0, k1, k2 = _load_chunks(k_base, offs_kn, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        s = _dot_nt(q0, q1, q2, k0, k1, k2, D1, D2, INPUT_PRECISION) * qk_scale
        if KEY_MASK:
            s = tl.where(_key_valid(valid_base, offs_kn, N)[None, :], s, MASK_VALUE)
        elif not EVEN_N:
            s = tl.where(offs_kn[None, :] < N, s, MASK_VALUE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1, v2 = _load_chunks(v_base, offs_kn, stride_qkv_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
        acc0, acc1, acc2 = _scale_chunks(acc0, acc1, acc2, alpha[:, None], D1, D2)
        acc0, acc1, acc2 = _dot_acc(acc0, acc1, acc2, p.to(v0.dtype), v0, v1, v2, D1, D2, INPUT_PRECISION)
        m_i = m_new

    # l_i >= 1 for every row (the row max contributes exp2(0)), so the division and log2 are safe.
    inv_l = 1.0 / l_i
    if KEY_MASK:
        inv_l = tl.where(_key_valid(valid_base, offs_m, N), inv_l, 0.0)  # invalid queries: zero output rows
    acc0, acc1, acc2 = _scale_chunks(acc0, acc1, acc2, inv_l[:, None], D1, D2)
    _store_chunks(out_base, acc0, acc1, acc2, offs_m, stride_out_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    _store_row(lse_ptrs, m_i + tl.math.log2(l_i), offs_m, N, EVEN_N)


@_autotuned("fwd")
@triton.jit
def _attention_fwd_kernel(
    QKV, Out, Lse, qk_scale, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, stride_lse_b, stride_lse_h,
    N, H, D, N_BUCKET, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    N_ALIGN: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Forward: a program per (BLOCK_M query rows, batch * head) streams over the keys BLOCK_N rows at a time with
    an online softmax (:func:`_fwd_block`); writes Out and Lse."""
    EVEN_N: tl.constexpr = (N_ALIGN % BLOCK_M == 0) and (N_ALIGN % BLOCK_N == 0)  # no sequence-tail masks
    pid_m, b, h = _block_and_head(N, H, BLOCK_M)
    offs_m = _rows(pid_m * BLOCK_M, BLOCK_M, ROW64)
    _fwd_block(QKV + b * stride_qkv_b + h * HEAD_DIM, Out + b * stride_out_b + h * HEAD_DIM,
               Lse + b * stride_lse_b + h * stride_lse_h + offs_m, QKV, offs_m, qk_scale, stride_qkv_n, stride_out_n,
               N, D, HEAD_DIM, D0, D1, D2, EVEN_N, BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64, False)


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DOut, Delta, stride_out_b, stride_out_n, stride_do_b, stride_do_n, stride_delta_b, stride_delta_h, N, H,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N_ALIGN: tl.constexpr,
    ROW64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Backward pre-pass: a program per (BLOCK_M rows, batch * head) writes Delta = rowsum(dO * O) (strides
    ``stride_delta_*``)."""
    EVEN_N: tl.constexpr = N_ALIGN % BLOCK_M == 0
    pid_m, b, h = _block_and_head(N, H, BLOCK_M)
    offs_m = _rows(pid_m * BLOCK_M, BLOCK_M, ROW64)
    _delta_block(Out + b * stride_out_b + h * HEAD_DIM, DOut + b * stride_do_b + h * HEAD_DIM,
                 Delta + b * stride_delta_b + h * stride_delta_h, offs_m, stride_out_n, stride_do_n, N, HEAD_DIM, D0,
                 D1, D2, EVEN_N)


@_autotuned("dkdv")
@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV, DOut, Lse, Delta, DQKV, qk_scale, sm_scale, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
    stride_lse_b, stride_lse_h, stride_dqkv_b, stride_dqkv_n, N, H, D, N_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N_ALIGN: tl.constexpr,
    ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Backward dK / dV: a program per (BLOCK_N key rows, batch * head) loops over the queries BLOCK_M rows at a
    time; writes the dk and dv thirds of DQKV."""
    EVEN_N: tl.constexpr = (N_ALIGN % BLOCK_M == 0) and (N_ALIGN % BLOCK_N == 0)
    pid_n, b, h = _block_and_head(N, H, BLOCK_N)
    offs_n = _rows(pid_n * BLOCK_N, BLOCK_N, ROW64)
    offs_m = tl.arange(0, BLOCK_M)
    _dkdv_block(QKV + b * stride_qkv_b + h * HEAD_DIM, DOut + b * stride_do_b + h * HEAD_DIM,
                DQKV + b * stride_dqkv_b + h * HEAD_DIM, Lse + b * stride_lse_b + h * stride_lse_h + offs_m,
                Delta + b * stride_lse_b + h * stride_lse_h + offs_m, offs_n, qk_scale, sm_scale, stride_qkv_n,
                stride_do_n, stride_dqkv_n, N, D, HEAD_DIM, D0, D1, D2, EVEN_N, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                ROW64, QKV, False)


@_autotuned("dq")
@triton.jit
def _attention_bwd_dq_kernel(
    QKV, DOut, Lse, Delta, DQKV, qk_scale, sm_scale, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
    stride_lse_b, stride_lse_h, stride_dqkv_b, stride_dqkv_n, N, H, D, N_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N_ALIGN: tl.constexpr,
    ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Backward dQ: a program per (BLOCK_M query rows, batch * head) loops over the keys BLOCK_N rows at a time;
    writes the dq third of DQKV."""
    EVEN_N: tl.constexpr = (N_ALIGN % BLOCK_M == 0) and (N_ALIGN % BLOCK_N == 0)
    pid_m, b, h = _block_and_head(N, H, BLOCK_M)
    offs_m = _rows(pid_m * BLOCK_M, BLOCK_M, ROW64)
    _dq_block(QKV + b * stride_qkv_b + h * HEAD_DIM, DOut + b * stride_do_b + h * HEAD_DIM,
              DQKV + b * stride_dqkv_b + h * HEAD_DIM, Lse + b * stride_lse_b + h * stride_lse_h + offs_m,
              Delta + b * stride_lse_b + h * stride_lse_h + offs_m, offs_m, qk_scale, sm_scale, stride_qkv_n,
              stride_do_n, stride_dqkv_n, N, D, HEAD_DIM, D0, D1, D2, EVEN_N, BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64,
              QKV, False)


@_autotuned("fused")
@triton.jit
def _attention_bwd_fused_kernel(
    QKV, Out, DOut, Lse, Delta, DQKV, qk_scale, sm_scale, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    stride_do_b, stride_do_n, stride_lse_b, stride_lse_h, stride_dqkv_b, stride_dqkv_n, N, H, D, N_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N_ALIGN: tl.constexpr,
    ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The whole attention backward of one (batch, head) in one program: delta = rowsum(dO * O) for every query
    block (into Delta, here a scratch read back after a barrier), then dK / dV key block by key block, then dQ query
    block by query block (the pre-pass's, dkdv kernel's and dq kernel's block functions, run in sequence); writes
    all of DQKV. One launch instead of three, and q / k / v / dO of a head are re-read from L2 by the program that
    just read them."""
    EVEN_N: tl.constexpr = (N_ALIGN % BLOCK_M == 0) and (N_ALIGN % BLOCK_N == 0)
    b, h = _batch_head(tl.program_id(0), H)
    q_base = QKV + b * stride_qkv_b + h * HEAD_DIM
    do_base = DOut + b * stride_do_b + h * HEAD_DIM
    dqkv_base = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    offs_m = _rows(0, BLOCK_M, ROW64)
    lse_ptrs = Lse + b * stride_lse_b + h * stride_lse_h + offs_m
    delta_ptrs = Delta + b * stride_lse_b + h * stride_lse_h + offs_m

    for start_m in range(0, N, BLOCK_M):
        _delta_block(Out + b * stride_out_b + h * HEAD_DIM, do_base, Delta + b * stride_lse_b + h * stride_lse_h,
                     start_m + offs_m, stride_out_n, stride_do_n, N, HEAD_DIM, D0, D1, D2, EVEN_N)
    tl.debug_barrier()  # every thread of the program sees every delta row before the loops read them

    for start_n in range(0, N, BLOCK_N):
        _dkdv_block(q_base, do_base, dqkv_base, lse_ptrs, delta_ptrs, _rows(start_n, BLOCK_N, ROW64), qk_scale,
                    sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n, N, D, HEAD_DIM, D0, D1, D2, EVEN_N, BLOCK_M,
                    BLOCK_N, INPUT_PRECISION, ROW64, QKV, False)

    for start_m in range(0, N, BLOCK_M):
        _dq_block(q_base, do_base, dqkv_base, lse_ptrs + start_m, delta_ptrs + start_m, start_m + offs_m, qk_scale,
                  sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n, N, D, HEAD_DIM, D0, D1, D2, EVEN_N, BLOCK_M,
                  BLOCK_N, INPUT_PRECISION, ROW64, QKV, False)


# ----------------------------------------------------------------------------------------------------------------
# sequence kernels: packed variable-length sequences (cu_seqlens) and padded batches with a key mask (key_valid)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(Seq, seq, S, PADDED: tl.constexpr):
    """(first row, length) of sequence ``seq``. Packed: rows Seq[seq] .. Seq[seq + 1] - 1 of the packed tensors
    (Seq = cu_seqlens), length 0 for seq >= S. Padded: rows 0 .. Seq[seq] - 1 of image ``seq`` (Seq = kv_end)."""
    if PADDED:
        start = seq * 0
        length = tl.load(Seq + seq)
    else:
        start = tl.load(Seq + seq, mask=seq < S, other=0)
        length = tl.load(Seq + seq + 1, mask=seq < S, other=0) - start
    return start, length


@triton.jit
def _seq_block(Seq, S, N, BLOCK: tl.constexpr, PADDED: tl.constexpr, SEQ_CHUNK: tl.constexpr):
    """(sequence, row block, first row, length) of this program (axis 0) in a :func:`seq_block_grid` launch.

    Padded: the grid is every image's ``cdiv(N, BLOCK)`` blocks (block fastest); a block at or past the image's
    kv_end gets length <= its first row, and the caller exits. Packed: the grid is an upper bound on the total
    ``sum_s cdiv(len_s, BLOCK)``; the blocks are numbered sequence by sequence, so program ``pid`` belongs to the
    sequence s with ``c_s <= pid < c_{s+1}`` (c: the running sum of the blocks per sequence, computed here from
    cu_seqlens SEQ_CHUNK sequences at a time with tl.cumsum; s = how many c_{s+1} are <= pid). Past the total, s = S
    and the length is 0. O(S) scalar work per program, no host-side maximum length."""
    pid = tl.program_id(0)
    if PADDED:
        num_blocks = tl.cdiv(N, BLOCK)
        seq = pid // num_blocks
        blk = pid - seq * num_blocks
    else:
        seq = pid * 0
        before = pid * 0  # blocks of the sequences before ``seq``
        carry = pid * 0
        for c in range(0, S, SEQ_CHUNK):
            offs = c + tl.arange(0, SEQ_CHUNK)
            lo = tl.load(Seq + offs, mask=offs < S, other=0)
            hi = tl.load(Seq + offs + 1, mask=offs < S, other=0)
            ends = carry + tl.cumsum((hi - lo + BLOCK - 1) // BLOCK, 0)  # c_{s+1}; padding entries repeat the total
            done = ends <= pid
            seq += tl.sum(done.to(tl.int32), 0)
            before = tl.maximum(before, tl.max(tl.where(done, ends, 0), 0))
            carry = tl.max(ends, 0)
        blk = pid - before
    start, length = _seq_bounds(Seq, seq, S, PADDED)
    return seq.to(tl.int64), blk, start.to(tl.int64), length


@_autotuned("fwd", "attention.seq_fwd", SEQ_KEY, seq=True)
@triton.jit
def _attention_seq_fwd_kernel(
    QKV, Out, Lse, Seq, Valid, qk_scale, stride_qkv_s, stride_qkv_n, stride_out_s, stride_out_n, stride_lse_s,
    stride_lse_h, stride_valid_s, S, N, D, N_BUCKET, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, PADDED: tl.constexpr, SEQ_CHUNK: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Forward over sequences: a program per (BLOCK_M query rows of one sequence, head) (:func:`_seq_block`; the
    head on axis 1) runs :func:`_fwd_block` over that sequence's keys only; blocks past the sequence exit at once.
    Padded: the key mask of Valid, and the loop bound kv_end."""
    seq, blk, start, length = _seq_block(Seq, S, N, BLOCK_M, PADDED, SEQ_CHUNK)
    if blk * BLOCK_M >= length:
        return
    h = tl.program_id(1)
    offs_m = _rows(blk * BLOCK_M, BLOCK_M, ROW64)
    _fwd_block(QKV + seq * stride_qkv_s + start * stride_qkv_n + h * HEAD_DIM,
               Out + seq * stride_out_s + start * stride_out_n + h * HEAD_DIM,
               Lse + seq * stride_lse_s + h * stride_lse_h + start + offs_m, Valid + seq * stride_valid_s, offs_m,
               qk_scale, stride_qkv_n, stride_out_n, length, D, HEAD_DIM, D0, D1, D2, False, BLOCK_M, BLOCK_N,
               INPUT_PRECISION, ROW64, PADDED)


@_autotuned("dkdv", "attention.seq_dkdv", SEQ_KEY, seq=True)
@triton.jit
def _attention_seq_dkdv_kernel(
    QKV, DOut, Lse, Delta, DQKV, Seq, Valid, qk_scale, sm_scale, stride_qkv_s, stride_qkv_n, stride_do_s,
    stride_do_n, stride_lse_s, stride_lse_h, stride_dqkv_s, stride_dqkv_n, stride_valid_s, S, N, D, N_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PADDED: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Backward dK / dV over sequences: a program per (BLOCK_N key rows of one sequence, head) runs
    :func:`_dkdv_block` over that sequence's queries."""
    seq, blk, start, length = _seq_block(Seq, S, N, BLOCK_N, PADDED, SEQ_CHUNK)
    if blk * BLOCK_N >= length:
        return
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    row_lse = seq * stride_lse_s + h * stride_lse_h + start + offs_m
    _dkdv_block(QKV + seq * stride_qkv_s + start * stride_qkv_n + h * HEAD_DIM,
                DOut + seq * stride_do_s + start * stride_do_n + h * HEAD_DIM,
                DQKV + seq * stride_dqkv_s + start * stride_dqkv_n + h * HEAD_DIM, Lse + row_lse, Delta + row_lse,
                _rows(blk * BLOCK_N, BLOCK_N, ROW64), qk_scale, sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n,
                length, D, HEAD_DIM, D0, D1, D2, False, BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64,
                Valid + seq * stride_valid_s, PADDED)


@_autotuned("dq", "attention.seq_dq", SEQ_KEY, seq=True)
@triton.jit
def _attention_seq_dq_kernel(
    QKV, DOut, Lse, Delta, DQKV, Seq, Valid, qk_scale, sm_scale, stride_qkv_s, stride_qkv_n, stride_do_s,
    stride_do_n, stride_lse_s, stride_lse_h, stride_dqkv_s, stride_dqkv_n, stride_valid_s, S, N, D, N_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PADDED: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Backward dQ over sequences: a program per (BLOCK_M query rows of one sequence, head) runs :func:`_dq_block`
    over that sequence's keys."""
    seq, blk, start, length = _seq_block(Seq, S, N, BLOCK_M, PADDED, SEQ_CHUNK)
    if blk * BLOCK_M >= length:
        return
    h = tl.program_id(1)
    offs_m = _rows(blk * BLOCK_M, BLOCK_M, ROW64)
    row_lse = seq * stride_lse_s + h * stride_lse_h + start + offs_m
    _dq_block(QKV + seq * stride_qkv_s + start * stride_qkv_n + h * HEAD_DIM,
              DOut + seq * stride_do_s + start * stride_do_n + h * HEAD_DIM,
              DQKV + seq * stride_dqkv_s + start * stride_dqkv_n + h * HEAD_DIM, Lse + row_lse, Delta + row_lse,
              offs_m, qk_scale, sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n, length, D, HEAD_DIM, D0, D1, D2,
              False, BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64, Valid + seq * stride_valid_s, PADDED)


@_autotuned("fused", "attention.seq_fused", SEQ_KEY, seq=True)
@triton.jit
def _attention_seq_bwd_fused_kernel(
    QKV, Out, DOut, Lse, Delta, DQKV, Seq, Valid, qk_scale, sm_scale, stride_qkv_s, stride_qkv_n, stride_out_s,
    stride_out_n, stride_do_s, stride_do_n, stride_lse_s, stride_lse_h, stride_dqkv_s, stride_dqkv_n,
    stride_valid_s, S, N, D, N_BUCKET, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, PADDED: tl.constexpr, SEQ_CHUNK: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The whole backward of one (sequence, head) in one program (grid (S, H)), as
    :func:`_attention_bwd_fused_kernel` does for a (batch, head), with every loop bounded by the sequence's own
    length (padded: kv_end)."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    start, length = _seq_bounds(Seq, seq, S, PADDED)
    seq = seq.to(tl.int64)
    start = start.to(tl.int64)
    q_base = QKV + seq * stride_qkv_s + start * stride_qkv_n + h * HEAD_DIM
    do_base = DOut + seq * stride_do_s + start * stride_do_n + h * HEAD_DIM
    dqkv_base = DQKV + seq * stride_dqkv_s + start * stride_dqkv_n + h * HEAD_DIM
    valid_base = Valid + seq * stride_valid_s
    offs_m = _rows(0, BLOCK_M, ROW64)
    row0 = seq * stride_lse_s + h * stride_lse_h + start
    lse_ptrs = Lse + row0 + offs_m
    delta_ptrs = Delta + row0 + offs_m

    for start_m in range(0, length, BLOCK_M):
        _delta_block(Out + seq * stride_out_s + start * stride_out_n + h * HEAD_DIM, do_base, Delta + row0,
                     start_m + offs_m, stride_out_n, stride_do_n, length, HEAD_DIM, D0, D1, D2, False)
    tl.debug_barrier()  # every thread of the program sees every delta row before the loops read them

    for start_n in range(0, length, BLOCK_N):
        _dkdv_block(q_base, do_base, dqkv_base, lse_ptrs, delta_ptrs, _rows(start_n, BLOCK_N, ROW64), qk_scale,
                    sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n, length, D, HEAD_DIM, D0, D1, D2, False,
                    BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64, valid_base, PADDED)

    for start_m in range(0, length, BLOCK_M):
        _dq_block(q_base, do_base, dqkv_base, lse_ptrs + start_m, delta_ptrs + start_m, start_m + offs_m, qk_scale,
                  sm_scale, stride_qkv_n, stride_do_n, stride_dqkv_n, length, D, HEAD_DIM, D0, D1, D2, False,
                  BLOCK_M, BLOCK_N, INPUT_PRECISION, ROW64, valid_base, PADDED)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
MAX_GRID_X = 2**31 - 1  # CUDA's limit on gridDim.x (gridDim.y / z: 65,535, which B * H exceeds in training)


def block_head_grid(B: int, H: int, N: int, block: int) -> tuple[int]:
    """Grid of the kernels with a program per (row block of ``block`` rows, batch * head): forward, delta pre-pass,
    dK / dV and dQ. One axis of ``cdiv(N, block) * B * H`` programs, decoded in the kernel by ``_block_and_head``
    (row block fastest). B * H is not a grid axis of its own: CUDA caps axes 1 and 2 at 65,535, which
    ViT-L/16 (16 heads) passes from batch 4096 (the same limit as triton-lang/triton#3299).

    Raises:
        ValueError: more than 2**31 - 1 programs (far beyond any tensor that fits a GPU)."""
    n = triton.cdiv(N, block) * B * H
    if n > MAX_GRID_X:
        raise ValueError(f"attention launch needs {n} programs (B={B}, H={H}, N={N}, {block}-row blocks); CUDA allows "
                         f"at most {MAX_GRID_X}")
    return (n,)


def head_grid(B: int, H: int) -> tuple[int]:
    """Grid of the one-program-per-(batch, head) backward: (B * H,), on axis 0 for the reason given in
    :func:`block_head_grid`.

    Raises:
        ValueError: B * H > 2**31 - 1."""
    if B * H > MAX_GRID_X:
        raise ValueError(f"attention backward needs B * H = {B * H} programs (B={B}, H={H}); CUDA allows at most "
                         f"{MAX_GRID_X}")
    return (B * H,)


def needs_row64(N: int, *tensors: torch.Tensor) -> bool:
    """Whether a launch over N rows of these (B, N, width) tensors needs int64 row offsets (the kernels' ROW64):
    the offset of some last row's last element, ``(N - 1) * stride(1) + width - 1``, exceeds 2**31 - 1 (Triton
    forms ``row * stride_n + column`` in int32 when both factors fit in int32). Batch offsets are int64 in every
    case (``b`` is widened in the kernels)."""
    return any((N - 1) * t.stride(1) + t.shape[2] - 1 > 2**31 - 1 for t in tensors)


def _tiles(N: int) -> dict:
    """Launch keyword arguments for the autotuned kernels: none on a GPU (the autotuner picks), the fixed
    interpreter config otherwise."""
    return {} if AUTOTUNE else _interpreter_config(N)


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
    d0, d1, d2 = head_dim_chunks(head_dim)
    _launch.launch(
        _attention_fwd_kernel, lambda meta: block_head_grid(B, num_heads, N, meta["BLOCK_M"]),
        qkv, out, lse, float(scale) * LOG2E,
        qkv.stride(0), qkv.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        N, num_heads, D, n_bucket(N),
        HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2, N_ALIGN=n_align(N), ROW64=needs_row64(N, qkv, out),
        INPUT_PRECISION=dot_precision(qkv.dtype),
        **_tiles(N),
    )
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                  scale: float, fused: bool | None = None) -> torch.Tensor:
    """Backward attention: d(qkv) from the output gradient and what the forward saved.

    Two launch plans, same arithmetic (the same block loops, in the same order per output tile, so the same
    results): *split* -- the delta pre-pass, then one program per (key block, batch * head) for dK / dV and one per
    (query block, batch * head) for dQ (three launches, FlashAttention-2's partition); *fused* -- one program per
    (batch, head) running the three loops in sequence (delta, dK / dV, dQ; one launch; re-reads hit L2). Fused needs
    enough heads to fill the GPU and a tile that fits the registers: it is taken when B * H >=
    ``FUSED_BWD_MIN_HEADS`` (ViT training batches: ViT-B/16 at batch 64 has 768) and :func:`fused_bwd_builds` (fp16
    / bf16, head_dim <= 64), split otherwise (small batches, ViT-H's head_dim 80, fp32).

    Args:
        dout: (B, N, D) gradient of ``out``, qkv's dtype, column stride 1.
        qkv: (B, N, 3 * D) forward input. out: (B, N, D) forward output. lse: (B, H, N) fp32 from the forward.
        num_heads: H. scale: the forward's softmax scale.
        fused: force a plan (True: fused, False: split); None: the rule above.

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
    d0, d1, d2 = head_dim_chunks(head_dim)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    chunks = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2, N_ALIGN=n_align(N),
                  ROW64=needs_row64(N, qkv, out, dout, dqkv))
    qk_scale = float(scale) * LOG2E
    if fused is None:  # the interpreter has no register budget: there the rule only asks for enough heads
        fused = B * num_heads >= FUSED_BWD_MIN_HEADS and (
            interpreter_enabled() or fused_bwd_builds(head_dim, qkv.dtype))
    if fused:
        delta = torch.empty_like(lse)  # scratch, (B, H, N) fp32 like lse (the kernel shares their strides)
        _launch.launch(
            _attention_bwd_fused_kernel, head_grid(B, num_heads),
            qkv, out, dout, lse, delta, dqkv, qk_scale, float(scale),
            qkv.stride(0), qkv.stride(1),
            out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1),
            lse.stride(0), lse.stride(1),
            dqkv.stride(0), dqkv.stride(1),
            N, num_heads, D, n_bucket(N),
            **chunks, INPUT_PRECISION=dot_precision(qkv.dtype), **_tiles(N),
        )
        return dqkv

    # The pre-pass is memory-bound (one multiply-add per element read): one fixed tile, not autotuned.
    pre_m = 16 if N <= 16 else 32 if N <= 32 else 64
    delta = torch.empty_like(lse)
    _launch.launch(
        _attention_bwd_preprocess_kernel, block_head_grid(B, num_heads, N, pre_m),
        out, dout, delta,
        out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1),
        delta.stride(0), delta.stride(1),
        N, num_heads,
        **chunks, BLOCK_M=pre_m,
    )
    assert delta.stride() == lse.stride()  # the bwd kernels share stride_lse_* between Lse and Delta

    # Every element of dqkv is written: dq by the dq kernel, dk and dv by the dkdv kernel (all heads, all rows).
    args = (
        qkv, dout, lse, delta, dqkv, qk_scale, float(scale),
        qkv.stride(0), qkv.stride(1),
        dout.stride(0), dout.stride(1),
        lse.stride(0), lse.stride(1),
        dqkv.stride(0), dqkv.stride(1),
        N, num_heads, D, n_bucket(N),
    )
    meta = dict(**chunks, INPUT_PRECISION=dot_precision(qkv.dtype), **_tiles(N))
    _launch.launch(_attention_bwd_dkdv_kernel, lambda m: block_head_grid(B, num_heads, N, m["BLOCK_N"]), *args, **meta)
    _launch.launch(_attention_bwd_dq_kernel, lambda m: block_head_grid(B, num_heads, N, m["BLOCK_M"]), *args, **meta)
    return dqkv


# ---- sequence launchers: packed (cu_seqlens) and padded with a key mask (key_valid) ------------------------------
MAX_SEQ_CHUNK = 1024  # sequences per step of the in-kernel tile count (_seq_block): one register block


def seq_chunk(S: int) -> int:
    """SEQ_CHUNK for S packed sequences: the next power of two >= S (at least 16), at most MAX_SEQ_CHUNK (larger S
    loops); a constexpr, so only a change of this bucket recompiles."""
    return max(16, min(triton.next_power_of_2(S), MAX_SEQ_CHUNK))


def packed_blocks(T: int, S: int, block: int) -> int:
    """An upper bound on the row blocks of S packed sequences of T tokens in all, ``sum_s cdiv(len_s, block)``,
    from the shapes alone: ``cdiv(len, block) <= (len + block - 1) / block`` summed over s gives
    ``(T + S * (block - 1)) // block`` (at most S - 1 more than cdiv(T, block); the extra programs exit at once)."""
    return (T + S * (block - 1)) // block


def seq_block_grid(T_or_N: int, S: int, H: int, block: int, padded: bool) -> tuple[int, int]:
    """Grid of the sequence kernels with a program per (row block, head): axis 0 the row blocks
    (:func:`packed_blocks` of T tokens in S sequences; padded: S images x ``cdiv(N, block)``), axis 1 the H heads.

    Raises:
        ValueError: more than 2**31 - 1 blocks or 65,535 heads (CUDA's grid limits)."""
    n = S * triton.cdiv(T_or_N, block) if padded else packed_blocks(T_or_N, S, block)
    if n > MAX_GRID_X or H > 65535:
        raise ValueError(f"attention launch needs ({n}, {H}) programs; CUDA allows ({MAX_GRID_X}, 65535)")
    return (n, H)


def _seq_row64(rows: int, *tensors: torch.Tensor) -> bool:
    """ROW64 for the sequence kernels: some row offset ``row * stride(-2)`` within a sequence (rows < ``rows``)
    reaches 2**31 (see :func:`needs_row64`); sequence and start offsets are int64 regardless."""
    return any((rows - 1) * t.stride(-2) + t.shape[-1] - 1 > 2**31 - 1 for t in tensors)


def kv_end(key_valid: torch.Tensor) -> torch.Tensor:
    """(B,) int32: per image, the index of the last valid key + 1 (0 when none), computed on the device (no host
    sync): the key-loop bound of the padded kernels, and every row block at or past it is skipped."""
    N = key_valid.shape[1]
    pos = torch.arange(1, N + 1, device=key_valid.device, dtype=torch.int32)
    return (key_valid.to(torch.int32) * pos).amax(dim=1).to(torch.int32)


def _seq_setup(qkv: torch.Tensor, num_heads: int, seqs: torch.Tensor, key_valid: torch.Tensor | None):
    """Shared launch arguments of the sequence kernels: (S, N, head-dim constexprs, Valid, stride_valid_s)."""
    padded = key_valid is not None
    D = qkv.shape[-1] // 3
    head_dim = D // num_heads
    d0, d1, d2 = head_dim_chunks(head_dim)
    if padded:
        S, N = qkv.shape[0], qkv.shape[1]
        valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
        assert valid.stride(-1) == 1
        valid_args = (valid, valid.stride(0))
        bucket = n_bucket(N)
    else:
        S, N = seqs.numel() - 1, qkv.shape[0]
        valid_args = (seqs, 0)  # never read (PADDED is False)
        bucket = n_bucket(max(1, N // S))
    meta = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2, PADDED=padded, SEQ_CHUNK=seq_chunk(S))
    return S, N, D, bucket, valid_args, meta


def _seq_strides(t: torch.Tensor, padded: bool) -> tuple[int, int]:
    """(stride over sequences, stride over rows): a packed (T, width) tensor has no sequence stride (the start row
    places each sequence); a padded (B, N, width) one has its batch stride."""
    return (t.stride(0), t.stride(1)) if padded else (0, t.stride(0))


def attention_seq_fwd(qkv: torch.Tensor, num_heads: int, scale: float, cu_seqlens: torch.Tensor | None = None,
                      key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention over packed variable-length sequences (``cu_seqlens``) or a padded batch with a key mask
    (``key_valid``); exactly one of the two.

    Args:
        qkv: packed (T, 3 * D) with cu_seqlens (S + 1,) int32 (0 first, strictly increasing, T last); or padded
            (B, N, 3 * D) with key_valid (B, N) bool. Column stride 1; fp32 | fp16 | bf16 (validated by the op).
        num_heads: H. scale: softmax scale (> 0).

    Returns:
        out: (T, D) / (B, N, D), qkv's dtype (padded: rows of invalid tokens 0).
        lse: (H, T) / (B, H, N) fp32 log2-sum-exp2 (file header) for the backward; padded: 0 at the rows at or
        past the image's kv_end (not computed; no kernel reads them).

    The grid depends only on the shapes (T, S, H / B, N, H): no host read of the lengths (:func:`_seq_block`).
    """
    padded = key_valid is not None
    assert padded != (cu_seqlens is not None) and qkv.stride(-1) == 1
    D = qkv.shape[-1] // 3
    if padded:
        seqs = kv_end(key_valid)
        B, N = qkv.shape[:2]
        out = torch.zeros((B, N, D), device=qkv.device, dtype=qkv.dtype)  # rows past kv_end stay 0
        # rows past kv_end are never computed; zeros keep the op's outputs defined (fakes / opcheck compare them)
        lse = torch.zeros((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    else:
        seqs = cu_seqlens
        out = torch.empty((qkv.shape[0], D), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((num_heads, qkv.shape[0]), device=qkv.device, dtype=torch.float32)
    S, N, D, bucket, valid_args, meta = _seq_setup(qkv, num_heads, seqs, key_valid)
    if S == 0:
        return out, lse
    rows = N if padded else qkv.shape[0]
    _launch.launch(
        _attention_seq_fwd_kernel, lambda m: seq_block_grid(N, S, num_heads, m["BLOCK_M"], padded),
        qkv, out, lse, seqs, valid_args[0], float(scale) * LOG2E,
        *_seq_strides(qkv, padded), *_seq_strides(out, padded),
        lse.stride(0) if padded else 0, lse.stride(-2),
        valid_args[1], S, N, D, bucket,
        **meta, ROW64=_seq_row64(rows, qkv, out), INPUT_PRECISION=dot_precision(qkv.dtype),
        **_seq_tiles(bucket),
    )
    return out, lse


def _seq_tiles(bucket: int) -> dict:
    """:func:`_tiles` of the sequence kernels: the interpreter's tile from the average length's bucket."""
    return {} if AUTOTUNE else _interpreter_config(bucket)


def attention_seq_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                      scale: float, cu_seqlens: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                      fused: bool | None = None) -> torch.Tensor:
    """Backward of :func:`attention_seq_fwd`: d(qkv) in qkv's packed / padded layout (padded: rows of invalid
    tokens 0).

    Plans as :func:`attention_bwd`, with sequences for images: *fused* (one program per (sequence, head), grid (S,
    H)) when ``S * H >= FUSED_BWD_MIN_HEADS`` and :func:`fused_bwd_builds` -- S is static (the shape of cu_seqlens /
    the batch), so the plan never depends on the lengths --, else *split* (delta pre-pass over all rows, then the dK
    / dV and dQ kernels over the packed row blocks). Padded: dout's rows of invalid tokens are zeroed first (those
    outputs are constant 0, so their gradient must not reach q, k or v).

    Args:
        dout: gradient of out, out's shape, qkv's dtype, column stride 1. qkv, out, lse: as the forward took /
            returned them. num_heads, scale: the forward's. cu_seqlens / key_valid: the forward's (one of them).
        fused: force a plan (True / False); None: the rule above.

    Returns:
        dqkv: qkv's shape, contiguous, qkv's dtype.
    """
    padded = key_valid is not None
    assert padded != (cu_seqlens is not None)
    assert qkv.stride(-1) == 1 and out.stride(-1) == 1 and dout.stride(-1) == 1 and lse.stride(-1) == 1
    if padded:
        seqs = kv_end(key_valid)
        dout = dout * key_valid[..., None].to(dout.dtype)
        dqkv = torch.zeros_like(qkv, memory_format=torch.contiguous_format)  # rows past kv_end stay 0
    else:
        seqs = cu_seqlens
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    S, N, D, bucket, valid_args, meta = _seq_setup(qkv, num_heads, seqs, key_valid)
    if S == 0:
        return dqkv
    rows = N if padded else qkv.shape[0]
    meta.update(ROW64=_seq_row64(rows, qkv, out, dout, dqkv), INPUT_PRECISION=dot_precision(qkv.dtype),
                **_seq_tiles(bucket))
    lse_strides = (lse.stride(0) if padded else 0, lse.stride(-2))
    qk_scale = float(scale) * LOG2E
    delta = torch.empty_like(lse)
    if fused is None:  # the interpreter has no register budget: there the rule only asks for enough heads
        fused = S * num_heads >= FUSED_BWD_MIN_HEADS and (
            interpreter_enabled() or fused_bwd_builds(meta["HEAD_DIM"], qkv.dtype))
    if fused:
        _launch.launch(
            _attention_seq_bwd_fused_kernel, (S, num_heads),
            qkv, out, dout, lse, delta, dqkv, seqs, valid_args[0], qk_scale, float(scale),
            *_seq_strides(qkv, padded), *_seq_strides(out, padded), *_seq_strides(dout, padded), *lse_strides,
            *_seq_strides(dqkv, padded), valid_args[1], S, N, D, bucket, **meta,
        )
        return dqkv

    # The dense pre-pass over all rows: delta needs no sequence bounds (a packed (T, D) is one "image" of T rows).
    B3, N3 = (qkv.shape[0], qkv.shape[1]) if padded else (1, qkv.shape[0])
    out3, dout3 = (out, dout) if padded else (out.unsqueeze(0), dout.unsqueeze(0))
    delta3 = delta if padded else delta.unsqueeze(0)
    pre_m = 16 if N3 <= 16 else 32 if N3 <= 32 else 64
    _launch.launch(
        _attention_bwd_preprocess_kernel, block_head_grid(B3, num_heads, N3, pre_m),
        out3, dout3, delta3, out3.stride(0), out3.stride(1), dout3.stride(0), dout3.stride(1),
        delta3.stride(0), delta3.stride(1), N3, num_heads,
        HEAD_DIM=meta["HEAD_DIM"], D0=meta["D0"], D1=meta["D1"], D2=meta["D2"], N_ALIGN=n_align(N3),
        ROW64=needs_row64(N3, out3, dout3), BLOCK_M=pre_m,
    )
    assert delta.stride() == lse.stride()  # the bwd kernels share the lse strides between Lse and Delta
    args = (qkv, dout, lse, delta, dqkv, seqs, valid_args[0], qk_scale, float(scale),
            *_seq_strides(qkv, padded), *_seq_strides(dout, padded), *lse_strides, *_seq_strides(dqkv, padded),
            valid_args[1], S, N, D, bucket)
    _launch.launch(_attention_seq_dkdv_kernel, lambda m: seq_block_grid(N, S, num_heads, m["BLOCK_N"], padded),
                   *args, **meta)
    _launch.launch(_attention_seq_dq_kernel, lambda m: seq_block_grid(N, S, num_heads, m["BLOCK_M"], padded),
                   *args, **meta)
    return dqkv
