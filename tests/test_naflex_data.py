"""NaFlex data: patch order and values against a manual unfold, coords, the resize rule, the token-budget batch
rule, the padded / packed collators, MAE token dropping, the variable-resolution sources, determinism."""

import pytest
import torch

from fastvit_kernels import naflex_data as nd


def _unfold_patches(img, P):
    """Independent patch cut: F.unfold gives (C*P*P, L) in (C, ph, pw) order; reorder to (ph, pw, C)."""
    C = img.shape[0]
    cols = torch.nn.functional.unfold(img[None], kernel_size=P, stride=P)[0]  # (C*P*P, L), row-major grid
    return cols.T.reshape(-1, C, P, P).permute(0, 2, 3, 1).reshape(cols.shape[1], P * P * C)


def test_patch_order_values_and_coords_match_unfold():
    P, C = 4, 3
    img = torch.randn(C, 3 * P, 5 * P)
    patches, coord = nd.patchify(img, P, max_seq_len=15, resize=False)
    assert patches.shape == (15, P * P * C) and coord.dtype == torch.int64
    torch.testing.assert_close(patches, _unfold_patches(img, P), rtol=0, atol=0)
    # patch (y=1, x=2), pixel (ph=3, pw=0), channel 2 -> flat index (3 * P + 0) * C + 2
    assert patches[1 * 5 + 2, (3 * P + 0) * C + 2] == img[2, 1 * P + 3, 2 * P + 0]
    assert coord.tolist() == [[y, x] for y in range(3) for x in range(5)]


@pytest.mark.parametrize("hw, P, L, grid", [
    ((64, 64), 16, 16, (4, 4)),      # exact fit
    ((30, 60), 16, 8, (2, 4)),       # 1:2 aspect
    ((17, 100), 8, 64, (3, 18)),     # wide: (3, 19) needs a scale that already gives 4 rows
    ((1000, 10), 16, 4, (4, 1)),     # extreme aspect: one column
    ((5, 5), 16, 1, (1, 1)),
])
def test_grid_for_seq_len_hand_cases(hw, P, L, grid):
    assert nd.grid_for_seq_len(*hw, P, L) == grid


