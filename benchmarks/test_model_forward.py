"""End-to-end inference forward: FastViT against the eager reference ViT (timm's computation, SDPA attention).

CPU (no GPU): ``vit_digits`` at batch 256 — FastViT takes its CPU path (the reference ops), so this measures the
package's dispatch overhead against plain eager, labelled "CPU smoke". GPU: ViT-B/16 at 224 px in bf16, batch 64,
where FastViT runs its Triton kernels. Each result's ``extra_info`` carries images/s.
Run: ``pytest benchmarks/ --benchmark-only``.
"""

import pytest
import torch

from bench_utils import DEVICE, HAS_GPU, requires_gpu, synchronize
from fastvit_kernels import create_model
from fastvit_kernels.configs import get_config
from fastvit_kernels.reference import VisionTransformer


def _models(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    fast = create_model(name).to(DEVICE, dtype).eval()
    ref = VisionTransformer(**get_config(name)).to(DEVICE, dtype).eval()
    ref.load_state_dict(fast.state_dict())
    return {"fastvit": fast, "eager_sdpa": ref}


def _bench(benchmark, model, images):
    def step():
        with torch.no_grad():
            model(images)
        synchronize()

    step()  # warm-up (kernel compilation / autotuning excluded from the timed rounds)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = images.shape[0] / benchmark.stats["mean"]
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_GPU else "cpu"


@pytest.mark.parametrize("impl", ["fastvit", "eager_sdpa"])
def test_cpu_smoke_forward(benchmark, impl):
    benchmark.group = "CPU smoke: vit_digits forward, batch 256, fp32"
    cfg = get_config("vit_digits")
    model = _models("vit_digits", torch.float32)[impl].cpu()
    images = torch.randn(256, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    _bench(benchmark, model, images)


@requires_gpu
@pytest.mark.parametrize("impl", ["fastvit", "eager_sdpa"])
def test_vit_base_forward_bf16(benchmark, impl):
    benchmark.group = "ViT-B/16 224px forward, batch 64, bf16"
    model = _models("vit_base_patch16_224", torch.bfloat16)[impl]
    images = torch.randn(64, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16)
    _bench(benchmark, model, images)
