"""The fused forms of a pre-norm block's two halves that FastViT's and FastEva's blocks share: which op computes
``norm1 + qkv (+ RoPE)`` and ``[x +] MLP(norm2(x))`` for the norm / MLP modules a block holds, or None where no
fused op covers that combination (the block then runs its eager modules)."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops, reference


class BlocksBackend:
    """Mixin of FastViT and FastEva: ``backend``, the backend ("auto" | "triton" | "torch" | None) every op of the
    model is asked for; setting it sets each block's (``self.blocks``)."""

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        for blk in self.blocks:
            blk.backend = value


def norm_kind(norm: nn.Module) -> str | None:
    """"layernorm" or "rmsnorm" for an affine ``nn.LayerNorm`` / :class:`~fastvit_kernels.reference.RmsNorm` (the
    norms the fused ops apply in a GEMM prologue), else None."""
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        return "layernorm"
    if isinstance(norm, reference.RmsNorm) and norm.weight is not None:
        return "rmsnorm"
    return None


def norm_qkv(x: torch.Tensor, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
             rope=None, backend: str | None = None) -> torch.Tensor | None:
    """``qkv(norm(x))``, with q and k rotated by ``rope`` (a :class:`fastvit_kernels.rope.RopeTable`) when given,
    as one ``ops.layernorm_linear`` (norm in the GEMM prologue, RoPE in its epilogue): x (B, N, D) -> (B, N, 3 D);
    None when ``norm`` is not one the op applies."""
    kind = norm_kind(norm)
    if kind is None:
        return None
    kw = {} if rope is None else dict(rope_coords=rope.coords, rope_freqs=rope.freqs, rope_heads=num_heads,
                                      rope_layout=rope.layout)
    return ops.layernorm_linear(x, norm.weight, getattr(norm, "bias", None), weight, bias, norm.eps, norm=kind,
                                backend=backend, **kw)


def folds_layer_scale(x: torch.Tensor) -> bool:
    """Whether a LayerScale ``gamma`` (D,) on a residual branch ending in a Linear is folded into that Linear here:
    ``x + gamma * (h W^T + b) = x + h (gamma W)^T + gamma b`` (CaiT's LayerScale, Touvron et al. 2021), so the
    residual add stays in the GEMM epilogue and the branch output is never stored or re-read (the scaled weight is a
    (D, K) product, the activations (M, D)); autograd takes gamma's and W's gradients through the product. Not in
    fp16 compute (the input's dtype, or the autocast dtype when autocast is on for x's device): gamma W with
    LayerScale's 1e-5 initialisation falls among fp16's subnormals, so those blocks keep the eager scale."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return dtype != torch.float16


def scaled_linear(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Linear ``(gamma[:, None] * weight, gamma * bias)`` whose output is gamma times the original's: weight
    (D, K), bias (D,) or None, gamma (D,) (see :func:`folds_layer_scale`)."""
    return weight * gamma[:, None], None if bias is None else bias * gamma


def norm_mlp(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, add_residual: bool,
             backend: str | None = None, layer_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[x +] mlp(norm(x))`` (``x + layer_scale * mlp(norm(x))`` with a LayerScale gamma (D,), folded into fc2:
    :func:`scaled_linear`) as one fused op, (B, N, D) -> (B, N, D), or None when no op covers the pair:

    * a GELU :class:`~fastvit_kernels.reference.Mlp` without an inner norm: ``ops.layernorm_mlp``;
    * a SiLU-gated :class:`~fastvit_kernels.reference.SwiGLU` (separate gate / up layers) or
      :class:`~fastvit_kernels.reference.GluMlp` with the gate first (timm's ``SwiGLUPacked``), optionally with
      a LayerNorm over the hidden activations (EVA-02's ``scale_mlp``): ``ops.swiglu_mlp``;

    each after a LayerNorm or an RMSNorm (``norm``)."""
    kind = norm_kind(norm)
    if kind is None:
        return None
    nb = getattr(norm, "bias", None)
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias
    if layer_scale is not None:
        w2, b2 = scaled_linear(w2, b2, layer_scale)
    if type(mlp) is reference.Mlp and isinstance(mlp.act, nn.GELU) and isinstance(mlp.norm, nn.Identity):
        return ops.layernorm_mlp(x, norm.weight, nb, mlp.fc1.weight, mlp.fc1.bias, w2, b2,
                                 norm.eps, add_residual=add_residual, approximate=mlp.act.approximate, norm=kind,
                                 backend=backend)
    hidden = mlp.norm if isinstance(mlp, (reference.SwiGLU, reference.GluMlp)) else None
    if hidden is None or not isinstance(mlp.act, nn.SiLU):
        return None
    if not isinstance(hidden, nn.Identity) and norm_kind(hidden) != "layernorm":
        return None  # the op's hidden norm is a LayerNorm
    if isinstance(mlp, reference.SwiGLU):
        gate, up = mlp.fc1_g, mlp.fc1_x
        gw, gb, uw, ub = gate.weight, gate.bias, up.weight, up.bias
    elif not mlp.gate_last:  # packed (2 D_hidden, D) fc1, gate rows first
        gw, gb, uw, ub = mlp.fc1.weight, mlp.fc1.bias, None, None
    else:
        return None
    hn = dict(hidden_norm_weight=hidden.weight, hidden_norm_bias=hidden.bias, hidden_norm_eps=hidden.eps) \
        if not isinstance(hidden, nn.Identity) else {}
    return ops.swiglu_mlp(x, norm.weight, nb, gw, gb, uw, ub, w2, b2, norm.eps, norm=kind,
                          add_residual=add_residual, backend=backend, **hn)


def mlp_or_eager(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, add_residual: bool,
                 backend: str | None = None) -> torch.Tensor:
    """``[x +] mlp(norm(x))``, (B, N, D) -> (B, N, D): the fused op of :func:`norm_mlp` where one covers the pair,
    else the eager modules."""
    y = norm_mlp(x, norm, mlp, add_residual, backend)
    if y is not None:
        return y
    y = mlp(norm(x))
    return x + y if add_residual else y
