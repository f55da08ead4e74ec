"""Launch plans: what each ``fastvit::*`` op call does on the host, recorded once so that C++ can replay it.

``python -m fastvit_kernels.aot build`` writes ``plans.json`` beside the cubin table. The C++ op library's CUDA
kernel for every ``fastvit::*`` schema (``csrc/cuda/plans.cpp``) replays a plan instead of running the op's Python
launcher: no Python, no Triton JIT or binder, one dispatcher call per ATen allocation and one ``cuLaunchKernel`` per
launch.

How a plan is recorded (no GPU): the build's workloads (:func:`fastvit_kernels.aot.vit_workloads`) run on CPU tensors
inside :class:`_PlanRecorder`, once per target compute capability. Each ``fastvit::*`` call runs its Python
implementation (the launcher) with

* a dispatch mode (:class:`_Tape`) that records every ATen call the launcher makes (``aten::empty``, views, ...):
  its schema arguments, each tensor as a *slot* (the op's tensor arguments are slots 0 .. n-1 at their schema
  positions; each ATen result takes the next slot), and
* the launch hook (:func:`fastvit_kernels.kernels._launch.recording`), which binds each launch to its cubin-table
  row exactly as the cubin route does (:func:`fastvit_kernels.kernels._cubins.match`: Triton's binder for the
  target) and records the row's symbol, grid and argument lists (``_cubins.launch_lists``) with tensors as slots.

The plan is keyed by :func:`call_key`: the op, the compute capability, and per schema argument the dtype, shape,
strides and 16-byte alignment of a tensor or the value of a scalar: everything a launcher's choices depend on.
The C++ side computes the same string from the call it receives.

**Scalar arguments.** PyTorch's stable ABI boxes no ``Scalar``, and the index arithmetic of ``patch_embed_tokens``
and of the key-padding mask uses them (``torch.arange(n)``, ``ids + b * N``, ``torch.where(m, 1, 0)``). Such a call
is recorded as the same computation through Scalar-free ATen ops, each number a *constant step* (a 0-dim tensor:
int64 for an int, bool for a bool, as type promotion treats a Python number; the stated dtype for
``scalar_tensor``): comparisons and ``where`` / ``clamp`` take their Tensor overloads, ``add`` / ``sub`` become a
sum over a stack (no ``alpha``), an integer ``arange`` a cumulative sum of ones, scaled and shifted. The result is
checked against the original call (values, dtype, shape, strides) while recording; a float Scalar other than
``scalar_tensor``'s is refused (no exact Tensor form: type promotion would differ).

A call is **refused** (no plan; the C++ kernel then runs the Python implementation when fastvit_kernels is
imported, else raises) when its launcher does something a plan cannot replay:

* a Scalar argument without an exact Tensor form (above), or a non-tensor result (a host read such as
  ``.item()``), or an output shape that depends on tensor values (``nonzero``, boolean-mask indexing,
  ``repeat_interleave`` without ``output_size``): a plan would freeze what it read;
* a launch the cubin table has no row for (the build's ``--kernel`` filter, an arch without that kernel);
* a tensor that is neither an argument nor made by a recorded ATen call (a cached tensor);
* two tensor arguments that share storage (the key cannot say how they overlap, and a launcher may rely on it).

When two workloads record the same key, the first plan recorded stays (the plain workloads come before the ones
that force the TMA kernel or the cuBLAS path). The GEMM kernel is the one a GPU of the target would choose by
default: the TMA kernel on sm_90 and newer, the pointer kernel below (``gemm_kernel="auto"``).

Format (:data:`FORMAT`)::

    {"format": FORMAT, "table": "kernels.json",
     "plans": [{"op", "cc", "key", "use", "outputs": [slot, ...], "steps": [
         {"aten": "aten::empty", "overload": "memory_format", "args": [ARG, ...], "outputs": n} |
         {"const": number, "dtype": "i64" ...} |
         {"launch": symbol, "grid": [x, y, z], "tensors": [slot, ...], "ints": [...], "floats": [...]}]}],
     "refused": [{"op", "cc", "key", "use", "why"}]}

    ARG: null | {"t": slot} | {"tl": [slot, ...]} | {"i": int} | {"il": [int, ...]} | {"f": float} | {"b": bool}
         | {"s": str} | {"dtype": "f16" ...} | {"layout": "strided"} | {"device": "op"} | {"mf": "contiguous"}
         each with "opt": true when the schema type is Optional (boxed as an optional).
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORMAT = "fastvit_kernels.aot.plans/1"
PLANS = "plans.json"

# dtype names of the key and of {"dtype": ...} arguments (csrc/cuda/plans.cpp: dtype_name / dtype_from)
DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64",
               torch.int32: "i32", torch.int64: "i64", torch.bool: "b8", torch.uint8: "u8"}


_SCALAR_TYPES = ("Scalar", "number", "Optional[Scalar]", "Optional[number]")


# ATen ops whose output shape depends on the values of their inputs: a plan would replay the traced shape
_VALUE_SHAPED = frozenset({"nonzero", "nonzero_numpy", "argwhere", "masked_select", "_unique", "_unique2",
                           "unique_dim", "unique_consecutive", "unique_dim_consecutive"})


def _data_dependent_shape(func, args: tuple, kwargs: dict) -> bool:
    """Whether the ATen call's output shape depends on the values of its inputs (then a plan cannot hold it)."""
    name, overload = func._schema.name.split("::")[1], func._schema.overload_name
    if name in _VALUE_SHAPED:
        return True
    values = dict(zip((a.name for a in func._schema.arguments), _schema_values(func._schema, args, kwargs)))
    if name == "repeat_interleave" and overload in ("Tensor", "self_Tensor"):  # length = sum(repeats) unless stated
        return values.get("output_size") is None
    if name == "index":  # a boolean mask selects by value
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in values.get("indices") or ())
    return False


