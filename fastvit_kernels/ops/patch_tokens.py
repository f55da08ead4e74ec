"""The public differentiable patch embedding of already-patchified tokens: ``patch_embed_tokens``.

timm's NaFlex collator hands a model patches, not images: ``patches (B, N, P*P*C)`` with ``patch_coord`` and
``patch_valid``, and native-resolution packing gives ``(T, P*P*C)`` rows. This op embeds them with token selection
(``ids_keep``: only kept patches are embedded), mask-token substitution and per-token position rows; the eager spec
is :func:`fastvit_kernels.reference.patch_embed_tokens_ref`.
"""

from __future__ import annotations

import torch

from .. import reference
from .._checks import autocast_inputs, check_tensor, check_triton_dtype
from ..backend import resolve_backend
from ._instrument import instrumented


def _check_index(name: str, t, leading: tuple, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(leading):
        raise ValueError(f"{name} must have shape {tuple(leading)}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on patches' device {device}; got {t.device}")


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
        patches: (B, N, K) or (T, K) floating, K = P * P * C. weight: (D, K). bias: (D,) or None.
        pos: (R, D) or None; pos_index: int64 (B, N) / (T,), -1 = no position.
        ids_keep: int64 (B, N_keep) / (T_keep,) or None. mask: bool (B, N_out) / (T_out,); mask_token: (D,).
        prefix: (n_prefix, D) or None; cu_seqlens: (S + 1,) int32 over the kept packed rows (2-D form with prefix).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | None.

    Returns:
        (B, n_prefix + N_out, D) or (T_out + S * n_prefix, D), patches' dtype; differentiable with respect to
        patches, weight, bias, pos, mask_token and prefix.

    Raises:
        TypeError: a non-floating tensor, an index that is not int64, a mask that is not bool.
        ValueError: patches not 2-D / 3-D; a shape that does not match; pos without pos_index (or the reverse);
            mask without mask_token; prefix in the 2-D form without cu_seqlens; a tensor on another device.

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
    dev = patches.device
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be (D,) = ({D},); got {tuple(bias.shape)}")
    if (pos is None) != (pos_index is None):
        raise ValueError("pos and pos_index go together; got only one of them")
    if pos is not None:
        if pos.dim() != 2 or pos.shape[1] != D:
            raise ValueError(f"pos must be (R, D={D}); got {tuple(pos.shape)}")
        _check_index("pos_index", pos_index, lead, dev)
    out_lead = lead
    if ids_keep is not None:
        if not isinstance(ids_keep, torch.Tensor) or ids_keep.dtype != torch.int64:
            raise TypeError(f"ids_keep must be an int64 tensor; got {getattr(ids_keep, 'dtype', type(ids_keep))}")
        want = 2 if patches.dim() == 3 else 1
        if ids_keep.dim() != want or (want == 2 and ids_keep.shape[0] != lead[0]):
            raise ValueError(f"ids_keep must be {'(B, N_keep)' if want == 2 else '(T_keep,)'} for patches "
                             f"{tuple(patches.shape)}; got {tuple(ids_keep.shape)}")
        if ids_keep.device != dev:
            raise ValueError(f"ids_keep must be on patches' device {dev}; got {ids_keep.device}")
        out_lead = tuple(ids_keep.shape)
    if mask is not None:
        if mask_token is None:
            raise ValueError("mask needs mask_token (D,)")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor; got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != out_lead:
            raise ValueError(f"mask must have the output tokens' shape {out_lead}; got {tuple(mask.shape)}")
        if tuple(mask_token.reshape(-1).shape) != (D,):
            raise ValueError(f"mask_token must have D={D} elements; got {tuple(mask_token.shape)}")
        mask_token = mask_token.reshape(D)
    if prefix is not None:
        prefix = prefix.reshape(-1, D) if prefix.numel() % D == 0 else prefix
        if prefix.dim() != 2 or prefix.shape[1] != D:
            raise ValueError(f"prefix must be (n_prefix, D={D}); got {tuple(prefix.shape)}")
        if patches.dim() == 2:
            if cu_seqlens is None:
                raise ValueError("prefix with packed (T, K) patches needs cu_seqlens")
            from .attention import check_cu_seqlens

            check_cu_seqlens(cu_seqlens, out_lead[0], dev)
    if resolve_backend(dev, backend) == "torch":
        return reference.patch_embed_tokens_ref(patches, weight, bias, pos, pos_index, ids_keep=ids_keep, mask=mask,
                                                mask_token=mask_token, prefix=prefix, cu_seqlens=cu_seqlens)
    check_triton_dtype("patches", patches)
    raise NotImplementedError("the Triton patch_embed_tokens kernel is not wired yet")


def patch_embed_tokens_flops(tokens: int, K: int, D: int) -> int:
    """Model FLOPs of embedding ``tokens`` kept patches of K values into D: ``2 * tokens * K * D`` (an int)."""
    return 2 * tokens * K * D
