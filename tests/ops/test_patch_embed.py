"""patch_embed on the Triton path against the fp32 eager reference (normalise, pad, Conv2d, flatten, transpose, cat,
add): outputs and every gradient, for timm's token layouts, padding, channels_last, uint8 + normalisation and mixed
image / weight dtypes."""

import pytest
import torch

from fastvit_kernels.ops import patch_embed
from fastvit_kernels.reference import patch_embed_ref
from helpers import (DTYPES_INTERPRETER, assert_close_to_ref, assert_fwd_bwd_deterministic, assert_fwd_bwd_match,
                     count_launches, fwd_bwd)

NAMES = ["images", "weight", "bias", "pos_embed", "cls_token", "reg_token"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*


def make_inputs(B, C, H, W, P, D, device, cls=True, reg=0, no_embed_class=False, bias=True):
    """[images, weight, bias, pos_embed, cls_token, reg_token] for a (B, C, H, W) image at patch P (H, W may
    be ragged: the grid is ceil(H / P) x ceil(W / P))."""
    n = -(-H // P) * -(-W // P)
    prefix = int(cls) + reg
    return [
        torch.randn(B, C, H, W, device=device),
        torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5,
        0.1 * torch.randn(D, device=device) if bias else None,
        0.5 * torch.randn(1, n + (0 if no_embed_class else prefix), D, device=device),
        torch.randn(1, 1, D, device=device) if cls else None,
        torch.randn(1, reg, D, device=device) if reg else None,
    ]


def triton_op(images, weight, bias, pos, cls, reg, **kwargs):
    return patch_embed(images, weight, bias, pos, cls, reg_token=reg, backend="triton", **kwargs)


def ref_op(images, weight, bias, pos, cls, reg, **kwargs):
    return patch_embed_ref(images, weight, bias, pos, cls, reg_token=reg, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize(
    "B,C,H,W,P,D,cls",
    [
        (1, 3, 16, 16, 16, 48, True),  # N = 1 patch, batch 1
        (2, 3, 32, 48, 16, 80, True),  # non-square image, 6 patches
        (2, 1, 8, 8, 2, 64, True),  # digits: 16 patches, 17 tokens
        (1, 3, 28, 28, 14, 96, False),  # patch 14 (ViT-H), no class token (global_pool='avg' models)
        (2, 3, 20, 12, 4, 40, True),  # 15 patches, D not a power of two
    ],
)
def test_matches_reference(B, C, H, W, P, D, cls, dtype, device):
    inputs = make_inputs(B, C, H, W, P, D, device, cls)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, dtype, NAMES)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("cls,reg,no_embed_class", [
    (True, 0, True),  # DeiT-3: pos_embed on the patches only, class token prepended after
    (True, 2, False),  # class + 2 registers, pos_embed on every row (timm's default with reg_tokens)
    (True, 4, True),  # DINOv2-style registers without position embedding
    (False, 2, False),  # registers only
    (False, 1, True),
    (False, 0, True),  # no prefix at all: no_embed_class changes nothing
])
def test_token_layouts(cls, reg, no_embed_class, dtype, device):
    inputs = make_inputs(2, 3, 16, 24, 8, 40, device, cls, reg, no_embed_class)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, dtype, NAMES, no_embed_class=no_embed_class)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("B,H,W,P,reg,no_embed_class", [
    (2, 9, 21, 4, 1, True),  # 3 x 6 grid, last row 1 pixel high, last column 1 pixel wide
    (1, 17, 15, 16, 0, False),  # W < P: one column; H = P + 1
    (1, 16, 20, 8, 2, False),  # only the width is ragged
])
def test_dynamic_img_pad(B, H, W, P, reg, no_embed_class, dtype, device):
    inputs = make_inputs(B, 3, H, W, P, 24, device, True, reg, no_embed_class)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, dtype, NAMES, no_embed_class=no_embed_class,
                         dynamic_img_pad=True)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("H,W,pad", [(32, 32, False), (30, 27, True)])
