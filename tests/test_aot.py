"""Ahead-of-time compile checks (``python -m fastvit_kernels.aot check``): every kernel variant that ViT-B/16 and
ViT-H/14 launch in training and inference (bf16 and fp16; head_dim 64 and 80) builds for sm_80 and sm_90 without
register spills, within the shared-memory limit, and with tensor-core instructions in the GEMM and attention
kernels (warpgroup MMA, HGMMA, on sm_90). ViT-L/16 and fp32 are left to the CLI: ViT-L's kernels differ from
ViT-B's only by H = 16 heads, and fp32 has no tensor-core requirement.

The check compiles in a subprocess without TRITON_INTERPRET (conftest.py turns the interpreter on for this
process). About 2 minutes on 2 cores with an empty Triton cache; run alone with ``pytest -m aot``.
"""

import json
import os
import subprocess
import sys

import pytest

from fastvit_kernels import aot

pytestmark = pytest.mark.aot

ARGS = ["--arch", "sm_80", "--arch", "sm_90", "--model", "vit_base_patch16_224", "--model", "vit_huge_patch14_224",
        "--dtype", "bf16", "--dtype", "fp16"]


@pytest.fixture(scope="module")
def report() -> dict:
    """The JSON report of the check on the subset above (compiled once for the module)."""
    missing = aot.missing_tools()
    if missing:
        pytest.skip(f"AOT check needs Triton's bundled CUDA tools; missing: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastvit_kernels.aot", "check", *ARGS, "--json"],
                          capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip()[-500:])
    assert proc.stdout.strip(), f"no report (rc={proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _rows(report, **match):
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def _where(r) -> str:
    return f"sm_{r['arch']} {r['name']} [{r['spec']}] [{r['config']}] used by {r['uses'][:2]}"


def test_every_kernel_of_the_package_is_checked(report):
    assert report["not_traced"] == [], "kernels no workload launches (add them to aot.vit_workloads)"
    names = {r["name"] for r in report["rows"]}
    assert set(aot.TENSOR_CORE_KERNELS) <= names
    for arch in (80, 90):  # both targets, both head dims of the attention kernels
        assert {r["constants"]["HEAD_DIM"] for r in _rows(report, arch=arch, name="_attention_fwd_kernel")} == {64, 80}


def test_no_compile_failures(report):
    failed = [f"{_where(r)}: {r['error']}" for r in report["rows"] if r["error"]]
    assert not failed, "\n".join(failed)


def test_no_register_spills(report):
    spilled = [f"{_where(r)}: {r['stack']} B" for r in report["rows"] if r["stack"]]
    assert not spilled, "\n".join(spilled)


def test_shared_memory_within_the_per_block_limit(report):
    limit = {80: 163 * 1024, 90: 227 * 1024}
    over = [f"{_where(r)}: {r['smem']} B" for r in report["rows"] if r["smem"] > limit[r["arch"]]]
    assert not over, "\n".join(over)
    assert all(0 < r["occupancy"] <= 1 for r in report["rows"])


def test_gemm_and_attention_use_tensor_cores(report):
    """fp16 / bf16 GEMM-core and attention kernels: HMMA on sm_80; warpgroup MMA (HGMMA) on sm_90, which Triton
    3.6+ emits for these tiles (num_warps a multiple of 4, BLOCK_M a multiple of 64)."""
    checked, bad = 0, []
    for r in report["rows"]:
        if r["name"] not in aot.TENSOR_CORE_KERNELS:
            continue
        checked += 1
        want = "HGMMA" if r["arch"] == 90 else "HMMA"
        if not r["tensor_cores"].get(want):
            bad.append(f"{_where(r)}: {r['tensor_cores']} (want {want})")
    assert checked >= 20 and not bad, "\n".join(bad)


def test_report_verdicts_agree(report):
    assert report["failures"] == (sum(bool(r["problems"]) for r in report["rows"])
                                  + sum(bool(g["problems"]) for g in report["grids"])) == 0


def test_launch_grids_within_cuda_limits(report):
    """Every launch of the package, each autotune candidate, at batches up to 8192 and 1024-px inputs, fits CUDA's
    grid (axis 0 <= 2^31 - 1, axes 1 and 2 <= 65,535)."""
    over = [f"{g['name']} {g['grid']} at {g['at']}: {g['problems']}" for g in report["grids"] if g["problems"]]
    assert not over, "\n".join(over)


