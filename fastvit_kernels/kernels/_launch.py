"""The one place the package launches a Triton kernel, and the hook that records launches instead of running them.

Every launcher in :mod:`fastvit_kernels.kernels` calls :func:`launch` rather than ``kernel[grid](...)``. Normally it
is exactly that launch. Inside :func:`recording`, the launch is handed to a recorder and nothing runs: that is how
the AOT check (:mod:`fastvit_kernels.aot`) traces the ops on a machine without a GPU and still sees the kernel,
grid and arguments each launcher chooses. The hook is explicit so that no tool has to replace the kernel objects
the launchers look up (docs/design.md, "Instrumentation and launch recording").

Cost when no recorder is active: one module-global read and a branch per launch. The recorder is process-wide (not
per thread): recording is a tracing tool, not something to run beside real launches in another thread. This
module imports nothing heavy (no triton), so :mod:`fastvit_kernels.backend` may ask :func:`recording_active`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

# the active recorder, or None: launches run
_recorder: Callable | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` -- or, while a recorder is active, hand (kernel, grid, args, kwargs)
    to it instead (nothing runs).

    Args:
        kernel: what the launcher launches: a ``triton.autotune`` ``Autotuner`` or a plain ``@triton.jit``
            ``JITFunction`` (then the tile configuration is among ``kwargs``).
        grid: the launch grid, a tuple of 1 to 3 ints or a callable of the launch's meta-parameters (Triton's
            convention).
        args, kwargs: the kernel's arguments, launch options (``num_warps``, ...) included.

    Returns:
        None. Raises whatever the launch (or the recorder) raises.
    """
    recorder = _recorder
    if recorder is None:
        kernel[grid](*args, **kwargs)
    else:
        recorder(kernel, grid, args, kwargs)


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
    global _recorder
    if not callable(recorder):
        raise TypeError(f"recorder must be callable; got {type(recorder).__name__}")
    outer = _recorder
    _recorder = recorder
    try:
        yield recorder
    finally:
        _recorder = outer


def recording_active() -> bool:
    """Whether a :func:`recording` block is active (then :func:`launch` records instead of launching)."""
    return _recorder is not None
