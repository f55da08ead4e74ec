"""swiglu_mlp (timm's SwiGLU / SwiGLUPacked after a LayerNorm or an RMSNorm, optional hidden LayerNorm) and
layernorm_mlp(norm="rmsnorm") on the Triton path against the fp32 eager reference: output and every gradient, at
odd shapes (M = B * N with N in {1, 17}; D = 48 / 80; D_hidden = 136 / 72, not multiples of 16 or powers of two),
with and without biases; determinism; what is saved for backward; bad inputs; timm's module semantics."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit_kernels.ops import layernorm_mlp, swiglu_mlp
from fastvit_kernels.reference import layernorm_mlp_ref, rms_norm_ref, swiglu_mlp_ref
from helpers import DTYPES_INTERPRETER, assert_fwd_bwd_deterministic, assert_fwd_bwd_match

NAMES = ["x", "norm_weight", "norm_bias", "gate_weight", "gate_bias", "up_weight", "up_bias", "fc2_weight",
         "fc2_bias", "hidden_norm_weight", "hidden_norm_bias"]


def make_inputs(B, N, D, Dh, device, *, packed=False, bias=True, norm_bias=True, hidden_norm=False):
    """The 11 tensor arguments of swiglu_mlp (the last two: the hidden norm's gamma / beta, or None)."""
    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, device=device)

    rows = 2 * Dh if packed else Dh
    return [
        r(B, N, D),
        1 + r(D, scale=0.1),
        r(D, scale=0.1) if norm_bias else None,
        r(rows, D, scale=D**-0.5),
        r(rows, scale=0.1) if bias else None,
        None if packed else r(Dh, D, scale=D**-0.5),
        None if packed or not bias else r(Dh, scale=0.1),
        r(D, Dh, scale=Dh**-0.5),
        r(D, scale=0.1) if bias else None,
        1 + r(Dh, scale=0.1) if hidden_norm else None,
        r(Dh, scale=0.1) if hidden_norm else None,
    ]


def _split(fn, backend=None):
    """``fn`` with the hidden norm's two tensors as positional inputs (so the comparison sees their gradients)."""
    def run(x, nw, nb, gw, gb, uw, ub, w2, b2, hw, hb, **kw):
        if backend is not None:
            kw["backend"] = backend
        return fn(x, nw, nb, gw, gb, uw, ub, w2, b2, 1e-6, hidden_norm_weight=hw, hidden_norm_bias=hb, **kw)
    return run


triton_op = _split(swiglu_mlp, "triton")
ref_op = _split(swiglu_mlp_ref)

CASES = {  # name: (B, N, D, Dh, make_inputs options, op options)
    "packed_ln_bias": (2, 17, 48, 136, dict(packed=True), dict()),
    "separate_rms_nobias_n1": (1, 1, 80, 136, dict(bias=False, norm_bias=False), dict(norm="rmsnorm")),
    "separate_ln_hidden_norm": (2, 17, 48, 72, dict(hidden_norm=True), dict()),
    "packed_rms_nobias_hidden_norm_branch": (1, 17, 80, 136, dict(packed=True, bias=False, norm_bias=False,
                                                                  hidden_norm=True),
                                             dict(norm="rmsnorm", add_residual=False)),
}


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, device):
    B, N, D, Dh, make_kw, op_kw = CASES[case]
    inputs = make_inputs(B, N, D, Dh, device, **make_kw)
    assert_fwd_bwd_match(triton_op, ref_op, inputs, dtype, NAMES, **op_kw)


