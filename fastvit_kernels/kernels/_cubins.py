"""Running a Triton launch from the AOT cubin table instead of Triton's JIT: the launch as :func:`_launch.launch`
receives it (kernel, grid, args, kwargs) becomes the table row of the cubin compiled for it and the argument lists of
``_C``'s ``fastvit_csrc::launch`` op (csrc/cuda/ops.cpp).

The table is ``kernels.json`` of ``python -m fastvit_kernels.aot build`` (format :data:`FORMAT`; see
``fastvit_kernels/aot/build.py`` for its rows). A launch matches a row when everything Triton would compile for it
is equal: the kernel, the compute capability, the argument types (signature), the constexprs and the arguments
Triton folds into the binary, the specialisation attributes (16-divisible pointers and integers) and the launch
options (num_warps, num_stages, ...). These are computed by Triton's own binder for the target, exactly as the AOT
build computed them when it traced the ops (:func:`specialize`), so a launch finds the cubin built for it or none:
there is no approximate match, and no fallback to compiling (a missing row is a :class:`RuntimeError` that says to
rebuild the table).

An autotuned kernel runs its first candidate, after the kernel's own pruning (``early_config_prune``, which applies
an active tuning record), that has a row: the build compiled either the tuning record's pick or the first candidate
(what ``FASTVIT_AUTOTUNE=0`` runs). Nothing is timed.

Argument convention of ``fastvit_csrc::launch`` (csrc/cuda/ops.cpp): the row's parameters in order fill three
lists: ``tensors`` (pointer parameters, and the base tensor of each host tensor descriptor), ``ints`` (integer
parameters, a descriptor's shape and strides included, as Triton's launcher expands them) and ``floats``; the two
scratch pointers take no entry (``launch`` allocates them).

Triton is imported inside the functions only: importing this module imports no Triton.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import torch

# The table format this module reads; equal to fastvit_kernels.aot.build.FORMAT (kernels/ may not import aot; a
# test asserts the two agree).
FORMAT = "fastvit_kernels.aot.build/1"
TABLE = "kernels.json"

_INT_TYPES = frozenset({"i1", "u1", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"})
_FLOAT_TYPES = frozenset({"fp16", "bf16", "fp32", "f32", "fp64"})
_SCRATCH_ROLES = ("global_scratch", "profile_scratch")


class CubinLaunch(NamedTuple):
    """One launch of a prebuilt cubin: the arguments of ``torch.ops.fastvit_csrc.launch(table, symbol, grid,
    tensors, ints, floats)``.

    Attributes:
        symbol: the table row's unique symbol (kernel, arch, hash).
        grid: (x, y, z) programs, ints.
        tensors: pointer arguments and descriptor base tensors, in parameter order.
        ints: integer arguments (descriptor shapes and strides included), in parameter order.
        floats: floating-point arguments, in parameter order.
    """

    symbol: str
    grid: tuple
    tensors: list
    ints: list
    floats: list


class Match(NamedTuple):
    """A launch matched to its table row: ``row`` (the kernels.json dict), ``values`` ({parameter name: value}:
    a tensor for a pointer, ``{"base": tensor}`` for a descriptor, an int or a float; scratch parameters absent),
    ``grid`` ((x, y, z) ints)."""

    row: dict
    values: dict
    grid: tuple


class CubinTable:
    """A loaded, indexed kernels.json.

    Attributes:
        path: the table's directory (the cubins lie next to kernels.json).
        file: the kernels.json path (what ``fastvit_csrc::launch`` is given: ``_C`` reads the same file).
        rows: the rows, in table order.
    """

    def __init__(self, path: str, file: str, rows: list[dict]):
        self.path = path
        self.file = file
        self.rows = rows
        self._index: dict[tuple, dict] = {}
        self._by_kernel: dict[tuple, int] = {}
        self._memo: dict[tuple, dict | None] = {}  # _find's: Triton specialisation -> row
        for row in rows:
            key = _row_key(row)
            if key in self._index:
                raise ValueError(f"{self.file}: rows {self._index[key]['symbol']} and {row['symbol']} describe the "
                                 "same compile")
            self._index[key] = row
            self._by_kernel[row["kernel"], row["cc"]] = self._by_kernel.get((row["kernel"], row["cc"]), 0) + 1

    def find(self, key: tuple) -> dict | None:
        """The row compiled for ``key`` (:func:`specialize`), or None."""
        return self._index.get(key)

    def count(self, kernel: str, cc: int) -> int:
        """How many rows the table has for ``kernel`` on compute capability ``cc``."""
        return self._by_kernel.get((kernel, cc), 0)


def _norm(value):
    """``value`` as the table stores it (JSON types; Triton's dtypes and other constexpr objects as strings)."""
    return json.loads(json.dumps(value, default=str))


# Launch options with a default: a launch that leaves one out compiles as one that states the default (an autotune
# config states num_ctas, a launch with a fixed config may not), so both sides of the match fill them in.
_DEFAULTED_OPTIONS = ("num_warps", "num_ctas", "num_stages")


@functools.lru_cache(maxsize=None)
def _option_defaults(cc: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    defaults = make_backend(GPUTarget("cuda", cc, 32)).parse_options({})
    return {k: getattr(defaults, k) for k in _DEFAULTED_OPTIONS if hasattr(defaults, k)}


def _key(kernel: str, cc: int, signature: dict, constexprs: dict, attrs: dict, options: dict) -> tuple:
    """The identity of one compile (what the table is indexed by)."""
    dump = lambda v: json.dumps(_norm(v), sort_keys=True)  # noqa: E731
    return (kernel, int(cc), dump(signature), dump(constexprs), dump(attrs),
            dump({**_option_defaults(int(cc)), **options}))


def _row_key(row: dict) -> tuple:
    return _key(row["kernel"], row["cc"], row["signature"], {**row["constexprs"], **row["folded"]}, row["attrs"],
                row["options"])


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> CubinTable:
    """The cubin table in directory ``path`` (the ``--out`` of ``python -m fastvit_kernels.aot build``; or the path
    of its kernels.json), read and indexed once per path for the process.

    Raises:
        FileNotFoundError: ``path`` has no kernels.json.
        ValueError: the file is not JSON, has another ``format`` than :data:`FORMAT`, a row lacks a field the
            matching needs, or two rows describe the same compile.
    """
    file = path if os.path.isfile(path) else os.path.join(path, TABLE)
    path = os.path.dirname(file)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no cubin table {file}: FASTVIT_CUBINS must name the --out directory of "
                                "python -m fastvit_kernels.aot build")
    try:
        with open(file) as f:
            table = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not JSON: {err}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        got = table.get("format") if isinstance(table, dict) else type(table).__name__
        raise ValueError(f"{file} has format {got!r}; this fastvit_kernels reads {FORMAT!r} (rebuild the table with "
                         "python -m fastvit_kernels.aot build)")
    rows = table.get("kernels")
    need = ("symbol", "kernel", "cc", "signature", "constexprs", "folded", "attrs", "options", "params")
    if not isinstance(rows, list):
        raise ValueError(f"{file}: 'kernels' must be a list of rows")
    for i, row in enumerate(rows):
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{file}: kernels[{i}] lacks {missing}")
    return CubinTable(path, file, rows)


def pack_args(fn, backend, kwargs: dict, bound_args: dict, specialization: list, options) -> tuple:
    """(signature, constexprs, attrs) of one bound launch of ``fn`` (a ``JITFunction``), as ``JITFunction.run``
    computes them before compiling: signature {argument name: Triton type}, constexprs {(argument index,): value}
    (the declared constexprs and the arguments Triton folds), attrs {(argument index,): specialisation attributes}.
    Triton 3.6 to 3.9 have this step as ``JITFunction._pack_args``; Triton 3.4 inlines it in ``run`` (its lines are
    repeated here), so the AOT build and the cubin route agree on every supported Triton."""
    if hasattr(fn, "_pack_args"):
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        return signature, constexprs, attrs
    from triton.runtime.jit import find_paths_if, get_iterable_path

    sigvals = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in fn.params], sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return signature, constexprs, attrs