class _Refuse(Exception):
    """Raised inside recording: this call gets no plan (the message says why)."""


def _schema_values(schema, args: tuple, kwargs: dict) -> list:
    """The call's value of every schema argument, in schema order, defaults filled in."""
    values = []
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            values.append(args[i])
        elif a.name in kwargs:
            values.append(kwargs[a.name])
        elif a.has_default_value():
            values.append(a.default_value)
        else:
            raise TypeError(f"{schema.name}: missing argument {a.name}")
    return values


def _join(values) -> str:
    return ",".join(str(int(v)) for v in values)


def tensor_key(t: torch.Tensor) -> str:
    """A tensor's part of :func:`call_key`: dtype, shape, strides, whether its data pointer is 16-byte aligned."""
    aligned = 1 if t.data_ptr() % 16 == 0 else 0
    return f"T{DTYPE_NAMES.get(t.dtype, 'other')}[{_join(t.shape)}][{_join(t.stride())}]a{aligned}"


def call_key(op: str, cc: int, schema, values: list) -> str:
    """The plan key of one call of ``op`` (``"fastvit::x"``) on compute capability ``cc``, from its schema argument
    values in order (csrc/cuda/plans.cpp's ``plan_key`` builds the same string).

    Raises:
        TypeError: an argument type the op schemas do not use."""
    parts = [f"{op}@{int(cc)}"]
    for a, v in zip(schema.arguments, values):
        kind = str(a.type)
        if kind in ("Tensor", "Optional[Tensor]"):
            parts.append("N" if v is None else tensor_key(v))
        elif kind in ("int", "SymInt"):
            parts.append(f"I{int(v)}")
        elif kind == "bool":
            parts.append("B1" if v else "B0")
        elif kind == "List[bool]":
            parts.append("L" + _join(v))
        elif kind == "float":
            parts.append("F%016x" % struct.unpack("<Q", struct.pack("<d", float(v)))[0])
        elif kind == "str":
            parts.append("S" + v)
        else:
            raise TypeError(f"{op}: argument {a.name} has type {kind}, which plan keys do not encode")
    return ";".join(parts)


