"""The CUDA cubin route (kernels/_cubins.py, kernels/_launch.py) on a machine without a GPU: each launch the ViT-B/16
fp16 inference ops make binds to its AOT table row with the argument lists of ``fastvit_csrc::launch`` (checked
against lists written here from the kernel's own Python signature), a launch the table lacks is a clear error, and
with ``_C`` loaded, ``FASTVIT_CUBINS`` set and the launcher ``cpp`` a launch reaches ``_C``'s ``fastvit_csrc::launch``
(which refuses the CPU tensors: nothing can run here); without ``FASTVIT_CUBINS`` launches stay Triton's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.csrc.conftest import ROOT, run_isolated, subprocess_env

# Records the launches of ViT-B/16 fp16 inference (FASTVIT_AUTOTUNE=0, no _C) and, for each launch and arch, binds
# it with _cubins.bind and builds the expected lists independently: the kernel's Python signature bound to the
# launch's arguments, its non-constexpr, non-folded parameters in order (tensor -> tensors; tensor descriptor ->
# its base in tensors and its shape then strides in ints; bool / int -> ints; float -> floats).
_BIND = r'''
import inspect, json, sys, torch
from triton.runtime.autotuner import Autotuner
from triton.tools.tensor_descriptor import TensorDescriptor
from fastvit_kernels import aot
from fastvit_kernels.kernels import _cubins, _launch

table = _cubins.load_table(sys.argv[1])
report = dict(bound=[], mismatches=[], unmatched=[], autotuners=0, errors={})

def expected(kernel, grid, args, kwargs, row):
    # an autotuner's configuration adds constexprs and launch options only, which the row states
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    kwargs = {**row["constexprs"], **row["options"], **kwargs}
    sig = inspect.signature(fn.fn)
    b = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    b.apply_defaults()
    tensors, ints, floats = [], [], []
    for p in fn.params:
        if p.is_constexpr or p.name in row["folded"]:
            continue
        v = b.arguments[p.name]
        if isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, TensorDescriptor):
            tensors.append(v.base)
            ints += [int(s) for s in v.shape] + [int(s) for s in v.strides]
        elif isinstance(v, (bool, int)):
            ints.append(int(v))
        else:
            floats.append(float(v))
    g = grid({**b.arguments, **kwargs}) if callable(grid) else grid
    return tuple(g) + (1,) * (3 - len(g)), tensors, ints, floats

def same_tensors(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))

def record(kernel, grid, args, kwargs):
    if isinstance(kernel, Autotuner):
        report["autotuners"] += 1
    name = getattr(kernel, "fn", kernel).__name__
    for arch in ARCHS:
        try:
            got = _cubins.bind(kernel, grid, args, kwargs, arch, table)
        except RuntimeError as err:
            report["unmatched"].append(name)
            report["errors"].setdefault(name, str(err))
            continue
        row = next(r for r in table.rows if r["symbol"] == got.symbol)
        assert row["kernel"] == name and row["cc"] == arch, (got.symbol, name, arch)
        grid3, tensors, ints, floats = expected(kernel, grid, args, kwargs, row)
        ok = (got.grid == grid3 and same_tensors(got.tensors, tensors) and got.ints == ints and got.floats == floats
              and all(type(i) is int for i in got.ints) and all(type(f) is float for f in got.floats))
        report["bound"].append(dict(symbol=got.symbol, ints=len(got.ints), floats=len(got.floats),
                                    tensors=len(got.tensors)))
        if not ok:
            report["mismatches"].append(dict(symbol=got.symbol, got=[got.grid, len(got.tensors), got.ints, got.floats],
                                             want=[grid3, len(tensors), ints, floats]))
        if name == "_prefix_rows_kernel" and arch == 90:  # (b): the same launch with a constexpr the table lacks
            try:
                _cubins.bind(kernel, grid, args, {**kwargs, "BLOCK_D": 512}, arch, table)
            except RuntimeError as err:
                report["errors"]["constexpr"] = str(err)

for ARCHS, setting in aot.build_passes((80, 90)):  # the build's passes: each binds for its archs
    with setting(), _launch.recording(record):
        for what, thunk in aot.vit_workloads("vit_base_patch16_224", aot.DTYPES["fp16"], 1, "infer"):
            thunk()
bad = dict(json.load(open(sys.argv[1])), format="fastvit_kernels.aot.build/0")
json.dump(bad, open(sys.argv[2] + "/kernels.json", "w"))
try:
    _cubins.load_table(sys.argv[2])
except ValueError as err:
    report["errors"]["format"] = str(err)
try:
    _cubins.load_table(sys.argv[2] + "/missing")
except FileNotFoundError as err:
    report["errors"]["missing"] = str(err)
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def bound_launches(aot_table, tmp_path_factory) -> dict:
    """The report of ``_BIND`` over the small table's launches."""
    env = subprocess_env()
    env.update(FASTVIT_AUTOTUNE="0", FASTVIT_C_LIBRARY="none")
    bad = tmp_path_factory.mktemp("bad_table")
    proc = subprocess.run([sys.executable, "-c", _BIND, str(aot_table), str(bad)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["bad_table"] = str(bad)
    return report


@pytest.mark.aot
def test_table_format_matches_the_build():
    from fastvit_kernels.aot import build
    from fastvit_kernels.kernels import _cubins

    assert _cubins.FORMAT == build.FORMAT and _cubins.TABLE == build.TABLE


@pytest.mark.aot
def test_bind_gives_the_launch_lists(bound_launches, aot_table):
    """Every row of the table is bound by some launch of the workload, and each bound launch's grid and
    (tensors, ints, floats) equal the lists written from the kernel's Python signature."""
    table = json.loads(aot_table.read_text())
    assert not bound_launches["mismatches"], bound_launches["mismatches"][:3]
    assert {b["symbol"] for b in bound_launches["bound"]} == {r["symbol"] for r in table["kernels"]}
    by_kernel = {b["symbol"].rsplit("_", 2)[0]: b for b in bound_launches["bound"]}
    assert by_kernel["attention_fwd_kernel"]["floats"] == 1  # qk_scale
    assert by_kernel["matmul_tma_kernel"]["tensors"] == 3 + 8  # a, b, c descriptor bases + 8 epilogue pointers
    assert by_kernel["prefix_rows_kernel"] == dict(symbol=by_kernel["prefix_rows_kernel"]["symbol"], ints=4,
                                                   floats=0, tensors=4)


@pytest.mark.aot
def test_unmatched_launch_is_a_clear_error(bound_launches, aot_table):
    """A launch the table has no cubin for (a kernel outside the build's filter; the class-token kernel with another
    BLOCK_D) raises naming the kernel, the arch, the constexprs and the table, and says how to rebuild; a table of
    another format or a missing one is refused."""
    errors = bound_launches["errors"]
    # the patch embedding's pointer GEMM is outside the small build's kernel filter
    assert "_matmul_kernel" in bound_launches["unmatched"]
    msg = errors["constexpr"]
    assert msg.startswith(f"fastvit_kernels: the cubin table {aot_table} has no cubin for _prefix_rows_kernel on "
                          "sm_90 with constexprs {'NUM_CLS': 1, 'ADD_POS': True, 'BLOCK_D': 512}")
    assert "python -m fastvit_kernels.aot build --arch sm_90 --model MODEL --dtype DTYPE" in msg
    assert "it has 1 other variants of _prefix_rows_kernel for sm_90" in msg
    # the Hopper-only TMA GEMM has no sm_80 rows
    assert "_matmul_tma_kernel" in bound_launches["unmatched"]
    assert "no cubin for _matmul_tma_kernel on sm_80" in errors["_matmul_tma_kernel"]
    assert errors["format"] == (f"{bound_launches['bad_table']}/kernels.json has format "
                                "'fastvit_kernels.aot.build/0'; this fastvit_kernels reads "
                                "'fastvit_kernels.aot.build/1' (rebuild the table with python -m fastvit_kernels.aot "
                                "build)")
    assert errors["missing"].startswith("no cubin table ") and "FASTVIT_CUBINS" in errors["missing"]


# The class-token rows launch of ViT-B/16 fp16 (batch 1, D 768) made through _launch.launch in a process with _C
# loaded and the launcher cpp; plus a stand-in kernel that records whether Triton's launch path was taken.
_ROUTE = r'''
import json, torch
import fastvit_kernels
from fastvit_kernels import _library
from fastvit_kernels.kernels import _launch, patch_embed

class StandIn:  # what Triton's path does with a kernel: kernel[grid](*args, **kwargs)
    calls = []
    def __getitem__(self, grid):
        return lambda *args, **kwargs: StandIn.calls.append(grid)

out = {{"launcher": _library.launcher(), "loaded": _library.csrc_loaded()}}
x = torch.zeros(4, dtype=torch.float16)
_launch.launch(StandIn(), (1,), x)  # CPU tensors, route not forced: Triton's path (decides the route)
out["route"] = _launch.cubin_route()
D = 768
tokens = torch.empty(1, 197, D, dtype=torch.float16)
cls, pos = torch.zeros(1, 1, D, dtype=torch.float16), torch.zeros(1, 197, D, dtype=torch.float16)
weight = torch.zeros(D, 3, 16, 16, dtype=torch.float16)
with _launch._route_cpu_tensors({cc}):
    if out["route"] is None:  # the route is off: even a forced launch is Triton's
        _launch.launch(StandIn(), (2,), x)
    else:
        try:
            _launch.launch(patch_embed._prefix_rows_kernel, (1, 1), tokens, cls, weight, pos, D, tokens.stride(0),
                           tokens.stride(1), pos.stride(1), NUM_CLS=1, ADD_POS=True, BLOCK_D=1024)
        except RuntimeError as err:
            out["error"] = str(err).splitlines()[0]
        else:
            out["error"] = None
out["triton_calls"] = StandIn.calls
print(json.dumps(out))
'''


def _route(csrc_library, env: dict, cc: int = 90) -> dict:
    env = {"FASTVIT_C_LIBRARY": str(csrc_library), "FASTVIT_LAUNCHER": "cpp", "FASTVIT_AUTOTUNE": "0",
           "PYTHONPATH": str(ROOT), **env}
    proc = run_isolated(_ROUTE.format(cc=cc), env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.aot
def test_route_reaches_csrc_launch(csrc_library, aot_table):
    """With _C loaded, FASTVIT_CUBINS set and the launcher cpp, a launch on CPU tensors stays Triton's, and the
    same launch forced onto the route (as a CUDA tensor's would be) binds to the table's cubin and reaches
    fastvit_csrc::launch, which accepts the bound lists (it checks them before the device) and refuses CPU
    tensors: the route is wired end to end, nothing runs without a GPU."""
    got = _route(csrc_library, {"FASTVIT_CUBINS": str(aot_table.parent)})
    assert got["loaded"] and got["launcher"] == "cpp" and got["route"] == str(aot_table)
    assert got["triton_calls"] == [[1]]
    symbol = next(r["symbol"] for r in json.loads(aot_table.read_text())["kernels"]
                  if r["kernel"] == "_prefix_rows_kernel" and r["cc"] == 90)
    assert got["error"] is not None and f"fastvit_csrc::launch ({symbol}): every tensor must be on CUDA device" \
        in got["error"], got["error"]


@pytest.mark.aot
def test_route_off_without_cubins(csrc_library):
    """Without FASTVIT_CUBINS the route is off: every launch goes to Triton's path, the forced one included."""
    got = _route(csrc_library, {})
    assert got["loaded"] and got["launcher"] == "cpp" and got["route"] is None
    assert got["triton_calls"] == [[1], [2]]


def test_cubins_without_csrc_is_an_error(tmp_path):
    """FASTVIT_CUBINS without _C: the first launch raises (nothing could launch the cubins), never a silent JIT;
    info reports the table."""
    proc = run_isolated("""
        import torch
        from fastvit_kernels import info
        from fastvit_kernels.kernels import _launch
        report = info.format_report(info.report()).splitlines()
        rows = [line.strip() for line in report if line.strip().startswith("cubin table")]
        print(len(rows), rows[0])
        try:
            _launch.launch(None, (1,), torch.zeros(1))
        except RuntimeError as err:
            print(str(err).splitlines()[0])
    """, env={"FASTVIT_C_LIBRARY": "none", "FASTVIT_CUBINS": str(tmp_path), "PYTHONPATH": str(ROOT)})
    row, msg = proc.stdout.strip().splitlines()[-2:]
    assert row.startswith("1 cubin table") and f"no cubin table {tmp_path}/kernels.json" in row, row
    assert msg.startswith(f"FASTVIT_CUBINS={str(tmp_path)!r} but the C++ op library fastvit_kernels._C, which "
                          "launches the cubins, is not loaded")
