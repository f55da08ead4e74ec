"""Plain eager PyTorch: the spec every kernel is held to, the CPU path, and the baseline of the benchmarks.

* ``patch_embed_ref``, ``attention_ref`` (with ``attention_varlen_ref`` / ``attention_masked_ref``, the packed and
  key-padding forms), ``patch_embed_tokens_ref`` (pre-patchified tokens), ``layernorm_mlp_ref``,
  ``swiglu_mlp_ref``, ``layernorm_linear_ref``, ``linear_residual_ref``, ``attention_block_ref``: one function per
  fused op, same arguments and semantics as the op in :mod:`fastvit_kernels.ops`; ``rope_ref``: the 2-D RoPE the
  qkv GEMM epilogue applies (tables from :mod:`fastvit_kernels.rope`); ``rms_norm_ref``: timm's ``RmsNorm``.
* ``VisionTransformer``: a ViT that follows timm's ``VisionTransformer`` computation step for step (timm 1.0,
  ``timm/models/vision_transformer.py``; Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021):
  Conv2d patch embedding, class token then position add, pre-norm blocks
  ``x = x + drop_path(ls1(attn(norm1(x)))); x = x + drop_path(ls2(mlp(norm2(x))))``, LayerNorm eps 1e-6, exact
  erf GELU, final norm, 'token' or 'avg' pooling. Parameter names and shapes are timm's, so a timm state_dict
  loads with ``strict=True``. :class:`fastvit_kernels.FastViT` subclasses it and changes only the compute.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# functional references, one per fused op
# ----------------------------------------------------------------------------------------------------------------
def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None = None,
    *,
    reg_token: torch.Tensor | None = None,
    no_embed_class: bool = False,
    mean=None,
    std=None,
    dynamic_img_pad: bool = False,
) -> torch.Tensor:
    """Patch embedding + class / register tokens + position add, as timm does it (normalise, pad, Conv2d,
    flatten, transpose, cat, add; timm ``PatchEmbed`` and ``VisionTransformer._pos_embed``).

    Args:
        images: (B, C, H, W), uint8 or float; converted to weight's dtype (uint8: divided by 255 first).
        weight: (D, C, P, P) Conv2d weight. bias: (D,) or None.
        pos_embed: (1, prefix + N, D), or (1, N, D) when ``no_embed_class``; N = ceil(H / P) * ceil(W / P),
            prefix = class token (0 / 1) + K register tokens.
        cls_token: (1, 1, D) or None. reg_token: (1, K, D) or None.
        no_embed_class: add pos_embed to the patch tokens only, then prepend class / register tokens (DeiT-3);
            otherwise prepend, then add pos_embed to every row.
        mean, std: per-channel normalisation ``(x - mean) / std`` on the image in [0, 1] units (uint8: x / 255),
            computed in fp32; C numbers or (C,) tensors; None = none.
        dynamic_img_pad: zero-pad the right / bottom to a multiple of P (after the normalisation), as timm.

    Returns:
        tokens: (B, prefix + N, D) in weight's dtype.
    """
    P = weight.shape[-1]
    x = images
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if mean is not None or std is not None:
        C = x.shape[1]
        m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32, device=x.device).expand(C)
        s = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32, device=x.device).expand(C)
        x = (x.float() - m.view(1, C, 1, 1)) / s.view(1, C, 1, 1)
    x = x.to(weight.dtype)
    if dynamic_img_pad:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (P - W % P) % P, 0, (P - H % P) % P))
    x = F.conv2d(x, weight, bias, stride=P)  # (B, D, H/P, W/P)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (cls_token, reg_token) if t is not None]
    if no_embed_class:
        x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if prefix else x
    if prefix:
        x = torch.cat(prefix + [x], dim=1)
    return x + pos_embed


def attention_ref(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head softmax attention on a packed qkv tensor (naive: the N x N matrix is materialised).

    Args:
        qkv: (B, N, 3 * D), D = num_heads * head_dim, laid out as (B, N, 3, H, head_dim) like timm's qkv Linear.
        num_heads: H.
        scale: softmax scale; default head_dim ** -0.5.

    Returns:
        out: (B, N, D), heads concatenated, ready for the output projection.
    """
    attn, v = _scores(qkv, num_heads, scale)
    return _merge_heads(attn.softmax(dim=-1) @ v)


def _scores(qkv: torch.Tensor, num_heads: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled scores q k^T (B, H, N, N), v (B, H, N, head_dim)) of a packed qkv (B, N, 3 * D)."""
    B, N, three_d = qkv.shape
    hd = three_d // 3 // num_heads
    scale = hd**-0.5 if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    return (q * scale) @ k.transpose(-2, -1), v


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, head_dim) -> (B, N, H * head_dim), heads concatenated."""
    B, H, N, hd = out.shape
    return out.transpose(1, 2).reshape(B, N, H * hd)


