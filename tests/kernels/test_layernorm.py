"""LayerNorm backward (kernels/layernorm.py) in one launch: dx, dgamma, dbeta against autograd through
F.layer_norm in fp64, with several programs writing fp32 partial rows that a two-level tree reduces (groups of
BWD_GROUP = 16 programs, the last program of each group sums the group's rows; the last group to finish sums the
group rows); each call zero-fills a fresh ticket-counter buffer (one fill) and makes exactly one kernel launch, no
module state keeps a counter alive, results are bit-identical across calls, and dgamma / dbeta are the sums of the
partial rows within fp32 rounding."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from helpers import DTYPES_INTERPRETER, assert_close_to_ref, count_launches

DTYPE_IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def _inputs(M, D, dtype, device):
    x = (torch.randn(M, D, device=device) * 2 + 0.5).to(dtype)
    dy, dres = torch.randn(M, D, device=device).to(dtype), torch.randn(M, D, device=device).to(dtype)
    gamma, beta = torch.randn(D, device=device).to(dtype), torch.randn(D, device=device).to(dtype)
    return x, dy, dres, gamma, beta


def _torch_grads(x, dy, gamma, beta, dtype):
    """(dx, dgamma, dbeta) of F.layer_norm by autograd on the CPU, the inputs' values in ``dtype``."""
    xr, gr, br = (t.detach().cpu().to(dtype).requires_grad_(True) for t in (x, gamma, beta))
    F.layer_norm(xr, (x.shape[1],), gr, br, 1e-6).backward(dy.cpu().to(dtype))
    return xr.grad, gr.grad, br.grad


def _check_against_autograd(x, dy, dres, gamma, beta, dx, dgamma, dbeta):
    dtype, D = x.dtype, x.shape[1]
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == dtype and dgamma.shape == dbeta.shape == (D,)
    ref = _torch_grads(x, dy, gamma, beta, torch.float64)
    lowp = _torch_grads(x, dy, gamma, beta, dtype) if dtype != torch.float32 else (None,) * 3
    if dres is not None:
        ref = (ref[0] + dres.cpu().double(),) + ref[1:]
        lowp = (lowp[0] + dres.cpu() if lowp[0] is not None else None,) + lowp[1:]
    for name, got, r, lp in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), ref, lowp):
        assert_close_to_ref(got.cpu(), r, lp, name=name)


def _record_launches(ln, monkeypatch) -> list:
    """Wrap ``_layernorm_bwd_kernel`` so that each launch appends {argument name: value, "grid": grid,
    "counter_at_launch": a copy of the ticket counters as the launch found them} to the returned list (the scratch
    buffers ``part_ptr`` / ``group_part_ptr`` can be read after the call)."""
    real, calls = ln._layernorm_bwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                named = {**dict(zip(real.arg_names, args)), **kwargs}
                with _disable_current_modes():  # the copy is the test's, not a launch of the op's
                    counter_at_launch = named["counter_ptr"].clone()
                calls.append({**named, "grid": grid, "counter_at_launch": counter_at_launch})
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(ln, "_layernorm_bwd_kernel", Recorder())
    return calls


