"""The public differentiable ops. Each checks its inputs, picks a backend (Triton kernels or the eager
reference) and, on the Triton path, calls a ``torch.library.custom_op`` (``fastvit::*``) with a fake
implementation and an autograd formula, so the ops work under ``torch.compile`` and ``torch.library.opcheck``.
Each custom op's implementation runs under its inputs' device (:func:`fastvit_kernels._device.on_device`), so the
kernels launch on that device and its current stream whichever device is current.

* :func:`patch_embed` — fused patch embedding + class token + position add.
* :func:`attention` — flash-style multi-head attention on the packed qkv tensor.
* :func:`layernorm_mlp` — ``x + fc2(GELU(fc1(LayerNorm(x))))``.
* :func:`layernorm_linear` / :func:`linear_residual` — ``Linear(LayerNorm(x))`` and ``residual + Linear(x)``.
* :func:`attention_block` — ``x + proj(MSA(LayerNorm(x)))``, the three above as one op (the residual's gradient
  added inside the LayerNorm backward).
"""

from .attention import attention
from .attention_block import attention_block
from .layernorm_mlp import layernorm_mlp
from .linear import layernorm_linear, linear_residual
from .patch_embed import patch_embed

__all__ = ["attention", "attention_block", "layernorm_linear", "layernorm_mlp", "linear_residual", "patch_embed"]

# FLOP formulas of the fastvit:: custom ops for torch.utils.flop_counter (registered when that module loads:
# it imports triton, so it is not imported here)
from ..bench.flops import install_flop_formulas as _install_flop_formulas  # noqa: E402

_install_flop_formulas()
