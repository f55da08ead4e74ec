"""The shape-aware choice between the fused Triton GEMM and cuBLAS + elementwise kernels (kernels/gemm_impl.py):
the rule, its visibility, forcing, and that a whole block computes the same on either path."""

import pytest
import torch

from fastvit_kernels import backend
from fastvit_kernels.backend import use_gemm_impl


@pytest.fixture
def gi():
    from fastvit_kernels.kernels import gemm_impl

    gemm_impl.reset_decisions()
    yield gemm_impl
    gemm_impl.reset_decisions()


def _ops(log):
    return (lambda: log.append("triton")), (lambda: log.append("cublas"))


def test_rule_auto_table_forced(gi, monkeypatch):
    cpu = torch.device("cpu")
    key = gi.gemm_key(cpu, torch.float16, 394, 3072, 768, "a_ln+bias+gelu_store")
    assert key == ("cpu", "float16", 512, 3072, 768, "a_ln+bias+gelu_store")
    ran = []
    # auto, nothing recorded: the fused core, recorded as a default decision; nothing was run to decide
    assert gi.choose(key, cpu, *_ops(ran)) == "triton" and ran == []
    assert gi.decisions()[key] == gi.Decision("triton", "default")
    # a recorded measurement wins for its key only
    other = key[:-1] + ("plain",)
    monkeypatch.setitem(gi.MEASURED_CHOICES, other, "cublas")
    assert gi.choose(other, cpu, *_ops(ran)) == "cublas" and gi.decisions()[other].source == "table"
    # forcing overrides both, by context manager or environment
    with use_gemm_impl("cublas"):
        assert gi.choose(key, cpu, *_ops(ran)) == "cublas"
    monkeypatch.setenv("FASTVIT_GEMM_IMPL", "triton")
    assert gi.choose(other, cpu, *_ops(ran)) == "triton"
    monkeypatch.setenv("FASTVIT_GEMM_IMPL", "cuda-graphs")
    with pytest.raises(ValueError, match="FASTVIT_GEMM_IMPL must be one of .*'cuda-graphs'"):
        backend.gemm_impl()
    with pytest.raises(ValueError, match="impl must be one of"):
        with use_gemm_impl("fastest"):
            pass


def test_measure_times_both_once_and_keeps_the_faster(gi, monkeypatch):
    cpu = torch.device("cpu")
    key = gi.gemm_key(cpu, torch.float32, 100, 64, 32, "bias")
    ran = []
    with use_gemm_impl("measure"):
        # on the CPU interpreter timings mean nothing: the table / default rule applies
        assert gi.choose(key, cpu, *_ops(ran)) == "triton" and ran == []
        monkeypatch.setattr(gi, "_can_measure", lambda device: True)
        times = {"triton": 2.0, "cublas": 1.5}

        def fake_time(fn):
            fn()
            return times[ran[-1]]

        monkeypatch.setattr(gi, "_time_ms", fake_time)
        assert gi.choose(key, cpu, *_ops(ran)) == "cublas" and ran == ["triton", "cublas"]
        assert gi.decisions()[key] == gi.Decision("cublas", "measured", {"triton": 2.0, "cublas": 1.5})
        assert gi.choose(key, cpu, *_ops(ran)) == "cublas" and len(ran) == 2  # measured once per key
    # the measured decision stays visible and in force under "auto"
    assert gi.choose(key, cpu, *_ops(ran)) == "cublas" and len(ran) == 2


@pytest.mark.parametrize("times", [{"triton": 1.0, "cublas": 3.0}, {"triton": 3.0, "cublas": 1.0}])
def test_auto_never_times_on_a_gpu(gi, monkeypatch, times):
    """"auto" on a GPU: the path does not depend on timings (two timers that disagree give the same answer, and
    neither is consulted): the table's entry for a recorded key, the fused core for any other; "measure" still
    times on request, even a recorded key."""
    cpu = torch.device("cpu")
    recorded = gi.gemm_key(cpu, torch.float16, 394, 3072, 768, "a_ln+bias+gelu_store")
    fresh = gi.gemm_key(cpu, torch.float16, 394, 768, 3072, "bias+residual")
    monkeypatch.setitem(gi.MEASURED_CHOICES, recorded, "cublas")
    monkeypatch.setattr(gi, "_can_measure", lambda device: True)  # as on a GPU
    ran = []

    def fake_time(fn):
        fn()
        return times[ran[-1]]

    monkeypatch.setattr(gi, "_time_ms", fake_time)
    assert gi.choose(recorded, cpu, *_ops(ran)) == "cublas" and ran == []
    assert gi.decisions()[recorded].source == "table"
    assert gi.choose(fresh, cpu, *_ops(ran)) == "triton" and ran == []
    assert gi.decisions()[fresh] == gi.Decision("triton", "default")
    with use_gemm_impl("measure"):
        assert gi.choose(recorded, cpu, *_ops(ran)) == min(times, key=times.get) and ran == ["triton", "cublas"]
    assert gi.decisions()[recorded].source == "measured"