@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER)
def test_gelu_mlp_with_rmsnorm(dtype, device):
    """layernorm_mlp(norm="rmsnorm") (timm's RmsNorm: no bias; fc1 / fc2 without bias too), M = 2 * 17, D = 80."""
    x = torch.randn(2, 17, 80, device=device)
    inputs = [x, 1 + 0.1 * torch.randn(80, device=device), None, torch.randn(136, 80, device=device) / 80**0.5,
              None, torch.randn(80, 136, device=device) / 136**0.5, None]
    names = ["x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    op = functools.partial(layernorm_mlp, backend="triton")
    assert_fwd_bwd_match(op, layernorm_mlp_ref, inputs, dtype, names, norm="rmsnorm")
    # with a norm bias, biased Linears and recompute: every gradient, the bias's included
    inputs[2], inputs[4], inputs[6] = (0.1 * torch.randn(n, device=device) for n in (80, 136, 80))
    assert_fwd_bwd_match(functools.partial(op, recompute=True), layernorm_mlp_ref, inputs, dtype, names,
                         norm="rmsnorm")


def test_rms_kernels_direct(device):
    """row_stats(rms=True) and layernorm_bwd(rms=True) (mean not read: None) against autograd through timm's formula
    in fp64, M = 2 * 17 rows, D = 80, with the residual gradient added."""
    from fastvit_kernels.kernels.layernorm import layernorm_bwd, row_stats

    x = torch.randn(34, 80, device=device)
    w = 1 + 0.1 * torch.randn(80, device=device)
    mean, rstd = row_stats(x, 1e-6, rms=True)
    assert torch.equal(mean, torch.zeros_like(mean))
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    y = rms_norm_ref(xd, wd, None, 1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xd.detach().pow(2).mean(-1) + 1e-6), atol=1e-6, rtol=1e-6)
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    y.backward(dy.double())
    dx, dw, db = layernorm_bwd(x, dy, w, None, rstd, dres=dres, rms=True)
    torch.testing.assert_close(dx.double(), xd.grad + dres.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw.double(), wd.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, dy.sum(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean"):
        layernorm_bwd(x, dy, w, None, rstd)


def test_deterministic(device):
    for make_kw in (dict(packed=True), dict(hidden_norm=True)):
        inputs = make_inputs(2, 17, 48, 72, device, **make_kw)
        assert_fwd_bwd_deterministic(triton_op, inputs, torch.randn(2, 17, 48, device=device))


def _saved_tensors(fn) -> list:
    """Tensors saved by the custom op's autograd node (walks through the view node of the reshape)."""
    while fn is not None and not hasattr(fn, "saved_tensors"):
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return [t for t in fn.saved_tensors if t is not None]


@pytest.mark.parametrize("hidden_norm", [False, True])
def test_saves_no_activated_or_normalised_tensor(hidden_norm, device):
    """The autograd graph keeps x, the (M, 2 * D_hidden) (gate | up) pre-activation, fp32 (M,) row statistics and
    the parameters: no (M, D_hidden) hidden (activated or normalised) and no normalised (M, D) x."""
    M, D, Dh = 17, 48, 72
    x, *params = make_inputs(1, M, D, Dh, device, hidden_norm=hidden_norm)
    params = [p if p is None else p.requires_grad_() for p in params]
    out = triton_op(x.requires_grad_(), *params)
    saved = _saved_tensors(out.grad_fn)
    big = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == M)
    assert big == [(M, D), (M, 2 * Dh)], big  # x and the pre-activation
    stats = [t for t in saved if t.dim() == 1 and t.shape[0] == M]
    assert len(stats) == (4 if hidden_norm else 2) and all(t.dtype == torch.float32 for t in stats)
    x2d = x.detach().reshape(M, D)
    assert any(t.data_ptr() == x2d.data_ptr() for t in saved if tuple(t.shape) == (M, D))  # x itself, not LN(x)


def test_bad_inputs_raise_before_launch(device):
    x, nw, nb, gw, gb, uw, ub, w2, b2, _, _ = make_inputs(1, 3, 32, 40, device)

    def call(*args, **kw):
        return swiglu_mlp(*args, backend="triton", **kw)

    with pytest.raises(ValueError, match=r"gate_weight must have shape \(D_hidden, D=32\); got \(40, 31\)"):
        call(x, nw, nb, gw[:, :31], gb, uw, ub, w2, b2)
    with pytest.raises(ValueError, match=r"up_weight must have shape \(D_hidden=40, D=32\); got \(39, 32\)"):
        call(x, nw, nb, gw, gb, uw[:39], ub, w2, b2)
    with pytest.raises(ValueError, match=r"up_bias must have shape \(D_hidden=40,\)"):
        call(x, nw, nb, gw, gb, uw, ub[:3], w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(D=32, D_hidden=40\); got \(40, 32\)"):
        call(x, nw, nb, gw, gb, uw, ub, w2.t(), b2)
    with pytest.raises(ValueError, match=r"an even number of rows; got \(81, 32\)"):
        call(x, nw, nb, torch.cat([gw, uw, gw[:1]]), None, None, None, w2, b2)
    with pytest.raises(ValueError, match="up_bias must be None when up_weight is None"):
        call(x, nw, nb, torch.cat([gw, uw]), None, None, ub, w2, b2)
    with pytest.raises(ValueError, match=r"gate_bias must have shape \(2 \* D_hidden=80,\)"):
        call(x, nw, nb, torch.cat([gw, uw]), gb, None, None, w2, b2)
    with pytest.raises(ValueError, match=r"hidden_norm_weight must have shape \(D_hidden=40,\); got \(32,\)"):
        call(x, nw, nb, gw, gb, uw, ub, w2, b2, hidden_norm_weight=nw)
    with pytest.raises(ValueError, match="hidden_norm_bias needs hidden_norm_weight"):
        call(x, nw, nb, gw, gb, uw, ub, w2, b2, hidden_norm_bias=gb)
    with pytest.raises(ValueError, match="hidden_norm_eps must be > 0"):
        call(x, nw, nb, gw, gb, uw, ub, w2, b2, hidden_norm_weight=gb, hidden_norm_eps=0.0)
    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm'; got 'batchnorm'"):
        call(x, nw, nb, gw, gb, uw, ub, w2, b2, norm="batchnorm")
    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm'"):
        layernorm_mlp(x, nw, nb, gw, gb, w2, b2, norm="rms", backend="triton")
    with pytest.raises(ValueError, match="up_weight has dtype torch.float16 but x has dtype torch.float32"):
        call(x, nw, nb, gw, gb, uw.half(), ub, w2, b2)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        call(x.long(), nw, nb, gw, gb, uw, ub, w2, b2)
    with pytest.raises(ValueError, match="eps must be > 0"):
        call(x, nw, nb, gw, gb, uw, ub, w2, b2, eps=0.0)
    if device == "cpu":
        with pytest.raises(TypeError, match="Triton interpreter does not support bfloat16"):
            call(*[t.bfloat16() for t in (x, nw, nb, gw, gb, uw, ub, w2, b2)])


def test_torch_backend_is_the_reference(device):
    inputs = make_inputs(2, 5, 32, 40, device, hidden_norm=True)
    torch.testing.assert_close(_split(swiglu_mlp, "torch")(*inputs, norm="rmsnorm"),
                               ref_op(*inputs, norm="rmsnorm"), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# timm's modules, in plain torch from timm's forward (timm/layers/mlp.py SwiGLU, GluMlp; timm/layers/norm.py RmsNorm;
# timm is not importable in this environment)
# ----------------------------------------------------------------------------------------------------------------
class _RmsNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(d)), eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.weight


class _TimmSwiGLU(nn.Module):  # SwiGLU: fc1_g, fc1_x, act(x_gate) * x, norm, fc2
    def __init__(self, d, dh, hidden_norm, bias):
        super().__init__()
        self.fc1_g, self.fc1_x = nn.Linear(d, dh, bias=bias), nn.Linear(d, dh, bias=bias)
        self.act, self.fc2 = nn.SiLU(), nn.Linear(dh, d, bias=bias)
        self.norm = nn.LayerNorm(dh, eps=1e-6) if hidden_norm else nn.Identity()

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class _TimmSwiGLUPacked(nn.Module):  # GluMlp(act_layer=SiLU, gate_last=False): chunk(2, -1), act(x1) * x2
    def __init__(self, d, dh, hidden_norm, bias):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * dh, bias=bias), nn.SiLU(), nn.Linear(dh, d, bias=bias)
        self.norm = nn.LayerNorm(dh, eps=1e-6) if hidden_norm else nn.Identity()

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(self.act(x1) * x2))