def test_channels_last_equals_nchw(H, W, pad, dtype, device):
    inputs = make_inputs(2, 3, H, W, 8, 48, device, reg=2)
    kw = dict(dynamic_img_pad=pad)
    out, grads = fwd_bwd(triton_op, inputs, None, dtype, **kw)
    cl = [inputs[0].to(memory_format=torch.channels_last)] + inputs[1:]
    assert cl[0].stride() != inputs[0].stride()
    out_cl, grads_cl = fwd_bwd(triton_op, cl, None, dtype, **kw)  # fwd_bwd clones: channels_last strides kept
    assert grads_cl[0].stride() == cl[0].stride()  # the image gradient comes back channels_last too
    torch.testing.assert_close(out_cl, out, atol=0, rtol=0)
    for n, a, b in zip(NAMES, grads_cl, grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{n}: {m}")


def _normalise(images_u8, mean, std):
    """What a data loader does before the model: ToTensor (/ 255) then Normalize(mean, std), in fp32."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images_u8.float() / 255 - m) / s


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("H,W,pad,channels_last", [(16, 24, False, False), (13, 21, True, True)])
def test_uint8_normalised_in_load_equals_normalise_then_embed(H, W, pad, channels_last, dtype, device):
    """uint8 images + mean / std (timm's [0, 1] units) == normalising in fp32 first, then embedding (padding, when
    needed, is zero in the normalised domain, as timm pads after the loader's normalisation)."""
    images = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, device=device)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    _, w, b, pos, cls, reg = make_inputs(2, 3, H, W, 8, 40, device, reg=1)
    normed = _normalise(images.cpu(), IMAGENET_MEAN, IMAGENET_STD).to(device)
    kw = dict(dynamic_img_pad=pad)

    def fused(w, b, pos, cls, reg):
        return triton_op(images, w, b, pos, cls, reg, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)

    def spec(w, b, pos, cls, reg):  # normalised fp32 images, rounded to the weights' dtype as the kernel's load
        return ref_op(normed.to(w.device, w.dtype), w, b, pos, cls, reg, **kw)

    out = assert_fwd_bwd_match(fused, spec, [w, b, pos, cls, reg], dtype, NAMES[1:])
    assert out.dtype == dtype
    # the eager path of the op (backend="torch") agrees, and so does the kernel fed the pre-normalised images
    with torch.no_grad():
        args = [t.to(dtype) for t in (w, b, pos, cls, reg)]
        eager = patch_embed(images.cpu(), *[t.cpu() for t in args[:4]], reg_token=args[4].cpu(), mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, backend="torch", **kw)
        assert_close_to_ref(eager, spec(*[t.float() for t in args]).cpu(), spec(*[t.cpu() for t in args]),
                            name="torch backend")
        pre = triton_op(normed.to(dtype), *args, **kw)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out, pre, **tol)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_float_images_normalised_in_load_with_image_grad(dtype, device):
    """Float images in [0, 1] + mean / std as tensors: the image gradient carries the 1 / std factor."""
    inputs = make_inputs(2, 3, 12, 20, 4, 32, device, reg=1)
    inputs[0] = torch.rand_like(inputs[0])
    mean = torch.tensor([0.5, 0.4, 0.3], device=device)
    std = torch.tensor([0.2, 0.3, 0.25], device=device)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, dtype, NAMES, mean=mean, std=std)


