"""NaFlex ViTs as timm's ``NaFlexVit`` computes them, in eager PyTorch: the reference of
:class:`fastvit_kernels.naflex.FastNaFlexVit` (which subclasses these modules and changes only the compute).

NaFlex (SigLIP 2, Tschannen et al. 2025; NaViT, Dehghani et al. 2023; FlexiViT, Beyer et al. 2023) feeds a ViT
pre-patchified images of any size and aspect ratio: a batch is ``patches`` (B, N, K) with K = P * P * C in the
(ph, pw, C) flat order, ``patch_coord`` (B, N, 2) int (y, x) and ``patch_valid`` (B, N) bool (False = padding
after the image's own patches). The model computes, per image b of patch grid (h_b, w_b):

    z0  = [cls; reg_1..reg_R; x_p W^T + b + E_pos(h_b, w_b)]   E_pos: the learned (gh, gw) grid resampled to
                                                                (h_b, w_b) (bicubic, antialiased; aspect-ratio
                                                                preserving: to (L, L), L = max(h_b, w_b), then
                                                                cropped), or factorized (E_y[i] + E_x[j]);
                                                                prefix tokens get no position
    z'  = z + drop_path(ls1 * proj(MHA(LN(z), mask)))         mask: both tokens valid (prefix always valid)
    z   = z' + drop_path(ls2 * MLP(LN(z')))
    y   = head(fc_norm(pool(LN(z_L), patch_valid)))           pool: token | avg | max | avgmax over valid
                                                                patches | map (latent query, key mask)

Parameter names and shapes are timm's (``embeds.proj``, ``embeds.pos_embed`` (1, gh, gw, D) or
``embeds.pos_embed_y`` / ``embeds.pos_embed_x``, ``embeds.cls_token``, ``embeds.reg_token``, ``blocks.i.*``,
``norm``, ``attn_pool.*``, ``fc_norm``, ``head``), so a timm ``NaFlexVit`` state_dict loads with ``strict=True``.
The configuration is :class:`NaFlexVitCfg` (timm's field names and defaults); values outside the supported subset
raise ValueError naming the field (:func:`check_cfg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .reference import Block, NormSpec

POOLS = reference.GLOBAL_POOLS


@dataclass
class NaFlexVitCfg:
    """timm ``NaFlexVitCfg``'s fields with timm's defaults (the architecture of a NaFlex ViT).

    Supported values (see :func:`check_cfg`; anything else raises ValueError naming the field): standard pre-norm
    blocks (``attn_type='standard'``, no RoPE, no SwiGLU / gated / grouped-query attention, no inner scale norms,
    ``mlp_layer`` / ``block_fn`` / ``attn_layer`` None), ``embed_proj_type='linear'`` without input / embed norms,
    ``pos_embed`` 'learned' | 'factorized' | 'none' | '' with ``pos_embed_use_grid_sample=False``, no patch
    interpolator, ``weight_init=''``. Everything else (pooling kinds, class / register tokens, LayerScale, fc_norm,
    final / pre norm, qk_norm, dropouts, patch dropout, aspect-ratio preserving and any ``F.interpolate`` mode,
    dynamic_img_pad, either patch layout) is supported.
    """

    patch_size: int | tuple = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    scale_mlp_norm: bool = False
    num_kv_heads: int | tuple | None = None
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    attn_drop_rate: float = 0.0
    scale_attn_inner_norm: bool = False
    use_key_only_attn_mask: bool = False
    init_values: float | None = None
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    patch_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    class_token: bool = False
    reg_tokens: int = 0
    pos_embed: str = "learned"
    pos_embed_grid_size: tuple | None = (16, 16)
    pos_embed_interp_mode: str = "bicubic"
    pos_embed_ar_preserving: bool = False
    pos_embed_antialias: bool = True
    pos_embed_align_corners: bool = False
    pos_embed_use_grid_sample: bool = False
    rope_type: str = ""
    rope_temperature: float = 10000.0
    rope_ref_feat_shape: tuple | None = None
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = "ij"
    rope_rotate_half: bool = False
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    rope_mrope_section: tuple | None = None
    dynamic_img_pad: bool = False
    patchify_channels_last: bool = True
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool | None = None
    global_pool: str = "map"
    pool_include_prefix: bool = False
    attn_pool_num_heads: int | None = None
    attn_pool_mlp_ratio: float | None = None
    weight_init: str = ""
    fix_init: bool = True
    embed_proj_type: str = "linear"
    input_norm_layer: object = None
    embed_norm_layer: object = None
    norm_layer: object = None
    act_layer: object = None
    block_fn: object = None
    mlp_layer: object = None
    attn_layer: object = None
    attn_type: str = "standard"
    attn_gated: bool = False
    swiglu_mlp: bool = False
    swiglu_align_to: int = 0
    qkv_fused: bool = True
    attn_only_layer_scale: bool = False
    enable_patch_interpolator: bool = False


# fields whose only supported value is timm's default (the value that turns the feature off)
_ONLY = {
    "scale_mlp_norm": False, "num_kv_heads": None, "scale_attn_inner_norm": False,
    "pos_embed_use_grid_sample": False, "rope_type": ("", "none"), "weight_init": "", "embed_proj_type": "linear",
    "input_norm_layer": None, "embed_norm_layer": None, "block_fn": None, "mlp_layer": None, "attn_layer": None,
    "attn_type": "standard", "attn_gated": False, "swiglu_mlp": False, "qkv_fused": True,
    "attn_only_layer_scale": False, "enable_patch_interpolator": False,
}


def check_cfg(cfg: NaFlexVitCfg) -> tuple[NormSpec, str]:
    """Validate a :class:`NaFlexVitCfg` against the supported subset; returns (the blocks' norm, the GELU form).

    Raises:
        TypeError: ``cfg`` is not a :class:`NaFlexVitCfg` (ours or timm's: any dataclass with its field names).
        ValueError: a field outside the supported subset (the message names the field, its value and what is
            supported); embed_dim not divisible by num_heads; a bad global_pool; 'token' pooling without a class
            token; reg_tokens < 0; no position grid size for a learned / factorized embedding; a bad
            patch_drop_rate.
    """
    for name, ok in _ONLY.items():
        value = getattr(cfg, name)
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if value not in allowed:
            raise ValueError(f"NaFlexVitCfg.{name}={value!r} is not supported by fastvit_kernels (supported: "
                             f"{' or '.join(map(repr, allowed))})")
    if cfg.pos_embed not in ("learned", "factorized", "none", ""):
        raise ValueError(f"NaFlexVitCfg.pos_embed={cfg.pos_embed!r} is not supported (supported: 'learned', "
                         "'factorized', 'none')")
    if cfg.global_pool not in POOLS:
        raise ValueError(f"NaFlexVitCfg.global_pool must be one of {POOLS}; got {cfg.global_pool!r}")
    if cfg.global_pool == "token" and not cfg.class_token:
        raise ValueError("NaFlexVitCfg.global_pool='token' needs class_token=True")
    if cfg.reg_tokens < 0:
        raise ValueError(f"NaFlexVitCfg.reg_tokens must be >= 0; got {cfg.reg_tokens}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"NaFlexVitCfg.embed_dim={cfg.embed_dim} must be divisible by num_heads={cfg.num_heads}")
    if not 0.0 <= cfg.patch_drop_rate < 1.0:
        raise ValueError(f"NaFlexVitCfg.patch_drop_rate must be in [0, 1); got {cfg.patch_drop_rate}")
    try:
        norm = reference.resolve_norm_layer(cfg.norm_layer)
    except NotImplementedError as e:
        raise ValueError(f"NaFlexVitCfg.norm_layer: {e}") from None
    try:
        approximate = reference.gelu_approximate(cfg.act_layer)
    except NotImplementedError as e:
        raise ValueError(f"NaFlexVitCfg.act_layer: {e}") from None
    return norm, approximate


def make_cfg(cfg: NaFlexVitCfg | None, kwargs: dict, owner: str) -> NaFlexVitCfg:
    """``cfg`` (default :class:`NaFlexVitCfg`) with ``kwargs`` overlaid, as timm's constructor. A timm
    ``NaFlexVitCfg`` is converted field by field.

    Raises:
        TypeError: a keyword that is not a field (named).
    """
    if cfg is None:
        cfg = NaFlexVitCfg()
    elif not isinstance(cfg, NaFlexVitCfg):
        names = {f.name for f in fields(NaFlexVitCfg)}
        cfg = NaFlexVitCfg(**{k: v for k, v in vars(cfg).items() if k in names})
    unknown = set(kwargs) - {f.name for f in fields(NaFlexVitCfg)}
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword argument(s): {sorted(unknown)}")
    return replace(cfg, **kwargs) if kwargs else cfg


def batch_patchify(images: torch.Tensor, patch_size: tuple, pad: bool = True,
                   channels_last: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images (B, C, H, W) -> patches (B, gh * gw, K), K = ph * pw * C, row-major over the (gh, gw) patch grid;
    each patch flattened as (ph, pw, C) (``channels_last``, NaFlex's layout) or (C, ph, pw). ``pad``: zero-pad H, W
    at the bottom / right to multiples of the patch size (else the remainder is cut off). Returns (patches, (gh,
    gw)). The layout of timm's NaFlex ``batch_patchify`` / ``patchify_image``."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    if pad and (H % ph or W % pw):
        images = F.pad(images, (0, -W % pw, 0, -H % ph))
    gh, gw = images.shape[2] // ph, images.shape[3] // pw
    x = images[:, :, :gh * ph, :gw * pw].reshape(B, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 3, 5, 1) if channels_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, gh * gw, ph * pw * C), (gh, gw)


def grid_sizes(patch_coord: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's patch grid (h, w) = max (y, x) over its N coordinates + 1 (padding rows included, as timm), one
    host read. patch_coord: (B, N, 2) int."""
    return [tuple(hw) for hw in (patch_coord.amax(dim=1) + 1).tolist()]


def additive_mask(valid: torch.Tensor, num_prefix: int, symmetric: bool, dtype: torch.dtype) -> torch.Tensor:
    """timm NaFlex's attention mask from patch validity: prefix tokens always valid; (B, 1, L, L) allowing pairs of
    valid tokens (``symmetric``) or (B, 1, 1, L) allowing valid keys; 0 where allowed, the dtype's lowest finite
    value elsewhere. valid: (B, N) bool; L = num_prefix + N."""
    valid = torch.cat([valid.new_ones(valid.shape[0], num_prefix), valid.bool()], dim=1) if num_prefix else valid
    allowed = (valid[:, :, None] & valid[:, None, :]) if symmetric else valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def global_pool_naflex(x: torch.Tensor, patch_valid: torch.Tensor | None, pool_type: str, num_prefix: int,
                       include_prefix: bool = False) -> torch.Tensor:
    """Pool tokens (B, num_prefix + N, D) to (B, D) as timm NaFlex: 'token' the first token; 'avg' / 'max' /
    'avgmax' over the patch tokens (the prefix too with ``include_prefix``) that ``patch_valid`` (B, N) marks
    valid (all without it); '' no pooling. An image with no valid token averages to 0 and maxes to the dtype's
    lowest value, as timm."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    if patch_valid is None:
        x = x if include_prefix else x[:, num_prefix:]
        if pool_type == "avg":
            return x.mean(dim=1)
        return x.amax(dim=1) if pool_type == "max" else 0.5 * (x.amax(dim=1) + x.mean(dim=1))
    if num_prefix:
        if include_prefix:
            patch_valid = torch.cat([patch_valid.new_ones(x.shape[0], num_prefix), patch_valid], dim=1)
        else:
            x = x[:, num_prefix:]
    w = patch_valid.to(x.dtype)
    avg = (x * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1)
    if pool_type == "avg":
        return avg
    mx = x.masked_fill(~patch_valid.bool()[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    return mx if pool_type == "max" else 0.5 * (avg + mx)


def patch_dropout_keep(B: int, N: int, prob: float, device) -> torch.Tensor:
    """timm ``PatchDropoutWithIndices``' kept patch indices (He et al. 2022; Li et al. 2023, FLIP): (B, N_keep)
    int64, N_keep = max(1, int(N * (1 - prob))), a random permutation's head per image (``argsort`` of
    ``randn(B, N)``: the same draw as timm, so the same RNG state keeps the same patches), not sorted."""
    keep = max(1, int(N * (1.0 - prob)))
    return torch.argsort(torch.randn(B, N, device=device), dim=-1)[:, :keep]


class AttentionPoolLatent(reference.AttentionPoolLatent):
    """timm ``AttentionPoolLatent`` (:class:`fastvit_kernels.reference.AttentionPoolLatent`, same name and
    parameters) also taking timm's
    additive ``attn_mask`` (B, 1, 1, N) over the keys, as NaFlexVit's 'map' head calls it. Input (B, N, D); output
    (B, D)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd)
        k, v = self.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, 1, D)))
        return (o + self.mlp(self.norm(o)))[:, 0]