def _expected_programs(ln, M, D):
    rows, _ = ln._rows_per_program(D)
    n_prog = max(1, min(-(-M // rows), ln.BWD_PROGRAMS))
    return rows, n_prog, -(-n_prog // ln.BWD_GROUP)


@pytest.mark.parametrize("programs", [1, 3, None])  # None: the default cap BWD_PROGRAMS
@pytest.mark.parametrize("with_dres", [False, True])
@pytest.mark.parametrize("M", [1, 17, 197])
@pytest.mark.parametrize("D", [64, 80, 160])  # 80, 160: not powers of two
@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER, ids=DTYPE_IDS)
def test_layernorm_bwd_one_launch_matches_autograd(dtype, D, M, with_dres, programs, device, monkeypatch):
    from fastvit_kernels.kernels import layernorm as ln

    if programs is not None:
        monkeypatch.setattr(ln, "BWD_PROGRAMS", programs)
    x, dy, dres, gamma, beta = _inputs(M, D, dtype, device)
    dres = dres if with_dres else None
    mean, rstd = ln.row_stats(x, 1e-6)
    runs = []
    for _ in range(2):
        with count_launches(monkeypatch) as launches:
            runs.append(ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres))
        assert launches == {"aten.zeros": 1, "_layernorm_bwd_kernel": 1}, launches  # the counters' fill, the kernel
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # fixed summation order
    _check_against_autograd(x, dy, dres, gamma, beta, *runs[0])


# 1: one program; 3: one partial group; 16: exactly one full group; 17: a full group + a 1-program group;
# 40: groups of 16, 16, 8; None (the default cap): 81 programs = 5 full groups + a 1-program group
@pytest.mark.parametrize("programs", [1, 3, 16, 17, 40, None])
@pytest.mark.parametrize("with_dres", [False, True])
@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER, ids=DTYPE_IDS)
def test_layernorm_bwd_program_groups(dtype, with_dres, programs, device, monkeypatch):
    """The two-level tree for 1 to 81 programs (each looping over 2 or more row blocks when capped): values right,
    a zero-filled counter slot per group plus the global one, bit-identical calls, one fill and one launch each,
    scratch of P partial rows and ceil(P / 16) group rows."""
    from fastvit_kernels.kernels import layernorm as ln

    if programs is not None:
        monkeypatch.setattr(ln, "BWD_PROGRAMS", programs)
    M, D = 2 * 16 * 40 + 7, 80  # 81 row blocks of 16 rows
    rows, n_prog, n_groups = _expected_programs(ln, M, D)
    assert rows == 16 and n_prog == (programs or 81)
    x, dy, dres, gamma, beta = _inputs(M, D, dtype, device)
    dres = dres if with_dres else None
    mean, rstd = ln.row_stats(x, 1e-6)
    calls = _record_launches(ln, monkeypatch)
    runs = []
    for _ in range(2):
        with count_launches(monkeypatch) as launches:
            runs.append(ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres))
        assert launches == {"aten.zeros": 1, "_layernorm_bwd_kernel": 1}, launches
    assert [c["grid"] for c in calls] == [(n_prog,)] * 2
    assert all(c["counter_at_launch"].shape == (1 + n_groups,) and not c["counter_at_launch"].any() for c in calls)
    assert calls[0]["part_ptr"].shape == (n_prog, 2 * D) and calls[0]["group_part_ptr"].shape == (n_groups, 2 * D)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # fixed summation order
    _check_against_autograd(x, dy, dres, gamma, beta, *runs[0])


