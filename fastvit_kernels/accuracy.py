"""How close a kernel's result must be to the fp32 eager reference: the one tolerance rule, shared by the test
suite and by ``python -m fastvit_kernels.info --check``.

* fp32: the kernels use IEEE fp32 dots (no TF32), so only the summation order differs from the reference:
  elementwise ``|actual - ref| <= atol * scale + rtol * |ref|``, ``scale = max(1, max|ref|)``.
* fp16 / bf16, the "2x PyTorch" rule (the one FlashAttention's test suite holds its kernels to):
  ``max|actual - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol * scale`` (factor 2 by default), where
  ``ref_lowp`` is the same eager PyTorch reference run in the low-precision dtype on the same inputs. The kernel
  may be at most twice as far from the fp32 result as PyTorch itself is in that dtype; the small ``atol`` covers
  outputs that PyTorch happens to round exactly.

:func:`compare` applies the rule to one tensor; :func:`compare_fwd_bwd` to an op's output and every input
gradient. Neither asserts: each returns :class:`Comparison` records, which the tests assert on and the checker
prints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# atol / rtol against an fp32 reference; the low-precision entries are the additive atol of the 2x rule
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=0.0),
    torch.bfloat16: dict(atol=1.6e-2, rtol=0.0),
}


@dataclass(frozen=True)
class Comparison:
    """One tensor held to the reference.

    Attributes:
        name: what was compared ("output", "grad x", ...).
        dtype: the kernel result's dtype, e.g. "float16".
        error: max |actual - ref_fp32| (inf when the shapes differ or a value is not finite).
        ratio: how much of the allowed error was used (<= 1 passes): for fp32 the largest elementwise
            ``|actual - ref| / (atol * scale + rtol * |ref|)``, for fp16 / bf16 ``error / bound``.
        ok: whether the rule holds.
        message: why it failed ("" when ok).
    """

    name: str
    dtype: str
    error: float
    ratio: float
    ok: bool
    message: str = ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compare(actual: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
            name: str = "output", factor: float = 2.0) -> Comparison:
    """Hold ``actual`` to the fp32 reference by the rule of this module.

    Args:
        actual: the kernel's result, fp32 | fp16 | bf16, any device.
        ref_fp32: the eager reference in fp32, same shape (moved to ``actual``'s device for the comparison).
        ref_lowp: the eager reference run in ``actual``'s dtype on the same inputs; needed for fp16 / bf16.
        name: names the tensor in the record and its message.
        factor: the multiple of PyTorch's own low-precision error allowed (2 for ops; the model tests use 3,
            their gradients pass through many more roundings).

    Returns:
        a :class:`Comparison`; ``ok`` False for a shape mismatch, a non-finite value or an error over the bound.

    Raises:
        KeyError: ``actual`` has a dtype without a tolerance (not fp32 / fp16 / bf16).
        ValueError: ``actual`` is fp16 / bf16 and ``ref_lowp`` is None.
    """
    tol = TOLERANCES[actual.dtype]
    dt = _dtype_name(actual.dtype)
    if tuple(actual.shape) != tuple(ref_fp32.shape):
        return Comparison(name, dt, float("inf"), float("inf"), False,
                          f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref_fp32.shape)}")
    if not bool(torch.isfinite(actual).all()):
        return Comparison(name, dt, float("inf"), float("inf"), False, f"{name}: non-finite values")
    a = actual.float()
    r = ref_fp32.to(device=a.device, dtype=torch.float32)
    diff = (a - r).abs()
    err = diff.max().item() if diff.numel() else 0.0
    scale = max(1.0, r.abs().max().item() if r.numel() else 0.0)
    if actual.dtype == torch.float32:
        allowed = tol["atol"] * scale + tol["rtol"] * r.abs()
        ratio = (diff / allowed).max().item() if diff.numel() else 0.0
        ok = ratio <= 1.0
        msg = "" if ok else (f"{name}: max error {err:.3e}, {ratio:.2f}x the allowed atol {tol['atol']:.1e} x "
                             f"{scale:.3g} + rtol {tol['rtol']:.1e} x |ref|")
        return Comparison(name, dt, err, ratio, ok, msg)
    if ref_lowp is None:
        raise ValueError(f"{name}: a {dt} result needs ref_lowp, the reference run in {dt}")
    base = (ref_lowp.to(device=a.device, dtype=torch.float32) - r).abs()
    base = base.max().item() if base.numel() else 0.0
    bound = factor * base + tol["atol"] * scale
    ratio = err / bound
    ok = err <= bound
    msg = "" if ok else (f"{name}: max error {err:.3e} > {factor} x torch's {dt} error {base:.3e} + atol "
                         f"(bound {bound:.3e})")
    return Comparison(name, dt, err, ratio, ok, msg)


@contextlib.contextmanager
def fp32_reference_math():
    """Inside the block, CUDA fp32 matmuls and convolutions run in full fp32 (TF32 off), as an fp32 reference
    must; the previous settings are restored on exit. No effect on CPU math."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def fwd_bwd(fn: Callable, inputs: Sequence[torch.Tensor | None], grad_out: torch.Tensor | None = None,
            dtype: torch.dtype | None = None, **kwargs) -> tuple[torch.Tensor, list]:
    """Run ``fn(*inputs, **kwargs)`` on fresh leaf copies of ``inputs`` and backpropagate.

    Args:
        fn: the function (an op or its reference).
        inputs: tensors (each copied, cast to ``dtype`` when given, and made a leaf that requires grad when
            floating) or None (passed through).
        grad_out: the output gradient (cast to the output's dtype and device); None: the gradient of ``out.sum()``.
        dtype: the dtype to run in; None keeps each input's.
        kwargs: passed to ``fn``.

    Returns:
        (output detached, [gradient of each input, or None]).
    """
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(t.is_floating_point())
              for t in inputs]
    out = fn(*leaves, **kwargs)
    if grad_out is None:
        out.sum().backward()
    else:
        out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def compare_fwd_bwd(fn: Callable, ref_fn: Callable, inputs: Sequence[torch.Tensor | None], dtype: torch.dtype,
                    names: Sequence[str], grad_out: torch.Tensor | None = None, ref_device: str | torch.device = "cpu",
                    **kwargs) -> tuple[torch.Tensor, list[Comparison]]:
    """Hold ``fn`` run in ``dtype`` to ``ref_fn`` run in fp32: the output and every input gradient.

    Args:
        fn: the op under test. ref_fn: its eager reference (same arguments).
        inputs: the op's tensor arguments (None for an absent optional one), on the op's device.
        dtype: the dtype ``fn`` runs in (fp32 | fp16 | bf16).
        names: one name per input, for the records.
        grad_out: the output gradient; None draws a standard normal one shaped like the output.
        ref_device: where the references run ("cpu", or the op's CUDA device: then in full fp32, TF32 off).
        kwargs: passed to both functions.

    Returns:
        (the op's output, [Comparison of "output", then of "grad <name>" per input that has a gradient]). An input
        whose reference gradient is None must get None from ``fn`` too (else a failing record).
    """
    ref_inputs = [None if t is None else t.to(ref_device) for t in inputs]
    if grad_out is None:
        with torch.no_grad(), fp32_reference_math():
            grad_out = torch.randn_like(ref_fn(*[None if t is None else t.float() for t in ref_inputs], **kwargs))
    out, grads = fwd_bwd(fn, inputs, grad_out, dtype, **kwargs)
    with fp32_reference_math():
        ref, ref_grads = fwd_bwd(ref_fn, ref_inputs, grad_out, torch.float32, **kwargs)
        lowp, lowp_grads = None, [None] * len(inputs)
        if dtype != torch.float32:
            lowp, lowp_grads = fwd_bwd(ref_fn, ref_inputs, grad_out, dtype, **kwargs)
    results = [compare(out, ref, lowp, name="output")]
    for name, g, rg, lg in zip(names, grads, ref_grads, lowp_grads):
        if rg is None:
            if g is not None:
                results.append(Comparison(f"grad {name}", _dtype_name(dtype), float("inf"), float("inf"), False,
                                          f"grad {name}: should be None (the reference has none)"))
            continue
        if g is None:
            results.append(Comparison(f"grad {name}", _dtype_name(dtype), float("inf"), float("inf"), False,
                                      f"grad {name}: missing (the reference has one)"))
            continue
        results.append(compare(g, rg, lg, name=f"grad {name}"))
    return out, results
