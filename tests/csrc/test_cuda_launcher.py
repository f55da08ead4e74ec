"""The C++ CUDA launch layer of ``_C`` (csrc/cuda/) on a machine without a GPU or driver: the driver is loaded at run
time only (no link-time reference to libcuda, a clear error when it is missing), the launch table (kernels.json of
``python -m fastvit_kernels.aot build``) is parsed and validated in C++, and the kernel parameter buffer C++ packs
for each launch the ops actually make equals the one written here, independently, from Triton's launcher convention
(each parameter little-endian at its table offset: pointers as 8-byte addresses, integers at their size, fp32 as
IEEE single, fp16 rounded to nearest even, bf16 as the upper half of the fp32 bits, i1 as one byte).

Nothing is launched: the launch itself, module loading and TMA descriptor encoding need a GPU."""

from __future__ import annotations

import ctypes
import inspect
import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from tests.csrc.conftest import run_isolated, subprocess_env as _env

NO_DRIVER = ("no CUDA driver: dlopen(libcuda.so.1) failed", "the C++ CUDA launcher needs the NVIDIA driver")


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# ---- the reference packing: Triton's launcher convention, written from the table alone --------------------------
_INT_FORMATS = {"i1": "<B", "u1": "<B", "i8": "<b", "u8": "<B", "i16": "<h", "u16": "<H", "i32": "<i", "u32": "<I",
                "i64": "<q", "u64": "<Q"}


def reference_buffer(params: list[dict], values: dict) -> bytes:
    """The parameter buffer of one launch: ``values`` maps each parameter name to a tensor (pointer: its data_ptr), an
    int, a float or 128 descriptor bytes; scratch parameters are NULL."""
    size = max(p["offset"] + p["size"] for p in params)
    buf = bytearray(size)
    for p in params:
        t, off, v = p["type"], p["offset"], values.get(p["name"])
        if p["role"] in ("global_scratch", "profile_scratch"):
            struct.pack_into("<Q", buf, off, 0)
        elif t.startswith("*"):
            struct.pack_into("<Q", buf, off, v.data_ptr())
        elif t == "nvTmaDesc":
            buf[off:off + 128] = bytes(v)
        elif t in _INT_FORMATS:
            struct.pack_into(_INT_FORMATS[t], buf, off, int(v))
        elif t in ("fp32", "f32"):
            struct.pack_into("<f", buf, off, v)
        elif t == "fp64":
            struct.pack_into("<d", buf, off, v)
        elif t == "fp16":
            struct.pack_into("<e", buf, off, v)
        elif t == "bf16":
            buf[off:off + 2] = struct.pack("<f", v)[2:]
        else:
            raise AssertionError(f"unknown type {t}")
    return bytes(buf)


def op_lists(params: list[dict], values: dict, descriptors: dict) -> tuple:
    """(tensors, ints, floats, descriptors) of ``fastvit_csrc::pack_params`` for one launch (the op's argument
    convention, csrc/cuda/ops.cpp): pointer and descriptor-base tensors, integers (scratch pointers as 0 = NULL),
    floats, and each descriptor's encoded bytes, each list in parameter order."""
    tensors, ints, floats, descs = [], [], [], []
    for p in params:
        t, v = p["type"], values.get(p["name"])
        if p["role"] in ("global_scratch", "profile_scratch"):
            ints.append(0)
        elif t == "nvTmaDesc":
            tensors.append(v["base"])
            descs.append(torch.tensor(list(descriptors[p["name"]]), dtype=torch.uint8))
        elif t.startswith("*"):
            tensors.append(v)
        elif t in _INT_FORMATS:
            ints.append(int(v))
        else:
            floats.append(float(v))
    return tensors, ints, floats, descs


