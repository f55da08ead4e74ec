"""Fused ViT stem as one differentiable op: patch embedding GEMM (pixels gathered from the image in the load,
converted / normalised on load), bias, position add and the class / register rows in one pass; see
:mod:`fastvit_kernels.kernels.patch_embed` for the kernel plan.
(Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; timm's PatchEmbed + ``_pos_embed`` semantics,
timm 1.0 ``vision_transformer.py``; register tokens: Darcet et al., "Vision Transformers Need Registers", 2024.)
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import reference
from .._checks import autocast_inputs, check_same, check_tensor, check_triton_dtype
from .._device import launches_on_input_device
from .._library import fastvit_op
from ..backend import resolve_backend
from ._instrument import instrumented

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)


@fastvit_op("fastvit::patch_embed_fwd", mutates_args=())
@launches_on_input_device
def _patch_embed_fwd(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     pos_embed: torch.Tensor, cls_token: Optional[torch.Tensor], reg_token: Optional[torch.Tensor],
                     norm: Optional[torch.Tensor], no_embed_class: bool) -> torch.Tensor:
    from ..kernels.patch_embed import patch_embed_fwd

    return patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_token, norm, no_embed_class)


def _num_tokens(images, weight, cls_token, reg_token) -> int:
    P = weight.shape[-1]
    H, W = images.shape[-2:]
    n_prefix = (0 if cls_token is None else 1) + (0 if reg_token is None else reg_token.shape[1])
    return n_prefix + (-(-H // P)) * (-(-W // P))


@_patch_embed_fwd.register_fake
def _(images, weight, bias, pos_embed, cls_token, reg_token, norm, no_embed_class):
    return weight.new_empty((images.shape[0], _num_tokens(images, weight, cls_token, reg_token), weight.shape[0]))


@fastvit_op("fastvit::patch_embed_bwd", mutates_args=())
@launches_on_input_device
def _patch_embed_bwd(dout: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, norm: Optional[torch.Tensor],
                     num_cls: int, num_reg: int, no_embed_class: bool, needs_weight_grad: bool,
                     needs_images_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.patch_embed import patch_embed_bwd

    return patch_embed_bwd(dout, images, weight, norm, num_cls, num_reg, no_embed_class, needs_weight_grad,
                           needs_images_grad)


@_patch_embed_bwd.register_fake
def _(dout, images, weight, norm, num_cls, num_reg, no_embed_class, needs_weight_grad, needs_images_grad):
    D = weight.shape[0]
    prefix = num_cls + num_reg
    dimages = torch.empty_like(images) if needs_images_grad else dout.new_empty(0)
    pos_rows = dout.shape[1] - prefix if no_embed_class else dout.shape[1]
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight_grad else \
        weight.new_empty(0)
    return (dimages, dweight, weight.new_empty((D,)),
            weight.new_empty((1, pos_rows, D)),
            weight.new_empty((1, 1, D)) if num_cls else weight.new_empty(0),
            weight.new_empty((1, num_reg, D)) if num_reg else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token, reg_token, norm, no_embed_class = inputs
    ctx.save_for_backward(images, weight, norm)
    ctx.num_cls = 0 if cls_token is None else 1
    ctx.num_reg = 0 if reg_token is None else reg_token.shape[1]
    ctx.no_embed_class = no_embed_class
    ctx.has_bias = bias is not None


def _backward(ctx, dout):
    images, weight, norm = ctx.saved_tensors
    needs_images_grad = bool(ctx.needs_input_grad[0])
    needs_weight_grad = bool(ctx.needs_input_grad[1])  # a frozen stem skips the weight-gradient GEMM
    dimages, dweight, dbias, dpos, dcls, dreg = _patch_embed_bwd(
        dout.contiguous(), images, weight, norm, ctx.num_cls, ctx.num_reg, ctx.no_embed_class, needs_weight_grad,
        needs_images_grad,
    )
    return (dimages if needs_images_grad else None, dweight if needs_weight_grad else None,
            dbias if ctx.has_bias else None, dpos,
            dcls if ctx.num_cls else None, dreg if ctx.num_reg else None, None, None)


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


@functools.lru_cache(maxsize=32)
def _norm_constants(mean: tuple, std: tuple, uint8: bool, device: torch.device) -> torch.Tensor:
    """(2, C) fp32 rows (scale, shift) on ``device`` for Python mean / std, built once per value (no per-step
    host-to-device copy)."""
    return _norm_tensor(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64), uint8,
                        device)


def _norm_tensor(mean: torch.Tensor, std: torch.Tensor, uint8: bool, device) -> torch.Tensor:
    mean = mean.to(device=device, dtype=torch.float64)
    std = std.to(device=device, dtype=torch.float64)
    scale = 1.0 / (std * 255.0) if uint8 else 1.0 / std
    return torch.stack([scale, -mean / std]).to(torch.float32)


def _as_channel_values(name: str, v, C: int, device) -> tuple | torch.Tensor:
    """Validate mean / std: a sequence of C numbers or a (C,) tensor (a single number broadcasts)."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.shape[0] not in (1, C) or not (v.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor of shape (C={C},); got {v.dtype} {tuple(v.shape)}")
        if v.device != torch.device(device) and v.device.type != "cpu":
            raise ValueError(f"{name} is on {v.device} but images are on {device}")
        return v.detach().expand(C)
    vals = (v,) * C if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(vals) != C:
        raise ValueError(f"{name} must have one value per channel (C={C}); got {len(vals)}: {vals}")
    return vals


