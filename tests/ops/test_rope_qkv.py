"""2D RoPE fused into the qkv GEMM (``layernorm_linear`` with ``rope_*``): the rotated qkv and every gradient
against the fp32 eager reference (``reference.rope_ref`` after ``layernorm_linear_ref``), both pair layouts,
prefix tokens 0 / 1 / 5 (unrotated), head_dim 64 / 72 / 80, non-square grids, shared and per-head frequency tables
(a learnable per-head table's gradient), packed tokens, bit-identical repeats and input checks."""

import pytest
import torch

from fastvit_kernels.ops import layernorm_linear
from fastvit_kernels.reference import layernorm_linear_ref, rope_ref
from helpers import DTYPES_INTERPRETER, assert_fwd_bwd_deterministic, assert_fwd_bwd_match

NAMES = ["x", "norm_weight", "norm_bias", "weight", "bias"]


def grid_coords(gh: int, gw: int, prefix: int, device) -> torch.Tensor:
    """(prefix + gh * gw, 2) fp32 (y, x) patch-centre coordinates, prefix tokens (0, 0) first."""
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                          indexing="ij")
    grid = torch.stack([y.flatten(), x.flatten()], -1) + 0.5
    return torch.cat([torch.zeros(prefix, 2), grid]).to(device)


def axial_freqs(head_dim: int, heads: int, device) -> torch.Tensor:
    """An axial table: the first half of the pairs turn with y, the second with x (EVA-02's layout of bands); per
    head when ``heads`` > 1 (distinct random tables, as a learned mixed RoPE)."""
    n = head_dim // 2
    bands = 1.0 / (100.0 ** (torch.arange(n // 2 + n % 2, dtype=torch.float32) / max(n // 2, 1)))
    f = torch.zeros(n, 2)
    f[: len(bands), 0] = bands
    f[len(bands):, 1] = bands[: n - len(bands)]
    f = f[None].repeat(heads, 1, 1)
    if heads > 1:
        f = f * (0.5 + torch.rand(heads, 1, 1))
    return f.to(device)


def inputs_for(B, N, D, device, bias=True):
    return [torch.randn(B, N, D, device=device) + 0.5, 1 + 0.1 * torch.randn(D, device=device),
            0.1 * torch.randn(D, device=device), torch.randn(3 * D, D, device=device) / D**0.5,
            0.1 * torch.randn(3 * D, device=device) if bias else None]


def op(x, nw, nb, w, b, **kw):
    return layernorm_linear(x, nw, nb, w, b, backend="triton", **kw)


def ref(x, nw, nb, w, b, rope_coords, rope_freqs, rope_heads, rope_layout):
    return rope_ref(layernorm_linear_ref(x, nw, nb, w, b), rope_coords, rope_freqs, rope_heads, rope_layout)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("head_dim,prefix,grid", [(64, 1, (4, 4)), (72, 0, (3, 5)), (80, 5, (2, 3))])
def test_rope_qkv_matches_reference(head_dim, prefix, grid, layout, dtype, device):
    torch.manual_seed(0)
    H = 2
    coords = grid_coords(*grid, prefix, device)
    kw = dict(rope_coords=coords, rope_freqs=axial_freqs(head_dim, 1, device), rope_heads=H, rope_layout=layout)
    assert_fwd_bwd_match(op, ref, inputs_for(2, coords.shape[0], H * head_dim, device), dtype, NAMES, **kw)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_rotates_only_q_and_k_of_patch_tokens(layout, device):
    """Prefix tokens and v come out exactly as the plain GEMM gives them; q / k of patch tokens do not."""
    torch.manual_seed(1)
    H, hd, prefix = 2, 32, 3
    coords = grid_coords(3, 4, prefix, device)
    x, nw, nb, w, b = inputs_for(1, coords.shape[0], H * hd, device)
    plain = op(x, nw, nb, w, b)
    rot = op(x, nw, nb, w, b, rope_coords=coords, rope_freqs=axial_freqs(hd, 1, device), rope_heads=H,
             rope_layout=layout)
    D = H * hd
    assert torch.equal(rot[:, :prefix], plain[:, :prefix])
    assert torch.equal(rot[..., 2 * D:], plain[..., 2 * D:])
    assert (rot[:, prefix:, :2 * D] - plain[:, prefix:, :2 * D]).abs().max() > 1e-2
    # a rotation keeps each pair's norm
    pairs = lambda t: t[:, prefix:, :D].unflatten(-1, (H, hd))  # noqa: E731
    n_rot, n_plain = pairs(rot).norm(dim=-1), pairs(plain).norm(dim=-1)
    torch.testing.assert_close(n_rot, n_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_per_head_learnable_freqs_gradient(layout, device):
    """A per-head table (timm's RotaryEmbeddingMixed) gets its gradient, against autograd of the reference."""
    torch.manual_seed(2)
    H, hd = 3, 16
    coords = grid_coords(3, 3, 1, device)
    x, nw, nb, w, b = inputs_for(2, coords.shape[0], H * hd, device)
    freqs = axial_freqs(hd, H, device)
    f1, f2 = freqs.clone().requires_grad_(), freqs.clone().requires_grad_()
    g = torch.randn(2, coords.shape[0], 3 * H * hd, device=device)
    op(x, nw, nb, w, b, rope_coords=coords, rope_freqs=f1, rope_heads=H, rope_layout=layout).backward(g)
    ref(x, nw, nb, w, b, coords, f2, H, layout).backward(g)
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-4)
    shared = freqs[:1].clone().requires_grad_()
    shared_ref = freqs[:1].clone().requires_grad_()
    op(x, nw, nb, w, b, rope_coords=coords, rope_freqs=shared, rope_heads=H, rope_layout=layout).backward(g)
    ref(x, nw, nb, w, b, coords, shared_ref, H, layout).backward(g)
    torch.testing.assert_close(shared.grad, shared_ref.grad, rtol=1e-4, atol=1e-4)


def test_packed_tokens_use_their_own_coords(device):
    """2-D (T, D) tokens with one (y, x) per token (a packed batch of two images of different grids)."""
    torch.manual_seed(3)
    H, hd = 2, 24
    coords = torch.cat([grid_coords(2, 3, 1, device), grid_coords(4, 2, 1, device)])  # T = 7 + 9
    inputs = inputs_for(1, coords.shape[0], H * hd, device)
    inputs[0] = inputs[0][0]
    kw = dict(rope_coords=coords, rope_freqs=axial_freqs(hd, 1, device), rope_heads=H, rope_layout="half")
    assert_fwd_bwd_match(op, ref, inputs, torch.float32, NAMES, **kw)


def test_no_bias_and_deterministic(device):
    torch.manual_seed(4)
    H, hd = 2, 40
    coords = grid_coords(4, 4, 1, device)
    kw = dict(rope_coords=coords, rope_freqs=axial_freqs(hd, H, device), rope_heads=H, rope_layout="interleaved")
    inputs = inputs_for(2, coords.shape[0], H * hd, device, bias=False)
    assert_fwd_bwd_match(op, ref, inputs, torch.float16, NAMES, **kw)
    assert_fwd_bwd_deterministic(op, [t.half() if t is not None else None for t in inputs], **kw)


def test_torch_backend_is_the_reference(device):
    torch.manual_seed(5)
    coords = grid_coords(2, 2, 1, device)
    x, nw, nb, w, b = inputs_for(2, 5, 32, device)
    kw = dict(rope_coords=coords, rope_freqs=axial_freqs(16, 1, device), rope_heads=2, rope_layout="half")
    torch.testing.assert_close(layernorm_linear(x, nw, nb, w, b, backend="torch", **kw),
                               ref(x, nw, nb, w, b, coords, kw["rope_freqs"], 2, "half"))


def test_bad_rope_arguments_raise_before_launch(device):
    x, nw, nb, w, b = inputs_for(1, 5, 32, device)
    coords = grid_coords(2, 2, 1, device)
    freqs = axial_freqs(16, 1, device)
    good = dict(rope_coords=coords, rope_freqs=freqs, rope_heads=2)
    with pytest.raises(ValueError, match="go together"):
        op(x, nw, nb, w, b, rope_coords=coords)
    with pytest.raises(ValueError, match="rope_layout"):
        op(x, nw, nb, w, b, **good, rope_layout="rotate_half")
    with pytest.raises(ValueError, match="rope_coords must have shape"):
        op(x, nw, nb, w, b, **{**good, "rope_coords": coords[:4]})
    with pytest.raises(ValueError, match="rope_freqs"):
        op(x, nw, nb, w, b, **{**good, "rope_freqs": freqs.repeat(3, 1, 1)})
    with pytest.raises(TypeError, match="rope_coords must be float32"):
        op(x, nw, nb, w, b, **{**good, "rope_coords": coords.double()})
    with pytest.raises(ValueError, match="even head_dim"):
        op(x, nw, nb, w, b, **{**good, "rope_heads": 32})
    with pytest.raises(ValueError, match="N_out = 3"):
        op(x, nw, nb, w[:95], None, **good)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_rope_with_rmsnorm(dtype, device):
    """RMSNorm before the qkv GEMM with RoPE after it (no norm bias, as timm's RmsNorm)."""
    torch.manual_seed(6)
    H, hd = 2, 40
    coords = grid_coords(3, 4, 1, device)
    inputs = inputs_for(2, coords.shape[0], H * hd, device)
    inputs[2] = None
    kw = dict(rope_coords=coords, rope_freqs=axial_freqs(hd, 1, device), rope_heads=H, rope_layout="half")

    def rms_op(*a, **k):
        return op(*a, norm="rmsnorm", **k)

    def rms_ref(x, nw, nb, w, b, rope_coords, rope_freqs, rope_heads, rope_layout):
        return rope_ref(layernorm_linear_ref(x, nw, nb, w, b, 1e-6, "rmsnorm"), rope_coords, rope_freqs,
                        rope_heads, rope_layout)

    assert_fwd_bwd_match(rms_op, rms_ref, inputs, dtype, NAMES, **kw)
