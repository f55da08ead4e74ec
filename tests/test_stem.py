"""The ViT stem at model level: timm's token layouts (register tokens, no_embed_class), resolution changes
(dynamic_img_size, dynamic_img_pad, set_input_size, loading a checkpoint trained at another resolution) and
``resample_abs_pos_embed`` against an independent implementation of timm's algorithm. FastViT runs its Triton
path (the interpreter on a CPU) and is held to the eager reference VisionTransformer: logits and every parameter
gradient."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import FastViT, resample_state_dict
from fastvit_kernels.reference import VisionTransformer, patch_embed_ref, resample_abs_pos_embed
from helpers import assert_compiled_matches_eager, compare_model_with_reference

# small model: 16 x 16 images, patch 4 -> 4 x 4 grid; one block keeps the interpreter fast
BASE = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=1, num_heads=2)


# ------------------------------------------------------------------------------------------------------------
# resample_abs_pos_embed
# ------------------------------------------------------------------------------------------------------------
def _resample_spec(posemb, new_size, old_size, num_prefix):
    """Independent spelling of timm's algorithm: each embedding channel resized as its own one-channel image
    (bicubic, antialias, align_corners=False, in fp32), grid tokens addressed row-major by explicit index,
    prefix rows copied through."""
    (oh, ow), (nh, nw) = old_size, new_size
    D = posemb.shape[-1]
    grid = posemb[0, num_prefix:].float()  # (oh * ow, D)
    out = torch.empty(num_prefix + nh * nw, D)
    out[:num_prefix] = posemb[0, :num_prefix].float()
    for d in range(D):
        img = torch.stack([torch.stack([grid[i * ow + j, d] for j in range(ow)]) for i in range(oh)])
        res = F.interpolate(img[None, None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0, 0]
        for i in range(nh):
            for j in range(nw):
                out[num_prefix + i * nw + j, d] = res[i, j]
    return out[None].to(posemb.dtype)


@pytest.mark.parametrize("old,new,prefix", [
    ((4, 4), (6, 5), 1),  # upsampling, non-square target
    ((7, 7), (3, 4), 0),  # downsampling: antialias matters; no prefix (no_embed_class)
    ((2, 6), (4, 3), 3),  # non-square source; class + 2 registers kept
])
def test_resample_abs_pos_embed_matches_spec(old, new, prefix):
    posemb = torch.randn(1, prefix + old[0] * old[1], 6)
    out = resample_abs_pos_embed(posemb, new, old, num_prefix_tokens=prefix)
    torch.testing.assert_close(out, _resample_spec(posemb, new, old, prefix), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[:, :prefix], posemb[:, :prefix])
    # a constant grid stays constant (the bicubic / antialias weights sum to one)
    const = torch.cat([posemb[:, :prefix], torch.full((1, old[0] * old[1], 6), 0.7)], 1)
    torch.testing.assert_close(resample_abs_pos_embed(const, new, old, prefix)[:, prefix:],
                               torch.full((1, new[0] * new[1], 6), 0.7), atol=1e-6, rtol=0)


def test_resample_abs_pos_embed_conventions():
    posemb = torch.randn(1, 1 + 9, 4, dtype=torch.float16, requires_grad=True)
    assert resample_abs_pos_embed(posemb, (3, 3)) is posemb  # same grid: unchanged (old_size None = square)
    out = resample_abs_pos_embed(posemb, 5)
    assert out.shape == (1, 26, 4) and out.dtype == torch.float16  # computed in fp32, returned in fp16
    out.float().sum().backward()  # differentiable: dynamic_img_size trains through it
    assert torch.equal(posemb.grad[0, 0], torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="not a square number: pass old_size"):
        resample_abs_pos_embed(torch.randn(1, 1 + 8, 4), (3, 3))
    with pytest.raises(ValueError, match=r"old_size=\(3, 3\) has 9"):
        resample_abs_pos_embed(torch.randn(1, 8, 4), (3, 3), (3, 3), num_prefix_tokens=0)


# ------------------------------------------------------------------------------------------------------------
# FastViT (Triton path) against the reference model
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,image_hw", [
    (dict(reg_tokens=2), (16, 16)),  # class + 2 registers, pos_embed on all 19 rows
    (dict(reg_tokens=3, no_embed_class=True), (16, 16)),  # registers without position embedding
    (dict(class_token=False, global_pool="avg", reg_tokens=1, no_embed_class=True), (16, 16)),
    (dict(dynamic_img_size=True, reg_tokens=1), (12, 20)),  # pos_embed resampled 4x4 -> 3x5 on the fly
    (dict(dynamic_img_size=True, dynamic_img_pad=True, no_embed_class=True), (14, 18)),  # padded 4x5 grid
])
def test_fastvit_matches_reference(over, image_hw, device):
    model = compare_model_with_reference({**BASE, **over}, device, image_hw=image_hw)
    assert model.num_prefix_tokens == int(over.get("class_token", True)) + over.get("reg_tokens", 0)


def test_fastvit_matches_reference_fp16_dynamic(device):
    compare_model_with_reference({**BASE, "dynamic_img_size": True, "reg_tokens": 2}, device, torch.float16,
                                 image_hw=(20, 12))


def test_parameters_follow_timm():
    m = VisionTransformer(**BASE, reg_tokens=4, no_embed_class=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["reg_token"] == (1, 4, 32) and shapes["cls_token"] == (1, 1, 32)
    assert shapes["pos_embed"] == (1, 16, 32)  # no_embed_class: patches only
    assert VisionTransformer(**BASE, reg_tokens=4).pos_embed.shape == (1, 21, 32)
    assert {"reg_token", "pos_embed", "cls_token"} <= m.no_weight_decay()
    assert m.num_prefix_tokens == 5 and m.num_reg_tokens == 4
    assert 0 < m.reg_token.abs().max() < 1e-4  # N(0, 1e-6) init, as timm


@pytest.mark.parametrize("over", [dict(), dict(reg_tokens=2), dict(reg_tokens=1, no_embed_class=True),
                                  dict(dynamic_img_size=True, dynamic_img_pad=True, reg_tokens=1)])
def test_reference_model_embed_equals_functional_reference(over):
    """The module-level _pos_embed (timm's code path) and the functional patch_embed_ref agree."""
    torch.manual_seed(0)
    m = VisionTransformer(**{**BASE, **over})
    hw = (13, 19) if over.get("dynamic_img_pad") else (16, 16)
    x = torch.randn(2, 3, *hw)
    pos = m.pos_embed
    if m.dynamic_img_size:
        pos = resample_abs_pos_embed(pos, m.patch_embed.dynamic_feat_size(hw), m.patch_embed.grid_size,
                                     0 if m.no_embed_class else m.num_prefix_tokens)
    want = patch_embed_ref(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, pos, m.cls_token,
                           reg_token=m.reg_token, no_embed_class=m.no_embed_class,
                           dynamic_img_pad=m.patch_embed.dynamic_img_pad)
    torch.testing.assert_close(m.embed(x), want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# resolution changes
# ------------------------------------------------------------------------------------------------------------
def test_set_input_size_resamples_pos_embed(device):
    torch.manual_seed(0)
    ref = VisionTransformer(**BASE, reg_tokens=1)
    old = ref.pos_embed.detach().clone()
    ref.set_input_size(img_size=24)
    assert ref.patch_embed.img_size == (24, 24) and ref.patch_embed.grid_size == (6, 6)
    torch.testing.assert_close(ref.pos_embed.detach(), resample_abs_pos_embed(old, (6, 6), (4, 4), 2))
    assert isinstance(ref.pos_embed, torch.nn.Parameter)
    model = FastViT(**BASE, reg_tokens=1, backend="triton")
    model.set_input_size(img_size=24)
    model.load_state_dict(ref.state_dict(), strict=True)
    model.to(device)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(device)).cpu(), ref(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="images must be 24x24"):
        model(torch.randn(2, 3, 16, 16, device=device))
    with pytest.raises(NotImplementedError, match="patch_size"):
        model.set_input_size(patch_size=8)
    nec = VisionTransformer(**BASE, no_embed_class=True)
    nec.set_input_size(img_size=(8, 12))
    assert nec.pos_embed.shape == (1, 6, 32)


def test_load_checkpoint_trained_at_another_resolution():
    torch.manual_seed(0)
    src = VisionTransformer(**BASE, reg_tokens=2)  # "trained" at 16 px: 4 x 4 grid
    dst = FastViT(**{**BASE, "img_size": 20}, reg_tokens=2, backend="torch")  # 5 x 5 grid
    sd = src.state_dict()
    with pytest.raises(RuntimeError, match="pos_embed"):
        dst.load_state_dict(sd, strict=True)
    dst.load_state_dict(resample_state_dict(sd, dst), strict=True)
    torch.testing.assert_close(dst.pos_embed.detach(), resample_abs_pos_embed(sd["pos_embed"], (5, 5), (4, 4), 3))
    assert torch.equal(dst.pos_embed[:, :3], sd["pos_embed"][:, :3])  # class + register rows kept
    # non-square source grid: the caller names it (timm reads it from the pretrained config)
    src2 = VisionTransformer(**{**BASE, "img_size": (8, 16)}, no_embed_class=True)
    dst2 = VisionTransformer(**BASE, no_embed_class=True)
    sd2 = resample_state_dict(src2.state_dict(), dst2, old_grid_size=(2, 4))
    dst2.load_state_dict(sd2, strict=True)
    torch.testing.assert_close(dst2.pos_embed.detach(), resample_abs_pos_embed(src2.pos_embed, (4, 4), (2, 4), 0))
    assert resample_state_dict(sd, src)["pos_embed"] is sd["pos_embed"]  # same grid: untouched


@pytest.mark.parametrize("kwargs,hw,exc,match", [
    (dict(), (12, 20), ValueError, r"images must be 16x16 \(img_size\); got 12x20"),
    (dict(dynamic_img_size=True), (13, 16), ValueError, "multiples of the patch size 4; got 13x16"),
    (dict(img_size=18), None, ValueError, "must be a multiple of patch_size"),
    (dict(img_size=18, dynamic_img_pad=True), None, ValueError, "use dynamic_img_size=True with dynamic_img_pad"),
    (dict(reg_tokens=-1), None, ValueError, "reg_tokens must be >= 0"),
])
def test_errors(kwargs, hw, exc, match):
    with pytest.raises(exc, match=match):
        model = FastViT(**{**BASE, **kwargs}, backend="torch")
        model(torch.randn(1, 3, *hw))


def test_dynamic_img_pad_with_non_multiple_img_size():
    """img_size 18 at patch 4 with dynamic_img_size + dynamic_img_pad: timm's floor grid (4 x 4) for pos_embed,
    resampled to the padded 5 x 5 grid at forward time."""
    torch.manual_seed(0)
    cfg = {**BASE, "img_size": 18, "dynamic_img_size": True, "dynamic_img_pad": True}
    ref = VisionTransformer(**cfg)
    assert ref.pos_embed.shape == (1, 17, 32)
    model = FastViT(**cfg, backend="torch")
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 18, 18)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_token_layouts_and_uint8(device):
    """Register tokens, no_embed_class and on-the-fly pos_embed resampling trace without graph breaks (the fake
    implementations of the forward and backward ops give the right shapes); so does the op with uint8 images and
    Python mean / std."""
    from fastvit_kernels.ops import patch_embed

    torch.manual_seed(0)
    model = FastViT(**BASE, reg_tokens=2, no_embed_class=True, dynamic_img_size=True, backend="triton").to(device)
    x = torch.randn(2, 3, 12, 20, device=device)
    assert_compiled_matches_eager(model, x)

    u8 = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, device=device)
    pe = model.patch_embed.proj

    def stem(images):
        return patch_embed(images, pe.weight, pe.bias, model.pos_embed[:, :6], model.cls_token,
                           mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), no_embed_class=True, backend="triton")

    torch.testing.assert_close(torch.compile(stem, fullgraph=True, backend="aot_eager")(u8), stem(u8),
                               atol=0, rtol=0)
