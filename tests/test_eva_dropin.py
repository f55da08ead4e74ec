"""Drop-ins for the ViTs people pretrain now, against real timm (fp32): FastEva for timm's Eva (EVA-02, DINOv3,
PE, RoPE-Mixed) and FastViT's options for AIMv2 (RMSNorm, SwiGLU, no projection bias, embed norm) and SigLIP
('map' head). Small models: logits and every parameter gradient on the eager path and on the Triton path
(interpreter on CPU); full-size named models: state_dict keys and shapes on the meta device, strict load."""

import functools

import pytest
import timm
import torch
from timm.layers import LayerNorm, RmsNorm, SwiGLU, SwiGLUPacked
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import fastvit_kernels
from fastvit_kernels import FastEva, FastViT
from fastvit_kernels.reference_eva import Eva as RefEva
from helpers import assert_close_to_ref

LN5 = functools.partial(LayerNorm, eps=1e-5)

# tiny versions of the named models: same options, D 64-80, depth 2, head_dim 32 or 40
SMALL = {
    "eva02": (Eva, dict(img_size=(28, 42), patch_size=7, embed_dim=80, depth=2, num_heads=2, qkv_fused=False,
                        mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                        ref_feat_shape=(4, 4), num_classes=5)),  # head_dim 40, non-square 4 x 6 grid
    "dinov3": (Eva, dict(img_size=32, patch_size=8, dynamic_img_size=True, embed_dim=64, depth=2, num_heads=2,
                         qkv_bias=False, init_values=1e-5, rope_type="dinov3", rope_temperature=100,
                         rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4,
                         use_fc_norm=False, norm_layer=LN5, num_classes=0)),
    "pe": (Eva, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, global_pool="map",
                     attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(3, 3),
                     rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=4, attn_pool_mlp_ratio=4.0,
                     norm_layer=LN5, num_classes=16)),
    "rope_mixed": (Eva, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, use_rot_pos_emb=True,
                             rope_type="mixed", rope_temperature=10.0, global_pool="token", init_values=0.1,
                             num_classes=3)),
    "aimv2": (VisionTransformer, dict(img_size=28, patch_size=7, embed_dim=80, depth=2, num_heads=2,
                                      class_token=False, fc_norm=False, mlp_ratio=2.75, global_pool="avg",
                                      qkv_bias=False, proj_bias=False, act_layer="silu",
                                      norm_layer=functools.partial(RmsNorm, eps=1e-5),
                                      embed_norm_layer=functools.partial(RmsNorm, eps=1e-5), mlp_layer=SwiGLU,
                                      num_classes=0)),
    "siglip": (VisionTransformer, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                       mlp_ratio=3.7362, class_token=False, global_pool="map", num_classes=7)),
    "swiglu_packed_rms": (VisionTransformer, dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                                  mlp_layer=SwiGLUPacked, act_layer="silu", norm_layer="rmsnorm",
                                                  qk_norm=True, reg_tokens=1, num_classes=4)),
}


def timm_small(name):
    cls, cfg = SMALL[name]
    torch.manual_seed(0)
    model = cls(**cfg).eval()
    with torch.no_grad():  # move zero-initialised biases / tokens off zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def convert(src, backend):
    return (FastEva if isinstance(src, Eva) else FastViT).from_timm(src, backend=backend)


def run(model, x, g):
    model.zero_grad()
    out = model(x)
    out.backward(g)
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_model_matches_timm_fwd_bwd(name, backend, device):
    src = timm_small(name)
    fast = convert(src, backend).to(device)
    assert fast.state_dict().keys() == src.state_dict().keys()
    x = torch.randn(2, 3, *src.patch_embed.img_size)
    g = torch.randn_like(src(x))
    ref_out, ref_grads = run(src, x, g)
    out, grads = run(fast, x.to(device), g.to(device))
    assert_close_to_ref(out.cpu(), ref_out, name="logits")
    assert grads.keys() == ref_grads.keys()
    for k, ref in ref_grads.items():
        assert (grads[k] is None) == (ref is None), k
        if ref is not None:
            assert_close_to_ref(grads[k].cpu(), ref, name=f"grad {k}", factor=3.0)


# the fused ops each family's forward must run on the Triton path (the rest of the block runs eager by design:
# LayerScale branches, the 'map' head, qk_norm)
FUSED_OPS = {
    "eva02": {"patch_embed_fwd", "layernorm_linear_rope_fwd", "attention_fwd", "linear_residual_fwd",
              "swiglu_mlp_fwd"},
    "dinov3": {"layernorm_linear_rope_fwd", "attention_fwd", "layernorm_mlp_fwd"},
    "pe": {"layernorm_linear_rope_fwd", "attention_fwd", "linear_residual_fwd", "layernorm_mlp_fwd"},
    "rope_mixed": {"layernorm_linear_rope_fwd", "attention_fwd", "layernorm_mlp_fwd"},
    "aimv2": {"layernorm_linear_fwd", "attention_fwd", "linear_residual_fwd", "swiglu_mlp_fwd"},
    "siglip": {"patch_embed_fwd", "attention_block_fwd", "layernorm_mlp_fwd"},
    "swiglu_packed_rms": {"patch_embed_fwd", "layernorm_linear_fwd", "attention_fwd", "linear_residual_fwd",
                          "swiglu_mlp_fwd"},
}


