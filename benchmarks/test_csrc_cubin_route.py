"""FastViT ViT-B/16 inference on the AOT cubin route against Triton's JIT: start-up cost, steady latency, images/s,
and three correctness checks. GPU only (sm_80 or sm_90); skipped with the reason on a machine without one.

What is compared, each in a fresh Python process (so the first call's cost is measured from a cold start, with an
empty Triton cache), both with the C++ op library ``_C`` loaded (built from this checkout), ``FASTVIT_LAUNCHER=cpp``
and ``FASTVIT_AUTOTUNE=0``, and no other ``FASTVIT_*`` setting (no tuning record, default GEMM paths):

* ``triton``: no ``FASTVIT_CUBINS``: every Triton launch JIT-compiles its kernel on first use, with the first
  autotune candidate after pruning (``FASTVIT_AUTOTUNE=0``), which is the configuration the AOT build compiles
  when no tuning record is given.
* ``cubin``: ``FASTVIT_CUBINS`` names the output of ``python -m fastvit_kernels.aot build`` for this GPU's arch,
  ``vit_base_patch16_224``, fp16 and bf16, ``--mode infer``, batches 1 and 8: every ``fastvit::*`` call on CUDA
  runs ``_C``'s C++ kernel, which replays the call's launch plan (``plans.json``: allocations and prebuilt-cubin
  launches, no Python); a call without a plan would run the Python launcher on the prebuilt cubins
  (``fastvit_csrc::launch``). No JIT, no autotuning either way.

The two processes differ only in ``FASTVIT_CUBINS``, so they launch the same kernels with the same configurations.
Each builds ``FastViT(**get_config("vit_base_patch16_224"), backend="triton")`` with ``torch.manual_seed(0)``
(identical weights: their SHA-256 digests are compared), in eval mode and the dtype, then:

1. times the first forward at batch 1 (wall clock, after ``torch.cuda.synchronize``, including every JIT compile
   on the Triton path and the table load and cubin module loads on the cubin route), then the first at batch 8;
2. times the steady forward at batch 1 and 8 with CUDA events: warm-up, then each forward timed alone (a
   synchronisation after each, so a batch's time is its latency, host launch overhead included), the median;
3. saves the logits of a fixed input (batch 1 and 8);
4. on the cubin route, captures the batch-8 forward in a CUDA graph (warm-up on a side stream first, as PyTorch's
   CUDA graph recipe asks) and replays it on two inputs, saving the replayed and eager logits, and times the
   replay.

Asserted (correctness, not speed): every ``fastvit::*`` call of the cubin path replayed a plan (``_C``'s count
of calls that fell back to Python is 0, and ``_C`` serves CUDA for the model's ops); the cubin route's logits are
bit-identical to the Triton path's
(``torch.equal``: the same compiled kernels on the same inputs, and the kernels are deterministic); the cubin
route compiled nothing (its fresh ``TRITON_CACHE_DIR`` holds no compile artefact, while the Triton path's holds
some, which shows the check can fail); the graph replay's logits equal eager ones on both inputs, and differ
between the two inputs (the replay read the new input).

Nothing about speed is asserted: no GPU figure exists yet. The benchmark's own timing is the two measuring
processes (Python start-up included); the per-path figures are in ``extra_info["paths"]`` and the ratios in
``extra_info["ratios"]``; ``extra_info["target_met"]`` says whether the C++ op library's target holds (images/s of
the cubin path at least 1.5x the Triton path's at batch 1 and 8, without CUDA graphs).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bench_utils import DEVICE, requires_gpu
from fastvit_kernels.bench.devices import device_name
from tests.csrc.conftest import ROOT, session_library

MODEL = "vit_base_patch16_224"
DTYPES = ("fp16", "bf16")
BATCHES = (1, 8)
ARCHS = {80: "sm_80", 90: "sm_90"}  # compute capability -> the AOT build's --arch
TARGET_SPEEDUP = 1.5  # the C++ op library's target: images/s at batch 1-8 over the Python path, no CUDA graphs
WARMUP, ITERS = 10, 50  # steady timing: forwards before timing, timed forwards (median reported)
GRAPH_WARMUP = 3  # side-stream forwards before the CUDA graph capture
SEED, INPUT_SEED = 0, 1  # weights (torch.manual_seed) and the fixed input's generator
# Triton's compile writes these next to its metadata in the cache directory; a fresh directory has none unless a
# kernel was compiled (driver helper modules Triton may build there are not compile artefacts of a kernel)
COMPILE_SUFFIXES = (".cubin", ".ptx", ".ttir", ".ttgir", ".llir")
_MARKER = "CUBIN_ROUTE_JSON "

# Runs in each measuring process; CONFIG (model, dtype, batches, iterations, seeds, logits path, graph) and MARKER
# are prepended.
_SCRIPT = r'''
import time
T_START = time.perf_counter()
import hashlib, json, os, sys
import torch
from fastvit_kernels import FastViT, _library
from fastvit_kernels.configs import get_config
T_IMPORTED = time.perf_counter()

assert _library.csrc_loaded(), "the measuring process did not load _C (FASTVIT_C_LIBRARY)"
assert _library.launcher() == "cpp", f"launcher is {_library.launcher()!r}, expected 'cpp'"
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[CONFIG["dtype"]]
cfg = get_config(CONFIG["model"])
torch.manual_seed(CONFIG["seed"])
model = FastViT(**cfg, backend="triton").eval().to(device="cuda", dtype=dtype)
shape = (max(CONFIG["batches"]), cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
images = torch.randn(*shape, generator=torch.Generator().manual_seed(CONFIG["input_seed"])).to("cuda", dtype)
inputs = {b: images[:b].clone() for b in CONFIG["batches"]}
torch.cuda.synchronize()
T_READY = time.perf_counter()


def first_call(x):
    """Seconds of one forward from a synchronised start to its logits on the device, and the logits."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def steady(x):
    """CUDA-event milliseconds of single forwards after warm-up (each synchronised: its latency)."""
    with torch.no_grad():
        for _ in range(CONFIG["warmup"]):
            model(x)
        torch.cuda.synchronize()
        ms = []
        for _ in range(CONFIG["iters"]):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
    return summary(ms, x.shape[0])


