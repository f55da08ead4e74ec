"""Native-resolution (NaFlex) building blocks: variable-length attention and MAE-style patch embedding.

* Attention, forward + backward, at mixed sequence lengths (64..1024 patches, ViT-B heads: D 768, 12 heads of 64):
  fastvit's packed varlen attention (``ops.attention(qkv (T, 3D), cu_seqlens=...)``) against timm NaFlexVit's
  form (the batch padded to its longest, ``F.scaled_dot_product_attention`` with the additive float [B, 1, N, N]
  mask, which selects PyTorch's memory-efficient backend; the mask is built once per step outside the timed
  call, as timm builds it once per forward) and a per-image loop of unmasked SDPA calls.
* Patch embedding at MAE's 25 % keep ratio: ``ops.patch_embed_tokens`` with ``ids_keep`` (only the kept patches
  are embedded) against timm's order (the Linear over every patch, then a gather of the kept rows), forward +
  backward (weight gradient).

Every case counts the same useful work (the real tokens' model FLOPs), so TFLOP/s compares useful throughput;
tokens/s counts real tokens. CPU (no GPU): small shapes on the eager paths ("CPU smoke", not the Triton kernels).
"""

import pytest
import torch
import torch.nn.functional as F

from bench_utils import DEVICE, record, requires_gpu, timed
from fastvit_kernels import ops
from fastvit_kernels.bench.naflex_cost import default_seq_lens

ATTN_IMPLS = ["fastvit_varlen", "sdpa_float_mask", "per_image_loop"]
EMBED_IMPLS = ["fastvit_kept", "embed_all_gather"]
GPU_LENS = default_seq_lens()[:16]  # 16 images, 64..1024 patches
CPU_LENS = [5, 17, 9]


