"""Test set-up: without a GPU the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before the first kernel is defined; fastvit_kernels defines its kernels lazily (on
the first Triton launch), and this file runs before any test module imports the package.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        _has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"

# The suite tests the package as CI installs it, without the C++ op library: a _C built in place
# (FASTVIT_BUILD_CSRC=1 pip install -e .) is not loaded here; tests/csrc builds its own and runs it in subprocesses.
os.environ.setdefault("FASTVIT_C_LIBRARY", "none")

import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """The device the kernel tests run on: CUDA when present, else CPU under the Triton interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
