"""FastViT: timm's VisionTransformer (same constructor arguments, same state_dict keys) computing through this
package's ops. It reads like the paper (Dosovitskiy et al. 2021, eqs. 1-4):

    z0  = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          ops.patch_embed (one fused kernel)
    z'  = MSA(LN(z)) + z                                    norm1 + qkv Linear, ops.attention, proj Linear
    z   = MLP(LN(z')) + z'                                  ops.layernorm_mlp (LN, fc1, GELU, fc2, residual fused)
    y   = head(LN(z_L^0))

Module tree and parameters come from :class:`fastvit_kernels.reference.VisionTransformer`, so a timm checkpoint
loads with ``strict=True``; only the compute differs. Each op picks its backend (Triton kernels for CUDA tensors,
or on the CPU under ``TRITON_INTERPRET=1``; the eager reference otherwise) unless ``backend=`` forces one.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from .configs import get_config


class Block(reference.Block):
    """Pre-norm ViT block computing through the fused ops; parameters as timm's ``Block``.

    Input and output: (B, N, D). Options the Triton path does not implement (attention or MLP dropout > 0 while
    training) run this block's eager reference instead, with a one-time warning: never silently different.
    """

    backend: str | None = None  # set by FastViT

    def _fallback(self, what: str) -> None:
        if not getattr(self, "_warned", False):
            warnings.warn(f"FastViT: {what} > 0 is not implemented by the fused ops; this block runs eager PyTorch "
                          "for it while training", stacklevel=3)
            self._warned = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        # z' = MSA(LN(z)) + z
        if self.training and attn.attn_drop.p > 0:
            self._fallback("attn_drop_rate")
            branch = attn(self.norm1(x))
        else:
            qkv = F.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)  # (B, N, 3 * D)
            o = ops.attention(qkv, attn.num_heads, attn.scale, backend=self.backend)  # (B, N, D)
            branch = attn.proj_drop(F.linear(o, attn.proj.weight, attn.proj.bias))
        x = x + self.drop_path1(self.ls1(branch))
        # z = MLP(LN(z')) + z'
        if self.training and mlp.drop1.p > 0:
            self._fallback("proj_drop_rate")
            return x + self.drop_path2(self.ls2(mlp(self.norm2(x))))
        args = (self.norm2.weight, self.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                self.norm2.eps)
        if self.training and self.drop_path2.drop_prob > 0:
            return x + self.drop_path2(ops.layernorm_mlp(x, *args, add_residual=False, backend=self.backend))
        return ops.layernorm_mlp(x, *args, backend=self.backend)


class FastViT(reference.VisionTransformer):
    """Drop-in for timm's ``VisionTransformer`` whose patch embedding, attention and LayerNorm + MLP run on this
    package's Triton kernels, forward and backward.

    Args: timm's (see :class:`fastvit_kernels.reference.VisionTransformer`: img_size, patch_size, in_chans,
        num_classes, global_pool, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, class_token, fc_norm,
        final_norm, drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate), plus
        ``backend``: "auto" | "triton" | "torch" | None (None: ``FASTVIT_BACKEND`` or "auto").

    Input: images (B, in_chans, H, W) with (H, W) == img_size, fp32 | fp16 | bf16 (under autocast any float).
    Output: logits (B, num_classes) (pooled features (B, D) when num_classes == 0).

    Raises:
        ValueError: bad constructor arguments (embed_dim not divisible by num_heads, img_size not a multiple of
            patch_size, ...), or images of the wrong channel count or size (raised before any kernel launch).
        NotImplementedError: a timm option this package does not implement, set to a non-default value.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        if "block_fn" in kwargs:
            raise ValueError("FastViT sets block_fn itself; use fastvit_kernels.reference.VisionTransformer for a "
                             "custom block")
        super().__init__(*args, block_fn=Block, **kwargs)
        self.backend = backend

    @property
    def backend(self) -> str | None:
        """The backend every op of this model is asked for ("auto" | "triton" | "torch" | None)."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        for blk in self.blocks:
            blk.backend = value

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D) with one fused patch-embed + position-add kernel."""
        self.patch_embed.check_input(images)
        proj = self.patch_embed.proj
        x = ops.patch_embed(images, proj.weight, proj.bias, self.pos_embed, self.cls_token, backend=self.backend)
        return self.pos_drop(x)


def create_model(name: str, pretrained: bool = False, **overrides) -> FastViT:
    """Build the named FastViT (see :mod:`fastvit_kernels.configs`), with constructor overrides.

    Raises:
        KeyError: unknown model name.
        ValueError: ``pretrained=True`` (nothing is downloaded; load a state_dict yourself).
    """
    if pretrained:
        raise ValueError("pretrained=True is not supported: fastvit_kernels downloads nothing; build the model and "
                         "call load_state_dict(timm_state_dict) (keys are timm's)")
    cfg = get_config(name)
    cfg.update(overrides)
    return FastViT(**cfg)
