"""The C++ CUDA kernels of the fastvit::* ops (csrc/cuda/plans.cpp) and the launch plans they replay
(fastvit_kernels/aot/plans.py), on a machine without a GPU.

The plan kernels run here through their dry run: ``fastvit_csrc::plan_dry_run(cc)`` makes the CUDA kernel accept
CPU tensors as a GPU of compute capability ``cc`` and log each launch (symbol, grid, pointers, ints, floats)
instead of calling the driver; the CUDA kernel is reached with ``OpOverload.redispatch`` on the CUDA key. Every
plan of an unfiltered ViT-B/16 fp16 training + inference build must replay exactly the launches the op's Python
launcher binds for the same tensors on the cubin route (same cubins, grids, integer and float arguments, and
pointers into the same arguments and outputs), and return outputs of the same shapes, strides and dtypes. A call
without a plan runs the Python implementation, or, in a process without fastvit_kernels, fails with the reason."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.csrc.conftest import PLAN_ARGS as _ARGS
from tests.csrc.conftest import ROOT, run_isolated


_REPLAY = _ARGS + r'''
import fastvit_kernels
from fastvit_kernels import _library
from fastvit_kernels.aot import plans as P
from fastvit_kernels.backend import use_gemm_kernel
from fastvit_kernels.kernels import _cubins, _launch

build = sys.argv[1]
doc = P.load(build)
table = _cubins.load_table(build)

def where(ptr, inputs, outputs):
    for kind, ts in (("in", inputs), ("out", outputs)):
        for i, t in enumerate(ts):
            if isinstance(t, torch.Tensor) and t.numel():
                base = t.untyped_storage().data_ptr()
                if base <= ptr < base + t.untyped_storage().nbytes():
                    return f"{kind}{i}+{ptr - t.data_ptr()}"
    return "tmp"

def parse(line):
    symbol, grid, ptrs, ints, floats = line.split("|")
    return (symbol, tuple(int(g) for g in grid.split(",")), [int(p) for p in ptrs.split(",") if p],
            [int(i) for i in ints.split(",") if i], [float(f) for f in floats.split(",") if f])

report = dict(checked=0, launches=0, int_checked=0, problems=[], ops=set())
for plan in doc["plans"]:
    op, cc, key = plan["op"], plan["cc"], plan["key"]
    schema, args = args_of(op, key)
    if P.call_key(op, cc, schema, args) != key:
        report["problems"].append([key, "the Python key of the rebuilt arguments differs"])
        continue
    overload = getattr(torch.ops.fastvit, op.split("::")[1]).default
    torch.ops.fastvit_csrc.plan_dry_run(cc, True)
    got = overload.redispatch(CUDA, *args)
    torch.ops.fastvit_csrc.plan_dry_run(0, True)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    log = [parse(line) for line in torch.ops.fastvit_csrc.plan_log()]
    bound = []
    hook = lambda k, g, a, kw: bound.append(_cubins.bind(k, g, a, kw, cc, table))
    with use_gemm_kernel("tma" if cc >= 90 else "pointer"), _launch.recording(hook):
        want = _library.python_impl(op)(*args)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    steps = sum(1 for s in plan["steps"] if "launch" in s)
    cpp = [(s, g, [where(p, args, got) for p in ptrs], i, f) for s, g, ptrs, i, f in log]
    py = [(b.symbol, tuple(b.grid), [where(t.data_ptr(), args, want) for t in b.tensors], b.ints, b.floats)
          for b in bound]
    meta = lambda ts: [(tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in ts]
    # the values of the integer tensors the launches read that the op computed (index arithmetic: deterministic
    # from the zero arguments), C++'s replayed slots against Python's
    slots = torch.ops.fastvit_csrc.plan_last_slots()
    values_differ = []
    for (_, _, ptrs, _, _), b in zip(log, bound):
        for ptr, t in zip(ptrs, b.tensors):
            if t.dtype.is_floating_point or where(t.data_ptr(), args, want) != "tmp":
                continue
            same = [s for s in slots if s.data_ptr() == ptr and s.dtype == t.dtype and s.shape == t.shape]
            report["int_checked"] += 1
            if not same or not torch.equal(same[0], t):
                values_differ.append([b.symbol, t.dtype, tuple(t.shape)])
    if len(log) != steps:
        report["problems"].append([key, f"{len(log)} launches logged; the plan has {steps}"])
    elif cpp != py:
        report["problems"].append([key, "launches differ", repr(cpp)[:1500], repr(py)[:1500]])
    elif meta(got) != meta(want):
        report["problems"].append([key, "outputs differ", meta(got), meta(want)])
    elif values_differ:
        report["problems"].append([key, "computed index tensors differ", repr(values_differ)[:1000]])
    report["checked"] += 1
    report["launches"] += steps
    report["ops"].add(op)
report["ops"] = sorted(report["ops"])
report["plans"], report["refused"] = len(doc["plans"]), [r["why"] for r in doc["refused"]]
print(json.dumps(report))
'''


def _env(library, build, **extra) -> dict:
    return {"PYTHONPATH": str(ROOT), "FASTVIT_C_LIBRARY": str(library), "FASTVIT_CUBINS": str(build), **extra}


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_plan_replays_the_launches_the_python_launcher_binds(csrc_library, plan_build):
    proc = run_isolated(_REPLAY.replace("sys.argv[1]", repr(str(plan_build))),
                        env=_env(csrc_library, plan_build))
    got = _last_json(proc)
    assert got["problems"] == [], got["problems"][:3]
    assert got["checked"] == got["plans"] >= 60 and got["launches"] >= got["plans"], got
    # the classic ViT path, forward and backward, and the packed-sequence / RoPE / SwiGLU ops all have plans
    for op in ("patch_embed_fwd", "layernorm_linear_fwd", "attention_fwd", "linear_residual_fwd",
               "layernorm_mlp_fwd", "attention_varlen_fwd", "layernorm_linear_rope_fwd", "swiglu_mlp_fwd",
               "patch_embed_bwd", "layernorm_linear_bwd", "attention_bwd", "linear_residual_bwd", "layernorm_mlp_bwd",
               "attention_varlen_bwd", "layernorm_linear_rope_bwd", "swiglu_mlp_bwd"):
        assert f"fastvit::{op}" in got["ops"], (op, got["ops"])
    # every traced call has a plan, the index arithmetic of the token and masked ops included (Scalar arguments
    # recorded in their Tensor form), and its computed index tensors replay to the values Python computes
    assert got["refused"] == [], got["refused"]
    assert len(got["ops"]) == 22, got["ops"]  # every schema, the token, masked and fused-block ops included
    assert got["int_checked"] >= 10, got["int_checked"]


def test_plan_route_serves_cuda_from_cpp_and_falls_back_to_python(csrc_library, plan_build):
    """With FASTVIT_CUBINS, CUDA is served by _C's plan kernels and fastvit_py::<op> holds the Python
    implementation; a call without a plan (batch 2: the build traced batch 1) runs it, launching through Python;
    without FASTVIT_CUBINS the Python implementation serves CUDA directly, as without _C."""
    script = r'''
import json, torch
import fastvit_kernels
from fastvit_kernels import _library
from fastvit_kernels.kernels import _launch
served = _library.serving("fastvit::attention_fwd")
out = dict(route=_library.plan_route(), served=served)
if _library.plan_route():
    CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    launched = []
    torch.ops.fastvit_csrc.plan_dry_run(80, True)
    with _launch.recording(lambda k, g, a, kw: launched.append(getattr(k, "fn", k).__name__)):
        o, lse = torch.ops.fastvit.attention_fwd.default.redispatch(CUDA, torch.zeros(2, 197, 2304).half(), 12,
                                                                    0.125)
    out.update(python_launches=launched, cpp_launches=torch.ops.fastvit_csrc.plan_log(),
               shapes=[list(o.shape), list(lse.shape)], counts=torch.ops.fastvit_csrc.plan_counts())
from fastvit_kernels.info import csrc_status
cubins = csrc_status()["cubins"]
if cubins is not None:
    out["plans"] = cubins["plans"]
print(json.dumps(out))
'''
    got = _last_json(run_isolated(script, env=_env(csrc_library, plan_build)))
    assert got["route"] and got["served"] == {"CPU": "cpp", "CUDA": "cpp"}
    assert got["plans"]["served"] and got["plans"]["plans"] == got["counts"][0] >= 60
    assert got["python_launches"] == ["_attention_fwd_kernel"] and got["cpp_launches"] == []
    assert got["shapes"] == [[2, 197, 768], [2, 12, 197]]
    assert got["counts"][0] >= 60 and got["counts"][2] == 1  # plans, refused, calls that fell back: this one
    got = _last_json(run_isolated(script, env=_env(csrc_library, "")))
    assert not got["route"] and got["served"] == {"CPU": "cpp", "CUDA": "triton"} and "plans" not in got


def test_without_python_a_missing_plan_is_a_clear_error(csrc_library, plan_build, tmp_path):
    """In a process that loads only _C: a planned call replays (dry run); a refused call names the build's reason
    (a copy of the build with one plan turned into a refusal: the build itself refuses nothing); an untraced call
    names the op, the key and the table; a directory without plans.json says so."""
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(plan_build / "kernels.json", build / "kernels.json")
    doc = json.loads((plan_build / "plans.json").read_text())
    moved = next(p for p in doc["plans"] if p["op"] == "fastvit::layernorm_linear_fwd" and p["cc"] == 90)
    doc["plans"].remove(moved)
    doc["refused"].append(dict(op=moved["op"], cc=90, key=moved["key"], use="test", why="a reason from the build"))
    (build / "plans.json").write_text(json.dumps(doc))
    script = _ARGS + f'''
torch.ops.load_library({str(csrc_library)!r})
doc = json.load(open({str(build / "plans.json")!r}))
plan = next(p for p in doc["plans"] if p["op"] == "fastvit::attention_fwd" and p["cc"] == 90)
torch.ops.fastvit_csrc.plan_dry_run(90, True)
def call(key):
    op = key.split("@")[0]
    schema, args = args_of(op, key)
    try:
        getattr(torch.ops.fastvit, op.split("::")[1]).default.redispatch(CUDA, *args)
        return "ok"
    except RuntimeError as err:
        return str(err)
planned = call(plan["key"])
log = torch.ops.fastvit_csrc.plan_log()
untraced = call(plan["key"].replace("[1,197,2304]", "[3,197,2304]"))
print(json.dumps(dict(planned=planned, log=len(log), refused=call({moved["key"]!r}), untraced=untraced,
                      imported="fastvit_kernels" in sys.modules)))
'''
    got = _last_json(run_isolated(script, env={"FASTVIT_CUBINS": str(build)}))
    assert got["planned"] == "ok" and got["log"] >= 1 and not got["imported"]
    assert "fastvit::layernorm_linear_fwd: no launch plan" in got["refused"], got["refused"]
    assert "the build refused a plan for it: a reason from the build" in got["refused"], got["refused"]
    assert "fastvit::attention_fwd: no launch plan" in got["untraced"] and "traced no call like it" in got["untraced"]
    assert "Tf16[3,197,2304]" in got["untraced"] and str(build / "plans.json") in got["untraced"]

    empty = tmp_path / "no_plans"
    empty.mkdir()
    script = f'''
import torch
torch.ops.load_library({str(csrc_library)!r})
torch.ops.fastvit_csrc.plan_dry_run(80, True)
CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
try:
    torch.ops.fastvit.attention_fwd.default.redispatch(CUDA, torch.zeros(1, 197, 2304).half(), 12, 0.125)
except RuntimeError as err:
    print(err)
'''
    assert "has no plans.json" in run_isolated(script, env={"FASTVIT_CUBINS": str(empty)}).stdout


@pytest.mark.parametrize("cc", [80, 90])
def test_plan_keys_agree_between_python_and_cpp(csrc_library, plan_build, cc):
    """The key C++ computes for a call (shown in its error for an untraced call) is the one call_key computes:
    dtype / shape / strides / alignment of each tensor, None, ints, bools, bool lists, floats (bit pattern) and
    strings, including a tensor that is not 16-byte aligned."""
    script = _ARGS + f'''
import fastvit_kernels
from fastvit_kernels.aot import plans as P
torch.ops.fastvit_csrc.plan_dry_run({cc}, True)
torch.ops.fastvit_csrc.set_python_fallback(False)
h = lambda *shape: torch.zeros(*shape).half()
unaligned = torch.zeros(3 * 5 * 8 + 1).half()[1:].view(3, 5, 8)
calls = [
    ("layernorm_mlp_bwd", [h(3, 5, 8), unaligned, h(15, 32), torch.zeros(15), torch.zeros(15), h(8), None, h(32, 8),
                           h(32), h(8, 32), True, False, "tanh", True]),
    ("patch_embed_tokens_bwd", [h(2, 4, 8), h(2, 4, 12), h(8, 12), 4, None, None, None, 1, None, [True, False, True]]),
    ("attention_fwd", [h(1, 3, 24), 2, 0.1 + 0.2]),
]
out = []
for name, args in calls:
    op = getattr(torch.ops.fastvit, name).default
    want = P.call_key("fastvit::" + name, {cc}, op._schema, args)
    try:
        op.redispatch(CUDA, *args)
        got = "no error"
    except RuntimeError as err:
        got = str(err)
    out.append([want, got])
print(json.dumps(out))
'''
    got = _last_json(run_isolated(script, env=_env(csrc_library, plan_build)))
    (mlp, mlp_err), (tokens, tokens_err), (attn, attn_err) = got
    assert "a0" in mlp and mlp.endswith(";B1;B0;Stanh;B1") and ";N;" in mlp
    assert tokens.endswith(";I4;N;N;N;I1;N;L1,0,1")
    assert attn.endswith(";I2;F3fd3333333333334")  # 0.1 + 0.2 != 0.3: the key holds the exact bits
    for key, err in got:
        assert err.rstrip().endswith("Call key: " + key), (key, err)


def test_a_fastvit_training_step_calls_only_planned_ops(plan_build):
    """Every fastvit::* call of a FastViT with ViT-B/16's shapes (one block), fp16 at batch 1, forward and
    backward, has a plan in the build for sm_80 and sm_90 (re-recorded for the model's own calls: the same keys
    and the same steps): what a deployed or exported FastViT calls, the plan kernels serve without Python."""
    script = f'''
import json, torch
from fastvit_kernels import FastViT
from fastvit_kernels.aot import plans as P
from fastvit_kernels.kernels import _cubins
doc = P.load({str(plan_build)!r})
table = _cubins.load_table({str(plan_build)!r})
known = {{p["key"]: p for p in doc["plans"]}}
out = {{}}
for cc in (80, 90):
    model = FastViT(img_size=224, patch_size=16, embed_dim=768, depth=1, num_heads=12, backend="triton").half()
    step = lambda: model(torch.zeros(1, 3, 224, 224).half()).float().sum().backward()
    plans, refused = P.record_calls(table, cc, step)
    out[cc] = dict(ops=sorted({{p["op"].split("::")[1] for p in plans.values()}}),
                   missing=[k for k in plans if k not in known], refused=[r["why"] for r in refused.values()],
                   differ=[k for k, p in plans.items() if k in known and p["steps"] != known[k]["steps"]])
print(json.dumps(out))
'''
    got = _last_json(run_isolated(script, env={"PYTHONPATH": str(ROOT), "FASTVIT_C_LIBRARY": "none"}))
    for cc, report in got.items():
        assert report["ops"] == ["attention_block_bwd", "attention_block_fwd", "layernorm_mlp_bwd",
                                 "layernorm_mlp_fwd", "patch_embed_bwd", "patch_embed_fwd"], (cc, report["ops"])
        assert report["missing"] == [] and report["refused"] == [] and report["differ"] == [], (cc, report)
