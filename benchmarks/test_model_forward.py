"""End-to-end inference forward: FastViT against the eager reference ViT (timm's computation) with SDPA attention,
with naive softmax attention, and torch.compile of the SDPA one.

CPU (no GPU): ``vit_digits`` at batch 64 in fp32, labelled "CPU smoke" -- FastViT takes its CPU path (the
reference ops), so this measures the package's dispatch overhead against plain eager, not the kernels.
GPU: ViT-B/16, ViT-L/16 and ViT-H/14 at 224 px, bf16 autocast and pure bf16, batch per model from
``bench_utils.E2E_BATCH``. Each result's ``extra_info`` carries images/s, TFLOP/s and MFU from the exact FLOP
count (2 per multiply-add, attention matmuls included; ViT-B/16: 35.1 GFLOP per image).
Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json results.json``, then
``python -m fastvit_kernels.bench report results.json``).
"""

import contextlib

import pytest
import torch

from bench_utils import E2E_BATCH, e2e_case, e2e_gpu_cases, record, timed
from fastvit_kernels.bench.flops import ViTShape, model_flops
from fastvit_kernels.configs import training_config


def _forward(model, images, autocast: bool):
    def run():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            model(images)
    return run


@pytest.mark.parametrize("impl", ["fastvit", "eager_sdpa", "eager_naive"])
def test_cpu_smoke_forward(benchmark, impl):
    benchmark.group = "CPU smoke: vit_digits forward, batch 64, fp32"
    model, images, autocast = e2e_case("vit_digits", impl, "fp32", 64, device="cpu")
    first = timed(benchmark, _forward(model.eval(), images, autocast), rounds=5, warmup_rounds=0)
    record(benchmark, impl=impl, images=64, dtype=torch.float32, first_call_s=first,
           flops=model_flops(ViTShape.from_config("vit_digits"), 64, "forward"))


@e2e_gpu_cases
def test_e2e_forward(benchmark, name, precision, impl):
    batch = E2E_BATCH[name]
    benchmark.group = f"{name} forward, batch {batch}, {precision}"
    model, images, autocast = e2e_case(name, impl, precision, batch)
    first = timed(benchmark, _forward(model.eval(), images, autocast), rounds=10)
    record(benchmark, impl=impl, images=batch, dtype=torch.bfloat16, first_call_s=first,
           flops=model_flops(ViTShape.from_config(training_config(name)), batch, "forward"))
