"""Shared test utilities: the tolerance rule (one copy, in :mod:`fastvit_kernels.accuracy`; docs/design.md,
"Numerics": fp32 within TOLERANCES; fp16 / bf16 at most 2x PyTorch's own low-precision error against the fp32
reference, plus a small atol) as assertions; and a counter of the device kernel launches a block makes."""

from __future__ import annotations

import collections
import contextlib

import torch

from fastvit_kernels.accuracy import TOLERANCES, compare, compare_fwd_bwd, fwd_bwd  # noqa: F401 (re-exported)

DTYPES_INTERPRETER = [torch.float32, torch.float16]


def assert_close_to_ref(actual: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                        name: str = "output", factor: float = 2.0) -> None:
    """Assert ``actual`` matches the fp32 reference by :func:`fastvit_kernels.accuracy.compare` (``ref_lowp``: the
    reference run in ``actual``'s dtype, needed for fp16 / bf16)."""
    result = compare(actual, ref_fp32, ref_lowp, name=name, factor=factor)
    assert result.ok, result.message


def assert_fwd_bwd_match(fn, ref_fn, inputs: list, dtype: torch.dtype, names: list[str], grad_out=None, **kwargs):
    """Hold ``fn`` in ``dtype`` to ``ref_fn`` in fp32 on the CPU (output and every input gradient) by
    :func:`fastvit_kernels.accuracy.compare_fwd_bwd`. ``kwargs`` go to both functions. Returns the kernel's
    output."""
    out, results = compare_fwd_bwd(fn, ref_fn, inputs, dtype, names, grad_out, ref_device="cpu", **kwargs)
    failed = [r.message for r in results if not r.ok]
    assert not failed, "; ".join(failed)
    return out


def assert_fwd_bwd_deterministic(fn, inputs: list, grad_out=None, **kwargs) -> None:
    """Run ``fn`` forward and backward twice on the same inputs (:func:`fwd_bwd`; ``kwargs`` go to ``fn``): the
    output and every input gradient must be the same bits both times."""
    out1, grads1 = fwd_bwd(fn, inputs, grad_out, **kwargs)
    out2, grads2 = fwd_bwd(fn, inputs, grad_out, **kwargs)
    assert torch.equal(out1, out2), "the output differs between two runs"
    for i, (a, b) in enumerate(zip(grads1, grads2)):
        assert (a is None and b is None) or torch.equal(a, b), f"the gradient of input {i} differs between two runs"


def compare_model_with_reference(cfg: dict, device, dtype: torch.dtype = torch.float32, train: bool = False,
                                 image_hw: tuple | None = None, batch: int = 2, seed: int = 0):
    """Build the reference ViT from ``cfg``, copy it into a Triton-path FastViT, run both forward + backward on
    the same images (``image_hw``, default the config's img_size) and hold FastViT in ``dtype`` to the fp32
    reference: logits (or features) and every parameter gradient, with the 2x rule for low precision. In
    ``train`` mode both draw the same dropout / stochastic-depth masks (same RNG seed and order).
    Returns the FastViT model."""
    from fastvit_kernels import FastViT
    from fastvit_kernels.reference import VisionTransformer

    torch.manual_seed(seed)
    ref = VisionTransformer(**cfg)
    model = FastViT(**cfg, backend="triton").to(device)
    model.load_state_dict(ref.state_dict(), strict=True)
    hw = image_hw or (cfg["img_size"], cfg["img_size"])
    x = torch.randn(batch, cfg["in_chans"], *hw)
    with torch.no_grad():
        g = torch.randn_like(ref.eval()(x))  # logits (B, classes), or features when num_classes == 0

    def run(m, dt, dev):
        m = m.to(device=dev, dtype=dt).train(train)
        m.zero_grad()
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            out = m(x.to(dev, dt))
        out.backward(g.to(dev, dt))
        return out.detach().cpu(), {k: p.grad.cpu() for k, p in m.named_parameters()}

    out, grads = run(model, dtype, device)
    ref_out, ref_grads = run(ref, torch.float32, "cpu")
    lowp_out, lowp_grads = (None, {}) if dtype == torch.float32 else run(ref, dtype, "cpu")
    assert_close_to_ref(out, ref_out, lowp_out, name="logits")
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert_close_to_ref(grads[k], ref_grads[k], lowp_grads.get(k), name=f"grad {k}", factor=3.0)
    return model


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(model, fullgraph=True)`` (aot_eager: Dynamo capture + AOTAutograd through the custom ops'
    registered backward, fast on CPU) gives the eager output and every parameter gradient (sum loss)."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")


# PyTorch ops that launch no device kernel: views, and allocations without a fill
_NO_LAUNCH_OPS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
                  "aten.select", "aten.slice", "aten.unbind", "aten.split", "aten.unsqueeze", "aten.squeeze",
                  "aten.detach", "aten.alias", "aten.as_strided", "aten.empty", "aten.empty_strided",
                  "aten.empty_like", "aten.new_empty", "aten.new_empty_strided"}


def _counting_getitem(real_getitem, counting):
    """``__getitem__`` whose launcher goes through ``counting`` (see :func:`count_launches`)."""
    def getitem(self, grid):
        launch = real_getitem(self, grid)
        counted = counting(lambda _self, *args, **kwargs: launch(*args, **kwargs))
        return lambda *args, **kwargs: counted(self, *args, **kwargs)
    return getitem


@contextlib.contextmanager
def count_launches(monkeypatch):
    """Count the device kernel launches made inside the block: Triton kernels by name (``"_column_sum_kernel"``;
    interpreted or compiled) and PyTorch ops that launch one (``"aten.copy_"``; views and bare allocations are not
    counted). Yields a collections.Counter, filled as the block runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counts = collections.Counter()
    inside = []  # non-empty while a Triton launch runs: the interpreter's own host copies are not launches

    def counting(real):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup"):
                counts[self.fn.__name__] += 1
            inside.append(1)
            try:
                return real(self, *args, **kwargs)
            finally:
                inside.pop()
        return run

    for cls in (InterpretedFunction, JITFunction):
        if hasattr(cls, "run"):
            monkeypatch.setattr(cls, "run", counting(cls.run))
        else:  # Triton 3.4's InterpretedFunction: ``run`` is set per instance; ``kernel[grid]`` launches
            monkeypatch.setattr(cls, "__getitem__", _counting_getitem(cls.__getitem__, counting))

    class _Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name not in _NO_LAUNCH_OPS and not inside:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Log():
        yield counts  # the kernels' run methods are restored by monkeypatch at the test's end
