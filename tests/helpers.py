"""Shared test utilities: per-dtype tolerances in one place (STYLE.md item 8) and the flash-attention rule for
low precision: the kernel's error against an fp32 reference may be at most 2x PyTorch's own low-precision error
at the same inputs, plus a small atol; and a counter of the device kernel launches a block makes."""

from __future__ import annotations

import collections
import contextlib

import torch

# atol / rtol for comparing against an fp32 reference. fp32 kernels use IEEE fp32 dots, so only summation order
# differs; the low-precision entries are the additive atol of the 2x rule.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=0.0),
    torch.bfloat16: dict(atol=1.6e-2, rtol=0.0),
}

DTYPES_INTERPRETER = [torch.float32, torch.float16]


def assert_close_to_ref(actual: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                        name: str = "output", factor: float = 2.0) -> None:
    """Assert ``actual`` matches the fp32 reference.

    fp32: within TOLERANCES[fp32]. fp16/bf16: max|actual - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol,
    where ``ref_lowp`` is the PyTorch reference run in ``actual``'s dtype on the same inputs.
    """
    assert actual.shape == ref_fp32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    a = actual.float()
    r = ref_fp32.float()
    tol = TOLERANCES[actual.dtype]
    scale = max(1.0, r.abs().max().item())
    if actual.dtype == torch.float32:
        torch.testing.assert_close(a, r, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
        return
    assert ref_lowp is not None, f"{name}: low-precision comparison needs ref_lowp"
    err = (a - r).abs().max().item()
    base = (ref_lowp.float() - r).abs().max().item()
    bound = factor * base + tol["atol"] * scale
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {factor} x torch's {actual.dtype} error {base:.3e} + atol (bound {bound:.3e})"
    )


def fwd_bwd(fn, inputs: list, grad_out: torch.Tensor | None = None, dtype: torch.dtype | None = None, **kwargs):
    """Run ``fn(*inputs, **kwargs)`` on fresh leaf copies of ``inputs`` (cast to ``dtype``; None entries pass
    through), backpropagate ``grad_out`` (cast to the output dtype; default: the output's sum) and return
    (output, [grad of each input or None])."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(t.is_floating_point())
              for t in inputs]
    out = fn(*leaves, **kwargs)
    if grad_out is None:
        out.sum().backward()
    else:
        out.backward(grad_out.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def assert_fwd_bwd_match(fn, ref_fn, inputs: list, dtype: torch.dtype, names: list[str], grad_out=None, **kwargs):
    """Hold ``fn`` in ``dtype`` to ``ref_fn`` in fp32 (output and every input gradient), using the 2x rule with
    ``ref_fn`` run in ``dtype`` as PyTorch's own low-precision error. ``kwargs`` go to both functions.
    Returns the kernel's output."""
    if grad_out is None:
        with torch.no_grad():
            grad_out = torch.randn_like(ref_fn(*[None if t is None else t.float() for t in inputs], **kwargs))
    out, grads = fwd_bwd(fn, inputs, grad_out, dtype, **kwargs)
    cpu_inputs = [None if t is None else t.cpu() for t in inputs]
    ref, ref_grads = fwd_bwd(ref_fn, cpu_inputs, grad_out.cpu(), torch.float32, **kwargs)
    lowp, lowp_grads = (None, [None] * len(inputs))
    if dtype != torch.float32:
        lowp, lowp_grads = fwd_bwd(ref_fn, cpu_inputs, grad_out.cpu(), dtype, **kwargs)
    assert_close_to_ref(out.cpu(), ref, lowp, name="output")
    for name, g, rg, lg in zip(names, grads, ref_grads, lowp_grads):
        if rg is None:
            assert g is None, f"grad of {name} should be None"
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close_to_ref(g.cpu(), rg, lg, name=f"grad {name}")
    return out


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
