"""Shared test utilities: per-dtype tolerances in one place (STYLE.md item 8) and the flash-attention rule for
low precision: the kernel's error against an fp32 reference may be at most 2x PyTorch's own low-precision error
at the same inputs, plus a small atol."""

from __future__ import annotations

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
