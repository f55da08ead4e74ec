"""Ahead-of-time compile checks: every Triton kernel of the package, built for sm_80 / sm_90 on a machine without a GPU.

Command::

    python -m fastvit_kernels.aot check --arch sm_80 --arch sm_90 [--json] [--model NAME ...] [--dtype bf16 ...]
    python -m fastvit_kernels.aot grids [--json] [--model NAME ...] [--batch 8192 ...] [--img 1024 ...]
    python -m fastvit_kernels.aot build --out DIR [...]   (cubins + launch table: fastvit_kernels.aot.build)

How it works (no GPU, no CUDA driver):

1. **Trace.** The public ops (``patch_embed``, ``attention``, ``layernorm_mlp``) run forward and, for training,
   autograd backward, on CPU tensors that are allocated but never read (``torch.empty``), at the shapes ViT-B/16,
   ViT-L/16 and ViT-H/14 use, inside the launch hook :func:`fastvit_kernels.kernels._launch.recording`: every
   launcher calls ``_launch.launch``, which hands the kernel, grid and arguments to the recorder instead of
   launching, so the launchers choose tiles exactly as they would on a GPU (``gemm_config``,
   ``attention_configs``, ``_rows_per_program``, the column-sum block choice, every constexpr flag). While a
   recorder is active the ops take the Triton path on CPU and meta tensors (the rule of
   :func:`fastvit_kernels.backend.resolve_backend`); nothing in the package is replaced. The configurations
   checked are therefore the ones the launchers use, not a copied list; an autotuned kernel (``triton.autotune``)
   is expanded into every candidate.
2. **Specialise.** The arguments are bound with Triton's own binder for the target (the code path of
   ``JITFunction.run``: 16-byte pointer alignment, integers divisible by 16, integers equal to 1 as constants), so
   each compiled variant is the one a real launch at that shape would compile.
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` to a cubin.
4. **Inspect** the cubin with the ``cuobjdump`` bundled in Triton: registers per thread and stack-frame bytes
   (``--dump-resource-usage``; a Triton kernel has no local arrays, so stack bytes are register spills), the
   tensor-core instructions in the SASS (``-sass``: HMMA = mma.sync, HGMMA = sm_90 warpgroup MMA). Shared memory is
   Triton's dynamic shared memory (``metadata.shared``) plus the cubin's static shared memory. Theoretical occupancy
   is computed from registers, shared memory and warps with the per-SM limits of the CUDA programming guide
   (table "Technical Specifications per Compute Capability"); it is a static calculation, not a measurement.
5. **Grids.** Every launch's grid is evaluated for each configuration it may run with and checked against CUDA's
   limits (:func:`grid_problems`). Grids need no compile, so :func:`trace_grids` runs the ops again over a wider
   workload (``GRID_BATCHES`` up to 8192 images, ``GRID_IMG_SIZES`` up to 1024 px) on meta tensors, which have
   shapes but no memory; ``check`` reports the largest grid per kernel (``python -m fastvit_kernels.aot grids``:
   this step alone).

What it cannot tell: speed. Nothing runs; a kernel that builds without spills and with tensor-core instructions can
still be slow (bad tiles, memory-bound, low occupancy) or wrong (correctness is the interpreter tests' job).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels._cubins import pack_args

# --------------------------------------------------------------------------------------------------------------
# targets and what is checked
# --------------------------------------------------------------------------------------------------------------
ARCHS = {"sm_80": 80, "sm_90": 90}

# Per-SM / per-block limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): 64K
# 32-bit registers, 64 resident warps and 32 resident blocks per SM on both; shared memory per SM 164 KB (8.0) and
# 228 KB (9.0), at most 163 KB and 227 KB per block; the runtime reserves 1 KB of shared memory per block.
ARCH_LIMITS = {
    80: dict(regs_per_sm=65536, max_warps=64, max_blocks=32, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
             reserved_smem=1024),
    90: dict(regs_per_sm=65536, max_warps=64, max_blocks=32, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
             reserved_smem=1024),
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (occupancy calculator, sm_50 .. sm_90)
SMEM_ALLOC_UNIT = 128  # shared memory allocation granularity in bytes (sm_80, sm_90)

MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
SHORT_MODEL = {"vit_base_patch16_224": "B/16", "vit_large_patch16_224": "L/16", "vit_huge_patch14_224": "H/14"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("train", "infer")
PACKED_TOKENS = 4096  # tokens of the packed-sequence attention workloads (a token budget, independent of the batch)
DEFAULT_BATCHES = (64,)  # per-GPU batch; the batch only changes whether B * N is a multiple of 16
# The grid check's workload (grids need no compile, so it spans far more than the compiled set): per-GPU batches up
# to 8192 and inputs at the config's size (0) and 1024 px (N = 4097 tokens at patch 16, 5330 at patch 14).
GRID_BATCHES = (1, 64, 1024, 4096, 8192)
GRID_IMG_SIZES = (0, 1024)

# Kernels whose fp16 / bf16 builds must use tensor cores (the GEMM core and the attention kernels with tl.dot).
TENSOR_CORE_KERNELS = ("_matmul_kernel", "_matmul_rope_kernel", "_matmul_tma_kernel", "_attention_fwd_kernel",
                       "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_fused_kernel",
                       "_attention_seq_fwd_kernel", "_attention_seq_dkdv_kernel", "_attention_seq_dq_kernel",
                       "_attention_seq_bwd_fused_kernel")
# CUDA's largest launch grid, blocks per axis (x, y, z); see grid_problems
GRID_LIMITS = (2**31 - 1, 65535, 65535)
_CONFIG_NAMES = ("GROUP_M", "ROWS", "GROUP")  # constexprs that are tile configuration (with BLOCK*), not specialisation
_OPTION_SHORT = {"num_warps": "w", "num_stages": "s", "num_ctas": "ctas", "maxnreg": "maxnreg"}


def _triton_bin(tool: str) -> str:
    """Path of a CUDA tool bundled in Triton's NVIDIA backend (``cuobjdump``, ``ptxas``), or '' if missing."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else ""