# The script of the isolated process that loads only _C: packs each case in C++ and compares with the reference.
_COMPARE = r'''
import json, struct, sys, torch
{reference}
torch.ops.load_library({lib!r})
cases = torch.load({cases!r}, weights_only=False)
table = json.load(open({table!r}))
rows = {{r["symbol"]: r for r in table["kernels"]}}
done, tma = [], []
for case in cases:
    params = rows[case["symbol"]]["params"]
    descs = {{p["name"]: bytes((i * 7 + j) % 256 for j in range(128)) for i, p in enumerate(params)
             if p["type"] == "nvTmaDesc"}}
    values = {{n: (descs[n] if n in descs else v) for n, v in case["values"].items()}}
    tensors, ints, floats, d = op_lists(params, case["values"], descs)
    got = torch.ops.fastvit_csrc.pack_params({table!r}, case["symbol"], tensors, ints, floats, d)
    want = reference_buffer(params, values)
    assert got.dtype == torch.uint8 and bytes(got.tolist()) == want, (case["symbol"], bytes(got.tolist()).hex(),
                                                                     want.hex())
    done.append(case["symbol"])
    for p in params:  # the descriptor encoder's arguments: Triton's host TensorDescriptor convention
        if p["type"] != "nvTmaDesc":
            continue
        meta, arg = p["tensordesc_meta"], p["name"][:-len(".desc")]
        rank = len(meta["block_size"])
        shape = [case["values"][f"{{arg}}.shape[{{i}}]"] for i in range(rank)]
        strides = [case["values"][f"{{arg}}.stride[{{i}}]"] for i in range(rank)]
        pad = lambda xs: list(xs) + [0] * (5 - len(xs))
        want = [{{8: 10, 9: 8, 10: 9}}.get(meta["elem_type"], meta["elem_type"]), rank, *pad(shape[::-1]),
                *pad([meta["elem_size"] * s for s in strides[-2::-1]]), *pad(meta["block_size"][::-1]),
                *pad([1] * rank), 0, meta["swizzle"], 2, 0]
        got = torch.ops.fastvit_csrc.tma_encode_args({table!r}, case["symbol"], p["name"], 1 << 20, shape, strides)
        assert got == want, (case["symbol"], p["name"], got, want)
        tma.append(p["name"])
assert "fastvit_kernels" not in sys.modules
print(json.dumps(dict(done=done, tma=tma)))
'''


def compare_in_library(library, table_path, cases, tmp_path) -> list[str]:
    """Run ``_COMPARE`` over ``cases`` ([{"symbol", "values": {param name: value}}]): each packed buffer, and each
    descriptor's encoder arguments (cuTensorMapEncodeTiled), against the reference. Returns {"done": the symbols
    checked, "tma": the descriptor parameters checked}."""
    torch.save(cases, tmp_path / "cases.pt")
    reference = "\n".join([f"_INT_FORMATS = {_INT_FORMATS!r}", inspect.getsource(reference_buffer),
                           inspect.getsource(op_lists)])
    proc = run_isolated(_COMPARE.format(reference=reference,
                                        lib=str(library),
                                        cases=str(tmp_path / "cases.pt"), table=str(table_path)))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- (a) no driver: a clear error, only when the launcher is used ----------------------------------------------
@pytest.mark.skipif(_has_driver(), reason="this machine has libcuda.so.1")
def test_no_driver_is_a_clear_runtime_error(csrc_library):
    proc = run_isolated(f"""
        import torch
        torch.ops.load_library({str(csrc_library)!r})   # loading needs no driver
        for attempt in range(2):                          # the failed load is remembered, not retried differently
            try:
                torch.ops.fastvit_csrc.cuda_driver_version()
            except RuntimeError as e:
                print(str(e).splitlines()[0])
            else:
                raise AssertionError("cuda_driver_version() succeeded without a driver")
    """)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith("fastvit_kernels._C: no CUDA driver: dlopen(libcuda.so.1) failed: libcuda.so.1")
    assert all(s in lines[0] for s in NO_DRIVER) and "CPU tensors run the CPU kernels" in lines[0]


