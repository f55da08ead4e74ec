"""Input checks shared by the public ops: each raises before any kernel launches, naming the argument and the
expected and actual shape / dtype / device (docs/design.md, "Conventions")."""

from __future__ import annotations

from typing import Sequence

import torch

from ._library import cpp_serves_cpu
from .backend import launches_recorded as _launches_recorded

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, shape: Sequence[int | None] | None = None, what: str | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``t`` is a floating tensor of ``shape`` (None = any size).

    Args:
        name: the argument's name, used in the message.
        t: the value to check.
        shape: expected sizes per dim, None for a free dim; None skips the shape check.
        what: how the expected shape reads in the message, e.g. ``"(B, N, 3*D)"``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
    if shape is None:
        return
    ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
    if not ok:
        want = what or str(tuple("*" if s is None else s for s in shape))
        raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every tensor in ``others`` has ``ref``'s dtype and device.

    Mixed dtypes are an error rather than a silent cast: under ``torch.autocast`` the ops cast for you.
    """
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
        if t.dtype != ref.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
                "use one dtype for activations and weights (or torch.autocast)"
            )


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple:
    """Cast floating tensors to the autocast dtype when ``torch.autocast`` is active on their device.

    The custom ops are opaque to autocast, so the public wrappers apply its policy themselves (GEMM-like ops
    run in the low-precision dtype). Returns the tensors unchanged when autocast is off.
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    dev = first.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):  # meta (shape-only) tensors: torch has no autocast there
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dtype) if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype) else t
        for t in tensors
    )


def check_triton_dtype(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` for bfloat16 under the Triton interpreter, which mis-handles it (adds bit patterns).
    While launches are only recorded (:func:`fastvit_kernels.backend.launches_recorded`: nothing is interpreted)
    bfloat16 CPU tensors pass, as they do when the C++ library's CPU kernels serve the CPU
    (:func:`fastvit_kernels._library.cpp_serves_cpu`)."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16 and not _launches_recorded() and not cpp_serves_cpu():
        raise TypeError(
            f"{name} is bfloat16 on the CPU: the Triton interpreter does not support bfloat16; "
            "use float32/float16 there, backend='torch', or a GPU"
        )


def check_layernorm_input(x, norm_weight, norm_bias, eps: float) -> int:
    """Checks shared by the LayerNorm-prologue ops: x (B, N, D) (at least 2-D, floating), norm_weight and
    norm_bias (D,), eps > 0. Returns D.

    Raises:
        TypeError / ValueError: as :func:`check_tensor`; eps <= 0.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, N, D) (at least 2-D); got {tuple(x.shape)}")
    D = x.shape[-1]
    check_tensor("norm_weight", norm_weight, (D,), f"(D={D},)")
    check_tensor("norm_bias", norm_bias, (D,), f"(D={D},)")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    return D


def check_norm_input(x, norm_weight, norm_bias, eps: float, norm: str = "layernorm") -> int:
    """Checks shared by the ops whose pre-norm is a LayerNorm or an RMSNorm: ``norm`` is "layernorm" or
    "rmsnorm"; x (B, N, D) (at least 2-D, floating); norm_weight (D,); norm_bias (D,) or None (a norm without
    bias, as timm's RmsNorm); eps > 0. Returns D.

    Raises:
        TypeError / ValueError: as :func:`check_tensor`; eps <= 0; another ``norm``.
    """
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm'; got {norm!r}")
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, N, D) (at least 2-D); got {tuple(x.shape)}")
    D = x.shape[-1]
    check_tensor("norm_weight", norm_weight, (D,), f"(D={D},)")
    if norm_bias is not None:
        check_tensor("norm_bias", norm_bias, (D,), f"(D={D},)")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    return D


def check_gelu_approximate(approximate: str) -> bool:
    """Whether PyTorch's GELU ``approximate`` argument asks for the tanh form ("tanh" -> True, "none" -> False).

    Raises:
        ValueError: any other value (names the argument and the value).
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh' (as torch.nn.GELU); got {approximate!r}")
    return approximate == "tanh"