@pytest.mark.parametrize("programs", [3, 16, 40, None])
def test_layernorm_bwd_tree_matches_fp64_sum_of_partials(programs, device, monkeypatch):
    """Each partial row is its program's fp32 sum of dy * xhat (dgamma) and dy (dbeta) over its row blocks
    pid, pid + P, ...; each group row is the sum of its group's partial rows, and dgamma / dbeta the sum of all
    partial rows, both against fp64 sums within the fp32 rounding bound of a sum of n terms, n * u * sum |terms|
    per column (a missing, doubled or stale row is far outside it). With one group the second level sums one row:
    dgamma / dbeta are the group row's bits."""
    from fastvit_kernels.kernels import layernorm as ln

    if programs is not None:
        monkeypatch.setattr(ln, "BWD_PROGRAMS", programs)
    M, D = 3 * 197 * 4, 160  # 148 row blocks of 16 rows: the default cap gives 148 programs in 10 groups
    rows, n_prog, n_groups = _expected_programs(ln, M, D)
    x, dy, _, gamma, _ = _inputs(M, D, torch.float32, device)
    mean, rstd = ln.row_stats(x, 1e-6)
    calls = _record_launches(ln, monkeypatch)
    _, dgamma, dbeta = ln.layernorm_bwd(x, dy, gamma, mean, rstd)
    part, group_part = calls[0]["part_ptr"].cpu().double(), calls[0]["group_part_ptr"].cpu().double()
    assert part.shape == (n_prog, 2 * D) and group_part.shape == (n_groups, 2 * D)
    u = 2.0 ** -24

    def assert_sum(got, terms, what):
        exact, bound = terms.sum(0), terms.shape[0] * u * terms.abs().sum(0) + 1e-30
        err = (got - exact).abs()
        assert (err <= bound).all(), f"{what}: error {(err / bound).max().item():.1f}x the fp32 bound"

    # the partial rows: program p owns row blocks p, p + P, ... (loose check: fp32 sums of many rows)
    xhat = (x.double() - mean.double()[:, None]) * rstd.double()[:, None]
    owner = (torch.arange(M, device=x.device) // rows) % n_prog
    want = torch.zeros(n_prog, 2 * D, dtype=torch.float64, device=x.device)
    want.index_add_(0, owner, torch.cat([dy.double() * xhat, dy.double()], 1))
    torch.testing.assert_close(part, want.cpu(), atol=1e-4, rtol=1e-5)
    # level 1: group g sums partial rows 16g .. 16g + size - 1
    G = ln.BWD_GROUP
    for g in range(n_groups):
        assert_sum(group_part[g], part[g * G:(g + 1) * G], f"group {g}")
    # level 2 (fp32 gamma: dgamma / dbeta are the fp32 sums themselves); and the whole tree within its bound
    got = torch.cat([dgamma, dbeta]).cpu().double()
    assert_sum(got, group_part, "groups")
    exact, tree_bound = part.sum(0), (G + n_groups) * u * part.abs().sum(0)
    assert ((got - exact).abs() <= tree_bound).all()
    if n_groups == 1:
        assert torch.equal(got, group_part[0])  # one group: the one-level sum of the partial rows in order


def _tensors_in(obj, depth: int = 0) -> list:
    """Tensors reachable from ``obj`` through dicts, lists, tuples and sets (a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3:
        return []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set, frozenset)) else ()
    return [t for item in items for t in _tensors_in(item, depth + 1)]


def test_ticket_counter_is_fresh_per_launch_and_not_kept_alive(device, monkeypatch):
    """Safe under CUDA graphs and cudagraph trees: each launch gets a new zero-filled counter buffer that nothing
    outlives the call (a buffer held by module state would stay in a graph pool it was first made in), and a
    counter left non-zero by an earlier launch (an interrupted one, or one whose memory was handed on) cannot
    reach the next launch. On the CPU this checks the buffers' lifetimes and contents; the graph pools themselves
    need a GPU."""
    from fastvit_kernels.kernels import layernorm as ln

    M, D = 197, 80  # 13 programs in one group
    x, dy, _, gamma, _ = _inputs(M, D, torch.float32, device)
    mean, rstd = ln.row_stats(x, 1e-6)
    real, seen = ln._layernorm_bwd_kernel, []

    class Spy:
        """Records each launch's counters (contents at launch, a weak reference), then, after the launch, leaves
        them non-zero as an interrupted launch would."""

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                counter = dict(zip(real.arg_names, args))["counter_ptr"]
                seen.append((counter.clone(), weakref.ref(counter)))
                out = real[grid](*args, **kwargs)
                counter.fill_(7)
                return out
            return run

    monkeypatch.setattr(ln, "_layernorm_bwd_kernel", Spy())
    first = ln.layernorm_bwd(x, dy, gamma, mean, rstd)
    second = ln.layernorm_bwd(x, dy, gamma, mean, rstd)
    gc.collect()
    assert len(seen) == 2
    for at_launch, ref in seen:
        assert ref() is None, "the ticket counters outlive the call (kept alive by module state?)"
        assert not at_launch.any(), at_launch
        assert at_launch.dtype == torch.int32 and at_launch.shape == (2,), at_launch  # global + one group
    for name, a, b in zip(("dx", "dgamma", "dbeta"), first, second):
        assert torch.equal(a, b), f"{name}: the second launch saw the first launch's tickets"
    held = [name for name, v in vars(ln).items() if not name.startswith("__") and _tensors_in(v)]
    assert not held, f"module state of kernels/layernorm.py holds tensors: {held}"
    with pytest.raises(ValueError, match="n_groups"):
        ln.ticket_counter(x.device, 0)


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@_needs_cuda
def test_layernorm_bwd_replays_in_a_captured_cuda_graph():
    """Captured once, replayed three times: each replay refills the counters (the fill is captured with the
    kernel) and gives the eager launch's bits."""
    from fastvit_kernels.kernels import layernorm as ln

    x, dy, dres, gamma, _ = _inputs(197 * 4, 160, torch.float32, "cuda")
    mean, rstd = ln.row_stats(x, 1e-6)
    want = ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres)
    for _ in range(3):
        for t in got:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
            assert torch.equal(a, b), name


@_needs_cuda
def test_layernorm_mlp_training_under_cudagraph_trees():
    """torch.compile(mode="reduce-overhead"): warm-up, recording and replays of the forward and the backward
    (whose LayerNorm backward allocates its counters inside the graph pool) give eager's gradients on every
    step, and cudagraph trees' memory-pool checks pass."""
    from fastvit_kernels.ops import layernorm_mlp

    torch._dynamo.reset()
    D = 64
    params = [1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D), torch.randn(4 * D, D) / D**0.5,
              0.1 * torch.randn(4 * D), torch.randn(D, 4 * D) / (4 * D) ** 0.5, 0.1 * torch.randn(D)]
    params = [p.cuda().requires_grad_(True) for p in params]

    def f(x):
        return layernorm_mlp(x, *params, backend="triton")

    compiled = torch.compile(f, mode="reduce-overhead")
    for step in range(4):
        x = torch.randn(2, 17, D, device="cuda")
        g = torch.randn(2, 17, D, device="cuda")
        for p in params:
            p.grad = None
        torch.compiler.cudagraph_mark_step_begin()
        compiled(x).backward(g)
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        f(x).backward(g)
        for i, (a, p) in enumerate(zip(got, params)):
            torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step} param {i}: {m}")
