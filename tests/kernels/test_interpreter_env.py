"""The kernels package refuses, with a clear message, a Triton interpreter that cannot run its loops (Triton 3.4 -
3.6 with NumPy >= 2.4), instead of failing inside the first GEMM with NumPy's TypeError."""

import pytest

pytest.importorskip("triton")

from fastvit_kernels import kernels  # noqa: E402


def test_installed_interpreter_runs_argument_bounded_loops():
    kernels.check_interpreter()  # the real probe, on whatever Triton / NumPy this run has: must not raise


def test_old_interpreter_with_new_numpy_is_named():
    def probe():  # what Triton 3.6's interpreter raises under NumPy 2.4 at ``range(0, n)``
        raise RuntimeError("InterpreterError(\"TypeError('only 0-dimensional arrays can be converted to Python "
                           "scalars')\")")

    with pytest.raises(RuntimeError, match=r"numpy<2\.4.*issue 9171|issue 9171.*numpy<2\.4"):
        kernels.check_interpreter(probe)


def test_other_probe_failures_propagate():
    def probe():
        raise ValueError("unrelated")

    with pytest.raises(ValueError, match="unrelated"):
        kernels.check_interpreter(probe)