def _fused(norm2, mlp, x, *, packed_views):
    """The op as a model would call it for ``x + mlp(norm2(x))`` with timm's parameters."""
    nb = getattr(norm2, "bias", None)
    norm = "rmsnorm" if isinstance(norm2, _RmsNorm) else "layernorm"
    hn = mlp.norm if isinstance(mlp.norm, nn.LayerNorm) else None
    hkw = dict(hidden_norm_weight=hn.weight, hidden_norm_bias=hn.bias) if hn is not None else {}
    if isinstance(mlp, _TimmSwiGLU):
        fc1 = (mlp.fc1_g.weight, mlp.fc1_g.bias, mlp.fc1_x.weight, mlp.fc1_x.bias)
    elif packed_views:  # two row-halves of the packed fc1 (views: copy-free in the op)
        dh = mlp.fc1.weight.shape[0] // 2
        b = mlp.fc1.bias
        fc1 = (mlp.fc1.weight[:dh], None if b is None else b[:dh], mlp.fc1.weight[dh:], None if b is None else b[dh:])
    else:
        fc1 = (mlp.fc1.weight, mlp.fc1.bias, None, None)
    return swiglu_mlp(x, norm2.weight, nb, *fc1, mlp.fc2.weight, mlp.fc2.bias, norm2.eps, norm=norm, backend="triton",
                      **hkw)


