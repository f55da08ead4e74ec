"""Where the ``fastvit::*`` ops are defined, and which launcher serves each device.

Two ways the package's ops exist (docs/design.md, "The C++ op library"):

* **Python only** (the default install): each op is a ``torch.library.custom_op`` whose implementation launches
  the Triton kernels (:mod:`fastvit_kernels.ops`), with a fake and autograd registered.
* **With the C++ library** ``fastvit_kernels._C`` (built from ``csrc/`` by ``FASTVIT_BUILD_CSRC=1 pip install
  --no-build-isolation -e .``): ``_C`` defines the same schemas and registers kernels for them (CPU kernels
  computing the reference math with ATen ops, so an exported FastViT runs where only ``_C`` is loaded). The
  package then does not define the ops; it attaches its fakes, autograd formulas and Triton launchers to the
  C++ definitions (:func:`fastvit_op`).

Which kernel a device runs, with ``_C`` loaded, is the launcher (``FASTVIT_LAUNCHER``, read once when the ops are
registered, at import):

* ``cpp`` (the default when ``_C`` is loaded and the Triton interpreter is off): ``_C``'s kernel wherever ``_C``
  registers one for the op and device; the Python (Triton) implementation fills the devices ``_C`` has no kernel
  for.
* ``triton`` (the default under ``TRITON_INTERPRET=1``, whose point is running the Triton kernels on the CPU): the
  Python implementation on CPU and CUDA for every op; ``_C`` still provides the schemas.

On CUDA, ``_C``'s kernels replay the **launch plans** of an AOT build (``csrc/cuda/plans.cpp``,
:mod:`fastvit_kernels.aot.plans`): they serve CUDA tensors when the launcher is ``cpp`` *and* ``FASTVIT_CUBINS``
names the build (:func:`plan_route`). A call the build has no plan for runs the Python implementation, which the
package then also defines as ``fastvit_py::<op>`` for ``_C`` to call. Without ``FASTVIT_CUBINS`` the Python
implementation serves CUDA directly, as without ``_C``.

Without ``_C``, ``FASTVIT_LAUNCHER=cpp`` is an error (nothing could serve it) and ``triton`` is what runs.

``FASTVIT_C_LIBRARY`` overrides where ``_C`` is looked for: a path to the shared library, or ``none`` to run
without it although it is installed. Default: ``fastvit_kernels/_C*.so`` next to this file.

Loading ``_C`` registers its ops with the dispatcher, as defining the custom ops does; nothing else global changes.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Callable, Iterable

import torch

from ._env import cubin_table, interpreter_enabled

LIBRARY_ENV = "FASTVIT_C_LIBRARY"
LAUNCHER_ENV = "FASTVIT_LAUNCHER"
LAUNCHERS = ("cpp", "triton")
NAMESPACE = "fastvit"
FALLBACK_NAMESPACE = "fastvit_py"  # the Python implementations _C's plan kernels fall back to (plan route only)
DEVICE_KEYS = ("CPU", "CUDA")

# op name ("fastvit::x") -> its Python implementation (the Triton launcher; the AOT recorder runs it on meta
# tensors), and -> the dispatch keys where that implementation is registered
_PYTHON_IMPLS: dict[str, Callable] = {}
_PYTHON_KEYS: dict[str, tuple[str, ...]] = {}
_PYTHON_DEFINED: set[str] = set()  # defined by this package (custom_op): Python serves every device


def _find_library() -> pathlib.Path | None:
    where = os.environ.get(LIBRARY_ENV, "")
    if where.lower() == "none":
        return None
    if where:
        path = pathlib.Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={where!r}: no such file (a path to fastvit_kernels' _C shared "
                                    "library, or 'none')")
        return path
    found = sorted(pathlib.Path(__file__).resolve().parent.glob("_C*.so"))
    return found[0] if found else None


LIBRARY_PATH: pathlib.Path | None = _find_library()
if LIBRARY_PATH is not None:
    torch.ops.load_library(str(LIBRARY_PATH))


def csrc_loaded() -> bool:
    """Whether the C++ op library ``fastvit_kernels._C`` is loaded in this process."""
    return LIBRARY_PATH is not None


def launcher() -> str:
    """The launcher chosen for this process: ``"cpp"`` or ``"triton"`` (module docstring).

    Raises:
        ValueError: ``FASTVIT_LAUNCHER`` is not one of :data:`LAUNCHERS`.
        RuntimeError: ``FASTVIT_LAUNCHER=cpp`` but ``_C`` is not loaded (not built, or ``FASTVIT_C_LIBRARY=none``).
    """
    default = "cpp" if csrc_loaded() and not interpreter_enabled() else "triton"
    value = (os.environ.get(LAUNCHER_ENV, "") or default).lower()
    if value not in LAUNCHERS:
        raise ValueError(f"{LAUNCHER_ENV} must be one of {LAUNCHERS}; got {value!r}")
    if value == "cpp" and not csrc_loaded():
        raise RuntimeError(f"{LAUNCHER_ENV}=cpp but the C++ op library fastvit_kernels._C is not loaded: build it "
                           "with FASTVIT_BUILD_CSRC=1 pip install --no-build-isolation -e . (README, 'The C++ op "
                           f"library'), or point {LIBRARY_ENV} at it")
    return value


launcher()  # a bad FASTVIT_LAUNCHER, or cpp without _C, fails at import, not later at the first op


def cpp_serves_cpu() -> bool:
    """Whether CPU tensors on the fused-op path run ``_C``'s CPU kernels (``_C`` loaded, launcher ``cpp``)."""
    return csrc_loaded() and launcher() == "cpp"