def summary(ms, batch):
    ms = sorted(ms)
    median = ms[len(ms) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2
    return dict(ms_median=median, ms_min=ms[0], ms_max=ms[-1], images_per_s=batch * 1e3 / median,
                iters=len(ms), warmup=CONFIG["warmup"])


result = dict(import_s=T_IMPORTED - T_START, model_s=T_READY - T_IMPORTED,
              triton_imported_at_start="triton" in sys.modules, first_call_s={}, steady={})
logits = {}
for b in CONFIG["batches"]:  # ascending: the first is the process's first forward
    result["first_call_s"][b], logits[f"b{b}_first"] = first_call(inputs[b])
result["start_to_first_logits_s"] = T_READY - T_START + result["first_call_s"][min(CONFIG["batches"])]
for b in CONFIG["batches"]:
    result["steady"][b] = steady(inputs[b])
    with torch.no_grad():
        logits[f"b{b}"] = model(inputs[b])

from fastvit_kernels.kernels import _launch  # imported by the first launch already

result["route"] = _launch.cubin_route()
result["served_cuda"] = {op: _library.serving(op)["CUDA"]
                         for op in ("fastvit::patch_embed_fwd", "fastvit::attention_block_fwd",
                                    "fastvit::layernorm_mlp_fwd")}
if _library.plan_route():
    result["plans"] = dict(zip(("plans", "refused", "python_fallbacks"), torch.ops.fastvit_csrc.plan_counts()))

if CONFIG["graph"]:
    b = max(CONFIG["batches"])
    other = torch.randn(*inputs[b].shape, generator=torch.Generator().manual_seed(CONFIG["input_seed"] + 1))
    other = other.to("cuda", dtype)
    static_x = inputs[b].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(CONFIG["graph_warmup"]):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_logits = model(static_x)
    graph.replay()
    logits["graph_a"] = static_logits.clone()
    static_x.copy_(other)
    graph.replay()
    logits["graph_b"] = static_logits.clone()
    with torch.no_grad():
        logits["eager_a"] = model(inputs[b])
        logits["eager_b"] = model(other)
    ms = []
    for _ in range(CONFIG["iters"]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    result["graph_replay"] = summary(ms, b)
    result["graph_replay"]["warmup"] = CONFIG["graph_warmup"]
torch.cuda.synchronize()
torch.save({k: v.cpu() for k, v in logits.items()}, CONFIG["logits"])
weights = hashlib.sha256()  # of the weights the forwards used: equal in both processes, bit for bit
for name, t in model.state_dict().items():
    weights.update(name.encode())
    weights.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
result["weights_sha256"] = weights.hexdigest()

import triton

result.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
              device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()))
