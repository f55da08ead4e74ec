"""Plain eager PyTorch: the spec every kernel is held to, the CPU path, and the baseline of the benchmarks.

* ``patch_embed_ref``, ``attention_ref``, ``layernorm_mlp_ref``: one function per fused op, same arguments and
  semantics as the op in :mod:`fastvit_kernels.ops`.
* ``VisionTransformer``: a ViT that follows timm's ``VisionTransformer`` computation step for step (timm 1.0,
  ``timm/models/vision_transformer.py``; Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021):
  Conv2d patch embedding, class token then position add, pre-norm blocks
  ``x = x + drop_path(ls1(attn(norm1(x)))); x = x + drop_path(ls2(mlp(norm2(x))))``, LayerNorm eps 1e-6, exact
  erf GELU, final norm, 'token' or 'avg' pooling. Parameter names and shapes are timm's, so a timm state_dict
  loads with ``strict=True``. :class:`fastvit_kernels.FastViT` subclasses it and changes only the compute.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

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
) -> torch.Tensor:
    """Patch embedding + class token + position add, as timm does it (Conv2d, flatten, transpose, cat, add).

    Args:
        images: (B, C, H, W); H and W multiples of P.
        weight: (D, C, P, P) Conv2d weight. bias: (D,) or None.
        pos_embed: (1, 1 + N, D) with a class token, (1, N, D) without; N = (H / P) * (W / P).
        cls_token: (1, 1, D) or None.

    Returns:
        tokens: (B, 1 + N, D) (or (B, N, D) without class token), dtype of ``images``.
    """
    P = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=P)  # (B, D, H/P, W/P)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
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
    B, N, three_d = qkv.shape
    D = three_d // 3
    hd = D // num_heads
    scale = hd**-0.5 if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, D)


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
) -> torch.Tensor:
    """The MLP half of a pre-norm ViT block: ``x + fc2(gelu(fc1(layernorm(x))))`` with exact erf GELU.

    Args:
        x: (B, N, D). norm_weight, norm_bias: (D,). fc1_weight: (D_hidden, D), fc1_bias: (D_hidden,).
        fc2_weight: (D, D_hidden), fc2_bias: (D,). eps: LayerNorm epsilon (timm ViT: 1e-6).
        add_residual: when False, return only the branch ``fc2(gelu(fc1(layernorm(x))))``.

    Returns:
        (B, N, D), dtype of ``x``.
    """
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    y = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return x + y if add_residual else y


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

    Input (B, C, H, W); output (B, N, D), N = (H / P) * (W / P).

    Raises:
        ValueError: channels differ from ``in_chans`` or H / W is not a multiple of P.
    """

    def __init__(self, img_size: int | tuple = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square; got {self.patch_size}")
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, in_chans, img_size[0], img_size[1])."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"images must be (B, C={self.in_chans}, H, W); got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"images must be {self.img_size[0]}x{self.img_size[1]} (img_size); got "
                f"{x.shape[-2]}x{x.shape[-1]}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (timm ``Attention``; parameters ``qkv``, ``proj``).

    Input and output (B, N, D). ``fused_attn=True`` uses ``F.scaled_dot_product_attention`` (timm's default),
    False the explicit softmax(q k^T * scale) v.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
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


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout (timm ``Mlp``; parameters ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block``): z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'.

    Input and output (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# Constructor arguments of timm's VisionTransformer that this package does not implement (yet), with the value
# that means "off". Any other value raises: never silently different from timm.
_UNSUPPORTED_DEFAULTS = {
    "init_values": None, "qk_norm": False, "proj_bias": True, "no_embed_class": False, "reg_tokens": 0,
    "pre_norm": False, "dynamic_img_size": False, "dynamic_img_pad": False, "patch_drop_rate": 0.0,
    "embed_layer": None, "norm_layer": None, "act_layer": None, "mlp_layer": None, "weight_init": "",
    "fix_init": False, "attn_layer": None, "pos_embed": "learn", "embed_norm_layer": None,
    "scale_attn_norm": False, "scale_mlp_norm": False, "ls_init_values": None,
}


class VisionTransformer(nn.Module):
    """Vision Transformer with timm's constructor, parameter names and computation (the reference model).

    Args (timm's names): img_size, patch_size, in_chans, num_classes, global_pool ('token' | 'avg' | ''),
        embed_dim (D), depth, num_heads (H), mlp_ratio, qkv_bias, class_token, fc_norm (None = timm's rule:
        LayerNorm after pooling for 'avg'), final_norm, drop_rate (head dropout), pos_drop_rate,
        proj_drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over depth, as timm),
        block_fn (the block class), fused_attn (SDPA vs explicit softmax).

    Input: images (B, in_chans, img_size, img_size), float. Output: logits (B, num_classes)
    (pooled features (B, D) when num_classes == 0).

    Raises:
        ValueError: embed_dim not divisible by num_heads; img_size not a multiple of patch_size; a bad
            global_pool; class_token=False with global_pool='token'.
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
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or ''; got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.no_embed_class = False
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth, as timm
        self.blocks = nn.Sequential(*[
            block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], fused_attn)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ('') init: trunc-normal(0.02) pos_embed and Linear weights, zero Linear biases,
        cls_token N(0, 1e-6); Conv2d and LayerNorm keep PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay, as timm."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D): patch embedding, class token, position add."""
        return self._pos_embed(self.patch_embed(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        x = self.norm_pre(self.embed(images))
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, prefix + N, D) -> logits (B, num_classes), or pooled features (B, D) if pre_logits."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
