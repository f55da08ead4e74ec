"""Candidate lists per Triton release: the tiles that spilled in the AOT check on Triton 3.6 (patch-embed split
GEMMs, the GELU' epilogue, the qkv pair's deep K step, the dK / dV kernel at head_dim 80) are pruned before
``NEWER_TRITON`` and kept on newer releases, and every list stays non-empty with sm_90 warpgroup-MMA shapes. Which
tiles build clean is the AOT check's job (``.ci/oldest-triton`` runs it on the oldest supported Triton)."""

import pytest
import torch

pytest.importorskip("triton")

from fastvit_kernels.kernels import _common, attention, gemm_configs, matmul  # noqa: E402

BF16 = torch.bfloat16


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in configs}


@pytest.fixture(params=[(3, 4), (3, 6), (3, 8), (3, 9), (3, 10)])
def version(request, monkeypatch):
    for mod in (gemm_configs, matmul, attention, _common):
        monkeypatch.setattr(mod, "triton_version", lambda: request.param)
    return request.param


def test_gemm_lists(version):
    old = version < _common.NEWER_TRITON
    split = _tiles(gemm_configs.gemm_configs(BF16, split=True))
    dgelu = _tiles(gemm_configs.gemm_configs(BF16, dgelu=True))
    pair = _tiles(gemm_configs.pair_configs(BF16))
    spilled_split = {(128, 128, 32, 8), (128, 64, 32, 4)}  # 8-640 B per thread on Triton 3.6
    assert split and all(bm % 64 == 0 and w % 4 == 0 for bm, _, _, w in split)
    assert (split & spilled_split == set()) == old
    assert ((128, 128, 32, 8) in dgelu) != old
    assert pair and any(bk >= 64 for _, _, bk, _ in pair) != old
    assert _tiles(gemm_configs.gemm_configs(BF16)) == {(128, 128, 32, 8), (128, 128, 64, 8), (128, 64, 32, 4)}
    # the autotuner's early prune hands a GELU' launch the GELU' list
    a = torch.empty(1, dtype=BF16)
    ids = [gemm_configs.config_id(c) for c in matmul._prune_plain(matmul._ALL_CONFIGS, {"a_ptr": a, "b_ptr": a},
                                                                DGELU=True)]
    assert ids == [gemm_configs.config_id(c) for c in gemm_configs.gemm_configs(BF16, dgelu=True)]


def test_dkdv_list_at_head_dim_80(version):
    # the 64-row tiles spilled at head_dim 80 on every checked Triton (3.6: 64 x 64 and 64 x 128; 3.9: 64 x 128)
    for bucket in (256, 512):
        kept = attention.attention_configs("dkdv", 80, BF16, None, bucket)
        assert len(kept) > 1 and all(c.kwargs["BLOCK_N"] % 64 == 0 for c in kept)
        assert all(c.kwargs["BLOCK_M"] == 32 for c in kept)
    # at head_dim 64 the 64-row tiles spilled on Triton 3.4, and 64 x 128 on 3.6
    hd64 = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
            for c in attention.attention_configs("dkdv", 64, BF16, None, 256)}
    assert any(bm == 64 for bm, _ in hd64) == (version >= _common.TRITON_3_6)
    assert ((64, 128) in hd64) == (version >= _common.NEWER_TRITON)


def test_oldest_triton_prunes(version):
    """The Triton 3.4 findings: GELU on B's load without the 4-warp tile, no TMA pair with a deep K step, no fwd
    128 x 128 at head_dim 80; newer releases keep them. dq 128 x 32 spilled on 3.4 and 3.6: only 3.9 keeps it."""
    from fastvit_kernels.kernels import matmul_tma

    oldest = version < _common.TRITON_3_6
    assert any(w < 8 for *_, w in _tiles(gemm_configs.gemm_configs(BF16, b_gelu=True))) != oldest
    fwd80 = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
             for c in attention.attention_configs("fwd", 80, BF16, None, 256)}
    dq = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in attention.attention_configs("dq", 64, BF16, None, 256)}
    assert ((128, 128) in fwd80) != oldest and ((128, 32) in dq) == (version >= _common.NEWER_TRITON)
    pair_k = {c.kwargs["BLOCK_K"] for c in matmul_tma.tma_configs(BF16, pair=True)}
    assert pair_k and (64 in pair_k) != oldest  # tma_configs reads _common.triton_version at call time