class NaFlexBlock(Block):
    """timm's pre-norm ``Block`` (see :class:`fastvit_kernels.reference.Block`) taking NaFlex's additive
    ``attn_mask`` ((B, 1, L, L) or (B, 1, 1, L)); input and output (B, L, D)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attn(self.norm1(x), attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _attn(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.attn
        B, L, D = x.shape
        q, k, v = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, L, D)))


class NaFlexEmbeds(nn.Module):
    """timm ``NaFlexEmbeds`` with the Linear projection: parameters ``proj`` (Linear(K, D), K = ph * pw * C),
    ``cls_token`` (1, 1, D), ``reg_token`` (1, R, D), ``pos_embed`` (1, gh, gw, D) ('learned') or ``pos_embed_y``
    (1, gh, D) and ``pos_embed_x`` (1, gw, D) ('factorized'); ``pos_drop``.

    :meth:`pos_rows` gives the position rows of one patch grid; :meth:`forward` embeds a batch as timm does."""

    def __init__(self, cfg: NaFlexVitCfg, in_chans: int, img_size):
        super().__init__()
        self.patch_size = reference._pair(cfg.patch_size)
        self.in_chans, self.embed_dim = in_chans, cfg.embed_dim
        self.has_class_token, self.num_reg_tokens = cfg.class_token, cfg.reg_tokens
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.dynamic_img_pad, self.channels_last = cfg.dynamic_img_pad, cfg.patchify_channels_last
        self.pos_embed_interp_mode = cfg.pos_embed_interp_mode
        self.pos_embed_ar_preserving = cfg.pos_embed_ar_preserving
        self.pos_embed_antialias = cfg.pos_embed_antialias
        self.pos_embed_align_corners = cfg.pos_embed_align_corners
        D = cfg.embed_dim
        grid = cfg.pos_embed_grid_size
        if grid is None and img_size is not None:
            grid = tuple(s // p for s, p in zip(reference._pair(img_size), self.patch_size))
        self.pos_embed_grid_size = tuple(grid) if grid is not None else None
        self.pos_embed_type = cfg.pos_embed if cfg.pos_embed in ("learned", "factorized") else "none"
        if self.pos_embed_type != "none" and grid is None:
            raise ValueError("NaFlexVitCfg.pos_embed_grid_size is None and no img_size was given: the learned "
                             "position grid has no size")
        self.proj = nn.Linear(self.patch_size[0] * self.patch_size[1] * in_chans, D, bias=not cfg.pre_norm)
        self.norm = nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        self.pos_embed = self.pos_embed_y = self.pos_embed_x = None
        if self.pos_embed_type == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, *grid, D))
        elif self.pos_embed_type == "factorized":
            self.pos_embed_y = nn.Parameter(torch.zeros(1, grid[0], D))
            self.pos_embed_x = nn.Parameter(torch.zeros(1, grid[1], D))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

    def prefix_rows(self) -> torch.Tensor | None:
        """The prefix tokens (class, then registers) as (num_prefix, D), or None."""
        rows = [t[0] for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat(rows, dim=0) if rows else None

    def pos_rows(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """Position rows of a (h, w) patch grid, (h * w, D) row-major, in ``dtype``; None without a position
        embedding. Learned: the (gh, gw) grid resampled with ``F.interpolate`` (timm's mode, antialias and
        align_corners; computed in fp32) to (h, w), or with aspect-ratio preservation to (L, L), L = max(h, w),
        then cropped to (h, w); the grid itself when (h, w) == (gh, gw). Factorized: the y and x tables resampled
        (linear) to h and w (to L with aspect-ratio preservation, then cropped), summed as E_y[i] + E_x[j].
        Differentiable with respect to the tables."""
        h, w = size
        if self.pos_embed_type == "learned":
            gh, gw = self.pos_embed.shape[1:3]
            if (h, w) == (gh, gw):
                return self.pos_embed.reshape(gh * gw, -1).to(dtype)
            target = (max(size),) * 2 if self.pos_embed_ar_preserving else (h, w)
            grid = F.interpolate(self.pos_embed.permute(0, 3, 1, 2).float(), size=target,
                                 mode=self.pos_embed_interp_mode, align_corners=self.pos_embed_align_corners,
                                 antialias=self.pos_embed_antialias)[:, :, :h, :w]
            return grid.flatten(2)[0].transpose(0, 1).to(dtype)
        if self.pos_embed_type == "factorized":
            ly, lx = (max(size),) * 2 if self.pos_embed_ar_preserving else (h, w)

            def resample(table, length):  # (1, L0, D) -> (L, D)
                if length == table.shape[1]:
                    return table[0].to(dtype)
                return F.interpolate(table.permute(0, 2, 1).float(), size=length, mode="linear",
                                     align_corners=False)[0].transpose(0, 1).to(dtype)

            pe_y, pe_x = resample(self.pos_embed_y, ly)[:h], resample(self.pos_embed_x, lx)[:w]
            return (pe_y[:, None] + pe_x[None, :]).reshape(h * w, -1)
        return None

    def forward(self, x: torch.Tensor, patch_coord: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Patches (B, N, K) with patch_coord (B, N, 2), or images (B, C, H, W) -> (tokens (B, num_prefix + N, D),
        the images' patch grid or None for patches). Image b's position rows are added to its first h_b * w_b
        tokens (NaFlex's row-major layout, valid patches first), the prefix tokens prepended without position."""
        grid = None
        if patch_coord is None:
            x, grid = batch_patchify(x, self.patch_size, pad=self.dynamic_img_pad, channels_last=self.channels_last)
        x = self.norm(self.proj(x.flatten(2)))
        B, N, _ = x.shape
        if grid is not None:
            pos = self.pos_rows(grid, x.dtype)
            if pos is not None:
                x = x + pos
        elif self.pos_embed_type != "none":
            sizes = grid_sizes(patch_coord)
            groups: dict = {}
            for b, s in enumerate(sizes):
                groups.setdefault(s, []).append(b)
            add = torch.zeros_like(x)
            for s, images in groups.items():
                pos = self.pos_rows(s, x.dtype)[:N]
                add = add.index_put((torch.tensor(images, device=x.device)[:, None],
                                     torch.arange(pos.shape[0], device=x.device)[None, :]),
                                    pos.expand(len(images), -1, -1))
            x = x + add
        prefix = self.prefix_rows()
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype).expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x), grid


