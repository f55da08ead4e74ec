"""Fused ViT stem as one differentiable op: patch embedding GEMM (pixels gathered from the image in the load),
bias, position add and class row in one pass; see :mod:`fastvit_kernels.kernels.patch_embed` for the kernel plan.
(Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; timm's PatchEmbed + _pos_embed semantics.)
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import autocast_inputs, check_same, check_tensor, check_triton_dtype
from ..backend import resolve_backend


@torch.library.custom_op("fastvit::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     pos_embed: torch.Tensor, cls_token: Optional[torch.Tensor]) -> torch.Tensor:
    from ..kernels.patch_embed import patch_embed_fwd

    return patch_embed_fwd(images, weight, bias, pos_embed, cls_token)


@_patch_embed_fwd.register_fake
def _(images, weight, bias, pos_embed, cls_token):
    return images.new_empty((images.shape[0], pos_embed.shape[1], weight.shape[0]))


@torch.library.custom_op("fastvit::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(dout: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, num_prefix: int,
                     needs_images_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.patch_embed import patch_embed_bwd

    return patch_embed_bwd(dout, images, weight, num_prefix, needs_images_grad)


@_patch_embed_bwd.register_fake
def _(dout, images, weight, num_prefix, needs_images_grad):
    D = weight.shape[0]
    dimages = torch.empty_like(images) if needs_images_grad else images.new_empty(0)
    dcls = weight.new_empty((1, 1, D)) if num_prefix else weight.new_empty(0)
    return (dimages, torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((D,)),
            weight.new_empty((1, dout.shape[1], D)), dcls)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token = inputs
    ctx.save_for_backward(images, weight)
    ctx.num_prefix = 0 if cls_token is None else 1
    ctx.has_bias = bias is not None


def _backward(ctx, dout):
    images, weight = ctx.saved_tensors
    dimages, dweight, dbias, dpos, dcls = _patch_embed_bwd(
        dout.contiguous(), images, weight, ctx.num_prefix, bool(ctx.needs_input_grad[0])
    )
    return (dimages if ctx.needs_input_grad[0] else None, dweight, dbias if ctx.has_bias else None, dpos,
            dcls if ctx.num_prefix else None)


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding + class token + position add: ``cat([cls, patches @ W^T + bias]) + pos_embed``.

    Args:
        images: (B, C, H, W), NCHW or channels_last, fp32 | fp16 | bf16 (bf16 on GPU only); H, W multiples of P.
        weight: (D, C, P, P), the Conv2d weight of timm's ``patch_embed.proj``; bias: (D,) or None.
        pos_embed: (1, 1 + N, D) with a class token, (1, N, D) without; N = (H / P) * (W / P).
        cls_token: (1, 1, D) or None.
        backend: "auto" | "triton" | "torch".

    Returns:
        tokens (B, 1 + N, D) ((B, N, D) without class token) in images' dtype: row 0 is cls_token + pos_embed[0],
        row 1 + p is patch p (row-major over the patch grid) + bias + pos_embed[1 + p], as timm.

    Raises:
        TypeError: non-floating inputs; bf16 on the CPU interpreter.
        ValueError: channel mismatch, non-square weight, H or W not a multiple of P, pos_embed / cls_token of the
            wrong shape, mixed dtypes or devices (each message names the argument, expected and actual).
        RuntimeError: backend="triton" where Triton cannot run.
    """
    images, weight, bias, pos_embed, cls_token = autocast_inputs(images, weight, bias, pos_embed, cls_token)
    check_tensor("weight", weight)
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D, C, P, P); got {tuple(weight.shape)}")
    D, C, P, _ = weight.shape
    check_tensor("images", images)
    if images.dim() != 4 or images.shape[1] != C:
        raise ValueError(f"images must be (B, C={C}, H, W) to match weight {tuple(weight.shape)}; got {tuple(images.shape)}")
    B, _, H, W = images.shape
    if H % P or W % P or H == 0 or W == 0:
        raise ValueError(f"images height and width must be positive multiples of the patch size P={P}; got {H}x{W}")
    num_patches = (H // P) * (W // P)
    prefix = 0 if cls_token is None else 1
    if bias is not None:
        check_tensor("bias", bias, (D,), f"(D={D},)")
    if cls_token is not None:
        check_tensor("cls_token", cls_token, (1, 1, D), f"(1, 1, D={D})")
    check_tensor("pos_embed", pos_embed, (1, prefix + num_patches, D),
                 f"(1, {'1 + ' if prefix else ''}N={num_patches}, D={D}) for {H}x{W} images at patch {P}")
    check_same("images", images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    if resolve_backend(images.device, backend) == "torch":
        return reference.patch_embed_ref(images, weight, bias, pos_embed, cls_token)
    check_triton_dtype("images", images)
    return _patch_embed_fwd(images, weight, bias, pos_embed, cls_token)


def patch_embed_flops(B: int, num_patches: int, D: int, C: int, P: int) -> int:
    """Forward FLOPs of the patch-embedding GEMM (2 per multiply-add): 2 * B * N * D * C * P * P."""
    return 2 * B * num_patches * D * C * P * P
