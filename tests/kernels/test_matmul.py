"""The GEMM core alone, every flag it offers, against an eager fp32 spec of the same computation."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref

M, N, K = 70, 40, 50  # ragged against every tile size


def _ln(v, mean, rstd, gamma, beta):
    """LayerNorm of a loaded operand tile: statistics per row, affine per column (A: rows m; B: rows k)."""
    return (v - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]


def _gelu_grad(x, approximate="none"):
    """GELU'(x) by autograd through PyTorch's own GELU of that form (an independent spec of the kernel's formula)."""
    x = x.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x)
    return g.float()


EPILOGUES = ["none", "bias", "gelu_store", "dgelu", "bias_gelu_residual"]
# the tanh GELU flag changes every GELU of a launch: run it with the epilogues and prologues that contain one
TANH_CASES = [("gelu", "none", "gelu_store"), ("none", "gelu", "dgelu"), ("ln", "gelu", "bias_gelu_residual")]
PROLOGUES = list(itertools.product(["none", "ln", "gelu"], ["none", "ln", "gelu"]))
PROLOGUES.remove(("ln", "ln"))  # one LayerNorm prologue per GEMM


# fp32: every epilogue with every prologue pair; fp16: two epilogues per pair (the flags' math is dtype-independent)
CASES = [(torch.float32, e) for e in EPILOGUES] + [(torch.float16, e) for e in ("none", "bias_gelu_residual")]


IMPLS = ["triton", "tma", "cublas"]  # pointer-kernel core, TMA persistent core, cuBLAS + elementwise kernels
# TMA needs 16-byte row pitches: K = 50 (and M = 70 for a transposed A) is not describable in fp32 / fp16; these are
# (and stay ragged against every tile)
K_TMA, M_TMA = 56, 72


@contextlib.contextmanager
def gemm_path(impl, monkeypatch):
    """Run the GEMMs inside on one path; for "tma", also assert that the TMA kernel really launched."""
    from fastvit_kernels import backend
    from fastvit_kernels.kernels import matmul_tma

    if impl != "tma":
        with backend.use_gemm_impl(impl), backend.use_gemm_kernel("pointer"):
            yield
        return
    calls = []
    real = matmul_tma.launch
    monkeypatch.setattr(matmul_tma, "launch", lambda *a, **k: (calls.append(1), real(*a, **k)))
    with backend.use_gemm_impl("triton"), backend.use_gemm_kernel("tma"):
        yield
    assert calls, "the TMA kernel did not run"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a_pro,b_pro", PROLOGUES)
@pytest.mark.parametrize("dtype,epilogue", CASES)
def test_flag_combinations(a_pro, b_pro, epilogue, dtype, impl, device, monkeypatch):
    """Each flag combination on the fused core (pointer and TMA kernels) and on its cuBLAS + elementwise-kernels
    form (gemm_impl)."""
    with gemm_path(impl, monkeypatch):
        _check_flags(a_pro, b_pro, epilogue, dtype, "none", device, K=K_TMA if impl == "tma" else K)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a_pro,b_pro,epilogue", TANH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tanh_gelu_flag(a_pro, b_pro, epilogue, dtype, impl, device, monkeypatch):
    with gemm_path(impl, monkeypatch):
        _check_flags(a_pro, b_pro, epilogue, dtype, "tanh", device, K=K_TMA if impl == "tma" else K)


