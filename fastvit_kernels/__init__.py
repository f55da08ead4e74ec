"""fastvit_kernels: Triton kernels for Vision Transformer training and inference.

``FastViT`` is a drop-in for timm's ``VisionTransformer`` (same constructor arguments and state_dict keys) whose
patch embedding, attention and LayerNorm + GELU-MLP run on this package's Triton kernels; ``FastEva`` the same for
timm's ``Eva`` (EVA-02, DINOv3, PE; RoPE in :mod:`fastvit_kernels.rope`); ``FastNaFlexVit`` for timm's
``NaFlexVit`` (native-resolution batches run as packed variable-length sequences); ``fastvit_kernels.ops``
holds the differentiable ops; ``fastvit_kernels.reference`` the eager PyTorch spec. Importing this package
neither imports triton nor queries a GPU.
"""

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .configs import MODEL_CONFIGS  # noqa: E402
from .eva import FastEva  # noqa: E402
from .model import FastViT, create_model, from_timm  # noqa: E402
from .naflex import FastNaFlexVit  # noqa: E402
from .reference import resample_abs_pos_embed, resample_state_dict  # noqa: E402

__all__ = ["FastViT", "FastEva", "FastNaFlexVit", "create_model", "from_timm", "MODEL_CONFIGS", "ops", "reference",
           "resample_abs_pos_embed", "resample_state_dict"]
