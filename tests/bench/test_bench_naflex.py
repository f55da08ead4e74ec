"""NaFlex FLOP counts (hand counts, consistency with the fixed-size counts) and the packed-vs-padded cost model
(MODELLED: hand counts at a tiny shape, the ViT-B/16 targets as assertions, the bench CLI)."""

import pytest

from fastvit_kernels.bench import naflex_cost as nc
from fastvit_kernels.bench.__main__ import main
from fastvit_kernels.bench.devices import resolve_peak
from fastvit_kernels.bench.flops import ViTShape, flops_by_class, naflex_flops_by_class, naflex_model_flops

# tiny: D 8, 2 heads of 4, depth 1, P 4, C 3 (K 48), D_hidden 32, one register token, no class token
TINY = ViTShape(img_size=8, patch_size=4, in_chans=3, embed_dim=8, depth=1, num_heads=2, num_classes=3,
                class_token=False, global_pool="avg", reg_tokens=1)
VIT_B = nc.NAFLEX_SHAPES["naflexvit_base_patch16_gap"]


def test_naflex_flops_hand_count_packed_and_padded():
    D, K, Dh, nc_ = 8, 48, 32, 3
    lens = [3, 5]
    # packed: rows (3 + 1) + (5 + 1) = 10; attention over 4^2 + 6^2 = 52 pairs
    M = 10
    fwd = naflex_flops_by_class(TINY, lens)
    assert fwd == {"patch_embed": 2 * 8 * K * D, "ln_qkv": 2 * M * D * 3 * D, "attention": 4 * D * 52,
                   "proj": 2 * M * D * D, "mlp": 4 * M * D * Dh, "head": 2 * 2 * D * nc_, "optimizer": 0}
    # padded to 6: rows 2 * 7 = 14; attention 2 * 7^2 = 98 pairs; the embedding over 12 rows
    pad = naflex_flops_by_class(TINY, lens, pad_to=6)
    assert pad["patch_embed"] == 2 * 12 * K * D and pad["ln_qkv"] == 2 * 14 * D * 3 * D
    assert pad["attention"] == 4 * D * 98 and pad["mlp"] == 4 * 14 * D * Dh
    train = naflex_flops_by_class(TINY, lens, "train")
    assert train["patch_embed"] == 2 * fwd["patch_embed"] and train["mlp"] == 3 * fwd["mlp"]
    assert naflex_model_flops(TINY, lens, embed_tokens=0) == sum(fwd.values()) - fwd["patch_embed"]


def test_naflex_flops_equal_lengths_match_the_fixed_size_count():
    s = ViTShape.from_config("vit_base_patch16_224")  # 196 patches + class token
    for kind in ("forward", "train"):
        assert naflex_flops_by_class(s, [196] * 4, kind) == flops_by_class(s, 4, kind)
        assert naflex_flops_by_class(s, [100, 196, 7, 50], kind, pad_to=196) == flops_by_class(s, 4, kind)


def test_naflex_flops_errors():
    with pytest.raises(ValueError, match="at least one length"):
        naflex_flops_by_class(TINY, [])
    with pytest.raises(ValueError, match="below the longest"):
        naflex_flops_by_class(TINY, [3, 9], pad_to=8)
    with pytest.raises(ValueError, match="kind"):
        naflex_flops_by_class(TINY, [3], "both")


def _by_class_flops(launches, phase=None):
    out = {}
    for ln in launches:
        if phase is None or ln.phase == phase:
            out[ln.op_class] = out.get(ln.op_class, 0) + ln.flops
    return out


def test_cost_model_hand_counts_tiny():
    batch = nc.NaFlexBatch((3, 5), pad_to=6)
    packed = nc.step_launches(TINY, batch, "bf16", "packed", optimizer=False)
    padded = nc.step_launches(TINY, batch, "bf16", "padded", optimizer=False)
    D, e = 8, 2
    # forward attention executes the model FLOPs; backward: packed 14 / padded 10 matmul-equivalents per pair
    assert _by_class_flops(packed, "forward")["attention"] == 4 * D * (4 ** 2 + 6 ** 2)
    assert _by_class_flops(padded, "forward")["attention"] == 4 * D * 2 * 7 ** 2
    assert _by_class_flops(packed, "backward")["attention"] == 14 * D * 52
    assert _by_class_flops(padded, "backward")["attention"] == 10 * D * 98
    # the padded GEMMs run on 14 rows, the packed on 10; the embedding on 12 padded / 8 real rows
    fp, fq = _by_class_flops(packed, "forward"), _by_class_flops(padded, "forward")
    assert fp["mlp"] == 4 * 10 * D * 32 and fq["mlp"] == 4 * 14 * D * 32
    assert fp["patch_embed"] == 2 * 8 * 48 * D and fq["patch_embed"] == 2 * 12 * 48 * D
    # the float [B, 1, N, N] mask: built once (zeros + masked_fill write it), read by SDPA forward and backward
    N = 7
    mask = 2 * N * N * e
    built = [ln for ln in padded if ln.kernel.startswith("mask:")]
    assert len(built) == 5
    assert sum(ln.bytes_written for ln in built) == 2 * N + 2 * (2 * N * N) + mask + mask  # cat, and, not, zeros, fill
    sdpa_fwd = next(ln for ln in padded if ln.dispatch == "aten._scaled_dot_product_efficient_attention")
    M = 2 * N
    assert sdpa_fwd.bytes_read == 3 * M * D * e + mask
    assert not any("mask" in ln.kernel for ln in packed)
    # the varlen forward reads q, k, v and cu_seqlens (3 int32)
    vfwd = next(ln for ln in packed if ln.kernel == "_attention_varlen_fwd_kernel")
    assert vfwd.bytes_read == 3 * 10 * D * e + 3 * 4 and vfwd.bytes_written == 10 * D * e + 10 * 2 * 4