def test_images_dtype_differs_from_weights(device):
    """Images are converted to the weights' dtype on load: fp32 images + fp16 weights == fp16 images, bit for bit
    (output, parameter grads; the fp32 image grad rounds to the fp16 one); fp16 images + fp32 weights == fp32."""
    inputs = make_inputs(2, 3, 16, 24, 8, 32, device, reg=1)
    half = [t.half() for t in inputs]
    g = torch.randn(2, 8, 32, device=device)
    out16, grads16 = fwd_bwd(triton_op, half, g)
    mixed, grads_mixed = fwd_bwd(triton_op, [inputs[0]] + half[1:], g)
    assert mixed.dtype == torch.float16 and grads_mixed[0].dtype == torch.float32
    torch.testing.assert_close(mixed, out16, atol=0, rtol=0)
    torch.testing.assert_close(grads_mixed[0].half(), grads16[0], atol=0, rtol=0)
    for n, a, b in zip(NAMES[1:], grads_mixed[1:], grads16[1:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{n}: {m}")
    up = [half[0]] + inputs[1:]  # fp16 images, fp32 weights: output fp32, same as the fp32 upcast images
    assert_fwd_bwd_match(triton_op, lambda x, *a: ref_op(x.float(), *a), up, torch.float32, NAMES)
    out, _ = fwd_bwd(triton_op, up)
    assert out.dtype == torch.float32


def test_autocast_converts_parameters_not_images(device):
    """Under autocast the parameters run in the autocast dtype and the fp32 images are converted on load."""
    images, w, b, pos, cls, reg = make_inputs(2, 3, 16, 16, 8, 32, device, reg=1)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        out = triton_op(images, w, b, pos, cls, reg)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, triton_op(images, w.half(), b.half(), pos.half(), cls.half(), reg.half()),
                               atol=0, rtol=0)


def test_no_bias_and_frozen_images(device):
    inputs = make_inputs(2, 3, 16, 24, 8, 32, device, bias=False)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, torch.float32, NAMES)
    images = inputs[0]  # does not require grad: the image-gradient GEMM must not run, grads still right
    w = inputs[1].clone().requires_grad_()
    out = patch_embed(images, w, None, inputs[3], inputs[4], backend="triton")
    out.sum().backward()
    w_ref = inputs[1].clone().requires_grad_()
    patch_embed_ref(images, w_ref, None, inputs[3], inputs[4]).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=2e-5, rtol=2e-4)


def test_frozen_weight_skips_weight_grad(device):
    """A frozen patch projection (e.g. MoCo v3's frozen stem): no weight gradient, the others still right."""
    images, w, b, pos, cls, reg = make_inputs(2, 3, 16, 24, 8, 32, device, reg=1)
    leaves = [t.clone().requires_grad_() for t in (b, pos, cls, reg)]
    triton_op(images, w, *leaves).backward(g := torch.randn(2, 8, 32, device=device))
    ref_leaves = [t.cpu().clone().requires_grad_() for t in (b, pos, cls, reg)]
    ref_op(images.cpu(), w.cpu(), *ref_leaves).backward(g.cpu())
    assert w.grad is None
    for n, a, r in zip(["bias", "pos_embed", "cls_token", "reg_token"], leaves, ref_leaves):
        assert_close_to_ref(a.grad.cpu(), r.grad, name=f"grad {n}")


def test_deterministic(device):
    inputs = make_inputs(2, 3, 30, 32, 8, 48, device, reg=2, no_embed_class=True)
    assert_fwd_bwd_deterministic(triton_op, inputs, no_embed_class=True, dynamic_img_pad=True)


def test_bad_inputs_raise_before_launch(device):
    images, w, b, pos, cls, reg = make_inputs(1, 3, 32, 32, 16, 48, device)
    reg = torch.randn(1, 2, 48, device=device)
    pos_reg = torch.randn(1, 7, 48, device=device)
    cases = [
        (ValueError, r"positive multiples of the patch size P=16; got 30x32 \(or pass dynamic_img_pad=True",
         dict(images=images[..., :30, :])),
        (ValueError, r"images must be \(B, C=3, H, W\)", dict(images=images[:, :2])),
        (TypeError, r"images must be uint8, float32, float16 or bfloat16; got torch.int32",
         dict(images=images.int())),
        (ValueError, r"pos_embed must have shape \(1, 1 \+ N=4, D=48\)", dict(pos=pos[:, 1:])),
        (ValueError, r"pos_embed must have shape \(1, N=4, D=48\) \(no_embed_class\)",
         dict(no_embed_class=True)),
        (ValueError, r"pos_embed must have shape \(1, 3 \+ N=4, D=48\)", dict(reg=reg)),
        (ValueError, r"reg_token must have shape \(1, K, D=48\); got \(2, 48\)", dict(reg=reg[0], pos=pos_reg)),
        (ValueError, r"reg_token must hold at least one token", dict(reg=reg[:, :0])),
        (ValueError, r"cls_token must have shape \(1, 1, D=48\)", dict(cls=cls[..., :5])),
        (ValueError, r"bias has dtype torch.float16 but weight has dtype torch.float32", dict(b=b.half())),
        (ValueError, r"weight must be \(D, C, P, P\)", dict(w=w[..., :8])),
        (ValueError, r"mean must have one value per channel \(C=3\); got 2", dict(mean=(0.5, 0.5))),
        (ValueError, r"std must be positive", dict(std=(0.5, 0.0, 0.5))),
        (ValueError, r"std must be a float tensor of shape \(C=3,\)", dict(std=torch.ones(2, device=device))),
    ]
    for exc, match, over in cases:
        a = dict(images=images, w=w, b=b, pos=pos, cls=cls, reg=None)
        kw = {k: over.pop(k) for k in ("no_embed_class", "mean", "std") if k in over}
        a.update(over)
        with pytest.raises(exc, match=match):
            triton_op(a["images"], a["w"], a["b"], a["pos"], a["cls"], a["reg"], **kw)


