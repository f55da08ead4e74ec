"""Raw Triton kernels and their launchers: no autograd, no nn.Module (docs/design.md, "Layers").

These modules import triton and define ``@triton.jit`` functions, so the ops import them lazily, on the first
Triton launch: ``import fastvit_kernels`` neither imports triton nor queries a GPU, and ``TRITON_INTERPRET`` may
be set any time before that first launch. Under the interpreter, importing this package first checks that the
installed Triton and NumPy can run the kernels' loops (:func:`check_interpreter`).
"""

from .._env import interpreter_enabled


def check_interpreter(probe=None) -> None:
    """Raise RuntimeError when Triton's CPU interpreter cannot run a loop whose bound is a kernel argument (every
    GEMM and attention kernel has one: ``for k0 in range(0, K, BLOCK_K)``).

    The interpreter of Triton 3.4 - 3.6 turns such an argument into a Python int with ``int()`` on a one-element
    array, which NumPy 2.4 made a TypeError (triton-lang/triton issue 9171; Triton 3.9's interpreter squeezes the
    array first). No form of the loop avoids it (``range``, ``tl.range``, ``tl.cdiv`` bounds all convert), and a
    ``while`` loop would lose software pipelining on a GPU, so the remedy is the environment: NumPy < 2.4 or a newer
    Triton. ``probe``: a callable running the check kernel (tests replace it); default: one launch of a one-program
    kernel with ``range(0, n)``. Raises other errors of the probe unchanged."""
    import numpy
    import triton

    try:
        (probe or _range_probe)()
    except Exception as e:  # the interpreter wraps the TypeError in its own InterpreterError
        if "0-dimensional arrays" not in repr(e):
            raise
        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run these kernels with NumPy "
            f"{numpy.__version__}: it converts scalar kernel arguments with int() on one-element arrays, an error "
            "since NumPy 2.4 (triton-lang/triton issue 9171). Install numpy<2.4, or a Triton whose interpreter "
            "has the fix (3.9 has it)."
        ) from e


def _range_probe() -> None:
    import triton
    import triton.language as tl  # noqa: F401 - the interpreter looks for triton.language in the kernel's globals

    @triton.jit
    def probe(n):
        for _ in range(0, n):
            pass

    probe[(1,)](2)


if interpreter_enabled():
    check_interpreter()
