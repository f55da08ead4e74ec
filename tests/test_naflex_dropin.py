"""FastNaFlexVit against real timm ``NaFlexVit`` (fp32): small models (patch 4, D 64, depth 2) fed a mixed-size
NaFlex batch made by timm's own ``patchify_image`` + ``NaFlexCollator`` (an image one patch row high, one at the
maximum length, one on the learned grid's own size, padding rows): logits and every parameter gradient; image
input; patch dropout (eval, and training with timm's RNG draw); the dict form of forward_features; errors.

Each parity test runs on backend "torch" (the eager paths of the packed ops) and "triton" (the packed ops' kernels
under the interpreter)."""

import pytest
import timm
import torch
from timm.data.naflex_dataset import NaFlexCollator
from timm.data.naflex_transforms import patchify_image
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg as TimmCfg

import fastvit_kernels
from fastvit_kernels import FastNaFlexVit, create_model
from fastvit_kernels.reference_naflex import NaFlexVitCfg
from helpers import assert_close_to_ref

BACKENDS = ["torch", "triton"]
BASE = dict(patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1e-5, reg_tokens=4,
            pos_embed_grid_size=(4, 4))
# the named configs' options at small size, plus a class-token / qk_norm / avgmax one without LayerScale
VARIANTS = {
    "gap": dict(global_pool="avg", fc_norm=True),
    "map": dict(global_pool="map", reg_tokens=1),
    "par_gap": dict(global_pool="avg", fc_norm=True, pos_embed_ar_preserving=True),
    "parfac_gap": dict(global_pool="avg", fc_norm=True, pos_embed_ar_preserving=True, pos_embed="factorized"),
    "cls_avgmax": dict(global_pool="avgmax", class_token=True, reg_tokens=0, init_values=None, qk_norm=True,
                       num_heads=4),
}
# (H, W) in pixels: 1 x 6 patches (one row), 5 x 5 = 25 (the maximum length), 4 x 4 (the learned grid itself),
# 3 x 4, 2 x 3
SIZES = [(4, 24), (20, 20), (16, 16), (12, 16), (8, 12)]
MAX_LEN = 25




def timm_model(variant: str, **extra) -> NaFlexVit:
    torch.manual_seed(0)
    model = NaFlexVit(TimmCfg(**{**BASE, **VARIANTS[variant], **extra}), num_classes=5)
    with torch.no_grad():  # move zero-initialised biases / tokens off zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def ours(variant: str, backend: str, **extra) -> FastNaFlexVit:
    model = FastNaFlexVit(NaFlexVitCfg(**{**BASE, **VARIANTS[variant], **extra}), num_classes=5, backend=backend)
    return model


