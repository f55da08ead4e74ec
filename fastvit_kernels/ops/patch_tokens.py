"""The public differentiable patch embedding of already-patchified tokens: ``patch_embed_tokens``.

timm's NaFlex collator hands a model patches, not images: ``patches (B, N, P*P*C)`` with ``patch_coord`` and
``patch_valid``, and native-resolution packing gives ``(T, P*P*C)`` rows. This op embeds them with token selection
(``ids_keep``: only kept patches are embedded), mask-token substitution and per-token position rows; the eager spec
is :func:`fastvit_kernels.reference.patch_embed_tokens_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import autocast_inputs, check_tensor, check_triton_dtype
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import launches_recorded, resolve_backend
from ._instrument import instrumented


@fastvit_op("fastvit::patch_embed_tokens_fwd", mutates_args=())
@launches_on_input_device
def _patch_embed_tokens_fwd(patches: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            pos: Optional[torch.Tensor], pos_index: Optional[torch.Tensor],
                            ids_keep: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                            mask_token: Optional[torch.Tensor], prefix: Optional[torch.Tensor],
                            cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    from ..kernels.patch_tokens import patch_embed_tokens_fwd

    return patch_embed_tokens_fwd(patches, weight, bias, pos, pos_index, ids_keep, mask, mask_token, prefix,
                                  cu_seqlens)


def _out_shape(patches, weight, ids_keep, prefix, cu_seqlens) -> tuple:
    D = weight.shape[0]
    n_prefix = 0 if prefix is None else prefix.shape[0]
    if patches.dim() == 3:
        n_keep = patches.shape[1] if ids_keep is None else ids_keep.shape[1]
        return (patches.shape[0], n_prefix + n_keep, D)
    t_out = patches.shape[0] if ids_keep is None else ids_keep.shape[0]
    seqs = 0 if not n_prefix else cu_seqlens.shape[0] - 1
    return (t_out + seqs * n_prefix, D)


@_patch_embed_tokens_fwd.register_fake
def _(patches, weight, bias, pos, pos_index, ids_keep, mask, mask_token, prefix, cu_seqlens):
    return patches.new_empty(_out_shape(patches, weight, ids_keep, prefix, cu_seqlens))


@fastvit_op("fastvit::patch_embed_tokens_bwd", mutates_args=())
@launches_on_input_device
def _patch_embed_tokens_bwd(dout: torch.Tensor, patches: torch.Tensor, weight: torch.Tensor, pos_rows: int,
                            pos_index: Optional[torch.Tensor], ids_keep: Optional[torch.Tensor],
                            mask: Optional[torch.Tensor], n_prefix: int, cu_seqlens: Optional[torch.Tensor],
                            needs: list[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    from ..kernels.patch_tokens import patch_embed_tokens_bwd

    return patch_embed_tokens_bwd(dout, patches, weight, pos_rows, pos_index, ids_keep, mask, n_prefix, cu_seqlens,
                                  tuple(needs))


@_patch_embed_tokens_bwd.register_fake
def _(dout, patches, weight, pos_rows, pos_index, ids_keep, mask, n_prefix, cu_seqlens, needs):
    D, K = weight.shape
    need_x, need_w, need_b, need_pos, need_tok, need_pre = needs
    empty = dout.new_empty(0)
    return (patches.new_empty(patches.shape) if need_x else empty,
            weight.new_empty((D, K)) if need_w else empty,
            dout.new_empty((D,)) if need_b else empty,
            dout.new_empty((pos_rows, D)) if need_pos else empty,
            dout.new_empty((D,)) if need_tok else empty,
            dout.new_empty((n_prefix, D)) if need_pre else empty)


def _setup_context(ctx, inputs, output):
    patches, weight, bias, pos, pos_index, ids_keep, mask, mask_token, prefix, cu_seqlens = inputs
    ctx.save_for_backward(patches, weight, pos_index, ids_keep, mask, cu_seqlens)
    ctx.pos_rows = 0 if pos is None else pos.shape[0]
    ctx.n_prefix = 0 if prefix is None else prefix.shape[0]
    ctx.present = (bias is not None, pos is not None, mask_token is not None, prefix is not None)


def _backward(ctx, dout):
    patches, weight, pos_index, ids_keep, mask, cu_seqlens = ctx.saved_tensors
    has_bias, has_pos, has_tok, has_pre = ctx.present
    g = ctx.needs_input_grad
    needs = [bool(g[0]), bool(g[1]), has_bias and bool(g[2]), has_pos and bool(g[3]), has_tok and bool(g[7]),
             has_pre and bool(g[8])]
    grads = _patch_embed_tokens_bwd(dout.contiguous(), patches, weight, ctx.pos_rows, pos_index, ids_keep, mask,
                                    ctx.n_prefix, cu_seqlens, needs)
    dx, dw, db, dpos, dtok, dpre = (t if need else None for t, need in zip(grads, needs))
    return dx, dw, db, dpos, None, None, None, dtok, dpre, None


_patch_embed_tokens_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_index(name: str, t, leading: tuple, device, bound: int | None, low: int = 0) -> None:
    """An int64 index tensor of shape ``leading`` on ``device``; values in [low, bound) checked in eager mode (one
    host read; not while torch.compile traces)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor; got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on patches' device {device}; got {t.device}")
    if tuple(t.shape) != tuple(leading):
        raise ValueError(f"{name} must have shape {tuple(leading)}; got {tuple(t.shape)}")
    if bound is not None and t.numel() and t.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= bound:
            raise ValueError(f"{name} values must lie in [{low}, {bound}); got min {lo}, max {hi}")