@pytest.mark.parametrize("layout,norm,hidden_norm,bias", [
    ("separate", "rmsnorm", False, False),
    ("packed", "layernorm", True, True),
    ("packed_views", "rmsnorm", True, False),
])
def test_timm_module_parity(layout, norm, hidden_norm, bias, device):
    """``x + mlp(norm2(x))`` with timm's SwiGLU / SwiGLUPacked (and RmsNorm) semantics, fp32: the op's output and
    every parameter gradient (in the modules' own parameters, packed fc1 included) match the modules'."""
    torch.manual_seed(0)
    D, Dh = 48, 136
    norm2 = _RmsNorm(D, 1e-6) if norm == "rmsnorm" else nn.LayerNorm(D, eps=1e-6)
    cls = _TimmSwiGLU if layout == "separate" else _TimmSwiGLUPacked
    mlp = cls(D, Dh, hidden_norm, bias)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial LayerNorm affine
    mods = nn.ModuleList([norm2, mlp]).to(device)
    x = torch.randn(2, 17, D, device=device)
    g = torch.randn_like(x)

    def run(fn):
        mods.zero_grad()
        xl = x.clone().requires_grad_()
        out = fn(xl)
        out.backward(g)
        return out.detach(), xl.grad, {k: p.grad.clone() for k, p in mods.named_parameters()}

    ref = run(lambda t: t + mlp(norm2(t)))
    got = run(functools.partial(_fused, norm2, mlp, packed_views=layout == "packed_views"))
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=2e-4)
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=2e-5, rtol=2e-4, msg=lambda m: f"{k}: {m}")


def test_packed_weight_view_is_copy_free(device):
    """Two adjacent row-halves of one weight are read as the packed operand itself; separate tensors are joined."""
    from fastvit_kernels.ops.swiglu_mlp import _packed_weight

    w = torch.randn(80, 16, device=device)
    v = _packed_weight(w[:40], w[40:])
    assert v.data_ptr() == w.data_ptr() and torch.equal(v, w)
    a, b = torch.randn(40, 16, device=device), torch.randn(40, 16, device=device)
    assert torch.equal(_packed_weight(a, b), torch.cat([a, b]))
    assert _packed_weight(w, None) is w


def test_opcheck(device):
    from fastvit_kernels.ops.swiglu_mlp import _swiglu_mlp_fwd

    x, nw, nb, gw, gb, uw, ub, w2, b2, hw, hb = make_inputs(1, 5, 16, 24, device, hidden_norm=True)
    args = [x.reshape(5, 16), nw, nb, gw, gb, uw, ub, w2, b2, hw, hb]
    args = [t.requires_grad_() for t in args]
    torch.library.opcheck(_swiglu_mlp_fwd, (*args, 1e-6, 1e-6, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_flop_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    from fastvit_kernels.ops import flop_formulas
    from fastvit_kernels.ops.swiglu_mlp import swiglu_mlp_flops

    assert swiglu_mlp_flops(10, 48, 136) == 6 * 10 * 48 * 136
    inputs = [t if t is None else t.requires_grad_() for t in make_inputs(2, 5, 16, 24, "cpu")]
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        out = triton_op(*inputs)
        out.sum().backward()
    assert counter.get_total_flops() == 3 * swiglu_mlp_flops(10, 16, 24)