# ---- (c) no link-time CUDA dependency -----------------------------------------------------------------------------
def test_library_links_no_cuda(csrc_library):
    """``_C`` loads on a machine without the driver or PyTorch's CUDA libraries: no undefined cu* symbol, no undefined
    aoti CUDA-stream symbol (resolved with dlsym), no DT_NEEDED on a CUDA library."""
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not installed")
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(csrc_library)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    names = [line.split()[-1].split("@")[0] for line in undefined if line.strip()]
    assert "dlopen" in names and "dlsym" in names  # the run-time loading is really there
    # driver API names all start with "cu"; the CUDA-stream getter lives in libtorch_cuda (libtorch_cpu's
    # aoti_torch_device_type_cuda, a device-type constant, is fine)
    assert not [n for n in names if n.startswith("cu") or n == "aoti_torch_get_current_cuda_stream"], names
    needed = [line for line in subprocess.run(["readelf", "-d", str(csrc_library)], capture_output=True, text=True,
                                              check=True).stdout.splitlines() if "(NEEDED)" in line]
    assert needed and not [line for line in needed if "cuda" in line.lower() or "nvrtc" in line.lower()], needed


# ---- (d) the table parse, and the packing of every parameter type, on a synthetic table --------------------------
def _layout(types: list[str]) -> list[dict]:
    from fastvit_kernels.aot.build import param_layout

    return param_layout(types)


def _synthetic_table(path, **row_changes) -> dict:
    types = ["*fp16", "i1", "i32", "nvTmaDesc", "i32", "i32", "i64", "i64", "fp16", "u8", "i64", "bf16", "fp32",
             "i16", "fp64", "u64", "u32", "*i8", "*i8"]
    names = ["x_ptr", "flag", "n", "d.desc", "d.shape[0]", "d.shape[1]", "d.stride[0]", "d.stride[1]", "h", "b",
             "big", "g", "s", "m", "w", "u", "v", "global_scratch", "profile_scratch"]
    params = []
    for name, lay in zip(names, _layout(types)):
        role = ("tensor_descriptor" if name.startswith("d.") else
                "global_scratch" if name == "global_scratch" else "profile_scratch" if name == "profile_scratch"
                else "argument")
        p = dict(name=name, arg=name.split(".")[0], role=role, **lay)
        if name == "d.desc":
            p["tensordesc_meta"] = dict(swizzle=3, elem_size=2, elem_type=6, block_size=[64, 64], fp4_padded=False,
                                        is_im2col=False)
        params.append(p)
    row = dict(symbol="t_kernel_sm90_000000000000", cubin="t_kernel.sm_90.000000000000.cubin", entry="t_kernel",
               cc=90, num_warps=4, num_ctas=1, shared_bytes=0, static_shared_bytes=0, needs_shared_optin=False,
               scratch=dict(global_bytes=0, global_align=1, profile_bytes=0, profile_align=1), params=params,
               param_buffer_bytes=params[-1]["offset"] + 8, launch_cooperative_grid=False, launch_pdl=False)
    row.update(row_changes)
    table = {"format": "fastvit_kernels.aot.build/1", "kernels": [row]}
    path.write_text(json.dumps(table))
    return table


def test_pack_every_parameter_type(csrc_library, tmp_path):
    """Every Triton scalar type at its natural alignment (padding zero), extreme values, fp16 rounding to nearest even
    and to infinity, a TMA descriptor and its shape / strides: C++ equals the reference byte for byte."""
    table = _synthetic_table(tmp_path / "kernels.json")
    x = torch.empty(9, dtype=torch.float16)[1:]  # a view: the pointer is data_ptr(), storage offset included
    cases = []
    for flag, h, g in ((True, 1.0 + 2 ** -11, 1.0 / 3), (False, 65519.0, -2.5e-8), (True, -6.0e-8, float("inf")),
                       (False, 3 * 2 ** -26, -0.0)):
        values = {"x_ptr": x, "flag": flag, "n": -2 ** 31, "d.desc": {"base": x}, "d.shape[0]": 197,
                  "d.shape[1]": 2 ** 31 - 1, "d.stride[0]": 2304, "d.stride[1]": 1, "h": h, "b": 255,
                  "big": -2 ** 63, "g": g, "s": 1e-6, "m": -32768, "w": 0.1, "u": 2 ** 63 - 1, "v": 2 ** 32 - 1}
        cases.append(dict(symbol=table["kernels"][0]["symbol"], values=values))
    got = compare_in_library(csrc_library, tmp_path / "kernels.json", cases, tmp_path)
    assert got == dict(done=[cases[0]["symbol"]] * 4, tma=["d.desc"] * 4)