def test_tma_pair_with_gelu_on_b(version):
    """fc2's TMA pair (GELU on B's load) spilled with the 4-warp tile on Triton 3.8: every release before
    NEWER_TRITON drops that tile for it; the other pairs keep it from 3.6 on, and its default tile stays first."""
    from fastvit_kernels.kernels import matmul_tma
    from fastvit_kernels.kernels.fusion import PROLOGUE_GELU, PROLOGUE_LN

    plain = matmul_tma.tma_configs(BF16, pair=True)
    gelu = matmul_tma.tma_configs(BF16, pair=True, b_gelu=True)
    assert gelu and _tiles(gelu) <= _tiles(plain) and _tiles(gelu[:1]) == _tiles(plain[:1])
    assert any(c.num_warps < 8 for c in gelu) == (version >= _common.NEWER_TRITON)
    assert any(c.num_warps < 8 for c in plain)
    # the autotuner's early prune hands fc2's pair (B_PROLOGUE0 = GELU) the GELU list, any other pair the plain one
    desc = type("Desc", (), {"base": torch.empty(1, dtype=BF16)})()
    for b_prologue, want in ((PROLOGUE_GELU.value, gelu), (PROLOGUE_LN.value, plain)):
        flags = {"B_PROLOGUE0": b_prologue, "B_PROLOGUE1": 0}
        picked = matmul_tma._prune_pair(matmul_tma._ALL_TMA_PAIR_CONFIGS, {"a0_desc": desc}, **flags)
        assert [gemm_configs.config_id(c) for c in picked] == [gemm_configs.config_id(c) for c in want]


def test_triton_version_parses_releases(monkeypatch):
    import triton

    for text, want in (("3.4.0", (3, 4)), ("3.9.0", (3, 9)), ("3.10.1+git1234", (3, 10)), ("3.6.0rc1", (3, 6))):
        monkeypatch.setattr(triton, "__version__", text)
        assert _common.triton_version() == want


def test_modern_block_fusion_lists(version):
    """The AOT findings for the RoPE, SwiGLU, bias-free and hidden-norm GEMMs: the RoPE backward and the SwiGLU
    launches take half-size tiles everywhere; a residual epilogue without bias or after a LayerNorm prologue keeps
    only the default tile and LayerNorm-on-B drops the deep K step (Triton 3.4 and 3.9); before NEWER_TRITON the
    RoPE forward takes the half-size tiles too, RoPE drops the 4-warp tile and the SwiGLU steps drop 64 x 128
    (Triton 3.4)."""
    old = version < _common.NEWER_TRITON
    small = {(128, 64, 32, 8), (64, 128, 32, 8), (64, 64, 32, 4)}
    default = _tiles(gemm_configs.gemm_configs(BF16))
    for role in (2, 3):
        assert _tiles(gemm_configs.gemm_configs(BF16, rope=role)) == ({(64, 128, 32, 8)} if old else small)
    assert _tiles(gemm_configs.gemm_configs(BF16, rope=1)) == ({(128, 64, 32, 8), (64, 128, 32, 8)} if old
                                                               else default)
    assert _tiles(gemm_configs.gemm_configs(BF16, glu=True)) == (small - {(64, 128, 32, 8)} if old else small)
    # a residual epilogue without a bias or after a LayerNorm prologue, LayerNorm on B alone: on every release
    assert _tiles(gemm_configs.gemm_configs(BF16, residual=True)) == {(128, 128, 32, 8)}
    assert not any(bk >= 64 for _, _, bk, _ in _tiles(gemm_configs.gemm_configs(BF16, b_ln=True)))
    # the RoPE kernel's early prune hands each role its list
    a = torch.empty(1, dtype=BF16)
    ids = [gemm_configs.config_id(c) for c in matmul._prune_plain(matmul._ALL_CONFIGS, {"a_ptr": a, "b_ptr": a},
                                                                ROPE=3)]
    assert ids == [gemm_configs.config_id(c) for c in gemm_configs.gemm_configs(BF16, rope=3)]
    # fc1's GELU epilogue without a bias (a bias-free MLP) drops the 4-warp tile on every release (Triton 3.8, 3.9)
    assert all(w == 8 for *_, w in _tiles(gemm_configs.gemm_configs(BF16, gelu_no_bias=True)))


def test_key_padding_kernels_at_head_dim_80(version):
    """Triton 3.4's AOT check: the key-padding sequence kernels (key-mask loads) at head_dim 80 spilled with dkdv
    32 x 128 and dq 64 x 64 (8 warps); there dq takes 64 x 32 (4 warps), a tile no other case lists. The packed
    form and newer releases keep their lists."""
    oldest = version < _common.TRITON_3_6

    def tiles(kernel, padded):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in attention.attention_configs(kernel, 80, BF16, None, 256, seq=True, padded=padded)}

    assert tiles("dq", True) == ({(64, 32, 4)} if oldest else tiles("dq", False))
    assert (64, 32, 4) not in tiles("dq", False) and (64, 64, 8) in tiles("dq", False)
    assert ((32, 128, 8) in tiles("dkdv", True)) != oldest and (32, 128, 8) in tiles("dkdv", False)
    assert (64, 32, 4) not in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                               for c in attention.attention_configs("dq", 80, BF16, None, 256)}