def plan_route() -> bool:
    """Whether ``_C``'s plan kernels serve the ops on CUDA: ``_C`` loaded, launcher ``cpp`` and ``FASTVIT_CUBINS``
    set (read at import, as the launcher; module docstring)."""
    return csrc_loaded() and launcher() == "cpp" and cubin_table() is not None


_FALLBACK_LIB: list = []  # the fastvit_py library, once created (kept alive: its definitions last as long as it)


def _define_fallback(name: str, fn: Callable) -> None:
    """Define ``fastvit_py::<op>`` with op ``name``'s schema and ``fn`` as its CPU and CUDA kernel: what ``_C``'s
    plan kernel runs for a call without a plan."""
    if not _FALLBACK_LIB:
        _FALLBACK_LIB.append(torch.library.Library(FALLBACK_NAMESPACE, "DEF"))
        torch.ops.fastvit_csrc.set_python_fallback(True)
    lib = _FALLBACK_LIB[0]
    op = name.split("::")[1]
    lib.define(str(getattr(torch.ops.fastvit, op).default._schema).split("::", 1)[1])
    for key in DEVICE_KEYS:
        lib.impl(op, fn, key)


def _defined_in_dispatcher(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:
        return False
    return True


def cpp_defines(name: str) -> bool:
    """Whether ``_C`` is loaded and defines the op ``name`` (``"fastvit::x"``)."""
    return csrc_loaded() and _defined_in_dispatcher(name)


def python_impl(name: str) -> Callable | None:
    """The Python implementation (Triton launcher) registered for op ``name`` (``"fastvit::x"``), or None."""
    return _PYTHON_IMPLS.get(name)


def serving(name: str) -> dict[str, str]:
    """Who serves op ``name`` on each device key: {"CPU" | "CUDA": "cpp" | "triton" | "none"}."""
    out = {}
    for key in DEVICE_KEYS:
        if name in _PYTHON_DEFINED or key in _PYTHON_KEYS.get(name, ()):
            out[key] = "triton"
        elif torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            out[key] = "cpp" if cpp_defines(name) else "triton"
        else:
            out[key] = "none"
    return out


class CppDefinedOp:
    """A ``fastvit::*`` op whose schema ``_C`` defines, with the package's Python parts attached: what
    ``torch.library.custom_op`` returns when the package defines the op itself, for the parts the ops use
    (call, ``register_fake``, ``register_autograd``).

    Args:
        name: ``"fastvit::x"``. fn: the Python implementation (the Triton launcher).
        keys: dispatch keys to register ``fn`` for (from :func:`fastvit_op`'s launcher rule).
    """

    def __init__(self, name: str, fn: Callable, keys: Iterable[str]):
        self.name = name
        self._init_fn = fn
        ns, op = name.split("::")
        self._opoverload = getattr(getattr(torch.ops, ns), op).default
        self._lib = torch.library.Library(ns, "IMPL")  # kept alive: its registrations last as long as it does
        for key in keys:
            with warnings.catch_warnings():
                # replacing _C's kernel on this key is the launcher's choice (FASTVIT_LAUNCHER=triton), not a slip
                warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
                self._lib.impl(op, fn, key)

    def __call__(self, *args, **kwargs):
        return self._opoverload(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        """Register ``fn`` as the op's fake (shapes for torch.compile / export); returns ``fn``."""
        torch.library.register_fake(self.name, fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        """Register the op's autograd formula (``torch.library.register_autograd``)."""
        torch.library.register_autograd(self.name, backward, setup_context=setup_context)


def fastvit_op(name: str, *, mutates_args=()) -> Callable:
    """Decorator defining op ``name`` (``"fastvit::x"``) with the decorated function as its Python implementation:
    a ``torch.library.custom_op`` when ``_C`` does not define the op, else a :class:`CppDefinedOp` on ``_C``'s
    definition, with the implementation registered for CUDA and CPU where the launcher rule (module docstring)
    gives them to Python (and, on the plan route, as ``fastvit_py::<op>`` for ``_C``'s plan kernel to fall back
    to).

    Raises:
        ValueError: ``name`` is not in the ``fastvit`` namespace.
        ValueError / RuntimeError: from :func:`launcher` when ``_C`` defines the op.
    """
    if not name.startswith(NAMESPACE + "::"):
        raise ValueError(f"name must be '{NAMESPACE}::<op>'; got {name!r}")

    def define(fn: Callable):
        _PYTHON_IMPLS[name] = fn
        if not cpp_defines(name):
            _PYTHON_DEFINED.add(name)
            return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        use_python = launcher() == "triton"
        plans = plan_route()
        keys = tuple(k for k in DEVICE_KEYS
                     if use_python or (k == "CUDA" and not plans)
                     or not torch._C._dispatch_has_kernel_for_dispatch_key(name, k))
        _PYTHON_KEYS[name] = keys
        if plans and "CUDA" not in keys:
            _define_fallback(name, fn)
        return CppDefinedOp(name, fn, keys)

    return define
