"""Activation memory kept for backward, counted exactly from the autograd graph (a measurement that runs
anywhere, the CPU interpreter included): every tensor saved for backward while ``fn`` runs is seen through
``torch.autograd.graph.saved_tensors_hooks``; the bytes are those of the distinct storages they live in, leaving
out the storages of the parameters (weights are kept whatever the implementation)."""

from __future__ import annotations

import torch


def saved_activation_bytes(fn, *args, params=(), **kwargs) -> int:
    """Bytes of device memory that ``fn(*args, **kwargs)`` keeps alive for its backward, parameters excluded.

    Args:
        fn: the differentiable function (an op, a model's forward); its inputs must require grad where a
            gradient is wanted, or nothing is saved.
        params: tensors whose storages are not counted (weights, biases, LayerNorm affine).

    Returns:
        The summed ``nbytes`` of the distinct untyped storages of the saved tensors (a saved view counts its whole
        storage once: that is what stays allocated), in bytes.

    Raises:
        Whatever ``fn`` raises. Source: PyTorch's saved-tensor hooks (``torch.autograd.graph``), the mechanism
        activation-offloading / checkpointing tools use to see what backward keeps.
    """
    skip = {_storage_key(p) for p in params}
    seen: dict = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())
