"""Exact FLOP counts (fastvit_kernels.bench.flops), the FlopCounterMode formulas of the fastvit:: custom ops, the
device peak table and the ThroughputMeter."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastvit_kernels import create_model
from fastvit_kernels.bench import devices, flops
from fastvit_kernels.bench.flops import ViTShape, flops_by_class, model_flops
from fastvit_kernels.bench.meter import ThroughputMeter
from fastvit_kernels.configs import get_config
from fastvit_kernels.reference import VisionTransformer

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton path on the CPU interpreter")


def _count(model, images, train: bool) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fc:
        out = model(images)
        if train:
            out.sum().backward()
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


# ---------------------------------------------------------------------------------------------------------------
# model FLOPs
# ---------------------------------------------------------------------------------------------------------------
def test_vit_b16_forward_is_35_2_gflop():
    s = ViTShape.from_config("vit_base_patch16_224")
    N, D, L, Dh = 197, 768, 12, 3072  # 196 patches + class token
    by_hand = (2 * 196 * 768 * (3 * 16 * 16)  # patch embedding GEMM
               + L * (2 * N * D * 3 * D  # qkv
                      + 4 * N * N * D  # q k^T and p v
                      + 2 * N * D * D  # proj
                      + 4 * N * D * Dh)  # fc1 + fc2
               + 2 * D * 1000)  # head
    assert flops.flops_per_image(s, "forward") == by_hand == 35_127_656_448
    assert abs(by_hand / 1e9 - 35.2) < 0.1  # the commonly quoted figure (17.6 GMAC)
    # training step: 3x forward, less the patch embedding's image gradient (images need none)
    assert flops.flops_per_image(s, "train") == 3 * by_hand - 2 * 196 * 768 * 768
    assert model_flops(s, 64, "train") == 64 * flops.flops_per_image(s, "train")


def test_breakdown_adds_up_and_backward_is_twice_forward():
    s = ViTShape.from_config("vit_large_patch16_224")
    fwd, bwd, train = (flops_by_class(s, 8, k) for k in ("forward", "backward", "train"))
    assert set(fwd) == set(flops.OP_CLASSES) and fwd["optimizer"] == 0
    for c in flops.OP_CLASSES:
        assert train[c] == fwd[c] + bwd[c]
        assert bwd[c] == (fwd[c] if c == "patch_embed" else 2 * fwd[c])
    assert fwd["attention"] == 24 * 4 * 8 * 16 * 197 * 197 * 64


def test_meta_device_flop_counter_matches_vit_b():
    # FlopCounterMode on the eager model on the meta device (SDPA decomposes to matmuls there): no compute
    with torch.device("meta"):
        model = VisionTransformer(**get_config("vit_base_patch16_224"))
        images = torch.empty(2, 3, 224, 224)
    s = ViTShape.from_model(model)
    assert _count(model, images, train=False)[0] == model_flops(s, 2, "forward")
    assert _count(model, images, train=True)[0] == model_flops(s, 2, "train")


@pytest.mark.parametrize("name", ["vit_test_hd80", "vit_micro_patch4_32"])
def test_flop_counter_on_eager_reference_matches(name):
    model = VisionTransformer(**get_config(name), fused_attn=False)  # explicit matmuls: counted on the CPU
    cfg = get_config(name)
    images = torch.randn(3, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    s = ViTShape.from_model(model)
    assert _count(model, images, train=False)[0] == model_flops(s, 3, "forward")
    assert _count(model, images, train=True)[0] == model_flops(s, 3, "train")


@interpreter_only
def test_flop_counter_counts_fastvit_custom_ops():
    name = "vit_micro_patch4_32"
    fast = create_model(name, depth=1, img_size=16, backend="triton")  # 17 tokens, head_dim 32
    ref = VisionTransformer(**dict(get_config(name), depth=1, img_size=16), fused_attn=False)
    ref.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 16, 16)
    s = ViTShape.from_model(fast)
    f_fwd, ops_fwd = _count(fast, images, train=False)
    assert {"fastvit.patch_embed_fwd", "fastvit.attention_block_fwd", "fastvit.layernorm_mlp_fwd"} <= set(ops_fwd)
    assert f_fwd == _count(ref, images, train=False)[0] == model_flops(s, 2, "forward")
    f_train, ops_train = _count(fast, images, train=True)
    assert {"fastvit.patch_embed_bwd", "fastvit.attention_block_bwd", "fastvit.layernorm_mlp_bwd"} <= set(ops_train)
    assert f_train == _count(ref, images, train=True)[0] == model_flops(s, 2, "train")
    fb = flops_by_class(s, 2, "forward")
    attention_half = fb["ln_qkv"] + fb["attention"] + fb["proj"]
    assert ops_fwd["fastvit.attention_block_fwd"] == attention_half
    assert ops_fwd["fastvit.layernorm_mlp_fwd"] == fb["mlp"]
    assert ops_train["fastvit.attention_block_bwd"] == 2 * attention_half
    # the three ops the attention half fuses, called on their own, are counted too
    from fastvit_kernels import ops

    blk = fast.blocks[0]
    x = torch.randn(2, 17, 96)
    with FlopCounterMode(display=False) as counter:
        qkv = ops.layernorm_linear(x, blk.norm1.weight, blk.norm1.bias, blk.attn.qkv.weight, blk.attn.qkv.bias,
                                   backend="triton")
        ops.linear_residual(ops.attention(qkv, 3, backend="triton"), blk.attn.proj.weight, blk.attn.proj.bias, x,
                            backend="triton")
    assert counter.get_total_flops() == attention_half  # the same 2 x 17 tokens as the images above


def test_registration_needs_no_triton_import_nor_import_hooks():
    # importing fastvit_kernels imports neither triton nor torch.utils.flop_counter (which imports triton) and
    # installs no import hook; the formulas are registered as soon as flop_counter is loaded and the package or a
    # FastViT is built, or on request
    names = ("'patch_embed_fwd', 'patch_embed_bwd', 'attention_fwd', 'attention_bwd', 'layernorm_mlp_fwd', "
             "'layernorm_mlp_bwd', 'layernorm_linear_fwd', 'layernorm_linear_bwd', 'linear_residual_fwd', "
             "'linear_residual_bwd', 'attention_block_fwd', 'attention_block_bwd', 'layernorm_linear_rope_fwd', "
             "'layernorm_linear_rope_bwd', 'swiglu_mlp_fwd', 'swiglu_mlp_bwd', 'patch_embed_tokens_fwd', "
             "'patch_embed_tokens_bwd'")
    registered = f"all(getattr(torch.ops.fastvit, n) in flop_registry for n in ({names}))"
    later = ("import sys, torch\nn = len(sys.meta_path)\nimport fastvit_kernels\n"
             "assert len(sys.meta_path) == n and 'triton' not in sys.modules\n"
             "assert 'torch.utils.flop_counter' not in sys.modules\n"
             "from torch.utils.flop_counter import flop_registry\n"
             f"assert not any(getattr(torch.ops.fastvit, n) in flop_registry for n in ({names}))\n"
             "fastvit_kernels.create_model('vit_digits', depth=1)\n"
             f"assert {registered}\n")
    earlier = ("import torch\nfrom torch.utils.flop_counter import flop_registry\nimport fastvit_kernels\n"
               f"assert {registered}\n"
               "assert fastvit_kernels.ops.register_flop_formulas() == []  # idempotent\n")
    on_request = ("import sys, torch, fastvit_kernels\n"
                  "assert len(fastvit_kernels.ops.register_flop_formulas()) == 22\n"
                  "from torch.utils.flop_counter import flop_registry\n"
                  f"assert {registered}\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for code in (later, earlier, on_request):
        subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_flop_formulas_as_custom_mapping():
    # the formulas without the global registry: FlopCounterMode(custom_mapping=...) on shapes alone
    from fastvit_kernels import ops

    table = ops.flop_formulas()
    assert len(table) == 22  # 9 ops x (fwd, bwd) + attention_varlen_* and attention_masked_*
    fwd = table[torch.ops.fastvit.attention_block_fwd]
    B, N, D, H = 2, 17, 96, 3
    expect = 2 * B * N * D * 3 * D + 4 * B * H * N * N * (D // H) + 2 * B * N * D * D
    assert fwd((B, N, D), (D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), H, 0.1, 1e-6) == expect
    assert table[torch.ops.fastvit.layernorm_mlp_bwd]((B * N, D), (B * N, D), (B * N, 4 * D), None, None, None,
                                                      None, (4 * D, D)) == 2 * 4 * B * N * D * 4 * D


def test_vitshape_checks_and_from_model():
    with pytest.raises(ValueError, match="embed_dim=100 must be divisible by num_heads=3"):
        ViTShape(img_size=32, patch_size=4, in_chans=3, embed_dim=100, depth=1, num_heads=3)
    with pytest.raises(ValueError, match=r"img_size must be positive multiples of patch_size=16; got \(30, 30\)"):
        ViTShape(img_size=30, patch_size=16, in_chans=3, embed_dim=64, depth=1, num_heads=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        flops_by_class(ViTShape.from_config("vit_digits"), 1, "fwd")
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        model_flops(ViTShape.from_config("vit_digits"), 0)
    m = VisionTransformer(**get_config("vit_test_hd80"), mlp_ratio=2.5)
    s = ViTShape.from_model(m)
    assert (s.tokens, s.head_dim, s.hidden, s.num_classes) == (17, 80, 400, 10)
    assert s == ViTShape.from_config("vit_test_hd80", mlp_ratio=2.5).with_(mlp_hidden=400)


# ---------------------------------------------------------------------------------------------------------------
# device table, MFU, ThroughputMeter
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("h100-sxm", "h100-sxm"), ("NVIDIA H100 NVL", None), ("cpu", None), ("Tesla T4", None),
])
def test_device_lookup(name, key):
    spec = devices.lookup_device(name)
    assert (spec.key if spec else None) == key


def test_resolve_peak_and_mfu():
    p = devices.resolve_peak("h100-sxm", torch.bfloat16)
    assert p.flops_per_s == pytest.approx(989.4e12) and p.bytes_per_s == pytest.approx(3350e9)
    assert devices.resolve_peak("a100", "fp32").flops_per_s == pytest.approx(19.5e12)
    p = devices.resolve_peak("cpu", "bf16", peak_tflops=2.0)
    assert p.flops_per_s == 2e12 and p.bytes_per_s is None and "flag" in p.source
    assert devices.resolve_peak("cpu", "bf16").flops_per_s is None
    assert devices.mfu(500e12, 1.0, 1000e12) == pytest.approx(0.5)
    assert devices.mfu(1.0, 1.0, None) is None
    with pytest.raises(ValueError, match="peak_tflops must be > 0; got -1"):
        devices.resolve_peak("h100-sxm", "bf16", peak_tflops=-1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        devices.resolve_peak("h100-sxm", "int8")
    with pytest.raises(ValueError, match="seconds must be > 0"):
        devices.mfu(1.0, 0.0, 1.0)


def test_throughput_meter():
    s = ViTShape.from_config("vit_base_patch16_224")
    meter = ThroughputMeter.for_model(s, kind="train", dtype=torch.bfloat16, device="cpu", peak_device="h100-sxm",
                                      warmup_steps=1)
    per_img = flops.flops_per_image(s, "train")
    first = meter.update(64, 10.0)  # warm-up: reported, not in the total
    assert first.images_per_s == pytest.approx(6.4)
    st = meter.update(256, 0.5)
    assert st.images_per_s == pytest.approx(512.0)
    assert st.tflops == pytest.approx(256 * per_img / 0.5 / 1e12)
    assert st.mfu == pytest.approx(256 * per_img / 0.5 / 989.4e12)
    meter.update(256, 1.5)
    tot = meter.total
    assert (tot.images, tot.seconds) == (512, 2.0) and tot.images_per_s == pytest.approx(256.0)
    assert "images/s" in tot.line() and "MFU" in tot.line()
    cpu = ThroughputMeter(1e9, None, device="cpu")
    with cpu.step(4):
        pass
    assert cpu.last.images == 4 and cpu.last.seconds > 0 and cpu.last.mfu is None and "n/a" in cpu.last.line()
    with pytest.raises(ValueError, match="seconds must be > 0"):
        cpu.update(1, 0.0)
    with pytest.raises(ValueError, match="flops_per_image must be > 0"):
        ThroughputMeter(0.0)
    with pytest.raises(RuntimeError, match="without start"):
        cpu.stop(1)
