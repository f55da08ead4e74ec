"""Shared benchmark helpers. On a machine without a GPU the suite runs small CPU smoke configurations (their group names
say "CPU smoke": the numbers time the eager reference path, not the Triton kernels); GPU cases skip with a reason.

Every result's ``extra_info`` carries ``impl``, ``device``, images/s (or tokens/s), achieved TFLOP/s from the exact
FLOP counts of :mod:`fastvit_kernels.bench.flops` and MFU where the device's peak is known
(:mod:`fastvit_kernels.bench.devices`); GPU results also carry the first call's time (warm-up, compilation and
autotuning, excluded from the timed rounds) and the peak memory. ``python -m fastvit_kernels.bench report
results.json`` turns ``--benchmark-json`` output into a table (with FastViT's speed-up over each baseline) and a
bar chart.
"""

import time

import pytest
import torch

from fastvit_kernels import FastViT
from fastvit_kernels.bench.devices import device_name, resolve_peak
from fastvit_kernels.configs import get_config, training_config
from fastvit_kernels.reference import VisionTransformer

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (timings of the Triton kernels)")

# end-to-end implementations: FastViT; the reference ViT (timm's computation) with SDPA attention (timm's
# default) or naive softmax attention; torch.compile of the SDPA one (default mode)
E2E_IMPLS = ["fastvit", "eager_sdpa", "eager_naive", "compiled"]
# precision modes: bf16 autocast over fp32 parameters, or parameters and activations in bf16
PRECISIONS = ["bf16_autocast", "bf16"]
# a batch per model meant to fill an 80 GB GPU in training (not yet validated on one)
E2E_BATCH = {"vit_base_patch16_224": 256, "vit_large_patch16_224": 128, "vit_huge_patch14_224": 64}


def synchronize() -> None:
    """Wait for queued GPU work so a timed round measures it (no-op on the CPU)."""
    if HAS_GPU:
        torch.cuda.synchronize()


def build_model(name: str, impl: str, param_dtype: torch.dtype = torch.float32, device: str = DEVICE,
                **overrides) -> torch.nn.Module:
    """The model ``impl`` (one of :data:`E2E_IMPLS`) of config ``name`` with a head (``configs.training_config``:
    the cross-entropy step needs logits, also where the named model has none), same weights for every impl (seed 0).

    On a CPU, FastViT is asked for its torch backend explicitly, so CPU smoke numbers never come from the Triton
    interpreter (which ``tests/conftest.py`` may have switched on in the same process).
    """
    torch.manual_seed(0)
    cfg = {**training_config(name), **overrides}
    if impl == "fastvit":
        model = FastViT(**cfg, backend=None if device == "cuda" else "torch")
    elif impl in ("eager_sdpa", "compiled"):
        model = VisionTransformer(**cfg, fused_attn=True)
    elif impl == "eager_naive":
        model = VisionTransformer(**cfg, fused_attn=False)
    else:
        raise ValueError(f"impl must be one of {E2E_IMPLS}; got {impl!r}")
    model = model.to(device=device, dtype=param_dtype)
    return torch.compile(model) if impl == "compiled" else model


def e2e_gpu_cases(fn):
    """Decorator: the GPU end-to-end matrix, every model of :data:`E2E_BATCH` x :data:`PRECISIONS` x
    :data:`E2E_IMPLS` (arguments ``name``, ``precision``, ``impl``); skipped without a GPU."""
    fn = pytest.mark.parametrize("name", list(E2E_BATCH))(fn)
    fn = pytest.mark.parametrize("precision", PRECISIONS)(fn)
    return requires_gpu(pytest.mark.parametrize("impl", E2E_IMPLS)(fn))


def e2e_case(name: str, impl: str, precision: str, batch: int, device: str = DEVICE):
    """(model, images, autocast) of one end-to-end case: :func:`build_model` of config ``name`` (in training mode)
    and ``batch`` random images of its size. ``precision``: "fp32" (parameters and images fp32), "bf16_autocast"
    (fp32 ones, run under bf16 autocast: ``autocast`` True) or "bf16" (both bf16)."""
    autocast = precision == "bf16_autocast"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model(name, impl, dtype, device=device)
    cfg = get_config(name)
    images = torch.randn(batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], device=device, dtype=dtype)
    return model, images, autocast


def timed(benchmark, fn, rounds: int, warmup_rounds: int = 1) -> float:
    """Call ``fn`` once untimed (compilation / autotuning), then time ``rounds`` synchronised rounds; returns the
    first call's seconds (recorded separately in ``extra_info``)."""
    def run():
        fn()
        synchronize()

    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return first


def record(benchmark, *, impl: str, flops: float, dtype: torch.dtype, images: int | None = None,
           tokens: int | None = None, first_call_s: float | None = None) -> None:
    """Store the physical units of one result in ``benchmark.extra_info``: ``impl``, ``device``, ``flops`` (per
    round), and from the mean round time: ``images_per_s`` / ``tokens_per_s``, ``tflops``, ``mfu`` (when the
    device's peak for ``dtype`` is known); ``first_call_s`` and ``peak_memory_gb`` on a GPU. Under
    ``--benchmark-disable`` (no timings) only the static fields are stored."""
    info = benchmark.extra_info
    info.update(impl=impl, device=device_name(DEVICE), flops=float(flops), dtype=str(dtype).replace("torch.", ""))
    if first_call_s is not None:
        info["first_call_s"] = first_call_s
    if HAS_GPU:
        info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    mean = benchmark.stats["mean"]
    if images is not None:
        info["images_per_s"] = images / mean
    if tokens is not None:
        info["tokens_per_s"] = tokens / mean
    info["tflops"] = flops / mean / 1e12
    peak = resolve_peak(DEVICE, dtype).flops_per_s
    if peak is not None:
        info["mfu"] = flops / mean / peak
