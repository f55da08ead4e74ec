"""Exact FLOP counts of a ViT (2 FLOPs per multiply-add, attention matmuls included), per op class and per model.
The per-op counts (``linear_flops``, ``attention_flops``, ``mlp_flops``, ``patch_embed_flops``) live beside the
ops in :mod:`fastvit_kernels.ops`, with the ``FlopCounterMode`` formulas of the ``fastvit::*`` custom ops; this
module sums them over a model.

Conventions (the "model FLOPs" of Chowdhery et al., PaLM 2022, appendix B, used for MFU):

* Only matrix products count: the Linear / patch-embedding GEMMs and the two attention matmuls
  ``S = Q K^T`` and ``O = P V``. Softmax, LayerNorm, GELU, bias and residual adds are left out (as
  ``FlopCounterMode`` does); for ViT-B/16 they are well under 0.5 % of the total.
* Backward = 2x forward for every matmul (input gradient + weight gradient; for attention dP, dV, dQ, dK).
  Recomputation (FlashAttention re-forming P in the backward, GEMMs recomputing GELU / LayerNorm on load) is
  NOT model FLOPs; :mod:`fastvit_kernels.bench.cost_model` counts it separately as executed FLOPs.
* The image gradient of the patch embedding is not needed in training (images do not require grad), so its
  backward is the weight gradient only: training step = 3 x forward - patch-embed forward.

* The modern blocks (timm ``Eva``: EVA-02, DINOv3, PE; SwiGLU MLPs, 2D RoPE, LayerScale, register tokens): a
  SwiGLU fc1 (D -> 2 * D_hidden, gate and up) counts 2x a GELU fc1 of the same hidden width; RoPE, RMSNorm, the
  inner MLP norm and LayerScale are elementwise (not counted, as LayerNorm is not); register tokens are tokens.

ViT-B/16 at 224 px: 35.128 GFLOP forward per image (the commonly quoted ~35.2 GFLOP, i.e. 17.6 GMAC, also
counts some element-wise work); 105.15 GFLOP per image per training step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..configs import get_config
from ..ops.attention import attention_flops
from ..ops.layernorm_mlp import mlp_flops
from ..ops.linear import linear_flops
from ..ops.patch_embed import patch_embed_flops

# Op classes of a ViT training step, in model order (keys of the breakdowns) and how tables print them.
OP_CLASSES = ("patch_embed", "ln_qkv", "attention", "proj", "mlp", "head", "optimizer")
OP_CLASS_LABELS = {"patch_embed": "patch embed", "ln_qkv": "LN+qkv", "attention": "attention", "proj": "proj",
                   "mlp": "MLP", "head": "head", "optimizer": "optimizer", "other": "other"}
KINDS = ("forward", "backward", "train")


# ViTShape options of the modern blocks (the defaults are the classic ViT's)
ROPE_TYPES = (None, "cat", "dinov3")  # timm Eva rope_type: "cat" (RotaryEmbeddingCat, cached table), "dinov3"
MLP_TYPES = ("gelu", "swiglu", "swiglu_packed")  # timm Mlp (GELU); SwiGLU (fc1_g / fc1_x); GluMlp (packed fc1)
NORM_TYPES = ("layernorm", "rmsnorm")
QKV_BIAS_FORMS = (True, False, "qv")  # one (3 D,) bias; none; timm Eva's q_bias + v_bias (k: zeros)

# timm ``Eva`` constructor options of the models the cost model compares (the package's configs.py does not hold
# these names): timm's eva.py arguments for ``eva02_base_patch14_224`` and ``vit_large_patch16_dinov3`` (its
# default pretrained input size, 256 px), with the ViT plans' head -- class-token pooling (timm:
# ``global_pool='token'``, DINOv3's upstream pooling; with it timm keeps the final norm and no fc_norm) and a
# 1000-class head (the pretrained tags have none: an ImageNet-1k fine-tuning step).
TIMM_EVA_OPTIONS: dict[str, dict] = {
    "eva02_base_patch14_224": dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                                   qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
                                   use_rot_pos_emb=True, ref_feat_shape=(16, 16),
                                   global_pool="token", num_classes=1000),
    "vit_large_patch16_dinov3": dict(img_size=256, patch_size=16, dynamic_img_size=True, embed_dim=1024, depth=24,
                                     num_heads=16, qkv_bias=False, init_values=1.0e-5, rope_type="dinov3",
                                     rope_temperature=100, use_rot_pos_emb=True, use_abs_pos_emb=False,
                                     rope_rotate_half=True, num_reg_tokens=4, use_fc_norm=False,
                                     global_pool="token", num_classes=1000),
}
# keys only timm's Eva constructor takes: a dict holding one is read in Eva's terms (defaults included)
_EVA_KEYS = frozenset({"qkv_fused", "swiglu_mlp", "swiglu_align_to", "scale_mlp", "use_rot_pos_emb", "rope_type",
                       "rope_rotate_half", "num_reg_tokens", "use_abs_pos_emb", "use_fc_norm", "ref_feat_shape",
                       "attn_type", "scale_attn_inner", "use_post_norm"})


def _norm_name(layer) -> str:
    """"rmsnorm" for an RMSNorm constructor (class, partial or name), else "layernorm"."""
    if layer is None:
        return "layernorm"
    fn = getattr(layer, "func", layer)
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)
    return "rmsnorm" if "rms" in name.lower() else "layernorm"


def eva_shape_options(options: dict) -> dict:
    """:class:`ViTShape` fields from timm ``Eva`` constructor options (timm's defaults for missing keys:
    global_pool 'avg', a fused qkv with q / v biases, LayerNorm, an absolute position embedding).

    Raises:
        ValueError: an Eva option the shapes do not cover (post-norm blocks, attn_type 'rope', the attention
            inner norm, rope types other than 'cat' / 'dinov3', global_pool 'map').
    """
    o = dict(options)
    bad = [k for k, bad_value in (("use_post_norm", True), ("scale_attn_inner", True), ("attn_type", "rope"),
                                  ("global_pool", "map"), ("use_pre_transformer_norm", True)) if o.get(k) == bad_value]
    rope_type = o.get("rope_type", "cat") if o.get("use_rot_pos_emb", False) else None
    if rope_type not in ROPE_TYPES:
        bad.append(f"rope_type={rope_type!r}")
    if bad:
        raise ValueError(f"Eva options not covered by ViTShape: {', '.join(bad)}")
    swiglu = o.get("swiglu_mlp", False)
    mlp = ("swiglu" if o.get("scale_mlp", False) or o.get("swiglu_align_to", 0) else "swiglu_packed") if swiglu \
        else "gelu"
    qkv_bias = o.get("qkv_bias", True)
    fields = dict(
        img_size=o.get("img_size", 224), patch_size=o.get("patch_size", 16), in_chans=o.get("in_chans", 3),
        embed_dim=o.get("embed_dim", 768), depth=o.get("depth", 12), num_heads=o.get("num_heads", 12),
        mlp_ratio=o.get("mlp_ratio", 4.0), num_classes=o.get("num_classes", 1000),
        class_token=o.get("class_token", True), global_pool=o.get("global_pool", "avg"),
        qkv_bias="qv" if qkv_bias else False, qkv_fused=o.get("qkv_fused", True), rope=rope_type,
        rope_half=bool(o.get("rope_rotate_half", False)) if rope_type else False, mlp=mlp,
        mlp_norm=bool(o.get("scale_mlp", False)), norm=_norm_name(o.get("norm_layer")),
        layer_scale=o.get("init_values") is not None, reg_tokens=o.get("num_reg_tokens", 0),
        pos_embed=o.get("use_abs_pos_emb", True),
    )
    if o.get("attn_only_layer_scale", False):
        raise ValueError("Eva options not covered by ViTShape: attn_only_layer_scale=True")
    return fields


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a (timm-style) Vision Transformer that every count here is a function of.

    Fields: img_size (H, W) in pixels; patch_size P; in_chans C; embed_dim D; depth L; num_heads H;
    mlp_ratio (hidden width D_hidden = int(D * mlp_ratio), timm's rule); num_classes (0: no head); class_token;
    global_pool ('token' | 'avg' | ''); qkv_bias (True: one (3 D,) bias; False: none; "qv": timm Eva's q_bias and
    v_bias, k unbiased); mlp_hidden (exact D_hidden, overrides mlp_ratio).

    The modern blocks (timm ``Eva``; every default is the classic ViT's): qkv_fused (False: separate q / k / v
    projections); rope (2D RoPE on q and k of the patch tokens: None | "cat" (timm RotaryEmbeddingCat, EVA-02: a
    cached table) | "dinov3" (RotaryEmbeddingDinoV3: the table built per forward, fp32)); rope_half (timm's
    rotate_half pair layout, else interleaved); mlp ("gelu" | "swiglu": gate and up Linears fc1_g / fc1_x |
    "swiglu_packed": one packed fc1 of 2 * D_hidden outputs; D_hidden is each half's width); mlp_norm (a norm
    on the MLP hidden, EVA-02's scale_mlp); norm ("layernorm" | "rmsnorm"); layer_scale (LayerScale on both
    branches); reg_tokens (register tokens after the class token); pos_embed (an absolute position embedding).

    Derived: ``num_patches`` = (H / P) * (W / P); ``tokens`` N = num_patches + (1 if class_token) + reg_tokens;
    ``prefix_tokens`` = N - num_patches; ``head_dim`` = D / H; ``hidden`` = D_hidden; ``classic``: no modern
    option set.

    Raises:
        ValueError: a size that is not positive, img_size not a multiple of patch_size, embed_dim not divisible
            by num_heads (the message names the field, expected and actual values).
    """

    img_size: tuple
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_token: bool = True
    global_pool: str = "token"
    qkv_bias: bool = True
    mlp_hidden: int | None = None  # exact D_hidden when known (from a built model); else int(D * mlp_ratio)
    qkv_fused: bool = True
    rope: str | None = None
    rope_half: bool = False
    mlp: str = "gelu"
    mlp_norm: bool = False
    norm: str = "layernorm"
    layer_scale: bool = False
    reg_tokens: int = 0
    pos_embed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "img_size", _pair(self.img_size))
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0; got {self.num_classes}")
        if any(s < 1 or s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size must be positive multiples of patch_size={self.patch_size}; "
                             f"got {self.img_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0; got {self.mlp_ratio}")
        for name, allowed in (("rope", ROPE_TYPES), ("mlp", MLP_TYPES), ("norm", NORM_TYPES),
                              ("qkv_bias", QKV_BIAS_FORMS)):
            v = getattr(self, name)
            if not any(v is a or (isinstance(v, str) and v == a) for a in allowed):
                raise ValueError(f"{name} must be one of {allowed}; got {v!r}")
        if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0; got {self.reg_tokens!r}")
        if self.rope is not None and self.head_dim % 4:
            raise ValueError(f"rope needs head_dim divisible by 4 (2D RoPE); got head_dim={self.head_dim}")

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)

    @property
    def tokens(self) -> int:
        return self.num_patches + (1 if self.class_token else 0) + self.reg_tokens

    @property
    def prefix_tokens(self) -> int:
        return self.tokens - self.num_patches

    @property
    def classic(self) -> bool:
        """No option of the modern blocks set (the classic ViT: every count as before they existed)."""
        return (self.qkv_fused and self.rope is None and self.mlp == "gelu" and not self.mlp_norm
                and self.norm == "layernorm" and not self.layer_scale and self.reg_tokens == 0 and self.pos_embed
                and isinstance(self.qkv_bias, bool))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_config(cls, name_or_config: str | dict, **overrides) -> "ViTShape":
        """Shape of a named config (:mod:`fastvit_kernels.configs`, or :data:`TIMM_EVA_OPTIONS`) or a dict of
        VisionTransformer constructor arguments, with overrides (e.g. ``img_size=384``). Unknown constructor keys are
        ignored. A dict (or config) holding a key only timm's ``Eva`` takes (``qkv_fused``, ``swiglu_mlp``,
        ``use_rot_pos_emb``, ``num_reg_tokens``, ...) is read in Eva's terms (:func:`eva_shape_options`, timm Eva's
        defaults). VisionTransformer's ``reg_tokens``, ``init_values`` (LayerScale), ``norm_layer`` (RMSNorm) and
        ``mlp_layer`` ("swiglu" / "swiglu_packed") are read too.

        Raises:
            KeyError: unknown config name.
            ValueError: Eva options the shapes do not cover.
        """
        if isinstance(name_or_config, str):
            cfg = dict(TIMM_EVA_OPTIONS[name_or_config]) if name_or_config in TIMM_EVA_OPTIONS \
                else get_config(name_or_config)
        else:
            cfg = dict(name_or_config)
        cfg.update(overrides)
        fields = cls.__dataclass_fields__
        if _EVA_KEYS & cfg.keys():
            shape = eva_shape_options(cfg)
            shape.update({k: v for k, v in cfg.items() if k in fields and k not in shape})
            return cls(**shape)
        cfg = dict(cfg)
        if cfg.get("init_values") is not None:
            cfg.setdefault("layer_scale", True)
        if "norm_layer" in cfg and "norm" not in cfg:
            cfg["norm"] = _norm_name(cfg["norm_layer"])
        if isinstance(cfg.get("mlp_layer"), str) and "mlp" not in cfg:
            cfg["mlp"] = {"swiglu": "swiglu", "swiglu_packed": "swiglu_packed"}.get(cfg["mlp_layer"], "gelu")
        defaults = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12)
        defaults.update({k: v for k, v in cfg.items() if k in fields})
        return cls(**defaults)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ViTShape":
        """Shape of a built :class:`fastvit_kernels.reference.VisionTransformer` (or FastViT)."""
        pe = model.patch_embed
        blk = model.blocks[0]
        return cls(
            img_size=pe.img_size, patch_size=pe.patch_size[0], in_chans=pe.in_chans, embed_dim=model.embed_dim,
            depth=len(model.blocks), num_heads=blk.attn.num_heads,
            mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, mlp_hidden=blk.mlp.fc1.out_features,
            num_classes=model.num_classes,
            class_token=model.cls_token is not None, global_pool=model.global_pool,
            qkv_bias=blk.attn.qkv.bias is not None,
        )

    def with_(self, **changes) -> "ViTShape":
        """A copy with some fields changed."""
        return replace(self, **changes)