class NaFlexVit(nn.Module):
    """timm ``NaFlexVit`` (same constructor, parameter names and outputs) for the :class:`NaFlexVitCfg` subset
    :func:`check_cfg` accepts, in eager PyTorch.

    Args:
        cfg: a :class:`NaFlexVitCfg` (or timm's; None: the defaults).
        in_chans: image channels C. num_classes: head outputs (0: no head). img_size: sets the position grid from
            ``img_size // patch_size`` when ``cfg.pos_embed_grid_size`` is None.
        block_fn: the block class (internal: the fused subclass passes its own).
        **kwargs: :class:`NaFlexVitCfg` fields overriding cfg's.

    Input (``forward``): a NaFlex dict {'patches' (B, N, K), 'patch_coord' (B, N, 2) int, 'patch_valid' (B, N)
    bool} (timm's collator output), or patches with ``patch_coord`` and ``patch_valid`` arguments, or images
    (B, C, H, W) (patchified inside). Output: logits (B, num_classes) (pooled features without a head).

    Raises:
        TypeError: an unknown keyword. ValueError: an unsupported or bad configuration (:func:`check_cfg`); NaFlex
            input without patch_coord / patch_valid; a custom ``attn_mask`` with the fused model.
    """

    def __init__(self, cfg: NaFlexVitCfg | None = None, in_chans: int = 3, num_classes: int = 1000, img_size=None,
                 block_fn=NaFlexBlock, **kwargs):
        super().__init__()
        cfg = make_cfg(cfg, kwargs, type(self).__name__)
        norm, approximate = check_cfg(cfg)
        self.cfg = cfg
        self.num_classes, self.in_chans = num_classes, in_chans
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.num_reg_tokens, self.has_class_token = cfg.reg_tokens, cfg.class_token
        self.pool_include_prefix = cfg.pool_include_prefix
        self.use_key_only_attn_mask = cfg.use_key_only_attn_mask
        self.grad_checkpointing = False
        self.embeds = NaFlexEmbeds(cfg, in_chans, img_size)
        self.norm_pre = norm.make(cfg.embed_dim) if cfg.pre_norm else nn.Identity()
        self.patch_drop_rate = cfg.patch_drop_rate
        D, depth = cfg.embed_dim, cfg.depth
        dpr = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linear rule
        self.blocks = nn.Sequential(*[
            block_fn(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_drop_rate, cfg.attn_drop_rate, dpr[i],
                     True, cfg.init_values, cfg.qk_norm, act_layer="gelu_tanh" if approximate == "tanh" else None,
                     norm_layer=norm, proj_bias=cfg.proj_bias)
            for i in range(depth)])
        fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = norm.make(D) if cfg.final_norm and not fc_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(D, cfg.attn_pool_num_heads or cfg.num_heads,
                                             cfg.attn_pool_mlp_ratio or cfg.mlp_ratio, norm,
                                             nn.GELU(approximate=approximate)) if cfg.global_pool == "map" else None
        self.fc_norm = norm.make(D) if cfg.final_norm and fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) Linear weights and zero biases, N(0, 0.02) position tables,
        N(0, 1e-6) class / register tokens; with ``fix_init`` attn.proj and mlp.fc2 weights of block i divided by
        sqrt(2 (i + 1))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        e = self.embeds
        for p, std in ((e.pos_embed, 0.02), (e.pos_embed_y, 0.02), (e.pos_embed_x, 0.02), (e.cls_token, 1e-6),
                       (e.reg_token, 1e-6)):
            if p is not None:
                nn.init.normal_(p, std=std)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.embed_dim**-0.5)
        if self.cfg.fix_init:
            with torch.no_grad():
                for i, blk in enumerate(self.blocks):
                    blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                    blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set:
        return {"embeds.pos_embed", "embeds.cls_token", "embeds.reg_token"}

    def get_patch_size(self) -> tuple[int, int]:
        return self.embeds.patch_size

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^embeds", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh Linear(D, num_classes) head (Identity for 0), optionally another global_pool, as timm
        (:func:`fastvit_kernels.reference.reset_pool_and_head`, whose errors it raises)."""
        reference.reset_pool_and_head(self, num_classes, global_pool, self.has_class_token,
                                      self.embeds.proj.weight)

    # --- forward ----------------------------------------------------------------------------------------------
    def forward_features(self, patches: torch.Tensor, patch_coord: torch.Tensor | None = None,
                         patch_valid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """Patches (B, N, K) with patch_coord / patch_valid -> {'patches': (B, num_prefix + N', D) tokens after the
        final norm, 'patch_valid': (B, N') (N' = N, or the kept count under patch dropout)}; images (B, C, H, W)
        -> tokens (B, num_prefix + N, D). timm's steps: embed, patch dropout (training), mask, norm_pre, blocks,
        norm."""
        naflex = patch_coord is not None
        x, _ = self.embeds(patches, patch_coord)
        if self.training and self.patch_drop_rate > 0:
            P = self.num_prefix_tokens
            keep = patch_dropout_keep(x.shape[0], x.shape[1] - P, self.patch_drop_rate, x.device)
            x = torch.cat([x[:, :P], x[:, P:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
            if patch_valid is not None:
                patch_valid = patch_valid.gather(1, keep)
        if attn_mask is None and patch_valid is not None:
            attn_mask = additive_mask(patch_valid, self.num_prefix_tokens, not self.use_key_only_attn_mask, x.dtype)
        x = self.norm_pre(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
        x = self.norm(x)
        return {"patches": x, "patch_valid": patch_valid} if naflex else x

    def _pool(self, x: torch.Tensor, pool_type: str | None = None,
              patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn_pool is not None:
            mask = None
            if patch_valid is not None:
                mask = additive_mask(patch_valid, self.num_prefix_tokens if self.pool_include_prefix else 0,
                                     False, x.dtype)
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens:]
            return self.attn_pool(x, attn_mask=mask)
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_naflex(x, patch_valid, pool_type, self.num_prefix_tokens, self.pool_include_prefix)

    def forward_head(self, patches: torch.Tensor, pre_logits: bool = False,
                     patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, num_prefix + N, D) (and their patch_valid (B, N)) -> logits (B, num_classes), or the pooled
        features (B, D) with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self._pool(patches, patch_valid=patch_valid)))
        return x if pre_logits else self.head(x)

    def forward(self, x, patch_coord: torch.Tensor | None = None, patch_valid: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A NaFlex dict, patches with patch_coord / patch_valid, or images (B, C, H, W) -> logits
        (B, num_classes).

        Raises:
            ValueError: NaFlex input (a dict, or patch_coord given) without patch_coord or patch_valid; patches
                (3-D) without patch_coord; images that are not 4-D.
        """
        if isinstance(x, dict):
            patches = x["patches"]
            patch_valid = x.get("patch_valid", patch_valid)
            patch_coord = x.get("patch_coord", patch_coord)
            attn_mask = x.get("attn_mask", attn_mask)
        else:
            patches = x
        if isinstance(x, dict) or patch_coord is not None:
            check_naflex_input(patches, patch_coord, patch_valid, self.embeds)
            return self.forward_head(**self.forward_features(patches, patch_coord, patch_valid, attn_mask))
        check_image_input(patches, self.in_chans)
        return self.forward_head(self.forward_features(patches))


def check_naflex_input(patches, patch_coord, patch_valid, embeds: NaFlexEmbeds) -> None:
    """Validate NaFlex input (before any kernel launch).

    Raises:
        ValueError: patch_coord or patch_valid missing; patches not (B, N, K) with K = ph * pw * C; patch_coord
            not (B, N, 2); patch_valid not (B, N).
        TypeError: patch_coord not an integer tensor; patch_valid not bool (or 0 / 1 integers).
    """
    if patch_coord is None:
        raise ValueError("NaFlex input needs patch_coord (B, N, 2) int (y, x); got None")
    if patch_valid is None:
        raise ValueError("NaFlex input needs patch_valid (B, N) bool; got None")
    K = embeds.patch_size[0] * embeds.patch_size[1] * embeds.in_chans
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3 or patches.shape[-1] != K:
        raise ValueError(f"patches must be (B, N, K={K}) (K = ph * pw * C); got "
                         f"{tuple(getattr(patches, 'shape', ()))}")
    B, N, _ = patches.shape
    if tuple(patch_coord.shape) != (B, N, 2):
        raise ValueError(f"patch_coord must be (B, N, 2) = {(B, N, 2)}; got {tuple(patch_coord.shape)}")
    if patch_coord.is_floating_point() or patch_coord.dtype == torch.bool:
        raise TypeError(f"patch_coord must be an integer tensor; got {patch_coord.dtype}")
    if tuple(patch_valid.shape) != (B, N):
        raise ValueError(f"patch_valid must be (B, N) = {(B, N)}; got {tuple(patch_valid.shape)}")
    if patch_valid.is_floating_point():
        raise TypeError(f"patch_valid must be bool; got {patch_valid.dtype}")


def check_image_input(images, in_chans: int) -> None:
    """Raises ValueError unless ``images`` is (B, in_chans, H, W) (a (B, N, K) tensor without patch_coord is named
    as such)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != in_chans:
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) == 3:
            raise ValueError(f"patches {shape} need patch_coord (B, N, 2) and patch_valid (B, N) (NaFlex input); "
                             "or pass images (B, C, H, W)")
        raise ValueError(f"images must be (B, in_chans={in_chans}, H, W); got {shape}")
