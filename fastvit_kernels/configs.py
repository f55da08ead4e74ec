"""Named model configurations (timm's names for the standard ViTs; small ones for tests and CPU runs).

Each entry holds VisionTransformer constructor arguments; ``create_model(name, **overrides)`` builds a FastViT.
A timm-named entry builds what ``timm.create_model(name)`` builds (same modules with parameters, parameter names
and shapes; ``tests/test_timm_parity.py``), so the weights of timm's default pretrained tag for that name load with
``strict=True``: including its head, which that tag may lack (``vit_huge_patch14_224``).
"""

from __future__ import annotations

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
    # small ones for CPU runs and tests
    # scikit-learn digits: 8x8 grayscale, patch 2 -> 16 patches + class token = 17 tokens
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2),
    # head_dim 80 like ViT-H, D = 160 (not a power of two), 17 tokens
    "vit_test_hd80": dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=160, depth=2,
                          num_heads=2),
    # head_dim 32, D = 96, 65 tokens
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=96, depth=2,
                                num_heads=3),
}


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