print(MARKER + json.dumps(result))
'''


def _clean_env(**settings: str) -> dict:
    """This process's environment without TRITON_INTERPRET, TRITON_CACHE_DIR, PYTHONPATH and every ``FASTVIT_*``
    setting (a tuning record, a GEMM path or a backend set by the caller would change what runs), with the checkout
    on PYTHONPATH and ``settings`` added."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "PYTHONPATH") and not k.startswith("FASTVIT_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(settings)
    return env


def _run(what: str, cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` from / (outside the checkout); returns (the finished process, its wall seconds); raises naming
    ``what``, with its output, when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=pathlib.Path("/"), env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc, seconds


@pytest.fixture(scope="session")
def cubin_route_setup(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(``_C`` built from this checkout, the AOT cubin table directory for this GPU's arch: ``MODEL``, fp16 and
    bf16, infer, batches 1 and 8), built once per session. Skips on a GPU the AOT build has no target for, or when
    Triton's bundled CUDA tools are missing."""
    major, minor = torch.cuda.get_device_capability()
    arch = ARCHS.get(10 * major + minor)
    if arch is None:
        pytest.skip(f"the AOT build targets {sorted(ARCHS.values())}; this GPU is sm_{major}{minor}")
    from fastvit_kernels import aot

    if aot.missing_tools():
        pytest.skip(f"the AOT build needs Triton's bundled CUDA tools; missing: {aot.missing_tools()}")
    library = session_library(tmp_path_factory)
    out = tmp_path_factory.mktemp("cubin_route_table")
    cmd = [sys.executable, "-m", "fastvit_kernels.aot", "build", "--arch", arch, "--model", MODEL, "--mode", "infer",
           *[a for d in DTYPES for a in ("--dtype", d)], *[a for b in BATCHES for a in ("--batch", str(b))],
           "--out", str(out), "--jobs", str(os.cpu_count() or 1)]
    cache = tmp_path_factory.mktemp("aot_triton_cache")
    _run("the aot build", cmd, _clean_env(TRITON_CACHE_DIR=str(cache)), timeout=900)
    assert (out / "kernels.json").is_file(), f"aot build wrote no {out / 'kernels.json'}"
    return library, out


def _cache_files(cache: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def _measure(library: pathlib.Path, table: pathlib.Path, dtype: str, work: pathlib.Path) -> dict:
    """Run :data:`_SCRIPT` for the Triton path, then the cubin route; returns {"triton" | "cubin": its JSON result
    plus ``process_s`` (the whole process, wall clock), ``logits`` (path) and ``cache_files`` (what its fresh
    Triton cache directory holds afterwards)}."""
    runs = {}
    for path in ("triton", "cubin"):
        cache, logits = work / f"triton_cache_{path}", work / f"logits_{path}.pt"
        cache.mkdir()
        config = dict(model=MODEL, dtype=dtype, batches=sorted(BATCHES), warmup=WARMUP, iters=ITERS,
                      graph_warmup=GRAPH_WARMUP, seed=SEED, input_seed=INPUT_SEED, logits=str(logits),
                      graph=path == "cubin")
        script = f"import json\nCONFIG = json.loads({json.dumps(config)!r})\nMARKER = {_MARKER!r}\n" + _SCRIPT
        settings = dict(FASTVIT_C_LIBRARY=str(library), FASTVIT_LAUNCHER="cpp", FASTVIT_AUTOTUNE="0",
                        TRITON_CACHE_DIR=str(cache))
        if path == "cubin":
            settings["FASTVIT_CUBINS"] = str(table)
        proc, seconds = _run(f"the {path} measuring process", [sys.executable, "-c", textwrap.dedent(script)],
                             _clean_env(**settings), timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
        assert len(lines) == 1, f"{path}: no result line in the measuring process's output:\n{proc.stdout[-4000:]}"
        runs[path] = dict(json.loads(lines[0][len(_MARKER):]), process_s=seconds, logits=str(logits),
                          cache_files=_cache_files(cache))
    return runs


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("nan")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_csrc_cubin_route(benchmark, dtype, cubin_route_setup, tmp_path):
    """ViT-B/16 inference on the cubin route vs Triton's JIT (module docstring): figures in ``extra_info``;
    asserts bit-identical logits, no compile on the cubin route, and CUDA graph replay = eager."""
    library, table = cubin_route_setup
    benchmark.group = (f"{MODEL} inference, {dtype}, batches {'/'.join(map(str, BATCHES))}: AOT cubin route (_C) vs "
                       "Triton JIT (FASTVIT_AUTOTUNE=0), fresh processes")
    runs = benchmark.pedantic(_measure, args=(library, table, dtype, tmp_path), rounds=1, iterations=1)
    tri, cub = runs["triton"], runs["cubin"]
    compiled = {p: [f for f in runs[p]["cache_files"] if pathlib.PurePath(f).suffix in COMPILE_SUFFIXES]
                for p in runs}

    paths = {}
    for p, r in runs.items():
        paths[p] = dict(first_call_s={f"b{b}": s for b, s in r["first_call_s"].items()},
                        start_to_first_logits_s=r["start_to_first_logits_s"], import_s=r["import_s"],
                        model_s=r["model_s"], process_s=r["process_s"],
                        steady={f"b{b}": s for b, s in r["steady"].items()},
                        triton_cache_files=len(r["cache_files"]), triton_compile_artefacts=len(compiled[p]),
                        triton_imported_at_start=r["triton_imported_at_start"])
        for b, s in r["steady"].items():
            paths[p][f"ms_per_batch_b{b}"] = s["ms_median"]
            paths[p][f"images_per_s_b{b}"] = s["images_per_s"]
        if "graph_replay" in r:
            paths[p][f"graph_replay_b{max(BATCHES)}"] = r["graph_replay"]
    first = str(min(BATCHES))
    ratios = {"first_call_s_cubin_over_triton": cub["first_call_s"][first] / tri["first_call_s"][first],
              "start_to_first_logits_s_cubin_over_triton":
                  cub["start_to_first_logits_s"] / tri["start_to_first_logits_s"]}
    for b in BATCHES:  # > 1: the cubin route serves more images per second
        ratios[f"images_per_s_cubin_over_triton_b{b}"] = (cub["steady"][str(b)]["images_per_s"]
                                                          / tri["steady"][str(b)]["images_per_s"])
    device = device_name(DEVICE)
    benchmark.extra_info.update(
        impl="FastViT on the AOT cubin route (_C launches prebuilt cubins) vs the Triton JIT path", device=device,
        measured=f"measured on {device} (sm_{''.join(map(str, cub['capability']))}), torch {cub['torch']}, "
                 f"Triton {cub['triton']}, CUDA {cub['cuda']}",
        compared=(f"{MODEL} inference in {dtype}, eval, backend='triton', identical weights (seed {SEED}); each "
                  "path in a fresh process with an empty Triton cache, _C loaded, FASTVIT_LAUNCHER=cpp, "
                  "FASTVIT_AUTOTUNE=0; 'triton': Triton JIT-compiles each kernel on first use; 'cubin': "
                  "FASTVIT_CUBINS = the aot build for this arch: _C's C++ kernels replay the launch plans (no "
                  "Python, no JIT, no autotuning). first_call_s: wall clock of the process's first forward "
                  "(batch 1), compiles / table and module loads included; "
                  f"steady: CUDA-event latency of one forward, median of {ITERS} after {WARMUP} warm-up"),
        model=MODEL, dtype=dtype, torch=cub["torch"], triton=cub["triton"], paths=paths, ratios=ratios)

    benchmark.extra_info.update(
        plans=cub.get("plans"), target_ratio=TARGET_SPEEDUP,
        target_met=all(ratios[f"images_per_s_cubin_over_triton_b{b}"] >= TARGET_SPEEDUP for b in BATCHES))
    assert tri["route"] is None, f"the Triton path ran on the cubin route ({tri['route']})"
    assert set(tri["served_cuda"].values()) == {"triton"} and set(cub["served_cuda"].values()) == {"cpp"}, (
        tri["served_cuda"], cub["served_cuda"])
    assert cub.get("plans") and cub["plans"]["python_fallbacks"] == 0, (
        f"calls of the cubin path ran Python for want of a plan: {cub.get('plans')}")
    assert cub["route"] is not None and pathlib.Path(cub["route"]).parent.resolve() == table.resolve(), (
        f"the cubin route was not on with the table {table}: {cub['route']}")
    assert tri["weights_sha256"] == cub["weights_sha256"], "the two processes built different weights"
    tri_logits = torch.load(tri["logits"], weights_only=True)
    cub_logits = torch.load(cub["logits"], weights_only=True)
    for key in [f"b{b}_first" for b in BATCHES] + [f"b{b}" for b in BATCHES]:
        a, b = cub_logits[key], tri_logits[key]
        assert torch.equal(a, b), (f"{key} logits: the cubin route differs from the Triton path (max |diff| "
                                   f"{_max_abs_diff(a, b):.3g}): the same cubins on the same inputs must agree bit "
                                   "for bit")
    assert compiled["triton"], (
        "the Triton path left no compile artefact in its fresh TRITON_CACHE_DIR, so the no-JIT check of the cubin "
        f"route proves nothing; its cache holds {tri['cache_files'][:20]}")
    assert not compiled["cubin"], (
        f"the cubin route JIT-compiled {len(compiled['cubin'])} artefacts: {compiled['cubin'][:20]}")
    for which in ("a", "b"):
        g, e = cub_logits[f"graph_{which}"], cub_logits[f"eager_{which}"]
        assert torch.equal(g, e), (f"CUDA graph replay on input {which} differs from eager (max |diff| "
                                   f"{_max_abs_diff(g, e):.3g})")
    assert not torch.equal(cub_logits["graph_a"], cub_logits["graph_b"]), (
        "the graph replay gave the same logits for two different inputs: it did not read the copied input")
