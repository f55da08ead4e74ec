"""The public differentiable attention op: ``attention(qkv, num_heads)`` on the packed qkv Linear output.

Input checks -> backend choice -> ``torch.library`` custom ops (``fastvit::attention_fwd`` /
``fastvit::attention_bwd``; with ``cu_seqlens`` ``fastvit::attention_varlen_fwd`` / ``_bwd``; with ``key_valid``
``fastvit::attention_masked_fwd`` / ``_bwd``; each with a fake for torch.compile, autograd on the forward). The Triton kernels live
in :mod:`fastvit_kernels.kernels.attention` and are imported lazily, on the first Triton launch, so
``import fastvit_kernels`` never imports triton. The eager spec is :func:`fastvit_kernels.reference.attention_ref`.

Algorithm: FlashAttention-2 (Dao, 2023); see the kernel file's header for numerics and caveats.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch

from .. import reference
from .._checks import autocast_inputs, check_tensor, check_triton_dtype
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import resolve_backend
from ._instrument import instrumented

MAX_HEAD_DIM = 128  # head_dim must be a multiple of 8 and at most this (BLOCK_D <= 128 keeps the tiles in registers)


# ----------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------
@fastvit_op("fastvit::attention_fwd", mutates_args=())
@launches_on_input_device
def _attention_fwd_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward of :func:`attention`: qkv (B, N, 3 * D) -> (out (B, N, D) in qkv's dtype, lse (B, H, N) fp32
    log-sum-exp of the scaled scores in log2 units); lse is kept for the backward and not differentiable."""
    from ..kernels.attention import attention_fwd

    return attention_fwd(qkv, num_heads, scale)


