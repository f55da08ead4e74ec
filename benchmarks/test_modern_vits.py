"""Training step of the ViTs pretrained today (EVA-02-B/14, EVA-02-L/14, DINOv3-L/16: 2D RoPE, SwiGLU, LayerScale,
register tokens): ``FastEva`` against timm's own ``Eva`` eager (SDPA attention) and ``torch.compile`` of it.

Every implementation starts from the same timm model (``FastEva.from_timm``), so the weights are identical. The
step is forward, cross-entropy over a 1000-class head, backward and AdamW. FLOPs per step: 3x the forward's
matmul FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them on timm's model (attention included).

CPU (no GPU): a small EVA-02-style model at batch 8 in fp32 ("CPU smoke": FastEva on its eager CPU path, not the
Triton kernels). GPU: the three models at 224 px (DINOv3 at its 256 px), pure bf16 parameters and activations.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench_utils import DEVICE, HAS_GPU, record, requires_gpu, timed
from fastvit_kernels import FastEva

IMPLS = ["fastvit", "timm_eager", "timm_compiled"]
# (timm name, batch meant for an 80 GB GPU in training: not yet validated on one)
GPU_MODELS = {"eva02_base_patch14_224": 256, "eva02_large_patch14_224": 96, "vit_large_patch16_dinov3": 96}
# a small EVA-02-style model (SwiGLU with an inner MLP norm, axial RoPE, avg pool) for the CPU smoke case
SMALL_EVA = dict(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
                 swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="avg",
                 num_classes=1000)


def _timm_model(name: str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if name is None:
        from timm.models.eva import Eva

        model = Eva(**SMALL_EVA)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    return model.to(device=device, dtype=dtype).train()


def _build(impl: str, name: str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model = _timm_model(name, device, dtype)
    if impl == "fastvit":
        return FastEva.from_timm(model, backend=None if device == "cuda" else "torch")
    return torch.compile(model) if impl == "timm_compiled" else model


def _step_flops(name: str | None, img: int, device: str, dtype: torch.dtype) -> int:
    """3x the forward matmul FLOPs of one image (FlopCounterMode on timm's model), per image."""
    model = _timm_model(name, device, dtype).eval()
    x = torch.randn(1, 3, img, img, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops()


def _train_step(model, images, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


@pytest.mark.parametrize("impl", ["fastvit", "timm_eager"])
def test_cpu_smoke_eva_train_step(benchmark, impl):
    benchmark.group = "CPU smoke: small EVA-02-style training step, batch 8, fp32"
    batch, img = 8, SMALL_EVA["img_size"]
    model = _build(impl, None, "cpu", torch.float32)
    images = torch.randn(batch, 3, img, img)
    labels = torch.randint(0, 1000, (batch,))
    first = timed(benchmark, _train_step(model, images, labels), rounds=3, warmup_rounds=0)
    record(benchmark, impl=impl, images=batch, dtype=torch.float32, first_call_s=first,
           flops=batch * _step_flops(None, img, "cpu", torch.float32))


@requires_gpu
@pytest.mark.parametrize("name", list(GPU_MODELS))
@pytest.mark.parametrize("impl", IMPLS)
def test_modern_vit_train_step(benchmark, name, impl):
    batch = GPU_MODELS[name]
    benchmark.group = f"{name} training step, batch {batch}, bf16"
    model = _build(impl, name, DEVICE, torch.bfloat16)
    img = model.patch_embed.img_size[0] if impl != "timm_compiled" else model._orig_mod.patch_embed.img_size[0]
    images = torch.randn(batch, 3, img, img, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    first = timed(benchmark, _train_step(model, images, labels), rounds=10, warmup_rounds=2)
    record(benchmark, impl=impl, images=batch, dtype=torch.bfloat16, first_call_s=first,
           flops=batch * _step_flops(name, img, DEVICE, torch.bfloat16))

