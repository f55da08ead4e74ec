"""FastEva: timm's ``Eva`` (EVA-02, Fang et al. 2023; DINOv3, Simeoni et al. 2025; PE, Bolya et al. 2025;
RoPE-ViT, Heo et al. 2024) computing through this package's ops. Same constructor arguments, same state_dict keys,
same outputs. A block (see :mod:`fastvit_kernels.reference_eva`) runs

    qkv = RoPE(Linear(norm1(z)))                  _qkv: ops.layernorm_linear + reference.rope_ref (RMSNorm: eager)
    o   = MHA(qkv)                                _attn: ops.attention
    z'  = z + drop_path(gamma_1 * proj(norm(o)))  _proj: ops.linear_residual (gamma_1 folded; eager around dropout)
    z   = z' + drop_path(gamma_2 * mlp(norm2(z'))) _mlp: ops.layernorm_mlp (GELU Mlp); eager for SwiGLU / RMSNorm

Each of the four is one method, the seam where a fused op replaces the eager part as it lands (RoPE in the qkv
GEMM epilogue, ``ops.layernorm_linear(..., rope_coords=, rope_freqs=, rope_heads=, rope_layout=, norm=)``; the
SwiGLU / RMSNorm MLP op). Dropout inside attention or the MLP while training runs the block on the eager
reference modules, with a one-time warning.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference, reference_eva
from ._blocks import BlocksBackend, folds_layer_scale, mlp_or_eager, norm_mlp, norm_qkv, scaled_linear
from .rope import RopeTable


class FastEvaBlock(reference_eva.EvaBlock):
    """:class:`fastvit_kernels.reference_eva.EvaBlock` (timm's parameters) computing through the ops.
    Input (B, N, D) fp32 | fp16 | bf16 and a :class:`RopeTable` (or None); output (B, N, D)."""

    backend: str | None = None  # set by FastEva

    def forward(self, x: torch.Tensor, rope: RopeTable | None = None) -> torch.Tensor:
        if self.training and (self.attn.attn_drop.p > 0 or self.mlp.drop1.p > 0):
            if not getattr(self, "_warned", False):
                warnings.warn("FastEva: attention / MLP dropout > 0 is not implemented by the fused ops; this block "
                              "runs eager PyTorch while training", stacklevel=2)
                self._warned = True
            return super().forward(x, rope)
        x = self._proj(x, self._attn(self._qkv(x, rope)))  # z' = z + drop_path(gamma_1 * proj(MHA(...)))
        if not (self.training and self.drop_path2.drop_prob > 0):
            if self.gamma_2 is None:
                return self._mlp(x, add_residual=True)
            if folds_layer_scale(x):  # gamma_2 folded into fc2, the residual in its epilogue
                y = norm_mlp(x, self.norm2, self.mlp, True, self.backend, layer_scale=self.gamma_2)
                if y is not None:
                    return y
        y = self._mlp(x, add_residual=False)
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)

    def _qkv(self, x: torch.Tensor, rope: RopeTable | None) -> torch.Tensor:
        """Seam: norm1 + qkv (+ qk_norm) + RoPE: (B, N, D) -> rotated qkv (B, N, 3 D). LayerNorm / RMSNorm without
        qk_norm: ``ops.layernorm_linear`` with the norm in its GEMM prologue and the RoPE in its epilogue
        (:func:`fastvit_kernels._blocks.norm_qkv`); with qk_norm (which sits between the GEMM and the rotation):
        the op, eager qk_norm, then ``reference.rope_ref``; another norm: eager."""
        attn, norm1 = self.attn, self.norm1
        weight, bias = attn.qkv_params()
        if isinstance(attn.q_norm, nn.Identity):
            qkv = norm_qkv(x, norm1, weight, bias, attn.num_heads, rope, self.backend)
            if qkv is not None:
                return qkv
        qkv = norm_qkv(x, norm1, weight, bias, attn.num_heads, backend=self.backend)
        if qkv is None:
            qkv = F.linear(norm1(x), weight, bias)
        qkv = attn.qk_normed(qkv)
        if rope is not None:
            qkv = reference.rope_ref(qkv, rope.coords, rope.freqs, attn.num_heads, rope.layout)
        return qkv

    def _attn(self, qkv: torch.Tensor) -> torch.Tensor:
        """Seam: multi-head attention, (B, N, 3 D) -> (B, N, D): ``ops.attention`` (head_dim a multiple of 8 up to
        128; otherwise the eager reference)."""
        attn = self.attn
        if attn.head_dim % 8 or attn.head_dim > 128:
            return reference.attention_ref(qkv, attn.num_heads, attn.scale)
        return ops.attention(qkv, attn.num_heads, attn.scale, backend=self.backend)

    def _proj(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Seam: ``x + drop_path1(gamma_1 * proj_drop(proj(norm(o))))`` (norm: the attention-output norm,
        scale_attn_inner, eager): ``ops.linear_residual`` without proj dropout or stochastic depth, gamma_1 folded into
        proj (:func:`fastvit_kernels._blocks.folds_layer_scale`; fp16 compute: eager LayerScale)."""
        attn = self.attn
        o = attn.norm(o)
        if not (self.training and (self.drop_path1.drop_prob > 0 or attn.proj_drop.p > 0)):
            if self.gamma_1 is None:
                return ops.linear_residual(o, attn.proj.weight, attn.proj.bias, x, backend=self.backend)
            if folds_layer_scale(x):
                weight, bias = scaled_linear(attn.proj.weight, attn.proj.bias, self.gamma_1)
                return ops.linear_residual(o, weight, bias, x, backend=self.backend)
        y = attn.proj_drop(F.linear(o, attn.proj.weight, attn.proj.bias))
        return x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)

    def _mlp(self, x: torch.Tensor, add_residual: bool) -> torch.Tensor:
        """Seam: norm2 + MLP (+ residual): ``[x +] mlp(norm2(x))``, (B, N, D): ``ops.layernorm_mlp`` (GELU) or
        ``ops.swiglu_mlp`` (SwiGLU / SwiGLUPacked, EVA-02's hidden LayerNorm included) after a LayerNorm or an
        RMSNorm (:func:`fastvit_kernels._blocks.norm_mlp`); any other MLP or norm: eager."""
        return mlp_or_eager(x, self.norm2, self.mlp, add_residual, self.backend)


