"""The one place the package launches a Triton kernel, and the hook that records launches instead of running them.

Every launcher in :mod:`fastvit_kernels.kernels` calls :func:`launch` rather than ``kernel[grid](...)``. Normally it
is exactly that launch. Inside :func:`recording`, the launch is handed to a recorder and nothing runs: that is how
the AOT check (:mod:`fastvit_kernels.aot`) traces the ops on a machine without a GPU and still sees the kernel,
grid and arguments each launcher chooses. The hook is explicit so that no tool has to replace the kernel objects
the launchers look up (docs/design.md, "Instrumentation and launch recording").

**The cubin route.** With the C++ op library ``_C`` loaded, the launcher ``cpp`` (``FASTVIT_LAUNCHER``, the default
with ``_C``) and ``FASTVIT_CUBINS`` naming an AOT cubin table (``python -m fastvit_kernels.aot build --out DIR``),
every launch on CUDA tensors runs the prebuilt cubin through ``_C``'s ``fastvit_csrc::launch``
(:mod:`fastvit_kernels.kernels._cubins`): no JIT compile, no autotuning; a launch the table has no cubin for raises
(never a silent JIT fallback). Launches on other devices (the CPU interpreter) stay Triton's. The route is decided
once per process, at the first launch.

Cost when no recorder is active and the route is off: one module-global read and a branch per launch. The recorder
is process-wide (not per thread): recording is a tracing tool, not something to run beside real launches in another
thread. This module imports nothing heavy at import (no triton), so :mod:`fastvit_kernels.backend` may ask
:func:`recording_active`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch

from .. import _env

# the active recorder, or None: launches run
_recorder: Callable | None = None
# what launch() hands each launch to, or None: Triton launches it. The recorder while one is active; else, once the
# route is decided, _launch_routed when the cubin route is on; before the first launch, _decide.
_intercept: Callable | None = None
_table = None  # the cubin route's table (a _cubins.CubinTable) once decided on; None: the route is off
_forced_cc: int | None = None  # _route_cpu_tensors: CPU tensors take the route as this compute capability
_capability: dict = {}  # CUDA device index -> compute capability as an int


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` -- or, while a recorder is active, hand (kernel, grid, args, kwargs)
    to it instead (nothing runs); or, with the cubin route on (module docstring) and CUDA tensors, launch the
    prebuilt cubin through ``_C``.

    Args:
        kernel: what the launcher launches: a ``triton.autotune`` ``Autotuner`` or a plain ``@triton.jit``
            ``JITFunction`` (then the tile configuration is among ``kwargs``).
        grid: the launch grid, a tuple of 1 to 3 ints or a callable of the launch's meta-parameters (Triton's
            convention).
        args, kwargs: the kernel's arguments, launch options (``num_warps``, ...) included.

    Returns:
        None. Raises whatever the launch (or the recorder) raises; on the cubin route, RuntimeError when the table
        has no cubin for the launch (:func:`fastvit_kernels.kernels._cubins.bind`) or from ``_C``.
    """
    hook = _intercept
    if hook is None:
        kernel[grid](*args, **kwargs)
    else:
        hook(kernel, grid, args, kwargs)


def _decide(kernel, grid, args, kwargs) -> None:
    """The first launch of the process (no recorder active): decide the cubin route, then launch."""
    global _intercept, _table
    _table = _route_table()
    _intercept = None if _table is None else _launch_routed
    launch(kernel, grid, *args, **kwargs)


def _route_table():
    """The cubin table when the route is on (module docstring), else None.

    Raises:
        RuntimeError: ``FASTVIT_CUBINS`` is set but ``_C`` is not loaded (nothing could launch the cubins).
        FileNotFoundError / ValueError: the table cannot be read (:func:`_cubins.load_table`).
    """
    from .. import _library

    path = _env.cubin_table()
    if path is None:
        return None
    if not _library.csrc_loaded():
        raise RuntimeError(f"{_env.CUBINS_ENV}={path!r} but the C++ op library fastvit_kernels._C, which launches "
                           "the cubins, is not loaded: build it with FASTVIT_BUILD_CSRC=1 pip install "
                           f"--no-build-isolation -e ., or unset {_env.CUBINS_ENV}")
    if _library.launcher() != "cpp":
        warnings.warn(f"{_env.CUBINS_ENV} is ignored: {_library.LAUNCHER_ENV}=triton JIT-compiles every kernel",
                      stacklevel=4)
        return None
    from . import _cubins

    return _cubins.load_table(path)


def _device_of(args, kwargs) -> torch.device | None:
    """The device of the launch's first tensor argument (or tensor descriptor's base), or None."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
        base = getattr(v, "base", None)
        if isinstance(base, torch.Tensor):
            return base.device
    return None


def _launch_routed(kernel, grid, args, kwargs) -> None:
    """A launch with the cubin route on: the prebuilt cubin for CUDA tensors, Triton otherwise."""
    device = _device_of(args, kwargs)
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cc = _capability.get(index)
        if cc is None:
            major, minor = torch.cuda.get_device_capability(index)
            cc = _capability[index] = 10 * major + minor
    elif _forced_cc is not None:
        cc = _forced_cc
    else:
        kernel[grid](*args, **kwargs)
        return
    from . import _cubins

    _cubins.run(_cubins.bind(kernel, grid, args, kwargs, cc, _table), _table)


@contextlib.contextmanager
def _route_cpu_tensors(cc: int) -> Iterator[None]:
    """Test helper (private): inside the block, launches on CPU tensors take the cubin route too, bound for compute
    capability ``cc``, so a machine without a GPU can check that the route reaches ``_C``'s ``fastvit_csrc::launch``
    (which then refuses the CPU tensors). Has no effect when the route is off.

    Raises:
        TypeError: ``cc`` is not an int.
    """
    global _forced_cc
    if not isinstance(cc, int):
        raise TypeError(f"cc must be an int (80, 90, ...); got {type(cc).__name__}")
    outer = _forced_cc
    _forced_cc = cc
    try:
        yield
    finally:
        _forced_cc = outer


def cubin_route() -> str | None:
    """The kernels.json path the cubin route launches from, or None when it is off (or not decided yet: it is
    decided at the first launch)."""
    return None if _table is None else _table.file


_intercept = _decide


@contextlib.contextmanager
def recording(recorder: Callable) -> Iterator[Callable]:
    """Context manager: inside it every :func:`launch` calls ``recorder(kernel, grid, args, kwargs)`` (``args`` a
    tuple, ``kwargs`` a dict, as :func:`launch` received them) instead of launching. Nests: an inner ``recording``
    replaces the outer recorder for its block, and the outer one is restored on exit (also after an error).

    Args:
        recorder: the callable that receives each launch; its return value is ignored.

    Yields:
        ``recorder``.

    Raises:
        TypeError: ``recorder`` is not callable.
    """
    global _recorder, _intercept
    if not callable(recorder):
        raise TypeError(f"recorder must be callable; got {type(recorder).__name__}")
    outer, outer_intercept = _recorder, _intercept
    _recorder = _intercept = recorder
    try:
        yield recorder
    finally:
        _recorder, _intercept = outer, outer_intercept


def recording_active() -> bool:
    """Whether a :func:`recording` block is active (then :func:`launch` records instead of launching)."""
    return _recorder is not None