@_attention_fwd_op.register_fake
def _(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, three_d = qkv.shape
    out = qkv.new_empty((B, N, three_d // 3))
    lse = qkv.new_empty((B, num_heads, N), dtype=torch.float32)
    return out, lse


@fastvit_op("fastvit::attention_bwd", mutates_args=())
@launches_on_input_device
def _attention_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                      scale: float) -> torch.Tensor:
    """Triton backward: d(qkv) (B, N, 3 * D), contiguous, qkv's dtype, same packed layout as qkv."""
    from ..kernels.attention import attention_bwd

    return attention_bwd(dout, qkv, out, lse, num_heads, scale)


@_attention_bwd_op.register_fake
def _(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
      scale: float) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _attention_setup_context(ctx, inputs, output) -> None:
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient tensor for the unused lse output


def _attention_backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
    if grad_out is None:
        return None, None, None
    qkv, out, lse = ctx.saved_tensors
    # Grads may arrive non-contiguous or expanded (stride 0, e.g. from out.sum().backward()); the kernels need a
    # dense (B, N, D) with column stride 1. lse is non-differentiable: grad_lse is ignored.
    dqkv = _attention_bwd_op(grad_out.contiguous(), qkv, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, None, None


torch.library.register_autograd("fastvit::attention_fwd", _attention_backward, setup_context=_attention_setup_context)


# packed variable-length sequences: qkv (T, 3 * D), cu_seqlens (S + 1,) int32
@fastvit_op("fastvit::attention_varlen_fwd", mutates_args=())
@launches_on_input_device
def _attention_varlen_fwd_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward of packed sequences: qkv (T, 3 * D), cu_seqlens (S + 1,) int32 -> (out (T, D) in qkv's
    dtype, lse (H, T) fp32 log2-sum-exp2, internal to the backward)."""
    from ..kernels.attention import attention_seq_fwd

    return attention_seq_fwd(qkv, num_heads, scale, cu_seqlens=cu_seqlens)


@_attention_varlen_fwd_op.register_fake
def _(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, three_d = qkv.shape
    return qkv.new_empty((T, three_d // 3)), qkv.new_empty((num_heads, T), dtype=torch.float32)


@fastvit_op("fastvit::attention_varlen_bwd", mutates_args=())
@launches_on_input_device
def _attention_varlen_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Triton backward of packed sequences: d(qkv) (T, 3 * D), contiguous, qkv's dtype."""
    from ..kernels.attention import attention_seq_bwd

    return attention_seq_bwd(dout, qkv, out, lse, num_heads, scale, cu_seqlens=cu_seqlens)


@_attention_varlen_bwd_op.register_fake
def _(dout: torch.Tensor, qkv: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
      num_heads: int, scale: float) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# padded batch with a key-padding mask: qkv (B, N, 3 * D), key_valid (B, N) bool
@fastvit_op("fastvit::attention_masked_fwd", mutates_args=())
@launches_on_input_device
def _attention_masked_fwd_op(qkv: torch.Tensor, key_valid: torch.Tensor, num_heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward of a padded batch: qkv (B, N, 3 * D), key_valid (B, N) bool -> (out (B, N, D), qkv's dtype,
    rows of invalid tokens 0; lse (B, H, N) fp32, internal to the backward)."""
    from ..kernels.attention import attention_seq_fwd

    return attention_seq_fwd(qkv, num_heads, scale, key_valid=key_valid)


@_attention_masked_fwd_op.register_fake
def _(qkv: torch.Tensor, key_valid: torch.Tensor, num_heads: int,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, three_d = qkv.shape
    return qkv.new_empty((B, N, three_d // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@fastvit_op("fastvit::attention_masked_bwd", mutates_args=())
@launches_on_input_device
def _attention_masked_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, key_valid: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Triton backward of a padded batch: d(qkv) (B, N, 3 * D), contiguous, qkv's dtype, rows of invalid tokens 0."""
    from ..kernels.attention import attention_seq_bwd

    return attention_seq_bwd(dout, qkv, out, lse, num_heads, scale, key_valid=key_valid)


@_attention_masked_bwd_op.register_fake
def _(dout: torch.Tensor, qkv: torch.Tensor, key_valid: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
      num_heads: int, scale: float) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _seq_setup_context(ctx, inputs, output) -> None:
    qkv, seqs, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, seqs, out, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _seq_backward(bwd_op):
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        if grad_out is None:
            return None, None, None, None
        qkv, seqs, out, lse = ctx.saved_tensors
        return bwd_op(grad_out.contiguous(), qkv, seqs, out, lse, ctx.num_heads, ctx.scale), None, None, None

    return backward


torch.library.register_autograd("fastvit::attention_varlen_fwd", _seq_backward(_attention_varlen_bwd_op),
                                setup_context=_seq_setup_context)
torch.library.register_autograd("fastvit::attention_masked_fwd", _seq_backward(_attention_masked_bwd_op),
                                setup_context=_seq_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------------
def check_heads(width: int, num_heads, scale, where: str, got: tuple, groups: int = 1) -> tuple[int, float]:
    """Validate the heads of an attention whose input's last dim ``width`` is ``groups`` * D (qkv: 3 * D; the
    block input: D). ``where`` / ``got`` name the input and its shape in messages. Returns (num_heads as an int,
    scale as a float; default ``head_dim ** -0.5``).

    Raises:
        TypeError: num_heads is not an int; scale is not a real number (or None).
        ValueError: num_heads < 1; width not groups * D with D divisible by num_heads; head_dim not a multiple of 8
            in [8, 128]; scale not positive and finite.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads must be an int; got {type(num_heads).__name__} {num_heads!r}")
    num_heads = int(num_heads)
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive; got {num_heads}")
    if width % (groups * num_heads):
        raise ValueError(f"{where} with D divisible by num_heads={num_heads}; got {got}")
    head_dim = width // groups // num_heads
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim = D / num_heads must be a multiple of 8 in [8, {MAX_HEAD_DIM}]; got head_dim={head_dim} "
            f"({got}, num_heads={num_heads})"
        )
    if scale is None:
        return num_heads, head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None; got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not 0 < scale < math.inf:  # also false for NaN; no math.isfinite: Dynamo may pass a SymFloat
        raise ValueError(f"scale must be positive and finite; got {scale}")
    return num_heads, scale


@instrumented("attention")
def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None, *,
              cu_seqlens: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Multi-head softmax attention on the packed output of a ViT's qkv Linear.

    ``out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h]``, no mask, no dropout; the same
    result as :func:`fastvit_kernels.reference.attention_ref` (timm ``Attention`` between ``qkv`` and ``proj``).

    Args:
        qkv: (B, N, 3 * H * head_dim), laid out as (B, N, 3, H, head_dim) like timm's qkv Linear output;
            fp32 | fp16 | bf16 (bf16 not under the CPU Triton interpreter). Any strides; copied only when the last
            dim is not contiguous. Under ``torch.autocast`` it is cast to the autocast dtype.
        num_heads: H, a positive int.
        scale: softmax scale, positive and finite; default ``head_dim ** -0.5``.
        cu_seqlens: packed variable-length sequences (NaViT / NaFlex): qkv is (T, 3 * D), all sequences' tokens
            back to back, and cu_seqlens (S + 1,) int32 on qkv's device gives their bounds (sequence s = rows
            cu_seqlens[s]:cu_seqlens[s+1]; 0 first, strictly increasing, T last). Each sequence attends only to
            itself (:func:`fastvit_kernels.reference.attention_varlen_ref`). No host-side maximum length and no
            device-to-host sync on the launch path (the eager value check aside): under ``torch.compile`` the graph
            depends on T and S only.
        key_valid: (B, N) bool, a key-padding mask for a padded batch (timm NaFlex's ``patch_valid`` with the
            prefix tokens prepended): queries attend only to valid keys; the output rows of invalid tokens are
            zero, as are their d(qkv) rows (:func:`fastvit_kernels.reference.attention_masked_ref`); any pattern,
            with the work bounded by each image's last valid key. Not with cu_seqlens.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | None (see :func:`fastvit_kernels.backend.resolve_backend`).

    Returns:
        out: (B, N, H * head_dim) ((T, H * head_dim) with cu_seqlens), qkv's dtype, heads concatenated (head h
        at columns h * head_dim), ready for the output projection. Differentiable with respect to qkv.

    Raises:
        TypeError: qkv is not a floating tensor; num_heads is not an int; scale is not a real number; bf16 qkv on
            the CPU Triton path; cu_seqlens not an int32 tensor; key_valid not a bool tensor.
        ValueError: qkv is not 3-D (2-D with cu_seqlens); N < 1; cu_seqlens not 1-D with at least 2 entries,
            on another device, or (checked in eager mode, one host read) not 0-first, strictly increasing, T-last;
            key_valid not a (B, N) bool tensor on qkv's device; both cu_seqlens and key_valid given; the last dim
            is not 3 * D with D divisible by num_heads; num_heads < 1; head_dim is not a multiple of 8 or exceeds
            128; scale is not positive and finite; a bad backend name.
        RuntimeError: backend='triton' where Triton cannot run (see resolve_backend).

    Algorithm (Triton path): FlashAttention-2 (T. Dao, 2023): tiled online softmax in fp32 with exp2, log-sum-exp
    saved for a recompute backward; deterministic (no atomics); its variable-length form for cu_seqlens, with the
    tile schedule computed in the kernel (docs/design.md, "Packed variable-length attention"). See
    :mod:`fastvit_kernels.kernels.attention`.
    """
    check_tensor("qkv", qkv)
    (qkv,) = autocast_inputs(qkv)
    if cu_seqlens is not None:
        if key_valid is not None:
            raise ValueError("cu_seqlens (packed sequences) and key_valid (padded batch) are exclusive; got both")
        return _attention_varlen(qkv, cu_seqlens, num_heads, scale, backend)
    if key_valid is not None:
        return _attention_masked(qkv, key_valid, num_heads, scale, backend)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be a 3-D tensor (B, N, 3*D); got {qkv.dim()}-D with shape {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    if N < 1:
        raise ValueError(f"qkv must have at least one token (N >= 1); got shape {tuple(qkv.shape)}")
    num_heads, scale = check_heads(three_d, num_heads, scale, "qkv must be (B, N, 3*D)", tuple(qkv.shape), groups=3)

    if resolve_backend(qkv.device, backend) == "torch":
        return reference.attention_ref(qkv, num_heads, scale)
    check_triton_dtype("qkv", qkv)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out, _lse = _attention_fwd_op(qkv, num_heads, scale)
    return out


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, name: str = "cu_seqlens") -> int:
    """Validate packed-sequence bounds before any launch; returns S, the number of sequences.

    Shape, dtype and device are always checked; the values (0 first, strictly increasing, ``total`` last) need one
    host read, so they are checked in eager mode only (once per tensor: a tensor checked before, not written in place
    since, is not read again), not while ``torch.compile`` traces (no graph break), nor on
    the "meta" device (no values; the AOT grid trace). Under ``torch.compile`` the values are the caller's contract:
    bounds outside [0, T] would make the kernels read and write outside the tensors.

    Raises:
        TypeError: not a tensor, or not int32.
        ValueError: not 1-D with at least 2 entries; on another device than the tokens; bad values (eager).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (S + 1,); got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with S + 1 >= 2 entries; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on the tokens' device {device}; got {cu_seqlens.device}")
    if not torch.compiler.is_compiling() and cu_seqlens.device.type != "meta":  # meta tensors have no values
        if not _validated_before(cu_seqlens, total):
            v = cu_seqlens.tolist()
            if v[0] != 0 or v[-1] != total or any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError(f"{name} must start at 0, increase strictly and end at T={total}; got "
                                 f"{v[:8]}{' ...' if len(v) > 8 else ''}")
            _remember_validated(cu_seqlens, total)
    return cu_seqlens.numel() - 1


# cu_seqlens tensors whose values passed the check, by id: (weak reference, version counter, T). A packed model
# passes the same tensor to every block's attention; re-reading it to the host would cost one device sync per
# block, so it is read once per tensor and again only after an in-place write (a new version).
_VALIDATED: dict[int, tuple] = {}


def _version_of(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter: checked on every call
        return None


def _validated_before(t: torch.Tensor, total: int) -> bool:
    entry = _VALIDATED.get(id(t))
    return (entry is not None and entry[0]() is t and entry[2] == total
            and entry[1] is not None and entry[1] == _version_of(t))


def _remember_validated(t: torch.Tensor, total: int) -> None:
    if len(_VALIDATED) > 64:  # drop entries whose tensor is gone
        for key in [k for k, e in _VALIDATED.items() if e[0]() is None]:
            del _VALIDATED[key]
    _VALIDATED[id(t)] = (weakref.ref(t), _version_of(t), total)


def _attention_varlen(qkv, cu_seqlens, num_heads, scale, backend) -> torch.Tensor:
    if qkv.dim() != 2:
        raise ValueError(f"with cu_seqlens, qkv must be 2-D (T, 3*D) packed tokens; got shape {tuple(qkv.shape)}")
    T, three_d = qkv.shape
    if T < 1:
        raise ValueError(f"qkv must have at least one token (T >= 1); got shape {tuple(qkv.shape)}")
    num_heads, scale = check_heads(three_d, num_heads, scale, "qkv must be (T, 3*D)", tuple(qkv.shape), groups=3)
    check_cu_seqlens(cu_seqlens, T, qkv.device)
    if resolve_backend(qkv.device, backend) == "torch":
        return _attention_varlen_eager(qkv, cu_seqlens, num_heads, scale)
    check_triton_dtype("qkv", qkv)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out, _lse = _attention_varlen_fwd_op(qkv, cu_seqlens.contiguous(), num_heads, scale)
    return out


def _attention_varlen_eager(qkv, cu_seqlens, num_heads, scale) -> torch.Tensor:
    """The torch path of the packed form: the sequences scattered into a zero-padded (S, L_max, 3 * D) batch, one
    batched :func:`fastvit_kernels.reference.attention_masked_ref`, the valid rows gathered back: the same values as
    the per-sequence loop of :func:`~fastvit_kernels.reference.attention_varlen_ref`, but a handful of batched ops
    (and autograd nodes) instead of a few per sequence. One host read (L_max)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    S, T = lengths.numel(), qkv.shape[0]
    seq = torch.repeat_interleave(torch.arange(S, device=qkv.device), lengths, output_size=T)
    pos = torch.arange(T, device=qkv.device) - cu[seq]
    L = int(lengths.max())
    padded = qkv.new_zeros(S, L, qkv.shape[1]).index_put((seq, pos), qkv)
    valid = torch.zeros(S, L, dtype=torch.bool, device=qkv.device).index_put((seq, pos), torch.tensor(True))
    return reference.attention_masked_ref(padded, valid, num_heads, scale)[seq, pos]


def _attention_masked(qkv, key_valid, num_heads, scale, backend) -> torch.Tensor:
    if qkv.dim() != 3:
        raise ValueError(f"with key_valid, qkv must be 3-D (B, N, 3*D); got shape {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    if N < 1:
        raise ValueError(f"qkv must have at least one token (N >= 1); got shape {tuple(qkv.shape)}")
    num_heads, scale = check_heads(three_d, num_heads, scale, "qkv must be (B, N, 3*D)", tuple(qkv.shape), groups=3)
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
        raise TypeError(f"key_valid must be a bool tensor (B, N); got "
                        f"{getattr(key_valid, 'dtype', type(key_valid).__name__)}")
    if tuple(key_valid.shape) != (B, N):
        raise ValueError(f"key_valid must be (B, N) = {(B, N)}; got {tuple(key_valid.shape)}")
    if key_valid.device != qkv.device:
        raise ValueError(f"key_valid must be on qkv's device {qkv.device}; got {key_valid.device}")
    if resolve_backend(qkv.device, backend) == "torch":
        return reference.attention_masked_ref(qkv, key_valid, num_heads, scale)
    check_triton_dtype("qkv", qkv)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out, _lse = _attention_masked_fwd_op(qkv, key_valid.contiguous(), num_heads, scale)
    return out


def attention_flops(B: int, N: int, H: int, head_dim: int) -> int:
    """Model FLOPs of attention's two matmuls over B images: ``4 * B * H * N^2 * head_dim``.

    Two matmuls per (image, head), ``S = Q K^T`` and ``O = P V``, each ``2 * N * N * head_dim`` FLOPs (2 per
    multiply-add); softmax and scaling are not counted (the "model FLOPs" of Chowdhery et al., PaLM 2022,
    appendix B). The backward counts 2x this (dP, dV, dQ, dK); the kernels' recomputation of S is not model FLOPs.
    Returns an int.
    """
    return 4 * B * H * N * N * head_dim


def attention_varlen_flops(seqlens: list[int], H: int, head_dim: int) -> int:
    """Model FLOPs of attention over packed sequences of lengths ``seqlens``: ``4 * H * head_dim * sum_s len_s^2``
    (:func:`attention_flops` per sequence; only real tokens, each sequence attending to itself). The key-padding
    form counts the same with ``seqlens`` = the valid tokens per image. Returns an int.

    Raises:
        ValueError: a negative length."""
    lengths = [int(n) for n in seqlens]
    if any(n < 0 for n in lengths):
        raise ValueError(f"seqlens must be non-negative; got {lengths[:8]}")
    return 4 * H * head_dim * sum(n * n for n in lengths)


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _attention_fwd_flop(qkv, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    B, N, three_d = qkv
    return attention_flops(B, N, num_heads, three_d // 3 // num_heads)


def _attention_bwd_flop(dout, qkv, out, lse, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: 2x forward (the kernels also recompute S = Q K^T, which
    # model FLOPs leave out; torch's own SDPA-backward formula counts it, the eager matmul backward does not)
    return 2 * _attention_fwd_flop(qkv, num_heads, scale)


# The varlen / masked formulas see only shapes, while the real count, sum_s len_s^2, depends on the lengths (data):
# the packed formulas assume S equal sequences of T / S tokens (T^2 / S in all: exact for equal lengths, otherwise a
# lower bound, since sum_s len_s^2 >= T^2 / S), the padded ones every token valid (an upper bound). Use
# attention_varlen_flops with the real lengths for exact figures.
def _attention_varlen_fwd_flop(qkv, cu_seqlens, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    T, three_d = qkv
    S = max(1, cu_seqlens[0] - 1)
    return 4 * num_heads * (three_d // 3 // num_heads) * T * T // S


def _attention_varlen_bwd_flop(dout, qkv, cu_seqlens, out, lse, num_heads, scale, *args, out_shape=None,
                               **kwargs) -> int:
    return 2 * _attention_varlen_fwd_flop(qkv, cu_seqlens, num_heads, scale)


def _attention_masked_fwd_flop(qkv, key_valid, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    return _attention_fwd_flop(qkv, num_heads, scale)


def _attention_masked_bwd_flop(dout, qkv, key_valid, out, lse, num_heads, scale, *args, out_shape=None,
                               **kwargs) -> int:
    return 2 * _attention_fwd_flop(qkv, num_heads, scale)


FLOP_FORMULAS = {"attention_fwd": _attention_fwd_flop, "attention_bwd": _attention_bwd_flop,
                 "attention_varlen_fwd": _attention_varlen_fwd_flop, "attention_varlen_bwd": _attention_varlen_bwd_flop,
                 "attention_masked_fwd": _attention_masked_fwd_flop, "attention_masked_bwd": _attention_masked_bwd_flop}