def normalization_constants(mean, std, C: int, uint8: bool, device) -> torch.Tensor:
    """(2, C) fp32 (scale, shift) so that ``x * scale + shift == (x / 255 - mean) / std`` for uint8 pixels and
    ``(x - mean) / std`` for float pixels. mean / std: C numbers, a number, or (C,) float tensors; default
    mean 0 / std 1.

    Raises:
        ValueError: wrong length / shape, or a non-positive std (checked for Python numbers).
    """
    mean = (0.0,) * C if mean is None else _as_channel_values("mean", mean, C, device)
    std = (1.0,) * C if std is None else _as_channel_values("std", std, C, device)
    if isinstance(std, tuple) and min(std) <= 0:
        raise ValueError(f"std must be positive; got {std}")
    if isinstance(mean, tuple) and isinstance(std, tuple):
        if torch.compiler.is_compiling():
            return _norm_tensor(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64),
                                uint8, device)
        return _norm_constants(mean, std, uint8, torch.device(device))
    mean_t = mean if isinstance(mean, torch.Tensor) else torch.tensor(mean)
    std_t = std if isinstance(std, torch.Tensor) else torch.tensor(std)
    return _norm_tensor(mean_t, std_t, uint8, device)


@instrumented("patch_embed")
def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None = None,
    *,
    reg_token: torch.Tensor | None = None,
    no_embed_class: bool = False,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    dynamic_img_pad: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding + class / register tokens + position add, with timm's token layouts.

    ``tokens = [cls?; reg_1..K; patches @ W^T + bias]``, then (timm ``VisionTransformer._pos_embed``):
    default: ``tokens + pos_embed`` (every row, class and register rows included); ``no_embed_class=True``
    (DeiT-3): ``pos_embed`` is added to the patch rows only, the prefix rows are the bare tokens.

    Args:
        images: (B, C, H, W), NCHW or channels_last; uint8 | fp32 | fp16 | bf16 (bf16 on GPU only). Converted to
            the weight's dtype as they are loaded (no copy); uint8 pixels are divided by 255 first. They need not
            share the weight's dtype (the only argument that may differ).
        weight: (D, C, P, P), the Conv2d weight of timm's ``patch_embed.proj``, fp32 | fp16 | bf16.
        bias: (D,) or None. pos_embed: (1, prefix + N, D), or (1, N, D) with ``no_embed_class``;
            N = ceil(H / P) * ceil(W / P), prefix = class token (0 / 1) + K register tokens.
        cls_token: (1, 1, D) or None. reg_token: (1, K, D) register tokens (K >= 1) or None.
        no_embed_class: timm's flag: position embedding on the patch tokens only.
        mean, std: per-channel normalisation applied on load, ``(x - mean[c]) / std[c]`` on the image in [0, 1]
            units — the convention of timm's IMAGENET_DEFAULT_MEAN / STD and of ToTensor + Normalize: uint8 pixels
            become ``(x / 255 - mean[c]) / std[c]``, float pixels ``(x - mean[c]) / std[c]``. C numbers (or one),
            or (C,) float tensors (not differentiated). Default: no normalisation (uint8: x / 255).
        dynamic_img_pad: allow H, W that are not multiples of P: zero padding on the right / bottom (after the
            normalisation), as timm's ``PatchEmbed(dynamic_img_pad=True)``, done in the load (no padded copy).
        backend: "auto" | "triton" | "torch".

    Returns:
        tokens (B, prefix + N, D) in weight's dtype; patch p is row-major over the patch grid, as timm.

    Raises:
        TypeError: images not uint8 / float; other inputs not float; bf16 on the CPU interpreter.
        ValueError: channel mismatch, non-square weight, H or W not a multiple of P without dynamic_img_pad,
            pos_embed / cls_token / reg_token / bias of the wrong shape, parameters of mixed dtypes, tensors on
            different devices, bad mean / std (each message names the argument, expected and actual).
        RuntimeError: backend="triton" where Triton cannot run.

    Gradients: weight (its GEMM is skipped when the weight does not require grad), bias, pos_embed, cls_token,
    reg_token; images only when they require grad (never uint8).
    """
    # autocast: the parameters run in the autocast dtype; the images are converted on load (no cast copy)
    weight, bias, pos_embed, cls_token, reg_token = autocast_inputs(weight, bias, pos_embed, cls_token, reg_token)
    check_tensor("weight", weight)
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D, C, P, P); got {tuple(weight.shape)}")
    D, C, P, _ = weight.shape
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
    if images.dtype not in IMAGE_DTYPES:
        raise TypeError(f"images must be uint8, float32, float16 or bfloat16; got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != C:
        raise ValueError(f"images must be (B, C={C}, H, W) to match weight {tuple(weight.shape)}; got {tuple(images.shape)}")
    B, _, H, W = images.shape
    if H == 0 or W == 0 or (not dynamic_img_pad and (H % P or W % P)):
        raise ValueError(f"images height and width must be positive multiples of the patch size P={P}; got {H}x{W} "
                         "(or pass dynamic_img_pad=True to zero-pad the right / bottom)")
    num_patches = (-(-H // P)) * (-(-W // P))
    n_cls = 0 if cls_token is None else 1
    if bias is not None:
        check_tensor("bias", bias, (D,), f"(D={D},)")
    if cls_token is not None:
        check_tensor("cls_token", cls_token, (1, 1, D), f"(1, 1, D={D})")
    n_reg = 0
    if reg_token is not None:
        check_tensor("reg_token", reg_token, (1, None, D), f"(1, K, D={D})")
        n_reg = reg_token.shape[1]
        if n_reg == 0:
            raise ValueError("reg_token must hold at least one token (K >= 1); pass None for no register tokens")
    prefix = n_cls + n_reg
    pos_prefix = 0 if no_embed_class else prefix
    what = (f"(1, N={num_patches}, D={D}) (no_embed_class)" if no_embed_class or not prefix
            else f"(1, {prefix} + N={num_patches}, D={D})")
    check_tensor("pos_embed", pos_embed, (1, pos_prefix + num_patches, D), f"{what} for {H}x{W} images at patch {P}")
    check_same("weight", weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token, reg_token=reg_token)
    if images.device != weight.device:
        raise ValueError(f"images are on {images.device} but weight is on {weight.device}; move them to one device")
    uint8 = images.dtype == torch.uint8
    norm = None
    if mean is not None or std is not None or uint8:
        norm = normalization_constants(mean, std, C, uint8, images.device)
    kwargs = dict(reg_token=reg_token, no_embed_class=no_embed_class, dynamic_img_pad=dynamic_img_pad)
    if resolve_backend(images.device, backend) == "torch":
        return reference.patch_embed_ref(images, weight, bias, pos_embed, cls_token, mean=mean, std=std, **kwargs)
    check_triton_dtype("images", images)
    check_triton_dtype("weight", weight)
    return _patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_token, norm, no_embed_class)


def patch_embed_flops(B: int, num_patches: int, D: int, C: int, P: int) -> int:
    """Model FLOPs of the patch-embedding GEMM over B images (2 per multiply-add): 2 * B * num_patches * D * C * P^2.

    Args: B images, num_patches patches per image, D = embed_dim, C = in_chans, P = patch side in pixels.
    Returns: an int. The backward in training (weight gradient only: images need no gradient) is as many again.
    """
    return 2 * B * num_patches * D * C * P * P


# FlopCounterMode formulas (torch.utils.flop_counter conventions: tensor arguments arrive as shapes); registered by
# fastvit_kernels.ops.register_flop_formulas
def _patch_embed_fwd_flop(images, weight, *args, out_shape=None, **kwargs) -> int:
    B, C, H, W = images
    D, _, P, _ = weight
    # an image whose side is not a multiple of P is zero-padded to the next patch (dynamic_img_pad)
    return patch_embed_flops(B, (-(-H // P)) * (-(-W // P)), D, C, P)


def _patch_embed_bwd_flop(dout, images, weight, *args, out_shape=None, **kwargs) -> int:
    # the op's last argument is needs_images_grad (the image gradient is a second GEMM of the same size)
    needs_images_grad = kwargs.get("needs_images_grad", args[-1] if args and isinstance(args[-1], bool) else False)
    wgrad = _patch_embed_fwd_flop(images, weight)
    return 2 * wgrad if needs_images_grad else wgrad


FLOP_FORMULAS = {"patch_embed_fwd": _patch_embed_fwd_flop, "patch_embed_bwd": _patch_embed_bwd_flop}