@instrumented("patch_embed_tokens")
def patch_embed_tokens(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       pos: torch.Tensor | None = None, pos_index: torch.Tensor | None = None, *,
                       ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Embed pre-patchified tokens: ``where(mask, mask_token, patches[src] @ W^T + b) + pos[pos_index[src]]``,
    prefix rows first in each sequence (the semantics of :func:`fastvit_kernels.reference.patch_embed_tokens_ref`,
    which documents every argument).

    Args:
        patches: (B, N, K) (NaFlex collator form) or (T, K) packed, fp32 | fp16 | bf16 (bf16 on GPU only),
            K = P * P * C. weight: (D, K) (the projection ``nn.Linear(K, D)``); bias: (D,) or None.
        pos: (R, D) position rows or None; pos_index: int64 (B, N) / (T,), the pos row of each patch in [-1, R),
            -1 = no position (a padding patch); required with pos.
        ids_keep: int64 (B, N_keep) indices into each image's N patches / (T_keep,) into the T packed rows, in
            [0, N) / [0, T), any order (MAE's shuffled keep list), or None = keep all; the output follows its order.
        mask: bool (B, N_out) / (T_out,) over the output tokens (True: replaced by mask_token); mask_token: D
            elements ((D,), (1, D) or (1, 1, D)), required with mask and only with it.
        prefix: (n_prefix, D) rows (class / register tokens) first in every sequence, or None.
        cu_seqlens: (S + 1,) int32 over the T_out kept packed rows: 0 first, strictly increasing, T_out last;
            required with prefix in the 2-D form.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | None.

    Returns:
        (B, n_prefix + N_out, D) or (T_out + S * n_prefix, D), patches' dtype; differentiable with respect to
        patches, weight, bias, pos, mask_token and prefix. On the Triton path: one GEMM launch with the token
        selection, mask token, position rows and row placement fused (docs/design.md, "Token selection in the
        patch-embedding GEMM"), then one copy of the prefix rows; the backward is deterministic.

    Raises:
        TypeError: a non-floating tensor, an index that is not int64 (cu_seqlens: int32), a mask that is not bool;
            on the Triton path, parameters of another dtype than patches.
        ValueError: patches not 2-D / 3-D; a shape that does not match (prefix must be exactly (n_prefix, D));
            index values out of range (checked in eager mode before any launch); pos without pos_index (or the
            reverse); mask without mask_token (or the reverse); prefix in the 2-D form without cu_seqlens; bad
            cu_seqlens values; cu_seqlens with 3-D patches; a tensor on another device; meta tensors (outside the
            AOT recorder).
        RuntimeError: backend="triton" where Triton cannot run.

    Algorithm: Dosovitskiy et al. 2021 (patch embedding), Dehghani et al. 2023 (NaViT packing), He et al. 2022
    (MAE token selection), Zhou et al. 2022 (iBOT mask token).
    """
    check_tensor("patches", patches)
    check_tensor("weight", weight)
    patches, weight, bias, pos, mask_token, prefix = autocast_inputs(patches, weight, bias, pos, mask_token, prefix)
    if patches.dim() not in (2, 3):
        raise ValueError(f"patches must be (B, N, K) or (T, K); got shape {tuple(patches.shape)}")
    K = patches.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be (D, K={K}); got {tuple(weight.shape)}")
    D = weight.shape[0]
    lead = tuple(patches.shape[:-1])
    rows_in = patches.shape[-2]  # rows ids_keep indexes: N per image (3-D) or T (2-D)
    dev = patches.device
    for name, t, shape, what in (("bias", bias, (D,), f"(D={D},)"), ("pos", pos, (None, D), f"(R, D={D})"),
                                 ("prefix", prefix, (None, D), f"(n_prefix, D={D})")):
        if t is not None:
            check_tensor(name, t, shape, what)
    if mask_token is not None:  # timm / DINOv2 keep it as (1, D) or (1, 1, D): any shape of D elements
        check_tensor("mask_token", mask_token)
        if mask_token.numel() != D:
            raise ValueError(f"mask_token must have D={D} elements ((D,), (1, D) or (1, 1, D)); got shape "
                             f"{tuple(mask_token.shape)}")
        mask_token = mask_token.reshape(D)
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos), ("mask_token", mask_token),
                    ("prefix", prefix)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} must be on patches' device {dev}; got {t.device}")
    if dev.type == "meta" and not launches_recorded():
        raise ValueError("patches are on the meta device: patch_embed_tokens needs real tensors (the index values "
                         "are checked before any launch); meta tensors serve only the AOT recorder")
    if (pos is None) != (pos_index is None):
        raise ValueError("pos and pos_index go together; got only one of them")
    if pos is not None:
        _check_index("pos_index", pos_index, lead, dev, pos.shape[0], low=-1)
    out_lead = lead
    if ids_keep is not None:
        want = (lead[0], None) if patches.dim() == 3 else (None,)
        if isinstance(ids_keep, torch.Tensor) and (ids_keep.dim() != len(want) or (len(want) == 2 and
                                                                                    ids_keep.shape[0] != lead[0])):
            raise ValueError(f"ids_keep must be {'(B, N_keep)' if len(want) == 2 else '(T_keep,)'} for patches "
                             f"{tuple(patches.shape)}; got {tuple(ids_keep.shape)}")
        _check_index("ids_keep", ids_keep, tuple(ids_keep.shape) if isinstance(ids_keep, torch.Tensor) else (),
                     dev, rows_in)
        out_lead = tuple(ids_keep.shape)
    if mask is not None:
        if mask_token is None:
            raise ValueError("mask needs mask_token (D,)")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor; got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != out_lead:
            raise ValueError(f"mask must have the output tokens' shape {out_lead}; got {tuple(mask.shape)}")
        if mask.device != dev:
            raise ValueError(f"mask must be on patches' device {dev}; got {mask.device}")
    elif mask_token is not None:
        raise ValueError("mask_token given without mask (bool, the output tokens' shape)")
    if cu_seqlens is not None and patches.dim() == 3:
        raise ValueError("cu_seqlens is for packed (T, K) patches; got 3-D patches")
    if prefix is not None and patches.dim() == 2:
        if cu_seqlens is None:
            raise ValueError("prefix with packed (T, K) patches needs cu_seqlens (S + 1,) int32 over the kept rows")
        from .attention import check_cu_seqlens

        check_cu_seqlens(cu_seqlens, out_lead[0], dev)
    elif cu_seqlens is not None:
        from .attention import check_cu_seqlens

        check_cu_seqlens(cu_seqlens, out_lead[0], dev)
    if resolve_backend(dev, backend) == "torch":
        return reference.patch_embed_tokens_ref(patches, weight, bias, pos, pos_index, ids_keep=ids_keep, mask=mask,
                                                mask_token=mask_token, prefix=prefix, cu_seqlens=cu_seqlens)
    check_triton_dtype("patches", patches)
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos), ("mask_token", mask_token),
                    ("prefix", prefix)):
        if t is not None and t.dtype != patches.dtype:
            raise TypeError(f"{name} must have patches' dtype {patches.dtype} on the Triton path; got {t.dtype}")
    # the kernels read every parameter with unit strides (no-op copies when they already are contiguous)
    bias, pos, mask_token, prefix = (None if t is None else t.contiguous() for t in (bias, pos, mask_token, prefix))
    return _patch_embed_tokens_fwd(patches.contiguous(), weight.contiguous(), bias, pos, pos_index.contiguous()
                                   if pos_index is not None else None, ids_keep, mask, mask_token, prefix,
                                   cu_seqlens)


def patch_embed_tokens_flops(tokens: int, K: int, D: int) -> int:
    """Model FLOPs of embedding ``tokens`` kept patches of K values into D: ``2 * tokens * K * D`` (an int)."""
    return 2 * tokens * K * D


# FlopCounterMode formulas (tensor arguments arrive as shapes); registered by fastvit_kernels.ops
def _kept_tokens(patches, ids_keep) -> int:
    if ids_keep is not None:
        n = 1
        for d in ids_keep:
            n *= d
        return n
    return patches[0] * patches[1] if len(patches) == 3 else patches[0]


def _patch_embed_tokens_fwd_flop(patches, weight, bias=None, pos=None, pos_index=None, ids_keep=None, *args,
                                 out_shape=None, **kwargs) -> int:
    D, K = weight
    return patch_embed_tokens_flops(_kept_tokens(patches, ids_keep), K, D)


def _patch_embed_tokens_bwd_flop(dout, patches, weight, pos_rows=0, pos_index=None, ids_keep=None, mask=None,
                                 n_prefix=0, cu_seqlens=None, needs=(True, True), *args, out_shape=None,
                                 **kwargs) -> int:
    # the weight-gradient GEMM when the weight needs it, the patch-gradient GEMM when patches do
    D, K = weight
    one = patch_embed_tokens_flops(_kept_tokens(patches, ids_keep), K, D)
    return one * (int(bool(needs[0])) + int(bool(needs[1])))


FLOP_FORMULAS = {"patch_embed_tokens_fwd": _patch_embed_tokens_fwd_flop,
                 "patch_embed_tokens_bwd": _patch_embed_tokens_bwd_flop}
