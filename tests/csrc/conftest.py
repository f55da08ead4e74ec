"""Fixtures of the C++ op library tests: ``_C`` is built once per session into a temporary directory (the
README's ``FASTVIT_BUILD_CSRC=1`` build, ``setup.py build_ext``) and exercised in separate processes, so that the
test process itself never loads it (the rest of the suite runs the Python-defined ops)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_library(out: pathlib.Path) -> pathlib.Path:
    """Build ``fastvit_kernels._C`` from csrc/ into ``out`` and return the shared library's path."""
    env = dict(os.environ, FASTVIT_BUILD_CSRC="1")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
           "--build-temp", str(out / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"building _C failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    libs = sorted((out / "lib" / "fastvit_kernels").glob("_C*.so"))
    assert len(libs) == 1, f"expected one _C library; got {libs}"
    return libs[0]


_SESSION_BUILD: dict = {}  # basetemp -> the library built in this pytest session (tests/ and benchmarks/ share it)


def session_library(tmp_path_factory) -> pathlib.Path:
    """``_C`` built from this checkout once per pytest session (skips only when no C++ compiler is installed)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SESSION_BUILD:
        _SESSION_BUILD[key] = build_library(tmp_path_factory.mktemp("csrc"))
    return _SESSION_BUILD[key]


@pytest.fixture(scope="session")
def csrc_library(tmp_path_factory) -> pathlib.Path:
    """Path of a ``_C`` built from this checkout (:func:`session_library`)."""
    return session_library(tmp_path_factory)


# The small AOT build of tests/test_aot_build.py (attention forward, class-token rows, Hopper TMA GEMM; ViT-B/16
# fp16 inference at batch 1; 8 cubins): an integer, a float and tensor-descriptor parameters all occur.
KERNELS = "_attention_fwd_kernel|_prefix_rows_kernel|_matmul_tma_kernel"
WORKLOAD = ["--model", "vit_base_patch16_224", "--dtype", "fp16", "--mode", "infer", "--batch", "1"]


def subprocess_env() -> dict:
    """This process's environment for a subprocess that imports fastvit_kernels from this checkout and compiles /
    binds for real GPUs: the checkout on PYTHONPATH, TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def aot_table(tmp_path_factory) -> pathlib.Path:
    """Path of the small AOT build's kernels.json (:data:`KERNELS` at :data:`WORKLOAD`, sm_80 and sm_90), built once
    per session."""
    from fastvit_kernels import aot

    if aot.missing_tools():
        pytest.skip(f"the AOT build needs Triton's bundled CUDA tools; missing: {aot.missing_tools()}")
    out = tmp_path_factory.mktemp("aot_launch")
    proc = subprocess.run([sys.executable, "-m", "fastvit_kernels.aot", "build", "--arch", "sm_80", "--arch", "sm_90",
                           *WORKLOAD, "--kernel", KERNELS, "--out", str(out), "--jobs", "2"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return out / "kernels.json"


# The plan build: every kernel of ViT-B/16 fp16 training and inference at batch 1 for sm_80 and sm_90, with its
# plans.json
PLAN_WORKLOAD = ["--model", "vit_base_patch16_224", "--dtype", "fp16", "--mode", "infer", "--mode", "train",
                 "--batch", "1"]
_PLAN_BUILDS: dict = {}


def plan_build_dir(tmp_path_factory) -> pathlib.Path:
    """The directory of the plan build (:data:`PLAN_WORKLOAD`, unfiltered: kernels.json, the cubins and
    plans.json), built once per pytest session (tests/ and benchmarks/ share it)."""
    from fastvit_kernels import aot

    if aot.missing_tools():
        pytest.skip(f"the AOT build needs Triton's bundled CUDA tools; missing: {aot.missing_tools()}")
    key = str(tmp_path_factory.getbasetemp())
    if key not in _PLAN_BUILDS:
        out = tmp_path_factory.mktemp("aot_plans")
        proc = subprocess.run([sys.executable, "-m", "fastvit_kernels.aot", "build", "--arch", "sm_80", "--arch",
                               "sm_90", *PLAN_WORKLOAD, "--out", str(out), "--jobs", "2"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=1800)
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        _PLAN_BUILDS[key] = out
    return _PLAN_BUILDS[key]


@pytest.fixture(scope="session")
def plan_build(tmp_path_factory) -> pathlib.Path:
    """Directory of the plan build (:func:`plan_build_dir`)."""
    return plan_build_dir(tmp_path_factory)


# Script text defining args_of(op, key): the arguments a plan key describes, rebuilt as zero tensors of its dtypes,
# shapes, strides and alignment (and CUDA: the CUDA dispatch key set, for OpOverload.redispatch). Needs only torch.
PLAN_ARGS = r'''
import json, re, struct, sys, torch

# the key's dtype names (fastvit_kernels.aot.plans.DTYPE_NAMES; written out: this also runs without the package)
DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
      "i32": torch.int32, "i64": torch.int64, "b8": torch.bool, "u8": torch.uint8}
CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

def tensor(part):
    m = re.fullmatch(r"T(\w+)\[([\d,]*)\]\[([\d,]*)\]a([01])", part)
    shape = [int(x) for x in m[2].split(",") if x]
    strides = [int(x) for x in m[3].split(",") if x]
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    offset = 0 if m[4] == "1" else 1  # a storage offset of one element: not 16-byte aligned
    return torch.zeros(size + offset, dtype=DT[m[1]]).as_strided(shape, strides, offset)

def args_of(op, key):
    """The arguments a plan key describes (tensors of its dtypes, shapes, strides and alignment; zeros)."""
    schema = getattr(torch.ops.fastvit, op.split("::")[1]).default._schema
    out = []
    for part in key.split(";")[1:]:
        if part == "N": out.append(None)
        elif part[0] == "T": out.append(tensor(part))
        elif part[0] == "I": out.append(int(part[1:]))
        elif part[0] == "B": out.append(part == "B1")
        elif part[0] == "L": out.append([x == "1" for x in part[1:].split(",") if x])
        elif part[0] == "F": out.append(struct.unpack("<d", struct.pack("<Q", int(part[1:], 16)))[0])
        elif part[0] == "S": out.append(part[1:])
    return schema, out
'''


def run_isolated(script: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python from a directory outside the checkout (so ``fastvit_kernels`` is not
    importable by accident) with TRITON_INTERPRET unset; raises with its output when it fails."""
    run_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    run_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=pathlib.Path("/"), env=run_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"isolated run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_ops_in_library(library: pathlib.Path, calls: dict, tmp_path: pathlib.Path) -> dict:
    """Call ``torch.ops.fastvit.<op>`` in a process that loads only ``library`` (never fastvit_kernels).

    Args:
        calls: {label: (op name, args tuple)}; tensors in the args are saved and loaded as they are.

    Returns:
        {label: the op's result (a tensor or a tuple of tensors)}.
    """
    inputs, outputs = tmp_path / "calls.pt", tmp_path / "results.pt"
    torch.save(calls, inputs)
    run_isolated(f"""
        import sys, torch
        torch.ops.load_library({str(library)!r})
        calls = torch.load({str(inputs)!r}, weights_only=False)
        results = {{label: getattr(torch.ops.fastvit, op)(*args) for label, (op, args) in calls.items()}}
        assert "fastvit_kernels" not in sys.modules, "the isolated process imported fastvit_kernels"
        torch.save(results, {str(outputs)!r})
    """)
    return torch.load(outputs, weights_only=False)