class _Tape(TorchDispatchMode):
    """Records one op call's ATen calls and launches as plan steps (module docstring)."""

    def __init__(self, table, cc: int, values: list):
        super().__init__()
        self.table, self.cc = table, cc
        self.slots: list = []  # every slot's tensor, kept alive so that no id() is reused while recording
        self.ids: dict[int, int] = {}
        for v in values:
            if isinstance(v, torch.Tensor):
                self.ids[id(v)] = len(self.slots)
            self.slots.append(v if isinstance(v, torch.Tensor) else None)
        self.aliases: list = []  # tensors that share a slot with another (detach)
        self.steps: list[dict] = []
        self.why: str | None = None

    def slot(self, t: torch.Tensor) -> int:
        s = self.ids.get(id(t))
        if s is None:
            raise _Refuse(f"the launcher uses a {t.dtype} tensor of shape {tuple(t.shape)} that is neither an "
                          "argument of the op nor made by an ATen call the plan records")
        return s

    def _add(self, t: torch.Tensor) -> int:
        self.ids[id(t)] = len(self.slots)
        self.slots.append(t)
        return self.ids[id(t)]

    def _arg(self, func, a, v):
        kind = str(a.type)
        if v is None:
            return None
        if isinstance(v, torch.Tensor):
            out = {"t": self.slot(v)}
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out = {"tl": [self.slot(x) for x in v]}
        elif isinstance(v, torch.dtype):
            if v not in DTYPE_NAMES:
                raise _Refuse(f"{func}: dtype {v} is not replayed")
            out = {"dtype": DTYPE_NAMES[v]}
        elif isinstance(v, torch.layout):
            if v != torch.strided:
                raise _Refuse(f"{func}: layout {v} is not replayed")
            out = {"layout": "strided"}
        elif isinstance(v, torch.device):
            if v.type != "cpu":
                raise _Refuse(f"{func}: an explicit device {v} (the plan allocates on the op's device)")
            out = {"device": "op"}
        elif isinstance(v, torch.memory_format):
            names = {torch.contiguous_format: "contiguous", torch.preserve_format: "preserve"}
            if v not in names:
                raise _Refuse(f"{func}: memory format {v} is not replayed")
            out = {"mf": names[v]}
        elif isinstance(v, bool):
            out = {"b": v}
        elif isinstance(v, int):
            out = {"i": v}
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise _Refuse(f"{func}: a non-finite float argument {a.name}")
            out = {"f": v}
        elif isinstance(v, str):
            out = {"s": v}
        elif isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out = {"il": [int(x) for x in v]}
        else:
            raise _Refuse(f"{func}: argument {a.name} = {v!r} is not replayed")
        if kind.startswith("Optional["):
            out["opt"] = True
        return out

    # ---- Scalar-free forms: the stable ABI boxes no Scalar, so a launcher's ATen call with one is recorded as the
    # same computation through Tensor overloads, a number becoming a 0-dim constant; checked against the original.
    def _const(self, value, what: str, func, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 0-dim tensor holding ``value``, recorded as a constant step: int64 / bool for an int / bool Scalar
        (what a Python number becomes in type promotion, exactly), or ``dtype`` when the op states it."""
        exact = isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53)  # C++ fills via a double
        if dtype is None and exact:
            dtype = torch.bool if isinstance(value, bool) else torch.int64
        elif dtype is None or dtype not in DTYPE_NAMES or not (exact or isinstance(value, float) and
                                                                math.isfinite(value)):
            raise _Refuse(f"{func} takes the Scalar {what}={value!r}: only int and bool Scalars have an exact "
                          "Tensor form here (PyTorch's stable ABI cannot box a Scalar)")
        t = torch.full((), value, dtype=dtype)
        self.steps.append({"const": value if isinstance(value, float) else int(value), "dtype": DTYPE_NAMES[dtype]})
        self._add(t)
        return t

    def _call(self, func, *args, **kwargs):
        """Run the ATen op ``func`` now (the tape's mode is off inside its handler) and record it as a step."""
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _add2(self, a, b, dtype: torch.dtype) -> torch.Tensor:
        """a + b in ``dtype`` (broadcast) without add's Scalar alpha: the sum over a stack of the two."""
        aten = torch.ops.aten
        shape = list(torch.broadcast_shapes(a.shape, b.shape))
        parts = [self._call(aten.expand.default, x if x.dtype == dtype else self._call(aten._to_copy.default, x,
                                                                                        dtype=dtype), shape)
                 for x in (a, b)]
        return self._call(aten.sum.dim_IntList, self._call(aten.stack.default, parts, 0), [0], False, dtype=dtype)

    def _rewrite(self, func, args: tuple, kwargs: dict, out) -> None:
        aten = torch.ops.aten
        name, overload = func._schema.name.split("::")[1], func._schema.overload_name
        v = _schema_values(func._schema, args, kwargs)
        num = lambda x, what: x if isinstance(x, torch.Tensor) else self._const(x, what, func)  # noqa: E731
        if name == "scalar_tensor" and overload == "":  # torch.where(c, 1, 0) and the like build these
            result = self._const(v[0], "s", func, out.dtype)
        elif name in ("ge", "gt", "le", "lt", "eq", "ne") and overload == "Scalar":
            result = self._call(getattr(aten, name).Tensor, v[0], num(v[1], "other"))
        elif name == "where" and overload in ("Scalar", "ScalarSelf", "ScalarOther"):
            result = self._call(aten.where.self, v[0], num(v[1], "self"), num(v[2], "other"))
        elif name == "clamp" and overload == "":
            result = self._call(aten.clamp.Tensor, v[0], None if v[1] is None else num(v[1], "min"),
                                None if v[2] is None else num(v[2], "max"))
        elif name in ("add", "sub") and overload == "Tensor" and isinstance(v[0], torch.Tensor):
            b, scale = num(v[1], "other"), v[2] if name == "add" else -v[2]
            if scale != 1:
                b = self._call(aten.mul.Tensor, b, num(scale, "alpha"))
            result = self._add2(v[0], b, out.dtype)
        elif name == "arange" and overload in ("", "start", "start_step"):
            start, end, step = ((0, v[0], 1) if overload == "" else (v[0], v[1], 1) if overload == "start"
                                else tuple(v[:3]))
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end, step)):
                raise _Refuse(f"{func}({start}, {end}, {step}): only an integer range has an exact Tensor form")
            n = len(range(start, end, step))
            result = self._call(aten.cumsum.default, self._call(aten.ones.default, [n], dtype=torch.int64,
                                                                device=out.device), 0)  # 1 .. n
            if step != 1:
                result = self._call(aten.mul.Tensor, result, num(step, "step"))
            if start - step:
                result = self._add2(result, num(start - step, "start"), torch.int64)
            if out.dtype != torch.int64:
                result = self._call(aten._to_copy.default, result, dtype=out.dtype)
        elif not any(str(a.type) in _SCALAR_TYPES and x is not None for a, x in zip(func._schema.arguments, v)):
            # a number where the schema has a Tensor (x * 3 reaches mul.Tensor with a Python int): a 0-dim constant
            pos, kw = [], {}
            for a, x in zip(func._schema.arguments, v):
                x = num(x, a.name) if str(a.type) == "Tensor" else x
                (kw.__setitem__(a.name, x) if a.kwarg_only else pos.append(x))
            result = self._call(func, *pos, **kw)
        else:
            raise _Refuse(f"{func} takes a Scalar argument, which PyTorch's stable ABI cannot box, and has no "
                          "Tensor form here")
        if (result.dtype, result.shape, result.stride()) != (out.dtype, out.shape, out.stride()) or \
                not torch.equal(result, out):
            raise _Refuse(f"{func}: its Tensor form computed something else")
        self.ids[id(out)] = self.ids[id(result)]
        self.aliases.append(out)

    def _record(self, func, args: tuple, kwargs: dict, out) -> None:
        schema = func._schema
        if schema.name == "aten::detach" and isinstance(args[0], torch.Tensor):
            # a Python factory call under a dispatch mode adds a detach; the plan runs below autograd, where a
            # detached view and its source are the same tensor: one slot, no step
            self.ids[id(out)] = self.slot(args[0])
            self.aliases.append(out)  # kept alive: its id must not be reused while recording
            return
        if func.namespace != "aten":
            raise _Refuse(f"the launcher calls {func}, not an ATen op")
        if _data_dependent_shape(func, args, kwargs):
            raise _Refuse(f"{func}: its output's shape depends on tensor values, which a plan would freeze")
        if any(str(r.type) != "Tensor" for r in schema.returns) or not schema.returns:
            raise _Refuse(f"{func} returns {[str(r.type) for r in schema.returns]}: a plan replays ATen calls that "
                          "return tensors only (a host read such as .item() depends on tensor values)")
        values = _schema_values(schema, args, kwargs)
        if any(str(a.type) in _SCALAR_TYPES and v is not None or str(a.type) == "Tensor" and
               not isinstance(v, torch.Tensor) for a, v in zip(schema.arguments, values)):
            self._rewrite(func, args, kwargs, out)
            return
        encoded = [self._arg(func, a, v) for a, v in zip(schema.arguments, values)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.steps.append({"aten": schema.name, "overload": schema.overload_name, "args": encoded,
                           "outputs": len(outs)})
        for t in outs:
            self._add(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.why is None:
            try:
                self._record(func, args, kwargs, out)
            except _Refuse as e:
                self.why = str(e)
        return out

    def launch(self, kernel, grid, args: tuple, kwargs: dict) -> None:
        """The launch hook: bind the launch to its table row and record it (nothing runs)."""
        if self.why is not None:
            return
        from ..kernels import _cubins

        try:
            found = _cubins.match(self.table, kernel, grid, args, kwargs, self.cc)
            if found is None:
                name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
                raise _Refuse(f"the cubin table has no row for {name} on sm_{self.cc}")
            tensors, ints, floats = _cubins.launch_lists(found.row, found.values)
            self.steps.append({"launch": found.row["symbol"], "grid": list(found.grid),
                               "tensors": [self.slot(t) for t in tensors], "ints": ints, "floats": floats})
        except _Refuse as e:
            self.why = str(e)


class _PlanRecorder(TorchDispatchMode):
    """Inside it, every ``fastvit::*`` call runs its Python implementation under a :class:`_Tape` and leaves a plan
    (or a refusal) in ``plans`` / ``refused`` keyed by :func:`call_key`; other ops run as usual. ``label`` holds
    the workload's name for the ``use`` field."""

    def __init__(self, table, cc: int, plans: dict, refused: dict, label: list[str]):
        super().__init__()
        self.table, self.cc, self.plans, self.refused, self.label = table, cc, plans, refused, label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .._library import python_impl
        from ..kernels import _launch

        kwargs = kwargs or {}
        impl = python_impl(func._schema.name) if func.namespace == "fastvit" else None
        if impl is None:
            return func(*args, **kwargs)
        op = func._schema.name
        values = _schema_values(func._schema, args, kwargs)
        key = call_key(op, self.cc, func._schema, values)
        tape = _Tape(self.table, self.cc, values)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        storages = [t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()]
        if len(set(storages)) != len(storages):
            tape.why = "two tensor arguments share storage"
        with tape, _launch.recording(tape.launch):
            out = impl(*args, **kwargs)
        if tape.why is None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            try:
                slots = [tape.slot(t) for t in outs]
            except _Refuse as e:
                tape.why = f"an output: {e}"
        use = " ".join(self.label)
        if tape.why is None:
            if key not in self.plans:
                self.plans[key] = {"op": op, "cc": self.cc, "key": key, "use": use, "outputs": slots,
                                   "steps": tape.steps}
            self.refused.pop(key, None)
        elif key not in self.plans and key not in self.refused:
            self.refused[key] = {"op": op, "cc": self.cc, "key": key, "use": use, "why": tape.why}
        return out


def _outside_op(kernel, grid, args, kwargs) -> None:
    raise RuntimeError(f"{getattr(kernel, '__name__', kernel)} was launched outside a fastvit::* op: no plan could "
                       "hold it")


def record_calls(table, cc: int, fn, plans: dict | None = None, refused: dict | None = None,
                 label: str = "") -> tuple[dict, dict]:
    """Record the plans of the ``fastvit::*`` calls ``fn()`` makes (e.g. a model's forward and backward on CPU
    tensors of the deployed shapes) for compute capability ``cc`` against ``table`` (a
    :class:`fastvit_kernels.kernels._cubins.CubinTable`). The ops take their Triton path on CPU tensors while it
    records; nothing is launched or computed (outputs are uninitialised). The GEMM kernel is the one ``cc``'s GPU
    runs by default (TMA from sm_90, the pointer kernel below).

    Args:
        plans, refused: dicts to add to (key -> plan / refusal; a key already planned keeps its plan).
        label: the ``use`` of the recorded entries.

    Returns:
        (plans, refused), the dicts given or new ones.

    Raises:
        RuntimeError: a kernel is launched outside any ``fastvit::*`` op.
    """
    from ..backend import use_gemm_kernel
    from ..kernels import _launch

    plans = {} if plans is None else plans
    refused = {} if refused is None else refused
    kernel = use_gemm_kernel("tma") if cc >= 90 else use_gemm_kernel("pointer")
    # the outer hook makes the public ops take their Triton path on CPU tensors (the rule of
    # backend.resolve_backend while a recorder is active); every launch happens inside an op, under its tape
    with kernel, _launch.recording(_outside_op), _PlanRecorder(table, cc, plans, refused, [label]):
        fn()
    return plans, refused


def record(table, archs: list[int], models, dtypes, modes, batches) -> tuple[list[dict], list[dict]]:
    """Record the plans of the AOT build's workloads (:func:`fastvit_kernels.aot.vit_workloads`) for each compute
    capability in ``archs`` against ``table`` (:func:`record_calls`).

    Returns:
        (plans, refused): lists of dicts as in the module docstring's format, in recording order.
    """
    from .. import aot

    plans: dict = {}
    refused: dict = {}
    for cc in archs:
        for model in models:
            for dt in dtypes:
                for batch in batches:
                    for mode in modes:
                        for what, thunk in aot.vit_workloads(model, aot.DTYPES[dt], batch, mode):
                            label = f"sm_{cc} {aot.SHORT_MODEL.get(model, model)} {dt} B={batch} {mode} {what}"
                            record_calls(table, cc, thunk, plans, refused, label)
    return list(plans.values()), list(refused.values())


def write(out_dir: str, table, archs: list[int], models, dtypes, modes, batches) -> dict:
    """Record the plans (:func:`record`) and write ``out_dir/plans.json``. Returns the written document."""
    plans, refused = record(table, archs, models, dtypes, modes, batches)
    doc = {"format": FORMAT, "table": os.path.basename(table.file), "plans": plans, "refused": refused}
    with open(os.path.join(out_dir, PLANS), "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
    return doc


def load(path: str) -> dict:
    """The plans document at ``path`` (a plans.json, or the build directory holding it).

    Raises:
        FileNotFoundError: no plans.json. ValueError: not JSON, or another format than :data:`FORMAT`.
    """
    file = path if os.path.isfile(path) else os.path.join(path, PLANS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {PLANS} at {path} (python -m fastvit_kernels.aot build --out DIR writes it)")
    with open(file) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} document")
    return doc


__all__ = ["FORMAT", "PLANS", "call_key", "tensor_key", "record_calls", "record", "write", "load"]