def test_grid_check_traces_the_large_shapes(report):
    """The grid check really ran the ops at batch 8192 and 1024 px: LayerNorm's row statistics launch one program
    per ROWS rows (1 at the SwiGLU hidden norm's 4096 columns, ViT-H-sized D_hidden = 3413), so ViT-H/14 at
    1022 px (73 x 73 + 1 = 5330 tokens) x 8192 images gives 8192 * 5330 programs."""
    grids = {g["name"]: g for g in report["grids"]}
    assert {r["name"] for r in report["rows"]} <= set(grids)  # every compiled kernel's grids were recorded too
    stats = grids["_layernorm_stats_kernel"]
    assert stats["grid"] == [8192 * 5330, 1, 1], stats
    assert stats["at"][0].startswith("H/14") and "B=8192 img=1022" in stats["at"][0], stats["at"]
    assert all(r["grid"][0] >= 1 for r in report["rows"])  # the compiled variants carry their launches' grids too


# ---- the static analysis itself, on fixed inputs (fast, no compiler) ----------------------------------------------
def test_parse_resource_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function _matmul_kernel:\n"
            "  REG:255 STACK:784 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert aot.parse_resource_usage(text) == {"REG": 255, "STACK": 784, "SHARED": 1024, "LOCAL": 0}
    with pytest.raises(ValueError, match="no function"):
        aot.parse_resource_usage("Resource usage:\n")


def test_tensor_core_ops_counts_opcodes_only():
    sass = """
        /*0040*/                   HFMA2.MMA R7, -RZ, RZ, 0, 0 ;
        /*0a70*/                   HMMA.16816.F32.BF16 R4, R12, R16, R4 ;
        /*0a80*/              @P0  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0a90*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0aa0*/                   FFMA R3, R4, R5, R3 ;
    """
    assert aot.tensor_core_ops(sass) == {"HMMA": 1, "HGMMA": 2}


def test_occupancy():
    # 255 registers x 256 threads: one block of 8 warps per SM (64K registers) -> 8 / 64 warps
    assert aot.occupancy(255, 32 * 1024, 8, 80) == 8 / 64
    # 32 registers, 4 warps, no shared memory: 16 blocks fill the 64 warps
    assert aot.occupancy(32, 0, 4, 90) == 1.0
    # 100 KB of shared memory per block: one block on sm_80 (164 KB per SM), two on sm_90 (228 KB)
    assert aot.occupancy(64, 100 * 1024, 4, 80) == 4 / 64
    assert aot.occupancy(64, 100 * 1024, 4, 90) == 8 / 64
    # over the per-block limit: does not launch
    assert aot.occupancy(64, 200 * 1024, 4, 80) == 0.0


def _row(**kw):
    row = dict(arch=90, name="_matmul_kernel", signature={"a_ptr": "*bf16"}, error=None, stack=0, smem=1024,
               tensor_cores={"HGMMA": 2})
    row.update(kw)
    return row


@pytest.mark.parametrize("changes,expect", [
    ({}, []),
    ({"grid": [2**31 - 1, 65535, 65535]}, []),
    ({"grid": [2**31, 1, 1]}, ["grid axis 0 = 2,147,483,648 > 2,147,483,647"]),
    ({"grid": [1, 65536, 1]}, ["grid axis 1 = 65,536 > 65,535"]),
    ({"grid": [4, 1, 131072], "stack": 8}, ["grid axis 2 = 131,072 > 65,535", "8 stack"]),
    ({"stack": 16}, ["16 stack (spill) bytes"]),
    ({"smem": 228 * 1024}, ["shared memory"]),
    ({"tensor_cores": {"HMMA": 8}}, ["no HGMMA (warpgroup MMA) on sm_90; HMMA only"]),
    ({"arch": 80, "tensor_cores": {}}, ["no tensor-core instructions"]),
    ({"arch": 80, "tensor_cores": {}, "signature": {"a_ptr": "*fp32"}}, []),  # IEEE fp32: no tensor cores wanted
    ({"error": "PTXASError: boom"}, ["compile failed: PTXASError: boom"]),
])
def test_problems(changes, expect):
    found = aot.problems(_row(**changes))
    assert len(found) == len(expect) and all(f.startswith(e) for f, e in zip(found, expect)), found


