"""The one place kernels are launched from (placeholder; replaced by the launch-recording module)."""

from __future__ import annotations

import contextlib

_recorder = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` -- or, while a recorder is active, hand it the launch instead."""
    rec = _recorder
    if rec is not None:
        rec(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording(recorder):
    """Route every launch to ``recorder(kernel, grid, args, kwargs)`` inside the block (nests, restores)."""
    global _recorder
    old, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = old


def recording_active() -> bool:
    """Whether a recorder is active."""
    return _recorder is not None
