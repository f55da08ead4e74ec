"""Patch embedding on the GEMM core: tokens[b, prefix + p] = patches(images)[b, p] @ W^T + bias + pos_embed[prefix + p].

The A operand is gathered straight from the image through the GEMM's three-level index split (token m ->
(image, patch row, patch column); feature k -> (channel, pixel row, pixel column)), so NCHW and channels_last
images both work through their strides, with no unfold copy. Bias and the position embedding (a residual
operand with batch stride 0) are added in the epilogue, which writes rows ``prefix + p`` of the token tensor; a
small kernel writes the class row ``cls_token + pos_embed[0]``. Backward reuses the same addressing: the weight
gradient is a GEMM over all B * N tokens that re-gathers the patches, the image gradient a GEMM whose C operand
scatters into the image, and bias / pos_embed / cls_token gradients are deterministic column sums.
(Algorithm: ViT patch embedding, Dosovitskiy et al. 2021; im2col-in-the-load as in implicit-GEMM convolution.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import Operand, gemm
from .reduce import column_sum


@triton.jit
def _class_row_kernel(
    out_ptr,  # (B, 1 + N, D) tokens; row 0 of each image is written
    cls_ptr,  # (D,) class token
    pos_ptr,  # (D,) position embedding of the class token
    D, stride_out_b,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    v = tl.load(cls_ptr + cols, mask=mask, other=0.0).to(tl.float32) + tl.load(pos_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out_b + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


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


def patch_embed_fwd(images, weight, bias, pos_embed, cls_token) -> torch.Tensor:
    """Launcher. images (B, C, H, W); weight (D, C, P, P); bias (D,) | None; pos_embed (1, prefix + N, D);
    cls_token (1, 1, D) | None. Returns tokens (B, prefix + N, D) in images' dtype."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gh, gw = H // P, W // P
    Np = gh * gw
    prefix = 0 if cls_token is None else 1
    out = torch.empty((B, prefix + Np, D), device=images.device, dtype=images.dtype)
    patches_out = out[:, prefix:]
    pos = pos_embed[:, prefix:]
    gemm(
        _image_operand(images, P),
        Operand(weight, _weight_features(weight), weight.stride(0)),
        Operand(patches_out, _token_rows(patches_out, gw), out.stride(2)),
        B * Np, D, C * P * P,
        m_split=(Np, gw), k_split=(P * P, P),
        bias=bias,
        residual=Operand(pos, (0, gw * pos.stride(1), pos.stride(1)), pos.stride(2)),
    )
    if cls_token is not None:
        _class_row_kernel[(B,)](out, cls_token, pos_embed, D, out.stride(0), BLOCK_D=triton.next_power_of_2(D))
    return out


def patch_embed_bwd(dout, images, weight, num_prefix: int, needs_images_grad: bool):
    """Launcher. dout (B, prefix + N, D) contiguous. Returns (dimages | empty, dweight, dbias, dpos_embed, dcls | empty):
    dimages (B, C, H, W) like images, dweight (D, C, P, P), dbias (D,), dpos_embed (1, prefix + N, D),
    dcls (1, 1, D)."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gw = W // P
    Np = (H // P) * gw
    rows = dout.shape[1]
    dpos = column_sum(dout.view(B, rows * D), weight.dtype).view(1, rows, D)
    dbias = column_sum(dpos[0, num_prefix:], weight.dtype)
    dcls = dpos[:, :1].clone() if num_prefix else dout.new_empty(0)
    dpatch = dout[:, num_prefix:]
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gemm(
        Operand(dpatch, dout.stride(2), _token_rows(dpatch, gw)),
        _image_operand(images, P),
        Operand(dweight, dweight.stride(0), _weight_features(dweight)),
        D, C * P * P, B * Np,
        n_split=(P * P, P), k_split=(Np, gw),
    )
    dimages = dout.new_empty(0)
    if needs_images_grad:
        dimages = torch.empty_like(images)  # every pixel lies in exactly one patch: fully written
        gemm(
            Operand(dpatch, _token_rows(dpatch, gw), dout.stride(2)),
            Operand(weight, weight.stride(0), _weight_features(weight)),
            _image_operand(dimages, P),
            B * Np, C * P * P, D,
            m_split=(Np, gw), n_split=(P * P, P),
        )
    return dimages, dweight, dbias, dpos, dcls
