"""Exact FLOP counts of a ViT (2 FLOPs per multiply-add, attention matmuls included), per op and per model, and
the FLOP formulas of this package's custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

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

import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass, replace

import torch

from ..configs import get_config

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
# per-op forward FLOPs (2 per multiply-add)
# ------------------------------------------------------------------------------------------------------------
def linear_flops(M: int, K: int, N: int) -> int:
    """``(M, K) @ (K, N)``: 2 * M * K * N."""
    return 2 * M * K * N


def patch_embed_flops(B: int, num_patches: int, D: int, C: int, P: int) -> int:
    """Patch-embedding GEMM over B images: 2 * B * num_patches * D * C * P * P."""
    return 2 * B * num_patches * D * C * P * P


def attention_flops(B: int, N: int, H: int, head_dim: int) -> int:
    """Softmax attention's two matmuls, S = Q K^T and O = P V, each 2 * N * N * head_dim per (image, head):
    4 * B * H * N^2 * head_dim."""
    return 4 * B * H * N * N * head_dim


def mlp_flops(M: int, D: int, D_hidden: int) -> int:
    """fc1 (D -> D_hidden) and fc2 (D_hidden -> D) over M tokens: 4 * M * D * D_hidden."""
    return 4 * M * D * D_hidden


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


# ------------------------------------------------------------------------------------------------------------
# FlopCounterMode formulas for the fastvit:: custom ops (an unregistered custom op counts as zero FLOPs)
# ------------------------------------------------------------------------------------------------------------
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


def _attention_fwd_flop(qkv, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    B, N, three_d = qkv
    return attention_flops(B, N, num_heads, three_d // 3 // num_heads)


def _attention_bwd_flop(dout, qkv, out, lse, num_heads, scale, *args, out_shape=None, **kwargs) -> int:
    # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: 2x forward (the kernels also recompute S = Q K^T, which
    # model FLOPs leave out; torch's own SDPA-backward formula counts it, the eager matmul backward does not)
    return 2 * _attention_fwd_flop(qkv, num_heads, scale)


def _layernorm_mlp_fwd_flop(x, norm_weight, norm_bias, fc1_weight, *args, out_shape=None, **kwargs) -> int:
    M, D = x
    return mlp_flops(M, D, fc1_weight[0])


def _layernorm_mlp_bwd_flop(dout, x, preact, mean, rstd, norm_weight, norm_bias, fc1_weight, *args,
                            out_shape=None, **kwargs) -> int:
    M, D = x
    return 2 * mlp_flops(M, D, fc1_weight[0])


def _layernorm_linear_fwd_flop(x, norm_weight, norm_bias, weight, *args, out_shape=None, **kwargs) -> int:
    M, D = x
    return linear_flops(M, D, weight[0])


def _layernorm_linear_bwd_flop(dout, x, mean, rstd, norm_weight, norm_bias, weight, *args, out_shape=None,
                               **kwargs) -> int:
    M, D = x
    return 2 * linear_flops(M, D, weight[0])


def _linear_residual_fwd_flop(x, weight, *args, out_shape=None, **kwargs) -> int:
    M, K = x
    return linear_flops(M, K, weight[0])


def _linear_residual_bwd_flop(dout, x, weight, *args, out_shape=None, **kwargs) -> int:
    M, K = x
    return 2 * linear_flops(M, K, weight[0])


def _attention_block_fwd_flop(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads,
                              *args, out_shape=None, **kwargs) -> int:
    B, N, D = x
    M = B * N
    return linear_flops(M, D, 3 * D) + attention_flops(B, N, num_heads, D // num_heads) + linear_flops(M, D, D)


def _attention_block_bwd_flop(dout, x, qkv, o, lse, mean, rstd, norm_weight, norm_bias, qkv_weight, proj_weight,
                              has_qkv_bias, has_proj_bias, num_heads, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_block_fwd_flop(x, None, None, None, None, None, None, num_heads)


_FORMULAS = {
    "patch_embed_fwd": _patch_embed_fwd_flop, "patch_embed_bwd": _patch_embed_bwd_flop,
    "attention_fwd": _attention_fwd_flop, "attention_bwd": _attention_bwd_flop,
    "layernorm_mlp_fwd": _layernorm_mlp_fwd_flop, "layernorm_mlp_bwd": _layernorm_mlp_bwd_flop,
    "layernorm_linear_fwd": _layernorm_linear_fwd_flop, "layernorm_linear_bwd": _layernorm_linear_bwd_flop,
    "linear_residual_fwd": _linear_residual_fwd_flop, "linear_residual_bwd": _linear_residual_bwd_flop,
    "attention_block_fwd": _attention_block_fwd_flop, "attention_block_bwd": _attention_block_bwd_flop,
}


def register_flop_formulas() -> list[str]:
    """Register the FLOP formulas of the ``fastvit::*`` custom ops with ``torch.utils.flop_counter`` so that
    ``FlopCounterMode`` counts them (same conventions as this module: backward = 2x forward).

    Called when :mod:`fastvit_kernels.ops` is imported (after the ops are defined); idempotent (an op that is
    already registered is skipped); imports neither triton nor a GPU. Returns the names of the ops registered by
    this call (empty when ``torch.utils.flop_counter`` lacks ``register_flop_formula``).
    """
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:  # pragma: no cover - very old torch
        return []
    done = []
    for name, formula in _FORMULAS.items():
        packet = getattr(torch.ops.fastvit, name)
        if packet in flop_registry:
            continue
        register_flop_formula(packet)(formula)
        done.append(name)
    return done


_FLOP_COUNTER = "torch.utils.flop_counter"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: when ``torch.utils.flop_counter`` is first imported (by anyone), register the
    formulas right after the module has executed. (That module imports triton, so importing it ourselves at
    ``import fastvit_kernels`` time would break the package's no-triton-at-import contract.)"""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _FLOP_COUNTER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, found by the remaining finders
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            register_flop_formulas()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install_flop_formulas() -> None:
    """Make ``FlopCounterMode`` count the ``fastvit::*`` ops without importing triton now: register the formulas
    at once when ``torch.utils.flop_counter`` is already loaded, else as soon as it is imported.

    Called at the end of ``fastvit_kernels/ops/__init__.py`` (after the custom ops are defined).
    """
    if _FLOP_COUNTER in sys.modules:
        register_flop_formulas()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
