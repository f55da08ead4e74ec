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


def test_meta_and_cpu_take_triton_while_launches_are_recorded(monkeypatch):
    """The documented rule for the AOT trace: while a launch recorder is active nothing runs, so meta and CPU
    tensors (interpreter off) resolve to "triton" under "auto", an explicit "torch" still wins, and the CPU-bfloat16
    guard (an interpreter limit) lets bfloat16 through; outside recording the usual rules hold."""
    from fastvit_kernels._checks import check_triton_dtype
    from fastvit_kernels.kernels import _launch

    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    meta, cpu = torch.device("meta"), torch.device("cpu")
    bf16 = torch.zeros(2, dtype=torch.bfloat16)
    assert not bk.launches_recorded()
    assert bk.resolve_backend(meta) == bk.resolve_backend(cpu) == "torch"
    with pytest.raises(TypeError, match="bfloat16"):
        check_triton_dtype("x", bf16)
    with _launch.recording(lambda *call: None):
        assert bk.launches_recorded()
        assert bk.resolve_backend(meta) == bk.resolve_backend(cpu) == "triton"
        assert bk.resolve_backend(meta, "triton") == "triton"
        assert bk.resolve_backend(meta, "torch") == "torch"
        check_triton_dtype("x", bf16)
        with pytest.raises(RuntimeError, match="not supported by the Triton kernels"):
            bk.resolve_backend(torch.device("mps"), "triton")
    assert not bk.launches_recorded()
    assert bk.resolve_backend(meta) == "torch"
    with pytest.raises(RuntimeError, match="not supported by the Triton kernels"):
        bk.resolve_backend(meta, "triton")


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


def test_import_installs_no_import_hook():
    # importing the package changes no global import machinery (finders, path hooks)
    code = ("import sys\n"
            "finders, hooks = list(sys.meta_path), list(sys.path_hooks)\n"
            "import fastvit_kernels, fastvit_kernels.bench\n"
            "assert sys.meta_path == finders, sys.meta_path\n"
            "assert sys.path_hooks == hooks, sys.path_hooks\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_gemm_kernel_setting(monkeypatch):
    """FASTVIT_GEMM_KERNEL / use_gemm_kernel: "auto" by default, the context manager wins over the environment and
    restores it, bad names raise with the accepted ones."""
    from fastvit_kernels import backend

    monkeypatch.delenv("FASTVIT_GEMM_KERNEL", raising=False)
    assert backend.gemm_kernel() == "auto"
    monkeypatch.setenv("FASTVIT_GEMM_KERNEL", "POINTER")
    assert backend.gemm_kernel() == "pointer"
    with backend.use_gemm_kernel("tma"):
        assert backend.gemm_kernel() == "tma"
        with backend.use_gemm_impl("cublas"):  # the two settings are independent
            assert (backend.gemm_kernel(), backend.gemm_impl()) == ("tma", "cublas")
    assert backend.gemm_kernel() == "pointer"
    monkeypatch.setenv("FASTVIT_GEMM_KERNEL", "wgmma")
    expected = r"FASTVIT_GEMM_KERNEL must be one of \('auto', 'tma', 'pointer'\); got 'wgmma'"
    with pytest.raises(ValueError, match=expected):
        backend.gemm_kernel()
    with pytest.raises(ValueError, match="kernel must be one of"):
        with backend.use_gemm_kernel("fastest"):
            pass


def test_gemm_pairs_setting(monkeypatch):
    """FASTVIT_GEMM_PAIRS / use_gemm_pairs: "auto" by default, "off" from either, bad names raise."""
    from fastvit_kernels import backend

    monkeypatch.delenv("FASTVIT_GEMM_PAIRS", raising=False)
    assert backend.gemm_pairs() == "auto"
    with backend.use_gemm_pairs("off"):
        assert backend.gemm_pairs() == "off"
    assert backend.gemm_pairs() == "auto"
    monkeypatch.setenv("FASTVIT_GEMM_PAIRS", "0")
    with pytest.raises(ValueError, match=r"FASTVIT_GEMM_PAIRS must be one of \('auto', 'off'\); got '0'"):
        backend.gemm_pairs()
    with pytest.raises(ValueError, match="pairs must be one of"):
        with backend.use_gemm_pairs("on"):
            pass
