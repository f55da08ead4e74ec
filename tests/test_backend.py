"""Backend choice and the import contract (no triton import and no CUDA query at import time)."""

import os
import subprocess
import sys

import pytest
import torch

from fastvit_kernels import backend as bk


def test_cpu_rules(monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bk.resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="Triton interpreter is off"):
        bk.resolve_backend(torch.device("cpu"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bk.resolve_backend(torch.device("cpu")) == "triton"
    assert bk.resolve_backend(torch.device("cpu"), "torch") == "torch"


def test_env_override_and_bad_names(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTVIT_BACKEND", "torch")
    assert bk.resolve_backend(torch.device("cpu")) == "torch"
    assert bk.resolve_backend(torch.device("cpu"), "triton") == "triton"  # the argument wins
    monkeypatch.setenv("FASTVIT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"FASTVIT_BACKEND must be one of \('auto', 'triton', 'torch'\); got 'cudnn'"):
        bk.resolve_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.resolve_backend(torch.device("cpu"), "fast")
    with pytest.raises(RuntimeError, match="not supported by the Triton kernels"):
        bk.resolve_backend(torch.device("meta"), "triton")


def test_import_is_lazy():
    code = (
        "import sys, torch, fastvit_kernels\n"
        "m = fastvit_kernels.create_model('vit_digits', backend='torch')\n"
        "m(torch.randn(1, 1, 8, 8))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