class FastEva(BlocksBackend, reference_eva.Eva):
    """Drop-in for timm's ``Eva``: constructor arguments (see :class:`fastvit_kernels.reference_eva.Eva`) plus
    ``backend`` ("auto" | "triton" | "torch" | None), timm's state_dict keys, timm's outputs.

    Input: images (B, in_chans, H, W), fp32 | fp16 | bf16 (bf16 on GPU only for the Triton path). Output: logits
    (B, num_classes) (pooled features (B, D) when num_classes == 0).

    The patch embedding runs ``ops.patch_embed`` when the model has an absolute position embedding and a fixed
    image size (otherwise eager); each block as :class:`FastEvaBlock`; the 'map' head eager.

    Raises:
        ValueError / NotImplementedError / TypeError: as :class:`fastvit_kernels.reference_eva.Eva`.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        if "block_fn" in kwargs:
            raise ValueError("FastEva sets block_fn itself")
        super().__init__(*args, block_fn=FastEvaBlock, **kwargs)
        self.backend = backend
        ops.register_flop_formulas(only_if_loaded=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pe = self.patch_embed
        if self.pos_embed is None or self.dynamic_img_size:
            return super().embed(images)
        pe.check_input(images)
        x = ops.patch_embed(images, pe.proj.weight, pe.proj.bias, self.pos_embed, self.cls_token,
                            reg_token=self.reg_token, no_embed_class=self.no_embed_class,
                            dynamic_img_pad=pe.dynamic_img_pad, backend=self.backend)
        return self.pos_drop(x)

    @classmethod
    def from_timm(cls, model: nn.Module, backend: str | None = None) -> "FastEva":
        """Build a FastEva with the architecture of a timm ``Eva`` and load its weights (``strict=True``), on the
        source model's device and dtype, in its training mode.

        Raises:
            NotImplementedError: something FastEva does not implement (post-norm blocks, grouped-query or gated
                attention, patch dropout, another rope / norm / MLP class), naming each.
        """
        kwargs, problems = _eva_kwargs(model)
        if problems:
            raise NotImplementedError(f"FastEva.from_timm: not supported: {', '.join(problems)}")
        ref = model.patch_embed.proj.weight
        with torch.device("meta"):
            fast = cls(**kwargs, backend=backend)
        fast = fast.to_empty(device=ref.device).to(ref.dtype)
        fast.init_non_persistent_buffers()
        fast.load_state_dict(model.state_dict(), strict=True)
        return fast.train(model.training)


def _hidden_ratio(hidden: int, dim: int) -> float:
    """An mlp_ratio with ``int(dim * ratio) == hidden`` (hidden / dim unless float round-off breaks that)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _eva_kwargs(model: nn.Module) -> tuple[dict, list[str]]:
    """FastEva constructor arguments reproducing a timm ``Eva``, and the list of what is not supported."""
    problems = []
    blk, pe, D = model.blocks[0], model.patch_embed, model.embed_dim
    attn, mlp = blk.attn, blk.mlp
    if type(blk).__name__ != "EvaBlock":
        return {}, [f"block {type(blk).__name__} (use_post_norm)"]
    if getattr(model, "patch_drop", None) is not None:
        problems.append("patch_drop_rate > 0")
    attn_type = {"EvaAttention": "eva", "AttentionRope": "rope"}.get(type(attn).__name__)
    if attn_type is None:
        problems.append(f"attention {type(attn).__name__}")
    if getattr(attn, "num_kv_groups", 1) != 1:
        problems.append("num_kv_heads (grouped-query attention)")
    if getattr(attn, "gate", None) is not None:
        problems.append("gated attention")
    fused = getattr(attn, "qkv", None) is not None
    if attn_type == "eva" and fused:
        qkv_bias = attn.q_bias is not None
    else:
        qkv_bias = (attn.qkv if fused else attn.q_proj).bias is not None
    mlp_name = type(mlp).__name__
    swiglu, align, gate_ok = mlp_name in ("SwiGLU", "GluMlp"), 0, True
    if mlp_name == "SwiGLU":
        hidden = mlp.fc1_g.out_features
        align = 0 if not isinstance(mlp.norm, nn.Identity) else 1  # SwiGLU without a norm: timm's swiglu_align_to
    elif mlp_name == "GluMlp":
        hidden = mlp.fc1.out_features // 2
        gate_ok = not mlp.gate_last
    else:
        hidden = mlp.fc1.out_features
    act = type(getattr(mlp, "act", None)).__name__
    if mlp_name not in ("SwiGLU", "GluMlp", "Mlp") or not gate_ok or act != ("SiLU" if swiglu else "GELU") or (
            act == "GELU" and getattr(mlp.act, "approximate", "none") != "none"):
        problems.append(f"MLP {mlp_name} with {act}")
    norms = {}
    for what, m in (("norm_layer", blk.norm1),):
        try:
            norms[what] = reference.norm_spec_of(m)
        except NotImplementedError:
            problems.append(f"norm_layer {type(m).__name__}")
    rope, rope_kw = getattr(model, "rope", None), {}
    if rope is not None:
        name = type(rope).__name__
        aug = dict(rope_shift_coords=getattr(rope, "shift_coords", None),
                   rope_jitter_coords=getattr(rope, "jitter_coords", None),
                   rope_rescale_coords=getattr(rope, "rescale_coords", None))
        if name == "RotaryEmbeddingCat" and not rope.in_pixels and getattr(rope, "grid_type", "index") == "index":
            rope_kw = dict(rope_type="cat", rope_temperature=rope.temperature, rope_grid_offset=rope.grid_offset,
                           rope_grid_indexing=rope.grid_indexing, rope_rotate_half=rope.rotate_half,
                           ref_feat_shape=rope.ref_feat_shape, **aug)
        elif name == "RotaryEmbeddingMixed":
            rope_kw = dict(rope_type="mixed", rope_temperature=rope.temperature,
                           rope_grid_indexing=rope.grid_indexing, **aug)
        elif name == "RotaryEmbeddingDinoV3" and rope.min_period is None and rope.normalize_coords == "separate":
            rope_kw = dict(rope_type="dinov3", rope_temperature=rope.temperature, rope_grid_offset=rope.grid_offset,
                           rope_grid_indexing=rope.grid_indexing, rope_rotate_half=rope.rotate_half, **aug)
        else:
            problems.append(f"rope {name}")
    pool = getattr(model, "attn_pool", None)
    pool_kw = {}
    if pool is not None:
        if type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1 or pool.pos_embed is not None \
                or not isinstance(pool.q_norm, nn.Identity) or pool.mlp is None or pool.pool != "token":
            problems.append("attention pool options")
        else:
            pool_kw = dict(attn_pool_num_heads=pool.num_heads,
                           attn_pool_mlp_ratio=_hidden_ratio(pool.mlp.fc1.out_features, D))
    dp = getattr(model.blocks[-1], "drop_path1", None)
    kwargs = dict(
        img_size=tuple(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=D, depth=len(model.blocks),
        num_heads=attn.num_heads, qkv_bias=qkv_bias, qkv_fused=fused,
        qk_norm=not isinstance(attn.q_norm, nn.Identity), mlp_ratio=_hidden_ratio(hidden, D), swiglu_mlp=swiglu,
        swiglu_align_to=align, scale_mlp=not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        scale_attn_inner=not isinstance(attn.norm, nn.Identity), attn_type=attn_type or "eva",
        drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p, proj_drop_rate=attn.proj_drop.p,
        attn_drop_rate=attn.attn_drop.p, drop_path_rate=getattr(dp, "drop_prob", 0.0) or 0.0,
        norm_layer=norms.get("norm_layer"), init_values=1.0 if blk.gamma_1 is not None else None,
        attn_only_layer_scale=blk.gamma_1 is not None and blk.gamma_2 is None,
        class_token=model.cls_token is not None,
        num_reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
        no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
        use_rot_pos_emb=rope is not None, **rope_kw,
        use_pre_transformer_norm=not isinstance(model.norm_pre, nn.Identity),
        use_post_transformer_norm=not isinstance(model.norm, nn.Identity),
        use_fc_norm=not isinstance(model.fc_norm, nn.Identity), **pool_kw,
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=getattr(pe, "dynamic_img_pad", False),
    )
    return kwargs, problems