def naflex_batch(sizes=SIZES, max_len=MAX_LEN, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = []
    for h, w in sizes:
        patches, coord, valid = patchify_image(torch.randn(3, h, w, generator=g), (4, 4))
        items.append(({"patches": patches, "patch_coord": coord, "patch_valid": valid}, 0))
    batch, _ = NaFlexCollator(max_seq_len=max_len)(items)
    return batch


def fwd_bwd(model, x, g, seed=None):
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    out.backward(g)
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


def assert_same(fast, ref, x, seed=None, grads_reached=True):
    g = torch.randn(x["patches"].shape[0] if isinstance(x, dict) else x.shape[0], 5)
    out, grads = fwd_bwd(fast, x, g, seed)
    ref_out, ref_grads = fwd_bwd(ref, x, g, seed)
    assert ref_out.std() > 0.01  # the logits depend on the inputs
    assert_close_to_ref(out, ref_out, name="logits")
    assert grads.keys() == ref_grads.keys()
    for k, grad in grads.items():
        if grads_reached:
            assert ref_grads[k] is not None and ref_grads[k].abs().max() > 0, k
        if ref_grads[k] is None:
            assert grad is None or grad.abs().max() == 0, k
            continue
        assert_close_to_ref(grad, ref_grads[k], name=f"grad {k}", factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_size_batch_matches_timm_fwd_bwd(variant, backend):
    ref = timm_model(variant).train()
    fast = ours(variant, backend).train()
    fast.load_state_dict(ref.state_dict(), strict=True)
    batch = naflex_batch()
    assert batch["patch_valid"].sum(1).tolist() == [6, 25, 16, 12, 6]
    assert_same(fast, ref, batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_features_is_timms_dict_on_valid_tokens(backend):
    ref = timm_model("gap").eval()
    fast = FastNaFlexVit.from_timm(ref, backend=backend)
    batch = naflex_batch()
    feats = fast.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"])
    ref_feats = ref.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"])
    assert feats.keys() == {"patches", "patch_valid"}
    assert feats["patches"].shape == ref_feats["patches"].shape == (5, 4 + MAX_LEN, 64)
    assert torch.equal(feats["patch_valid"], batch["patch_valid"])
    slots = torch.cat([torch.ones(5, 4, dtype=torch.bool), batch["patch_valid"]], dim=1)
    assert_close_to_ref(feats["patches"][slots], ref_feats["patches"][slots], name="valid tokens")
    assert feats["patches"][~slots].abs().max() == 0  # padding positions are not computed
    # forward_head on the dict gives timm's logits
    assert_close_to_ref(fast.forward_head(**feats), ref(batch), name="logits")


def test_from_timm_and_named_configs():
    ref = timm_model("map", pos_embed_interp_mode="bilinear", pos_embed_antialias=False, patch_drop_rate=0.25,
                     drop_path_rate=0.1)
    fast = fastvit_kernels.from_timm(ref, backend="torch")
    assert isinstance(fast, FastNaFlexVit) and fast.training == ref.training
    assert fast.state_dict().keys() == ref.state_dict().keys()
    c = fast.cfg
    assert (c.pos_embed_interp_mode, c.pos_embed_antialias, c.patch_drop_rate, c.global_pool, c.reg_tokens) == \
        ("bilinear", False, 0.25, "map", 1)
    assert c.drop_path_rate == pytest.approx(0.1)
    for name in ("naflexvit_base_patch16_gap", "naflexvit_base_patch16_map", "naflexvit_base_patch16_par_gap",
                 "naflexvit_base_patch16_parfac_gap"):
        with torch.device("meta"):
            model = create_model(name, depth=1)
        assert isinstance(model, FastNaFlexVit), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_input_matches_timm(backend):
    """NCHW images: timm patchifies them (batch_patchify, zero padding with dynamic_img_pad) and resamples the
    learned grid to the images' grid; here too, unpacked."""
    ref = timm_model("par_gap", dynamic_img_pad=True).train()
    fast = FastNaFlexVit.from_timm(ref, backend=backend)
    x = torch.randn(2, 3, 18, 10)  # 5 x 3 patches after padding
    assert_same(fast, ref, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_dropout_eval_is_off_and_training_matches_timm(backend):
    """patch_drop_rate: no effect in eval; in training the same RNG state keeps the same patches as timm
    (its ``PatchDropoutWithIndices`` draw, patch_valid gathered), here embedded through ``ids_keep``: the same
    logits and gradients, for NaFlex batches and for images."""
    ref = timm_model("gap", patch_drop_rate=0.5)
    fast = FastNaFlexVit.from_timm(ref, backend=backend)
    batch = naflex_batch()

    def check():
        ref.eval(), fast.eval()
        assert_same(fast, ref, batch)
        ref.train(), fast.train()
        assert_same(fast, ref, batch, seed=3)
        assert_same(fast, ref, torch.randn(2, 3, 16, 20), seed=4)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_dropout_that_drops_a_whole_image(backend):
    """A kept set with none of an image's valid patches: its sequence is the prefix tokens alone (timm: all its
    patch tokens masked); the average pool of no token is 0, as timm."""
    ref = timm_model("gap", patch_drop_rate=0.9)  # keeps 2 of the 25 padded positions per image
    fast = FastNaFlexVit.from_timm(ref, backend=backend).train()
    ref.train()
    batch = naflex_batch(sizes=[(4, 4), (20, 20), (8, 8)])
    seed = next(s for s in range(200) if _first_image_dropped(s, batch["patch_valid"], 2))
    assert_same(fast, ref, batch, seed=seed, grads_reached=False)


def _first_image_dropped(seed, valid, keep) -> bool:
    torch.manual_seed(seed)
    kept = torch.argsort(torch.randn(valid.shape), dim=-1)[:, :keep]
    return valid.gather(1, kept).sum(1)[0].item() == 0


def test_empty_sequence_without_prefix_raises():
    fast = FastNaFlexVit(NaFlexVitCfg(**{**BASE, "reg_tokens": 0, "global_pool": "avg"}), num_classes=5,
                         backend="torch")
    batch = naflex_batch(sizes=[(8, 8), (12, 12)])
    batch["patch_valid"][0] = False
    with pytest.raises(ValueError, match="image 0 has no valid patch"):
        fast(batch)


def test_bad_input_raises():
    fast = ours("gap", "torch")
    batch = naflex_batch(sizes=[(8, 8), (12, 12)])
    with pytest.raises(ValueError, match="patch_valid"):
        fast({k: batch[k] for k in ("patches", "patch_coord")})
    with pytest.raises(ValueError, match="patch_coord"):
        fast.forward_features(batch["patches"], None, batch["patch_valid"])
    with pytest.raises(ValueError, match="need patch_coord"):
        fast(batch["patches"])  # patches without their coordinates
    with pytest.raises(ValueError, match="patch_coord must be"):
        fast(batch["patches"], batch["patch_coord"][:, :, :1], batch["patch_valid"])
    with pytest.raises(ValueError, match="K=48"):
        fast(batch["patches"][..., :40], batch["patch_coord"], batch["patch_valid"])
    with pytest.raises(ValueError, match="attn_mask"):
        fast.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"],
                              attn_mask=torch.zeros(2, 1, 13, 13))
    with pytest.raises(ValueError, match="in_chans=3"):
        fast(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("field, value", [("rope_type", "axial"), ("embed_proj_type", "conv"),
                                          ("pos_embed_use_grid_sample", True), ("swiglu_mlp", True),
                                          ("embed_norm_layer", "layernorm"), ("pos_embed", "rope"),
                                          ("attn_drop_rate", 0.1), ("act_layer", "silu")])
def test_unsupported_cfg_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FastNaFlexVit(NaFlexVitCfg(**{**BASE, field: value}))
    with pytest.raises(TypeError, match="nope"):
        FastNaFlexVit(nope=1)


def test_from_timm_rejects_what_it_cannot_run():
    with torch.device("meta"):
        src = NaFlexVit(TimmCfg(**BASE, rope_type="axial"), num_classes=5)
    with pytest.raises(NotImplementedError, match="rope_type"):
        FastNaFlexVit.from_timm(src)


def test_stochastic_depth_is_per_image_on_packed_rows():
    from fastvit_kernels.naflex import Packing

    lengths = [2, 3, 1, 4]
    packing = Packing(torch.tensor([0, 2, 5, 6, 10], dtype=torch.int32), lengths, torch.ones(4, 4, dtype=torch.bool))
    assert packing.seq_index.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]
    torch.manual_seed(0)
    y = packing.drop_path(torch.ones(1, 10, 3), 0.5, training=True)[0, :, 0]
    for s, (a, b) in enumerate(zip([0, 2, 5, 6], [2, 5, 6, 10])):
        assert set(y[a:b].tolist()) <= {0.0, 2.0} and len(set(y[a:b].tolist())) == 1, s  # whole image kept / dropped
    assert packing.drop_path(torch.ones(1, 10, 3), 0.5, training=False).eq(1).all()


def test_training_with_dropouts_and_grad_checkpointing_runs():
    """Stochastic depth, projection / MLP dropout, pos dropout (other random streams than timm: shapes and
    finiteness only) and, without them, gradient checkpointing (timm's results)."""
    ref = timm_model("gap")
    fast = FastNaFlexVit.from_timm(ref, backend="torch").train()
    fast.set_grad_checkpointing(True)
    ref.train()
    batch = naflex_batch()
    assert_same(fast, ref, batch)
    noisy = FastNaFlexVit(NaFlexVitCfg(**{**BASE, **VARIANTS["gap"], "drop_path_rate": 0.5, "proj_drop_rate": 0.1,
                                          "pos_drop_rate": 0.1}), num_classes=5, backend="torch").train()
    with pytest.warns(UserWarning, match="MLP dropout"):
        out = noisy(batch)
    out.sum().backward()
    assert out.shape == (5, 5) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in noisy.parameters() if p.grad is not None)
