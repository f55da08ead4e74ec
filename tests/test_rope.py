"""The RoPE contract (fastvit_kernels.rope): tables built from timm's rope modules, applied by rope_ref to a packed
qkv, equal timm's own apply_rot_embed_cat on q and k (patch tokens rotated, prefix tokens untouched, v passed)."""

import pytest
import torch
from timm.layers.pos_embed_sincos import (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed,
                                          apply_rot_embed_cat)

from fastvit_kernels.reference import rope_ref
from fastvit_kernels.rope import AxialRope, DinoV3Rope, MixedRope, RopeTable, augment_coords, rope_from_timm

GRID = (3, 5)  # non-square


def timm_rotate(qkv, H, embed, npt, half):
    """timm's EvaAttention rotation of q and k of a packed qkv (B, N, 3D): tokens npt: only."""
    B, N, three_d = qkv.shape
    hd = three_d // (3 * H)
    q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], embed, half=half)], dim=2)
    k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], embed, half=half)], dim=2)
    return torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).reshape(B, N, three_d)


def check(qkv, H, table, expected):
    got = rope_ref(qkv, table.coords, table.freqs, H, table.layout)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-5, err
    return err


CAT_CASES = {  # timm RotaryEmbeddingCat as the models build it
    "eva02": dict(in_pixels=False, ref_feat_shape=(4, 4)),  # EVA-02: index grid scaled to ref_feat_shape
    "pe": dict(in_pixels=False, ref_feat_shape=(6, 2), grid_offset=1.0, grid_indexing="xy"),  # PE
    "half": dict(in_pixels=False, rotate_half=True, temperature=100.0),
    "pixels": dict(in_pixels=True, max_res=64),
    "pixels_linear": dict(in_pixels=True, linear_bands=True, max_res=32),
}


