"""Ahead-of-time build: every kernel variant the models launch, compiled to cubins plus a launch table (no GPU).

Command::

    python -m fastvit_kernels.aot build --arch sm_80 --arch sm_90 [--model NAME ...] [--dtype bf16 ...]
        [--mode train|infer ...] [--batch N ...] [--kernel REGEX] [--tuning RECORD.json] --out DIR [--jobs N]

What it does (no GPU, no CUDA driver; Triton's compiler and its bundled ``cuobjdump`` only):

1. **Trace** the public ops at the models' shapes exactly as ``python -m fastvit_kernels.aot check`` does
   (:func:`fastvit_kernels.aot.trace`), but with one tile configuration per launch: the one the launcher runs
   without timing anything (``fixed=True`` of :class:`fastvit_kernels.aot._Recorder`). For an autotuned kernel
   that is its full ``early_config_prune`` (the kernel's own candidate filter, then the tuning record's pick when
   ``--tuning`` names one) and the first configuration left: with no record, the first candidate after pruning,
   which is what ``FASTVIT_AUTOTUNE=0`` launches; with a record, its entry for the launch's autotune key (a key
   the record lacks takes the first candidate, with a warning). For sm_90 the trace runs a second time with the
   TMA GEMM kernel wherever the operands allow it, which is what ``gemm_kernel="auto"`` launches on Hopper.
2. **Compile** each distinct variant (kernel, argument types, constexprs, specialisation, options) for each target
   with ``triton.compile`` and write ``DIR/<kernel>.<arch>.<hash>.cubin`` (``hash``: the first 12 hex digits of
   Triton's hash of the compile).
3. **Describe** each cubin in ``DIR/kernels.json`` (:data:`FORMAT`): its unique symbol (kernel, arch and hash), the
   entry name, warps / stages / CTAs, dynamic and static shared memory and whether the dynamic amount needs the
   opt-in above 48 KiB, the constexpr values, the specialisation (arguments divisible by 16; integer arguments
   equal to 1 and ``None`` arguments that Triton folded into the binary and that are not passed), the kernel
   parameter list the cubin's entry expects in order (Triton type, bytes, alignment and offset in the parameter
   buffer; host tensor descriptors expanded as Triton's launcher expands them; Triton's two trailing scratch
   pointers), the recorded launch grids and grid rules, the launch sites, Triton's and this package's versions.
   Each cubin's parameter sizes are checked against its ``.nv.info`` (``EIATTR_KPARAM_INFO``) before the table
   is written. ``DIR/kernels.h`` is the same table as a C header (a struct array) for a C++ launcher.
4. **Plan** each traced op call for each target: ``DIR/plans.json`` (:mod:`fastvit_kernels.aot.plans`), the host
   work of the op's launcher (allocations, views, launches of the table's cubins) that the C++ op library's CUDA
   kernels replay without Python.

The launch convention the table encodes is Triton's own launcher's (``triton/backends/nvidia/driver.c``,
``_launch``): block ``(32 * num_warps, 1, 1)``; grid ``(grid_x * num_ctas, grid_y, grid_z)`` with a cluster of
``num_ctas`` when it is above 1; ``sharedMemBytes`` = the dynamic shared bytes; the runtime arguments in
signature order (constexprs and folded arguments left out), then a global-scratch and a profile-scratch pointer
(NULL when the table's scratch size is 0, else ``grid size * num_ctas * size`` bytes allocated by the caller).

Nothing runs: the table says how to launch each binary, not that it is fast or correct (the interpreter tests and
the AOT check are for that).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager

from .. import aot

FORMAT = "fastvit_kernels.aot.build/1"
TABLE = "kernels.json"
HEADER = "kernels.h"
HASH_DIGITS = 12
SMEM_OPTIN_BYTES = 48 * 1024  # above this, dynamic shared memory needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_...)

# Bytes of each Triton scalar type in the kernel parameter buffer (the PTX .param sizes; Triton's launcher,
# driver.c's extractors, writes the same sizes, except i1 / u1, which it writes as 32-bit values). Pointers are
# 8 bytes; a host tensor descriptor is a CUtensorMap, 128 bytes aligned to 64.
_SCALAR_BYTES = {"i1": 1, "u1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2, "i32": 4, "u32": 4,
                 "fp32": 4, "f32": 4, "i64": 8, "u64": 8, "fp64": 8}
_TMA_DESC = "nvTmaDesc"
_TMA_DESC_BYTES, _TMA_DESC_ALIGN = 128, 64


def param_layout(types: list[str]) -> list[dict]:
    """Size, alignment and offset of each kernel parameter in the parameter buffer, in order.

    Args:
        types: Triton types of the parameters the entry takes ("*fp16", "i32", "fp32", "nvTmaDesc", ...).

    Returns:
        [{"type", "size", "align", "offset"}], offsets from 0 with each parameter at its natural alignment (the
        PTX parameter layout; the cubin's ``EIATTR_KPARAM_INFO`` offsets are these plus one base offset).

    Raises:
        ValueError: a type with no known size.
    """
    out, offset = [], 0
    for t in types:
        if t.startswith("*"):
            size = align = 8
        elif t == _TMA_DESC:
            size, align = _TMA_DESC_BYTES, _TMA_DESC_ALIGN
        elif t in _SCALAR_BYTES:
            size = align = _SCALAR_BYTES[t]
        else:
            raise ValueError(f"kernel parameter type {t!r} has no known size; expected a pointer, {_TMA_DESC} or "
                             f"one of {sorted(_SCALAR_BYTES)}")
        offset = -(-offset // align) * align
        out.append(dict(type=t, size=size, align=align, offset=offset))
        offset += size
    return out


def parse_kparams(elf_text: str, entry: str) -> list[dict]:
    """The kernel parameters of function ``entry`` from ``cuobjdump -elf`` output: its ``.nv.info.<entry>`` section's
    ``EIATTR_KPARAM_INFO`` attributes.

    Returns:
        [{"ordinal", "offset", "size"}] sorted by ordinal (offsets in bytes in the parameter constant bank).

    Raises:
        ValueError: no ``.nv.info.<entry>`` section, or one without parameters.
    """
    m = re.search(rf"^\.nv\.info\.{re.escape(entry)}\s*$(.*?)(?=^\.\S|\Z)", elf_text, re.MULTILINE | re.DOTALL)
    if not m:
        raise ValueError(f"no .nv.info.{entry} section in cuobjdump -elf output")
    found = re.findall(r"Ordinal\s*:\s*(0x[0-9a-fA-F]+|\d+)\s+Offset\s*:\s*(0x[0-9a-fA-F]+|\d+)\s+"
                       r"Size\s*:\s*(0x[0-9a-fA-F]+|\d+)", m.group(1))
    if not found:
        raise ValueError(f".nv.info.{entry} has no EIATTR_KPARAM_INFO entries")
    rows = [dict(ordinal=int(o, 0), offset=int(f, 0), size=int(s, 0)) for o, f, s in found]
    return sorted(rows, key=lambda r: r["ordinal"])


def _jsonable_value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # a tl.dtype or another constexpr object: its Triton spelling


def _kernel_params(job: aot.Job, metadata) -> tuple[list[dict], dict, dict]:
    """(parameters the entry takes, constexprs by name, folded arguments by name) of one compiled job.

    The parameter list is Triton's launcher's (``CudaLauncher`` and ``launch`` in Triton 3.8's
    ``backends/nvidia/driver.py`` / ``driver.c``): the signature's non-constexpr arguments in order, each host
    tensor descriptor expanded by ``triton.backends.driver.expand_signature`` (a CUtensorMap, then its shape as i32
    and its strides as i64 when the compile produced descriptor metadata), then a global-scratch and a
    profile-scratch pointer, each when the compile's metadata has that scratch (Triton 3.8 has both; the build
    compares the list with the cubin's own, so a Triton that passes something else fails loudly)."""
    try:
        from triton.backends.driver import expand_signature
    except ImportError:  # a Triton without it: any tensor descriptor argument is refused below
        expand_signature = None
    tensordesc_meta = getattr(metadata, "tensordesc_meta", None)
    fn = getattr(importlib.import_module(job.module), job.name)
    fn = fn if hasattr(fn, "params") else fn.fn
    declared = {p.name for p in fn.params if p.is_constexpr}
    names = list(job.signature)
    values = {names[path[0]]: v for path, v in job.constexprs.items() if len(path) == 1}
    constexprs = {n: _jsonable_value(v) for n, v in values.items() if n in declared}
    folded = {n: _jsonable_value(v) for n, v in values.items() if n not in declared}
    meta = list(tensordesc_meta or [])
    params = []
    for name, sig in job.signature.items():
        if sig == "constexpr":
            continue
        if isinstance(sig, str) and sig.startswith("tensordesc"):
            if expand_signature is None:
                raise ValueError(f"{job.name}: tensor descriptor argument {name!r} needs "
                                 "triton.backends.driver.expand_signature, which this Triton lacks")
            expanded = expand_signature([sig], meta[:1] if meta else None, _TMA_DESC)
            desc_meta = meta.pop(0) if meta else None
            ndim = (len(expanded) - 1) // 2 if desc_meta else None
            for i, t in enumerate(expanded):
                if desc_meta is None:
                    part = f"decomposed[{i}]"
                elif i == 0:
                    part = "desc"
                else:
                    part = f"shape[{i - 1}]" if i <= ndim else f"stride[{i - 1 - ndim}]"
                params.append(dict(name=f"{name}.{part}", arg=name, type=t, role="tensor_descriptor",
                                   **({"tensordesc_meta": desc_meta} if i == 0 and desc_meta else {})))
            continue
        if isinstance(sig, tuple):
            raise ValueError(f"{job.name}: tuple argument {name!r} is not supported by the AOT build")
        params.append(dict(name=name, arg=name, type=sig, role="argument"))
    params += [dict(name=f"{kind}_scratch", arg=None, type="*i8", role=f"{kind}_scratch")
               for kind in ("global", "profile") if hasattr(metadata, f"{kind}_scratch_size")]
    for p, lay in zip(params, param_layout([p["type"] for p in params])):
        p.update(size=lay["size"], align=lay["align"], offset=lay["offset"])
    return params, constexprs, folded


def _grid_rules(launches: list[dict]) -> list[dict]:
    """The distinct (launcher line, grid rule source) pairs of a job's launches."""
    out = []
    for launch in launches:
        rule = dict(launcher=launch["launcher"], rule=launch["rule"])
        if rule not in out:
            out.append(rule)
    return out


def build_job(job: aot.Job, out_dir: str) -> dict:
    """Compile one job for its target into ``out_dir`` and describe it (one row of the table; see the module
    docstring). A compile or inspection failure is returned as ``{"error": message, ...}``, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    aot._quiet_triton()
    arch = f"sm_{job.arch}"
    row = dict(kernel=job.name, module=job.module, arch=arch, spec=job.spec, config=job.config, error=None)
    try:
        kernel = getattr(importlib.import_module(job.module), job.name)
        kernel = kernel if hasattr(kernel, "params") else kernel.fn  # autotuned: its @triton.jit kernel
        target = GPUTarget("cuda", job.arch, 32)
        options = make_backend(target).parse_options(dict(job.options))
        compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs), target=target,
                                  options=options.__dict__)
        md = compiled.metadata
        short = compiled.hash[:HASH_DIGITS]
        cubin = f"{job.name}.{arch}.{short}.cubin"
        path = os.path.join(out_dir, cubin)
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = aot._triton_bin("cuobjdump")
        usage = aot.parse_resource_usage(subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                                                        text=True, check=True).stdout)
        elf = subprocess.run([tool, "-elf", path], capture_output=True, text=True, check=True).stdout
        kparams = parse_kparams(elf, md.name)
        params, constexprs, folded = _kernel_params(job, md)
        if [p["size"] for p in params] != [k["size"] for k in kparams]:
            raise ValueError(f"{cubin}: the cubin's parameter sizes {[k['size'] for k in kparams]} differ from the "
                             f"table's {[p['size'] for p in params]} ({[p['type'] for p in params]})")
        base = kparams[0]["offset"]
        if [p["offset"] for p in params] != [k["offset"] - base for k in kparams]:
            raise ValueError(f"{cubin}: the cubin's parameter offsets differ from the natural-alignment layout")
        names = list(job.signature)
        shared = int(md.shared)
        row.update(
            symbol=f"{job.name.strip('_')}_{arch.replace('_', '')}_{short}",
            cubin=cubin, entry=md.name, cc=job.arch, num_warps=md.num_warps, num_stages=md.num_stages,
            num_ctas=md.num_ctas, threads_per_block=32 * md.num_warps, shared_bytes=shared,
            static_shared_bytes=usage["SHARED"], needs_shared_optin=shared + usage["SHARED"] > SMEM_OPTIN_BYTES,
            registers=usage["REG"], stack_bytes=usage["STACK"] + usage["LOCAL"],
            constexprs=constexprs, folded=folded,
            divisible_by_16=[names[path[0]] for path, a in job.attrs.items()
                             if any(k == "tt.divisibility" and v == 16 for k, v in a)],
            params=params, param_buffer_bytes=params[-1]["offset"] + params[-1]["size"],
            scratch={f"{kind}_{what}": getattr(md, f"{kind}_scratch_{attr}", 0 if attr == "size" else 1)
                     for kind in ("global", "profile") for what, attr in (("bytes", "size"), ("align", "align"))},
            launch_cooperative_grid=bool(md.launch_cooperative_grid), launch_pdl=bool(md.launch_pdl),
            grid=dict(max=list(job.grid), rules=_grid_rules(job.launches),
                      launches=[dict(use=x["use"], grid=x["grid"]) for x in job.launches]),
            uses=list(job.uses), signature=dict(job.signature),
            attrs={names[path[0]]: a for path, a in job.attrs.items()},  # Triton's, every argument, in order
            options=dict(job.options), triton_hash=compiled.hash)
    except Exception as e:  # noqa: BLE001 - reported per variant; the table is not written when any failed
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]
    return row


def _build_all(jobs: list, out_dir: str, num_procs: int) -> list[dict]:
    from functools import partial

    if num_procs <= 1 or len(jobs) <= 1:
        return [build_job(j, out_dir) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork after torch / triton threads started
    with ProcessPoolExecutor(num_procs, mp_context=ctx, initializer=aot._quiet_triton) as pool:
        return list(pool.map(partial(build_job, out_dir=out_dir), jobs))


@contextmanager
def _tuning(path: str | None):
    """Make the tuning record at ``path`` the active one for the trace, or none (``path`` None: the first
    candidates, whatever ``FASTVIT_TUNING`` says), restoring the previous state after. The record applies whatever
    GPU it was made on: the user chose it for the build. Yields the record or None.

    Raises:
        ValueError: ``FASTVIT_AUTOTUNE=0`` with a record (the GEMM launchers would ignore it), or not a record.
        FileNotFoundError: no file at ``path``."""
    from .._env import autotune_requested
    from ..kernels import tuning_record

    record = None
    if path is not None:
        if not autotune_requested():
            raise ValueError("a tuning record with FASTVIT_AUTOTUNE=0: the launchers would take their first "
                             "candidates and ignore the record; unset FASTVIT_AUTOTUNE")
        record = tuning_record.load(path)
        record.check = False
    previous = tuning_record.active()
    tuning_record.install(record)
    try:
        yield record
    finally:
        tuning_record.install(previous)


def _remove_previous(out_dir: str) -> None:
    """Delete an earlier build's table, header and the cubins its table lists (only those), so that no stale binary
    or table remains, also when this build fails."""
    table = os.path.join(out_dir, TABLE)
    if not os.path.isfile(table):
        return
    try:
        with open(table) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        return
    for k in old.get("kernels", []):
        name = os.path.basename(str(k.get("cubin", "")))
        if name.endswith(".cubin") and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in (TABLE, HEADER, "plans.json"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def build(out_dir: str, archs=("sm_80", "sm_90"), models=aot.MODELS, dtypes=("bf16", "fp16", "fp32"),
          modes=aot.MODES, batches=aot.DEFAULT_BATCHES, kernel: str | None = None, tuning: str | None = None,
          num_procs: int | None = None) -> dict:
    """Trace, compile and write the cubins, ``kernels.json``, ``kernels.h`` and ``plans.json`` into ``out_dir``
    (module docstring).

    Args:
        out_dir: output directory (created; cubins of an earlier build listed in its ``kernels.json`` are removed).
        archs: targets from ``aot.ARCHS``; models: ``configs.MODEL_CONFIGS`` names; dtypes: keys of ``aot.DTYPES``;
        modes: "train" / "infer"; batches: batch sizes traced (each >= 1).
        kernel: a regular expression; only kernels whose name it matches (``re.search``) are built. None: all.
        tuning: path of a tuning record (``python -m fastvit_kernels.tune``) whose picks fix the autotuned tiles;
            None: the first candidate after pruning (``FASTVIT_TUNING`` is not consulted here; the command line
            passes it as the default of ``--tuning``).
        num_procs: compile processes (default: CPU count).

    Returns:
        The table (``format``, ``triton``, ``fastvit_kernels``, ``workload``, ``tuning_record``, ``launch_abi``,
        ``kernels``: one dict per cubin), plus ``errors`` (rows that failed to compile or disagree with their
        cubin; then no table, header or plans are written), ``plans`` ({"plans": recorded, "refused": calls
        without a plan}, or None when nothing was written) and ``seconds``.

    Raises:
        ValueError: an unknown arch / model / dtype / mode, a batch < 1, an invalid ``kernel`` expression, a filter
            that matches no traced kernel, or a bad tuning record. FileNotFoundError: ``tuning`` is missing.
    """
    import triton

    from .. import __version__

    aot._validate(archs, models, dtypes, modes, batches)
    try:
        pattern = re.compile(kernel) if kernel else None
    except re.error as e:
        raise ValueError(f"kernel must be a regular expression; got {kernel!r} ({e})") from None
    aot._quiet_triton()
    start = time.perf_counter()
    ccs = [aot.ARCHS[a] for a in archs]
    jobs: list = []
    with _tuning(tuning) as record:
        for pass_ccs, setting in aot.build_passes(ccs):
            with setting():
                more, _ = aot.trace(pass_ccs, models, dtypes, modes, batches, fixed=True)
            seen = {j.key() for j in jobs}
            jobs += [j for j in more if j.key() not in seen]
    if pattern is not None:
        jobs = [j for j in jobs if pattern.search(j.name)]
        if not jobs:
            raise ValueError(f"kernel filter {kernel!r} matches no traced kernel")
    os.makedirs(out_dir, exist_ok=True)
    _remove_previous(out_dir)
    rows = _build_all(jobs, out_dir, num_procs or os.cpu_count() or 1)
    errors = [r for r in rows if r["error"]]
    kernels = sorted((r for r in rows if not r["error"]), key=lambda r: (r["cc"], r["module"], r["kernel"],
                                                                          r["symbol"]))
    symbols = [r["symbol"] for r in kernels]
    dup = sorted({s for s in symbols if symbols.count(s) > 1})
    if dup:  # two variants with one Triton hash prefix: a table a launcher could not index
        errors.append(dict(kernel=",".join(dup), error=f"duplicate symbols {dup}"))
    table = dict(
        format=FORMAT, triton=triton.__version__, fastvit_kernels=__version__,
        workload=dict(archs=list(archs), models=list(models), dtypes=list(dtypes), modes=list(modes),
                      batches=list(batches), kernel_filter=kernel),
        tuning_record=None if record is None else dict(path=tuning, gpu=record.gpu, triton=record.triton),
        launch_abi=dict(
            block="(32 * num_warps, 1, 1)",
            grid="(grid_x * num_ctas, grid_y, grid_z); a cluster of (num_ctas, 1, 1) when num_ctas > 1",
            shared="sharedMemBytes = shared_bytes (dynamic); when needs_shared_optin, first "
                   "cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes)",
            params="kernelParams[i] points to a value of params[i]'s size, in params order (constexprs and folded "
                   "arguments are not passed); the trailing params with role global_scratch / profile_scratch are "
                   "Triton's scratch pointers: NULL when scratch.global_bytes / profile_bytes is 0, else a buffer of "
                   "grid_x * grid_y * grid_z * num_ctas * bytes",
            tensor_descriptor="a '<arg>.desc' parameter is a CUtensorMap encoded on the host "
                              "(cuTensorMapEncodeTiled) from the tensor and its tensordesc_meta (swizzle, elem_size, "
                              "elem_type, block_size), followed by the tensor's shape (i32) and strides (i64)"),
        kernels=kernels)
    plan_counts = None
    if not errors:
        with open(os.path.join(out_dir, TABLE), "w") as f:
            json.dump(table, f, indent=1)
        with open(os.path.join(out_dir, HEADER), "w") as f:
            f.write(c_header(table))
        from ..kernels import _cubins
        from . import plans

        with _tuning(tuning):  # the plans bind each launch as the trace did: the same tile picks
            doc = plans.write(out_dir, _cubins.CubinTable(out_dir, os.path.join(out_dir, TABLE),
                                                          json.loads(json.dumps(kernels))),
                              [aot.ARCHS[a] for a in archs], models, dtypes, modes, batches)
        plan_counts = dict(plans=len(doc["plans"]), refused=len(doc["refused"]))
    return dict(table, errors=errors, plans=plan_counts, seconds=round(time.perf_counter() - start, 1))


def _c_string(s: str) -> str:
    return json.dumps(s)  # a JSON string of these ASCII names is a valid C string literal


def c_header(table: dict) -> str:
    """The launch table as C: ``fastvit_aot_kernels[]`` (one ``fastvit_aot_kernel`` per cubin: symbol, cubin file
    relative to the table's directory, entry name, compute capability, warps, CTAs, dynamic and static shared bytes,
    shared-memory opt-in flag, global-scratch bytes and alignment, parameter count, parameter-buffer bytes, and
    the parameters' sizes / offsets) and ``FASTVIT_AOT_NUM_KERNELS``. Scalars only; the JSON table has the rest."""
    lines = [
        "/* Generated by `python -m fastvit_kernels.aot build` from kernels.json; do not edit. */",
        f"/* Triton {table['triton']}, fastvit_kernels {table['fastvit_kernels']}. Launch convention: kernels.json "
        "\"launch_abi\". */",
        "#ifndef FASTVIT_AOT_KERNELS_H", "#define FASTVIT_AOT_KERNELS_H", "",
        "typedef struct {", "  const char *name;  /* argument, or global_scratch / profile_scratch */",
        "  unsigned size;      /* bytes */", "  unsigned offset;    /* in the parameter buffer */",
        "} fastvit_aot_param;", "",
        "typedef struct {", "  const char *symbol;              /* unique: kernel, arch, hash */",
        "  const char *cubin;               /* file name, next to kernels.json */",
        "  const char *entry;               /* cuModuleGetFunction name */",
        "  int arch;                        /* compute capability: 80, 90 */",
        "  int num_warps;                   /* block = 32 * num_warps threads */",
        "  int num_ctas;", "  unsigned shared_bytes;           /* dynamic: sharedMemBytes */",
        "  unsigned static_shared_bytes;", "  int needs_shared_optin;         /* set MAX_DYNAMIC_SHARED_SIZE_BYTES */",
        "  unsigned global_scratch_bytes;   /* per program; 0: pass NULL */",
        "  unsigned global_scratch_align;",
        "  int num_params;                  /* including Triton's scratch pointers */",
        "  unsigned param_buffer_bytes;", "  const fastvit_aot_param *params;", "} fastvit_aot_kernel;", ""]
    for k in table["kernels"]:
        body = ", ".join(f"{{{_c_string(p['name'])}, {p['size']}u, {p['offset']}u}}" for p in k["params"])
        lines.append(f"static const fastvit_aot_param fastvit_aot_params_{k['symbol']}[] = {{{body}}};")
    lines += ["", "static const fastvit_aot_kernel fastvit_aot_kernels[] = {"]
    for k in table["kernels"]:
        lines.append(
            f"  {{{_c_string(k['symbol'])}, {_c_string(k['cubin'])}, {_c_string(k['entry'])}, {k['cc']}, "
            f"{k['num_warps']}, {k['num_ctas']}, {k['shared_bytes']}u, {k['static_shared_bytes']}u, "
            f"{int(k['needs_shared_optin'])}, {k['scratch']['global_bytes']}u, {k['scratch']['global_align']}u, "
            f"{len(k['params'])}, {k['param_buffer_bytes']}u, fastvit_aot_params_{k['symbol']}}},")
    lines += ["};", f"#define FASTVIT_AOT_NUM_KERNELS {len(table['kernels'])}", "", "#endif", ""]
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Add the ``build`` sub-command to :func:`fastvit_kernels.aot.main`'s sub-parsers."""
    b = sub.add_parser("build", help="compile every kernel variant the models launch (one tile configuration each) "
                                     "to cubins plus a launch table kernels.json / kernels.h (no GPU needed)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--arch", action="append", choices=list(aot.ARCHS), help="target (repeatable; default both)")
    b.add_argument("--model", action="append",
                   help=f"model config name (repeatable; default {', '.join(aot.MODELS)})")
    b.add_argument("--dtype", action="append", choices=list(aot.DTYPES), help="activation dtype (default all)")
    b.add_argument("--mode", action="append", choices=list(aot.MODES), help="train and / or infer (default both)")
    b.add_argument("--batch", action="append", type=int,
                   help=f"batch size (repeatable; default {', '.join(map(str, aot.DEFAULT_BATCHES))})")
    b.add_argument("--kernel", help="regular expression: build only the kernels whose name matches")
    b.add_argument("--tuning", help="tuning record (python -m fastvit_kernels.tune) fixing the autotuned tiles "
                                    "(default: $FASTVIT_TUNING; without one, the first candidate after pruning, "
                                    "as FASTVIT_AUTOTUNE=0 launches)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    b.add_argument("--json", action="store_true", help="print the table as JSON instead of a summary")


def run(args, parser) -> int:
    """Run ``build`` for parsed arguments; returns the exit status (0 built; 1 a variant failed, nothing written)."""
    try:
        result = build(args.out, args.arch or list(aot.ARCHS), args.model or aot.MODELS,
                       args.dtype or ["bf16", "fp16", "fp32"], args.mode or aot.MODES,
                       args.batch or aot.DEFAULT_BATCHES, args.kernel, args.tuning or os.environ.get("FASTVIT_TUNING")
                       or None, args.jobs)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in result["kernels"]:
            print(f"{k['symbol']:<48} {k['cubin']:<56} w{k['num_warps']} s{k['num_stages']} "
                  f"smem {k['shared_bytes']} B  {len(k['params'])} params  {k['spec']} [{k['config']}]")
        for e in result["errors"]:
            print(f"FAILED {e.get('arch', '')} {e['kernel']} [{e.get('spec', '')}] [{e.get('config', '')}]: "
                  f"{e['error']}", file=sys.stderr)
        where = "nothing written" if result["errors"] else (
            f"{TABLE}, {HEADER} and plans.json ({result['plans']['plans']} launch plans, "
            f"{result['plans']['refused']} calls refused) in {args.out}")
        print(f"\n{len(result['kernels'])} cubins, {len(result['errors'])} failures; {where}; "
              f"triton {result['triton']}, {result['seconds']} s")
    return 1 if result["errors"] else 0