def _attention_inputs(lens, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    T = sum(lens)
    qkv = torch.randn(T, 3 * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return qkv, cu


def attention_case(impl: str, lens, D: int, H: int, device: str, dtype: torch.dtype, backend=None):
    """A zero-argument callable running one forward + backward of ``impl`` over sequences of ``lens`` tokens
    (qkv (T, 3D) packed; the padded impl scatters it into (B, N_max, 3D) once, outside the callable), the loss the
    sum of the real tokens' outputs. ``run.grad()`` returns the packed (T, 3D) gradient after a call."""
    qkv, cu = _attention_inputs(lens, D, device, dtype)
    hd, B, N = D // H, len(lens), max(lens)
    if impl == "fastvit_varlen":
        def run():
            out = ops.attention(qkv, H, cu_seqlens=cu, backend=backend)
            out.backward(torch.ones_like(out))
        run.grad = lambda: qkv.grad
        return run
    if impl == "sdpa_float_mask":
        valid = torch.arange(N, device=device)[None] < torch.tensor(lens, device=device)[:, None]
        padded = torch.zeros(B, N, 3 * D, device=device, dtype=dtype)
        padded[valid] = qkv.detach()
        padded.requires_grad_()
        both = valid[:, :, None] & valid[:, None, :]
        mask = torch.zeros(B, 1, N, N, device=device, dtype=dtype).masked_fill_(~both[:, None], torch.finfo(dtype).min)
        dout = valid[:, None, :, None].expand(B, H, N, hd).to(dtype)  # padding rows do not reach the loss

        def run():
            q, k, v = padded.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(dout)
        run.grad = lambda: padded.grad[valid]
        return run
    if impl == "per_image_loop":
        bounds = cu.tolist()

        def run():
            outs = []
            for a, b in zip(bounds, bounds[1:]):
                q, k, v = qkv[a:b].view(1, b - a, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
                outs.append(F.scaled_dot_product_attention(q, k, v))
            torch.cat([o.reshape(-1) for o in outs]).sum().backward()
        run.grad = lambda: qkv.grad
        return run
    raise ValueError(f"impl must be one of {ATTN_IMPLS}; got {impl!r}")


def embed_case(impl: str, lens, K: int, D: int, keep: float, device: str, dtype: torch.dtype, backend=None):
    """A zero-argument callable: one patch-embedding forward + backward (weight gradient) of a padded batch of
    ``lens`` patches, keeping ``keep`` of each image's slots (timm PatchDropout's rule: int(N * keep) per image).
    ``run.grad()`` returns the weight gradient after a call."""
    g = torch.Generator().manual_seed(0)
    B, N = len(lens), max(lens)
    n_keep = max(1, int(N * keep))
    patches = torch.randn(B, N, K, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(D, K, generator=g) * K ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    ids_keep = torch.argsort(torch.rand(B, N, generator=g), dim=1)[:, :n_keep].sort(1).values.to(device)
    if impl == "fastvit_kept":
        def run():
            out = ops.patch_embed_tokens(patches, weight, bias, ids_keep=ids_keep, backend=backend)
            out.backward(torch.ones_like(out))
        run.grad = lambda: weight.grad
        return run
    if impl == "embed_all_gather":
        def run():
            out = F.linear(patches, weight, bias).gather(1, ids_keep[..., None].expand(-1, -1, D))
            out.backward(torch.ones_like(out))
        run.grad = lambda: weight.grad
        return run
    raise ValueError(f"impl must be one of {EMBED_IMPLS}; got {impl!r}")


def _attention_flops(lens, D):
    return 3 * sum(4 * n * n * D for n in lens)  # forward + backward (2x) model FLOPs of the real tokens


@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_cpu_smoke_attention_mixed_lengths(benchmark, impl):
    benchmark.group = f"CPU smoke: attention fwd + bwd, lengths {CPU_LENS}, D 64, 2 heads, fp32"
    fn = attention_case(impl, CPU_LENS, 64, 2, "cpu", torch.float32, backend="torch")
    first = timed(benchmark, fn, rounds=3, warmup_rounds=0)
    record(benchmark, impl=impl, tokens=sum(CPU_LENS), dtype=torch.float32, first_call_s=first,
           flops=_attention_flops(CPU_LENS, 64))


@pytest.mark.parametrize("impl", EMBED_IMPLS)
def test_cpu_smoke_mae_patch_embed(benchmark, impl):
    benchmark.group = "CPU smoke: MAE 25% keep patch embedding fwd + bwd, K 48, D 32, fp32"
    fn = embed_case(impl, CPU_LENS, 48, 32, 0.25, "cpu", torch.float32, backend="torch")
    first = timed(benchmark, fn, rounds=3, warmup_rounds=0)
    kept = len(CPU_LENS) * max(1, int(max(CPU_LENS) * 0.25))
    record(benchmark, impl=impl, tokens=kept, dtype=torch.float32, first_call_s=first, flops=2 * 2 * kept * 48 * 32)


def test_cpu_smoke_cases_agree():
    """The three attention forms give the same gradient of the real tokens (the timings compare like with like);
    so do the two MAE embedding forms (weight gradient)."""
    grads = []
    for impl in ATTN_IMPLS:
        fn = attention_case(impl, CPU_LENS, 64, 2, "cpu", torch.float32, backend="torch")
        fn()
        grads.append(fn.grad())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-5)
    wgrads = []
    for impl in EMBED_IMPLS:
        fn = embed_case(impl, CPU_LENS, 48, 32, 0.25, "cpu", torch.float32, backend="torch")
        fn()
        wgrads.append(fn.grad())
    torch.testing.assert_close(wgrads[0], wgrads[1], rtol=1e-5, atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_attention_mixed_lengths(benchmark, impl):
    D, H = 768, 12
    benchmark.group = f"attention fwd + bwd, {len(GPU_LENS)} images of 64..1024 tokens, ViT-B heads, bf16"
    fn = attention_case(impl, GPU_LENS, D, H, DEVICE, torch.bfloat16)
    first = timed(benchmark, fn, rounds=10, warmup_rounds=2)
    record(benchmark, impl=impl, tokens=sum(GPU_LENS), dtype=torch.bfloat16, first_call_s=first,
           flops=_attention_flops(GPU_LENS, D))


@requires_gpu
@pytest.mark.parametrize("impl", EMBED_IMPLS)
def test_mae_patch_embed(benchmark, impl):
    K, D = 3 * 16 * 16, 768
    benchmark.group = f"MAE 25% keep patch embedding fwd + bwd, {len(GPU_LENS)} images padded to 1024, bf16"
    fn = embed_case(impl, GPU_LENS, K, D, 0.25, DEVICE, torch.bfloat16)
    first = timed(benchmark, fn, rounds=10, warmup_rounds=2)
    kept = len(GPU_LENS) * max(1, int(max(GPU_LENS) * 0.25))
    record(benchmark, impl=impl, tokens=kept, dtype=torch.bfloat16, first_call_s=first, flops=2 * 2 * kept * K * D)