@functools.lru_cache(maxsize=None)
def _binder(fn, cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", cc, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(fn, args: tuple, kw: dict, cc: int) -> tuple[tuple, dict]:
    """Bind one launch of the plain ``@triton.jit`` kernel ``fn`` for compute capability ``cc`` with Triton's binder.

    Returns:
        (key, bound): key identifies the compile (the table is indexed by the same key of each row); bound is
        {argument name: value}, defaults applied.
    """
    backend, binder = _binder(fn, cc)
    bound, specialization, options = binder(*args, **kw)
    signature, constexprs, attrs = pack_args(fn, backend, kw, bound, specialization, options)
    names = list(signature)
    param_names = {p.name for p in fn.params}
    key = _key(fn.__name__, cc, signature, {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1},
               {names[path[0]]: a for path, a in attrs.items()}, {k: v for k, v in kw.items() if k not in param_names})
    return key, bound


def _find(table: CubinTable, fn, args: tuple, kw: dict, cc: int) -> tuple[dict | None, dict]:
    """(the row of this launch of ``fn`` or None, the bound arguments). The row is remembered per Triton
    specialisation (what Triton's own kernel cache is keyed by), so a launch seen before skips the compile-key
    computation."""
    _, binder = _binder(fn, cc)
    bound, specialization, options = binder(*args, **kw)
    try:
        memo = (fn, cc, tuple(specialization), tuple(sorted(options.items())))
        hash(memo)
    except TypeError:  # an unhashable constexpr: no memo
        memo = None
    if memo is not None and memo in table._memo:
        return table._memo[memo], bound
    key, _ = specialize(fn, args, kw, cc)
    row = table.find(key)
    if memo is not None:
        table._memo[memo] = row
    return row, bound


def _grid3(grid, meta: dict, name: str) -> tuple:
    if callable(grid):
        grid = grid(meta)
    if isinstance(grid, int) or not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
        raise TypeError(f"{name}: a launch grid must be a tuple of 1 to 3 ints; got {grid!r}")
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


def param_values(row: dict, bound: dict) -> dict:
    """{parameter name: value} of ``row``'s parameters from the bound arguments: a tensor for a pointer,
    ``{"base": tensor}`` for a host tensor descriptor, its shape / strides as ints, scalars as they are; the scratch
    pointers are left out."""
    values = {}
    for p in row["params"]:
        if p["role"] in _SCRATCH_ROLES:
            continue
        v = bound[p["arg"]]
        part = p["name"][len(p["arg"]):]
        if part == ".desc":
            values[p["name"]] = {"base": v.base}
        elif part.startswith(".shape["):
            values[p["name"]] = int(v.shape[int(part[7:-1])])
        elif part.startswith(".stride["):
            values[p["name"]] = int(v.strides[int(part[8:-1])])
        else:
            values[p["name"]] = v
    return values


def _candidates(kernel, args: tuple, kwargs: dict):
    """(plain kernel, keywords) per configuration the launch may run, in preference order: an autotuner's pruned
    candidates (each after its ``pre_hook`` ran, as Triton runs it), or the launch itself."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        yield kernel, kwargs
        return
    configs = kernel.configs
    prune = getattr(kernel, "early_config_prune", None)
    if prune and len(configs) > 1:  # Triton's autotuner prunes only a list of more than one
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
    for config in configs:
        kw = {**kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:  # e.g. TMA descriptors take the candidate's block shape
            config.pre_hook({**dict(zip(kernel.arg_names, args)), **kw})
        yield kernel.fn, kw


def match(table: CubinTable, kernel, grid, args: tuple, kwargs: dict, cc: int) -> Match | None:
    """The table row of this launch on compute capability ``cc`` (module docstring), with the parameter values and
    the grid, or None when the table has no row for any configuration the launch may run.

    Args:
        kernel, grid, args, kwargs: the launch as :func:`fastvit_kernels.kernels._launch.launch` receives it (an
            ``Autotuner`` or a ``JITFunction``; a grid tuple or a callable of the meta-parameters).
        cc: compute capability as an int (80, 90, ...).
    """
    for fn, kw in _candidates(kernel, args, kwargs):
        row, bound = _find(table, fn, args, kw, cc)
        if row is not None:
            grid3 = _grid3(grid, {**dict(zip(fn.arg_names, args)), **kw}, fn.__name__)
            return Match(row, param_values(row, bound), grid3)
    return None


def launch_lists(row: dict, values: dict) -> tuple[list, list, list]:
    """(tensors, ints, floats) of ``fastvit_csrc::launch`` for ``row`` (module docstring's convention)."""
    tensors, ints, floats = [], [], []
    for p in row["params"]:
        t = p["type"]
        if p["role"] in _SCRATCH_ROLES:
            continue
        v = values[p["name"]]
        if t == "nvTmaDesc":
            tensors.append(v["base"])
        elif t.startswith("*"):
            tensors.append(v)
        elif t in _INT_TYPES:
            ints.append(int(v))
        elif t in _FLOAT_TYPES:
            floats.append(float(v))
        else:
            raise ValueError(f"{row['symbol']}: parameter {p['name']} has type {t!r}, which the cubin route "
                             "cannot pass")
    return tensors, ints, floats


def _constexprs(kernel, args: tuple, kwargs: dict) -> dict:
    """The launch's constexpr arguments by name (for error messages): the first candidate's."""
    for fn, kw in _candidates(kernel, args, kwargs):
        names = [p.name for p in fn.params if p.is_constexpr]
        bound = dict(zip(fn.arg_names, args))
        bound.update(kw)
        return {n: bound.get(n) for n in names if n in bound}
    return {}


def bind(kernel, grid, args: tuple, kwargs: dict, cc: int, table: CubinTable | str) -> CubinLaunch:
    """The prebuilt-cubin launch of one Triton launch (module docstring).

    Args:
        kernel, grid, args, kwargs: as :func:`match`.
        cc: compute capability as an int (80 for sm_80, 90 for sm_90).
        table: a :class:`CubinTable` or the path of its directory.

    Returns:
        :class:`CubinLaunch`.

    Raises:
        RuntimeError: the table has no cubin for the launch (names the kernel, the arch, the constexprs and the
            table, and says to rebuild it with ``aot build`` for the model / dtype).
        FileNotFoundError, ValueError: from :func:`load_table`.
    """
    if isinstance(table, str):
        table = load_table(table)
    found = match(table, kernel, grid, args, kwargs, cc)
    if found is None:
        fn = getattr(kernel, "fn", kernel)
        name = getattr(fn, "__name__", repr(fn))
        raise RuntimeError(
            f"fastvit_kernels: the cubin table {table.file} has no cubin for {name} on sm_{cc} with constexprs "
            f"{_constexprs(kernel, args, kwargs)} (it has {table.count(name, cc)} other variants of {name} for "
            f"sm_{cc}; argument types, 16-byte alignment and launch options must match as well). Rebuild the table "
            f"for this model and dtype: python -m fastvit_kernels.aot build --arch sm_{cc} --model MODEL "
            f"--dtype DTYPE --out {table.path} (or unset FASTVIT_CUBINS to JIT-compile with Triton)")
    tensors, ints, floats = launch_lists(found.row, found.values)
    return CubinLaunch(found.row["symbol"], found.grid, tensors, ints, floats)


def run(launch: CubinLaunch, table: CubinTable) -> None:
    """Launch ``launch`` with ``_C``'s ``fastvit_csrc::launch`` on PyTorch's current stream of the tensors' device.

    Raises:
        RuntimeError: from ``_C`` (no CUDA driver, tensors not on one CUDA device, a driver error, ...).
    """
    torch.ops.fastvit_csrc.launch(table.file, launch.symbol, list(launch.grid), launch.tensors, launch.ints,
                                  launch.floats)