@pytest.mark.parametrize("case", list(CAT_CASES))
@pytest.mark.parametrize("hd", [64, 72, 80])
@pytest.mark.parametrize("npt", [0, 1, 5])
def test_axial_matches_timm(case, hd, npt):
    H = 2
    m = RotaryEmbeddingCat(hd, feat_shape=list(GRID), **CAT_CASES[case]).eval()
    qkv = torch.randn(2, npt + GRID[0] * GRID[1], 3 * H * hd)
    table = rope_from_timm(m).tables(GRID, npt)
    assert table.coords.shape == (npt + 15, 2) and table.freqs.shape == (1, hd // 2, 2)
    assert torch.equal(table.coords[:npt], torch.zeros(npt, 2))
    expected = timm_rotate(qkv, H, m.get_embed(), npt, m.rotate_half)
    check(qkv, H, table, expected)
    assert torch.equal(rope_ref(qkv, *table[:2], H, table.layout)[..., 2 * H * hd:], qkv[..., 2 * H * hd:])


@pytest.mark.parametrize("hd", [64, 72, 80])
@pytest.mark.parametrize("npt", [0, 1, 5])
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_mixed_matches_timm_per_block(hd, npt, indexing):
    H, depth = 2, 3
    m = RotaryEmbeddingMixed(H * hd, depth, H, feat_shape=list(GRID), grid_indexing=indexing).eval()
    ours = rope_from_timm(m)
    tables = ours.tables(GRID, npt)
    embeds = m.get_embed()  # (depth, H, N, 2 hd)
    qkv = torch.randn(2, npt + 15, 3 * H * hd)
    assert len(tables) == depth and tables[0].freqs.shape == (H, hd // 2, 2)
    for d in range(depth):
        check(qkv, H, tables[d], timm_rotate(qkv, H, embeds[d][None], npt, False))


def test_mixed_frequencies_get_gradients():
    m = MixedRope(4 * 16, depth=2, num_heads=4, grid_indexing="ij")
    qkv = torch.randn(1, 7, 3 * 64)
    for d, t in enumerate(m.tables((2, 3), 1)):
        rope_ref(qkv, t.coords, t.freqs, 4, t.layout).square().sum().backward()
    assert m.freqs.grad is not None and m.freqs.grad.abs().sum() > 0 and m.no_weight_decay() == {"freqs"}


@pytest.mark.parametrize("hd", [64, 72, 80])
@pytest.mark.parametrize("npt", [0, 1, 5])
@pytest.mark.parametrize("opts", [dict(), dict(grid_indexing="xy", rotate_half=False, normalize_coords="max"),
                                  dict(min_period=0.5, max_period=50.0, temperature=None, grid_offset=0.25)])
def test_dinov3_matches_timm(hd, npt, opts):
    H = 2
    m = RotaryEmbeddingDinoV3(hd, **opts).eval()
    qkv = torch.randn(2, npt + 15, 3 * H * hd)
    table = rope_from_timm(m).tables(GRID, npt)
    check(qkv, H, table, timm_rotate(qkv, H, m.get_embed(list(GRID)), npt, m.rotate_half))


@pytest.mark.parametrize("kind", ["cat", "mixed", "dinov3"])
def test_training_time_coordinate_augmentation_matches_timm(kind):
    """In train mode timm draws shift / jitter / rescale per get_embed(); same RNG state -> same transform."""
    H, hd = 2, 16
    aug = dict(shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0)
    if kind == "cat":
        m = RotaryEmbeddingCat(hd, in_pixels=False, feat_shape=list(GRID), grid_indexing="xy", **aug)
    elif kind == "mixed":
        m = RotaryEmbeddingMixed(H * hd, 1, H, feat_shape=list(GRID), grid_indexing="ij", **aug)
    else:
        m = RotaryEmbeddingDinoV3(hd, **aug)
    m.train()
    ours = rope_from_timm(m)
    assert ours.training and ours.aug_active
    qkv = torch.randn(1, 1 + 15, 3 * H * hd)
    torch.manual_seed(7)
    embed = m.get_embed(list(GRID)) if kind == "dinov3" else m.get_embed()
    embed = embed[0][None] if kind == "mixed" else embed
    torch.manual_seed(7)
    table = ours.tables(GRID, 1)
    table = table[0] if kind == "mixed" else table
    check(qkv, H, table, timm_rotate(qkv, H, embed, 1, getattr(m, "rotate_half", False)))
    plain = ours.eval().tables(GRID, 1)
    plain = plain[0] if kind == "mixed" else plain
    assert not torch.equal(plain.coords, table.coords)  # the augmentation did something


def test_rope_ref_contract_by_hand():
    """One head, head_dim 4, both layouts: the pair formula of the contract, and rows m use coords[m % Nc]."""
    x = torch.arange(1.0, 13.0).reshape(1, 1, 12)  # q = 1..4, k = 5..8, v = 9..12
    coords = torch.tensor([[0.5, 2.0]])
    freqs = torch.tensor([[[1.0, 0.0], [0.0, 0.25]]])  # pair 0 follows y, pair 1 follows x
    t0, t1 = torch.tensor(0.5), torch.tensor(0.5)
    for layout, (a0, b0, a1, b1) in (("interleaved", (0, 1, 2, 3)), ("half", (0, 2, 1, 3))):
        out = rope_ref(x, coords, freqs, 1, layout)[0, 0]
        for base in (0, 4):
            v = x[0, 0, base:base + 4]
            for (a, b), t in (((a0, b0), t0), ((a1, b1), t1)):
                torch.testing.assert_close(out[base + a], v[a] * t.cos() - v[b] * t.sin())
                torch.testing.assert_close(out[base + b], v[b] * t.cos() + v[a] * t.sin())
        assert torch.equal(out[8:], x[0, 0, 8:])
    batch = torch.randn(3, 4, 12)
    c4 = torch.randn(4, 2)
    torch.testing.assert_close(rope_ref(batch, c4, freqs, 1), torch.stack([rope_ref(b, c4, freqs, 1) for b in batch]))
    flat = rope_ref(batch.reshape(12, 12), c4, freqs, 1)  # 2-D rows: m % Nc
    torch.testing.assert_close(flat.reshape(3, 4, 12), rope_ref(batch, c4, freqs, 1))


def test_rope_ref_dtypes_and_errors():
    table = AxialRope(8, in_pixels=False).tables((2, 2), 1)
    x = torch.randn(2, 5, 48)
    out16 = rope_ref(x.half(), table.coords, table.freqs, 2, table.layout)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), rope_ref(x.half().float(), *table[:2], 2, table.layout),
                               atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="layout"):
        rope_ref(x, table.coords, table.freqs, 2, "diagonal")
    with pytest.raises(ValueError, match="freqs must be"):
        rope_ref(x, table.coords, table.freqs[:, :2], 2)
    with pytest.raises(ValueError, match="coords must be"):
        rope_ref(x, table.coords[:, :1], table.freqs, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        DinoV3Rope(10)
    with pytest.raises(ValueError, match="jitter_coords"):
        augment_coords(table.coords, jitter=0.5)
    with pytest.raises(NotImplementedError, match="RotaryEmbedding"):
        from timm.layers.pos_embed_sincos import RotaryEmbedding
        rope_from_timm(RotaryEmbedding(8))
    assert isinstance(table, RopeTable)
