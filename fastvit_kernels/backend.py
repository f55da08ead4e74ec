"""Which implementation an op runs: this package's Triton kernels or the eager PyTorch reference.

Rules (DESIGN.md, "backend.py"):

* CUDA tensors run the Triton kernels (when Triton is importable).
* CPU tensors run the reference in :mod:`fastvit_kernels.reference`, unless the Triton interpreter is on
  (``TRITON_INTERPRET=1`` in the environment before the first kernel is used), in which case the same Triton
  kernels run on the CPU. That is how the tests exercise the kernels on machines without a GPU.
* An explicit choice overrides the rule: the ``backend=`` argument of every op and of :class:`FastViT`, else the
  ``FASTVIT_BACKEND`` environment variable; each is ``"auto"``, ``"triton"`` or ``"torch"``.

Nothing here queries a CUDA device at import time; Triton's availability is checked once and cached.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


# found once, without importing triton (import stays cheap) and without a device query
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once at import, without importing it)."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``).

    The variable must be set before the kernel modules are first imported (they are imported lazily, on the
    first Triton launch), because Triton decides between compiling and interpreting when a kernel is defined.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick the implementation for tensors on ``device``.

    Args:
        device: the device of the op's input tensors.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` or None (then ``FASTVIT_BACKEND``, default "auto").

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: ``backend`` (or ``FASTVIT_BACKEND``) is not one of the three names.
        RuntimeError: ``"triton"`` was asked for where it cannot run (Triton missing; CPU tensors without the
            interpreter; a device other than CPU/CUDA).
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get("FASTVIT_BACKEND", "auto") or "auto"
        source = "FASTVIT_BACKEND"
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}; got {backend!r}")
    device = torch.device(device)
    can_triton = triton_available() and (
        device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    )
    if backend == "auto":
        return "triton" if can_triton else "torch"
    if backend == "triton" and not can_triton:
        if not triton_available():
            why = "the triton package is not importable"
        elif device.type == "cpu":
            why = "tensors are on the CPU and the Triton interpreter is off (set TRITON_INTERPRET=1 before the first kernel launch)"
        else:
            why = f"device type {device.type!r} is not supported by the Triton kernels (CUDA only)"
        raise RuntimeError(f"{source}='triton' cannot run here: {why}")
    return backend
