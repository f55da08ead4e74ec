"""The AOT build (``python -m fastvit_kernels.aot build``): cubins plus a launch table a C++ launcher can use.

A small build (ViT-B/16 inference, fp16, batch 1; the attention forward, the class-token rows and the Hopper TMA GEMM
kernels; sm_80 and sm_90: 8 cubins, about 20 s on 2 cores with an empty Triton cache) is checked against the cubins
themselves (``cuobjdump -elf``: entry name, parameter sizes and offsets; ``--dump-resource-usage``: static shared
memory), against Triton's own compile metadata, and against an independent recording of the same workload with
``FASTVIT_AUTOTUNE=0`` bound by Triton's ``JITFunction`` binder: every variant the launchers run without
autotuning is in the table with the argument list Triton's launcher would pass, and nothing else is.

Compiles run in subprocesses without TRITON_INTERPRET (conftest.py turns the interpreter on for this process).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fastvit_kernels import aot
from fastvit_kernels.aot import build as aot_build

pytestmark = pytest.mark.aot

KERNELS = "_attention_fwd_kernel|_prefix_rows_kernel|_matmul_tma_kernel"
WORKLOAD = ["--model", "vit_base_patch16_224", "--dtype", "fp16", "--mode", "infer", "--batch", "1"]
FIELDS = ("symbol", "kernel", "module", "cubin", "entry", "arch", "cc", "num_warps", "num_stages", "num_ctas",
          "threads_per_block", "shared_bytes", "static_shared_bytes", "needs_shared_optin", "constexprs", "folded",
          "divisible_by_16", "params", "param_buffer_bytes", "scratch", "grid", "uses", "signature", "attrs", "options",
          "triton_hash")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(aot.__file__))),
                                         env.get("PYTHONPATH", "")])
    return env


def _needs_tools():
    missing = aot.missing_tools()
    if missing:
        pytest.skip(f"the AOT build needs Triton's bundled CUDA tools; missing: {missing}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(output directory, table) of the small build."""
    _needs_tools()
    out = tmp_path_factory.mktemp("aot_build")
    proc = subprocess.run([sys.executable, "-m", "fastvit_kernels.aot", "build", "--arch", "sm_80", "--arch",
                           "sm_90", *WORKLOAD, "--kernel", KERNELS, "--out", str(out), "--jobs", "2"],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    with open(out / "kernels.json") as f:
        return out, json.load(f)


# Run without the interpreter: recompile each table row from the table alone (a Triton cache hit) for Triton's
# metadata, and record the same workload with FASTVIT_AUTOTUNE=0, binding each launch with Triton's binder.
_TRITON_VIEW = r'''
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature
from fastvit_kernels import aot
from fastvit_kernels.kernels import _launch

table = json.load(open(sys.argv[1]))
pattern = re.compile(sys.argv[2])

def jit_fn(module, name):
    k = getattr(importlib.import_module(module), name)
    return k if hasattr(k, "params") else k.fn

meta = {}
for row in table["kernels"]:
    fn = jit_fn(row["module"], row["kernel"])
    names = [p.name for p in fn.params]
    values = {**row["constexprs"], **row["folded"]}
    constexprs = {(names.index(n),): v for n, v in values.items()}
    attrs = {(names.index(n),): a for n, a in row["attrs"].items()}
    assert sorted(n for n, a in row["attrs"].items() if ["tt.divisibility", 16] in a) == sorted(row["divisible_by_16"])
    target = GPUTarget("cuda", row["cc"], 32)
    opts = make_backend(target).parse_options(dict(row["options"]))
    c = triton.compile(ASTSource(fn, row["signature"], constexprs, attrs), target=target, options=opts.__dict__)
    meta[row["symbol"]] = dict(same_cubin=c.asm["cubin"] == open(sys.argv[3] + "/" + row["cubin"], "rb").read(),
                               name=c.metadata.name, shared=c.metadata.shared, num_warps=c.metadata.num_warps,
                               num_stages=c.metadata.num_stages, hash=c.hash,
                               tensordesc_meta=c.metadata.tensordesc_meta)

launches = []
def record(kernel, grid, args, kwargs):
    if isinstance(kernel, Autotuner):  # Triton's autotuner's own pruning, then its first config
        kernel.nargs = dict(zip(kernel.arg_names, args))
        config = kernel.prune_configs(kwargs)[0]
        kwargs = {**kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook({**kernel.nargs, **kwargs})
        kernel = kernel.fn
    if not pattern.search(kernel.__name__):
        return
    module = sys.modules[kernel.fn.__module__]
    for arch in ARCHS:
        if arch < getattr(module, "MIN_ARCH", 0):
            continue
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options = backend.parse_options(options)  # Triton's defaults for the options the launch left out
        sig = [s[0] for s in specialization]
        launches.append(dict(kernel=kernel.__name__, arch=arch, names=list(bound), types=sig,
                             values={n: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                                     for n, v, t in zip(bound, bound.values(), sig) if t == "constexpr"},
                             num_warps=options.num_warps, num_stages=options.num_stages))

for ARCHS, setting in aot.build_passes((80, 90)):  # the build's passes: each binds for its archs
    with setting(), _launch.recording(record):
        for what, thunk in aot.vit_workloads("vit_base_patch16_224", aot.DTYPES["fp16"], 1, "infer"):
            thunk()
print(json.dumps(dict(meta=meta, launches=launches)))
'''


@pytest.fixture(scope="module")
def triton_view(built):
    out, _ = built
    env = _env()
    env["FASTVIT_AUTOTUNE"] = "0"
    proc = subprocess.run([sys.executable, "-c", _TRITON_VIEW, str(out / "kernels.json"), KERNELS, str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _cuobjdump(*args) -> str:
    return subprocess.run([aot._triton_bin("cuobjdump"), *args], capture_output=True, text=True, check=True).stdout


def test_table_fields(built):
    out, table = built
    import triton

    import fastvit_kernels

    assert table["format"] == aot_build.FORMAT
    assert table["triton"] == triton.__version__ and table["fastvit_kernels"] == fastvit_kernels.__version__
    assert table["workload"]["kernel_filter"] == KERNELS and table["tuning_record"] is None
    rows = table["kernels"]
    # sm_80: attention fwd + prefix rows; sm_90 also the TMA GEMMs: the forced-TMA workloads' (LN+bias, +GELU,
    # +tanh GELU, bias+residual) and, from the sm_90 pass with the TMA kernel wherever it applies, those of the
    # bias-free RMSNorm MLP (LN+GELU, residual) and of the SwiGLU MLP with a hidden LayerNorm (LN+bias+residual)
    assert {(r["arch"], r["kernel"]) for r in rows} == {
        ("sm_80", "_attention_fwd_kernel"), ("sm_80", "_prefix_rows_kernel"), ("sm_90", "_attention_fwd_kernel"),
        ("sm_90", "_prefix_rows_kernel"), ("sm_90", "_matmul_tma_kernel")}
    assert len(rows) == 11
    for r in rows:
        assert all(k in r for k in FIELDS), sorted(set(FIELDS) - set(r))
        assert r["cubin"] == f"{r['kernel']}.{r['arch']}.{r['triton_hash'][:aot_build.HASH_DIGITS]}.cubin"
        assert (out / r["cubin"]).stat().st_size > 0
        assert r["threads_per_block"] == 32 * r["num_warps"] and r["num_ctas"] == 1
        assert r["needs_shared_optin"] == (r["shared_bytes"] + r["static_shared_bytes"] > 48 * 1024)
        assert r["grid"]["launches"] and all(len(x["grid"]) == 3 and min(x["grid"]) >= 1
                                             for x in r["grid"]["launches"])
        assert r["grid"]["max"] == [max(x["grid"][a] for x in r["grid"]["launches"]) for a in range(3)]
        assert all(x["rule"] and x["launcher"].startswith("kernels/") for x in r["grid"]["rules"])
        assert [p["role"] for p in r["params"][-2:]] == ["global_scratch", "profile_scratch"]
        assert r["param_buffer_bytes"] == r["params"][-1]["offset"] + 8
    tma = [r for r in rows if r["kernel"] == "_matmul_tma_kernel"]
    assert len(tma) == 7 and all(r["needs_shared_optin"] for r in tma)  # 128 x 128 x 32 tiles, 3 stages: > 48 KiB
    desc = [p for p in tma[0]["params"] if p["name"] == "a_desc.desc"]
    assert desc and desc[0]["type"] == "nvTmaDesc" and desc[0]["size"] == 128 and desc[0]["offset"] % 64 == 0
    assert set(desc[0]["tensordesc_meta"]) >= {"swizzle", "elem_size", "elem_type", "block_size"}
    # the grid rule of the attention forward is the launcher's lambda over the tile
    fwd = next(r for r in rows if r["kernel"] == "_attention_fwd_kernel")
    assert any('meta["BLOCK_M"]' in x["rule"] and x["rule"].startswith("lambda") for x in fwd["grid"]["rules"])
    # ViT-B/16 at batch 1: 12 heads x ceil(197 / BLOCK_M) query blocks
    assert fwd["grid"]["max"][0] == 12 * -(-197 // fwd["constexprs"]["BLOCK_M"])


def test_symbols_unique_and_name_the_arch(built):
    _, table = built
    symbols = [r["symbol"] for r in table["kernels"]]
    assert len(set(symbols)) == len(symbols)
    for r in table["kernels"]:
        assert re.fullmatch(rf"{r['kernel'].strip('_')}_{r['arch'].replace('_', '')}_[0-9a-f]{{12}}", r["symbol"])
    by_kernel = {}
    for r in table["kernels"]:
        by_kernel.setdefault(r["kernel"], set()).add(r["arch"])
    assert by_kernel["_attention_fwd_kernel"] == {"sm_80", "sm_90"}  # the same kernel, one symbol per arch


def test_cubin_parameters_and_shared_memory(built):
    """cuobjdump on each cubin: the table's entry is the cubin's function, its EIATTR_KPARAM_INFO sizes equal the
    table's parameter sizes one for one (Triton's two scratch pointers included), the offsets differ from the
    table's by one constant (the parameter bank's base), and the static shared memory is the table's."""
    out, table = built
    for r in table["kernels"]:
        path = str(out / r["cubin"])
        kparams = aot_build.parse_kparams(_cuobjdump("-elf", path), r["entry"])
        assert [k["ordinal"] for k in kparams] == list(range(len(r["params"]))), r["symbol"]
        assert [k["size"] for k in kparams] == [p["size"] for p in r["params"]], r["symbol"]
        base = kparams[0]["offset"]
        assert [k["offset"] - base for k in kparams] == [p["offset"] for p in r["params"]], r["symbol"]
        usage = _cuobjdump("--dump-resource-usage", path)
        assert f"Function {r['entry']}:" in usage
        assert aot.parse_resource_usage(usage)["SHARED"] == r["static_shared_bytes"]
        assert aot.parse_resource_usage(usage)["REG"] == r["registers"]


def test_table_matches_triton_metadata(built, triton_view):
    """Recompiling each row from the table's own signature / constexprs / specialisation / options reproduces the
    same binary (Triton's hash), entry name, dynamic shared memory, warps and stages."""
    _, table = built
    for r in table["kernels"]:
        m = triton_view["meta"][r["symbol"]]
        assert m["same_cubin"] and m["hash"] == r["triton_hash"] and m["name"] == r["entry"], r["symbol"]
        assert (m["shared"], m["num_warps"], m["num_stages"]) == (r["shared_bytes"], r["num_warps"],
                                                                  r["num_stages"]), r["symbol"]


def _expected_params(launch: dict, tensordesc_meta: list) -> list[tuple]:
    """(name, type) of the parameters Triton's launcher passes for one bound launch: the non-constexpr arguments,
    host tensor descriptors expanded (CUtensorMap, shape i32, strides i64), then the two scratch pointers."""
    out, meta = [], list(tensordesc_meta)
    for name, t in zip(launch["names"], launch["types"]):
        if t == "constexpr":
            continue
        if t.startswith("tensordesc"):
            ndim = t.count(",") + 1
            meta.pop(0)
            out += [(f"{name}.desc", "nvTmaDesc"), *((f"{name}.shape[{i}]", "i32") for i in range(ndim)),
                    *((f"{name}.stride[{i}]", "i64") for i in range(ndim))]
        else:
            out.append((name, t))
    return out + [("global_scratch", "*i8"), ("profile_scratch", "*i8")]


def test_argument_packing_matches_tritons_binder(built, triton_view):
    """Each launch of the workload with FASTVIT_AUTOTUNE=0 (Triton's autotuner pruning to its first config), bound
    by Triton's JITFunction binder for each target, has a table row with the same kernel, target, constexpr and
    folded values, warps, stages and parameter list (names, order, types); and every table row is such a launch."""
    _, table = built
    launches = triton_view["launches"]
    assert len(launches) >= 8
    matched = set()
    for launch in launches:
        rows = [r for r in table["kernels"] if r["kernel"] == launch["kernel"] and r["cc"] == launch["arch"]
                and {**r["constexprs"], **r["folded"]} == launch["values"]]
        assert len(rows) == 1, (launch["kernel"], launch["arch"], launch["values"], len(rows))
        r = rows[0]
        assert (r["num_warps"], r["num_stages"]) == (launch["num_warps"], launch["num_stages"])
        assert list(r["signature"]) == launch["names"] and list(r["signature"].values()) == launch["types"]
        meta = triton_view["meta"][r["symbol"]]["tensordesc_meta"]
        assert [(p["name"], p["type"]) for p in r["params"]] == _expected_params(launch, meta), r["symbol"]
        # the folded arguments are exactly the non-constexpr parameters the binder specialised away (== 1 / None)
        fn_constexprs = set(r["constexprs"])
        assert {n for n, t in zip(launch["names"], launch["types"]) if t == "constexpr"} == \
            fn_constexprs | set(r["folded"])
        assert all(v in (1, None) for v in r["folded"].values())
        matched.add(r["symbol"])
    assert matched == {r["symbol"] for r in table["kernels"]}


def test_c_header(built, tmp_path):
    """kernels.h lists every table row (symbol, cubin, entry, arch, warps, shared bytes, parameter count and sizes)
    and compiles as C99 when a C compiler is present."""
    out, table = built
    header = (out / "kernels.h").read_text()
    assert f"#define FASTVIT_AOT_NUM_KERNELS {len(table['kernels'])}" in header
    for r in table["kernels"]:
        line = next(l for l in header.splitlines() if l.startswith(f'  {{"{r["symbol"]}"'))
        assert f'"{r["cubin"]}", "{r["entry"]}", {r["cc"]}, {r["num_warps"]}, 1, {r["shared_bytes"]}u' in line
        assert f", {len(r['params'])}, {r['param_buffer_bytes']}u, fastvit_aot_params_{r['symbol']}}}," in line
        params = next(l for l in header.splitlines() if f"fastvit_aot_params_{r['symbol']}[] =" in l)
        assert re.findall(r'\{"([^"]+)", (\d+)u, (\d+)u\}', params) == [
            (p["name"], str(p["size"]), str(p["offset"])) for p in r["params"]]
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return
    src = tmp_path / "use.c"
    src.write_text('#include "kernels.h"\nint main(void) { return FASTVIT_AOT_NUM_KERNELS != '
                   '(int)(sizeof fastvit_aot_kernels / sizeof fastvit_aot_kernels[0]); }\n')
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{out}", str(src), "-o", str(tmp_path / "use")],
                   check=True, capture_output=True)
    assert subprocess.run([str(tmp_path / "use")]).returncode == 0


def test_rebuild_replaces_the_previous_build(built, tmp_path):
    """A second build into the same directory removes the first one's cubins (only those: other files stay) and
    writes its own table."""
    out, table = built
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "notes.txt").write_text("kept")
    proc = subprocess.run([sys.executable, "-m", "fastvit_kernels.aot", "build", "--arch", "sm_90", *WORKLOAD,
                           "--kernel", "_prefix_rows_kernel", "--out", str(again), "--jobs", "1"],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads((again / "kernels.json").read_text())
    assert [(r["arch"], r["kernel"]) for r in new["kernels"]] == [("sm_90", "_prefix_rows_kernel")]
    assert sorted(p.name for p in again.iterdir()) == sorted([new["kernels"][0]["cubin"], "kernels.json",
                                                              "kernels.h", "plans.json", "notes.txt"])
    assert new["kernels"][0]["symbol"] in {r["symbol"] for r in table["kernels"]}  # same variant, same name


# ---- the configuration choice, on a synthetic autotuned kernel (no compile) -----------------------------------------
_AUTOTUNED = '''
import triton, triton.language as tl
from fastvit_kernels.kernels import tuning_record

def _keep(configs, nargs, **kwargs):  # the kernel's own filter: BLOCK 256 "does not fit"
    return [c for c in configs if c.kwargs["BLOCK"] <= 128]

@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 4), (64, 2), (128, 4))],
                 key=["n"], prune_configs_by={"early_config_prune": tuning_record.tuned_prune("t._double_kernel",
                                                                                             ["n"], _keep)})
@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)
'''

_CHOOSE = '''
import json, sys, torch, autotuned
from fastvit_kernels import aot
from fastvit_kernels.aot import build as aot_build
from fastvit_kernels.kernels import _launch
x = torch.empty(1000)
k = autotuned._double_kernel

def configs(fixed, record=None, plain=False):
    jobs = {}
    with aot_build._tuning(record):
        with _launch.recording(aot._Recorder([80], jobs, ["test"], fixed=fixed)):
            _launch.launch(k, lambda m: (-(-1000 // m["BLOCK"]),), x, x, 1000)
            if plain:  # its plain kernel with a fixed configuration (FASTVIT_AUTOTUNE=0 in a GEMM launcher)
                _launch.launch(k.fn, (4,), x, x, 1000, BLOCK=256, num_warps=8)
    return sorted((j.config, j.grid[0]) for j in jobs.values())

print(json.dumps(dict(check=configs(False), build=configs(True), record=configs(True, sys.argv[1]),
                      other_key=configs(True, sys.argv[2]), plain=configs(True, plain=True))))
'''


def _record(path, key_n: int, block: int, warps: int) -> str:
    path.write_text(json.dumps({"format": "fastvit_kernels.tuning/1", "gpu": "NVIDIA H100 80GB HBM3",
                                "triton": "0.0", "entries": [{
                                    "kernel": "t._double_kernel", "key": [key_n, "torch.float32", "torch.float32"],
                                    "config": {"kwargs": {"BLOCK": block}, "num_warps": warps, "num_stages": 3}}]}))
    return str(path)


def test_build_takes_the_untimed_configuration(tmp_path):
    """``check`` expands an autotuned launch into every kept candidate; the build takes one: the first candidate
    after the kernel's pruning without a record, the record's pick with one (applied although it was made on
    another GPU and Triton: the build's user chose it), the first candidate for a key the record lacks, and a plain
    kernel launched with a fixed configuration as launched. The grid follows the chosen tile."""
    pytest.importorskip("triton")
    (tmp_path / "autotuned.py").write_text(_AUTOTUNED)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    env.pop("FASTVIT_AUTOTUNE", None)
    env.pop("FASTVIT_TUNING", None)
    proc = subprocess.run([sys.executable, "-c", _CHOOSE, _record(tmp_path / "r.json", 1000, 128, 4),
                           _record(tmp_path / "other.json", 999, 128, 4)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["check"] == [["BLOCK=128 s3 w4", 8], ["BLOCK=64 s3 w2", 16]]
    assert got["build"] == [["BLOCK=64 s3 w2", 16]]
    assert got["record"] == [["BLOCK=128 s3 w4", 8]]
    assert got["other_key"] == [["BLOCK=64 s3 w2", 16]]
    assert got["plain"] == [["BLOCK=256 w8", 4], ["BLOCK=64 s3 w2", 16]]


# ---- fixed inputs (fast, no compiler) -------------------------------------------------------------------------------
def test_param_layout():
    lay = aot_build.param_layout(["*fp16", "i32", "nvTmaDesc", "i32", "i64", "fp16", "i1", "*i8"])
    assert [(p["size"], p["align"], p["offset"]) for p in lay] == [
        (8, 8, 0), (4, 4, 8), (128, 64, 64), (4, 4, 192), (8, 8, 200), (2, 2, 208), (1, 1, 210), (8, 8, 216)]
    with pytest.raises(ValueError, match="'tensordesc<fp16"):
        aot_build.param_layout(["tensordesc<fp16[16, 16]>"])


def test_parse_kparams():
    text = """
.nv.info._k
	<0x1>
	Attribute:	EIATTR_KPARAM_INFO
	Format:	EIFMT_SVAL
	Value:	Index : 0x0	Ordinal : 0x1	Offset  : 0x8	Size    : 0x4
	<0x2>
	Attribute:	EIATTR_KPARAM_INFO
	Format:	EIFMT_SVAL
	Value:	Index : 0x0	Ordinal : 0x0	Offset  : 0x0	Size    : 0x8

.nv.info._other
	Attribute:	EIATTR_KPARAM_INFO
	Value:	Index : 0x0	Ordinal : 0x0	Offset  : 0x0	Size    : 0x2
"""
    assert aot_build.parse_kparams(text, "_k") == [dict(ordinal=0, offset=0, size=8), dict(ordinal=1, offset=8, size=4)]
    assert aot_build.parse_kparams(text, "_other") == [dict(ordinal=0, offset=0, size=2)]
    with pytest.raises(ValueError, match=r"no \.nv\.info\._missing"):
        aot_build.parse_kparams(text, "_missing")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        aot_build.build(str(tmp_path), archs=["sm_70"])
    with pytest.raises(ValueError, match="kernel must be a regular expression"):
        aot_build.build(str(tmp_path), kernel="(")
    assert not list(tmp_path.iterdir())  # refused before anything is traced or written
