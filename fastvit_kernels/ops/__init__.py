"""The public differentiable ops. Each checks its inputs, picks a backend (Triton kernels or the eager
reference) and, on the Triton path, calls a ``torch.library.custom_op`` (``fastvit::*``) with a fake
implementation and an autograd formula, so the ops work under ``torch.compile`` and ``torch.library.opcheck``.
Each custom op's implementation runs under its inputs' device (:func:`fastvit_kernels._device.on_device`), so the
kernels launch on that device and its current stream whichever device is current.

* :func:`patch_embed` — fused patch embedding + class token + position add.
* :func:`attention` — flash-style multi-head attention on the packed qkv tensor (also packed variable-length
  sequences with ``cu_seqlens`` and padded batches with a key-padding mask).
* :func:`patch_embed_tokens` — embedding of pre-patchified tokens (NaFlex) with token selection, mask token and
  per-token position rows.
* :func:`layernorm_mlp` — ``x + fc2(GELU(fc1(LayerNorm(x))))`` (or RMSNorm).
* :func:`swiglu_mlp` — ``x + fc2(hnorm(silu(gate) * up))``, ``(gate, up) = fc1(norm(x))`` (timm's SwiGLU /
  SwiGLUPacked, LayerNorm or RMSNorm, optional hidden LayerNorm).
* :func:`layernorm_linear` / :func:`linear_residual` — ``Linear(LayerNorm(x))`` and ``residual + Linear(x)``.
* :func:`attention_block` — ``x + proj(MSA(LayerNorm(x)))``, the three above as one op (the residual's gradient
  added inside the LayerNorm backward).

Instrumentation: every op above runs inside :func:`fastvit_kernels.ops._instrument.op_scope` of its name, and
:func:`attention_block` reports its three phases the same way, for an observer installed with
:func:`fastvit_kernels.ops._instrument.observing` (the training-step profiler); without one, a scope costs one global
check.

FLOPs: each op module defines its op's model-FLOP count (``linear_flops``, ``attention_flops``, ``mlp_flops``,
``swiglu_mlp_flops``, ``patch_embed_flops``, ``patch_embed_tokens_flops``) and the ``FlopCounterMode`` formulas of its ``fastvit::*`` custom ops
(``FLOP_FORMULAS``); :func:`flop_formulas` collects them and :func:`register_flop_formulas` hands them to
``torch.utils.flop_counter``.
"""

from __future__ import annotations

import sys

import torch

from .attention import FLOP_FORMULAS as _ATTENTION_FLOPS
from .attention import attention
from .attention_block import FLOP_FORMULAS as _ATTENTION_BLOCK_FLOPS
from .attention_block import attention_block
from .layernorm_mlp import FLOP_FORMULAS as _LAYERNORM_MLP_FLOPS
from .layernorm_mlp import layernorm_mlp
from .linear import FLOP_FORMULAS as _LINEAR_FLOPS
from .linear import layernorm_linear, linear_residual
from .patch_embed import FLOP_FORMULAS as _PATCH_EMBED_FLOPS
from .patch_embed import patch_embed
from .patch_tokens import FLOP_FORMULAS as _PATCH_TOKENS_FLOPS
from .patch_tokens import patch_embed_tokens
from .swiglu_mlp import FLOP_FORMULAS as _SWIGLU_MLP_FLOPS
from .swiglu_mlp import swiglu_mlp

__all__ = ["attention", "attention_block", "flop_formulas", "layernorm_linear", "layernorm_mlp", "linear_residual",
           "patch_embed", "patch_embed_tokens", "register_flop_formulas", "swiglu_mlp"]

_FLOP_COUNTER = "torch.utils.flop_counter"
# op name -> formula, from the modules that define the ops
_FLOP_TABLE = {**_PATCH_EMBED_FLOPS, **_ATTENTION_FLOPS, **_LINEAR_FLOPS, **_ATTENTION_BLOCK_FLOPS,
               **_LAYERNORM_MLP_FLOPS, **_SWIGLU_MLP_FLOPS, **_PATCH_TOKENS_FLOPS}


def flop_formulas() -> dict:
    """The ``FlopCounterMode`` formulas of every ``fastvit::*`` custom op: {``torch.ops.fastvit.<op>``: formula}.

    Each formula takes the op's arguments with tensors replaced by their shapes (torch.utils.flop_counter's
    convention) and returns model FLOPs as an int: 2 per multiply-add, matmuls only, backward = 2x forward (the
    patch embedding's backward: the weight-gradient GEMM, plus the image-gradient GEMM only when it runs). Usable
    as ``FlopCounterMode(custom_mapping=flop_formulas())`` without touching torch's global registry.
    """
    return {getattr(torch.ops.fastvit, name): formula for name, formula in _FLOP_TABLE.items()}


def register_flop_formulas(only_if_loaded: bool = False) -> list[str]:
    """Register :func:`flop_formulas` with ``torch.utils.flop_counter`` so that every later ``FlopCounterMode``
    counts the ``fastvit::*`` ops (a mode copies the registry when it is constructed).

    Called when this package is imported and when a :class:`~fastvit_kernels.FastViT` is built, each time with
    ``only_if_loaded=True``: the formulas are registered as soon as anything has imported
    ``torch.utils.flop_counter``, and the package never imports it (it imports triton) on its own.

    Args:
        only_if_loaded: True: do nothing unless ``torch.utils.flop_counter`` is already imported. False: import it
            (and so triton, when installed) if needed.

    Returns:
        The names of the ops registered by this call (idempotent: already registered ops are skipped; empty when
        nothing was registered).
    """
    if only_if_loaded and _FLOP_COUNTER not in sys.modules:
        return []
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    done = []
    for name, formula in _FLOP_TABLE.items():
        packet = getattr(torch.ops.fastvit, name)
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)
            done.append(name)
    return done


register_flop_formulas(only_if_loaded=True)
