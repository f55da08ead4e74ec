"""patch_embed on the Triton path against the fp32 eager reference (Conv2d, flatten, transpose, cat, add)."""

import pytest
import torch

from fastvit_kernels.ops import patch_embed
from fastvit_kernels.reference import patch_embed_ref
from helpers import DTYPES_INTERPRETER, assert_fwd_bwd_match, fwd_bwd

NAMES = ["images", "weight", "bias", "pos_embed", "cls_token"]


def make_inputs(B, C, H, W, P, D, device, cls=True, bias=True):
    n = (H // P) * (W // P)
    return [
        torch.randn(B, C, H, W, device=device),
        torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5,
        0.1 * torch.randn(D, device=device) if bias else None,
        0.5 * torch.randn(1, n + int(cls), D, device=device),
        torch.randn(1, 1, D, device=device) if cls else None,
    ]


def triton_op(*args):
    return patch_embed(*args, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize(
    "B,C,H,W,P,D,cls",
    [
        (1, 3, 16, 16, 16, 48, True),  # N = 1 patch
        (2, 3, 32, 48, 16, 80, True),  # non-square image, 6 patches
        (2, 1, 8, 8, 2, 64, True),  # digits: 16 patches, 17 tokens
        (1, 3, 28, 28, 14, 96, False),  # patch 14 (ViT-H), no class token
        (2, 3, 20, 12, 4, 40, True),  # 15 patches, D not a power of two
    ],
)
def test_matches_reference(B, C, H, W, P, D, cls, dtype, device):
    inputs = make_inputs(B, C, H, W, P, D, device, cls)
    assert_fwd_bwd_match(triton_op, patch_embed_ref, inputs, dtype, NAMES)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_channels_last_equals_nchw(dtype, device):
    inputs = make_inputs(2, 3, 32, 32, 8, 48, device)
    g = torch.randn(2, 17, 48, device=device)
    out, grads = fwd_bwd(triton_op, inputs, g, dtype)
    cl = [t.to(memory_format=torch.channels_last) if t.dim() == 4 and t.shape[1] == 3 else t for t in inputs]
    assert cl[0].stride() != inputs[0].stride()
    # fwd_bwd clones, which keeps the channels_last strides
    out_cl, grads_cl = fwd_bwd(triton_op, cl, g, dtype)
    torch.testing.assert_close(out_cl, out, atol=0, rtol=0)
    for n, a, b in zip(NAMES, grads_cl, grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{n}: {m}")


def test_no_bias_and_frozen_images(device):
    inputs = make_inputs(2, 3, 16, 24, 8, 32, device, bias=False)
    assert_fwd_bwd_match(triton_op, patch_embed_ref, inputs, torch.float32, NAMES)
    images = inputs[0]  # does not require grad: the image-gradient GEMM must not run, grads still right
    w = inputs[1].clone().requires_grad_()
    out = patch_embed(images, w, None, inputs[3], inputs[4], backend="triton")
    out.sum().backward()
    w_ref = inputs[1].clone().requires_grad_()
    patch_embed_ref(images, w_ref, None, inputs[3], inputs[4]).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=2e-5, rtol=2e-4)


def test_deterministic(device):
    inputs = make_inputs(2, 3, 32, 32, 8, 48, device)
    g = torch.randn(2, 17, 48, device=device)
    out1, g1 = fwd_bwd(triton_op, inputs, g)
    out2, g2 = fwd_bwd(triton_op, inputs, g)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_inputs_raise_before_launch(device):
    images, w, b, pos, cls = make_inputs(1, 3, 32, 32, 16, 48, device)
    with pytest.raises(ValueError, match=r"positive multiples of the patch size P=16; got 30x32"):
        patch_embed(images[..., :30, :], w, b, pos, cls, backend="triton")
    with pytest.raises(ValueError, match=r"images must be \(B, C=3, H, W\)"):
        patch_embed(images[:, :2], w, b, pos, cls, backend="triton")
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 1 \+ N=4, D=48\)"):
        patch_embed(images, w, b, pos[:, 1:], cls, backend="triton")
    with pytest.raises(ValueError, match=r"cls_token must have shape \(1, 1, D=48\)"):
        patch_embed(images, w, b, pos, cls[..., :5], backend="triton")
    with pytest.raises(ValueError, match="images has dtype torch.float16|weight has dtype"):
        patch_embed(images.half(), w, b, pos, cls, backend="triton")
    with pytest.raises(ValueError, match=r"weight must be \(D, C, P, P\)"):
        patch_embed(images, w[..., :8], b, pos, cls, backend="triton")


def test_opcheck(device):
    from fastvit_kernels.ops.patch_embed import _patch_embed_fwd

    images, w, b, pos, cls = make_inputs(1, 2, 8, 8, 4, 16, device)
    args = tuple(t.requires_grad_() for t in (images, w, b, pos, cls))
    torch.library.opcheck(_patch_embed_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