def test_launches_are_memoised_and_recorded(gi, device, monkeypatch):
    """Real launches: the rule is consulted once per (setting, shape, flags) — later launches are a dict lookup —
    and each decision is visible in decisions() under its readable key."""
    from fastvit_kernels.kernels.matmul import linear

    calls = []
    real = gi.choose
    monkeypatch.setattr(gi, "choose", lambda *a: calls.append(a[0]) or real(*a))
    x, w, b = torch.randn(20, 16, device=device), torch.randn(24, 16, device=device), torch.randn(24, device=device)
    for _ in range(3):
        torch.testing.assert_close(linear(x, w, b), x @ w.t() + b, atol=2e-5, rtol=2e-4)
    assert len(calls) == 1
    key = ("cpu" if device == "cpu" else calls[0][0], "float32", 32, 24, 16, "bias")
    assert calls[0] == key and gi.decisions()[key].impl == "triton"


def test_patch_embed_gemms_never_take_the_cublas_path(gi, device):
    """Split-index / converting GEMMs have no cuBLAS form: even forced, they run on the core (and still match)."""
    from fastvit_kernels.ops import patch_embed
    from fastvit_kernels.reference import patch_embed_ref

    images = torch.randn(2, 3, 8, 8, device=device)
    w, b = torch.randn(16, 3, 4, 4, device=device) / 7, torch.randn(16, device=device)
    pos, cls = torch.randn(1, 5, 16, device=device), torch.randn(1, 1, 16, device=device)
    with use_gemm_impl("measure"):
        out = patch_embed(images, w, b, pos, cls, backend="triton")
    torch.testing.assert_close(out.cpu(), patch_embed_ref(images.cpu(), w.cpu(), b.cpu(), pos.cpu(), cls.cpu()),
                               atol=2e-5, rtol=2e-4)
    assert gi.decisions() == {}  # no launch of the patch embedding reached the rule


def test_model_on_the_cublas_path_matches_reference(gi, device):
    """A whole FastViT training step with every block GEMM on cuBLAS + elementwise kernels: logits and every
    parameter gradient against the reference model (fp32)."""
    from fastvit_kernels.configs import get_config
    from helpers import compare_model_with_reference

    with use_gemm_impl("cublas"):
        compare_model_with_reference(dict(get_config("vit_digits"), depth=1), device, torch.float32, train=True)


@pytest.mark.parametrize("model,dtype", [("vit_digits", torch.float32), ("vit_test_hd80", torch.float32),
                                         ("vit_digits", torch.float16)])
def test_model_on_the_tma_kernel_matches_reference(model, dtype, gi, device, monkeypatch):
    """A whole FastViT training step with every block GEMM on the TMA-descriptor persistent kernel (the Hopper
    path, forced; D = 64 and D = 160 with head_dim 80): logits and every parameter gradient against the reference
    model (fp32; fp16 by the 2x rule), and the kernel really ran for every block GEMM (forward and backward: in
    fp16 the dgrad + wgrad pairs as one launch each, in fp32 one by one)."""
    from fastvit_kernels.backend import use_gemm_kernel
    from fastvit_kernels.configs import get_config
    from fastvit_kernels.kernels import matmul_tma
    from helpers import compare_model_with_reference

    calls = []
    for name in ("launch", "launch_pair"):
        real = getattr(matmul_tma, name)
        monkeypatch.setattr(matmul_tma, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                     _real(*a, **k)))
    with use_gemm_impl("triton"), use_gemm_kernel("tma"):
        compare_model_with_reference(dict(get_config(model), depth=1), device, dtype, train=True)
    # one block: qkv, proj, fc1, fc2 forward; backward: their dgrad + wgrad GEMMs (four pairs)
    pairs = 4 if dtype == torch.float16 else 0
    assert calls.count("launch") == 4 + 2 * (4 - pairs) and calls.count("launch_pair") == pairs, calls
