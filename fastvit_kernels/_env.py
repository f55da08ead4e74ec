"""Process-environment switches read by more than one layer (kernels, ops, backend): the interpreter, autotuning,
and the GEMM core's path / kernel-form / pairing settings (re-exported by :mod:`fastvit_kernels.backend`, their
public home). Imports nothing of the package: any module may import this one."""

import contextlib
import os


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET`` = 1 | true | on | yes, any case).

    Triton decides between compiling and interpreting when a kernel is defined, so the variable must be set before
    the kernel modules are first imported (they are imported lazily, on the first Triton launch). Under the
    interpreter the launchers also pick interpreter-friendly tiles (larger tiles: fewer Python steps) and skip
    autotuning.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune_requested() -> bool:
    """Whether autotuning is wanted: False when ``FASTVIT_AUTOTUNE`` is 0 | false | off | no (any case), True when
    it is unset or anything else. With it off, the GPU launchers run the first autotune candidate of each kernel;
    the interpreter never autotunes."""
    return os.environ.get("FASTVIT_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


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


CUBINS_ENV = "FASTVIT_CUBINS"


def cubin_table() -> str | None:
    """The AOT cubin table the CUDA launches run from: the directory named by ``FASTVIT_CUBINS`` (the ``--out`` of
    ``python -m fastvit_kernels.aot build``, holding ``kernels.json`` and the cubins), or None when it is unset or
    empty. With it set, ``_C`` loaded and the launcher ``cpp``, the ops on CUDA tensors run ``_C``'s plan kernels
    (the build's ``plans.json``, replayed in C++; :mod:`fastvit_kernels.aot.plans`), and every Triton launch the
    Python implementation still makes (a call without a plan) runs the prebuilt cubin through ``_C`` (no JIT
    compile, no autotuning; :mod:`fastvit_kernels.kernels._cubins`). Read when the ops are registered (import), by
    the first kernel launch, and by ``_C`` at its first CUDA call."""
    return os.environ.get(CUBINS_ENV, "") or None
