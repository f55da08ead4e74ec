"""EVA-family ViTs as timm's ``Eva`` computes them (timm ``models/eva.py``), in eager PyTorch: the reference of
:class:`fastvit_kernels.FastEva` (which subclasses these modules and changes only the compute).

One class covers EVA-02 (Fang et al. 2023: axial RoPE, SwiGLU with an MLP norm, q / v biases), DINOv3 (Simeoni
et al. 2025: register tokens, LayerScale, DINOv3 RoPE), PE (Bolya et al. 2025: pre-norm, axial RoPE "xy" with
offset, attention-pool head) and the RoPE-ViTs (Heo et al. 2024, mixed learnable RoPE). A block is

    qkv = RoPE(Linear(norm1(z)))                        q, k rotated on the patch tokens (fastvit_kernels.rope)
    z'  = z + drop_path(gamma_1 * proj(norm_attn(MHA(qkv))))
    z   = z' + drop_path(gamma_2 * mlp(norm2(z')))       mlp: GELU Mlp, SwiGLU or packed SwiGLU

Constructor arguments and parameter names are timm's, so a timm ``Eva`` state_dict loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .reference import (AttentionPoolLatent, DropPath, GluMlp, Mlp, NormSpec, PatchEmbed, SwiGLU,
                        resample_abs_pos_embed, resolve_norm_layer)
from .rope import AxialRope, DinoV3Rope, MixedRope, RopeTable

# timm Eva constructor arguments not implemented, with the value that means "off"; any other value raises
_EVA_UNSUPPORTED = {"num_kv_heads": None, "patch_drop_rate": 0.0, "use_post_norm": False,
                    "rope_mrope_section": None, "device": None, "dtype": None}
POOLS = reference.GLOBAL_POOLS


class EvaAttention(nn.Module):
    """timm's ``EvaAttention`` (attn_type "eva") and ``AttentionRope`` (attn_type "rope"): multi-head attention
    with RoPE on the patch tokens of q and k.

    Parameters (timm's names): qkv_fused: ``qkv`` (3A, D) (bias: for "rope" ``qkv.bias``; for "eva" ``q_bias`` and
    ``v_bias`` with a zero, non-persistent ``k_bias`` buffer), else ``q_proj`` / ``k_proj`` / ``v_proj`` (``k_proj``
    without bias for "eva"); ``q_norm`` / ``k_norm`` (qk_norm), ``norm`` (scale_norm: the attention-output norm),
    ``proj``. Input (B, N, D) and a :class:`RopeTable` or None; output (B, N, D).

    Raises:
        NotImplementedError: an attn_type other than "eva" / "rope".
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qkv_fused: bool = True,
                 attn_type: str = "eva", attn_drop: float = 0.0, proj_drop: float = 0.0, norm: NormSpec | None = None,
                 qk_norm: bool = False, scale_norm: bool = False):
        super().__init__()
        if attn_type not in ("eva", "rope"):
            raise NotImplementedError(f"attn_type={attn_type!r} is not supported by fastvit_kernels ('eva', 'rope')")
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        norm = norm or NormSpec()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_bias = self.v_bias = None
        if not (qkv_fused and qkv_bias and attn_type == "eva"):
            self.k_bias = None
        if qkv_fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and attn_type == "rope")
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias and attn_type == "eva":
                self.q_bias = nn.Parameter(torch.zeros(dim))
                self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias and attn_type == "rope")
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = norm.make(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm.make(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm.make(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_non_persistent_buffers(self) -> None:
        """Zero ``k_bias`` (after ``to_empty``)."""
        if self.k_bias is not None:
            self.k_bias.zero_()

    def qkv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The packed qkv Linear: weight (3 D, D) and bias (3 D,) or None, from whichever form the module holds
        (separate q / k / v projections are concatenated; a missing bias contributes zeros)."""
        if self.qkv is not None:
            if self.q_bias is None:
                return self.qkv.weight, self.qkv.bias
            return self.qkv.weight, torch.cat([self.q_bias, self.k_bias, self.v_bias])
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projs])
        if all(p.bias is None for p in projs):
            return weight, None
        return weight, torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])

    def qk_normed(self, qkv: torch.Tensor) -> torch.Tensor:
        """qk_norm on a packed (B, N, 3 D) qkv: q_norm / k_norm over head_dim (identity without qk_norm)."""
        if isinstance(self.q_norm, nn.Identity):
            return qkv
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        return torch.stack([self.q_norm(q), self.k_norm(k), v], dim=2).reshape(B, N, -1)

    def forward(self, x: torch.Tensor, rope: RopeTable | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qk_normed(F.linear(x, *self.qkv_params()))
        if rope is not None:
            qkv = reference.rope_ref(qkv, rope.coords, rope.freqs, self.num_heads, rope.layout)
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        o = self.norm(o.transpose(1, 2).reshape(B, N, D))
        return self.proj_drop(self.proj(o))


class EvaBlock(nn.Module):
    """timm's pre-norm ``EvaBlock`` (see the module docstring). Parameters: ``norm1``, ``attn``, ``gamma_1`` /
    ``gamma_2`` (LayerScale, init_values; attn_only_layer_scale: gamma_1 only), ``norm2``, ``mlp``: GELU ``Mlp``
    (``mlp.norm`` with scale_mlp), or with swiglu_mlp ``SwiGLU`` (fc1_g, fc1_x; when scale_mlp or
    swiglu_align_to) else the packed ``GluMlp`` (fc1 of width 2 * hidden, SiLU on the first half).
    Input (B, N, D) and a :class:`RopeTable` or None; output (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qkv_fused: bool = True,
                 mlp_ratio: float = 4.0, swiglu_mlp: bool = False, swiglu_align_to: int = 0, scale_mlp: bool = False,
                 scale_attn_inner: bool = False, attn_type: str = "eva", qk_norm: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None, attn_only_layer_scale: bool = False,
                 norm: NormSpec | None = None):
        super().__init__()
        norm = norm or NormSpec()
        self.norm1 = norm.make(dim)
        self.attn = EvaAttention(dim, num_heads, qkv_bias, qkv_fused, attn_type, attn_drop, proj_drop, norm, qk_norm,
                                 scale_attn_inner)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm.make(dim)
        hidden = int(dim * mlp_ratio)
        mlp_norm = norm if scale_mlp else None
        if swiglu_mlp and (scale_mlp or swiglu_align_to):
            self.mlp = SwiGLU(dim, hidden, nn.SiLU(), mlp_norm, drop=proj_drop, align_to=swiglu_align_to)
        elif swiglu_mlp:
            self.mlp = GluMlp(dim, 2 * hidden, nn.SiLU(), None, drop=proj_drop, gate_last=False)
        else:
            self.mlp = Mlp(dim, hidden, proj_drop, norm=mlp_norm)
        use_ls2 = init_values is not None and not attn_only_layer_scale
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if use_ls2 else None
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: RopeTable | None = None) -> torch.Tensor:
        y = self.attn(self.norm1(x), rope)
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class Eva(nn.Module):
    """EVA-family ViT with timm ``Eva``'s constructor arguments, parameter names and computation.

    Args (timm's; see timm ``Eva``): img_size, patch_size, in_chans, num_classes, global_pool ('avg' | 'token' |
        'map' | 'max' | 'avgmax' | ''), embed_dim, depth, num_heads, qkv_bias, qkv_fused, qk_norm, mlp_ratio,
        swiglu_mlp, swiglu_align_to, scale_mlp, scale_attn_inner, attn_type ('eva' | 'rope'), drop_rate,
        pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer (LayerNorm / RmsNorm, any eps;
        default timm's LayerNorm eps 1e-6), init_values, attn_only_layer_scale, class_token, num_reg_tokens,
        no_embed_class, use_abs_pos_emb, use_rot_pos_emb, rope_type ('cat' | 'mixed' | 'dinov3'),
        rope_grid_offset, rope_grid_indexing, rope_temperature, rope_rotate_half, rope_shift_coords,
        rope_jitter_coords, rope_rescale_coords (training-time), use_pre_transformer_norm,
        use_post_transformer_norm, use_fc_norm, attn_pool_num_heads, attn_pool_mlp_ratio, dynamic_img_size,
        dynamic_img_pad, ref_feat_shape, head_init_scale; ``block_fn`` (the block class).

    Input: images (B, in_chans, H, W) ((H, W) == img_size unless dynamic_img_size). Output: logits
    (B, num_classes), or pooled features (B, D) when num_classes == 0.

    Raises:
        ValueError: bad sizes, a bad global_pool, 'token' pooling without a class token, rope_type 'mixed' with
            rope_rotate_half.
        NotImplementedError: a timm option not implemented (num_kv_heads, patch_drop_rate, use_post_norm, rope
            types 'base' / 'mrope', another norm layer, attn_type other than 'eva' / 'rope').
        TypeError: an unknown argument.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 qkv_bias: bool = True, qkv_fused: bool = True, qk_norm: bool = False, mlp_ratio: float = 4.0,
                 swiglu_mlp: bool = False, swiglu_align_to: int = 0, scale_mlp: bool = False,
                 scale_attn_inner: bool = False, attn_type: str = "eva", drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer=None, init_values: float | None = None,
                 attn_only_layer_scale: bool = False, class_token: bool = True, num_reg_tokens: int = 0,
                 no_embed_class: bool = False, use_abs_pos_emb: bool = True, use_rot_pos_emb: bool = False,
                 rope_type: str = "cat", rope_grid_offset: float = 0.0, rope_grid_indexing: str = "ij",
                 rope_temperature: float = 10000.0, rope_rotate_half: bool = False, rope_shift_coords=None,
                 rope_jitter_coords=None, rope_rescale_coords=None, use_pre_transformer_norm: bool = False,
                 use_post_transformer_norm: bool | None = None, use_fc_norm: bool | None = None,
                 attn_pool_num_heads: int | None = None, attn_pool_mlp_ratio: float | None = None,
                 dynamic_img_size: bool = False, dynamic_img_pad: bool = False, ref_feat_shape=None,
                 head_init_scale: float = 0.001, block_fn=EvaBlock, **unsupported):
        super().__init__()
        for name, value in unsupported.items():
            if name not in _EVA_UNSUPPORTED:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            if value != _EVA_UNSUPPORTED[name]:
                raise NotImplementedError(f"{name}={value!r} is not supported by fastvit_kernels yet (supported: "
                                          f"{_EVA_UNSUPPORTED[name]!r})")
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}; got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        norm = resolve_norm_layer(norm_layer)
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + num_reg_tokens
        self.num_reg_tokens, self.no_embed_class = num_reg_tokens, no_embed_class
        self.dynamic_img_size, self.grad_checkpointing = dynamic_img_size, False
        fc_norm = global_pool == "avg" if use_fc_norm is None else use_fc_norm
        post_norm = (not fc_norm) if use_post_transformer_norm is None else use_post_transformer_norm

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not use_pre_transformer_norm,
                                      strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
                                      flatten=not dynamic_img_size)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim)) if num_reg_tokens else None
        num_pos = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.rope = self._make_rope(use_rot_pos_emb, rope_type, embed_dim, num_heads, depth, rope_temperature,
                                    rope_grid_offset, rope_grid_indexing, rope_rotate_half, ref_feat_shape,
                                    dict(shift_coords=rope_shift_coords, jitter_coords=rope_jitter_coords,
                                         rescale_coords=rope_rescale_coords))
        self.rope_mixed = isinstance(self.rope, MixedRope)
        self.norm_pre = norm.make(embed_dim) if use_pre_transformer_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linear rule
        self.blocks = nn.ModuleList([
            block_fn(embed_dim, num_heads, qkv_bias, qkv_fused, mlp_ratio, swiglu_mlp, swiglu_align_to, scale_mlp,
                     scale_attn_inner, attn_type, qk_norm, proj_drop_rate, attn_drop_rate, dpr[i], init_values,
                     attn_only_layer_scale, norm)
            for i in range(depth)])
        self.norm = norm.make(embed_dim) if post_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(embed_dim, attn_pool_num_heads or num_heads,
                                             attn_pool_mlp_ratio or mlp_ratio, norm, nn.GELU()) \
            if global_pool == "map" else None
        self.fc_norm = norm.make(embed_dim) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_init_scale = head_init_scale
        self.init_weights()

    @staticmethod
    def _make_rope(use, rope_type, dim, num_heads, depth, temperature, grid_offset, grid_indexing, rotate_half,
                   ref_feat_shape, aug) -> nn.Module | None:
        if not use:
            return None
        if rope_type == "cat":
            ref = reference._pair(ref_feat_shape) if ref_feat_shape is not None else None
            return AxialRope(dim // num_heads, temperature=temperature, in_pixels=False, ref_feat_shape=ref,
                             grid_offset=grid_offset, grid_indexing=grid_indexing, rotate_half=rotate_half, **aug)
        if rope_type == "mixed":
            if rotate_half:
                raise ValueError("rope_type='mixed' requires rope_rotate_half=False")
            return MixedRope(dim, depth, num_heads, temperature, grid_indexing=grid_indexing, **aug)
        if rope_type == "dinov3":
            return DinoV3Rope(dim // num_heads, temperature, grid_offset=grid_offset, grid_indexing=grid_indexing,
                              rotate_half=rotate_half, **aug)
        raise NotImplementedError(f"rope_type={rope_type!r} is not supported by fastvit_kernels ('cat', 'mixed', "
                                  "'dinov3')")

    def init_weights(self) -> None:
        """timm's Eva init: trunc-normal(0.02) Linear weights (zero biases), pos_embed, cls / reg tokens; attn.proj
        and mlp.fc2 weights divided by sqrt(2 (layer + 1)); the head scaled by head_init_scale."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            if self.head_init_scale and isinstance(self.head, nn.Linear):
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def init_non_persistent_buffers(self) -> None:
        """Refill the non-persistent buffers (the zero ``k_bias`` of EVA attention), e.g. after ``to_empty``."""
        for blk in self.blocks:
            blk.attn.init_non_persistent_buffers()

    def no_weight_decay(self) -> set:
        nwd = {"pos_embed", "cls_token", "reg_token"}
        if self.rope is not None and hasattr(self.rope, "no_weight_decay"):
            nwd |= {f"rope.{p}" for p in self.rope.no_weight_decay()}
        return nwd

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh Linear(D, num_classes) head (Identity for 0), optionally another global_pool, as timm
        (:func:`fastvit_kernels.reference.reset_pool_and_head`, whose errors it raises)."""
        reference.reset_pool_and_head(self, num_classes, global_pool, self.cls_token is not None,
                                      self.patch_embed.proj.weight)

    # --- forward ----------------------------------------------------------------------------------------------
    def rope_tables(self, grid_size) -> list[RopeTable] | None:
        """One :class:`RopeTable` per block for a (gh, gw) patch grid (prefix tokens unrotated), None without
        RoPE. Built on each call (training-time coordinate augmentation draws once per call, as timm)."""
        if self.rope is None:
            return None
        tables = self.rope.tables(grid_size, self.num_prefix_tokens, device=self.patch_embed.proj.weight.device)
        return tables if isinstance(tables, list) else [tables] * len(self.blocks)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) (or (B, gh, gw, D) with dynamic_img_size) -> (B, prefix + N, D): prefix tokens
        and the absolute position embedding (resampled to the grid with dynamic_img_size), as timm."""
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            B, gh, gw, D = x.shape
            if pos_embed is not None:
                pos_embed = resample_abs_pos_embed(pos_embed, (gh, gw), self.patch_embed.grid_size,
                                                   0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.reshape(B, gh * gw, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = x if pos_embed is None else x + pos_embed
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x if pos_embed is None else x + pos_embed
        return self.pos_drop(x)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D)."""
        return self._pos_embed(self.patch_embed(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens after the blocks and the final norm, (B, prefix + N, D)."""
        grid = self.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        x = self.norm_pre(self.embed(images))
        tables = self.rope_tables(grid) or [None] * len(self.blocks)
        for blk, table in zip(self.blocks, tables):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, table, use_reentrant=False)
            else:
                x = blk(x, table)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the attention pool over every token ('map'), else timm's
        ``global_pool_nlc`` ('token': the class token; 'avg' / 'max' / 'avgmax' over the patch tokens)."""
        if self.attn_pool is not None:
            return self.attn_pool(x)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if not pool_type:
            return x
        x = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
