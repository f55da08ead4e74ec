"""Host cost of one ``fastvit::*`` op call on the CUDA path, up to the driver: ``_C``'s C++ plan kernel against the
package's Python op, on a machine without a GPU.

What is timed, per op, at the shapes of the plan build (ViT-B/16 fp16 at batch 1, sm_90 plans; nothing is computed
on either side, so the shape only sets how many allocations and launches the op makes):

* ``cpp``: the C++ CUDA kernel of ``_C`` (csrc/cuda/plans.cpp) in its dry run without logging: it decodes the
  arguments, builds the plan key, looks the plan up, replays its ATen allocations and views through the dispatcher
  and packs each launch's parameter buffer exactly as before ``cuLaunchKernel`` (TMA descriptors as zero bytes: their
  encoding needs the driver). A process that loads only ``_C``; the call enters through ``OpOverload.redispatch``
  on the CUDA key.
* ``python``: the op as the package defines it without ``_C`` (a ``torch.library.custom_op``), its Python launcher
  choosing tiles and allocating, with the launch hook (:func:`fastvit_kernels.kernels._launch.recording`) taking
  each launch and doing nothing: the Python path's host work *before* Triton's own launcher, which on a GPU adds
  Triton's JIT dispatch (binding, specialisation key, cache lookup) and the driver call. So ``cpp / python`` here
  is an upper bound of the ratio on a GPU.
* ``python_cubin_bind``: the same with the hook binding each launch to its cubin row (``_cubins.bind``), the host
  work of the Python cubin route (``FASTVIT_CUBINS`` without the plan kernels) before ``fastvit_csrc::launch``.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` median per call, one intra-op thread, variants repeated and
the median of the repeats taken. Per-call figures (µs) in ``extra_info["ops"]``; headline ``extra_info["ratio"]``
for ``linear_residual_fwd``. Target (the C++ op library's issue): ``cpp / python <= 0.3``; asserted when benchmarks
are enabled. Under ``--benchmark-disable`` a short run only checks that every figure is finite and positive.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from benchmarks.test_csrc_host_cost import _cpu_label
from tests.csrc.conftest import PLAN_ARGS, ROOT, plan_build_dir, run_isolated, session_library

TARGET_RATIO = 0.3
HEADLINE_OP = "linear_residual_fwd"
# one to three launches each; the token op's plan is long (its index arithmetic: about 70 ATen steps)
OPS = ("linear_residual_fwd", "attention_fwd", "layernorm_linear_fwd", "layernorm_mlp_fwd", "patch_embed_tokens_fwd")
CC = 90
_MARKER = "PLANCOST_JSON "

_COMMON = PLAN_ARGS + r'''
from torch.utils.benchmark import Timer
torch.set_num_threads(1)
doc = json.load(open(CONFIG["plans"]))
calls = {}
for op in CONFIG["ops"]:
    plan = next(p for p in doc["plans"] if p["op"] == "fastvit::" + op and p["cc"] == CONFIG["cc"])
    calls[op] = (plan["key"], sum(1 for s in plan["steps"] if "launch" in s), len(plan["steps"]))

def median_us(fn):
    runs = [Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=CONFIG["min_run_time"]).median
            for _ in range(CONFIG["repeats"])]
    return sorted(runs)[len(runs) // 2] * 1e6
'''

_CPP = _COMMON + r'''
torch.ops.load_library(CONFIG["library"])
torch.ops.fastvit_csrc.plan_dry_run(CONFIG["cc"], False)
out = {}
for op, (key, launches, steps) in calls.items():
    schema, args = args_of("fastvit::" + op, key)
    overload = getattr(torch.ops.fastvit, op).default
    overload.redispatch(CUDA, *args)  # reads the plans once
    out[op] = dict(cpp_us=median_us(lambda: overload.redispatch(CUDA, *args)), launches=launches, steps=steps)
assert "fastvit_kernels" not in sys.modules
print(MARKER + json.dumps(out))
'''

_PYTHON = _COMMON + r'''
import fastvit_kernels
from fastvit_kernels import _library
from fastvit_kernels.backend import use_gemm_kernel
from fastvit_kernels.kernels import _cubins, _launch
assert not _library.csrc_loaded()
table = _cubins.load_table(CONFIG["table"])
nothing = lambda kernel, grid, args, kwargs: None
bind = lambda kernel, grid, args, kwargs: _cubins.bind(kernel, grid, args, kwargs, CONFIG["cc"], table)
out = {}
with use_gemm_kernel("tma" if CONFIG["cc"] >= 90 else "pointer"):
    for op, (key, launches, steps) in calls.items():
        schema, args = args_of("fastvit::" + op, key)
        overload = getattr(torch.ops.fastvit, op).default
        out[op] = {}
        for label, hook in (("python_us", nothing), ("python_cubin_bind_us", bind)):
            with _launch.recording(hook):
                overload(*args)
                out[op][label] = median_us(lambda: overload(*args))
print(MARKER + json.dumps(out))
'''


def _run(script: str, config: dict, env: dict) -> dict:
    text = f"import json\nCONFIG = json.loads({json.dumps(config)!r})\nMARKER = {_MARKER!r}\n" + script
    out = run_isolated(text, env=env).stdout
    lines = [line for line in out.splitlines() if line.startswith(_MARKER)]
    assert len(lines) == 1, f"no result line in the isolated run's output:\n{out[-4000:]}"
    return json.loads(lines[0][len(_MARKER):])


def _measure(library: pathlib.Path, build: pathlib.Path, min_run_time: float, repeats: int) -> dict:
    config = {"library": str(library), "plans": str(build / "plans.json"), "table": str(build), "ops": list(OPS),
              "cc": CC, "min_run_time": min_run_time, "repeats": repeats}
    cpp = _run(_CPP, config, {"FASTVIT_CUBINS": str(build)})
    python = _run(_PYTHON, config, {"PYTHONPATH": str(ROOT), "FASTVIT_C_LIBRARY": "none"})
    return {op: {**cpp[op], **python[op]} for op in OPS}


@pytest.fixture(scope="session")
def plan_cost_inputs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(``_C``, the plan build directory), shared with the tests when they run in the same session."""
    return session_library(tmp_path_factory), plan_build_dir(tmp_path_factory)


