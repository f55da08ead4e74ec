"""Which implementation an op runs: this package's Triton kernels or the eager PyTorch reference.

Rules (docs/design.md, "Backends"):

* CUDA tensors run the Triton kernels (when Triton is importable).
* CPU tensors run the reference in :mod:`fastvit_kernels.reference`, unless the Triton interpreter is on
  (``TRITON_INTERPRET=1`` in the environment before the first kernel is used), in which case the same Triton
  kernels run on the CPU. That is how the tests exercise the kernels on machines without a GPU.
* Meta and CPU tensors also run the Triton kernels while a launch recorder is active
  (:func:`fastvit_kernels.kernels._launch.recording`, what the AOT check traces the ops under): nothing is
  launched then, only recorded, so neither a GPU nor the interpreter is needed, and the recorder sees the launches
  the launchers would make on a GPU.
* With the C++ op library ``_C`` loaded and ``FASTVIT_LAUNCHER=cpp`` (:mod:`fastvit_kernels._library`), an
  explicit ``"triton"`` also runs on CPU tensors without the interpreter: the fused ``fastvit::*`` ops then run
  ``_C``'s CPU kernels (what an exported graph calls where no Triton runs). ``"auto"`` on the CPU stays ``"torch"``.
* An explicit choice overrides the rule: the ``backend=`` argument of every op and of :class:`FastViT`, else the
  ``FASTVIT_BACKEND`` environment variable; each is ``"auto"``, ``"triton"`` or ``"torch"``.
* Inside the Triton backend, each GEMM runs either on the fused Triton GEMM core or as cuBLAS (``torch.matmul``)
  plus fused elementwise kernels: :func:`gemm_impl` says which (``FASTVIT_GEMM_IMPL`` or :func:`use_gemm_impl`;
  the per-shape rule lives in :mod:`fastvit_kernels.kernels.gemm_impl`).

Nothing here queries a CUDA device at import time; Triton's availability is checked once and cached.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ._env import interpreter_enabled
from ._library import cpp_serves_cpu

BACKENDS = ("auto", "triton", "torch")


# found once, without importing triton (import stays cheap) and without a device query
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once at import, without importing it)."""
    return _TRITON_INSTALLED


def launches_recorded() -> bool:
    """Whether a launch recorder is active (:func:`fastvit_kernels.kernels._launch.recording`): then kernel launches
    are recorded, not run. Imports nothing: without the recording module loaded no recorder can be active."""
    launch_module = sys.modules.get("fastvit_kernels.kernels._launch")
    return launch_module is not None and launch_module.recording_active()


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick the implementation for tensors on ``device`` (the rules of the module docstring).

    Args:
        device: the device of the op's input tensors.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` or None (then ``FASTVIT_BACKEND``, default "auto").

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: ``backend`` (or ``FASTVIT_BACKEND``) is not one of the three names.
        RuntimeError: ``"triton"`` was asked for where it cannot run (Triton missing; CPU tensors without the
            interpreter; a device other than CPU/CUDA; while launches are recorded, a device other than CPU, CUDA or
            meta).
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
        device.type == "cuda"
        or (device.type == "cpu" and interpreter_enabled())
        or (device.type in ("cpu", "meta") and launches_recorded())
    )
    if backend == "auto":
        return "triton" if can_triton else "torch"
    if backend == "triton" and device.type == "cpu" and cpp_serves_cpu():
        return backend  # the fused ops' CPU kernels of the C++ library (export / deployment without Triton)
    if backend == "triton" and not can_triton:
        if not triton_available():
            why = "the triton package is not importable"
        elif device.type == "cpu":
            why = "tensors are on the CPU and the Triton interpreter is off (set TRITON_INTERPRET=1 before the first kernel launch)"
        else:
            why = f"device type {device.type!r} is not supported by the Triton kernels (CUDA only)"
        raise RuntimeError(f"{source}='triton' cannot run here: {why}")
    return backend


# The GEMM settings live in _env (the kernels read them; nothing below this module imports it); re-exported here as
# the public switches.
from ._env import (GEMM_IMPLS, GEMM_KERNELS, GEMM_PAIRS, gemm_impl, gemm_kernel, gemm_pairs,  # noqa: E402,F401
                   use_gemm_impl, use_gemm_kernel, use_gemm_pairs)
