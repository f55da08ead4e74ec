"""Process-environment switches read by more than one layer (kernels, backend). Imports nothing: any module of
the package may import this one."""

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
