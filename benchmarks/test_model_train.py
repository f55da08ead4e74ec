"""End-to-end training step (forward, cross-entropy, backward, AdamW step): FastViT against the eager reference ViT
with SDPA attention, with naive softmax attention, and torch.compile of the SDPA one.

CPU (no GPU): ``vit_digits`` at batch 32 in fp32, "CPU smoke" (FastViT on its CPU path). GPU: ViT-B/16, L/16,
H/14 at 224 px, bf16 autocast and pure bf16. ``extra_info``: images/s, TFLOP/s and MFU from the exact model
FLOPs of a training step (3x forward less the patch embedding's unneeded image gradient), the first step's time
(compilation / autotuning) and peak memory.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from bench_utils import DEVICE, E2E_BATCH, e2e_case, e2e_gpu_cases, record, timed
from fastvit_kernels.bench.flops import ViTShape, model_flops
from fastvit_kernels.train import param_groups
from fastvit_kernels.configs import get_config, training_config


def _train_step(model, images, labels, autocast: bool):
    opt = torch.optim.AdamW(param_groups(getattr(model, "_orig_mod", model), 0.05), lr=1e-4)

    def run():
        ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


@pytest.mark.parametrize("impl", ["fastvit", "eager_sdpa", "eager_naive"])
def test_cpu_smoke_train_step(benchmark, impl):
    benchmark.group = "CPU smoke: vit_digits training step, batch 32, fp32"
    model, images, autocast = e2e_case("vit_digits", impl, "fp32", 32, device="cpu")
    labels = torch.randint(0, get_config("vit_digits")["num_classes"], (32,))
    first = timed(benchmark, _train_step(model.train(), images, labels, autocast), rounds=5, warmup_rounds=0)
    record(benchmark, impl=impl, images=32, dtype=torch.float32, first_call_s=first,
           flops=model_flops(ViTShape.from_config("vit_digits"), 32, "train"))


@e2e_gpu_cases
def test_e2e_train_step(benchmark, name, precision, impl):
    batch = E2E_BATCH[name]
    benchmark.group = f"{name} training step, batch {batch}, {precision}"
    model, images, autocast = e2e_case(name, impl, precision, batch)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    first = timed(benchmark, _train_step(model.train(), images, labels, autocast), rounds=10, warmup_rounds=2)
    record(benchmark, impl=impl, images=batch, dtype=torch.bfloat16, first_call_s=first,
           flops=model_flops(ViTShape.from_config(training_config(name)), batch, "train"))
