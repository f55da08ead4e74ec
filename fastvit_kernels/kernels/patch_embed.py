"""Patch embedding on the GEMM core: tokens[b, prefix + p] = patches(images)[b, p] @ W^T + bias (+ pos_embed).

Token layout (timm ``VisionTransformer._pos_embed``): rows ``[cls?; reg_1..reg_K; patch_1..patch_N]``, prefix =
class token (0 or 1) + K register tokens. Default: pos_embed (1, prefix + N, D) is added to every row (class and
register rows included). ``no_embed_class`` (DeiT-3, big_vision): pos_embed (1, N, D) is added to the patch rows
only; the prefix rows are the bare tokens.

The A operand is gathered straight from the image through the GEMM's three-level index split (token m ->
(image, patch row, patch column); feature k -> (channel, pixel row, pixel column)), so NCHW and channels_last
images both work through their strides, with no unfold copy. The load converts the pixels to the weights' dtype
(images may be uint8, fp32, fp16 or bf16), optionally applying the per-channel normalisation
``v * scale[c] + shift[c]`` in fp32 first (uint8: scale = 1 / (255 std), shift = -mean / std). Images whose size
is not a multiple of P are zero-padded on the right / bottom inside the load (pixels outside the image read as 0
after normalisation, as timm's ``F.pad`` after the data loader's normalisation). Bias and the position embedding
(a residual operand with batch stride 0) are added in the epilogue, which writes rows ``prefix + p``; a small
kernel writes the prefix rows.

Backward reuses the same addressing: the weight gradient is a GEMM over all B * N tokens that re-gathers (and
re-normalises) the patches, the image gradient a GEMM whose C operand scatters into the image (only the pixels
inside it), and bias / pos_embed / class / register gradients take two deterministic launches: a column sum over
the batch (fp32, also writing the pos_embed gradient in the weights' dtype), then the bias gradient (the sum of its
patch rows) with the class / register rows converted. (Algorithm: ViT patch embedding, Dosovitskiy et al. 2021;
im2col-in-the-load as in implicit-GEMM convolution.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .fusion import Cast, ChannelAffine, Epilogue, Gemm, ImageBounds, IndexMap, Operand
from .matmul import gemm
from .reduce import column_sum, column_sum_tail


@triton.jit
def _prefix_rows_kernel(
    out_ptr,  # (B, prefix + N, D) tokens; rows 0 .. prefix - 1 of each image are written
    cls_ptr,  # (D,) class token (read when NUM_CLS == 1)
    reg_ptr,  # (K, D) contiguous register tokens (read for rows NUM_CLS ..)
    pos_ptr,  # (prefix, D) rows of pos_embed for the prefix tokens (read when ADD_POS), row stride stride_pos_n
    D, stride_out_b, stride_out_n, stride_pos_n,
    NUM_CLS: tl.constexpr,  # 0 or 1
    ADD_POS: tl.constexpr,  # False for no_embed_class
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if j < NUM_CLS:
        src = cls_ptr + cols
    else:
        src = reg_ptr + (j - NUM_CLS) * D + cols
    v = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if ADD_POS:
        v += tl.load(pos_ptr + j * stride_pos_n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out_b + j * stride_out_n + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


def _image_operand(images: torch.Tensor, P: int) -> Operand:
    """Images (B, C, H, W) as the logical patch matrix (B * N, C * P * P): rows split (image, patch row, patch
    col), columns split (channel, pixel row, pixel col)."""
    sB, sC, sH, sW = images.stride()
    return Operand(images, (sB, P * sH, P * sW), (sC, sH, sW))


def _token_rows(t: torch.Tensor, gw: int) -> tuple:
    """Row strides of the patch tokens of t (B, N_rows, D) for the split (image, patch row, patch col)."""
    return (t.stride(0), gw * t.stride(1), t.stride(1))


def _weight_features(weight: torch.Tensor) -> tuple:
    """Strides of the (channel, pixel row, pixel col) feature split of a (D, C, P, P) weight."""
    return (weight.stride(1), weight.stride(2), weight.stride(3))


def grid_size(H: int, W: int, P: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an H x W image at patch P, zero padding the right / bottom: ceil(H / P)."""
    return -(-H // P), -(-W // P)


def _load_prologue(images, weight, norm) -> ChannelAffine | Cast | None:
    """The image operand's prologue: the channel affine (then a cast), a plain cast, or none (same dtypes)."""
    if norm is not None:
        return ChannelAffine(norm[0], norm[1])
    return Cast() if images.dtype != weight.dtype else None


def _bounds(images, P: int, operand: str) -> ImageBounds | None:
    H, W = images.shape[-2:]
    return ImageBounds(operand, H, W) if (H % P or W % P) else None


def patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_token, norm, no_embed_class: bool) -> torch.Tensor:
    """Launcher. images (B, C, H, W) uint8 | float; weight (D, C, P, P); bias (D,) | None; pos_embed
    (1, [prefix +] N, D); cls_token (1, 1, D) | None; reg_token (1, K, D) | None; norm (2, C) fp32 rows
    (scale, shift) | None. Returns tokens (B, prefix + N, D) in weight's dtype (checked by the caller)."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gh, gw = grid_size(H, W, P)
    Np = gh * gw
    n_cls = 0 if cls_token is None else 1
    n_reg = 0 if reg_token is None else reg_token.shape[1]
    prefix = n_cls + n_reg
    pos_prefix = 0 if no_embed_class else prefix
    out = torch.empty((B, prefix + Np, D), device=images.device, dtype=weight.dtype)
    patches_out = out[:, prefix:]
    pos = pos_embed[:, pos_prefix:]
    gemm(Gemm(
        _image_operand(images, P),
        Operand(weight, _weight_features(weight), weight.stride(0)),
        Operand(patches_out, _token_rows(patches_out, gw), out.stride(2)),
        B * Np, D, C * P * P,
        a_prologue=_load_prologue(images, weight, norm),
        epilogue=Epilogue(bias=bias, residual=Operand(pos, (0, gw * pos.stride(1), pos.stride(1)), pos.stride(2))),
        index=IndexMap(m_split=(Np, gw), k_split=(P * P, P), image_bounds=_bounds(images, P, "a")),
    ))
    if prefix:
        reg = reg_token[0].contiguous() if reg_token is not None else weight  # dummy when unused
        cls = cls_token if cls_token is not None else weight
        _launch.launch(
            _prefix_rows_kernel, (B, prefix),
            out, cls, reg, pos_embed, D, out.stride(0), out.stride(1), pos_embed.stride(1),
            NUM_CLS=n_cls, ADD_POS=not no_embed_class, BLOCK_D=triton.next_power_of_2(D),
        )
    return out


def patch_embed_bwd(dout, images, weight, norm, num_cls: int, num_reg: int, no_embed_class: bool,
                    needs_weight_grad: bool, needs_images_grad: bool):
    """Launcher. dout (B, prefix + N, D) contiguous, in weight's dtype. Returns
    (dimages | empty, dweight | empty, dbias, dpos_embed, dcls | empty, dreg | empty): dimages (B, C, H, W) like images,
    dweight (D, C, P, P), dbias (D,), dpos_embed like pos_embed, dcls (1, 1, D), dreg (1, K, D), all in weight's
    dtype but dimages; the small gradients (bias, pos_embed, class, register) are fp32 sums over the batch in a
    fixed order, in two launches."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gh, gw = grid_size(H, W, P)
    Np = gh * gw
    prefix = num_cls + num_reg
    rows = dout.shape[1]
    wdt = weight.dtype
    # two launches for the small gradients. (1) One deterministic fp32 sum over the batch, which also writes the
    # pos_embed gradient in the weight dtype (a separate tensor even for fp32 weights: the custom op's outputs have
    # their own storage at offset 0, as its fake implementation says).
    pos_from = prefix if no_embed_class else 0
    rows_sum, dpos = column_sum(dout.view(B, rows * D), torch.float32, copy_dtype=wdt, copy_from=pos_from * D)
    rows_sum, dpos = rows_sum.view(rows, D), dpos.view(1, rows - pos_from, D)
    # (2) the bias gradient (fp32 sum of the patch rows) and the class / register rows, in the weight dtype
    dbias, dcls, dreg = column_sum_tail(rows_sum, prefix, wdt, head_split=num_cls)
    dcls = dcls.view(1, 1, D) if num_cls else dout.new_empty(0)
    dreg = dreg.view(1, num_reg, D) if num_reg else dout.new_empty(0)
    dpatch = dout[:, prefix:]
    dweight = dout.new_empty(0)
    if needs_weight_grad:
        dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        gemm(Gemm(
            Operand(dpatch, dout.stride(2), _token_rows(dpatch, gw)),
            _image_operand(images, P),
            Operand(dweight, dweight.stride(0), _weight_features(dweight)),
            D, C * P * P, B * Np,
            b_prologue=_load_prologue(images, weight, norm),
            index=IndexMap(n_split=(P * P, P), k_split=(Np, gw), image_bounds=_bounds(images, P, "b")),
        ))
    dimages = dout.new_empty(0)
    if needs_images_grad:
        # d(x * scale[c] + shift[c]) / dx = scale[c]: fold the scale into the (small) weight instead of the image
        w = weight if norm is None else (weight.float() * norm[0].view(1, C, 1, 1)).to(wdt)
        dimages = torch.empty_like(images)  # every pixel lies in exactly one patch: fully written
        gemm(Gemm(
            Operand(dpatch, _token_rows(dpatch, gw), dout.stride(2)),
            Operand(w, w.stride(0), _weight_features(w)),
            _image_operand(dimages, P),
            B * Np, C * P * P, D,
            index=IndexMap(m_split=(Np, gw), n_split=(P * P, P), image_bounds=_bounds(images, P, "c")),
        ))
    return dimages, dweight, dbias, dpos, dcls, dreg