def attention_varlen_ref(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int,
                         scale: float | None = None) -> torch.Tensor:
    """Multi-head attention over packed variable-length sequences: each sequence attends only to itself.

    A per-sequence loop of :func:`attention_ref` (one host read of ``cu_seqlens``); the spec of
    ``ops.attention(qkv, num_heads, cu_seqlens=...)`` (FlashAttention-2's varlen form, Dao 2023; NaViT,
    Dehghani et al. 2023, "Patch n' Pack").

    Args:
        qkv: (T, 3 * D), T = total tokens of all sequences, each row laid out as (3, H, head_dim).
        cu_seqlens: (S + 1,) int32, cumulative sequence lengths: sequence s is rows cu_seqlens[s]:cu_seqlens[s+1];
            0 first, strictly increasing, T last.
        num_heads: H. scale: softmax scale; default head_dim ** -0.5.

    Returns:
        out: (T, D) in qkv's dtype, heads concatenated.
    """
    bounds = cu_seqlens.tolist()
    outs = [attention_ref(qkv[a:b].unsqueeze(0), num_heads, scale).squeeze(0) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=0) if outs else qkv.new_empty((0, qkv.shape[-1] // 3))


def attention_masked_ref(qkv: torch.Tensor, key_valid: torch.Tensor, num_heads: int,
                         scale: float | None = None) -> torch.Tensor:
    """Multi-head attention on a padded batch with a key-padding mask (timm NaFlex's ``patch_valid`` form).

    Query i of image b attends to the keys j with ``key_valid[b, j]``; the output rows of invalid queries
    (``key_valid[b, i]`` False) are zero, as are the rows of an image with no valid token. On valid rows this is
    timm ``NaFlexVit``'s attention with its symmetric additive mask (``create_attention_mask``).

    Args:
        qkv: (B, N, 3 * D). key_valid: (B, N) bool, True = a real token.
        num_heads: H. scale: softmax scale; default head_dim ** -0.5.

    Returns:
        out: (B, N, D) in qkv's dtype.
    """
    attn, v = _scores(qkv, num_heads, scale)
    attn = attn.masked_fill(~key_valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    attn = attn.nan_to_num(0.0)  # a row with no valid key
    out = _merge_heads(attn @ v)
    return out * key_valid[..., None].to(out.dtype)


def patch_embed_tokens_ref(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None = None,
    pos_index: torch.Tensor | None = None,
    *,
    ids_keep: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding of already-patchified tokens (timm ``NaFlexEmbeds`` with its Linear projection), with
    token selection, mask-token substitution, per-token position rows and prefix tokens.

    ``out = where(mask, mask_token, patches[src] @ weight^T + bias) + pos[pos_index[src]]`` for each kept token
    (the mask token replaces the embedding before the position add, as DINOv2 / iBOT do), with ``prefix`` rows
    (class / register tokens, no position added: NaFlex's form) first in each sequence.

    Args:
        patches: (B, N, K) (timm's NaFlex collator form) or (T, K) packed, K = P * P * C in the collator's
            (ph, pw, C) flat order.
        weight: (D, K), bias: (D,) or None: the projection ``nn.Linear(K, D)``.
        pos: (R, D) position rows (e.g. the learned grid resampled per image size, stacked) or None.
        pos_index: int64 with patches' leading shape ((B, N) or (T,)): the pos row of each patch, -1 = none
            (a padding patch). Required with pos.
        ids_keep: int64 (B, N_keep) indices into each image's N patches (MAE / timm ``PatchDropout``), or (T_keep,)
            indices into the T packed rows; None = keep all. src = the selected patches in this order.
        mask: bool, the output tokens' leading shape ((B, N_out) or (T_out,)), True = replace by mask_token.
        mask_token: (D,), required with mask.
        prefix: (n_prefix, D) rows put first in every sequence (3-D form: every image; 2-D form: every sequence of
            cu_seqlens), or None.
        cu_seqlens: (S + 1,) int32 over the T_out selected packed rows; required with prefix in the 2-D form.

    Returns:
        3-D: (B, n_prefix + N_out, D); 2-D: (T_out + S * n_prefix, D); patches' dtype.
    """
    x = patches
    if ids_keep is not None:
        if x.dim() == 3:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        else:
            x = x.index_select(0, ids_keep)
    out = F.linear(x, weight, bias)
    if mask is not None:
        out = torch.where(mask[..., None], mask_token.to(out.dtype), out)
    if pos is not None:
        idx = pos_index
        if ids_keep is not None:
            idx = idx.gather(1, ids_keep) if idx.dim() == 2 else idx.index_select(0, ids_keep)
        rows = pos.to(out.dtype)[idx.clamp(min=0)] * (idx >= 0)[..., None].to(out.dtype)
        out = out + rows
    if prefix is None:
        return out
    prefix = prefix.to(out.dtype)
    if out.dim() == 3:
        return torch.cat([prefix.expand(out.shape[0], -1, -1), out], dim=1)
    bounds = cu_seqlens.tolist()
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        pieces += [prefix, out[a:b]]
    return torch.cat(pieces, dim=0)


def layernorm_mlp_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = LN_EPS,
    add_residual: bool = True,
    approximate: str = "none",
    norm: str = "layernorm",
) -> torch.Tensor:
    """The MLP half of a pre-norm ViT block: ``x + fc2(gelu(fc1(norm(x))))``.

    Args:
        x: (B, N, D). norm_weight: (D,); norm_bias: (D,) or None. fc1_weight: (D_hidden, D), fc1_bias:
            (D_hidden,) or None. fc2_weight: (D, D_hidden), fc2_bias: (D,) or None. eps: the norm's epsilon
            (timm ViT: 1e-6).
        add_residual: when False, return only the branch ``fc2(gelu(fc1(norm(x))))``.
        approximate: GELU form as ``torch.nn.GELU``: "none" (exact erf, timm's default) or "tanh".
        norm: "layernorm" (``F.layer_norm``) or "rmsnorm" (:func:`rms_norm_ref`, timm's ``RmsNorm``).

    Returns:
        (B, N, D), dtype of ``x``.
    """
    h = _norm_ref(x, norm_weight, norm_bias, eps, norm)
    y = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
    return x + y if add_residual else y


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 eps: float = LN_EPS) -> torch.Tensor:
    """RMSNorm over the last dim, as timm's ``RmsNorm`` (``timm.layers.fast_norm.rms_norm``; Zhang & Sennrich,
    "Root Mean Square Layer Normalization", 2019): ``x * rsqrt(mean(x^2) + eps) * weight`` (+ ``bias``, which
    timm's RmsNorm does not have), in x's dtype, no mean subtraction.

    Args:
        x: (..., D). weight: (D,) or None. bias: (D,) or None. eps: added to the mean square.
    """
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _norm_ref(x, weight, bias, eps, norm: str) -> torch.Tensor:
    if norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if norm == "rmsnorm":
        return rms_norm_ref(x, weight, bias, eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm'; got {norm!r}")


def swiglu_mlp_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = LN_EPS,
    *,
    norm: str = "layernorm",
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_norm_eps: float = LN_EPS,
    add_residual: bool = True,
) -> torch.Tensor:
    """The SwiGLU MLP half of a pre-norm block (Shazeer 2020): ``x + fc2(hnorm(silu(gate) * up))`` with
    ``gate, up`` the two halves of fc1 applied to ``norm(x)``, as timm's ``SwiGLU`` (separate ``fc1_g`` / ``fc1_x``)
    and ``SwiGLUPacked`` (``GluMlp(act_layer=SiLU, gate_last=False)``: one ``fc1`` whose output is chunked, the
    first half the gate) compute it, with timm's optional ``norm`` on the hidden (EVA-02's ``scale_mlp``: a
    LayerNorm over D_hidden before fc2).

    Args:
        x: (B, N, D). norm_weight: (D,); norm_bias: (D,) or None. eps: the pre-norm's epsilon.
        gate_weight, gate_bias: with ``up_weight`` given, the gate Linear, (D_hidden, D) and (D_hidden,) or None;
            with ``up_weight=None``, the packed fc1 of SwiGLUPacked, (2 * D_hidden, D) and (2 * D_hidden,) or None.
        up_weight, up_bias: the up Linear (``fc1_x``), (D_hidden, D) and (D_hidden,) or None; None for packed.
        fc2_weight: (D, D_hidden); fc2_bias: (D,) or None.
        norm: "layernorm" or "rmsnorm" (the pre-norm).
        hidden_norm_weight, hidden_norm_bias: (D_hidden,) LayerNorm on the hidden activations, or None for none.
        hidden_norm_eps: its epsilon.
        add_residual: False returns the branch only.

    Returns:
        (B, N, D), dtype of ``x``.
    """
    h = _norm_ref(x, norm_weight, norm_bias, eps, norm)
    if up_weight is None:
        gate, up = F.linear(h, gate_weight, gate_bias).chunk(2, dim=-1)
    else:
        gate, up = F.linear(h, gate_weight, gate_bias), F.linear(h, up_weight, up_bias)
    z = F.silu(gate) * up
    if hidden_norm_weight is not None:
        z = F.layer_norm(z, (z.shape[-1],), hidden_norm_weight, hidden_norm_bias, hidden_norm_eps)
    y = F.linear(z, fc2_weight, fc2_bias)
    return x + y if add_residual else y


def layernorm_linear_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = LN_EPS,
    norm: str = "layernorm",
) -> torch.Tensor:
    """norm1 + qkv of a pre-norm ViT block: ``linear(layernorm(x), weight, bias)`` (``norm="rmsnorm"``:
    :func:`rms_norm_ref` in place of the LayerNorm).

    Args:
        x: (B, N, D). norm_weight: (D,), norm_bias: (D,) or None. weight: (N_out, D), bias: (N_out,) or None.
        eps: the norm's epsilon (timm ViT: 1e-6).

    Returns:
        (B, N, N_out), dtype of ``x``.
    """
    return F.linear(_norm_ref(x, norm_weight, norm_bias, eps, norm), weight, bias)


def linear_residual_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """The attention output projection plus the residual: ``residual + linear(x, weight, bias)``.

    Args:
        x: (B, N, K). weight: (N_out, K), bias: (N_out,) or None. residual: (B, N, N_out).

    Returns:
        (B, N, N_out), dtype of ``x``.
    """
    return residual + F.linear(x, weight, bias)


def attention_block_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    num_heads: int,
    scale: float | None = None,
    eps: float = LN_EPS,
) -> torch.Tensor:
    """The attention half of a pre-norm ViT block, ``x + proj(MSA(layernorm(x)))``, composed from
    :func:`layernorm_linear_ref`, :func:`attention_ref` and :func:`linear_residual_ref`.

    Args:
        x: (B, N, D). norm_weight, norm_bias: (D,). qkv_weight: (3 * D, D), qkv_bias: (3 * D,) or None.
        proj_weight: (D, D), proj_bias: (D,) or None. num_heads: H. scale: softmax scale (default
        head_dim ** -0.5). eps: LayerNorm epsilon.

    Returns:
        (B, N, D), dtype of ``x``.
    """
    qkv = layernorm_linear_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, eps)
    return linear_residual_ref(attention_ref(qkv, num_heads, scale), proj_weight, proj_bias, x)


ROPE_LAYOUTS = ("interleaved", "half")


def rope_angles(rows: int, coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The RoPE angles of ``rows`` token rows: theta (rows, Hr, P), fp32, P = head_dim / 2.

    ``theta[m, h, j] = coords[m % Nc, 0] * freqs[h, j, 0] + coords[m % Nc, 1] * freqs[h, j, 1]``.
    coords: (Nc, 2) per-token (y, x); freqs: (Hr, P, 2), Hr in {1, H}. Both are used in fp32.
    """
    c = coords.float()
    if rows != c.shape[0]:
        c = c[torch.arange(rows, device=c.device) % c.shape[0]]
    f = freqs.float()
    return c[:, 0, None, None] * f[None, :, :, 0] + c[:, 1, None, None] * f[None, :, :, 1]


def rope_ref(qkv: torch.Tensor, coords: torch.Tensor, freqs: torch.Tensor, num_heads: int,
             layout: str = "interleaved") -> torch.Tensor:
    """2-D rotary position embedding (Su et al. 2021, RoFormer; axial / mixed 2-D forms: EVA-02, Fang et al. 2023,
    Heo et al. 2024; DINOv3, Simeoni et al. 2025) applied to the q and k sections of a packed qkv tensor.

    For every token row m, head h and pair j in [0, head_dim / 2), with (a, b) = (2j, 2j + 1) for layout
    "interleaved" or (j, j + head_dim / 2) for layout "half" (timm's ``rotate_half``), inside head h of q (columns
    [0, D)) and of k (columns [D, 2D)); v (columns [2D, 3D)) passes through:

        out[a] = x[a] cos(theta) - x[b] sin(theta),    out[b] = x[b] cos(theta) + x[a] sin(theta)
        theta  = coords[m % Nc, 0] * freqs[h', j, 0] + coords[m % Nc, 1] * freqs[h', j, 1],  h' = h if Hr > 1 else 0

    Rows with coords (0, 0) (class / register tokens) are left unchanged (theta = 0).

    Args:
        qkv: (..., 3 * D), D = num_heads * head_dim, laid out (..., 3, H, head_dim) like timm's qkv Linear; the
            leading dims flatten to M rows (a dense batch (B, N, 3D): row m = b * N + n, so Nc = N gives token n
            the coordinates coords[n]). fp32 | fp16 | bf16.
        coords: (Nc, 2) per-token (y, x) positions, fp32 (M % Nc == 0 is not required).
        freqs: (Hr, head_dim / 2, 2) angular frequencies for (y, x), fp32; Hr = 1 (shared by the heads) or H.
        num_heads: H.
        layout: "interleaved" | "half".

    Returns:
        The rotated qkv: same shape and dtype (the rotation computed in fp32, one rounding to qkv's dtype).
        Differentiable with respect to qkv, coords and freqs.

    Raises:
        ValueError: a bad layout, a last dim not 3 * H * head_dim with head_dim even, or coords / freqs of the
            wrong shape.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}; got {layout!r}")
    three_d = qkv.shape[-1]
    if three_d % (3 * num_heads) or (three_d // (3 * num_heads)) % 2:
        raise ValueError(f"qkv's last dim must be 3 * num_heads * head_dim with head_dim even; got {three_d} "
                         f"with num_heads={num_heads}")
    hd = three_d // (3 * num_heads)
    if coords.dim() != 2 or coords.shape[1] != 2 or coords.shape[0] < 1:
        raise ValueError(f"coords must be (Nc, 2); got {tuple(coords.shape)}")
    if freqs.dim() != 3 or freqs.shape[0] not in (1, num_heads) or tuple(freqs.shape[1:]) != (hd // 2, 2):
        raise ValueError(f"freqs must be (1 or H={num_heads}, head_dim/2={hd // 2}, 2); got {tuple(freqs.shape)}")
    lead = qkv.shape[:-1]
    x = qkv.reshape(-1, 3, num_heads, hd)
    theta = rope_angles(x.shape[0], coords, freqs)[:, None]  # (M, 1, Hr, P): q and k alike
    cos, sin = theta.cos(), theta.sin()
    qk = x[:, :2].float()
    if layout == "interleaved":
        a, b = qk[..., 0::2], qk[..., 1::2]
        qk = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = qk[..., : hd // 2], qk[..., hd // 2:]
        qk = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([qk.to(qkv.dtype), x[:, 2:]], dim=1).reshape(*lead, three_d)


# ----------------------------------------------------------------------------------------------------------------
# the whole ViT, following timm's VisionTransformer
# ----------------------------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (Huang et al. 2016; timm ``drop_path``): zero whole samples, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth module (timm's ``DropPath``); identity when ``drop_prob == 0`` or in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a stride-P Conv2d (timm ``PatchEmbed``; parameter ``proj``).

    Input (B, C, H, W); output (B, N, D) with ``flatten=True``, else (B, gh, gw, D) (timm's ``output_fmt='NHWC'``,
    used with ``dynamic_img_size``); gh, gw = ``dynamic_feat_size((H, W))``, N = gh * gw.

    ``strict_img_size``: (H, W) must equal ``img_size``; otherwise H and W must be multiples of P, unless
    ``dynamic_img_pad``, which zero-pads the right / bottom to a multiple of P (timm ``PatchEmbed``).

    Raises:
        ValueError: non-square patch; img_size not a multiple of patch_size (without dynamic_img_pad); from
            ``check_input``: wrong channel count or image size.
    """

    def __init__(self, img_size: int | tuple = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, strict_img_size: bool = True, dynamic_img_pad: bool = False,
                 flatten: bool = True, norm: "NormSpec | None" = None):
        super().__init__()
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square; got {self.patch_size}")
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.flatten = flatten
        self.in_chans = in_chans
        self._init_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm.make(embed_dim) if norm is not None else nn.Identity()  # timm's embed norm (AIMv2)

    def _init_img_size(self, img_size) -> None:
        img_size = _pair(img_size)
        if not self.dynamic_img_pad:
            for s, p in zip(img_size, self.patch_size):
                if s % p:
                    raise ValueError(f"img_size {img_size} must be a multiple of patch_size {self.patch_size} "
                                     "(or pass dynamic_img_pad=True)")
        self.img_size = img_size
        self.grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])  # floor, as timm
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def set_input_size(self, img_size: int | tuple | None = None) -> None:
        """Change the nominal input resolution (img_size, grid_size, num_patches); the weights are unchanged."""
        if img_size is not None:
            self._init_img_size(img_size)

    def dynamic_feat_size(self, img_size: tuple) -> tuple:
        """Patch grid (gh, gw) of an (H, W) image: ceil(H / P) with dynamic_img_pad, else floor, as timm."""
        P = self.patch_size[0]
        if self.dynamic_img_pad:
            return -(-img_size[0] // P), -(-img_size[1] // P)
        return img_size[0] // P, img_size[1] // P

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, in_chans, H, W) with (H, W) == img_size (strict_img_size), or H and
        W multiples of P (unless dynamic_img_pad)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"images must be (B, C={self.in_chans}, H, W); got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if self.strict_img_size:
            if (H, W) != self.img_size:
                raise ValueError(f"images must be {self.img_size[0]}x{self.img_size[1]} (img_size); got {H}x{W} "
                                 "(dynamic_img_size=True accepts any size)")
        elif not self.dynamic_img_pad and (H % self.patch_size[0] or W % self.patch_size[1]):
            raise ValueError(f"image height and width must be multiples of the patch size {self.patch_size[0]}; "
                             f"got {H}x{W} (dynamic_img_pad=True pads them)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.dynamic_img_pad:
            P = self.patch_size[0]
            x = F.pad(x, (0, (P - x.shape[-1] % P) % P, 0, (P - x.shape[-2] % P) % P))
        x = self.proj(x)  # (B, D, gh, gw)
        return self.norm(x.flatten(2).transpose(1, 2) if self.flatten else x.permute(0, 2, 3, 1))


class Attention(nn.Module):
    """Multi-head self-attention (timm ``Attention``; parameters ``qkv``, ``proj``).

    Input and output (B, N, D). ``fused_attn=True`` uses ``F.scaled_dot_product_attention`` (timm's default),
    False the explicit softmax(q k^T * scale) v. ``qk_norm`` adds norms ``q_norm`` / ``k_norm`` over head_dim (of
    the block's norm kind, ``norm``); ``proj_bias=False`` drops the output projection's bias (AIMv2).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused_attn: bool = True, qk_norm: bool = False, proj_bias: bool = True,
                 norm: "NormSpec | None" = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # qk_norm (Dehghani et al. 2023, ViT-22B): LayerNorm over head_dim on q and k
        norm = norm or NormSpec()
        self.q_norm = norm.make(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm.make(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class RmsNorm(nn.Module):
    """RMSNorm over the last dim (timm ``RmsNorm``; parameter ``weight`` (D,), ones): see :func:`rms_norm_ref`."""

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.normalized_shape, self.eps, self.elementwise_affine = (channels,), eps, affine
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, eps=self.eps)


class NormSpec(NamedTuple):
    """A norm layer as this package builds it: ``kind`` "layernorm" (``nn.LayerNorm``, weight and bias) or
    "rmsnorm" (:class:`RmsNorm`), and ``eps``."""

    kind: str = "layernorm"
    eps: float = LN_EPS

    def make(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=self.eps) if self.kind == "layernorm" else RmsNorm(dim, eps=self.eps)


# timm's pools for the models with the full set (EVA, NaFlexVit); VisionTransformer keeps its own narrower list
GLOBAL_POOLS = ("", "avg", "avgmax", "max", "token", "map")


def reset_pool_and_head(model: nn.Module, num_classes: int, global_pool: str | None, has_class_token: bool,
                        like: torch.Tensor) -> None:
    """timm's ``reset_classifier`` for models with :data:`GLOBAL_POOLS` (EVA, NaFlexVit): optionally a new
    ``global_pool`` (dropping ``attn_pool`` unless it is "map"), then a fresh ``Linear(D, num_classes)`` head
    (Identity for 0) on ``like``'s device and dtype, in ``model``'s train / eval mode.

    Raises:
        ValueError: a global_pool not in :data:`GLOBAL_POOLS`; "token" without a class token; "map" on a model built
            without the attention pool.
    """
    if global_pool is not None:
        if global_pool not in GLOBAL_POOLS or (global_pool == "token" and not has_class_token):
            raise ValueError(f"global_pool={global_pool!r} is not valid for this model")
        if global_pool == "map" and model.attn_pool is None:
            raise ValueError("cannot add attention pooling in reset_classifier()")
        if global_pool != "map":
            model.attn_pool = None
        model.global_pool = global_pool
    model.num_classes = num_classes
    model.head = nn.Linear(model.embed_dim, num_classes, device=like.device, dtype=like.dtype) \
        if num_classes > 0 else nn.Identity()
    model.head.train(model.training)


def resolve_norm_layer(norm_layer, default_eps: float = LN_EPS) -> NormSpec:
    """The :class:`NormSpec` of a timm ``norm_layer`` argument: None (LayerNorm, ``default_eps``); "layernorm" |
    "rmsnorm" (timm's eps 1e-6); ``nn.LayerNorm``, timm's ``LayerNorm`` / ``RmsNorm`` or this package's
    :class:`RmsNorm`, or a ``functools.partial`` of one with ``eps=``; a :class:`NormSpec`.

    Raises:
        NotImplementedError: any other norm (e.g. timm's ``LayerNormFp32``, ``RmsNormFp32``, a norm without affine
            parameters).
    """
    if norm_layer is None:
        return NormSpec("layernorm", default_eps)
    if isinstance(norm_layer, NormSpec):
        return norm_layer
    if isinstance(norm_layer, str):
        key = norm_layer.lower().replace("_", "")
        if key in ("layernorm", "rmsnorm"):
            return NormSpec(key, 1e-6)
    elif callable(norm_layer):
        with torch.device("meta"):
            m = norm_layer(8)
        name = type(m).__name__
        if name == "LayerNorm" and isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None:
            return NormSpec("layernorm", float(m.eps))
        if name == "RmsNorm" and getattr(m, "weight", None) is not None:
            return NormSpec("rmsnorm", float(m.eps))
    raise NotImplementedError(f"norm_layer={norm_layer!r} is not supported by fastvit_kernels (supported: LayerNorm "
                              "and RmsNorm with affine parameters, any eps)")


def norm_spec_of(module: nn.Module) -> NormSpec | None:
    """The :class:`NormSpec` of a built norm module (torch / timm LayerNorm, timm / this package's RmsNorm), None
    for ``nn.Identity``.

    Raises:
        NotImplementedError: another module.
    """
    if isinstance(module, nn.Identity):
        return None
    return resolve_norm_layer(lambda dim: module, LN_EPS)


def activation(act_layer, default: str = "gelu") -> nn.Module:
    """The activation module of a timm ``act_layer`` argument, for the gated MLPs and the attention-pool MLP:
    None (``default``), "gelu", "gelu_tanh", "silu" / "swish", "sigmoid", a module class (``nn.GELU``,
    ``nn.SiLU``, timm's ``GELU`` / ``GELUTanh`` / ``SiLU``) or a ``functools.partial`` of one.

    Raises:
        NotImplementedError: any other activation.
    """
    table = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
             "swish": nn.SiLU, "sigmoid": nn.Sigmoid}
    if act_layer is None:
        act_layer = default
    if isinstance(act_layer, str) and act_layer in table:
        return table[act_layer]()
    if callable(act_layer) and not isinstance(act_layer, str):
        act = act_layer()
        if isinstance(act, (nn.GELU, nn.SiLU, nn.Sigmoid)):
            return act
        name = type(act).__name__
        if name in ("GELU", "GELUTanh", "SiLU", "Swish", "Sigmoid"):  # timm.layers.activations
            return {"GELU": nn.GELU(), "GELUTanh": nn.GELU(approximate="tanh")}.get(name, table.get(
                name.lower(), nn.SiLU)())
    raise NotImplementedError(f"act_layer={act_layer!r} is not supported by fastvit_kernels (supported: GELU, "
                              "GELU tanh, SiLU, Sigmoid)")


def resolve_mlp_layer(mlp_layer) -> tuple[str, bool | None]:
    """The MLP kind of a timm ``mlp_layer`` argument: ("mlp", None) for None / ``Mlp``; ("swiglu", None) for
    ``SwiGLU`` (or "swiglu"); ("glu", gate_last) for ``GluMlp`` or a ``functools.partial`` of it
    (``SwiGLUPacked``: gate_last False; or "swiglu_packed"), timm's classes or this package's.

    Raises:
        NotImplementedError: any other MLP layer.
    """
    import functools

    if mlp_layer is None or mlp_layer == "mlp":
        return "mlp", None
    if mlp_layer == "swiglu":
        return "swiglu", None
    if mlp_layer == "swiglu_packed":
        return "glu", False
    func, kw = (mlp_layer.func, mlp_layer.keywords) if isinstance(mlp_layer, functools.partial) else (mlp_layer, {})
    name = getattr(func, "__name__", "")
    if name == "Mlp" and not kw:
        return "mlp", None
    if name == "SwiGLU" and not set(kw) - {"act_layer"}:
        return "swiglu", None
    if name == "GluMlp" and not set(kw) - {"act_layer", "gate_last"}:
        return "glu", kw.get("gate_last", True)
    raise NotImplementedError(f"mlp_layer={mlp_layer!r} is not supported by fastvit_kernels (supported: Mlp, SwiGLU, "
                              "GluMlp / SwiGLUPacked)")


def gelu_approximate(act_layer) -> str:
    """The GELU form ("none" = exact erf | "tanh") of a timm ``act_layer`` argument: None, "gelu", "gelu_tanh",
    ``nn.GELU``, ``functools.partial(nn.GELU, approximate="tanh")``, or timm's ``GELU`` / ``GELUTanh`` classes.

    Raises:
        NotImplementedError: any other activation (the fused MLP computes GELU only).
    """
    if act_layer is None or act_layer == "gelu":
        return "none"
    if act_layer == "gelu_tanh":
        return "tanh"
    if callable(act_layer) and not isinstance(act_layer, str):
        act = act_layer()
        if isinstance(act, nn.GELU):
            return act.approximate
        name = type(act).__name__
        if name in ("GELU", "GELUTanh"):  # timm.layers.activations: F.gelu / F.gelu(approximate="tanh")
            return "tanh" if name == "GELUTanh" else "none"
    raise NotImplementedError(f"act_layer={act_layer!r} is not supported by fastvit_kernels (supported: GELU, exact "
                              "or tanh: None, 'gelu', 'gelu_tanh', nn.GELU, partial(nn.GELU, approximate='tanh'))")


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> norm -> fc2 -> dropout (timm ``Mlp``; parameters ``fc1``, ``fc2``, and ``norm``
    when ``norm`` is given: NormFormer's MLP norm, EVA-02 / timm ``scale_mlp``). ``approximate``: the GELU form,
    "none" (exact erf, timm's default) or "tanh"; ``act`` replaces the GELU by another activation module (the
    attention-pool head's MLP); ``bias``: fc1 / fc2 biases. Input and output (..., in_features)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, approximate: str = "none",
                 bias: bool = True, norm: "NormSpec | None" = None, act: nn.Module | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act if act is not None else nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.norm = norm.make(hidden_features) if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """Gated MLP with separate gate and value projections (timm ``SwiGLU``; Shazeer 2020, "GLU Variants Improve
    Transformer"): ``fc2(norm(drop(act(fc1_g(x)) * fc1_x(x))))``, then dropout. Parameters ``fc1_g``, ``fc1_x``
    (D_hidden, D), ``fc2`` (D, D_hidden), ``norm`` (D_hidden; EVA-02's ``scale_mlp``); ``act`` SiLU by default;
    ``align_to`` rounds D_hidden up to a multiple (timm). Input and output (..., D)."""

    def __init__(self, in_features: int, hidden_features: int, act: nn.Module | None = None,
                 norm: "NormSpec | None" = None, bias: bool = True, drop: float = 0.0, align_to: int = 0):
        super().__init__()
        if align_to:
            hidden_features += -hidden_features % align_to
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act if act is not None else nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm.make(hidden_features) if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class GluMlp(nn.Module):
    """Gated MLP with one packed fc1 (timm ``GluMlp``; ``SwiGLUPacked`` is ``act=SiLU, gate_last=False``):
    ``h = fc1(x)`` (D_hidden), split in halves (a, b); ``fc2(norm(drop(a * act(b))))`` when ``gate_last`` else
    ``act(a) * b``; then dropout. Parameters ``fc1`` (D_hidden, D), ``fc2`` (D, D_hidden / 2), ``norm``.
    Input and output (..., D).

    Raises:
        ValueError: odd hidden_features.
    """

    def __init__(self, in_features: int, hidden_features: int, act: nn.Module | None = None,
                 norm: "NormSpec | None" = None, bias: bool = True, drop: float = 0.0, gate_last: bool = True):
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"GluMlp needs an even hidden_features; got {hidden_features}")
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act if act is not None else nn.Sigmoid()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm.make(hidden_features // 2) if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        x = a * self.act(b) if self.gate_last else self.act(a) * b
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with one learned latent query (timm ``AttentionPoolLatent``, the 'map' head of
    SigLIP, Zhai et al. 2023, and PE, Bolya et al. 2025):

        q = q(latent) (1, D);  k, v = kv(x);  o = proj(MHA(q, k, v));  y = o + mlp(norm(o))

    Parameters (timm's names): ``latent`` (1, 1, D), ``q``, ``kv``, ``proj``, ``norm``, ``mlp.fc1`` / ``mlp.fc2``.
    Input (B, N, D); output (B, D) (the latent token). Eager PyTorch (one query row: no fused kernel).

    Raises:
        ValueError: D not divisible by num_heads.
    """

    def __init__(self, in_features: int, num_heads: int = 8, mlp_ratio: float = 4.0, norm: "NormSpec | None" = None,
                 act: nn.Module | None = None, qkv_bias: bool = True, drop: float = 0.0):
        super().__init__()
        if in_features % num_heads:
            raise ValueError(f"attention pool: {in_features} not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, in_features // num_heads
        self.scale = self.head_dim**-0.5
        self.latent_len = 1
        self.latent = nn.Parameter(torch.zeros(1, 1, in_features))
        self.q = nn.Linear(in_features, in_features, bias=qkv_bias)
        self.kv = nn.Linear(in_features, 2 * in_features, bias=qkv_bias)
        self.proj = nn.Linear(in_features, in_features)
        self.proj_drop = nn.Dropout(drop)
        self.norm = (norm or NormSpec()).make(in_features)
        self.mlp = Mlp(in_features, int(in_features * mlp_ratio), act=act)
        nn.init.trunc_normal_(self.latent, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd)
        k, v = self.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        o = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, 1, D)))
        return (o + self.mlp(self.norm(o)))[:, 0]


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``x * gamma`` (Touvron et al. 2021, CaiT; timm ``LayerScale``, parameter
    ``gamma`` (D,) initialised to ``init_values``). Input and output (..., D)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block``): z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'.

    Input and output (B, N, D). ``init_values`` adds LayerScale (``ls1.gamma``, ``ls2.gamma``); ``qk_norm`` adds
    ``attn.q_norm`` / ``attn.k_norm``; ``act_layer``: the MLP's activation (GELU for ``Mlp``, see
    :func:`gelu_approximate`; GELU / SiLU / Sigmoid for the gated MLPs); ``norm_layer`` (see
    :func:`resolve_norm_layer`): norm1, norm2 and qk_norm; ``mlp_layer``: ``Mlp``, ``SwiGLU`` or ``GluMlp`` /
    ``SwiGLUPacked`` (see :func:`resolve_mlp_layer`; hidden width ``int(dim * mlp_ratio)`` as timm);
    ``proj_bias=False``: no bias on attn.proj and the MLP's Linears (AIMv2).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, fused_attn: bool = True,
                 init_values: float | None = None, qk_norm: bool = False, act_layer=None, norm_layer=None,
                 mlp_layer=None, proj_bias: bool = True):
        super().__init__()
        norm = resolve_norm_layer(norm_layer)
        kind, gate_last = resolve_mlp_layer(mlp_layer)
        self.norm1 = norm.make(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn, qk_norm, proj_bias, norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm.make(dim)
        hidden = int(dim * mlp_ratio)
        if kind == "mlp":
            self.mlp = Mlp(dim, hidden, proj_drop, gelu_approximate(act_layer), bias=proj_bias)
        elif kind == "swiglu":
            self.mlp = SwiGLU(dim, hidden, activation(act_layer), bias=proj_bias, drop=proj_drop)
        else:
            self.mlp = GluMlp(dim, hidden, activation(act_layer), bias=proj_bias, drop=proj_drop, gate_last=gate_last)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# Constructor arguments of timm's VisionTransformer that this package does not implement (yet), with the value
# that means "off". Any other value raises: never silently different from timm.
_UNSUPPORTED_DEFAULTS = {
    "pre_norm": False, "patch_drop_rate": 0.0,
    "embed_layer": None, "weight_init": "",
    "fix_init": False, "attn_layer": None, "pos_embed": "learn",
    "scale_attn_norm": False, "scale_mlp_norm": False, "ls_init_values": None, "pool_include_prefix": False,
}


class VisionTransformer(nn.Module):
    """Vision Transformer with timm's constructor, parameter names and computation (the reference model).

    Args (timm's names): img_size, patch_size, in_chans, num_classes, global_pool ('token' | 'avg' | ''),
        embed_dim (D), depth, num_heads (H), mlp_ratio, qkv_bias, class_token, fc_norm (None = timm's rule:
        LayerNorm after pooling for 'avg'), final_norm, drop_rate (head dropout), pos_drop_rate,
        proj_drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over depth, as timm),
        block_fn (the block class), fused_attn (SDPA vs explicit softmax), act_layer (the MLP activation: GELU,
        exact or tanh; see :func:`gelu_approximate`; GELU / SiLU for the gated MLPs), init_values (LayerScale),
        qk_norm, norm_layer (LayerNorm or RmsNorm, any eps: :func:`resolve_norm_layer`), mlp_layer (``Mlp``,
        ``SwiGLU``, ``GluMlp`` / ``SwiGLUPacked``: :func:`resolve_mlp_layer`), proj_bias (False: no bias on
        attn.proj and the MLP Linears, AIMv2, Fini et al. 2024), embed_norm_layer (a norm after the patch
        embedding, ``patch_embed.norm``, AIMv2), global_pool 'map' (:class:`AttentionPoolLatent` ``attn_pool`` on
        the patch tokens, SigLIP, Zhai et al. 2023); the token layout and resolution
        options (timm's): reg_tokens (K register tokens, parameter ``reg_token`` (1, K, D)), no_embed_class
        (pos_embed (1, N, D) on the patch tokens only; else (1, prefix + N, D) on every token, registers
        included), dynamic_img_size (any (H, W) at forward time, pos_embed resampled on the fly with
        :func:`resample_abs_pos_embed`), dynamic_img_pad (zero-pad H, W to multiples of P, right / bottom).
        ``num_prefix_tokens`` = class token (0 / 1) + K.

    Input: images (B, in_chans, H, W), float; (H, W) == img_size unless dynamic_img_size. Output: logits
    (B, num_classes) (pooled features (B, D) when num_classes == 0).

    Raises:
        ValueError: embed_dim not divisible by num_heads; img_size not a multiple of patch_size (without
            dynamic_img_pad, or with it but without dynamic_img_size: the padded grid would not match pos_embed,
            where timm fails at forward time); a bad global_pool; class_token=False with global_pool='token';
            reg_tokens < 0.
        NotImplementedError: a timm option this package does not implement, set to a non-default value.
    """

    def __init__(
        self,
        img_size: int | tuple = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        fc_norm: bool | None = None,
        final_norm: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        block_fn: Callable[..., nn.Module] = Block,
        fused_attn: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        init_values: float | None = None,
        qk_norm: bool = False,
        act_layer=None,
        norm_layer=None,
        mlp_layer=None,
        proj_bias: bool = True,
        embed_norm_layer=None,
        **unsupported,
    ):
        super().__init__()
        for name, value in unsupported.items():
            if name not in _UNSUPPORTED_DEFAULTS:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            if value != _UNSUPPORTED_DEFAULTS[name]:
                raise NotImplementedError(
                    f"{name}={value!r} is not supported by fastvit_kernels yet (supported: "
                    f"{_UNSUPPORTED_DEFAULTS[name]!r})"
                )
        if global_pool not in ("token", "avg", "", "map"):
            raise ValueError(f"global_pool must be 'token', 'avg', 'map' or ''; got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        norm = resolve_norm_layer(norm_layer)
        embed_norm = resolve_norm_layer(embed_norm_layer) if embed_norm_layer is not None else None
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0; got {reg_tokens}")
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        # dynamic_img_size: any input size (timm: strict_img_size=False, output_fmt='NHWC' so _pos_embed sees the grid)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size,
                                      dynamic_img_pad=dynamic_img_pad, flatten=not dynamic_img_size,
                                      norm=embed_norm)
        if dynamic_img_pad and not dynamic_img_size and self.patch_embed.img_size != tuple(
                g * p for g, p in zip(self.patch_embed.grid_size, self.patch_embed.patch_size)):
            raise ValueError(f"img_size {self.patch_embed.img_size} is not a multiple of patch_size "
                             f"{self.patch_embed.patch_size}: the padded patch grid would not match pos_embed; "
                             "use dynamic_img_size=True with dynamic_img_pad=True")
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth, as timm
        self.blocks = nn.Sequential(*[
            block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], fused_attn,
                     init_values, qk_norm, act_layer=act_layer, norm_layer=norm, mlp_layer=mlp_layer,
                     proj_bias=proj_bias)
            for i in range(depth)
        ])
        self.norm = norm.make(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm, activation(act_layer)) \
            if global_pool == "map" else None
        self.fc_norm = norm.make(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ('') init: trunc-normal(0.02) pos_embed and Linear weights, zero Linear biases,
        cls_token and reg_token N(0, 1e-6); Conv2d and LayerNorm keep PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant), as timm."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay, as timm."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def set_input_size(self, img_size: int | tuple | None = None, patch_size: int | tuple | None = None) -> None:
        """Change the input resolution, resampling pos_embed to the new patch grid (timm ``set_input_size``:
        bicubic, antialias, prefix tokens kept). The result is a new ``pos_embed`` Parameter.

        Raises:
            NotImplementedError: a new patch_size (timm resamples the patch-embedding kernel; not implemented).
            ValueError: img_size not a multiple of the patch size (without dynamic_img_pad).
        """
        if patch_size is not None and _pair(patch_size) != self.patch_embed.patch_size:
            raise NotImplementedError("set_input_size(patch_size=...) is not supported by fastvit_kernels")
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if self.patch_embed.grid_size != prev_grid or self.pos_embed.shape[1] != self.patch_embed.num_patches + num_prefix:
            with torch.no_grad():
                new = resample_abs_pos_embed(self.pos_embed, self.patch_embed.grid_size, prev_grid, num_prefix)
            self.pos_embed = nn.Parameter(new)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix tokens and position embedding, as timm's ``_pos_embed``. x: patch tokens (B, N, D), or
        (B, gh, gw, D) with dynamic_img_size (pos_embed resampled from grid_size to (gh, gw))."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            B, gh, gw, D = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, (gh, gw), self.patch_embed.grid_size,
                                               0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.reshape(B, gh * gw, D)
        if self.no_embed_class:  # DeiT-3 / big_vision: add to the patches, then prepend class / register tokens
            x = x + pos_embed
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
        else:  # original ViT: prepend, then add (class and register tokens get a position embedding too)
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            x = x + pos_embed
        return self.pos_drop(x)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D): patch embedding, class / register tokens, position
        add."""
        return self._pos_embed(self.patch_embed(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        x = self.norm_pre(self.embed(images))
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:  # non-reentrant: works with torch.compile and the custom ops' autograd
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | list | tuple | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs for dense / feature-pyramid use, with timm's signature and semantics.

        Args:
            images: (B, C, H, W).
            indices: the last ``n`` blocks when an int (default: all), or a list of block indices (negative ok).
            return_prefix_tokens: also return each intermediate's prefix (class / register) tokens.
            norm: apply the final norm to each intermediate.
            stop_early: stop running blocks after the last requested one (only with intermediates_only).
            output_fmt: 'NCHW' -> (B, D, gh, gw) or 'NLC' -> (B, N, D) patch tokens.
            intermediates_only: return only the list of intermediates.

        Returns:
            list of intermediates (or of (intermediate, prefix (B, prefix, D)) pairs); unless intermediates_only,
            ``(final normalised tokens (B, prefix + N, D), intermediates)``.

        Raises:
            ValueError: a bad output_fmt or an index outside [-depth, depth).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices} must be in [1, depth={depth}] as a count of last blocks")
            take = list(range(depth - indices, depth))
        else:
            take = []
            for i in indices:
                if not -depth <= i < depth:
                    raise ValueError(f"block index {i} out of range for depth {depth}")
                take.append(i % depth)
        B, _, H, W = images.shape
        gh, gw = self.patch_embed.dynamic_feat_size((H, W))
        x = self.norm_pre(self.embed(images))
        last = max(take) if (stop_early and intermediates_only) else depth - 1
        intermediates = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    y = y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter-name groups for layer-wise learning-rate decay, as timm (stem, blocks, final norm)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^reg_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        """The classification head (``head``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh Linear(D, num_classes) (Identity for 0); optionally change global_pool.

        Raises:
            ValueError: a bad global_pool (as the constructor).
        """
        if global_pool is not None:
            if global_pool not in ("token", "avg", "", "map"):
                raise ValueError(f"global_pool must be 'token', 'avg', 'map' or ''; got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs class_token=True")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' needs a model built with it (the attention pool's weights)")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        self.num_classes = num_classes
        dev = self.pos_embed.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev, dtype=self.pos_embed.dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, prefix + N, D) -> logits (B, num_classes), or pooled features (B, D) if pre_logits."""
        if self.attn_pool is not None:  # 'map': attention pooling of the patch tokens
            x = self.attn_pool(x[:, self.num_prefix_tokens:])
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ----------------------------------------------------------------------------------------------------------------
# resolution: resampling the absolute position embedding (timm ``resample_abs_pos_embed``, checkpoint_filter_fn)
# ----------------------------------------------------------------------------------------------------------------
def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: int | tuple,
    old_size: int | tuple | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a ViT's absolute position embedding to a new patch grid, keeping the prefix tokens' rows.

    The algorithm of timm's ``timm.layers.pos_embed.resample_abs_pos_embed``: split off the first
    ``num_prefix_tokens`` rows (class / register tokens), view the rest as an image (1, D, gh, gw) in fp32,
    ``F.interpolate`` it to ``new_size`` (bicubic with antialias by default, align_corners=False), flatten it back
    row-major and re-attach the prefix rows. Differentiable (used on the fly by ``dynamic_img_size`` models).

    Args:
        posemb: (1, num_prefix_tokens + gh * gw, D), any float dtype (kept).
        new_size: (new_gh, new_gw) or an int for a square grid.
        old_size: (gh, gw); None assumes a square grid (as timm).
        num_prefix_tokens: leading rows that are not on the grid (0 for ``no_embed_class`` models).
        interpolation, antialias: ``F.interpolate`` mode and antialias flag (timm's defaults).

    Returns:
        (1, num_prefix_tokens + new_gh * new_gw, D) in posemb's dtype; ``posemb`` itself when the grids are equal
        (timm also returns it unchanged when the token count already matches a square new grid).

    Raises:
        ValueError: posemb is not (1, T, D); its token count does not match old_size (or is not a square when
            old_size is None).
    """
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be (1, T, D); got {tuple(posemb.shape)}")
    n_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(f"posemb has {n_grid} grid tokens (after {num_prefix_tokens} prefix tokens), not a "
                             "square number: pass old_size=(gh, gw)")
        old_size = (side, side)
    old_size, new_size = _pair(old_size), _pair(new_size)
    if old_size[0] * old_size[1] != n_grid:
        raise ValueError(f"posemb has {n_grid} grid tokens but old_size={old_size} has {old_size[0] * old_size[1]}")
    if old_size == new_size:
        return posemb
    D = posemb.shape[-1]
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], D).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def resample_state_dict(state_dict: dict, model: nn.Module, old_grid_size: int | tuple | None = None) -> dict:
    """A copy of ``state_dict`` whose ``pos_embed`` is resampled to ``model``'s patch grid, so a checkpoint trained
    at another resolution loads with ``model.load_state_dict(..., strict=True)`` (the resampling step of timm's
    ``checkpoint_filter_fn``: bicubic, antialias, prefix tokens kept; none for ``no_embed_class`` models).

    Args:
        state_dict: timm / fastvit_kernels ViT state_dict (tensors are not copied, except the new pos_embed).
        model: the target VisionTransformer / FastViT (its ``patch_embed.grid_size``, ``num_prefix_tokens``,
            ``no_embed_class``).
        old_grid_size: the checkpoint's patch grid (gh, gw); None assumes a square grid.

    Raises:
        ValueError: from :func:`resample_abs_pos_embed` (token count that does not fit the grid).
    """
    out = dict(state_dict)
    v = out.get("pos_embed")
    if v is None or getattr(model, "pos_embed", None) is None:
        return out
    new_grid = tuple(model.patch_embed.grid_size)
    if tuple(v.shape) != tuple(model.pos_embed.shape) or (old_grid_size is not None and _pair(old_grid_size) != new_grid):
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        with torch.no_grad():
            out["pos_embed"] = resample_abs_pos_embed(v, new_grid, old_grid_size, num_prefix)
    return out
