"""Parity with real timm (a test dependency): every timm-named config builds what ``timm.create_model(name)`` builds
(the default pretrained tag's head included), so timm's state_dict loads strictly; the small ViTs give timm's logits
on the eager path; and a small timm model converted with ``FastViT.from_timm`` gives timm's logits and every
parameter gradient on the Triton path."""

import pytest
import timm
import torch

from fastvit_kernels import FastViT, create_model
from fastvit_kernels.configs import MODEL_CONFIGS
from helpers import assert_close_to_ref

TIMM_NAMES = [name for name in MODEL_CONFIGS if timm.is_model(name)]
STANDARD = {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
            "vit_huge_patch14_224"}
# the encoders pretrained at scale today (FastEva for timm's Eva ones; FastViT options for AIMv2 / SigLIP)
MODERN = {"eva02_base_patch14_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224",
          "aimv2_large_patch14_224", "vit_so400m_patch14_siglip_224"}
# timm NaFlexVit models (FastNaFlexVit; tests/test_naflex_dropin.py holds their outputs and gradients to timm's)
NAFLEX = {"naflexvit_base_patch16_gap", "naflexvit_base_patch16_map", "naflexvit_base_patch16_par_gap",
          "naflexvit_base_patch16_parfac_gap"}
# model attributes timm's VisionTransformer sets from its constructor arguments (what timm's own code branches on)
ATTRIBUTES = ("num_classes", "global_pool", "embed_dim", "num_features", "num_prefix_tokens", "has_class_token",
              "num_reg_tokens", "no_embed_class", "dynamic_img_size")


def test_the_named_configs_are_timm_names():
    assert set(TIMM_NAMES) == STANDARD | MODERN | NAFLEX  # the small CPU configs are not timm models; every other one is


def _on_meta(name: str):
    with torch.device("meta"):
        return timm.create_model(name), create_model(name)


def _own_state(model: torch.nn.Module) -> dict:
    """{path of each module holding parameters or buffers itself: (class name, LayerNorm eps or None)}; the root
    (FastViT vs VisionTransformer) by its path only."""
    return {path: (path and type(m).__name__.removeprefix("Fast"), getattr(m, "eps", None))
            for path, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))}


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_named_config_builds_timm_model(name):
    ref, fast = _on_meta(name)
    # the default tag's classifier: its num_classes is what timm builds (0 for vit_huge_patch14_224: no head)
    assert ref.num_classes == timm.models.get_pretrained_cfg(name).num_classes == fast.num_classes
    assert {k: (v.shape, v.dtype) for k, v in fast.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in ref.state_dict().items()}
    assert (fast.embed_dim, fast.num_prefix_tokens) == (ref.embed_dim, ref.num_prefix_tokens)
    fast.load_state_dict(ref.state_dict(), strict=True)  # meta: keys and shapes checked, no data copied
    if name in NAFLEX:
        assert type(fast).__name__ == "FastNaFlexVit" and _own_state(fast) == _own_state(ref)
        for attr in ("num_classes", "global_pool", "embed_dim", "num_prefix_tokens", "has_class_token",
                     "num_reg_tokens", "pool_include_prefix"):
            assert getattr(fast, attr) == getattr(ref, attr), attr
    if name not in STANDARD:
        # FastEva computes RoPE tables its own way (timm's non-persistent rope buffers are not state);
        # tests/test_eva_dropin.py holds the modern models' outputs and gradients to timm's
        return
    assert [k for k, _ in fast.named_buffers()] == [k for k, _ in ref.named_buffers()]
    assert _own_state(fast) == _own_state(ref)
    for attr in ATTRIBUTES:
        assert getattr(fast, attr) == getattr(ref, attr), attr
    blk, ref_blk = fast.blocks[0], ref.blocks[0]
    assert (blk.attn.num_heads, blk.attn.head_dim, blk.attn.scale) == \
        (ref_blk.attn.num_heads, ref_blk.attn.head_dim, ref_blk.attn.scale)
    assert blk.mlp.act.approximate == ref_blk.mlp.act.approximate
    assert fast.patch_embed.grid_size == ref.patch_embed.grid_size


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_timm_weights_give_timm_logits(name):
    """timm's randomly initialised weights loaded strictly; FastViT's eager path against timm's forward (SDPA
    attention) in fp32 at the config's 224 x 224."""
    torch.manual_seed(0)
    ref = timm.create_model(name).eval()
    fast = create_model(name, backend="torch").eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        out = fast(x)
    assert out.shape == (2, 1000)
    assert expected.std() > 0.1  # timm's initial head is not zero: the logits depend on every block
    torch.testing.assert_close(out, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_small_timm_model_on_the_triton_path():
    """A small timm VisionTransformer (17 tokens, D 64, head_dim 32) converted with ``FastViT.from_timm``: logits and
    every parameter gradient of the Triton path (the interpreter on a CPU) against timm's own fp32 model."""
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    fast = FastViT.from_timm(ref, backend="triton")
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    g = torch.randn(2, 10)

    def run(model):
        model.zero_grad()
        out = model(x)
        out.backward(g)
        return out.detach(), {k: p.grad for k, p in model.named_parameters()}

    out, grads = run(fast)
    ref_out, ref_grads = run(ref)
    assert_close_to_ref(out, ref_out, name="logits")
    assert grads.keys() == ref_grads.keys()
    for k, grad in grads.items():
        assert ref_grads[k].abs().max() > 0, k  # every parameter reaches the loss in timm's model
        assert_close_to_ref(grad, ref_grads[k], name=f"grad {k}", factor=3.0)