def test_grid_for_seq_len_matches_a_brute_force():
    """The grid is the largest reachable one: (gh, gw) is reachable when some scale r gives ceil(r h / P) = gh and
    ceil(r w / P) = gw, i.e. the intervals ((gh - 1) P / h, gh P / h] and ((gw - 1) P / w, gw P / w] meet; the
    reachable grids form a chain, so the largest feasible one is the answer."""
    from fractions import Fraction as Fr

    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        h, w = (int(v) for v in torch.randint(8, 300, (2,), generator=g))
        P, L = 16, int(torch.randint(1, 120, (1,), generator=g))
        best = (1, 1)
        for gh in range(1, L + 1):
            for gw in range(1, L // gh + 1):
                lo = max(Fr((gh - 1) * P, h), Fr((gw - 1) * P, w))
                hi = min(Fr(gh * P, h), Fr(gw * P, w))
                if lo < hi or (gh == 1 and gw == 1):
                    best = max(best, (gh, gw))
        assert nd.grid_for_seq_len(h, w, P, L) == best, (h, w, L)


def test_grid_matches_timm_when_available():
    nt = pytest.importorskip("timm.data.naflex_transforms")
    for hw, L in [((30, 60), 8), ((223, 401), 576), ((1000, 10), 4), ((480, 640), 256), ((31, 97), 1024)]:
        _, (th, tw) = nt.get_image_size_for_seq(hw, 16, L)
        assert nd.grid_for_seq_len(*hw, 16, L) == (th // 16, tw // 16), (hw, L)


def test_patchify_resizes_keeping_aspect():
    img = torch.rand(1, 30, 60)
    patches, coord = nd.patchify(img, 8, max_seq_len=32)  # grid (4, 8)
    assert patches.shape == (32, 64) and coord[-1].tolist() == [3, 7]
    with pytest.raises(ValueError, match="multiples of patch_size"):
        nd.patchify(img, 8, 32, resize=False)
    with pytest.raises(ValueError, match="floating"):
        nd.patchify(torch.zeros(3, 8, 8, dtype=torch.int64), 8, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        nd.grid_for_seq_len(8, 8, 4, 0)


def _samples(lens, K=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, K, generator=g), torch.stack([torch.arange(n), torch.arange(n) + 1], 1)) for n in lens]


def test_collate_padded_masks_and_padding():
    s = _samples([3, 1, 5])
    b = nd.collate_padded(s)
    assert b["patches"].shape == (3, 5, 6) and b["seq_len"] == 5
    assert b["patch_valid"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(b["patches"][0, :3], s[0][0]) and (b["patches"][0, 3:] == 0).all()
    assert torch.equal(b["patch_coord"][2], s[2][1]) and (b["patch_coord"][1, 1:] == 0).all()
    assert nd.collate_padded(s, pad_to=8)["patches"].shape == (3, 8, 6)
    assert nd.real_tokens(b) == 9
    with pytest.raises(ValueError, match="shorter than the longest"):
        nd.collate_padded(s, pad_to=4)
    with pytest.raises(ValueError, match="K=6"):
        nd.collate_padded([s[0], (torch.zeros(2, 5), torch.zeros(2, 2, dtype=torch.int64))])


def test_packed_equals_padded_valid_rows():
    s = _samples([3, 1, 5])
    patches, coord, cu = nd.collate_packed(s)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 9]
    b = nd.collate_padded(s, pad_to=7)
    p2, c2, cu2 = nd.padded_to_packed(b)
    assert torch.equal(patches, p2) and torch.equal(coord, c2) and torch.equal(cu, cu2)
    for i, (p, _) in enumerate(s):
        assert torch.equal(patches[cu[i]:cu[i + 1]], p)
    bad = dict(b, patch_valid=b["patch_valid"].roll(1, 1))
    with pytest.raises(ValueError, match="prefix"):
        nd.padded_to_packed(bad)


def test_budget_rule_and_sampler_determinism():
    assert nd.naflex_batch_size(16384, 1024) == 16 and nd.naflex_batch_size(16384, 576) == 28
    assert nd.naflex_batch_size(100, 1024) == 1
    s = nd.TokenBudgetBatchSampler(500, token_budget=4096, seed=3)
    batches = s.batches()
    assert [i for _, idx in batches for i in idx] != list(range(500))  # shuffled
    assert sorted(i for _, idx in batches for i in idx) == list(range(500))  # every index once
    for seq_len, idx in batches[:-1]:
        assert seq_len in nd.DEFAULT_SEQ_LENS and len(idx) == 4096 // seq_len
    assert len({L for L, _ in batches}) > 1
    assert batches == nd.TokenBudgetBatchSampler(500, token_budget=4096, seed=3).batches()
    assert batches != nd.TokenBudgetBatchSampler(500, token_budget=4096, seed=4).batches()
    s.set_epoch(1)
    assert s.batches() != batches
    r0 = nd.TokenBudgetBatchSampler(500, token_budget=4096, seed=3, num_replicas=2, rank=0).batches()
    r1 = nd.TokenBudgetBatchSampler(500, token_budget=4096, seed=3, num_replicas=2, rank=1).batches()
    assert r0 + r1 != [] and sorted(r0 + r1) == sorted(batches)
    with pytest.raises(ValueError, match="seq_lens"):
        nd.TokenBudgetBatchSampler(10, seq_lens=())


def test_drop_tokens_keeps_a_sorted_subset():
    s = _samples([8, 4])
    b = nd.collate_padded(s)
    d = nd.drop_tokens(b, 0.75, torch.Generator().manual_seed(0))
    assert d["patch_valid"].sum(1).tolist() == [2, 1] and d["seq_len"] == 2
    for i, k in enumerate([2, 1]):
        ids = d["ids_keep"][i, :k]
        assert (ids.diff() > 0).all() and (ids < [8, 4][i]).all()
        assert torch.equal(d["patches"][i, :k], s[i][0][ids])
        assert torch.equal(d["patch_coord"][i, :k], s[i][1][ids])
    assert (d["patches"][1, 1:] == 0).all()
    assert torch.equal(d["ids_keep"], nd.drop_tokens(b, 0.75, torch.Generator().manual_seed(0))["ids_keep"])
    with pytest.raises(ValueError, match="mask_ratio"):
        nd.drop_tokens(b, 1.0)


def test_digits_variable_resolution_sizes_vary_and_batch():
    tr, te = nd.digits_variable_resolution(min_size=16, max_size=40, seed=0)
    assert len(tr) + len(te) == 1797
    sizes = {tuple(tr[i][0].shape[1:]) for i in range(50)}
    assert len(sizes) > 20 and all(16 <= h <= 40 and 16 <= w <= 40 for h, w in sizes)
    assert any(h != w for h, w in sizes)
    tr2, _ = nd.digits_variable_resolution(min_size=16, max_size=40, seed=0)
    assert torch.equal(tr[7][0], tr2[7][0])
    ds = nd.NaFlexDataset(tr, patch_size=8)
    batch, labels = ds.batch(16, [0, 1, 2])
    assert batch["patches"].shape == (3, 16, 64) and labels.shape == (3,)
    lens = batch["patch_valid"].sum(1)
    assert (lens <= 16).all() and (lens >= 1).all()


def test_native_image_folder_keeps_size(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / c / "x.png")
    ds = nd.NativeImageFolder(str(tmp_path), train=False)
    x, y = ds[1]
    assert x.shape == (3, 24, 40) and y == 1 and ds.classes == ["a", "b"]
    patches, coord = nd.patchify(x, 8, 16)  # 24x40 = 3x5 patches fit 16
    assert patches.shape == (15, 192) and coord[-1].tolist() == [2, 4]