def test_csrc_plan_host_cost(benchmark, plan_cost_inputs):
    """Per-call host cost of the C++ plan kernel vs the Python op, both up to the launch (module docstring)."""
    enabled = not benchmark.disabled
    benchmark.group = "CPU host cost of a CUDA-path op call up to the driver: _C plan kernel vs Python op"
    ops = benchmark.pedantic(_measure, args=(*plan_cost_inputs, 0.2 if enabled else 0.005, 3 if enabled else 1),
                             rounds=1, iterations=1)
    for op in ops.values():
        op["ratio"] = op["cpp_us"] / op["python_us"]
        op["ratio_vs_cubin_bind"] = op["cpp_us"] / op["python_cubin_bind_us"]
    headline = ops[HEADLINE_OP]
    benchmark.extra_info.update(
        impl="fastvit_kernels._C plan kernel (dry run: replay + parameter packing) vs custom_op + Python launcher",
        device="cpu", measured=f"CPU host cost (no GPU: nothing launched), measured on {_cpu_label()}", cc=CC,
        ops=ops, headline_op=HEADLINE_OP, ratio=headline["ratio"], target_ratio=TARGET_RATIO,
        target_met=headline["ratio"] <= TARGET_RATIO)
    for name, op in ops.items():
        for key, value in op.items():
            if key.endswith("_us") or key.startswith("ratio"):
                assert math.isfinite(value) and value > 0, f"{name}: {key} = {value}"
    if enabled:
        assert headline["ratio"] <= TARGET_RATIO, (
            f"{HEADLINE_OP}: the C++ plan kernel costs {headline['cpp_us']:.2f} µs per call, the Python op "
            f"{headline['python_us']:.2f} µs up to the launch")