@pytest.mark.parametrize("layout", ["a_t", "b_t", "both_t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_transposed_operands(layout, dtype, device, monkeypatch):
    """The TMA kernel describes an operand stored transposed (weight (N, K) as B; dY (M, N) as dY^T) in storage
    order and transposes the loaded tile: same result as the row-major operands."""
    with gemm_path("tma", monkeypatch):
        _check_flags("ln" if layout == "b_t" else "none", "gelu" if layout == "a_t" else "none", "bias_gelu_residual",
                     dtype, "none", device, K=K_TMA, M=M_TMA, a_t=layout in ("a_t", "both_t"),
                     b_t=layout in ("b_t", "both_t"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_persistent_programs_walk_many_tiles(dtype, device, monkeypatch):
    """Fewer persistent programs than tiles: 200 x 136 is 4 x 3 = 12 tiles of 64 x 64 on 2 programs, so each walks
    six tiles in the grouped order (row sums included: the pid_n == 0 tiles land on both programs)."""
    from fastvit_kernels.kernels import matmul_tma

    monkeypatch.setattr(matmul_tma, "INTERPRETER_PROGRAMS", 2)
    with gemm_path("tma", monkeypatch):
        _check_flags("ln", "none", "bias_gelu_residual", dtype, "none", device, K=K_TMA, M=200, N=136)
        _check_rowsum("gelu", dtype, device, Nout=200)


def test_tma_refuses_undescribable_operands(device):
    """Operands TMA cannot describe (a 100-byte fp16 row pitch, no unit stride, a column-major C) stay on the
    pointer kernel; aligned row-major and transposed operands are accepted."""
    from fastvit_kernels.kernels.matmul import Operand
    from fastvit_kernels.kernels.matmul_tma import tma_compatible

    def t(*shape):
        return torch.empty(*shape, dtype=torch.float16, device=device)

    a, b, c = Operand.matrix(t(8, 64)), Operand.matrix(t(64, 16)), Operand.matrix(t(8, 16))
    assert tma_compatible(a, b, c, 8, 16, 64)
    assert tma_compatible(Operand.matrix_t(t(64, 8)), Operand.matrix_t(t(16, 64)), c, 8, 16, 64)
    assert not tma_compatible(Operand.matrix(t(8, 50)), Operand.matrix(t(50, 16)), c, 8, 16, 50)  # 100-byte pitch
    assert not tma_compatible(Operand(t(8, 128), 128, 2), b, c, 8, 16, 64)  # no unit-stride axis
    assert not tma_compatible(a, b, Operand.matrix_t(t(16, 8)), 8, 16, 64)  # C must be row-major


def _check_flags(a_pro, b_pro, epilogue, dtype, approximate, device, K=K, M=M, a_t=False, b_t=False, N=N):
    from fastvit_kernels.kernels.fusion import Epilogue, Gelu, Gemm, LayerNorm, Operand
    from fastvit_kernels.kernels.matmul import gemm

    a = torch.randn(M, K, device=device)
    b = torch.randn(K, N, device=device) / K**0.5
    bias = torch.randn(N, device=device)
    res = torch.randn(M, N, device=device)
    pre_in = torch.randn(M, N, device=device)
    a_stats = (torch.randn(M, device=device), torch.rand(M, device=device) + 0.5)
    b_stats = (torch.randn(K, device=device), torch.rand(K, device=device) + 0.5)
    a_aff = (torch.randn(K, device=device), torch.randn(K, device=device))
    b_aff = (torch.randn(N, device=device), torch.randn(N, device=device))

    # eager spec in fp32 (operands rounded to dtype first, like the kernel's loads)
    def q(t):
        return t.to(dtype).float()

    ra, rb = q(a), q(b)
    if a_pro == "ln":
        ra = _ln(ra, *a_stats, q(a_aff[0]), q(a_aff[1]))
    elif a_pro == "gelu":
        ra = F.gelu(ra, approximate=approximate)
    if b_pro == "ln":
        rb = _ln(rb, *b_stats, q(b_aff[0]), q(b_aff[1]))
    elif b_pro == "gelu":
        rb = F.gelu(rb, approximate=approximate)
    ref = ra @ rb
    ref_pre = None
    if epilogue in ("bias", "bias_gelu_residual"):
        ref = ref + q(bias)
    if epilogue == "dgelu":
        ref = ref * _gelu_grad(q(pre_in), approximate)
    if epilogue in ("gelu_store", "bias_gelu_residual"):
        ref_pre = ref
        ref = F.gelu(ref, approximate=approximate)
    if epilogue == "bias_gelu_residual":
        ref = ref + q(res)

    c = torch.empty(M, N, device=device, dtype=dtype)
    pre = torch.empty(M, N, device=device, dtype=dtype) if ref_pre is not None else None
    prologue = {"none": lambda stats, aff: None, "gelu": lambda stats, aff: Gelu(),
                "ln": lambda stats, aff: LayerNorm(*stats, aff[0].to(dtype), aff[1].to(dtype))}
    a_op = Operand.matrix_t(a.to(dtype).t().contiguous()) if a_t else Operand.matrix(a.to(dtype))
    b_op = Operand.matrix_t(b.to(dtype).t().contiguous()) if b_t else Operand.matrix(b.to(dtype))
    gemm(Gemm(a_op, b_op, Operand.matrix(c), M, N, K, a_prologue=prologue[a_pro](a_stats, a_aff),
              b_prologue=prologue[b_pro](b_stats, b_aff),
              epilogue=Epilogue(bias=bias.to(dtype) if epilogue in ("bias", "bias_gelu_residual") else None,
                                gelu_grad_of=pre_in.to(dtype) if epilogue == "dgelu" else None,
                                gelu=ref_pre is not None, store_preact=pre,
                                residual=Operand.matrix(res.to(dtype)) if epilogue == "bias_gelu_residual" else None),
              gelu_approximate=approximate))
    # low precision: the kernel casts prologue outputs to fp16 before the dot; allow fp16 rounding of the inputs
    # of a K=50 dot (rtol ~ 2^-10 * sqrt(K)) instead of the 2x rule (there is no PyTorch op for this fusion)
    if dtype == torch.float32:
        assert_close_to_ref(c, ref, name="C")
        if pre is not None:
            assert_close_to_ref(pre, ref_pre, name="pre-activation")
    else:
        scale = ref.abs().max().item()
        assert (c.float() - ref).abs().max().item() <= 1e-2 * scale
        if pre is not None:
            assert (pre.float() - ref_pre).abs().max().item() <= 1e-2 * ref_pre.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b_pro", ["none", "ln", "gelu"])
def test_a_rowsum_is_the_bias_gradient(b_pro, dtype, device):
    _check_rowsum(b_pro, dtype, device)


@pytest.mark.parametrize("impl", ["tma", "cublas"])
def test_a_rowsum_on_the_other_paths(impl, device, monkeypatch):
    with gemm_path(impl, monkeypatch):
        _check_rowsum("ln", torch.float16, device, Nout=72 if impl == "tma" else 70)


def _check_rowsum(b_pro, dtype, device, Nout=70):
    """(Nout: output features, the GEMM's M.) A_ROWSUM: a weight-grad GEMM dW = dY^T @ X also returns sum_m dY (the
    bias gradient) from the A tiles it loads; exact against an fp64 sum of the same values up to fp32 rounding,
    bit-identical across runs, and the GEMM's own output unchanged by the flag. Rows ragged against the tile (70 =
    64 + 6), K = 197 tokens."""
    from fastvit_kernels.kernels.fusion import Epilogue, Gelu, Gemm, LayerNorm, Operand
    from fastvit_kernels.kernels.matmul import gemm

    Mt, Kin = 197, 40  # tokens (GEMM K), input features (GEMM N)
    dy = torch.randn(Mt, Nout, device=device).to(dtype)
    x = torch.randn(Mt, Kin, device=device).to(dtype)
    b_prologue = None
    if b_pro == "ln":
        affine = [torch.randn(Kin, device=device).to(dtype) for _ in range(2)]
        b_prologue = LayerNorm(torch.randn(Mt, device=device), torch.rand(Mt, device=device) + 0.5, *affine)
    elif b_pro == "gelu":
        b_prologue = Gelu()

    def dw_gemm(dw, db, n=Kin):
        return Gemm(Operand.matrix_t(dy), Operand.matrix(x[:, :n]), Operand.matrix(dw), Nout, n, Mt,
                    b_prologue=b_prologue, epilogue=Epilogue(a_rowsum=db))

    outs = []
    for _ in range(2):
        dw = torch.empty(Nout, Kin, device=device, dtype=dtype)
        db = torch.empty(Nout, device=device, dtype=torch.float32)
        gemm(dw_gemm(dw, db))
        outs.append((dw, db))
    ref_db = dy.double().sum(0)
    torch.testing.assert_close(outs[0][1].double(), ref_db, atol=1e-4, rtol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])
    plain = torch.empty_like(outs[0][0])
    gemm(dw_gemm(plain, None))
    assert torch.equal(plain, outs[0][0])
    # N == 0 launches no program, so nothing could compute the row sums: the description refuses
    with pytest.raises(ValueError, match="a_rowsum"):
        dw_gemm(dw[:, :0], db, n=0)


def test_three_level_splits_gather_and_scatter(device):
    """Split indices walk a strided 5-D layout on every operand: a (B, Hp, Wp) x (C, P, P) im2col gather."""
    from fastvit_kernels.kernels.fusion import Gemm, IndexMap, Operand
    from fastvit_kernels.kernels.matmul import gemm

    B, C, gh, gw, P, D = 2, 3, 3, 2, 4, 24
    images = torch.randn(B, C, gh * P, gw * P, device=device)
    w = torch.randn(D, C, P, P, device=device)
    patches = images.unfold(2, P, P).unfold(3, P, P)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B * gh * gw, C * P * P)
    ref = patches @ w.reshape(D, -1).t()
    sB, sC, sH, sW = images.stride()
    out = torch.empty(B * gh * gw, D, device=device)
    gemm(Gemm(Operand(images, (sB, P * sH, P * sW), (sC, sH, sW)), Operand(w, (P * P, P, 1), C * P * P),
              Operand.matrix(out), B * gh * gw, D, C * P * P,
              index=IndexMap(m_split=(gh * gw, gw), k_split=(P * P, P))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # scatter back through a split C operand: every pixel written once
    back = torch.zeros_like(images)
    eye = torch.eye(C * P * P, device=device)
    gemm(Gemm(Operand.matrix(patches.contiguous()), Operand.matrix(eye),
              Operand(back, (sB, P * sH, P * sW), (sC, sH, sW)), B * gh * gw, C * P * P, C * P * P,
              index=IndexMap(m_split=(gh * gw, gw), n_split=(P * P, P))))
    torch.testing.assert_close(back, images, atol=1e-6, rtol=0)


def test_row_stats_and_column_sum(device):
    from fastvit_kernels.kernels.layernorm import row_stats
    from fastvit_kernels.kernels.reduce import column_sum

    x = torch.randn(197, 80, device=device) * 3 + 1
    mean, rstd = row_stats(x, 1e-6)
    torch.testing.assert_close(mean, x.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, (x.var(1, unbiased=False) + 1e-6).rsqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(column_sum(x), x.sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(column_sum(x[:1]), x[0], atol=0, rtol=0)


def test_autotune_candidates_and_key():
    """Candidates: non-empty per dtype / split, pruned by keep(), the default first; the autotuners' early prunes
    hand each launch its own dtype's list; every constexpr flag (not the tile sizes) of each pointer kernel is in
    its autotune key; the interpreter runs its one fixed configuration."""
    import inspect

    import triton

    from fastvit_kernels.kernels import gemm_configs as cfgs
    from fastvit_kernels.kernels import matmul as mm
    from fastvit_kernels.kernels.fusion import PROLOGUE_CAST

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for split in (False, True):
            cands = cfgs.gemm_configs(dt, split)
            assert cands and all(cfgs.keep(c, dt, split) for c in cands)
            assert all(c.num_warps >= 8 for c in cands) or dt != torch.float32  # the fp32 spill prune
    assert cfgs.gemm_configs(torch.float16) == cfgs.gemm_configs(torch.bfloat16)
    deep_k = triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3)
    assert cfgs.keep(deep_k, torch.float16, False) and not cfgs.keep(deep_k, torch.float16, True)  # split spills
    a16, a32 = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    ids = [cfgs.config_id(c) for c in mm._prune_split(mm._ALL_CONFIGS, {"a_ptr": a16, "b_ptr": a16}, SPLIT_M=True)]
    assert ids == [cfgs.config_id(c) for c in cfgs.gemm_configs(torch.float16, True)]
    # A converted on load (fp32 image against fp16 weights): the dot runs in B's dtype
    ids = [cfgs.config_id(c) for c in mm._prune_split(mm._ALL_CONFIGS, {"a_ptr": a32, "b_ptr": a16},
                                                      A_PROLOGUE=PROLOGUE_CAST.value)]
    assert ids == [cfgs.config_id(c) for c in cfgs.gemm_configs(torch.float16)]
    # the SwiGLU epilogue and its derivative: the half-size 16-bit tiles (the default list spilled)
    for flag in ("SWIGLU", "DSWIGLU"):
        pruned = mm._prune_split(mm._ALL_CONFIGS, {"a_ptr": a16, "b_ptr": a16}, **{flag: True})
        ids = [cfgs.config_id(c) for c in pruned]
        assert ids == [cfgs.config_id(c) for c in cfgs.gemm_configs(torch.float16, glu=True)]
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in cfgs.gemm_configs(torch.float16,
                                                                                                  glu=True))
    ids = [cfgs.config_id(c) for c in mm._prune_plain(mm._ALL_CONFIGS, {"a_ptr": a32, "b_ptr": a32})]
    assert ids == [cfgs.config_id(c) for c in cfgs.gemm_configs(torch.float32)]
    tiles = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    for tuner, n_flags in ((mm._matmul_autotuned, 10), (mm._matmul_split_kernel, 23), (mm._matmul_pair_kernel, 19)):
        params = inspect.signature(inspect.unwrap(tuner.fn.fn)).parameters
        flags = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert flags - tiles <= set(tuner.keys), f"constexprs missing from the key: {flags - tiles}"
        assert len(flags - tiles) == n_flags, sorted(flags)  # the constexpr detection itself works
    assert {"M_BUCKET", "N", "K"} <= set(mm._matmul_autotuned.keys)
    if cfgs.interpreter_enabled():
        assert cfgs.fixed_config(cfgs.gemm_configs(torch.float16)) == cfgs.INTERPRETER_CONFIG
        assert not cfgs.autotune_enabled()


@pytest.mark.parametrize("programs", [3, None])
def test_layernorm_bwd_partials_loop(programs, device, monkeypatch):
    """LayerNorm backward with fewer programs than row blocks (each program loops, keeping fp32 partials), and the
    default cap: dx (+ residual grad), dgamma, dbeta against autograd through F.layer_norm in fp64; dgamma / dbeta
    bit-identical across runs. M = 2 * 197 rows, D = 96 (not a power of two)."""
    from fastvit_kernels.kernels import layernorm as ln

    if programs is not None:
        monkeypatch.setattr(ln, "BWD_PROGRAMS", programs)
    M, D = 2 * 197, 96
    x = torch.randn(M, D, device=device) * 2 + 0.5
    dy, dres = torch.randn(M, D, device=device), torch.randn(M, D, device=device)
    gamma, beta = torch.randn(D, device=device), torch.randn(D, device=device)
    mean, rstd = ln.row_stats(x, 1e-6)
    runs = [ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres) for _ in range(2)]
    xr, gr, br = (t.double().requires_grad_(True) for t in (x, gamma, beta))
    F.layer_norm(xr, (D,), gr, br, 1e-6).backward(dy.double())
    dx, dgamma, dbeta = runs[0]
    torch.testing.assert_close(dx.double(), xr.grad + dres.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dgamma.double(), gr.grad, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(dbeta.double(), br.grad, atol=1e-3, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))


def test_tma_build_failure_falls_back_visibly(device, monkeypatch):
    """Under "auto", a TMA kernel that fails to build (a Triton / GPU without support) is replaced by the pointer
    kernel with a RuntimeWarning, and the result is still right; forced ("tma"), the error propagates."""
    from fastvit_kernels import backend
    from fastvit_kernels.kernels import matmul, matmul_tma

    from triton.runtime.errors import OutOfResources

    def broken(*a, **k):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(matmul_tma, "launch", broken)
    monkeypatch.setattr(matmul, "_TMA_FAILED", False)
    monkeypatch.setattr(matmul, "_use_tma", lambda *a: True)  # as on a Hopper GPU under "auto"
    x, w = torch.randn(16, 32, device=device), torch.randn(24, 32, device=device)
    with backend.use_gemm_impl("triton"):
        with pytest.warns(RuntimeWarning, match="TMA GEMM kernel failed to build"):
            y = matmul.linear(x, w)
        torch.testing.assert_close(y, x @ w.t(), atol=2e-5, rtol=2e-4)
        assert matmul._TMA_FAILED
        with backend.use_gemm_kernel("tma"), pytest.raises(OutOfResources):
            monkeypatch.setattr(matmul, "_TMA_FAILED", False)
            matmul.linear(x, w)


# the backward's dgrad + wgrad pairs (ops/linear.py, ops/layernorm_mlp.py): (name, problem 0, problem 1) with the
# fusions each carries; M_P rows of tokens, D_P / DH_P features (TMA-describable in fp32 / fp16, ragged tiles)
M_P, D_P, DH_P = 72, 48, 80
PAIRS = ["fc2", "fc1", "proj", "qkv"]


def _pair_specs(name, dtype, device, M_P=M_P):
    """The two GEMMs (fusion.Gemm) of one backward pair (``M_P`` token rows), with fresh outputs (returned too)."""
    from fastvit_kernels.kernels.fusion import Epilogue, Gelu, Gemm, LayerNorm, Operand

    g = torch.Generator().manual_seed(PAIRS.index(name))

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    x, dy, pre, w = r(M_P, D_P), r(M_P, D_P), r(M_P, DH_P), r(D_P, DH_P)
    ln = LayerNorm(torch.randn(M_P, generator=g).to(device), torch.rand(M_P, generator=g).to(device) + 0.5,
                           r(D_P), r(D_P))
    outs = dict(dw=r(D_P, DH_P), db=r(D_P), dh=r(M_P, DH_P), dwT=r(DH_P, D_P), dbh=r(DH_P), dx=r(M_P, D_P),
                dwsq=r(D_P, D_P), dbsq=r(D_P))
    m, mt = Operand.matrix, Operand.matrix_t
    if name == "fc2":  # dW2 = dY^T GELU(H) (+ db2), dH = dY W2 * GELU'(H)
        return (Gemm(mt(dy), m(pre), m(outs["dw"]), D_P, DH_P, M_P, b_prologue=Gelu(),
                     epilogue=Epilogue(a_rowsum=outs["db"])),
                Gemm(m(dy), m(w), m(outs["dh"]), M_P, DH_P, D_P, epilogue=Epilogue(gelu_grad_of=pre))), outs
    if name == "fc1":  # dW1 = dH^T LN(x) (+ db1), dLN = dH W1
        return (Gemm(mt(pre), m(x), m(outs["dwT"]), DH_P, D_P, M_P, b_prologue=ln,
                     epilogue=Epilogue(a_rowsum=outs["dbh"])),
                Gemm(m(pre), mt(w), m(outs["dx"]), M_P, D_P, DH_P)), outs
    sq = r(D_P, D_P)
    if name == "proj":  # dx = dY W, dW = dY^T x (+ db)
        return (Gemm(m(dy), m(sq), m(outs["dx"]), M_P, D_P, D_P),
                Gemm(mt(dy), m(x), m(outs["dwsq"]), D_P, D_P, M_P, epilogue=Epilogue(a_rowsum=outs["dbsq"]))), outs
    # qkv (square here): dW = dY^T LN(x) (+ db), dLN = dY W
    return (Gemm(mt(dy), m(x), m(outs["dwsq"]), D_P, D_P, M_P, b_prologue=ln, epilogue=Epilogue(a_rowsum=outs["dbsq"])),
            Gemm(m(dy), m(sq), m(outs["dx"]), M_P, D_P, D_P)), outs


def _count_gemm_launches(monkeypatch) -> list:
    """Record every GEMM kernel launch of the core by form: pointer, pointer_pair, tma, tma_pair, cublas."""
    from fastvit_kernels.kernels import gemm_impl, matmul, matmul_tma

    calls = []
    for mod, name, tag in ((matmul, "_launch_pointer", "pointer"), (matmul, "_launch_pointer_pair", "pointer_pair"),
                           (matmul_tma, "launch", "tma"), (matmul_tma, "launch_pair", "tma_pair"),
                           (gemm_impl, "cublas_gemm", "cublas")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _tag=tag, **k: (calls.append(_tag), _real(*a, **k)))
    return calls


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_pair_is_one_launch_and_bit_identical(name, kernel, dtype, device, monkeypatch):
    """Each backward pair in ONE launch of the pair kernel (pointer and TMA forms) gives bit-identical outputs
    (C and the row sums) to the two GEMMs launched one by one; with gemm_pairs "off" they run one by one. On
    the pointer kernel the fc2 pair (GELU prologue), and on the TMA kernel fp32 pairs, run one by one (their pair
    forms spilled on sm_90)."""
    from fastvit_kernels import backend
    from fastvit_kernels.kernels.matmul import gemm, gemm_pair

    calls = _count_gemm_launches(monkeypatch)
    with backend.use_gemm_impl("triton"), backend.use_gemm_kernel(kernel):
        (s0, s1), ref = _pair_specs(name, dtype, device)
        gemm(s0)
        gemm(s1)
        assert calls == [kernel] * 2
        calls.clear()
        (s0, s1), out = _pair_specs(name, dtype, device)
        gemm_pair(s0, s1)
        alone = (name, kernel) == ("fc2", "pointer") or (kernel, dtype) == ("tma", torch.float32)
        assert calls == ([kernel] * 2 if alone else [f"{kernel}_pair"])
        for k in ref:
            assert torch.equal(ref[k], out[k]), (k, (ref[k].float() - out[k].float()).abs().max())
        calls.clear()
        (s0, s1), out = _pair_specs(name, dtype, device)
        with backend.use_gemm_pairs("off"):
            gemm_pair(s0, s1)
        assert calls == [kernel] * 2
        assert all(torch.equal(ref[k], out[k]) for k in ref)
        monkeypatch.setenv("FASTVIT_GEMM_PAIRS", "OFF")
        assert backend.gemm_pairs() == "off"


def test_gemm_pair_runs_separately_when_it_cannot_share_a_launch(device, monkeypatch):
    """A pair whose GEMMs the shape-aware rule sends to cuBLAS, or that carries a fusion the pair kernel lacks (a
    residual), runs as two launches, with the same results."""
    import dataclasses

    from fastvit_kernels import backend
    from fastvit_kernels.kernels.fusion import Epilogue, Operand
    from fastvit_kernels.kernels.matmul import gemm_pair

    calls = _count_gemm_launches(monkeypatch)
    (s0, s1), _ = _pair_specs("proj", torch.float32, device)
    with backend.use_gemm_impl("cublas"):
        gemm_pair(s0, s1)
    assert calls == ["cublas", "cublas"]
    calls.clear()
    (s0, s1), out = _pair_specs("proj", torch.float32, device)
    res = torch.randn(M_P, D_P, device=device)
    s0 = dataclasses.replace(s0, epilogue=Epilogue(residual=Operand.matrix(res)))
    with backend.use_gemm_impl("triton"), backend.use_gemm_kernel("pointer"):
        gemm_pair(s0, s1)
    assert calls == ["pointer", "pointer"]
    a, w = s0.a.tensor, s0.b.tensor
    torch.testing.assert_close(out["dx"], a @ w + res, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["proj", "fc2"])
def test_gemm_pair_after_a_tma_build_failure(name, device, monkeypatch):
    """Under "auto", a TMA pair kernel that fails to build warns once and the pair runs on the pointer kernel (its
    pair form; fc2's pair one by one), with the same results as two separate launches."""
    from fastvit_kernels import backend
    from fastvit_kernels.kernels import matmul, matmul_tma
    from fastvit_kernels.kernels.matmul import gemm, gemm_pair

    from triton.runtime.errors import OutOfResources

    def broken(*a, **k):
        raise OutOfResources(300000, 232448, "shared memory")

    with backend.use_gemm_impl("triton"), backend.use_gemm_kernel("pointer"):
        (s0, s1), ref = _pair_specs(name, torch.float16, device)
        gemm(s0)
        gemm(s1)
    calls = _count_gemm_launches(monkeypatch)
    monkeypatch.setattr(matmul_tma, "launch_pair", broken)
    monkeypatch.setattr(matmul, "_TMA_FAILED", False)
    monkeypatch.setattr(matmul, "_use_tma", lambda *a: True)  # as on a Hopper GPU under "auto"
    (s0, s1), out = _pair_specs(name, torch.float16, device)
    with backend.use_gemm_impl("triton"), pytest.warns(RuntimeWarning, match="TMA GEMM kernel failed to build"):
        gemm_pair(s0, s1)
    assert matmul._TMA_FAILED
    assert calls == (["pointer", "pointer"] if name == "fc2" else ["pointer_pair"]), calls
    assert all(torch.equal(ref[k], out[k]) for k in ref)


# ---- the pair kernel's balanced schedule (split-K of the long problem) ----
# M_SPLIT token rows: the weight-grad GEMMs' K = 1512 is 48 BLOCK_K steps of 32 (the last ragged) against 2 - 3 per
# dgrad tile (24 row tiles, the last ragged), so on the interpreter's 3 programs pair_schedule splits every pair
# in 3 (checked in the test)
M_SPLIT = 1512


def _spec_ref(spec):
    """fp32 reference (computed in float64) of one fusion.Gemm of the pair fusions: (C, row sums or None)."""
    from fastvit_kernels.kernels.fusion import Gelu, LayerNorm

    def logical(op, R, C):
        return torch.as_strided(op.tensor, (R, C), (op.rows, op.cols)).double().cpu()

    M, N, K, ep = spec.M, spec.N, spec.K, spec.epilogue
    a, b = logical(spec.a, M, K), logical(spec.b, K, N)
    if isinstance(spec.b_prologue, Gelu):
        b = F.gelu(b)
    if isinstance(spec.b_prologue, LayerNorm):
        ln = spec.b_prologue
        b = _ln(b, ln.mean.double().cpu(), ln.rstd.double().cpu(), ln.weight.double().cpu(), ln.bias.double().cpu())
    c = a @ b
    if ep.bias is not None:
        c = c + ep.bias.double().cpu()
    if ep.gelu_grad_of is not None:
        c = c * _gelu_grad(ep.gelu_grad_of.cpu()).double()
    return c.float(), (a.sum(1).float() if ep.a_rowsum is not None else None)


def _launch_tma_pair(s0, s1):
    """The TMA pair kernel on two fusion.Gemm (any dtype: gemm_pair itself runs fp32 pairs one by one)."""
    from fastvit_kernels.kernels import matmul_tma
    from fastvit_kernels.kernels._common import dot_precision
    from fastvit_kernels.kernels.gemm_configs import INTERPRETER_CONFIG

    matmul_tma.launch_pair(s0, s1, dot_precision=dot_precision(s0.compute_dtype), autotune=False,
                           config=dict(INTERPRETER_CONFIG))


def _count_reduce_launches(monkeypatch) -> list:
    """Record the grid of every launch of the split-K reduction kernel."""
    from fastvit_kernels.kernels import matmul_tma

    calls = []

    class Counting:
        def __getitem__(self, grid, _real=matmul_tma._split_k_reduce_kernel):
            calls.append(grid)
            return _real[grid]

    monkeypatch.setattr(matmul_tma, "_split_k_reduce_kernel", Counting())
    return calls


def test_pair_schedule_by_hand():
    """The schedule's makespan model on a case computed by hand, and on the ViT-B proj pair at batch 1024."""
    from fastvit_kernels.kernels.matmul_tma import MAX_WORKSPACE_BYTES, pair_schedule, slice_bounds

    # weight grad: 1 tile of 32 steps (K = 1000, BLOCK_K 32); dgrad: 16 tiles of 2 steps; 3 programs.
    # round-robin, whole tiles: program 0 gets the 32-step tile and units 3, 6, 9, 12, 15 (5 x 2): makespan 42.
    # split in 2: programs 0 / 1 get a 16-step slice and 5 dgrad tiles (26), program 2 six dgrad tiles (12).
    s = pair_schedule(((56, 56, 1000), (1000, 56, 56)), 3, 64, 64, 32)
    assert (s.first, s.split, s.grid, s.units, s.work) == (0, 2, 3, 18, 64)
    assert (s.makespan, s.baseline_makespan) == (26, 42)
    assert s.efficiency == pytest.approx(64 / 78) and s.baseline_efficiency == pytest.approx(64 / 126)
    # the same problems given dgrad first: walked weight-grad first all the same (the unbalanced walk, dgrad
    # first, puts the 32-step tile on program 1 after five dgrad tiles: 42)
    t = pair_schedule(((1000, 56, 56), (56, 56, 1000)), 3, 64, 64, 32)
    assert (t.first, t.split, t.makespan, t.baseline_makespan) == (1, 2, 26, 42)
    # slices differ by at most one step and tile the K loop
    bounds = [slice_bounds(32, 3, i) for i in range(3)]
    assert bounds == [(0, 10), (10, 21), (21, 32)]
    # ViT-B proj backward at batch 1024 (M = 1024 * 197 tokens) on 132 SMs with 128 x 128 x 32 tiles: 36 weight-grad
    # tiles of 6304 steps and 9456 dgrad tiles of 24; whole tiles round-robin keep 43 % of the SMs busy
    T, D = 1024 * 197, 768
    vitb = pair_schedule(((D, D, T), (T, D, D)), 132, 128, 128, 32)
    assert vitb.work == 36 * 6304 + 9456 * 24
    assert vitb.baseline_efficiency == pytest.approx(0.429, abs=0.002)
    assert vitb.efficiency > 0.99 and vitb.split == 11
    # the partials stay within MAX_WORKSPACE_BYTES: ViT-H fc2 (dW2 1280 x 5120, 26 MB per slice) at batch 1024
    # may take 5 slices, not MAX_SPLIT
    T = 1024 * 257
    vith = pair_schedule(((1280, 5120, T), (T, 5120, 1280)), 132, 128, 128, 32)
    assert 1 < vith.split <= MAX_WORKSPACE_BYTES // (1280 * 5120 * 4) == 5
    with pytest.raises(ValueError, match="problem 1"):
        pair_schedule(((8, 8, 8), (0, 8, 8)), 3, 64, 64, 32)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_pair_matches_reference_and_is_deterministic(name, dtype, device, monkeypatch):
    """A pair whose weight-grad GEMM pair_schedule splits into k-slices (M_SPLIT token rows): C and the row sums of
    both problems match the fp32 reference and the two GEMMs launched one by one (within the dtype's tolerance:
    the split groups the k sum by slice, so they are no longer bit-identical), and reruns are bit-identical
    (fixed-order reduction, no atomics). The reduction runs once per launch."""
    from fastvit_kernels import backend
    from fastvit_kernels.kernels.matmul import gemm
    from fastvit_kernels.kernels.matmul_tma import INTERPRETER_PROGRAMS, pair_schedule

    (s0, s1), _ = _pair_specs(name, dtype, device, M_P=M_SPLIT)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    sched = pair_schedule(tuple((s.M, s.N, s.K) for s in (s0, s1)), INTERPRETER_PROGRAMS,
                          cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
    wgrad = 0 if s0.K == M_SPLIT else 1
    assert sched.split > 1 and sched.first == wgrad and sched.efficiency > sched.baseline_efficiency
    reduces = _count_reduce_launches(monkeypatch)
    runs = []
    for _ in range(2):
        specs, out = _pair_specs(name, dtype, device, M_P=M_SPLIT)
        _launch_tma_pair(*specs)
        runs.append((specs, out))
    assert len(reduces) == 2
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k
    with backend.use_gemm_impl("triton"), backend.use_gemm_kernel("tma"):
        alone, _ = _pair_specs(name, dtype, device, M_P=M_SPLIT)
        for spec in alone:
            gemm(spec)
    assert len(reduces) == 2  # one by one: whole tiles, no reduction
    for spec, one in zip(runs[0][0], alone):
        ref, ref_rowsum = _spec_ref(spec)
        got = [(spec.c.tensor, ref, one.c.tensor)]
        if ref_rowsum is not None:
            got.append((spec.epilogue.a_rowsum, ref_rowsum, one.epilogue.a_rowsum))
        for actual, r, lone in got:
            # fp16: the one-by-one launch (same kernel, whole K loop) is the low-precision error to stay within
            assert_close_to_ref(actual.cpu(), r, None if dtype == torch.float32 else lone.cpu(), name=name)
            if dtype == torch.float32:
                torch.testing.assert_close(actual, lone, atol=1e-4, rtol=1e-4)


def test_split_pair_epilogues(device, monkeypatch):
    """The reduction applies the split problem's whole epilogue: bias, GELU' (tanh form) and the A row sums, on a
    weight-grad-shaped problem; the short problem keeps its own (bias) in the pair kernel."""
    from fastvit_kernels.kernels.fusion import Epilogue, Gemm, Operand

    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    dy, x, w = r(M_SPLIT, 48), r(M_SPLIT, 40), r(48, 40)
    c0, c1, rs, pre, b0, b1 = r(48, 40), r(M_SPLIT, 40), r(48), r(48, 40), r(40), r(40)
    s0 = Gemm(Operand.matrix_t(dy), Operand.matrix(x), Operand.matrix(c0), 48, 40, M_SPLIT,
              epilogue=Epilogue(bias=b0, gelu_grad_of=pre, a_rowsum=rs), gelu_approximate="tanh")
    s1 = Gemm(Operand.matrix(dy), Operand.matrix(w), Operand.matrix(c1), M_SPLIT, 40, 48, epilogue=Epilogue(bias=b1),
              gelu_approximate="tanh")
    reduces = _count_reduce_launches(monkeypatch)
    _launch_tma_pair(s0, s1)
    assert len(reduces) == 1
    ref0 = (dy.double().t() @ x.double() + b0.double()) * _gelu_grad(pre.cpu(), "tanh").double()
    torch.testing.assert_close(c0, ref0.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rs, dy.sum(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c1, dy @ w + b1, atol=1e-4, rtol=1e-4)


def test_unaligned_layernorm_pair_runs_one_by_one(device):
    """A backward pair with LayerNorm on B's load and a feature width that is not a multiple of 16 (a SwiGLU hidden
    width such as 2730) runs as two launches (its pair form spilled; AOT check); aligned ones pair."""
    from fastvit_kernels.kernels import matmul as mm

    global DH_P
    aligned = mm.pair_reason(*_pair_specs("fc1", torch.float16, device)[0])
    saved, DH_P = DH_P, 88
    try:
        unaligned = mm.pair_reason(*_pair_specs("fc1", torch.float16, device)[0])
        plain = mm.pair_reason(*_pair_specs("proj", torch.float16, device)[0])
    finally:
        DH_P = saved
    assert aligned is None and plain is None
    assert unaligned is not None and "LayerNorm on B's load" in unaligned
