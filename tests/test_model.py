"""FastViT: timm's parameter names and shapes, constructor errors, and the Triton path against the reference
model (logits and every parameter gradient)."""

import warnings

import pytest
import torch

from fastvit_kernels import FastViT, create_model
from fastvit_kernels.configs import DEFAULT_TRAIN_CLASSES, get_config, training_config
from fastvit_kernels.reference import VisionTransformer
from helpers import assert_compiled_matches_eager, compare_model_with_reference

BLOCK_KEYS = {
    "norm1.weight": "D", "norm1.bias": "D", "attn.qkv.weight": "3D,D", "attn.qkv.bias": "3D",
    "attn.proj.weight": "D,D", "attn.proj.bias": "D", "norm2.weight": "D", "norm2.bias": "D",
    "mlp.fc1.weight": "4D,D", "mlp.fc1.bias": "4D", "mlp.fc2.weight": "D,4D", "mlp.fc2.bias": "D",
}


@pytest.mark.parametrize("name,D,depth,P,N,classes", [
    ("vit_base_patch16_224", 768, 12, 16, 196, 1000),
    ("vit_large_patch16_224", 1024, 24, 16, 196, 1000),
    ("vit_huge_patch14_224", 1280, 32, 14, 256, 0),  # timm's default tag (orig_in21k) has no head
])
def test_timm_state_dict_keys_and_shapes(name, D, depth, P, N, classes):
    with torch.device("meta"):
        model = create_model(name)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dims = {"D": D, "3D": 3 * D, "4D": 4 * D}
    expected = {
        "cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D), "patch_embed.proj.weight": (D, 3, P, P),
        "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
    }
    if classes:
        expected.update({"head.weight": (classes, D), "head.bias": (classes,)})
    for i in range(depth):
        for k, shape in BLOCK_KEYS.items():
            expected[f"blocks.{i}.{k}"] = tuple(dims[s] for s in shape.split(","))
    assert sd == expected
    if name == "vit_huge_patch14_224":
        assert model.blocks[0].attn.head_dim == 80


def test_training_config_gives_a_headless_model_a_head():
    assert get_config("vit_huge_patch14_224")["num_classes"] == 0  # timm's default tag: no head
    assert training_config("vit_huge_patch14_224") == {**get_config("vit_huge_patch14_224"),
                                                       "num_classes": DEFAULT_TRAIN_CLASSES}
    assert training_config("vit_digits") == get_config("vit_digits")
    assert training_config("vit_base_patch16_224")["num_classes"] == 1000
    with pytest.raises(KeyError, match="unknown model 'vit_nope'"):
        training_config("vit_nope")


def test_loads_reference_state_dict_strictly():
    cfg = get_config("vit_digits")
    ref = VisionTransformer(**cfg)
    model = FastViT(**cfg)
    model.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["vit_digits", "vit_test_hd80"])
def test_triton_path_matches_reference_fp32(name, device):
    compare_model_with_reference(get_config(name), device, torch.float32)


def test_triton_path_matches_reference_fp16(device):
    compare_model_with_reference(get_config("vit_test_hd80"), device, torch.float16)


def test_avg_pool_no_class_token_and_drop_path(device):
    cfg = get_config("vit_digits")
    cfg.update(depth=2, class_token=False, global_pool="avg", drop_path_rate=0.5)
    # training mode: stochastic depth draws the same per-sample masks in both models (same RNG order)
    compare_model_with_reference(cfg, device, torch.float32, train=True)


