"""Per-op benchmarks: patch_embed, attention and layernorm_mlp, forward and forward + backward, FastViT's op against
its eager baselines, at the ViT-B/L/H shapes (GPU, bf16) and at small shapes on a CPU ("CPU smoke": both sides run
eager PyTorch there, so only the harness is exercised).

Shapes: attention (B, H, N, head_dim) in (256, 12, 197, 64), (128, 16, 197, 64), (64, 16, 257, 80),
(16, 16, 1025, 80); layernorm_mlp (tokens M = B * N, D, D_hidden) of ViT-B/16 (batch 256), L/16 (128), H/14 (64);
patch_embed the stems of the same three. layernorm_mlp also runs with recompute=True, with every GEMM forced onto
cuBLAS + fused elementwise kernels (the measured alternative of ``gemm_impl``), on the pointer form of the GEMM core
(the Hopper default being the TMA form), and as torch.compile of the eager function; attention also with its
three-launch backward forced (the default at these batch sizes being the one-program-per-head backward);
``peak_memory_gb`` per result on a GPU. ``extra_info``: tokens/s (images/s for patch_embed), TFLOP/s and MFU from
exact FLOP counts (forward + backward: 3x the forward's matmuls; patch_embed 2x: no image gradient).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from bench_utils import DEVICE, record, requires_gpu, timed
from fastvit_kernels import ops, reference
from fastvit_kernels.backend import use_gemm_impl, use_gemm_kernel, use_gemm_pairs
from fastvit_kernels.ops.attention import attention_flops
from fastvit_kernels.ops.layernorm_mlp import mlp_flops
from fastvit_kernels.ops.patch_embed import patch_embed_flops

ATTENTION_SHAPES = [(256, 12, 197, 64), (128, 16, 197, 64), (64, 16, 257, 80), (16, 16, 1025, 80)]
MLP_SHAPES = [(256 * 197, 768, 3072), (128 * 197, 1024, 4096), (64 * 257, 1280, 5120)]
STEM_SHAPES = [(256, 16, 768), (128, 16, 1024), (64, 14, 1280)]  # (batch, patch, D) at 224 px, 3 channels


def _sdpa(qkv, num_heads):
    """timm's fused path: split the packed qkv, F.scaled_dot_product_attention, back to (B, N, D)."""
    B, N, three_d = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, three_d // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, three_d // 3)


def _runner(fn, inputs, backward: bool):
    """A round: fn(*inputs), plus a backward of a fixed random cotangent when ``backward``."""
    if not backward:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.no_grad():
        grad = torch.randn_like(fn(*inputs))

    def run():
        for t in leaves:
            if isinstance(t, torch.Tensor):
                t.grad = None
        fn(*leaves).backward(grad)
    return run


def _attention_impls(num_heads, backend):
    """fastvit: the op (backward plan by its rule: fused at B * H >= FUSED_BWD_MIN_HEADS); fastvit_split_bwd: the
    three-launch backward forced (set only while the round runs, so both plans are timed at the same shapes)."""
    return {"fastvit": lambda qkv: ops.attention(qkv, num_heads, backend=backend),
            "fastvit_split_bwd": lambda qkv: ops.attention(qkv, num_heads, backend=backend),
            "eager_sdpa": lambda qkv: _sdpa(qkv, num_heads),
            "eager_naive": lambda qkv: reference.attention_ref(qkv, num_heads)}


@contextlib.contextmanager
def _attention_plan(impl):
    from fastvit_kernels.kernels import attention as kernels

    old = kernels.FUSED_BWD_MIN_HEADS
    if impl == "fastvit_split_bwd":
        kernels.FUSED_BWD_MIN_HEADS = 1 << 30
    try:
        yield
    finally:
        kernels.FUSED_BWD_MIN_HEADS = old


def _bench_attention(benchmark, shape, impl, backward, dtype, device, backend, rounds, warmup=1):
    B, H, N, hd = shape
    qkv = torch.randn(B, N, 3 * H * hd, device=device, dtype=dtype)
    fn = _attention_impls(H, backend)[impl]
    with _attention_plan(impl):
        first = timed(benchmark, _runner(fn, [qkv], backward), rounds=rounds, warmup_rounds=warmup)
    f = attention_flops(B, N, H, hd)
    record(benchmark, impl=impl, tokens=B * N, dtype=dtype, first_call_s=first, flops=3 * f if backward else f)


def _mlp_inputs(M, D, Dh, dtype, device):
    g = lambda *s, std=1.0: torch.randn(*s, device=device, dtype=dtype) * std  # noqa: E731
    return [g(M, D), 1 + g(D, std=0.1), g(D, std=0.1), g(Dh, D, std=D ** -0.5), g(Dh, std=0.1),
            g(D, Dh, std=Dh ** -0.5), g(D, std=0.1)]


_COMPILED_MLP = []


