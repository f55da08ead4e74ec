"""The package's explicit hooks (docs/design.md, "Instrumentation and launch recording"): the launch hook
(``kernels._launch``: every launch goes through it; inside ``recording`` launches are handed to a recorder instead of
running), the ops' instrumentation hook (``ops._instrument``: public ops and a fused op's phases report
themselves), and the contract they replace: neither the profiler nor the AOT trace replaces an attribute of any
module of the package while it runs."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvit_kernels
from fastvit_kernels import ops
from fastvit_kernels.kernels import _launch
from fastvit_kernels.ops import _instrument

_PKG = pathlib.Path(fastvit_kernels.__file__).parent


# ---------------------------------------------------------------------------------------------------------------
# launch recording
# ---------------------------------------------------------------------------------------------------------------
class _FakeKernel:
    """Stands for a Triton kernel: ``kernel[grid](*args, **kwargs)`` appends to ``ran``."""

    def __init__(self):
        self.ran = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.ran.append((grid, args, kwargs))


def test_launch_runs_the_kernel_without_a_recorder():
    k = _FakeKernel()
    assert not _launch.recording_active()
    _launch.launch(k, (3, 2), 1, "a", BLOCK=16)
    assert k.ran == [((3, 2), (1, "a"), {"BLOCK": 16})]


def test_recording_records_instead_of_launching_and_nests():
    k = _FakeKernel()
    outer, inner = [], []
    with _launch.recording(lambda *call: outer.append(call)) as rec:
        assert _launch.recording_active() and callable(rec)
        _launch.launch(k, (1,), 5, X=1)
        with _launch.recording(lambda *call: inner.append(call)):
            _launch.launch(k, (2,), 6)
        _launch.launch(k, (3,), 7)  # the outer recorder is back
    assert not _launch.recording_active()
    assert k.ran == []  # nothing launched while recording
    assert outer == [(k, (1,), (5,), {"X": 1}), (k, (3,), (7,), {})]
    assert inner == [(k, (2,), (6,), {})]
    with pytest.raises(RuntimeError, match="boom"), _launch.recording(lambda *call: None):
        raise RuntimeError("boom")
    assert not _launch.recording_active()  # restored after an error
    with pytest.raises(TypeError, match="recorder must be callable"), _launch.recording(None):
        pass


def test_a_real_launcher_is_recorded_with_its_kernel_object():
    """A package launcher hands its kernel object, grid and arguments to the recorder, and runs nothing."""
    from fastvit_kernels.kernels import layernorm

    x = torch.randn(6, 32)
    calls = []
    with _launch.recording(lambda *call: calls.append(call)):
        layernorm.row_stats(x, 1e-6)
    ((kernel, grid, args, kwargs),) = calls
    assert kernel is layernorm._layernorm_stats_kernel and args[0] is x
    assert set(kwargs) == {"RMS", "ROWS", "BLOCK_D", "num_warps"} and not kwargs["RMS"]
    assert grid == (-(-6 // kwargs["ROWS"]),) and kwargs["num_warps"] == 4


def _subscript_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of the form ``something[...](...)``: a Triton launch written directly."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]


def test_every_kernel_launch_goes_through_the_hook():
    """Static check over kernels/*.py: no ``kernel[grid](...)`` outside ``_launch.launch`` (a launch written directly
    would run under a recorder and escape the AOT trace). The one exception is the interpreter probe in
    kernels/__init__.py, which must really run (it checks the installed Triton and NumPy)."""
    direct = []
    for path in sorted((_PKG / "kernels").glob("*.py")):
        for call in _subscript_calls(ast.parse(path.read_text())):
            where = f"{path.name}:{call.lineno} {ast.unparse(call.func)}"
            if path.name == "_launch.py" or (path.name == "__init__.py" and ast.unparse(call.func) == "probe[1,]"):
                continue
            direct.append(where)
    assert not direct, f"kernel launches not through _launch.launch: {direct}"


# ---------------------------------------------------------------------------------------------------------------
# instrumentation
# ---------------------------------------------------------------------------------------------------------------
class _Log:
    """An observer logging ("enter" | "exit", name) events."""

    def __init__(self):
        self.events = []

    def __call__(self, name):
        log = self.events

        class Scope:
            def __enter__(self):
                log.append(("enter", name))

            def __exit__(self, *exc):
                log.append(("exit", name))

        return Scope()


def test_op_scope_is_a_no_op_without_an_observer():
    assert _instrument.op_scope("attention") is _instrument.op_scope("patch_embed")  # one shared null context
    with _instrument.op_scope("attention"):
        pass
    with pytest.raises(TypeError, match="observer must be callable"), _instrument.observing(3):
        pass


def test_observing_nests_and_restores():
    a, b = _Log(), _Log()
    with _instrument.observing(a):
        with _instrument.op_scope("x"):
            with _instrument.observing(b):
                with _instrument.op_scope("y"):
                    pass
            with _instrument.op_scope("z"):
                pass
    assert a.events == [("enter", "x"), ("enter", "z"), ("exit", "z"), ("exit", "x")]
    assert b.events == [("enter", "y"), ("exit", "y")]
    assert _instrument.op_scope("x") is _instrument.op_scope("y")  # no observer left behind


def _block_case():
    B, N, D, H = 2, 5, 32, 2
    w = lambda *s: (torch.randn(*s) / s[-1] ** 0.5).requires_grad_()  # noqa: E731
    return (torch.randn(B, N, D, requires_grad=True), (1 + 0.1 * torch.randn(D)).requires_grad_(),
            (0.1 * torch.randn(D)).requires_grad_(), w(3 * D, D), w(3 * D), w(D, D), w(D)), H


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_ops_and_the_fused_block_phases_report_themselves(backend):
    """Each public op runs inside its own scope; attention_block reports norm1 + qkv, attention and proj as the
    three ops they equal, in its forward and (reverse order) its backward -- on the Triton path from inside its
    custom ops, on the torch path around the reference pieces (whose backward autograd runs, unobserved)."""
    inputs, H = _block_case()
    x, nw, nb, wq, bq, wp, bp = inputs
    log = _Log()
    with _instrument.observing(log):
        out = ops.attention_block(*inputs, H, backend=backend)
        fwd = list(log.events)
        out.sum().backward()
        bwd = log.events[len(fwd):]
        qkv = ops.layernorm_linear(x, nw, nb, wq, bq, backend=backend)
        ops.linear_residual(ops.attention(qkv, H, backend=backend), wp, bp, x, backend=backend)
        three = log.events[len(fwd) + len(bwd):]
    phases = ["layernorm_linear", "attention", "linear_residual"]
    assert fwd == [("enter", "attention_block"), *[e for p in phases for e in (("enter", p), ("exit", p))],
                   ("exit", "attention_block")]
    assert bwd == ([e for p in reversed(phases) for e in (("enter", p), ("exit", p))] if backend == "triton" else [])
    assert three == [e for p in phases for e in (("enter", p), ("exit", p))]


def test_every_public_op_is_instrumented():
    names = set(ops.__all__) - {"flop_formulas", "register_flop_formulas"}
    for name in names:
        fn = getattr(ops, name)
        assert fn.__wrapped__ is not None and fn.__name__ == name, name  # the decorator keeps name and signature
    log = _Log()
    with _instrument.observing(log):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(16, 3, 4, 4), torch.randn(16), torch.randn(1, 5, 16),
                        torch.randn(1, 1, 16), backend="torch")
        x = torch.randn(1, 3, 16)
        ops.layernorm_mlp(x, torch.ones(16), torch.zeros(16), torch.randn(32, 16), None, torch.randn(16, 32), None,
                          backend="torch")
    assert [e for e in log.events if e[0] == "enter"] == [("enter", "patch_embed"), ("enter", "layernorm_mlp")]


# ---------------------------------------------------------------------------------------------------------------
# nothing is patched
# ---------------------------------------------------------------------------------------------------------------
# the hooks' own slots, set by their context managers (recording / observing): registering, not patching
# the hooks' own slots: the launch recorder (and _launch's dispatch slot, which holds it while recording) and the op
# observer
_HOOK_SLOTS = {("fastvit_kernels.kernels._launch", "_recorder"), ("fastvit_kernels.kernels._launch", "_intercept"),
               ("fastvit_kernels.ops._instrument", "_observer")}


def _snapshot() -> dict:
    """{module name: {attribute: id(value)}} of every loaded module of the package, the hooks' slots left out."""
    return {name: {k: id(v) for k, v in vars(mod).items() if (name, k) not in _HOOK_SLOTS}
            for name, mod in list(sys.modules.items())
            if (name == "fastvit_kernels" or name.startswith("fastvit_kernels.")) and isinstance(mod, types.ModuleType)}


def _changed(before: dict, now: dict) -> list[str]:
    out = []
    for name, attrs in before.items():
        cur = now.get(name, {})
        out += [f"{name}.{k}" for k, v in attrs.items() if cur.get(k) != v]
    return out


class _NoPatchCheck(TorchDispatchMode):
    """While active, compares the package's module attributes with ``before`` at every ``fastvit::*`` op and every
    ``every``-th other op (the points where a patch would be in effect); collects what differs."""

    def __init__(self, before: dict, every: int = 25):
        super().__init__()
        self.before, self.every, self.seen, self.checks, self.changed = before, every, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        if func.namespace == "fastvit" or self.seen % self.every == 0:
            self.checks += 1
            self.changed.update(_changed(self.before, _snapshot()))
        return func(*args, **(kwargs or {}))


def test_profiling_patches_no_module_attribute():
    from fastvit_kernels import create_model
    from fastvit_kernels.bench.devices import Peak
    from fastvit_kernels.bench.profile import profile_step

    model = create_model("vit_micro_patch4_32", depth=1, img_size=16, backend="triton")
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = dict(peak=Peak(None, None, "unknown"), warmup=0, iters=1)
    profile_step(model, images, labels, opt, **kw)  # lazy imports and first-use caches settle
    before = _snapshot()
    with _NoPatchCheck(before, every=1) as check:
        result = profile_step(model, images, labels, opt, **kw)
    assert check.checks > 10 and not check.changed, sorted(check.changed)
    assert not _changed(before, _snapshot())
    assert {r.op_class for r in result.rows} >= {"ln_qkv", "attention", "proj", "mlp"}


_AOT_NO_PATCH = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_hooks import _NoPatchCheck, _changed, _snapshot
from fastvit_kernels import aot

args = dict(models=["vit_micro_patch4_32"], dtypes=["bf16"], modes=["train"])
aot.trace_grids(batches=[2], img_sizes=[0], **args)  # lazy imports settle
before = _snapshot()
with _NoPatchCheck(before) as check:
    jobs, never = aot.trace([80], batches=[2], **args)
    rows = aot.trace_grids(batches=[2], img_sizes=[0, 64], **args)
assert check.checks > 10, check.checks
assert not check.changed, sorted(check.changed)
assert not _changed(before, _snapshot())
assert jobs and {{r["name"] for r in rows}} >= {{"_matmul_kernel", "_attention_fwd_kernel", "_layernorm_stats_kernel"}}
print(len(jobs), len(rows))
'''


def test_aot_trace_patches_no_module_attribute():
    """The AOT trace (compile trace on CPU tensors and grid trace on meta tensors, without the interpreter: in a
    subprocess) records launches through the hook with every module of the package untouched."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _AOT_NO_PATCH.format(tests=str(pathlib.Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