def test_bad_images_raise_before_launch():
    model = create_model("vit_digits", backend="torch")
    with pytest.raises(ValueError, match=r"images must be \(B, C=1, H, W\); got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="images must be 8x8 .*got 8x10"):
        model(torch.randn(2, 1, 8, 10))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(embed_dim=100, num_heads=3), ValueError, "embed_dim=100 must be divisible by num_heads=3"),
    (dict(img_size=9), ValueError, "must be a multiple of patch_size"),
    (dict(scale_attn_norm=True), NotImplementedError, "scale_attn_norm=True is not supported"),
    (dict(pre_norm=True), NotImplementedError, "pre_norm=True is not supported"),
    (dict(no_such_arg=1), TypeError, "unexpected keyword argument 'no_such_arg'"),
    (dict(global_pool="max"), ValueError, "global_pool must be"),
    (dict(class_token=False), ValueError, "global_pool='token' needs class_token=True"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        create_model("vit_digits", **kwargs)


def test_create_model_errors():
    with pytest.raises(KeyError, match="unknown model 'vit_nope'"):
        create_model("vit_nope")
    with pytest.raises(ValueError, match="pretrained=True is not supported"):
        create_model("vit_digits", pretrained=True)


def test_attention_dropout_falls_back_visibly(device):
    model = create_model("vit_digits", depth=1, attn_drop_rate=0.1, backend="triton").to(device).train()
    with pytest.warns(UserWarning, match="attn_drop_rate > 0 is not implemented by the fused ops"):
        model(torch.randn(2, 1, 8, 8, device=device))
    model.eval()  # no dropout in eval: the fused path runs, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 1, 8, 8, device=device))


def _paths(blk) -> tuple[str, str]:
    return blk.attention_residual.__name__, blk.mlp_residual.__name__


@pytest.mark.parametrize("kwargs, train, eval_", [
    (dict(), ("_attention_fused", "_mlp_fused"), ("_attention_fused", "_mlp_fused")),
    (dict(attn_drop_rate=0.1), ("_attention_eager", "_mlp_fused"), ("_attention_fused", "_mlp_fused")),
    (dict(proj_drop_rate=0.1), ("_attention_branch", "_mlp_eager"), ("_attention_fused", "_mlp_fused")),
    (dict(drop_path_rate=0.5, depth=2), ("_attention_branch", "_mlp_branch"), ("_attention_fused", "_mlp_fused")),
    (dict(init_values=1e-5), ("_attention_scaled_residual", "_mlp_scaled_residual"),
     ("_attention_scaled_residual", "_mlp_scaled_residual")),
    (dict(init_values=1e-5, drop_path_rate=0.5, depth=2), ("_attention_branch", "_mlp_branch"),
     ("_attention_scaled_residual", "_mlp_scaled_residual")),
    (dict(qk_norm=True), ("_attention_proj_residual", "_mlp_fused"), ("_attention_proj_residual", "_mlp_fused")),
])
def test_block_chooses_its_paths_at_build_and_mode_change(kwargs, train, eval_):
    model = create_model("vit_digits", **{"depth": 1, **kwargs})
    blk = model.blocks[-1]
    assert _paths(blk) == train  # built in training mode
    model.eval()
    assert _paths(blk) == eval_
    model.train()
    assert _paths(blk) == train


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_scale_folded_into_the_branch_linear(backend):
    # x + gamma * (h W^T + b) computed as x + h (gamma W)^T + gamma b (residual in the GEMM epilogue): the eager
    # branch's values and every gradient (gamma's through the scaled weight), in fp32
    torch.manual_seed(0)
    model = create_model("vit_test_hd80", depth=1, init_values=0.1, backend=backend).eval()
    blk = model.blocks[0]
    with torch.no_grad():
        blk.ls1.gamma.uniform_(-1, 1)
        blk.ls2.gamma.uniform_(-1, 1)
    x = torch.randn(2, 17, 160, requires_grad=True)
    results = []
    for attn_path, mlp_path in ((blk._attention_scaled_residual, blk._mlp_scaled_residual),
                                (blk._attention_branch, blk._mlp_branch)):
        out = mlp_path(attn_path(x))
        params = [x, blk.ls1.gamma, blk.ls2.gamma, blk.attn.proj.weight, blk.attn.proj.bias, blk.mlp.fc2.weight,
                  blk.mlp.fc2.bias, blk.mlp.fc1.weight]
        results.append((out, torch.autograd.grad(out, params, torch.ones_like(out))))
    (out_f, grads_f), (out_e, grads_e) = results
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
    for gf, ge in zip(grads_f, grads_e):
        torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-4)


def test_layer_scale_not_folded_in_fp16(monkeypatch):
    # gamma * W at LayerScale's 1e-5 init is an fp16 subnormal: fp16 compute keeps the eager scale
    from fastvit_kernels import _blocks

    assert _blocks.folds_layer_scale(torch.zeros(1)) and _blocks.folds_layer_scale(torch.zeros(1, dtype=torch.bfloat16))
    assert not _blocks.folds_layer_scale(torch.zeros(1, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _blocks.folds_layer_scale(torch.zeros(1))
    blk = create_model("vit_digits", depth=1, init_values=1e-5, backend="torch").eval().blocks[0]
    taken = []
    monkeypatch.setattr(blk, "_attention_branch", lambda x: taken.append("attention") or x)
    monkeypatch.setattr(blk, "_mlp_branch", lambda x: taken.append("mlp") or x)
    x = torch.randn(2, 5, 64, dtype=torch.float16)
    blk.attention_residual(x), blk.mlp_residual(x)
    assert taken == ["attention", "mlp"]


def test_block_forward_is_the_chosen_path():
    # forward runs what choose_paths picked (no per-call re-derivation): swap the chosen path for a recorder
    model = create_model("vit_digits", depth=1, backend="torch").eval()
    blk = model.blocks[0]
    seen = []
    blk.attention_residual = lambda x: seen.append("attention") or x
    blk.mlp_residual = lambda x: seen.append("mlp") or x + 1
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(blk(x), x + 1)
    assert seen == ["attention", "mlp"]
    # an option changed by hand takes effect once the block chooses again
    blk.attn.attn_drop.p = 0.1
    blk.train()
    assert _paths(blk) == ("_attention_eager", "_mlp_fused")


def test_matches_timm():
    import timm
    cfg = get_config("vit_test_hd80")
    t = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    model = FastViT(**cfg, backend="torch").eval()
    model.load_state_dict(t.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), t(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_matches_eager(device):
    """The ops are registered custom ops: Dynamo traces the whole model without graph breaks (fullgraph=True)
    and AOTAutograd differentiates through their registered backward. ``aot_eager`` keeps the test fast on CPU;
    the graph capture is the same one inductor would get."""
    torch.manual_seed(0)
    model = create_model("vit_digits", depth=1, backend="triton").to(device)
    x = torch.randn(2, 1, 8, 8, device=device)
    assert_compiled_matches_eager(model, x)


def test_grad_checkpointing_gives_the_same_gradients(device):
    torch.manual_seed(0)
    model = create_model("vit_digits", depth=2, backend="triton").to(device)
    x = torch.randn(2, 1, 8, 8, device=device)
    model(x).sum().backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


def test_compiled_model_does_not_recompile_for_a_new_batch_size(device):
    torch._dynamo.reset()
    model = create_model("vit_digits", depth=1, backend="triton").to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=None)
    from torch._dynamo.utils import counters

    counters.clear()
    for b in (2, 3, 5):
        x = torch.randn(b, 1, 8, 8, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