_ERRORS = r'''
import sys, torch
torch.ops.load_library({lib!r})
x = torch.zeros(8, dtype=torch.float16)
args = dict(tensors=[x, x], ints=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0], floats=[1.0, 2.0, 3.0, 4.0],
            descriptors=[torch.zeros(128, dtype=torch.uint8)])
calls = {{
    "format": ({bad_format!r}, {{}}),
    "offset": ({bad_offset!r}, {{}}),
    "buffer": ({bad_buffer!r}, {{}}),
    "symbol": ({good!r}, dict(symbol="nope")),
    "few_ints": ({good!r}, dict(ints=[1, 2])),
    "extra_float": ({good!r}, dict(floats=[1.0, 2.0, 3.0, 4.0, 5.0])),
    "i32_range": ({good!r}, dict(ints=[1, 2 ** 31, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0])),
    "i1_range": ({good!r}, dict(ints=[2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0])),
    "fp16_range": ({good!r}, dict(floats=[70000.0, 2.0, 3.0, 4.0])),
    "desc_size": ({good!r}, dict(descriptors=[torch.zeros(64, dtype=torch.uint8)])),
}}
for label, (table, change) in calls.items():
    kw = {{**args, **change}}
    try:
        torch.ops.fastvit_csrc.pack_params(table, kw.pop("symbol", "t_kernel_sm90_000000000000"), **kw)
    except RuntimeError as e:
        print(label, "|", str(e).splitlines()[0])
    else:
        print(label, "| no error")
'''


def test_table_and_arguments_are_validated(csrc_library, tmp_path):
    """A table of another format version, parameter offsets that are not the natural-alignment layout, a wrong buffer
    size, an unknown symbol, too few / too many values, out-of-range integers and a short descriptor are refused with
    messages that name the table / parameter and say what was expected."""
    good, bad_format = tmp_path / "good.json", tmp_path / "format.json"
    _synthetic_table(good)
    t = json.loads(good.read_text())
    t["format"] = "fastvit_kernels.aot.build/0"
    bad_format.write_text(json.dumps(t))
    t = json.loads(good.read_text())
    t["kernels"][0]["params"][2]["offset"] += 4
    (tmp_path / "offset.json").write_text(json.dumps(t))
    t = json.loads(good.read_text())
    t["kernels"][0]["param_buffer_bytes"] += 8
    (tmp_path / "buffer.json").write_text(json.dumps(t))
    proc = run_isolated(_ERRORS.format(lib=str(csrc_library), good=str(good), bad_format=str(bad_format),
                                       bad_offset=str(tmp_path / "offset.json"),
                                       bad_buffer=str(tmp_path / "buffer.json")))
    got = dict(line.split(" | ", 1) for line in proc.stdout.strip().splitlines())
    assert got["format"] == (f"fastvit_kernels._C: {bad_format} has format 'fastvit_kernels.aot.build/0'; this library "
                             "reads 'fastvit_kernels.aot.build/1' (rebuild the table with the fastvit_kernels that "
                             "built this library: python -m fastvit_kernels.aot build)")
    assert "kernels[0] (t_kernel_sm90_000000000000).params[2] (n: i32) has size 4, align 4, offset 16" in got["offset"]
    assert "its type gives size 4, align 4, offset 12" in got["offset"]
    assert "param_buffer_bytes is 296; the parameters end at 288" in got["buffer"]
    assert got["symbol"].endswith("has no kernel 'nope' (1 symbols)")
    assert "ints has 2 entries, too few for parameter d.shape[0] (i32)" in got["few_ints"]
    assert "the kernel takes 2 tensors, 13 ints and 4 floats; got 2, 13 and 5" in got["extra_float"]
    assert "parameter n (i32) = 2147483648 is out of range" in got["i32_range"]
    assert "parameter flag (i1) = 2 is out of range" in got["i1_range"]
    assert "parameter d.desc needs a 128-byte descriptor; got 64 bytes" in got["desc_size"]
    assert "parameter h (fp16) = 70000.000000 is out of fp16 range" in got["fp16_range"]


