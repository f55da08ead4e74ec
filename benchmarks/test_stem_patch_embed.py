"""The ViT stem: fused ``ops.patch_embed`` (patch GEMM + bias + class token + position add) against timm's eager
path (Conv2d, flatten, transpose, cat, add = :func:`fastvit_kernels.reference.patch_embed_ref`, the tests' spec)
and ``torch.compile`` of that eager path.

GPU groups (bf16, batch 64): ViT-B/16, L/16, H/14 at 224 and 384 px, forward and forward + backward (gradients of
weight, bias, pos_embed and cls_token; the images need none, as in training), plus a uint8-input group at B/16
224 px (the loader's raw batch normalised in the GEMM's load vs normalise-then-embed). Each result's
``extra_info`` carries TFLOP/s from the exact GEMM FLOP count (forward 2 * B * N * D * C * P^2; backward adds the
weight-gradient GEMM of the same size) and GB/s from the compulsory bytes (images, parameters, tokens; read once
/ written once), both divided by the measured mean time.

CPU smoke (no GPU): a small stem through the op's eager CPU path (input checks + dispatch + reference) against
the bare reference; it times the eager path, not the Triton kernels.

Run: ``pytest benchmarks/test_stem_patch_embed.py --benchmark-only`` (compile and autotuning are excluded from the
timed rounds by a warm-up call).
"""

import pytest
import torch

from bench_utils import DEVICE, HAS_GPU, requires_gpu, synchronize
from fastvit_kernels.ops import patch_embed
from fastvit_kernels.reference import patch_embed_ref

MODELS = {"B/16": (768, 16), "L/16": (1024, 16), "H/14": (1280, 14)}  # embed_dim D, patch P
IMPLS = ("fastvit", "eager", "compiled")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_COMPILED = {}


def _inputs(B, img, D, P, dtype, device, C=3, uint8=False):
    n = (img // P) ** 2
    if uint8:
        images = torch.randint(0, 256, (B, C, img, img), dtype=torch.uint8, device=device)
    else:
        images = torch.randn(B, C, img, img, device=device, dtype=dtype)
    params = [
        (torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5).to(dtype),
        torch.zeros(D, device=device, dtype=dtype),
        (0.02 * torch.randn(1, n + 1, D, device=device)).to(dtype),
        (1e-6 * torch.randn(1, 1, D, device=device)).to(dtype),
    ]
    return images, [p.requires_grad_() for p in params]


def _eager_uint8(images, weight, bias, pos, cls):
    """What the eager pipeline does with a raw uint8 batch: normalise (ToTensor + Normalize) then embed."""
    return patch_embed_ref(images, weight, bias, pos, cls, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _fn(impl: str, uint8: bool):
    eager = _eager_uint8 if uint8 else patch_embed_ref
    if impl == "eager":
        return eager
    if impl == "compiled":
        return _COMPILED.setdefault(uint8, torch.compile(eager))
    if uint8:
        return lambda *a: patch_embed(*a, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return patch_embed


def _bench(benchmark, fn, images, params, backward: bool, flops: int, nbytes: int, rounds: int = 20):
    grad_out = None

    def step():
        nonlocal grad_out
        if backward:
            out = fn(images, *params)
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.grad(out, params, grad_out)  # no .grad accumulation inside the timed step
        else:
            with torch.no_grad():
                fn(images, *params)
        synchronize()

    step()  # warm-up: Triton JIT / torch.compile / autotuning excluded from the timed rounds
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    if not benchmark.stats:  # --benchmark-disable: ran once, nothing timed
        return
    mean = benchmark.stats["mean"]
    benchmark.extra_info["tflops"] = flops / mean / 1e12
    benchmark.extra_info["gbps"] = nbytes / mean / 1e9
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_GPU else "cpu"


def _counts(B, img, D, P, elem, img_elem, backward: bool, C=3) -> tuple[int, int]:
    """(FLOPs, compulsory bytes) of one timed step (see the module docstring)."""
    n = (img // P) ** 2
    gemm = 2 * B * n * D * C * P * P
    images = B * C * img * img * img_elem
    params = (D * C * P * P + D + (n + 1) * D + D) * elem
    tokens = B * (n + 1) * D * elem
    if not backward:
        return gemm, images + params + tokens
    # backward: read d(tokens) and the images again, write the parameter gradients
    return 2 * gemm, 2 * images + 2 * params + 2 * tokens


@requires_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("img", [224, 384])
@pytest.mark.parametrize("model", list(MODELS))
def test_stem_bf16(benchmark, model, img, mode, impl):
    D, P = MODELS[model]
    B = 64
    benchmark.group = f"stem ViT-{model} {img}px {mode}, batch {B}, bf16"
    images, params = _inputs(B, img, D, P, torch.bfloat16, DEVICE)
    backward = mode == "fwd_bwd"
    flops, nbytes = _counts(B, img, D, P, 2, 2, backward)
    _bench(benchmark, _fn(impl, False), images, params, backward, flops, nbytes)


@requires_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_stem_uint8_input(benchmark, mode, impl):
    D, P = MODELS["B/16"]
    B, img = 64, 224
    benchmark.group = f"stem ViT-B/16 {img}px {mode}, uint8 images + ImageNet mean/std, batch {B}, bf16 weights"
    images, params = _inputs(B, img, D, P, torch.bfloat16, DEVICE, uint8=True)
    backward = mode == "fwd_bwd"
    flops, nbytes = _counts(B, img, D, P, 2, 1, backward)
    _bench(benchmark, _fn(impl, True), images, params, backward, flops, nbytes)


@pytest.mark.parametrize("impl", ["fastvit_op_cpu_path", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_cpu_smoke_stem(benchmark, mode, impl):
    B, img, D, P = 32, 32, 64, 4
    benchmark.group = f"CPU smoke: stem {img}px patch {P} D={D} {mode}, batch {B}, fp32 (eager path, not the kernels)"
    images, params = _inputs(B, img, D, P, torch.float32, "cpu")
    fn = patch_embed_ref if impl == "eager" else (lambda *a: patch_embed(*a, backend="torch"))
    backward = mode == "fwd_bwd"
    flops, nbytes = _counts(B, img, D, P, 4, 4, backward)
    _bench(benchmark, fn, images, params, backward, flops, nbytes, rounds=10)