def missing_tools() -> list[str]:
    """Names of the tools the check needs that are not available (``triton``, ``cuobjdump``, ``ptxas``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton"]
    return [t for t in ("cuobjdump", "ptxas") if not _triton_bin(t)]


# --------------------------------------------------------------------------------------------------------------
# static analysis of one cubin
# --------------------------------------------------------------------------------------------------------------
def parse_resource_usage(text: str) -> dict:
    """Registers, stack, shared and local bytes of the one function in ``cuobjdump --dump-resource-usage`` output.

    Returns: dict with int keys ``REG``, ``STACK``, ``SHARED``, ``LOCAL`` (bytes except REG, per thread except
    SHARED). Raises ValueError when no function line is found."""
    m = re.search(r"Function [^\n:]+:\s*\n\s*(REG:.*)", text)
    if not m:
        raise ValueError(f"no function resource line in cuobjdump output: {text[:300]!r}")
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1)))
    return {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def tensor_core_ops(sass: str) -> dict[str, int]:
    """Count tensor-core instructions by opcode family in SASS text: HMMA (mma.sync, sm_70+), HGMMA (warpgroup
    MMA, sm_90), and any other ``*MMA`` family (IMMA, DMMA, QGMMA, ...). Returns {family: count}."""
    counts: dict[str, int] = {}
    # an instruction line: /*0a40*/  [@P0 ]OPCODE.MODIFIERS operands ;  (HFMA2.MMA is an FMA, not a tensor-core op)
    for op in re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)", sass, re.MULTILINE):
        if op.endswith("MMA"):
            counts[op] = counts.get(op, 0) + 1
    return counts


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> float:
    """Theoretical occupancy (resident warps / max warps per SM) of a kernel, from static resource usage.

    Args:
        regs: registers per thread; smem: shared memory per block in bytes (dynamic + static);
        num_warps: warps per block; arch: 80 or 90 (see ``ARCH_LIMITS``).

    Returns: a fraction in [0, 1]; 0 when one block does not fit. Same model as NVIDIA's occupancy calculator:
    blocks per SM = min(by registers, by shared memory, by warps, 32)."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // num_warps
    smem_block = math.ceil((smem + lim["reserved_smem"]) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = lim["smem_per_sm"] // smem_block if smem <= lim["smem_per_block"] else 0
    blocks = min(by_regs, by_smem, lim["max_warps"] // num_warps, lim["max_blocks"])
    return blocks * num_warps / lim["max_warps"]


# --------------------------------------------------------------------------------------------------------------
# trace: record the launches the ops make
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One kernel variant to compile for one target (picklable: sent to worker processes)."""

    module: str  # e.g. "fastvit_kernels.kernels.matmul"
    name: str  # kernel name, e.g. "_matmul_kernel"
    arch: int  # 80 | 90
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (arg index,) -> value
    attrs: dict  # (arg index,) -> [["tt.divisibility", 16]]
    options: dict  # launch options (num_warps, num_stages, ...)
    spec: str = ""  # readable specialisation (dtypes + non-config constexprs)
    config: str = ""  # readable tile configuration (BLOCK_*, GROUP_M, ROWS, warps, stages)
    uses: list = field(default_factory=list)  # "model dtype mode: ops/file.py:line" for each launch site
    grid: list = field(default_factory=lambda: [0, 0, 0])  # largest extent of each grid axis over its launches
    # each distinct launch: {"use": as in uses, "grid": [x, y, z], "launcher": "kernels/<file>.py:<line>" of the
    # _launch.launch call, "rule": the grid function's source, or the launcher's source line for a fixed grid}
    launches: list = field(default_factory=list)

    def key(self) -> tuple:
        """Identity of the compiled binary: two launches with equal keys compile to the same cubin."""
        return (self.module, self.name, self.arch, repr(self.signature), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))


def _kernel_modules() -> list:
    """The modules of :mod:`fastvit_kernels.kernels` (imported; they define the kernels)."""
    from .. import kernels

    return [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]


def _launchable(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, Autotuner))


def package_kernels() -> dict[str, object]:
    """Every launched kernel of the package: {"module:name": JITFunction | Autotuner} for the module-level names
    ending in ``_kernel`` (the naming rule of docs/design.md, "Conventions"; helpers called inside kernels are not
    launched).

    Raises RuntimeError if the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    from triton.runtime.autotuner import Autotuner

    out = {}
    for mod in _kernel_modules():
        # an autotuner is named by its kernel (it may be bound to another name) and replaces the kernel's entry
        items = sorted(vars(mod).items(), key=lambda kv: isinstance(kv[1], Autotuner))
        for name, obj in items:
            if isinstance(obj, Autotuner):
                name = obj.fn.__name__
            if not name.endswith("_kernel"):
                continue
            if isinstance(obj, InterpretedFunction) or isinstance(getattr(obj, "fn", None), InterpretedFunction):
                raise RuntimeError(
                    "the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1); run the AOT check "
                    "in a process without it: python -m fastvit_kernels.aot check")
            if _launchable(obj):
                out[f"{mod.__name__}:{name}"] = obj
    return out


def _call_site() -> str:
    """``ops/<file>.py:<line>`` of the innermost op frame on the stack (else the launcher's, the frame that called
    ``_launch.launch``), for the report."""
    frame = sys._getframe(2)
    fallback = ""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/fastvit_kernels/ops/" in path:
            return f"ops/{os.path.basename(path)}:{frame.f_lineno}"
        if not fallback and "/fastvit_kernels/kernels/" in path and not path.endswith("/_launch.py"):
            fallback = f"kernels/{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback


def _enum_name(module, param: str, value) -> str:
    """Readable value of an int constexpr that has named constants in the kernel's module or in
    :mod:`~fastvit_kernels.kernels.fusion` (``A_PROLOGUE=1`` -> ``A_PROLOGUE=LN`` via ``PROLOGUE_LN``)."""
    from ..kernels import fusion

    prefix = param.split("_")[-1] + "_"
    if isinstance(value, int) and not isinstance(value, bool):
        for mod in (module, fusion):
            for k, v in vars(mod).items():
                v = getattr(v, "value", v)  # tl.constexpr constants
                if k.startswith(prefix) and isinstance(v, int) and not isinstance(v, bool) and v == value:
                    return f"{param}={k[len(prefix):]}"
    return f"{param}={value}"


def _describe(module, fn, signature: dict, constexprs: dict, options: dict) -> tuple[str, str]:
    """(specialisation, configuration) strings of one bound launch of kernel ``fn``."""
    names = list(signature)
    declared = {p.name for p in fn.params if p.is_constexpr}
    dtypes = []
    for t in signature.values():
        if t.startswith("*") and t[1:] not in dtypes:
            dtypes.append(t[1:])
    spec, cfg = ["/".join(dtypes)], []
    for (idx,), value in sorted(constexprs.items()):
        name = names[idx]
        if name.startswith("BLOCK") or name in _CONFIG_NAMES:
            cfg.append(f"{name[6:] if name.startswith('BLOCK_') else name}={value}")
        elif value is True:
            spec.append(name)
        elif value is False or value is None:
            continue
        elif name not in declared:
            continue  # an int argument equal to 1 that Triton folded into the binary (a unit stride)
        else:
            spec.append(_enum_name(module, name, value))
    cfg += [f"{_OPTION_SHORT[k]}{v}" for k, v in sorted(options.items())
            if k in _OPTION_SHORT and v is not None and not (k == "num_ctas" and v == 1)]
    named = {names[idx]: value for (idx,), value in constexprs.items()}
    if "A_PROLOGUE" in named or "A_PROLOGUE0" in named:  # a GEMM-core launch: its fusion description's name
        from ..kernels.fusion import Fusion

        parts = [""] if "A_PROLOGUE" in named else ["0", "1"]
        spec.insert(1, "fusion=" + "|".join(Fusion.from_constexprs(named, p).name for p in parts))
    return " ".join(spec), " ".join(cfg)


def grid_problems(grid) -> list[str]:
    """What is wrong with one launch grid ``(x, y, z)`` (empty list: CUDA can launch it): an extent above the
    CUDA limit of its axis, ``GRID_LIMITS`` (2^31 - 1 blocks on axis 0, 65,535 on axes 1 and 2; CUDA C++
    Programming Guide, "Technical Specifications per Compute Capability", maximum x- / y- / z-dimension of a grid
    of thread blocks, the same on sm_80 and sm_90)."""
    return [f"grid axis {axis} = {extent:,} > {limit:,}" for axis, (extent, limit) in enumerate(zip(grid, GRID_LIMITS))
            if extent > limit]


def _grid3(grid, kernel: str) -> tuple[int, int, int]:
    """A launch grid as Triton accepts it (1 to 3 ints) padded to (x, y, z). Raises TypeError otherwise."""
    if isinstance(grid, int) or not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
        raise TypeError(f"{kernel}: a launch grid must be a tuple of 1 to 3 ints; got {grid!r}")
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


class _Recorder:
    """The launch recorder of the trace (``recorder(kernel, grid, args, kwargs)``, installed with
    :func:`fastvit_kernels.kernels._launch.recording`): for each launch it evaluates the grid for every
    configuration the launch may run with (each autotune candidate: a grid that is a function of the config gives
    each its own extents) and records the largest extent of each axis in ``grids``; for every target in ``archs``
    it also binds the arguments with Triton's binder and stores a :class:`Job` per target (``archs`` empty: grids
    only, nothing is bound, so the tensors may be on the meta device).

    ``kernels``: the inventory ({"module:name": kernel}, :func:`package_kernels`) that names the launched kernels
    and counts their launches in ``launched``; a kernel outside it (a test's own) is named by its function's module.
    An autotuned kernel is expanded into its candidates whether the launcher hands over the ``Autotuner`` or, with a
    fixed configuration (``FASTVIT_AUTOTUNE=0``), its plain kernel: a GPU autotunes by default, so every candidate
    is what can run.

    ``fixed=True`` (the AOT build, :mod:`fastvit_kernels.aot.build`): one configuration per launch instead, the one
    the launcher runs without timing anything: a plain kernel with its fixed configuration as launched; an
    ``Autotuner`` through its full ``early_config_prune`` (the kernel's filter, then the active tuning record's
    pick, :func:`fastvit_kernels.kernels.tuning_record.tuned_prune`), first survivor (with no record that is the
    first candidate after pruning, what ``FASTVIT_AUTOTUNE=0`` launches)."""

    def __init__(self, archs: list[int], jobs: dict, label: list, grids: dict | None = None,
                 kernels: dict | None = None, fixed: bool = False):
        from triton.runtime.autotuner import Autotuner

        self.archs, self.jobs, self.label, self.fixed = archs, jobs, label, fixed
        self.grids = {} if grids is None else grids
        self.launched = {kid: 0 for kid in kernels or {}}  # kernel id -> launches recorded
        self._binders: dict = {}  # (kernel id, arch) -> (backend, binder)
        self._known: dict = {}  # id(launched object) -> (kernel id, module, Autotuner or None)
        for kid, obj in (kernels or {}).items():
            mod = sys.modules[kid.split(":")[0]]
            tuner = obj if isinstance(obj, Autotuner) else None
            self._known[id(obj)] = (kid, mod, tuner)
            if tuner is not None:  # its plain kernel, launched with a fixed configuration
                self._known[id(tuner.fn)] = (kid, mod, tuner)

    def _identify(self, kernel) -> tuple:
        """(kernel id, module, Autotuner or None) of a launched kernel object."""
        from triton.runtime.autotuner import Autotuner

        known = self._known.get(id(kernel))
        if known is not None:
            return known
        tuner = kernel if isinstance(kernel, Autotuner) else None
        fn = kernel.fn if tuner is not None else kernel
        mod = sys.modules[getattr(fn, "module", None) or fn.fn.__module__]
        known = self._known[id(kernel)] = (f"{mod.__name__}:{fn.__name__}", mod, tuner)
        return known

    def __call__(self, kernel, grid, args: tuple, kwargs: dict) -> None:
        kid, module, tuner = self._identify(kernel)
        self.launched[kid] = self.launched.get(kid, 0) + 1
        frame = sys._getframe(2)  # the launcher's frame, which called _launch.launch
        path = frame.f_code.co_filename.replace(os.sep, "/")
        rule = _grid_rule(grid, path, frame.f_lineno)
        launcher = f"{'/'.join(path.split('/')[-2:])}:{frame.f_lineno}"  # e.g. kernels/matmul.py:458
        # fixed: a tuner's plain kernel launched with its fixed configuration is that configuration, as launched
        run = kernel if self.fixed and tuner is not None and kernel is not tuner else tuner or kernel
        self._record(module, run, grid, args, kwargs, launcher, rule)

    def _variants(self, k, args, kwargs):
        """(JITFunction, kwargs) per autotune candidate of ``k`` (pruned as the autotuner prunes; with ``fixed``
        only the configuration it runs untimed), or the launch itself for a plain kernel; an iterator: a
        candidate's ``pre_hook`` (TMA descriptor block shapes) mutates arguments shared by all candidates, so each
        candidate is bound before the next hook runs."""
        from triton.runtime.autotuner import Autotuner

        if not isinstance(k, Autotuner):
            return [(k, kwargs)]
        configs = k.configs
        prune = getattr(k, "early_config_prune", None)
        if not self.fixed:  # every candidate of the launch: the kernel's own filter, not a tuning record's pick
            prune = getattr(prune, "candidates", prune)
        if prune and len(configs) > 1:  # Triton's autotuner prunes only a list of more than one
            configs = prune(configs, dict(zip(k.arg_names, args)), **kwargs)
        if self.fixed:
            configs = configs[:1]
        if not hasattr(k.fn, "params"):
            raise TypeError(f"{k.fn!r}: only triton.autotune over a plain @triton.jit kernel is supported")
        return _Recorder._each(k, configs, args, kwargs)

    @staticmethod
    def _each(k, configs, args, kwargs):
        """The candidates one by one, each after its ``pre_hook`` ran on the launch's arguments."""
        for c in configs:
            kw = {**kwargs, **c.all_kwargs()}
            if c.pre_hook is not None:  # e.g. TMA descriptors take the candidate's block shapes; bound right after
                c.pre_hook({**dict(zip(k.arg_names, args)), **kw})
            yield k.fn, kw

    @staticmethod
    def _grid_of(module, fn, grid, args, kw) -> tuple[int, int, int]:
        """The launch grid for one configuration: ``grid`` itself, or ``grid(meta)`` with ``meta`` the arguments by
        name plus the configuration's keywords (what ``JITFunction.run`` passes a grid function)."""
        if callable(grid):
            grid = grid({**dict(zip(fn.arg_names, args)), **kw})
        return _grid3(grid, f"{module.__name__}.{fn.__name__}")

    def _note_grid(self, module, name: str, grid: tuple, use: str) -> None:
        rec = self.grids.setdefault(name, dict(module=module.__name__, name=name, grid=[0, 0, 0],
                                               at=["", "", ""], launches=0))
        rec["launches"] += 1
        for axis, extent in enumerate(grid):
            if extent > rec["grid"][axis]:
                rec["grid"][axis], rec["at"][axis] = extent, use

    def _record(self, module, kernel, grid, args, kwargs, launcher: str = "", rule: str = ""):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        use = f"{' '.join(self.label)}: {_call_site()}"
        min_arch = getattr(module, "MIN_ARCH", 0)  # a module of kernels for newer GPUs only (matmul_tma: 90)
        for fn, kw in self._variants(kernel, args, kwargs):
            launch_grid = self._grid_of(module, fn, grid, args, kw)
            self._note_grid(module, fn.__name__, launch_grid, use)
            param_names = {p.name for p in fn.params}
            for arch in (a for a in self.archs if a >= min_arch):
                # Triton's binder for this target: the same specialisation JITFunction.run computes before compiling
                if (id(fn), arch) not in self._binders:
                    backend = make_backend(GPUTarget("cuda", arch, 32))
                    self._binders[id(fn), arch] = backend, create_function_from_signature(fn.signature, fn.params,
                                                                                          backend)
                backend, binder = self._binders[id(fn), arch]
                bound, specialization, opts = binder(*args, **kw)
                signature, constexprs, attrs = pack_args(fn, backend, kw, bound, specialization, opts)
                options = {k: v for k, v in kw.items() if k not in param_names}
                spec, cfg = _describe(module, fn, signature, constexprs, options)
                job = Job(module.__name__, fn.__name__, arch, signature, constexprs, attrs, options, spec, cfg)
                job = self.jobs.setdefault(job.key(), job)
                job.grid = [max(a, b) for a, b in zip(job.grid, launch_grid)]
                launch = dict(use=use, grid=list(launch_grid), launcher=launcher, rule=rule)
                if launch not in job.launches:
                    job.launches.append(launch)
                if use not in job.uses:
                    job.uses.append(use)


@functools.lru_cache(maxsize=None)
def _launch_call_grid(path: str, line: int) -> str:
    """Source of the grid argument of the ``launch(kernel, grid, ...)`` call that spans ``line`` of ``path`` (the
    innermost such call), or '' when the file cannot be parsed or has none there."""
    import ast

    try:
        with open(path) as f:
            text = f.read()
        tree = ast.parse(text)
    except (OSError, SyntaxError, ValueError):
        return ""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.lineno <= line <= (node.end_lineno or node.lineno) \
                and len(node.args) >= 2 and (ast.get_source_segment(text, node.func) or "").endswith("launch"):
            if best is None or node.lineno >= best.lineno:
                best = node
    return " ".join((ast.get_source_segment(text, best.args[1]) or "").split()) if best is not None else ""


def _grid_rule(grid, path: str, line: int) -> str:
    """Source text of a launch's grid rule: the grid argument's expression at the launcher's ``launch`` call, and
    for a grid function that is not a lambda written there, its source (the rule over the launch's
    meta-parameters)."""
    import inspect

    expr = _launch_call_grid(path, line)
    if not callable(grid) or expr.startswith("lambda"):
        return expr
    try:
        body = " ".join(inspect.getsource(grid).split())
    except (OSError, TypeError):
        body = getattr(grid, "__qualname__", repr(grid))
    return f"{expr} with {body}" if expr else body


@contextmanager
def _recording(archs: list[int], jobs: dict, label: list, grids: dict | None = None, fixed: bool = False):
    """Record the launches made inside the block into a :class:`_Recorder` over the package's kernels, through the
    launch hook :func:`fastvit_kernels.kernels._launch.recording` (nothing is launched). While it records, the
    public ops take the Triton path on CPU and meta tensors, bfloat16 included (the rule of
    :func:`fastvit_kernels.backend.resolve_backend`; the CPU-bfloat16 guard is for the interpreter, which does not
    run here). ``fixed``: one configuration per autotuned launch (see :class:`_Recorder`). Yields the recorder."""
    from ..kernels import _launch

    recorder = _Recorder(archs, jobs, label, grids, package_kernels(), fixed)
    with _launch.recording(recorder):
        yield recorder


class _RunOpsInPython(TorchDispatchMode):
    """Inside it, a ``fastvit::*`` op runs its Python implementation (the launchers, which only allocate outputs and
    launch, here into recorders), whatever kernel the dispatcher holds for the device: instead of the fake on meta
    tensors, and instead of the C++ library's CPU kernel on CPU tensors when ``_C`` is loaded (which would compute
    the op and launch nothing). Every other op runs as usual. A meta tensor has shape and strides but no memory, so
    the grid trace can run the ops at sizes (a ViT-H qkv at batch 8192 and 1024 px: 0.3 TB) that could never be
    allocated."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .._library import python_impl

        kwargs = kwargs or {}
        impl = python_impl(func._schema.name) if func.namespace == "fastvit" else None
        if impl is not None:
            with self:  # the mode is off inside this method; nested ops (none today) would need it again
                return impl(*args, **kwargs)
        return func(*args, **kwargs)


def _vit_shapes(model: str, img_size: int | None = None) -> dict:
    """Sizes of a named ViT: B-independent dims D, H, head_dim, P, C, img, num_patches, N (with class token),
    hidden (MLP width). ``img_size``: the input side in pixels (default the config's), rounded down to a multiple
    of the patch size."""
    from ..configs import get_config

    cfg = get_config(model)
    D, P = cfg["embed_dim"], cfg["patch_size"]
    img = (img_size or cfg["img_size"]) // P * P
    if img < P:
        raise ValueError(f"img_size must be at least the patch size {P} of {model}; got {img_size}")
    npatch = (img // P) ** 2
    return dict(D=D, H=cfg["num_heads"], head_dim=D // cfg["num_heads"], P=P, C=cfg.get("in_chans", 3), img=img,
                num_patches=npatch, N=npatch + 1, hidden=int(D * cfg.get("mlp_ratio", 4.0)))


def vit_workloads(model: str, dtype: torch.dtype, batch: int, mode: str, img_size: int | None = None,
                  device: str = "cpu") -> list[tuple[str, object]]:
    """The op calls of one ViT step: [(label, thunk)], each thunk running one public op (and, for ``mode="train"``,
    its autograd backward) on uninitialised tensors of the model's shapes (``img_size``: input side in pixels,
    default the config's; ``device``: "cpu", or "meta" for the grid trace, run inside :class:`_RunOpsInPython`).
    Add a line here when the model starts using a new op; ``check`` reports any package kernel that no workload
    launches."""
    from .. import ops
    from ..backend import use_gemm_impl, use_gemm_kernel

    s = _vit_shapes(model, img_size)
    B, D, N, hidden = batch, s["D"], s["N"], s["hidden"]
    glu = hidden * 2 // 3  # SwiGLU width at the same parameter count (EVA-02: 4 * 2/3 * D)
    train = mode == "train"

    def t(*shape, grad=train, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=device).requires_grad_(grad)

    def cu(S):  # cu_seqlens of S sequences of alternating lengths (1 and 7 parts of 8) over PACKED_TOKENS tokens
        unit = PACKED_TOKENS // S // 4
        lengths = [unit * (1 if i % 2 == 0 else 7) for i in range(S)]
        lengths[-1] += PACKED_TOKENS - sum(lengths)
        bounds = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return bounds.to(device)  # real values on the CPU (the op checks them); shapes only on "meta"

    def run(fn, *inputs, **kw):
        def thunk():
            with torch.set_grad_enabled(train):
                out = fn(*inputs, **kw)
                if train:
                    torch.autograd.backward(out, torch.empty_like(out))
        return thunk

    def on_cublas(thunk):
        def forced():
            with use_gemm_impl("cublas"):  # forward and backward: every plain GEMM on cuBLAS + elementwise kernels
                thunk()
        return forced

    def on_tma(thunk):
        def forced():
            with use_gemm_kernel("tma"):
                thunk()
        return forced

    patch_w = (t(D, s["C"], s["P"], s["P"]), t(D), t(1, N, D), t(1, 1, D))
    # pre-patchified tokens (NaFlex collator form) with MAE's 25 % keep, iBOT masks, per-token position rows and a
    # class + 4 register rows; index tensors hold valid (zero) indices: the op checks their values
    n_patch, K_patch = s["num_patches"], s["C"] * s["P"] ** 2
    n_keep = max(1, n_patch // 4)

    def idx(*shape, dt=torch.int64):
        return torch.zeros(*shape, dtype=dt, device=device)

    tok_args = (t(B, n_patch, K_patch, grad=False), t(D, K_patch), t(D), t(n_patch, D), idx(B, n_patch))
    tok_kw = dict(ids_keep=idx(B, n_keep), mask=idx(B, n_keep, dt=torch.bool), mask_token=t(D), prefix=t(5, D))
    mlp_w = (t(D), t(D), t(hidden, D), t(hidden), t(D, hidden), t(D))
    img = (B, s["C"], s["img"], s["img"])
    work = [
        ("patch_embed", run(ops.patch_embed, t(*img, grad=False), *patch_w)),
        # images as a data loader delivers them: fp32 (converted on load, e.g. under autocast) and uint8 with
        # ImageNet mean / std (normalised on load)
        ("patch_embed(fp32 images)", run(ops.patch_embed, t(*img, grad=False, dt=torch.float32), *patch_w)),
        ("patch_embed(uint8 images, mean/std)", run(ops.patch_embed, t(*img, grad=False, dt=torch.uint8), *patch_w,
                                                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))),
        ("layernorm_linear", run(ops.layernorm_linear, t(B, N, D), t(D), t(D), t(3 * D, D), t(3 * D))),
        ("patch_embed_tokens(MAE keep, mask, pos, prefix)", run(ops.patch_embed_tokens, *tok_args, **tok_kw)),
        ("patch_embed_tokens(cuBLAS path, 1 image)", on_cublas(run(
            ops.patch_embed_tokens, t(1, n_patch, K_patch, grad=False), t(D, K_patch), t(D), t(n_patch, D),
            idx(1, n_patch), ids_keep=idx(1, n_keep), mask=idx(1, n_keep, dt=torch.bool), mask_token=t(D),
            prefix=t(5, D)))),
        # 2D RoPE in the qkv GEMM epilogue, inverse rotation in the backward GEMMs' loads (EVA-02 / DINOv3 / PE):
        # rotate_half pairs with one table, interleaved pairs with per-head tables (a learned mixed RoPE)
        ("layernorm_linear(RoPE, half)", run(ops.layernorm_linear, t(B, N, D), t(D), t(D), t(3 * D, D), t(3 * D),
                                             rope_coords=t(N, 2, grad=False, dt=torch.float32),
                                             rope_freqs=t(1, s["head_dim"] // 2, 2, grad=False, dt=torch.float32),
                                             rope_heads=s["H"], rope_layout="half")),
        ("layernorm_linear(RoPE, interleaved, per-head)", run(
            ops.layernorm_linear, t(B, N, D), t(D), t(D), t(3 * D, D), t(3 * D),
            rope_coords=t(N, 2, grad=False, dt=torch.float32),
            rope_freqs=t(s["H"], s["head_dim"] // 2, 2, grad=False, dt=torch.float32), rope_heads=s["H"])),
        ("attention", run(ops.attention, t(B, N, 3 * D), s["H"])),
        # the attention half of FastViT's block as one op (norm1 + qkv, attention, proj + residual), as the model
        # calls it: its launch plan is what an exported FastViT replays
        ("attention_block", run(ops.attention_block, t(B, N, D), t(D), t(D), t(3 * D, D), t(3 * D), t(D, D), t(D),
                                s["H"])),
        # one image: too few (batch, head) programs for the fused backward, so the three-launch backward
        ("attention(1 image: split backward)", run(ops.attention, t(1, N, 3 * D), s["H"])),
        # packed variable-length sequences (NaViT / NaFlex token-budget packing): 4096 tokens; 16 sequences take
        # the split backward (16 * H < 256 for ViT-B), 64 the fused one (where it builds)
        ("attention(packed, 16 sequences)", run(ops.attention, t(PACKED_TOKENS, 3 * D), s["H"],
                                                cu_seqlens=cu(16))),
        ("attention(packed, 64 sequences)", run(ops.attention, t(PACKED_TOKENS, 3 * D), s["H"],
                                                cu_seqlens=cu(64))),
        # a padded batch with a key-padding mask (NaFlex's patch_valid); one image: the split backward
        ("attention(key-padding mask)", run(ops.attention, t(B, N, 3 * D), s["H"],
                                            key_valid=t(B, N, grad=False, dt=torch.bool))),
        ("attention(key-padding mask, 1 image)", run(ops.attention, t(1, N, 3 * D), s["H"],
                                                     key_valid=t(1, N, grad=False, dt=torch.bool))),
        ("linear_residual", run(ops.linear_residual, t(B, N, D), t(D, D), t(D), t(B, N, D))),
        ("layernorm_mlp", run(ops.layernorm_mlp, t(B, N, D), *mlp_w)),
        # timm's act_layer='gelu_tanh': every GELU / GELU' of the MLP in the tanh form
        ("layernorm_mlp(tanh GELU)", run(ops.layernorm_mlp, t(B, N, D), *mlp_w, approximate="tanh")),
        # the cuBLAS + elementwise-kernels path of gemm_impl (one image: torch.mm really runs on these CPU tensors)
        ("layernorm_mlp(cuBLAS path, 1 image)", on_cublas(run(ops.layernorm_mlp, t(1, N, D), *mlp_w))),
        # the Hopper TMA-descriptor persistent kernel (matmul_tma; recorded for sm_90 only): every block GEMM
        ("layernorm_linear(TMA kernel)", on_tma(run(ops.layernorm_linear, t(B, N, D), t(D), t(D), t(3 * D, D),
                                                    t(3 * D)))),
        ("linear_residual(TMA kernel)", on_tma(run(ops.linear_residual, t(B, N, D), t(D, D), t(D), t(B, N, D)))),
        ("layernorm_mlp(TMA kernel)", on_tma(run(ops.layernorm_mlp, t(B, N, D), *mlp_w))),
        ("layernorm_mlp(TMA kernel, tanh GELU)", on_tma(run(ops.layernorm_mlp, t(B, N, D), *mlp_w,
                                                            approximate="tanh"))),
        # the MLP variants of ViTs pretrained with RMSNorm / SwiGLU (EVA-02's 4 * 2/3 hidden ratio; no biases,
        # timm's SwiGLUPacked fc1; timm's SwiGLU with biases and EVA-02's hidden LayerNorm)
        ("layernorm_mlp(RMSNorm, no biases)", run(ops.layernorm_mlp, t(B, N, D), t(D), None, t(hidden, D), None,
                                                  t(D, hidden), None, norm="rmsnorm")),
        ("swiglu_mlp(packed fc1, RMSNorm, no biases)", run(ops.swiglu_mlp, t(B, N, D), t(D), None, t(2 * glu, D),
                                                           None, None, None, t(D, glu), None, norm="rmsnorm")),
        ("swiglu_mlp(hidden LayerNorm)", run(ops.swiglu_mlp, t(B, N, D), t(D), t(D), t(glu, D), t(glu),
                                             t(glu, D), t(glu), t(D, glu), t(D), hidden_norm_weight=t(glu),
                                             hidden_norm_bias=t(glu))),
    ]
    if train:
        work += [
            # stochastic depth > 0: the MLP branch without the fused residual
            ("layernorm_mlp(add_residual=False)", run(ops.layernorm_mlp, t(B, N, D), *mlp_w, add_residual=False)),
            # images that require grad (not in ViT training, but a path the op offers)
            ("patch_embed(images grad)", run(ops.patch_embed, t(*img), *patch_w)),
            ("patch_embed_tokens(patches grad)", run(ops.patch_embed_tokens, t(B, n_patch, K_patch), *tok_args[1:],
                                                     **tok_kw)),
        ]
    return work


def build_passes(archs) -> list[tuple[list[int], object]]:
    """The trace passes of the AOT build: [(compute capabilities, a context-manager factory)]. Every target is
    traced as the CPU runs the ops (the pointer GEMM kernel, except where a workload forces TMA); sm_90 and newer
    again with the TMA GEMM kernel wherever the operands allow it, which is what ``gemm_kernel="auto"`` runs on
    Hopper. ``archs``: compute capabilities as ints."""
    from ..backend import use_gemm_kernel

    passes = [(list(archs), nullcontext)]
    hopper = [cc for cc in archs if cc >= 90]
    if hopper:
        passes.append((hopper, lambda: use_gemm_kernel("tma")))
    return passes


def trace(archs: list[int], models=MODELS, dtypes=("bf16", "fp16", "fp32"), modes=MODES, batches=DEFAULT_BATCHES,
          fixed: bool = False) -> tuple[list[Job], list[str]]:
    """Record every kernel launch of the workloads. Returns (unique jobs in first-launch order, ids of package
    kernels that no workload launched). Each job's ``grid`` is the largest extent per axis of its launches.
    ``fixed``: one configuration per autotuned launch, the one run untimed (the AOT build), instead of every
    candidate (see :class:`_Recorder`)."""
    jobs: dict = {}
    label: list = []
    with _recording(archs, jobs, label, fixed=fixed) as recorder, _RunOpsInPython():
        for model in models:
            for dt in dtypes:
                for batch in batches:
                    for mode in modes:
                        for what, thunk in vit_workloads(model, DTYPES[dt], batch, mode):
                            label[:] = [SHORT_MODEL.get(model, model), dt, f"B={batch}", mode, what]
                            thunk()
        never = [kid for kid, n in recorder.launched.items() if n == 0]
    return list(jobs.values()), never


def trace_grids(models=MODELS, dtypes=("bf16", "fp16", "fp32"), modes=MODES, batches=GRID_BATCHES,
                img_sizes=GRID_IMG_SIZES) -> list[dict]:
    """The largest launch grid of every kernel over the workloads at every batch and input size: the ops run on
    meta tensors (no memory, nothing compiled), each launch's grid is evaluated for every configuration it may run
    with (each autotune candidate). ``img_sizes``: input sides in pixels, 0 for each model's own.

    Returns: one dict per launched kernel, sorted by module and name: ``module``, ``name``, ``grid`` ([x, y, z],
    the largest extent of each axis), ``at`` (for each axis, the first launch that reached it: "model dtype B=...
    img=... mode op: call site"), ``launches`` (recorded launch x candidate count) and ``problems``
    (:func:`grid_problems` of ``grid``)."""
    grids: dict = {}
    label: list = []
    with _recording([], {}, label, grids), _RunOpsInPython():
        for model in models:
            for img in img_sizes:
                px = _vit_shapes(model, img or None)["img"]
                for dt in dtypes:
                    for batch in batches:
                        for mode in modes:
                            for what, thunk in vit_workloads(model, DTYPES[dt], batch, mode, px, device="meta"):
                                label[:] = [SHORT_MODEL.get(model, model), dt, f"B={batch}", f"img={px}", mode, what]
                                thunk()
    rows = sorted(grids.values(), key=lambda r: (r["module"], r["name"]))
    for r in rows:
        r["problems"] = grid_problems(r["grid"])
    return rows


# --------------------------------------------------------------------------------------------------------------
# compile and inspect
# --------------------------------------------------------------------------------------------------------------
def _quiet_triton() -> None:
    # Triton 3.9 warns once per process that its FP-fusion default will change; the default (fusion on) is what a
    # launch compiles today, so the build here is unchanged by silencing it.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def compile_job(job: Job) -> dict:
    """Compile one job for its target and inspect the cubin. Returns the job's fields plus ``constants``
    (constexpr values by argument name), ``regs``, ``stack``, ``smem`` (bytes per block), ``occupancy``, ``tensor_cores`` ({opcode family: count}), ``seconds`` and ``error``
    (None, or the compiler's message: a compile failure is a result, not an exception)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    _quiet_triton()
    row = asdict(job)
    names = list(job.signature)
    row["constants"] = {names[path[0]]: v for path, v in job.constexprs.items()}  # by name, for readers of the JSON
    row.update(regs=None, stack=None, smem=None, occupancy=None, tensor_cores={}, error=None)
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job.module), job.name)
        kernel = getattr(kernel, "fn", kernel) if not hasattr(kernel, "params") else kernel  # autotuned: inner fn
        target = GPUTarget("cuda", job.arch, 32)
        options = make_backend(target).parse_options(dict(job.options))
        src = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, f"{job.name}.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            tool = _triton_bin("cuobjdump")
            usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
            sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True)
        res = parse_resource_usage(usage.stdout)
        smem = int(compiled.metadata.shared) + res["SHARED"]
        warps = options.num_warps * getattr(options, "num_ctas", 1)
        row.update(regs=res["REG"], stack=res["STACK"] + res["LOCAL"], smem=smem,
                   occupancy=occupancy(res["REG"], smem, warps, job.arch), tensor_cores=tensor_core_ops(sass.stdout))
    except Exception as e:  # noqa: BLE001 - every compile failure is reported in the table
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def compile_all(jobs: list[Job], num_procs: int, progress: bool = False) -> list[dict]:
    """Compile every job, in ``num_procs`` spawned processes (1: in this process). Returns rows in job order.
    ``progress``: a running count on stderr when it is a terminal."""
    show = progress and sys.stderr.isatty()
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        if show:
            print(f"\r[{len(rows)}/{len(jobs)}] compiled", end="", file=sys.stderr, flush=True)

    if num_procs <= 1 or len(jobs) <= 1:
        for j in jobs:
            done(compile_job(j))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork after torch / triton threads started
        with ProcessPoolExecutor(num_procs, mp_context=ctx, initializer=_quiet_triton) as pool:
            for row in pool.map(compile_job, jobs):
                done(row)
    if show:
        print(file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------------------------
# verdict and report
# --------------------------------------------------------------------------------------------------------------
def problems(row: dict) -> list[str]:
    """What is wrong with one compiled variant (empty list: it passes): a compile failure, spill / stack bytes,
    shared memory over the per-block limit, (fp16 / bf16 GEMM-core and attention kernels) no tensor-core
    instructions (on sm_90 those kernels must use warpgroup MMA, HGMMA), or a launch grid over CUDA's limits
    (``row["grid"]``, see :func:`grid_problems`)."""
    out = grid_problems(row.get("grid") or ())
    if row["error"]:
        return out + [f"compile failed: {row['error']}"]
    if row["stack"]:
        out.append(f"{row['stack']} stack (spill) bytes")
    if row["smem"] > ARCH_LIMITS[row["arch"]]["smem_per_block"]:
        out.append(f"shared memory {row['smem']} B > {ARCH_LIMITS[row['arch']]['smem_per_block']} B")
    low_precision = any(t in ("*fp16", "*bf16") for t in row["signature"].values())
    if row["name"] in TENSOR_CORE_KERNELS and low_precision:
        tc = row["tensor_cores"]
        if row["arch"] >= 90 and not tc.get("HGMMA"):
            out.append("no HGMMA (warpgroup MMA) on sm_90" + ("; HMMA only" if tc.get("HMMA") else ""))
        elif not (tc.get("HMMA") or tc.get("HGMMA")):
            out.append("no tensor-core instructions")
    return out


def _models_of(uses: list[str]) -> str:
    seen = []
    for u in uses:
        m = u.split(" ", 1)[0]
        if m not in seen:
            seen.append(m)
    return ",".join(seen)


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per compiled variant (sorted by target, kernel, specialisation)."""
    head = ("arch", "kernel", "specialisation", "config", "regs", "stack", "smem KB", "occ", "tensor cores",
            "models", "verdict")
    lines = []
    for r in sorted(rows, key=lambda r: (r["arch"], r["module"], r["name"], r["spec"], r["config"])):
        tc = " ".join(f"{k}x{v}" for k, v in sorted(r["tensor_cores"].items())) or "-"
        bad = problems(r)
        ok = "ok" if not bad else "FAIL: " + "; ".join(bad)
        if r["error"]:
            vals = ("-", "-", "-", "-", "-")
        else:
            vals = (str(r["regs"]), str(r["stack"]), f"{r['smem'] / 1024:.1f}", f"{r['occupancy']:.0%}", tc)
        lines.append((f"sm_{r['arch']}", r["name"].strip("_"), r["spec"], r["config"], *vals, _models_of(r["uses"]),
                      ok))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def format_grid_table(grid_rows: list[dict]) -> str:
    """A plain-text table of :func:`trace_grids` rows: per kernel the largest extent of each grid axis, where the
    largest one was launched (the axis closest to its limit), and the verdict."""
    head = ("kernel", "max grid (x, y, z)", "largest relative to its limit at", "verdict")
    lines = []
    for r in grid_rows:
        # the axis nearest its limit; an axis of extent 1 is not in use
        axis = max((a for a in range(3) if r["grid"][a] > 1 or a == 0), key=lambda a: r["grid"][a] / GRID_LIMITS[a])
        lines.append((r["name"].strip("_"), " x ".join(f"{g:,}" for g in r["grid"]), r["at"][axis],
                      "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def _validate(archs=(), models=(), dtypes=(), modes=(), batches=(), img_sizes=()) -> None:
    from ..configs import MODEL_CONFIGS

    for name, values, known in (("arch", archs, ARCHS), ("model", models, MODEL_CONFIGS), ("dtype", dtypes, DTYPES),
                                ("mode", modes, MODES)):
        bad = [v for v in values if v not in known]
        if bad:
            raise ValueError(f"unknown {name} {bad}; expected any of {list(known)}")
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1; got {list(batches)}")
    if any(i < 0 for i in img_sizes):
        raise ValueError(f"image sizes must be >= 0 (0: the model's own); got {list(img_sizes)}")


def check(archs=("sm_80", "sm_90"), models=MODELS, dtypes=("bf16", "fp16", "fp32"), modes=MODES,
          batches=DEFAULT_BATCHES, num_procs: int | None = None, progress: bool = False,
          grid_batches=GRID_BATCHES, grid_img_sizes=GRID_IMG_SIZES) -> dict:
    """Trace, compile and inspect; check every launch grid; see the module docstring.

    Args:
        archs: target names from ``ARCHS`` ("sm_80", "sm_90"); models: names from ``configs.MODEL_CONFIGS``;
        dtypes: keys of ``DTYPES``; modes: "train" (forward + backward) and / or "infer" (forward);
        batches: batch sizes to trace and compile; num_procs: compile processes (default: CPU count);
        grid_batches, grid_img_sizes: the grid check's extra batches and input sides in pixels (0: the model's
        own), traced on meta tensors together with ``batches`` (:func:`trace_grids`; nothing compiled).

    Returns:
        {"rows": [one dict per compiled variant, see :func:`compile_job`, plus "grid" and "problems"], "grids":
        [the largest grid per kernel, see :func:`trace_grids`], "not_traced": [kernel ids no workload launched],
        "failures": number of rows and grid rows with problems, "seconds": wall time}.

    Raises:
        ValueError: an unknown arch, model, dtype or mode; a batch size < 1; an image size < 0. RuntimeError:
            kernels defined under the interpreter.
    """
    _validate(archs, models, dtypes, modes, [*batches, *grid_batches], grid_img_sizes)
    _quiet_triton()
    start = time.perf_counter()
    jobs, never = trace([ARCHS[a] for a in archs], models, dtypes, modes, batches)
    grid_rows = trace_grids(models, dtypes, modes, sorted({*batches, *grid_batches}), grid_img_sizes)
    rows = compile_all(jobs, num_procs or os.cpu_count() or 1, progress)
    for r in rows:
        r["problems"] = problems(r)
    failures = sum(bool(r["problems"]) for r in rows) + sum(bool(g["problems"]) for g in grid_rows)
    return dict(rows=rows, grids=grid_rows, not_traced=never, failures=failures,
                seconds=round(time.perf_counter() - start, 1))


def check_grids(models=MODELS, dtypes=("bf16", "fp16", "fp32"), modes=MODES, batches=GRID_BATCHES,
                img_sizes=GRID_IMG_SIZES) -> dict:
    """The grid check alone (no compiler needed; seconds): :func:`trace_grids` over the arguments (see
    :func:`check`). Returns {"grids": rows, "failures": rows with problems, "seconds": wall time}. Raises
    ValueError for an unknown model, dtype or mode, a batch < 1 or an image size < 0."""
    _validate(models=models, dtypes=dtypes, modes=modes, batches=batches, img_sizes=img_sizes)
    start = time.perf_counter()
    grid_rows = trace_grids(models, dtypes, modes, batches, img_sizes)
    return dict(grids=grid_rows, failures=sum(bool(g["problems"]) for g in grid_rows),
                seconds=round(time.perf_counter() - start, 1))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
