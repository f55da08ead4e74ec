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
* An explicit choice overrides the rule: the ``backend=`` argument of every op and of :class:`FastViT`, else the
  ``FASTVIT_BACKEND`` environment variable; each is ``"auto"``, ``"triton"`` or ``"torch"``.
* Inside the Triton backend, each GEMM runs either on the fused Triton GEMM core or as cuBLAS (``torch.matmul``)
  plus fused elementwise kernels: :func:`gemm_impl` says which (``FASTVIT_GEMM_IMPL`` or :func:`use_gemm_impl`;
  the per-shape rule lives in :mod:`fastvit_kernels.kernels.gemm_impl`).

Nothing here queries a CUDA device at import time; Triton's availability is checked once and cached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch

from ._env import interpreter_enabled

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
    if backend == "triton" and not can_triton:
        if not triton_available():
            why = "the triton package is not importable"
        elif device.type == "cpu":
            why = "tensors are on the CPU and the Triton interpreter is off (set TRITON_INTERPRET=1 before the first kernel launch)"
        else:
            why = f"device type {device.type!r} is not supported by the Triton kernels (CUDA only)"
        raise RuntimeError(f"{source}='triton' cannot run here: {why}")
    return backend


GEMM_IMPLS = ("auto", "triton", "cublas", "measure")
GEMM_KERNELS = ("auto", "tma", "pointer")
GEMM_PAIRS = ("auto", "off")
_overrides: dict[str, str] = {}  # environment variable -> value set by use_gemm_impl / _kernel / _pairs


def _setting(env: str, allowed: tuple) -> str:
    """The override of ``env`` if one is active, else the environment variable, else "auto"; validated."""
    value = (_overrides.get(env) or os.environ.get(env, "auto") or "auto").lower()
    if value not in allowed:
        raise ValueError(f"{env} must be one of {allowed}; got {value!r}")
    return value


@contextlib.contextmanager
def _override(env: str, arg: str, value: str, allowed: tuple):
    """Force the setting ``env`` to ``value`` inside the block (process-wide); ``arg`` names the argument in the
    error."""
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {allowed}; got {value!r}")
    old = _overrides.get(env)
    _overrides[env] = value
    try:
        yield
    finally:
        if old is None:
            _overrides.pop(env, None)
        else:
            _overrides[env] = old


def gemm_impl() -> str:
    """How the Triton backend runs each GEMM: the :func:`use_gemm_impl` setting, else ``FASTVIT_GEMM_IMPL``, else
    "auto".

    * ``"auto"``: per GEMM, never timed: the path in the active tuning record (:mod:`fastvit_kernels.tuning`),
      else the choice recorded in :data:`fastvit_kernels.kernels.gemm_impl.MEASURED_CHOICES` for that GPU, dtype,
      shape and fusion, else the fused Triton GEMM.
    * ``"measure"``: on a GPU, time both paths the first time each (shape, fusion) is seen and keep the faster
      for the rest of the process (like autotuning; on the CPU interpreter and during CUDA graph capture: "auto").
    * ``"triton"`` / ``"cublas"``: force one path wherever it can run (split-index and converting GEMMs, i.e.
      the patch embedding, always use the Triton core).

    Raises:
        ValueError: ``FASTVIT_GEMM_IMPL`` holds another name.
    """
    return _setting("FASTVIT_GEMM_IMPL", GEMM_IMPLS)


def use_gemm_impl(impl: str):
    """Context manager forcing :func:`gemm_impl` to ``impl`` (one of ``GEMM_IMPLS``) for the GEMMs launched inside
    it (process-wide, not per thread).

    Raises:
        ValueError: ``impl`` is not one of ``GEMM_IMPLS``.
    """
    return _override("FASTVIT_GEMM_IMPL", "impl", impl, GEMM_IMPLS)


def gemm_kernel() -> str:
    """Which Triton GEMM kernel a plain GEMM on the Triton path uses: the :func:`use_gemm_kernel` setting, else
    ``FASTVIT_GEMM_KERNEL``, else "auto".

    * ``"auto"``: the TMA-descriptor persistent kernel (:mod:`fastvit_kernels.kernels.matmul_tma`) on CUDA devices
      of compute capability 9.0 and newer (Hopper) when the installed Triton has host tensor descriptors and the
      operands are TMA-describable; the pointer kernel (``matmul._matmul_kernel``, the Ampere path) otherwise.
    * ``"tma"``: the TMA kernel wherever the operands allow it, on any device (the interpreter tests use this).
    * ``"pointer"``: always the pointer kernel.

    Split-index and converting GEMMs (the patch embedding) always use the pointer kernel.

    Raises:
        ValueError: ``FASTVIT_GEMM_KERNEL`` holds another name.
    """
    return _setting("FASTVIT_GEMM_KERNEL", GEMM_KERNELS)


def use_gemm_kernel(kernel: str):
    """Context manager forcing :func:`gemm_kernel` to ``kernel`` (one of ``GEMM_KERNELS``) inside it (process-wide).

    Raises:
        ValueError: ``kernel`` is not one of ``GEMM_KERNELS``.
    """
    return _override("FASTVIT_GEMM_KERNEL", "kernel", kernel, GEMM_KERNELS)


def gemm_pairs() -> str:
    """Whether two independent backward GEMMs that read the same gradient run as one launch
    (:func:`fastvit_kernels.kernels.matmul.gemm_pair`): the :func:`use_gemm_pairs` setting, else
    ``FASTVIT_GEMM_PAIRS``, else "auto" (pair wherever gemm_pair's conditions hold); "off": one launch per GEMM
    (the comparison a GPU benchmark needs: nothing has been timed yet).

    Raises:
        ValueError: ``FASTVIT_GEMM_PAIRS`` holds another name.
    """
    return _setting("FASTVIT_GEMM_PAIRS", GEMM_PAIRS)


def use_gemm_pairs(pairs: str):
    """Context manager forcing :func:`gemm_pairs` to ``pairs`` (one of ``GEMM_PAIRS``) inside it (process-wide).

    Raises:
        ValueError: ``pairs`` is not one of ``GEMM_PAIRS``.
    """
    return _override("FASTVIT_GEMM_PAIRS", "pairs", pairs, GEMM_PAIRS)
