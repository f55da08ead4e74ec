"""LayerNorm backward (kernels/layernorm.py) in one launch: dx, dgamma, dbeta against autograd through
F.layer_norm in fp64, with several programs writing fp32 partial rows that a two-level tree reduces (groups of
BWD_GROUP = 16 programs, the last program of each group sums the group's rows; the last group to finish sums the
group rows); every ticket counter (global and per group) is back at 0 after every call, results are bit-identical
across calls, each call is exactly one kernel launch, and dgamma / dbeta are the sums of the partial rows within
fp32 rounding."""

import pytest
import torch
import torch.nn.functional as F

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
    """Wrap ``_layernorm_bwd_kernel`` so that each launch appends {argument name: value, "grid": grid} to the
    returned list (the scratch buffers ``part_ptr`` / ``group_part_ptr`` can be read after the call)."""
    real, calls = ln._layernorm_bwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                calls.append({**dict(zip(real.arg_names, args)), **kwargs, "grid": grid})
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
    counter = ln.ticket_counter(x.device)
    runs = []
    for _ in range(2):
        with count_launches(monkeypatch) as launches:
            runs.append(ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres))
        assert launches == {"_layernorm_bwd_kernel": 1}, launches
        assert not counter.any(), counter  # every counter reset by its last program: no memset before the next launch
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # fixed summation order
    _check_against_autograd(x, dy, dres, gamma, beta, *runs[0])


# 1: one program; 3: one partial group; 16: exactly one full group; 17: a full group + a 1-program group;
# 40: groups of 16, 16, 8; None (the default cap): 81 programs = 5 full groups + a 1-program group
@pytest.mark.parametrize("programs", [1, 3, 16, 17, 40, None])
@pytest.mark.parametrize("with_dres", [False, True])
@pytest.mark.parametrize("dtype", DTYPES_INTERPRETER, ids=DTYPE_IDS)
def test_layernorm_bwd_program_groups(dtype, with_dres, programs, device, monkeypatch):
    """The two-level tree for 1 to 81 programs (each looping over 2 or more row blocks when capped): values right,
    every counter slot (global and per group) back to 0 after each call, bit-identical calls, one launch each,
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
    counter = ln.ticket_counter(x.device)
    assert counter.numel() >= 1 + n_groups
    calls = _record_launches(ln, monkeypatch)
    runs = []
    for _ in range(2):
        with count_launches(monkeypatch) as launches:
            runs.append(ln.layernorm_bwd(x, dy, gamma, mean, rstd, dres=dres))
        assert launches == {"_layernorm_bwd_kernel": 1}, launches
        assert not counter.any(), counter  # global slot and every group slot
    assert [c["grid"] for c in calls] == [(n_prog,)] * 2 and all(c["counter_ptr"] is counter for c in calls)
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


def test_ticket_counter_is_persistent_per_device_and_stream(device, monkeypatch):
    from fastvit_kernels.kernels import layernorm as ln

    monkeypatch.setattr(ln, "_COUNTERS", {})
    slots = 1 + -(-ln.BWD_PROGRAMS // ln.BWD_GROUP)  # the global counter + one per group of the default cap
    assert slots == 17
    c = ln.ticket_counter(torch.device(device))
    assert c is ln.ticket_counter(device) and c.dtype == torch.int32 and c.shape == (slots,) and not c.any()
    monkeypatch.setattr(ln, "BWD_PROGRAMS", 40)  # fewer programs: the same (larger) buffer is reused
    assert ln.ticket_counter(device) is c
    monkeypatch.setattr(ln, "BWD_PROGRAMS", 1000)  # more programs than the buffer was made for: a larger one
    big = ln.ticket_counter(device)
    assert big.shape == (1 + -(-1000 // ln.BWD_GROUP),) and not big.any() and ln.ticket_counter(device) is big
    if torch.cuda.is_available():
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            c2 = ln.ticket_counter(device)
            assert c2 is ln.ticket_counter(device)
        assert c2 is not big  # concurrent streams never share tickets