def test_opcheck(device):
    from fastvit_kernels.ops.patch_embed import _patch_embed_fwd, normalization_constants

    images, w, b, pos, cls, reg = make_inputs(1, 2, 8, 8, 4, 16, device, reg=2)
    norm = normalization_constants((0.5, 0.4), (0.2, 0.3), 2, False, device)
    args = tuple(t.requires_grad_() for t in (images, w, b, pos, cls, reg)) + (norm, False)
    torch.library.opcheck(_patch_embed_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    u8 = torch.randint(0, 256, (1, 2, 7, 9), dtype=torch.uint8, device=device)  # padded grid 2 x 3
    pos_nec = torch.randn(1, 6, 16, device=device, requires_grad=True)
    torch.library.opcheck(_patch_embed_fwd, (u8, w, None, pos_nec, cls, reg, norm, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("cls,reg,no_embed_class", [(True, 0, False), (True, 2, True), (False, 3, False),
                                                    (True, 4, False), (False, 0, True)])
def test_small_grads_two_launches(cls, reg, no_embed_class, dtype, device, monkeypatch):
    """The bias / pos_embed / class / register gradients (weight and image gradients not asked for) take two
    launches: the fp32 batch sum that also writes dpos, then dbias with dcls / dreg. Values: within rounding to
    ``dtype`` of fp64 sums, and bit-identical to the former plan (fp32 column sum, cast copies, column sum of the
    patch rows)."""
    from fastvit_kernels.kernels.patch_embed import patch_embed_bwd
    from fastvit_kernels.kernels.reduce import column_sum

    B, D, num_cls = 3, 40, int(cls)
    images, w = make_inputs(B, 3, 16, 24, 8, D, device, cls, reg, no_embed_class)[:2]
    prefix, rows = num_cls + reg, num_cls + reg + 6
    w = w.to(dtype)
    dout = torch.randn(B, rows, D, device=device).to(dtype)
    with count_launches(monkeypatch) as launches:
        _, _, dbias, dpos, dcls, dreg = patch_embed_bwd(dout, images, w, None, num_cls, reg, no_embed_class,
                                                        needs_weight_grad=False, needs_images_grad=False)
    assert launches == {"_column_sum_kernel": 1, "_column_sum_tail_kernel": 1}, launches
    pos_from = prefix if no_embed_class else 0
    sums = dout.double().sum(0)  # (rows, D) fp64
    want = {"dpos": (dpos, sums[pos_from:][None]), "dbias": (dbias, sums[prefix:].sum(0)),
            "dcls": (dcls, sums[:num_cls].view(1, 1, D) if cls else None),
            "dreg": (dreg, sums[num_cls:prefix][None] if reg else None)}
    for name, (got, ref) in want.items():
        if ref is None:
            assert got.numel() == 0, name
            continue
        assert got.dtype == dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double(), ref, atol=1e-5 * scale, rtol=torch.finfo(dtype).eps,
                                   msg=lambda m: f"{name}: {m}")
    # the former plan: five launches, same bits
    rows_sum = column_sum(dout.view(B, rows * D), torch.float32).view(rows, D)
    assert torch.equal(dpos, rows_sum[pos_from:].to(dtype)[None])
    assert torch.equal(dbias, column_sum(rows_sum[prefix:], dtype))
    assert not cls or torch.equal(dcls, rows_sum[:1].to(dtype).view(1, 1, D))
    assert not reg or torch.equal(dreg, rows_sum[num_cls:prefix].to(dtype)[None])