# ---- (b) the launches the ops make, packed in C++ and by the reference ------------------------------------------
# The launches are matched to their rows and bound by the package's cubin route (kernels/_cubins.py, the code that
# launches them on a GPU); the packing reference above is independent of it.
_RECORD = r'''
import sys, torch
from fastvit_kernels import aot
from fastvit_kernels.kernels import _cubins, _launch

table = _cubins.load_table(sys.argv[1])
standins = {}

def standin(t):
    # Addresses are local to a process, so each distinct tensor becomes a small one with an offset view (the packer
    # must write data_ptr(), storage offset included); what the launch really passed is kept: shapes, strides, ints.
    if isinstance(t, dict):
        return {"base": standin(t["base"])}
    if not isinstance(t, torch.Tensor):
        return t
    if id(t) not in standins:
        standins[id(t)] = (t, torch.empty(4, dtype=t.dtype)[1:])
    return standins[id(t)][1]

cases = []
def record(kernel, grid, args, kwargs):
    for arch in ARCHS:  # FASTVIT_AUTOTUNE=0: the autotuner's pruning, then its first config with a row
        found = _cubins.match(table, kernel, grid, args, kwargs, arch)
        if found is None:
            continue  # a kernel outside the build's filter, or sm_80 for the Hopper-only GEMM
        cases.append(dict(symbol=found.row["symbol"], values={n: standin(v) for n, v in found.values.items()}))

for ARCHS, setting in aot.build_passes((80, 90)):  # the build's passes: each binds for its archs
    with setting(), _launch.recording(record):
        for what, thunk in aot.vit_workloads("vit_base_patch16_224", aot.DTYPES["fp16"], 1, "infer"):
            thunk()
torch.save(cases, sys.argv[2])
'''


@pytest.mark.aot
def test_recorded_launches_pack_like_tritons_launcher(csrc_library, aot_table, tmp_path):
    """Each launch the ViT-B/16 fp16 inference ops make of the built kernels (FASTVIT_AUTOTUNE=0, bound by Triton's
    binder for sm_80 and sm_90 and matched to its table row) packs in C++ to the reference buffer; every row of the
    table is exercised, the TMA GEMM's descriptors, shapes and strides and the attention's fp32 scale included, and
    each descriptor's cuTensorMapEncodeTiled arguments are Triton's (dimensions innermost first, byte strides)."""
    env = _env()
    env["FASTVIT_AUTOTUNE"] = "0"
    proc = subprocess.run([sys.executable, "-c", _RECORD, str(aot_table), str(tmp_path / "cases.pt")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = torch.load(tmp_path / "cases.pt", weights_only=False)
    table = json.loads(aot_table.read_text())
    assert {c["symbol"] for c in cases} == {r["symbol"] for r in table["kernels"]}
    types = {p["type"] for r in table["kernels"] for p in r["params"]}
    assert {"nvTmaDesc", "i32", "i64", "fp32"} <= types and any(t.startswith("*") for t in types)
    checked = compare_in_library(csrc_library, aot_table, cases, tmp_path)
    assert sorted(checked["done"]) == sorted(c["symbol"] for c in cases)
    tma_cases = [c for c in cases if "_desc.desc" in str(list(c["values"]))]
    assert tma_cases and len(checked["tma"]) == 3 * len(tma_cases)  # a, b and c of every TMA GEMM launch