@pytest.mark.parametrize("name", list(SMALL))
def test_blocks_run_the_fused_ops(name, device):
    """RoPE in the qkv GEMM, SwiGLU / RMSNorm MLPs and RMSNorm + qkv reach their fused ops (not the eager
    fallback the seams keep for other modules)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FastvitOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastvit":
                self.names.add(func.name().split("::")[1])
            return func(*args, **(kwargs or {}))

    src = timm_small(name)
    fast = convert(src, "triton").to(device)
    with torch.no_grad(), FastvitOps() as seen:
        fast(torch.randn(1, 3, *src.patch_embed.img_size, device=device))
    assert FUSED_OPS[name] <= seen.names, f"missing {FUSED_OPS[name] - seen.names}; ran {sorted(seen.names)}"


def test_dinov3_dynamic_size_and_reference_model():
    """DINOv3 runs any image size (rope tables rebuilt for the grid); the reference Eva gives timm's output."""
    src = timm_small("dinov3")
    fast = FastEva.from_timm(src, backend="torch")
    ref = RefEva(**SMALL["dinov3"][1]).eval()
    ref.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 24, 40)
    torch.testing.assert_close(fast(x), src(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref(x), src(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["eva02_base_patch14_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224",
                                  "aimv2_large_patch14_224", "vit_so400m_patch14_siglip_224"])
def test_full_size_named_model_loads_timm_state_dict_strictly(name):
    with torch.device("meta"):
        src = timm.create_model(name)
        ours = fastvit_kernels.create_model(name)
    assert isinstance(ours, FastEva if isinstance(src, Eva) else FastViT)
    theirs = {k: tuple(v.shape) for k, v in src.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    ours.load_state_dict(src.state_dict(), strict=True, assign=True)
    assert ours.num_classes == src.num_classes and ours.patch_embed.img_size == tuple(src.patch_embed.img_size)


def test_unsupported_options_raise_naming_them():
    with pytest.raises(NotImplementedError, match="use_post_norm"):
        FastEva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, use_post_norm=True)
    with pytest.raises(NotImplementedError, match="rope_type='mrope'"):
        FastEva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, use_rot_pos_emb=True,
                rope_type="mrope")
    with pytest.raises(NotImplementedError, match="num_kv_heads"):
        FastEva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_kv_heads=1)
    src = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, use_post_norm=True)
    with pytest.raises(NotImplementedError, match="use_post_norm"):
        FastEva.from_timm(src)
    with pytest.raises(NotImplementedError, match="norm_layer"):
        FastViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2,
                norm_layer=functools.partial(torch.nn.GroupNorm, 1))
    with pytest.raises(NotImplementedError, match="mlp_layer"):
        FastViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2, mlp_layer=torch.nn.Linear)
    with pytest.raises(NotImplementedError, match="scale_mlp_norm"):
        FastViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2, scale_mlp_norm=True)
    with pytest.raises(NotImplementedError, match="pre_norm"):
        FastViT.from_timm(VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2,
                                            pre_norm=True))


@pytest.mark.parametrize("name", ["eva02", "rope_mixed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_small_fasteva(name, backend):
    """No graph break: the fused RoPE / SwiGLU ops (Triton path) and their eager references (torch path) trace
    whole; a learnable per-head RoPE table (rope_mixed) gets its gradient through the compiled graph."""
    from helpers import assert_compiled_matches_eager

    torch._dynamo.reset()
    src = timm_small(name)
    model = FastEva.from_timm(src, backend=backend)
    assert_compiled_matches_eager(model, torch.randn(2, 3, *src.patch_embed.img_size))


@pytest.mark.parametrize("name", ["eva02", "dinov3", "aimv2"])
def test_small_model_fp16_matches_timm(name, device):
    """fp16 on the Triton path against timm in fp32 (logits and every parameter gradient), by the 2x rule with
    timm itself run in fp16 as PyTorch's own low-precision error."""
    src = timm_small(name)
    x = torch.randn(2, 3, *src.patch_embed.img_size)
    g = torch.randn_like(src(x))
    ref_out, ref_grads = run(src, x, g)
    low = timm_small(name).half()
    low_out, low_grads = run(low, x.half(), g.half())
    fast = convert(timm_small(name), "triton").to(device).half()
    out, grads = run(fast, x.half().to(device), g.half().to(device))
    assert_close_to_ref(out.cpu(), ref_out, low_out, name="logits")
    for k, ref in ref_grads.items():
        if ref is not None:
            assert_close_to_ref(grads[k].cpu(), ref, low_grads[k], name=f"grad {k}")