# ------------------------------------------------------------------------------------------------------------
# per-model counts
# ------------------------------------------------------------------------------------------------------------
def _by_kind(fwd: dict[str, int], kind: str) -> dict[str, int]:
    """The per-class FLOPs of ``kind`` from the forward's: backward is 2x every matmul except the patch embedding
    (weight gradient only: images / patches need no gradient); "train" is forward + backward."""
    bwd = {k: (v if k == "patch_embed" else 2 * v) for k, v in fwd.items()}
    if kind == "forward":
        return fwd
    if kind == "backward":
        return bwd
    return {k: fwd[k] + bwd[k] for k in fwd}


def flops_by_class(shape: ViTShape, batch_size: int, kind: str = "forward") -> dict[str, int]:
    """Model FLOPs of one forward / backward / training step (forward + backward) of ``batch_size`` images,
    split by op class (:data:`OP_CLASSES`; the optimizer does no matmuls: 0).

    Args:
        shape: the model's sizes.
        batch_size: B >= 1.
        kind: "forward" | "backward" | "train".

    Returns:
        {op class: FLOPs} with every key of :data:`OP_CLASSES`, ints.

    Raises:
        ValueError: kind not one of the three; batch_size < 1.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    B, N, D, L = batch_size, shape.tokens, shape.embed_dim, shape.depth
    M = B * N
    fwd = {
        "patch_embed": patch_embed_flops(B, shape.num_patches, D, shape.in_chans, shape.patch_size),
        "ln_qkv": L * linear_flops(M, D, 3 * D),
        "attention": L * attention_flops(B, N, shape.num_heads, shape.head_dim),
        "proj": L * linear_flops(M, D, D),
        # a SwiGLU fc1 has 2 * D_hidden outputs (gate and up): one more D -> D_hidden GEMM than a GELU MLP
        "mlp": L * (mlp_flops(M, D, shape.hidden)
                    + (linear_flops(M, D, shape.hidden) if shape.mlp != "gelu" else 0)),
        "head": linear_flops(B, D, shape.num_classes),
        "optimizer": 0,
    }
    return _by_kind(fwd, kind)


def model_flops(shape: ViTShape, batch_size: int, kind: str = "forward") -> int:
    """Total model FLOPs (see :func:`flops_by_class`) of ``batch_size`` images; kind "forward" | "backward" |
    "train"."""
    return sum(flops_by_class(shape, batch_size, kind).values())


def flops_per_image(shape: ViTShape, kind: str = "forward") -> int:
    """Model FLOPs per image (forward, backward or a training step)."""
    return model_flops(shape, 1, kind)


# ------------------------------------------------------------------------------------------------------------
# native-resolution (NaFlex) batches: variable-length sequences, packed or padded
# ------------------------------------------------------------------------------------------------------------
def naflex_flops_by_class(shape: ViTShape, seq_lens, kind: str = "forward", *, pad_to: int | None = None,
                          embed_tokens: int | None = None) -> dict[str, int]:
    """Model FLOPs of a NaFlex ViT (NaViT packing, Dehghani et al. 2023) over a batch of variable-length
    sequences, by op class (:data:`OP_CLASSES`), with the conventions of :func:`flops_by_class`.

    Packed (``pad_to=None``, real tokens only): every GEMM runs on sum_s (n_s + p) rows and attention costs
    ``4 * H * head_dim * sum_s (n_s + p)^2`` (each sequence attends to itself), p = ``shape.prefix_tokens`` (class
    and register tokens, added to every sequence). Padded (timm's NaFlex collator + a [B, 1, N, N] mask): every
    sequence is ``pad_to`` patch rows, so the GEMMs run on S (pad_to + p) rows and attention on (pad_to + p)^2 per
    image -- the masked-out work is executed and counted.

    Args:
        shape: the model's sizes (``img_size`` is not used: sequence lengths come from ``seq_lens``).
        seq_lens: the S per-image patch counts n_s (after any token dropping), each >= 1.
        kind: "forward" | "backward" | "train".
        pad_to: None (packed) or N_max >= max(n_s) (padded).
        embed_tokens: patch rows through the patch-embedding GEMM (default: sum n_s packed, S * pad_to padded);
            e.g. timm's MAE-style patch dropout embeds every patch before dropping (pass the undropped count).

    Returns:
        {op class: FLOPs} with every key of :data:`OP_CLASSES`, ints.

    Raises:
        ValueError: no sequence, a length below 1, pad_to below the longest, embed_tokens below 0, a bad kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    lens = [int(n) for n in seq_lens]
    if not lens or min(lens) < 1:
        raise ValueError(f"seq_lens must hold at least one length, each >= 1; got {lens[:8]}")
    if pad_to is not None and pad_to < max(lens):
        raise ValueError(f"pad_to={pad_to} is below the longest sequence ({max(lens)})")
    S, p, D, L = len(lens), shape.prefix_tokens, shape.embed_dim, shape.depth
    rows = [(n if pad_to is None else pad_to) + p for n in lens]
    M = sum(rows)
    if embed_tokens is None:
        embed_tokens = sum(lens) if pad_to is None else S * pad_to
    if embed_tokens < 0:
        raise ValueError(f"embed_tokens must be >= 0; got {embed_tokens}")
    fwd = {
        "patch_embed": linear_flops(embed_tokens, shape.in_chans * shape.patch_size ** 2, D),
        "ln_qkv": L * linear_flops(M, D, 3 * D),
        "attention": L * sum(attention_flops(1, n, shape.num_heads, shape.head_dim) for n in rows),
        "proj": L * linear_flops(M, D, D),
        "mlp": L * (mlp_flops(M, D, shape.hidden) + (linear_flops(M, D, shape.hidden) if shape.mlp != "gelu" else 0)),
        "head": linear_flops(S, D, shape.num_classes),
        "optimizer": 0,
    }
    return _by_kind(fwd, kind)


def naflex_model_flops(shape: ViTShape, seq_lens, kind: str = "forward", *, pad_to: int | None = None,
                       embed_tokens: int | None = None) -> int:
    """Total of :func:`naflex_flops_by_class` (same arguments)."""
    return sum(naflex_flops_by_class(shape, seq_lens, kind, pad_to=pad_to, embed_tokens=embed_tokens).values())