def test_cost_model_equal_lengths_same_gemm_work():
    """With every image at the padded length, both paths run the block GEMMs on the same rows."""
    batch = nc.NaFlexBatch((6, 6, 6), pad_to=6)
    fp = _by_class_flops(nc.step_launches(TINY, batch, path="packed"))
    fq = _by_class_flops(nc.step_launches(TINY, batch, path="padded"))
    for c in ("ln_qkv", "proj", "mlp", "patch_embed", "head"):
        assert fp[c] == fq[c], c


def test_mae_keep_ratio_embeds_only_kept_patches():
    batch = nc.NaFlexBatch((64, 100), pad_to=100, keep_ratio=0.25)
    assert batch.kept_lens == (16, 25) and batch.padded_keep == 25
    packed = nc.step_launches(TINY, batch, path="packed", optimizer=False)
    padded = nc.step_launches(TINY, batch, path="padded", optimizer=False)
    K, D = 48, 8
    assert _by_class_flops(packed, "forward")["patch_embed"] == 2 * 41 * K * D
    assert _by_class_flops(padded, "forward")["patch_embed"] == 2 * 200 * K * D  # embed all, then gather
    assert any(ln.kernel == "kept patch rows" for ln in padded)
    assert nc.model_flops(TINY, batch, "packed") == naflex_model_flops(TINY, [16, 25], "train")


def test_vit_b16_naflex_targets_modelled():
    """MODELLED targets over the default mixed lengths (64..1024 patches) at timm's default 16384-token budget:
    packed <= 0.5x the bytes and <= 0.6x the FLOPs of timm's padded + float-mask step, AdamW included (the same
    on both paths), at that budget and at 32768 tokens; forward + backward alone too."""
    lens = nc.default_seq_lens()
    assert sorted(set(lens)) == list(range(64, 1025, 32)) and len(lens) == 62
    batches = nc.budget_batches(lens)
    assert all(len(b.seq_lens) * b.pad_to <= 16384 for b in batches)
    fb = nc.comparison(VIT_B, batches, optimizer=False)
    assert fb["ratio"]["bytes"] <= 0.5 and fb["ratio"]["flops"] <= 0.6 and fb["ratio"]["model_flops"] <= 0.6
    for budget in (16384, 32768):
        full = nc.comparison(VIT_B, nc.budget_batches(lens, budget))
        assert full["ratio"]["bytes"] <= 0.5 and full["ratio"]["flops"] <= 0.6
    mae = nc.comparison(VIT_B, nc.budget_batches(lens, keep_ratio=0.25))
    pe = mae["packed"].by_class["patch_embed"], mae["padded"].by_class["patch_embed"]
    assert pe[0]["flops"] <= 0.15 * pe[1]["flops"] and pe[0]["bytes"] <= 0.5 * pe[1]["bytes"]
    assert mae["ratio"]["flops"] <= 0.6


def test_budget_batches_rule_and_errors():
    bs = nc.budget_batches([100, 200, 50, 400, 300], token_budget=800)
    assert [(b.seq_lens, b.pad_to) for b in bs] == [((100, 200, 50), 200), ((400, 300), 400)]  # 2 x 400 fits 800
    with pytest.raises(ValueError, match="below the longest"):
        nc.NaFlexBatch((5, 9), pad_to=8)
    with pytest.raises(ValueError, match="keep_ratio"):
        nc.NaFlexBatch((5,), 5, keep_ratio=0.0)
    with pytest.raises(ValueError, match="path"):
        nc.step_launches(TINY, nc.NaFlexBatch((5,), 5), path="eager")
    with pytest.raises(ValueError, match="covers"):
        nc.step_launches(TINY.with_(rope="cat"), nc.NaFlexBatch((5,), 5))


def test_bench_model_cli_naflex(capsys):
    assert main(["model", "--model", "naflexvit_base_patch16_gap", "--seq-lens", "64,256,1024,128",
                 "--token-budget", "2048", "--device", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "MODELLED" in out and "4 images" in out and "2 steps" in out
    res = nc.comparison(VIT_B, nc.budget_batches([64, 256, 1024, 128], 2048), peak=resolve_peak("h100-sxm", "bf16"))
    assert f"| kernel launches | {res['packed'].launches} | {res['padded'].launches} |" in out
    assert main(["model", "--model", "naflexvit_base_patch16_gap", "--keep-ratio", "1.5"]) == 2
    with pytest.raises(SystemExit):
        main(["model", "--model", "naflexvit_base_patch16_gap", "--seq-lens", "64,x"])