def test_refuses_interpreted_kernels():
    """This test process runs the interpreter: the check must say so instead of compiling interpreted kernels."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful under the Triton interpreter")
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.package_kernels()


_AUTOTUNED = '''
import triton, triton.language as tl

def _keep(configs, nargs, **kwargs):  # prune like a keep() filter: BLOCK 256 "does not fit"
    return [c for c in configs if c.kwargs["BLOCK"] <= 128]

@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 2), (128, 4), (256, 4))],
                 key=["n"], prune_configs_by={"early_config_prune": _keep})
@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)
'''

_RECORD = '''
import json, torch, autotuned
from fastvit_kernels import aot
from fastvit_kernels.kernels import _launch
jobs = {}
x = torch.empty(1000)
with _launch.recording(aot._Recorder([80, 90], jobs, ["test"])):
    _launch.launch(autotuned._double_kernel, (16,), x, x, 1000)
print(json.dumps([[r["arch"], r["config"], r["error"], r["regs"]] for r in aot.compile_all(list(jobs.values()), 1)]))
'''


def test_autotune_candidates_are_each_compiled(tmp_path):
    """A ``triton.autotune`` kernel is checked in every candidate its pruning keeps (issue 7: "each autotune
    candidate"), for each target."""
    if aot.missing_tools():
        pytest.skip(f"AOT check needs Triton's bundled CUDA tools; missing: {aot.missing_tools()}")
    (tmp_path / "autotuned.py").write_text(_AUTOTUNED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RECORD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert sorted((a, c) for a, c, _, _ in rows) == [(80, "BLOCK=128 s3 w4"), (80, "BLOCK=64 s3 w2"),
                                                     (90, "BLOCK=128 s3 w4"), (90, "BLOCK=64 s3 w2")]
    assert all(err is None and regs > 0 for _, _, err, regs in rows)


_GRIDS = '''
import json, torch, autotuned
from fastvit_kernels import aot
from fastvit_kernels.kernels import _launch
grids = {}
k = autotuned._double_kernel
rec = aot._Recorder([], {}, ["test"], grids, {"autotuned:_double_kernel": k})  # the inventory names and links k.fn
x = torch.empty(1, device="meta")
n = 1 << 20
with _launch.recording(rec):
    _launch.launch(k, lambda meta: (triton_cdiv(n, meta["BLOCK"]), 70000), x, x, n)  # B * H = 70000 on axis 1
    _launch.launch(k, (3, 2), x, x, 5)                                               # a plain tuple
    _launch.launch(k.fn, (1,), x, x, 5, BLOCK=64)  # its plain kernel, fixed config: expanded like the autotuner
assert rec.launched == {"autotuned:_double_kernel": 3}, rec.launched
print(json.dumps(list(grids.values())))
'''.replace("triton_cdiv", "(lambda a, b: -(-a // b))")


def test_grid_check_catches_a_bad_grid(tmp_path):
    """A synthetic launch whose grid is a function of the tile: the recorder evaluates it for every autotune
    candidate (the smallest kept tile, BLOCK=64, gives the largest axis 0), keeps the largest extent of each axis,
    and the verdict names the axis over CUDA's limit (axis 1 = 70,000 > 65,535). No compiler needed."""
    pytest.importorskip("triton")
    (tmp_path / "autotuned.py").write_text(_AUTOTUNED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _GRIDS], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(proc.stdout)
    assert rec["name"] == "_double_kernel" and rec["launches"] == 6  # 3 launches x 2 kept candidates
    assert rec["grid"] == [(1 << 20) // 64, 70000, 1]
    assert aot.grid_problems(rec["grid"]) == ["grid axis 1 = 70,000 > 65,535"]
    assert aot.grid_problems([3, 2, 1]) == []


_BIG_TRACE = '''
import json, resource
from fastvit_kernels import aot
rows = aot.trace_grids(models=["vit_huge_patch14_224"], dtypes=["bf16"], modes=["train"], batches=[8192],
                       img_sizes=[1024])
print(json.dumps([{r["name"]: r["grid"] for r in rows}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
'''


def test_grid_trace_allocates_nothing_at_large_shapes():
    """ViT-H/14 training at batch 8192 and 1024 px (qkv alone 8192 x 5330 x 3840 bf16 = 335 GB) is traced on meta
    tensors: the process stays under 4 GB of resident memory and still records the launches."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _BIG_TRACE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids, max_rss_kb = json.loads(proc.stdout)
    assert max_rss_kb < 4 * 1024 * 1024, f"{max_rss_kb / 1024:.0f} MB resident"
    assert grids["_layernorm_stats_kernel"] == [8192 * 5330, 1, 1]  # the SwiGLU hidden norm: one row per program
    assert grids["_prefix_rows_kernel"] == [8192, 1, 1]  # (B, class token)
