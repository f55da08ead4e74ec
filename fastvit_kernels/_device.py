"""The device guard every Triton launch runs under.

A Triton launch goes to the *current* CUDA device and that device's current stream, not to the device of the
tensors it is given. A model on ``cuda:1`` while the current device is 0 would launch its kernels on device 0 with
pointers into device 1's memory (a fault, or, with peer access, a race with device 1's stream). So each op's Triton
implementation (the ``fastvit::*`` custom ops' implementations in :mod:`fastvit_kernels.ops`) runs under
:func:`on_device` of its inputs' device, through the :func:`launches_on_input_device` decorator: every kernel it
launches, and every scratch or counter tensor it allocates (``torch.empty`` / ``torch.zeros`` on the inputs'
device), then uses that device and its current stream -- the stream PyTorch would use for an op on those tensors.

The guard also records the device it entered (:func:`guarded_device`, a context variable), on every device type,
so a test can check on the CPU that each launch happens inside the guard for its tensors' device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Callable, Iterator

import torch

_GUARDED: contextvars.ContextVar = contextvars.ContextVar("fastvit_kernels_guarded_device", default=None)


def guarded_device() -> torch.device | None:
    """The device of the innermost active :func:`on_device` guard in this thread / task, or None outside any."""
    return _GUARDED.get()


@contextlib.contextmanager
def on_device(where: torch.Tensor | torch.device) -> Iterator[torch.device]:
    """Run the block with ``where``'s device current: for a CUDA device, ``torch.cuda.device(device)`` (restored on
    exit; the current stream Triton and the caching allocator use is then that device's); for other devices (the
    CPU under the Triton interpreter) nothing to switch. On every device the guard's device is recorded for
    :func:`guarded_device` while the block runs. Yields the device.

    Args:
        where: a tensor (its device is used) or a ``torch.device`` with an explicit index for CUDA.

    Raises:
        TypeError: ``where`` is neither a tensor nor a device.
        ValueError: a CUDA device without an index (which device is meant would depend on the current one).
    """
    if isinstance(where, torch.Tensor):
        device = where.device
    elif isinstance(where, torch.device):
        device = where
    else:
        raise TypeError(f"where must be a torch.Tensor or torch.device; got {type(where).__name__}")
    if device.type == "cuda" and device.index is None:
        raise ValueError(f"where must name a CUDA device with an index (e.g. cuda:0); got {device}")
    token = _GUARDED.set(device)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield device
        else:
            yield device
    finally:
        _GUARDED.reset(token)


def launches_on_input_device(fn: Callable) -> Callable:
    """Decorator for a function that launches kernels on its tensor arguments (the custom ops' Triton
    implementations): runs it under :func:`on_device` of its first tensor argument (positional first, then
    keyword), which the ops' input checks have already held to one device with the other tensors.

    Raises (from the wrapped call):
        TypeError: no tensor argument, so no device to launch on.
    """

    @functools.wraps(fn)
    def run_on_input_device(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            raise TypeError(f"{fn.__qualname__}: no tensor argument to take the launch device from")
        with on_device(first):
            return fn(*args, **kwargs)

    # the signature with its annotations evaluated in fn's module: torch.library.custom_op infers the op's schema
    # from it and would otherwise evaluate string annotations in this module
    run_on_input_device.__signature__ = inspect.signature(fn, eval_str=True)
    return run_on_input_device
