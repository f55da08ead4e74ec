"""FastViT as a drop-in for timm's VisionTransformer: the common variants on the Triton path against the
reference model, from_timm, timm's methods, mixed precision and selective activation checkpointing."""

import pytest
import torch

from fastvit_kernels import FastViT, create_model
from fastvit_kernels.configs import get_config
from fastvit_kernels.reference import VisionTransformer
from helpers import compare_model_with_reference

SMALL = dict(get_config("vit_digits"), depth=2)

VARIANTS = {
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "fc_norm_token": dict(fc_norm=True),
    "no_final_norm": dict(final_norm=False),
    "features_only": dict(num_classes=0),
    "no_pool": dict(global_pool="", num_classes=0),
    "reg_tokens_no_embed_class_avg": dict(reg_tokens=2, no_embed_class=True, global_pool="avg"),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_reference(variant, device):
    compare_model_with_reference({**SMALL, **VARIANTS[variant]}, device, torch.float32)


def test_layerscale_and_qk_norm_parameter_names():
    model = create_model("vit_digits", depth=1, init_values=1e-5, qk_norm=True)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names["blocks.0.ls1.gamma"] == (64,) and names["blocks.0.ls2.gamma"] == (64,)
    assert names["blocks.0.attn.q_norm.weight"] == (32,) and names["blocks.0.attn.k_norm.bias"] == (32,)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((64,), 1e-5))


@pytest.mark.parametrize("variant", ["plain", "layerscale", "qk_norm", "reg_tokens_no_embed_class_avg",
                                     "gelu_tanh"])
def test_from_timm_loads_strictly_and_matches(variant):
    src = VisionTransformer(**{**SMALL, **VARIANTS.get(variant, {})}).eval()  # timm's attributes and names
    fast = FastViT.from_timm(src, backend="torch")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fast(x), src(x), atol=1e-5, rtol=1e-5)  # naive softmax vs SDPA: round-off only
    assert fast.state_dict().keys() == src.state_dict().keys()
    assert fast.blocks[0].mlp.act.approximate == src.blocks[0].mlp.act.approximate


def test_act_layer_spellings():
    """timm's act_layer forms of GELU map to the fused MLP's GELU form; anything else raises before building."""
    import functools

    from fastvit_kernels.reference import gelu_approximate

    for spelling, form in ((None, "none"), ("gelu", "none"), (torch.nn.GELU, "none"), ("gelu_tanh", "tanh"),
                           (functools.partial(torch.nn.GELU, approximate="tanh"), "tanh")):
        assert gelu_approximate(spelling) == form
        assert create_model("vit_digits", depth=1, act_layer=spelling).blocks[0].mlp.act.approximate == form
    for bad in ("relu", torch.nn.SiLU):
        with pytest.raises(NotImplementedError, match="act_layer=.* is not supported"):
            create_model("vit_digits", depth=1, act_layer=bad)
    src = VisionTransformer(**SMALL)
    src.blocks[0].mlp.act = torch.nn.SiLU()
    with pytest.raises(NotImplementedError, match="MLP activation SiLU"):
        FastViT.from_timm(src)


def test_from_timm_rejects_what_it_cannot_run():
    src = VisionTransformer(**SMALL)
    src.norm_pre = torch.nn.LayerNorm(64)
    with pytest.raises(NotImplementedError, match="pre_norm=True"):
        FastViT.from_timm(src)


def test_from_real_timm():
    import timm
    src = timm.models.vision_transformer.VisionTransformer(**SMALL, init_values=1e-3, qk_norm=True).eval()
    fast = FastViT.from_timm(src, backend="torch")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fast(x), src(x), atol=1e-5, rtol=1e-5)


def test_forward_intermediates_semantics():
    torch.manual_seed(0)
    model = create_model("vit_digits", depth=3, reg_tokens=1, backend="torch").eval()
    x = torch.randn(2, 1, 8, 8)
    # manual: run the blocks one by one
    h = model.embed(x)
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    final, inter = model.forward_intermediates(x, indices=[0, -1])
    torch.testing.assert_close(final, model.norm(outs[-1]))
    assert len(inter) == 2 and inter[0].shape == (2, 64, 4, 4)  # NCHW: (B, D, gh, gw)
    torch.testing.assert_close(inter[1], outs[2][:, 2:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
    nlc = model.forward_intermediates(x, 2, norm=True, output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=True)
    assert len(nlc) == 2
    y, prefix = nlc[0]
    torch.testing.assert_close(y, model.norm(outs[1])[:, 2:])
    assert prefix.shape == (2, 2, 64)
    early = model.forward_intermediates(x, [0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], inter[0])
    with pytest.raises(ValueError, match="output_fmt must be"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="block index 5 out of range"):
        model.forward_intermediates(x, [5])


def test_timm_methods():
    model = create_model("vit_digits", depth=2)
    assert model.get_classifier() is model.head
    model.reset_classifier(3, global_pool="avg")
    assert model.head.out_features == 3 and model.global_pool == "avg"
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 64)
    assert model.forward_head(model.forward_features(torch.randn(1, 1, 8, 8)), pre_logits=True).shape == (1, 64)
    gm = model.group_matcher()
    assert set(gm) == {"stem", "blocks"} and {"pos_embed", "cls_token"} <= model.no_weight_decay()
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, global_pool="max")


def test_autocast_fp16_on_the_triton_path(device):
    torch.manual_seed(0)
    ref = VisionTransformer(**SMALL)
    fast = FastViT(**SMALL, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 8, 8)
    outs = []
    for m, dev in ((fast, device), (ref, "cpu")):
        with torch.autocast(torch.device(dev).type, dtype=torch.float16):
            out = m(x.to(dev))
        out.float().sum().backward()
        outs.append(out.float().cpu())
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for (k, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, atol=5e-2 * max(1.0, q.grad.abs().max().item()), rtol=0,
                                   msg=lambda m: f"{k}: {m}")


def test_selective_activation_checkpointing_can_name_the_ops(device):
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    model = create_model("vit_digits", depth=1, backend="triton").to(device)
    x = torch.randn(2, 1, 8, 8, device=device)
    model(x).sum().backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    saved_ops = {torch.ops.fastvit.attention_block_fwd.default, torch.ops.fastvit.layernorm_mlp_fwd.default}
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(op)
        return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE

    out = checkpoint(model, x, use_reentrant=False,
                     context_fn=lambda: create_selective_checkpoint_contexts(policy))
    out.sum().backward()
    assert saved_ops <= set(seen)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


def test_pure_bf16_model(device):
    """model.to(torch.bfloat16): the Triton path on a GPU; on a CPU the eager path (the interpreter cannot run
    bf16), so this holds the bf16 plumbing (ops' dtype checks, autocast-free casts) to the fp32 reference."""
    torch.manual_seed(0)
    ref = VisionTransformer(**SMALL)
    fast = FastViT(**SMALL, backend="triton" if device == "cuda" else "torch")
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(device, torch.bfloat16)
    x = torch.randn(4, 1, 8, 8)
    out = fast(x.to(device, torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in fast.parameters())
    expected = ref(x)
    torch.testing.assert_close(out.float().cpu(), expected, atol=5e-2 * max(1.0, expected.abs().max().item()),
                               rtol=0)