def _mlp_fn(impl, backend):
    """fastvit: the op with the recorded GEMM-path rule (gemm_impl "auto"); fastvit_recompute: recompute=True;
    fastvit_cublas: every GEMM forced to cuBLAS + fused elementwise kernels; fastvit_pointer: every GEMM on the
    Triton core's pointer kernel (on Hopper "fastvit" takes the TMA persistent kernel: this times the other form);
    fastvit_unpaired: the backward's dgrad + wgrad GEMM pairs as two launches each (gemm_pairs "off");
    eager: LayerNorm, Linear, GELU, Linear, add; compiled: torch.compile (default mode) of that eager function."""
    if impl == "compiled":
        if not _COMPILED_MLP:
            _COMPILED_MLP.append(torch.compile(reference.layernorm_mlp_ref))
        return _COMPILED_MLP[0]
    if impl == "eager":
        return reference.layernorm_mlp_ref
    recompute = impl == "fastvit_recompute"

    def fn(*a):
        gemm_path = {"fastvit_cublas": "cublas", "fastvit_pointer": "triton"}.get(impl, "auto")
        with use_gemm_impl(gemm_path), use_gemm_kernel("pointer" if impl == "fastvit_pointer" else "auto"), \
                use_gemm_pairs("off" if impl == "fastvit_unpaired" else "auto"):
            return ops.layernorm_mlp(*a, recompute=recompute, backend=backend)
    return fn


def _bench_mlp(benchmark, shape, impl, backward, dtype, device, backend, rounds, warmup=1):
    M, D, Dh = shape
    run = _runner(_mlp_fn(impl, backend), _mlp_inputs(M, D, Dh, dtype, device), backward)
    first = timed(benchmark, run, rounds=rounds, warmup_rounds=warmup)
    f = mlp_flops(M, D, Dh)
    record(benchmark, impl=impl, tokens=M, dtype=dtype, first_call_s=first, flops=3 * f if backward else f)


def _bench_stem(benchmark, shape, impl, backward, dtype, device, backend, rounds, warmup=1, img=224, C=3):
    B, P, D = shape
    Np = (img // P) ** 2
    images = torch.randn(B, C, img, img, device=device, dtype=dtype)
    weight = torch.randn(D, C, P, P, device=device, dtype=dtype) * (C * P * P) ** -0.5
    bias, pos, cls = (torch.randn(*s, device=device, dtype=dtype) * 0.02 for s in ((D,), (1, 1 + Np, D), (1, 1, D)))
    fn = {"fastvit": lambda *a: ops.patch_embed(*a, backend=backend), "eager": reference.patch_embed_ref}[impl]
    run = _runner(lambda w, b, p, c: fn(images, w, b, p, c), [weight, bias, pos, cls], backward)
    first = timed(benchmark, run, rounds=rounds, warmup_rounds=warmup)
    f = patch_embed_flops(B, Np, D, C, P)
    record(benchmark, impl=impl, images=B, dtype=dtype, first_call_s=first, flops=2 * f if backward else f)


PASSES = [("forward", False), ("forward+backward", True)]


def gpu_cases(shapes: list, impls: list[str]):
    """The parametrization of one op's GPU benchmark: needs a GPU; every shape (id "a x b x ..."), pass and impl."""
    def mark(fn):
        fn = pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))(fn)
        fn = pytest.mark.parametrize("which, backward", PASSES)(fn)
        return requires_gpu(pytest.mark.parametrize("impl", impls)(fn))
    return mark


# ---------------------------------------------------------------------------------------------------------------
# GPU: the real shapes, bf16
# ---------------------------------------------------------------------------------------------------------------
@gpu_cases(ATTENTION_SHAPES, ["fastvit", "fastvit_split_bwd", "eager_sdpa", "eager_naive"])
def test_attention(benchmark, shape, which, backward, impl):
    benchmark.group = f"attention {shape} (B, H, N, head_dim) {which}, bf16"
    _bench_attention(benchmark, shape, impl, backward, torch.bfloat16, DEVICE, None, rounds=20)


@gpu_cases(MLP_SHAPES, ["fastvit", "fastvit_recompute", "fastvit_cublas", "fastvit_pointer", "fastvit_unpaired",
                        "eager", "compiled"])
def test_layernorm_mlp(benchmark, shape, which, backward, impl):
    benchmark.group = f"layernorm_mlp {shape} (M, D, D_hidden) {which}, bf16"
    _bench_mlp(benchmark, shape, impl, backward, torch.bfloat16, DEVICE, None, rounds=20)


@gpu_cases(STEM_SHAPES, ["fastvit", "eager"])
def test_patch_embed(benchmark, shape, which, backward, impl):
    benchmark.group = f"patch_embed {shape} (B, P, D) 224px {which}, bf16"
    _bench_stem(benchmark, shape, impl, backward, torch.bfloat16, DEVICE, None, rounds=20)


# ---------------------------------------------------------------------------------------------------------------
# CPU smoke: small shapes, fp32, both sides eager (FastViT's ops on backend="torch")
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fastvit", "eager_sdpa"])
def test_cpu_smoke_attention(benchmark, impl):
    benchmark.group = "CPU smoke: attention (4, 3, 65, 32) forward+backward, fp32"
    _bench_attention(benchmark, (4, 3, 65, 32), impl, True, torch.float32, "cpu", "torch", rounds=5, warmup=0)


@pytest.mark.parametrize("impl", ["fastvit", "eager"])
def test_cpu_smoke_layernorm_mlp(benchmark, impl):
    benchmark.group = "CPU smoke: layernorm_mlp (260, 96, 384) forward+backward, fp32"
    _bench_mlp(benchmark, (260, 96, 384), impl, True, torch.float32, "cpu", "torch", rounds=5, warmup=0)


@pytest.mark.parametrize("impl", ["fastvit", "eager"])
def test_cpu_smoke_patch_embed(benchmark, impl):
    benchmark.group = "CPU smoke: patch_embed (8, 4, 96) 32px forward+backward, fp32"
    _bench_stem(benchmark, (8, 4, 96), impl, True, torch.float32, "cpu", "torch", rounds=5, warmup=0, img=32)
