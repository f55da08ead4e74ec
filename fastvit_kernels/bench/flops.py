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


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a (timm-style) Vision Transformer that every count here is a function of.

    Fields: img_size (H, W) in pixels; patch_size P; in_chans C; embed_dim D; depth L; num_heads H;
    mlp_ratio (hidden width D_hidden = int(D * mlp_ratio), timm's rule); num_classes (0: no head); class_token;
    global_pool ('token' | 'avg' | ''); qkv_bias; mlp_hidden (exact D_hidden, overrides mlp_ratio).

    Derived: ``num_patches`` = (H / P) * (W / P); ``tokens`` N = num_patches + (1 if class_token);
    ``head_dim`` = D / H; ``hidden`` = D_hidden.

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

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)

    @property
    def tokens(self) -> int:
        return self.num_patches + (1 if self.class_token else 0)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_config(cls, name_or_config: str | dict, **overrides) -> "ViTShape":
        """Shape of a named config (:mod:`fastvit_kernels.configs`) or a dict of VisionTransformer constructor
        arguments, with overrides (e.g. ``img_size=384``). Unknown constructor keys are ignored.

        Raises:
            KeyError: unknown config name.
        """
        cfg = get_config(name_or_config) if isinstance(name_or_config, str) else dict(name_or_config)
        cfg.update(overrides)
        fields = cls.__dataclass_fields__
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
        "mlp": L * mlp_flops(M, D, shape.hidden),
        "head": linear_flops(B, D, shape.num_classes),
        "optimizer": 0,
    }
    # backward: 2x every matmul, except the patch embedding (weight gradient only: images need no gradient)
    bwd = {k: (v if k == "patch_embed" else 2 * v) for k, v in fwd.items()}
    if kind == "forward":
        return fwd
    if kind == "backward":
        return bwd
    return {k: fwd[k] + bwd[k] for k in fwd}


def model_flops(shape: ViTShape, batch_size: int, kind: str = "forward") -> int:
    """Total model FLOPs (see :func:`flops_by_class`) of ``batch_size`` images; kind "forward" | "backward" |
    "train"."""
    return sum(flops_by_class(shape, batch_size, kind).values())


def flops_per_image(shape: ViTShape, kind: str = "forward") -> int:
    """Model FLOPs per image (forward, backward or a training step)."""
    return model_flops(shape, 1, kind)
