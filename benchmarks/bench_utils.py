"""Shared benchmark helpers. On a machine without a GPU the suite runs small CPU smoke configurations (their group names
say "CPU smoke": the numbers time the eager reference path, not the Triton kernels); GPU cases skip with a reason."""

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (timings of the Triton kernels)")


def synchronize() -> None:
    """Wait for queued GPU work so a timed round measures it (no-op on the CPU)."""
    if HAS_GPU:
        torch.cuda.synchronize()
