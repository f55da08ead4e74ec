"""Named model configurations (timm's names for the standard ViTs; small ones for tests and CPU runs).

Each entry holds VisionTransformer constructor arguments (timm ``Eva``'s for the names in :data:`EVA_MODELS`, timm
``NaFlexVit``'s, i.e. ``NaFlexVitCfg`` fields, for :data:`NAFLEX_MODELS`); ``create_model(name, **overrides)``
builds a FastViT (a FastEva, a FastNaFlexVit for those). A timm-named entry builds what
``timm.create_model(name)`` builds (same modules with parameters, parameter names and shapes;
``tests/test_timm_parity.py``, ``tests/test_eva_dropin.py``), so the weights of timm's default pretrained tag for
that name load with ``strict=True``: including its head, which that tag may lack (``vit_huge_patch14_224``).
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from .reference import RmsNorm

# the class count a training step uses when the named model has no head (ImageNet-1k's)
DEFAULT_TRAIN_CLASSES = 1000

MODEL_CONFIGS: dict[str, dict] = {
    # the standard ViTs (Dosovitskiy et al. 2021), as timm's vision_transformer.py registers them; the head follows
    # timm's default pretrained tag (``timm.models.get_pretrained_cfg(name).num_classes``)
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # the default tag (orig_in21k) is the ImageNet-21k pre-trained feature extractor: no head, so timm builds
    # num_classes=0 and its checkpoint has no head.weight / head.bias
    "vit_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0),
    # AIMv2 (Fini et al. 2024): RMSNorm (also after the patch embedding), SwiGLU, no projection biases
    "aimv2_large_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=8, class_token=False,
                                    fc_norm=False, mlp_ratio=2.75, global_pool="avg", qkv_bias=False, proj_bias=False,
                                    act_layer="silu", norm_layer=partial(RmsNorm, eps=1e-5),
                                    embed_norm_layer=partial(RmsNorm, eps=1e-5), mlp_layer="swiglu", num_classes=0),
    # SigLIP (Zhai et al. 2023): no class token, attention-pool ('map') head
    "vit_so400m_patch14_siglip_224": dict(img_size=224, patch_size=14, embed_dim=1152, depth=27, num_heads=16,
                                          mlp_ratio=3.7362, class_token=False, global_pool="map", num_classes=0),
    # timm Eva models (FastEva): EVA-02 (Fang et al. 2023), DINOv3 (Simeoni et al. 2025), PE (Bolya et al. 2025)
    "eva02_base_patch14_224": dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, qkv_fused=False,
                                   mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                                   ref_feat_shape=(16, 16), num_classes=0),
    "vit_base_patch16_dinov3": dict(img_size=256, patch_size=16, dynamic_img_size=True, embed_dim=768, depth=12,
                                    num_heads=12, qkv_bias=False, init_values=1e-5, rope_type="dinov3",
                                    rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True,
                                    use_abs_pos_emb=False, num_reg_tokens=4, use_fc_norm=False,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-5), num_classes=0),
    "vit_pe_core_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                         mlp_ratio=4.0, global_pool="map", attn_type="rope",
                                         use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(14, 14),
                                         rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=8,
                                         attn_pool_mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-5),
                                         num_classes=1024),
    # timm NaFlexVit models (FastNaFlexVit; SigLIP 2's NaFlex, Tschannen et al. 2025): NaFlexVitCfg fields
    "naflexvit_base_patch16_gap": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                       global_pool="avg", reg_tokens=4, fc_norm=True),
    "naflexvit_base_patch16_par_gap": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                           pos_embed_ar_preserving=True, global_pool="avg", reg_tokens=4,
                                           fc_norm=True),
    "naflexvit_base_patch16_parfac_gap": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                              init_values=1e-5, pos_embed_ar_preserving=True, pos_embed="factorized",
                                              global_pool="avg", reg_tokens=4, fc_norm=True),
    "naflexvit_base_patch16_map": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                       global_pool="map", reg_tokens=1),
    # small ones for CPU runs and tests
    # scikit-learn digits: 8x8 grayscale, patch 2 -> 16 patches + class token = 17 tokens
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2),
    # the digits at native (mixed) sizes for `train --naflex`: patch 4, at most 64 patches + 1 register token
    "naflexvit_digits": dict(patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2,
                             reg_tokens=1, global_pool="avg", fc_norm=True, pos_embed_grid_size=(8, 8)),
    # head_dim 80 like ViT-H, D = 160 (not a power of two), 17 tokens
    "vit_test_hd80": dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=160, depth=2,
                          num_heads=2),
    # head_dim 32, D = 96, 65 tokens
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=96, depth=2,
                                num_heads=3),
}


# names whose config is timm Eva's constructor arguments (built as FastEva)
EVA_MODELS = frozenset({"eva02_base_patch14_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224"})
# names whose config is timm NaFlexVit's (NaFlexVitCfg fields; built as FastNaFlexVit)
NAFLEX_MODELS = frozenset({"naflexvit_base_patch16_gap", "naflexvit_base_patch16_par_gap",
                           "naflexvit_base_patch16_parfac_gap", "naflexvit_base_patch16_map", "naflexvit_digits"})
# `train --naflex` on the digits: the model, maximum sequence lengths and padded tokens per batch it defaults to
NAFLEX_DIGITS = dict(model="naflexvit_digits", seq_lens=(16, 36, 64), token_budget=1024)


def get_config(name: str) -> dict:
    """Constructor arguments of the named model (a copy).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    return dict(MODEL_CONFIGS[name])


def training_config(name: str) -> dict:
    """Constructor arguments for a classification training step of the named model (what ``tune``, the profiler,
    the cost model and the end-to-end benchmarks run): :func:`get_config`, with ``num_classes`` set to
    :data:`DEFAULT_TRAIN_CLASSES` where the named model has no head (``vit_huge_patch14_224``), since a
    cross-entropy step needs logits. ``cfg["num_classes"]`` is always present and >= 1.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    cfg = get_config(name)
    cfg["num_classes"] = cfg.get("num_classes", 1000) or DEFAULT_TRAIN_CLASSES
    return cfg
