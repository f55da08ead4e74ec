"""FastViT: timm's VisionTransformer (same constructor arguments, same state_dict keys) computing through this
package's ops. It reads like the paper (Dosovitskiy et al. 2021, eqs. 1-4):

    z0  = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          ops.patch_embed (one fused kernel)
    z'  = MSA(LN(z)) + z                                    ops.attention_block: norm1 + qkv, attention,
                                                            proj + residual (or, around LayerScale / qk_norm /
                                                            dropout, ops.layernorm_linear, ops.attention,
                                                            ops.linear_residual; see Block.choose_paths)
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
from ._blocks import BlocksBackend, folds_layer_scale, mlp_or_eager, norm_mlp, norm_qkv, scaled_linear
from .configs import EVA_MODELS, NAFLEX_MODELS, get_config


class Block(reference.Block):
    """Pre-norm ViT block computing through the fused ops; constructor arguments and parameters as timm's
    ``Block`` (see :class:`fastvit_kernels.reference.Block`).

    Input and output: (B, N, D), fp32 | fp16 | bf16. ``forward`` is the paper's two residual equations; how each
    half is computed is chosen once, by :meth:`choose_paths`, when the block is built and whenever ``train()`` /
    ``eval()`` changes whether dropout and stochastic depth apply (as timm chooses ``attn_layer`` / ``mlp_layer``
    when it builds a block), never per call. Options the Triton path does not implement (attention or MLP dropout
    > 0 while training) run that half on the eager reference modules, with a one-time warning: never silently
    different. LayerScale is folded into the branch's last Linear (not in fp16 compute); qk_norm runs as eager ops
    around the fused ones.

    Seams (one method each, to be switched to fused ops as they land): :meth:`_qkv` (norm1 + qkv (+ qk_norm):
    ``ops.layernorm_linear``, or eager RMSNorm + ``F.linear``) and :meth:`_mlp` (norm2 + MLP (+ residual):
    ``ops.layernorm_mlp`` for LayerNorm + GELU ``Mlp``; eager for RMSNorm and the gated MLPs, SwiGLU / GluMlp).
    """

    backend: str | None = None  # set by FastViT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choose_paths()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_residual(x)  # z' = MSA(LN(z)) + z
        x = self.mlp_residual(x)  # z = MLP(LN(z')) + z'
        return x

    def train(self, mode: bool = True) -> "Block":
        """As ``nn.Module.train``, then :meth:`choose_paths` for the new mode."""
        super().train(mode)
        self.choose_paths()
        return self

    def choose_paths(self) -> None:
        """Set ``attention_residual`` and ``mlp_residual``, the two halves ``forward`` runs (each maps the block's
        (B, N, D) input of that half to its (B, N, D) output), from the block's options and its mode.

        Called when the block is built and by ``train()`` / ``eval()``; call it again after changing a dropout
        rate, the stochastic-depth rate or a LayerScale / qk_norm submodule by hand.

        Attention half, ``z' = MSA(LN(z)) + z``, in the first form that applies:

        * attention dropout while training: the eager modules (``x + drop_path1(ls1(attn(norm1(x))))``);
        * LayerNorm norm1, no qk_norm, no LayerScale, no proj dropout or stochastic depth in effect:
          ``ops.attention_block``
          (norm1 + qkv, attention, proj + residual as one op; the residual's gradient joins inside the LayerNorm
          backward);
        * no LayerScale, no proj dropout or stochastic depth in effect (qk_norm or RMSNorm): :meth:`_qkv`,
          ``ops.attention``, ``ops.linear_residual`` (proj bias + residual in the GEMM epilogue);
        * LayerScale, no proj dropout or stochastic depth in effect: the same with LayerScale folded into proj's
          weight and bias (:func:`fastvit_kernels._blocks.folds_layer_scale`; not in fp16 compute);
        * otherwise the same up to the attention output, then proj as ``F.linear`` and dropout, LayerScale and
          stochastic depth on the branch before the residual add.

        MLP half, ``z = MLP(LN(z')) + z'``: MLP dropout while training: the eager modules; stochastic depth in
        effect (or a LayerScale that cannot be folded: fp16, or an MLP no fused op covers): :meth:`_mlp`
        ``(add_residual=False)`` and those on the branch; otherwise :meth:`_mlp` with the residual added (in fc2's
        epilogue on ``ops.layernorm_mlp``), LayerScale folded into fc2.
        """
        attn, training = self.attn, self.training
        branch_ops = training and (self.drop_path1.drop_prob > 0 or attn.proj_drop.p > 0)
        no_ls1 = isinstance(self.ls1, nn.Identity)
        if training and attn.attn_drop.p > 0:
            self.attention_residual = self._attention_eager
        elif not branch_ops and no_ls1:
            plain = isinstance(attn.q_norm, nn.Identity) and isinstance(self.norm1, nn.LayerNorm)
            self.attention_residual = self._attention_fused if plain else self._attention_proj_residual
        elif not branch_ops and isinstance(self.ls1, reference.LayerScale):
            self.attention_residual = self._attention_scaled_residual
        else:
            self.attention_residual = self._attention_branch
        if training and self.mlp.drop1.p > 0:
            self.mlp_residual = self._mlp_eager
        elif training and self.drop_path2.drop_prob > 0:
            self.mlp_residual = self._mlp_branch
        elif isinstance(self.ls2, reference.LayerScale):
            self.mlp_residual = self._mlp_scaled_residual
        elif not isinstance(self.ls2, nn.Identity):
            self.mlp_residual = self._mlp_branch
        else:
            self.mlp_residual = self._mlp_fused

    # --- attention half: z' = MSA(LN(z)) + z ----------------------------------------------------------------
    def _attention_fused(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        return ops.attention_block(x, self.norm1.weight, self.norm1.bias, attn.qkv.weight, attn.qkv.bias,
                                   attn.proj.weight, attn.proj.bias, attn.num_heads, attn.scale, self.norm1.eps,
                                   backend=self.backend)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Seam: norm1 + qkv (+ qk_norm): (B, N, D) -> qkv (B, N, 3 * D). LayerNorm or RMSNorm:
        ``ops.layernorm_linear`` (:func:`fastvit_kernels._blocks.norm_qkv`); another norm: eager."""
        attn, norm1 = self.attn, self.norm1
        qkv = norm_qkv(x, norm1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, backend=self.backend)
        if qkv is None:
            qkv = F.linear(norm1(x), attn.qkv.weight, attn.qkv.bias)
        if not isinstance(attn.q_norm, nn.Identity):  # qk_norm: q and k normalised over head_dim
            B, N, _ = qkv.shape
            q, k, v = qkv.view(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
            qkv = torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=2).reshape(B, N, -1)
        return qkv

    def _msa(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output before proj, (B, N, D): :meth:`_qkv`, then ``ops.attention``."""
        return ops.attention(self._qkv(x), self.attn.num_heads, self.attn.scale, backend=self.backend)

    def _attention_proj_residual(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.attn.proj
        return ops.linear_residual(self._msa(x), proj.weight, proj.bias, x, backend=self.backend)

    def _attention_scaled_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + ls1(proj(o))`` with LayerScale folded into proj (:func:`fastvit_kernels._blocks.folds_layer_scale`;
        fp16 compute: :meth:`_attention_branch`)."""
        if not folds_layer_scale(x):
            return self._attention_branch(x)
        weight, bias = scaled_linear(self.attn.proj.weight, self.attn.proj.bias, self.ls1.gamma)
        return ops.linear_residual(self._msa(x), weight, bias, x, backend=self.backend)

    def _attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        branch = attn.proj_drop(F.linear(self._msa(x), attn.proj.weight, attn.proj.bias))
        return x + self.drop_path1(self.ls1(branch))

    def _attention_eager(self, x: torch.Tensor) -> torch.Tensor:
        self._warn_eager("attn_drop_rate")
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))

    # --- MLP half: z = MLP(LN(z')) + z' -----------------------------------------------------------------------
    def _mlp(self, x: torch.Tensor, add_residual: bool) -> torch.Tensor:
        """Seam: norm2 + MLP (+ residual): ``[x +] mlp(norm2(x))``, (B, N, D): ``ops.layernorm_mlp`` (GELU) or
        ``ops.swiglu_mlp`` (SwiGLU / SwiGLUPacked) after a LayerNorm or an RMSNorm
        (:func:`fastvit_kernels._blocks.norm_mlp`); any other MLP or norm: eager."""
        return mlp_or_eager(x, self.norm2, self.mlp, add_residual, self.backend)

    def _mlp_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(x, add_residual=True)

    def _mlp_scaled_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + ls2(mlp(norm2(x)))`` with LayerScale folded into fc2 and the residual in its epilogue, where a fused
        op covers the MLP and the dtype allows the fold (:func:`fastvit_kernels._blocks.folds_layer_scale`);
        otherwise :meth:`_mlp_branch`."""
        if folds_layer_scale(x):
            y = norm_mlp(x, self.norm2, self.mlp, True, self.backend, layer_scale=self.ls2.gamma)
            if y is not None:
                return y
        return self._mlp_branch(x)

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self._mlp(x, add_residual=False)))

    def _mlp_eager(self, x: torch.Tensor) -> torch.Tensor:
        self._warn_eager("MLP dropout (proj_drop_rate)")
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _warn_eager(self, what: str) -> None:
        if not getattr(self, "_warned", False):
            warnings.warn(f"FastViT: {what} > 0 is not implemented by the fused ops; this block runs eager PyTorch "
                          "for it while training", stacklevel=4)
            self._warned = True


class FastViT(BlocksBackend, reference.VisionTransformer):
    """Drop-in for timm's ``VisionTransformer`` whose patch embedding, attention and LayerNorm + MLP run on this
    package's Triton kernels, forward and backward.

    Args: timm's (see :class:`fastvit_kernels.reference.VisionTransformer`: img_size, patch_size, in_chans,
        num_classes, global_pool, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, class_token, fc_norm,
        final_norm, drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, reg_tokens,
        no_embed_class, dynamic_img_size, dynamic_img_pad), plus
        ``backend``: "auto" | "triton" | "torch" | None (None: ``FASTVIT_BACKEND`` or "auto").
        ``set_input_size(img_size=...)`` resamples pos_embed as timm; a checkpoint trained at another resolution
        loads through :func:`fastvit_kernels.reference.resample_state_dict`.

    Input: images (B, in_chans, H, W) with (H, W) == img_size (any size with dynamic_img_size), fp32 | fp16 | bf16
    (any of them whatever the weights' dtype: converted as the patch embedding loads them).
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
        # FlopCounterMode counts the fastvit:: ops once torch.utils.flop_counter is loaded (never imported here)
        ops.register_flop_formulas(only_if_loaded=True)

    @classmethod
    def from_timm(cls, model: nn.Module, backend: str | None = None) -> "FastViT":
        """Build a FastViT with the architecture of a timm ``VisionTransformer`` and load its weights
        (``strict=True``); the result is on the source model's device and dtype.

        Args:
            model: a timm ``VisionTransformer`` (or this package's reference model, which has its attributes).
            backend: as the constructor.

        Raises:
            NotImplementedError: the model uses something FastViT does not implement (pre-norm, an MLP or
                attention-output norm, pos_embed='none', a non-affine or fp32 norm, another MLP class or
                activation, ...), naming each.
        """
        blk = model.blocks[0]
        attn, pe = blk.attn, model.patch_embed
        problems = []
        if model.global_pool not in ("token", "avg", "", "map") or (
                model.global_pool == "map" and type(getattr(model, "attn_pool", None)).__name__ != "AttentionPoolLatent"):
            problems.append(f"global_pool={model.global_pool!r}")
        if getattr(model, "pool_include_prefix", False):
            problems.append("pool_include_prefix=True")
        if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
            problems.append("pre_norm=True")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            problems.append("scale_mlp_norm=True")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            problems.append("scale_attn_norm=True")
        if getattr(model, "pos_embed", None) is None:
            problems.append("pos_embed='none'")
        if not hasattr(attn, "qkv"):
            problems.append(f"attention layer {type(attn).__name__} without a packed qkv Linear")
        mlp_name = type(blk.mlp).__name__
        act = getattr(blk.mlp, "act", None)
        if mlp_name == "Mlp":
            mlp_layer, hidden = None, blk.mlp.fc1.out_features
            act_layer = "gelu"
            if isinstance(act, nn.GELU):
                act_layer = "gelu_tanh" if act.approximate == "tanh" else "gelu"
            elif type(act).__name__ in ("GELU", "GELUTanh"):  # timm.layers.activations
                act_layer = "gelu_tanh" if type(act).__name__ == "GELUTanh" else "gelu"
            else:
                problems.append(f"MLP activation {type(act).__name__}")
        elif mlp_name in ("SwiGLU", "GluMlp"):
            mlp_layer = "swiglu" if mlp_name == "SwiGLU" else (reference.GluMlp if blk.mlp.gate_last else "swiglu_packed")
            hidden = blk.mlp.fc1_g.out_features if mlp_name == "SwiGLU" else blk.mlp.fc1.out_features
            act_layer = {"SiLU": "silu", "Sigmoid": "sigmoid", "GELUTanh": "gelu_tanh"}.get(type(act).__name__)
            if isinstance(act, nn.GELU):
                act_layer = "gelu_tanh" if act.approximate == "tanh" else "gelu"
            if act_layer is None:
                problems.append(f"MLP activation {type(act).__name__}")
        else:
            problems.append(f"mlp_layer {mlp_name}")
        norms = {}
        for what, m in (("norm_layer", blk.norm1), ("embed_norm_layer", getattr(pe, "norm", nn.Identity()))):
            try:
                norms[what] = reference.norm_spec_of(m)
            except NotImplementedError:
                problems.append(f"{what} {type(m).__name__}")
        if problems:
            raise NotImplementedError(f"FastViT.from_timm: not supported: {', '.join(problems)}")
        D = model.embed_dim
        mlp_ratio = hidden / D
        if int(D * mlp_ratio) != hidden:  # float round-off: a ratio whose int(D * ratio) is the hidden width
            mlp_ratio = (hidden + 0.5) / D
        dp = getattr(model.blocks[-1], "drop_path1", None)
        kwargs = dict(
            img_size=tuple(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
            num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=D,
            depth=len(model.blocks), num_heads=attn.num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=attn.qkv.bias is not None,
            class_token=model.cls_token is not None, fc_norm=not isinstance(model.fc_norm, nn.Identity),
            final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
            reg_tokens=getattr(model, "num_reg_tokens", 0), no_embed_class=getattr(model, "no_embed_class", False),
            dynamic_img_size=getattr(model, "dynamic_img_size", False),
            dynamic_img_pad=getattr(pe, "dynamic_img_pad", False),
            init_values=1e-5 if hasattr(blk.ls1, "gamma") else None,  # the value comes with the weights
            act_layer=act_layer, mlp_layer=mlp_layer, norm_layer=norms["norm_layer"],
            embed_norm_layer=norms["embed_norm_layer"], proj_bias=attn.proj.bias is not None,
            qk_norm=not isinstance(attn.q_norm, nn.Identity),
            drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p, proj_drop_rate=attn.proj_drop.p,
            attn_drop_rate=attn.attn_drop.p, drop_path_rate=getattr(dp, "drop_prob", 0.0) or 0.0,
        )
        ref = model.pos_embed
        with torch.device("meta"):
            fast = cls(**kwargs, backend=backend)
        fast = fast.to_empty(device=ref.device).to(ref.dtype)
        fast.load_state_dict(model.state_dict(), strict=True)
        return fast.train(model.training)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D) with one fused patch-embed + position-add kernel
        (class / register tokens and timm's token layouts in the same op; with dynamic_img_size the position
        embedding is first resampled to the images' patch grid, as timm)."""
        pe = self.patch_embed
        if not isinstance(pe.norm, nn.Identity):  # a norm between the patch projection and the position add
            return super().embed(images)  # eager (AIMv2's embed_norm_layer)
        pe.check_input(images)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            grid = pe.dynamic_feat_size(tuple(images.shape[-2:]))
            pos_embed = reference.resample_abs_pos_embed(
                pos_embed, grid, pe.grid_size, 0 if self.no_embed_class else self.num_prefix_tokens)
        x = ops.patch_embed(images, pe.proj.weight, pe.proj.bias, pos_embed, self.cls_token, reg_token=self.reg_token,
                            no_embed_class=self.no_embed_class, dynamic_img_pad=pe.dynamic_img_pad,
                            backend=self.backend)
        return self.pos_drop(x)


def create_model(name: str, pretrained: bool = False, **overrides) -> nn.Module:
    """Build the named FastViT, or FastEva for the timm ``Eva`` names (:data:`fastvit_kernels.configs.EVA_MODELS`),
    or FastNaFlexVit for the timm ``NaFlexVit`` names (:data:`fastvit_kernels.configs.NAFLEX_MODELS`; overrides are
    ``NaFlexVitCfg`` fields, ``in_chans``, ``num_classes``, ``img_size``, ``backend``; see
    :mod:`fastvit_kernels.configs`), with constructor overrides.

    Args:
        name: a key of :data:`fastvit_kernels.configs.MODEL_CONFIGS` (e.g. "vit_base_patch16_224", "vit_digits").
        pretrained: must be False (nothing is downloaded; load a timm state_dict yourself).
        **overrides: FastViT / timm ``VisionTransformer`` constructor arguments replacing the config's (e.g.
            ``depth=2``, ``img_size=384``, ``num_classes=10``, ``backend="triton"``).

    Returns:
        A FastViT in training mode with timm's initialisation, its parameters in the default dtype
        (``torch.get_default_dtype()``, fp32 unless changed) on the default device (the CPU unless a
        ``torch.device`` context or ``torch.set_default_device`` says otherwise); move it with ``.to(device,
        dtype)`` or ``.cuda()``.

    Raises:
        KeyError: unknown model name.
        ValueError: ``pretrained=True``; bad constructor arguments (see :class:`FastViT`).
        NotImplementedError: a timm option FastViT does not implement (see :class:`FastViT`).
    """
    if pretrained:
        raise ValueError("pretrained=True is not supported: fastvit_kernels downloads nothing; build the model and "
                         "call load_state_dict(timm_state_dict) (keys are timm's)")
    cfg = get_config(name)
    cfg.update(overrides)
    if name in EVA_MODELS:
        from .eva import FastEva

        return FastEva(**cfg)
    if name in NAFLEX_MODELS:
        from .naflex import FastNaFlexVit

        return FastNaFlexVit(**cfg)
    return FastViT(**cfg)


def from_timm(model: nn.Module, backend: str | None = None) -> nn.Module:
    """This package's drop-in for a timm model, with its weights (``strict=True``), on the model's device and dtype,
    in its training mode: dispatched on the timm class, ``VisionTransformer`` -> :meth:`FastViT.from_timm`,
    ``Eva`` -> :meth:`fastvit_kernels.FastEva.from_timm`, ``NaFlexVit`` ->
    :meth:`fastvit_kernels.naflex.FastNaFlexVit.from_timm` (this package's reference models of those classes
    too).

    Raises:
        TypeError: another model class.
        NotImplementedError: an option the drop-in does not implement (named; see each ``from_timm``).
    """
    name = type(model).__name__.removeprefix("Fast")
    if name == "VisionTransformer":
        return FastViT.from_timm(model, backend=backend)
    if name == "Eva":
        from .eva import FastEva

        return FastEva.from_timm(model, backend=backend)
    if name == "NaFlexVit":
        from .naflex import FastNaFlexVit

        return FastNaFlexVit.from_timm(model, backend=backend)
    raise TypeError(f"from_timm: no drop-in for {type(model).__name__} (supported: timm VisionTransformer, Eva, "
                    "NaFlexVit)")
