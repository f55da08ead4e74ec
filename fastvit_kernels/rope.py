"""2-D rotary position embeddings (RoPE) for ViTs: the host side of the rotation the qkv GEMM applies.

A rotation is described by a :class:`RopeTable` ``(coords, freqs, layout)`` and applied by
:func:`fastvit_kernels.reference.rope_ref` (re-exported here; the fused ``ops.layernorm_linear(...,
rope_coords=, rope_freqs=, rope_heads=, rope_layout=)`` takes the same three): on the q and k sections of a packed
qkv (..., 3 D), for token row m, head h, pair j of head_dim / 2,

    theta = coords[m % Nc, 0] * freqs[h or 0, j, 0] + coords[m % Nc, 1] * freqs[h or 0, j, 1]
    out[a] = x[a] cos(theta) - x[b] sin(theta),   out[b] = x[b] cos(theta) + x[a] sin(theta)

with pairs (a, b) = (2j, 2j + 1) ("interleaved") or (j, j + head_dim / 2) ("half").

* ``coords``: (Nc, 2) fp32, per token (y, x) (row, column of the patch grid in the model's units); prefix tokens
  (class / register) get (0, 0), so they are not rotated. For a dense batch Nc = N tokens per image.
* ``freqs``: (Hr, head_dim / 2, 2) fp32 angular frequencies for (y, x); Hr = 1 (every head alike) or H.

The modules below compute timm's three 2-D RoPE families as such tables (their constructor arguments and, for
the learnable one, parameter names are timm's), and :func:`rope_from_timm` converts a timm rope module:

* :class:`AxialRope` -- timm ``RotaryEmbeddingCat`` (EVA-02, Fang et al. 2023; PE, Bolya et al. 2025): the first
  head_dim / 4 pairs rotate with the first grid axis, the rest with the second, bands
  ``temperature ** (-i / (head_dim / 4))`` (or pixel bands); positions scaled to ``ref_feat_shape`` and shifted
  by ``grid_offset``; ``grid_indexing="xy"`` swaps which axis comes first. Hr = 1.
* :class:`MixedRope` -- timm ``RotaryEmbeddingMixed`` (RoPE-Mixed, Heo et al. 2024): learnable per-block, per-head
  frequencies for both axes (parameter ``freqs`` (2, depth, H, head_dim / 2)); one table per block, built from
  the parameter on every call so gradients reach it. Hr = H, layout "interleaved".
* :class:`DinoV3Rope` -- timm ``RotaryEmbeddingDinoV3`` (DINOv3, Simeoni et al. 2025): 0.5-centred positions
  normalised to [-1, 1], periods ``temperature ** (2 i / (head_dim / 2))`` (or min / max periods),
  ``theta = 2 pi pos / period``. Hr = 1, layout "half" by default.

All three apply timm's training-time coordinate augmentation (``shift_coords``, ``jitter_coords``,
``rescale_coords``) in training mode, with timm's draws in timm's order (one transform per call).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from .reference import ROPE_LAYOUTS, rope_ref

__all__ = ["RopeTable", "rope_ref", "AxialRope", "MixedRope", "DinoV3Rope", "rope_from_timm", "grid_coords",
           "augment_coords", "with_prefix", "ROPE_LAYOUTS"]


class RopeTable(NamedTuple):
    """One rotation: ``coords`` (Nc, 2) fp32 per-token (y, x), ``freqs`` (Hr, head_dim / 2, 2) fp32, ``layout``
    "interleaved" | "half" (see the module docstring)."""

    coords: torch.Tensor
    freqs: torch.Tensor
    layout: str

    def apply(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """:func:`rope_ref` of ``qkv`` (..., 3 D) with this table."""
        return rope_ref(qkv, self.coords, self.freqs, num_heads, self.layout)


# ----------------------------------------------------------------------------------------------------------------
# coordinates
# ----------------------------------------------------------------------------------------------------------------
def grid_coords(grid_size: Sequence[int], grid_type: str = "index", ref_feat_shape: Sequence[int] | None = None,
                grid_offset: float = 0.0, normalize_coords: str = "separate", device=None) -> torch.Tensor:
    """Per-patch (y, x) positions of a (gh, gw) grid, row-major: (gh * gw, 2) fp32.

    Per axis of size s (reference size r): "index": ``i + grid_offset``; "pixel": ``linspace(-1, 1, s)``;
    "centered": ``(i + 0.5 + grid_offset) / d`` with d = s ("separate"), or the min / max grid side, then mapped
    ``2 c - 1`` after the ``ref_feat_shape`` scaling ``c / s * r`` (which applies to every type). The same fp32
    operations, in the same order, as timm's ``_build_grid``.

    Raises:
        ValueError: an unknown grid_type / normalize_coords, or a grid that is not 2-D.
    """
    if len(grid_size) != 2:
        raise ValueError(f"grid_size must be (gh, gw); got {tuple(grid_size)}")
    sizes = [int(s) for s in grid_size]
    if grid_type == "pixel":
        t = [torch.linspace(-1.0, 1.0, steps=s, device=device, dtype=torch.float32) for s in sizes]
    elif grid_type == "centered":
        denom = {"separate": [float(s) for s in sizes], "max": [float(max(sizes))] * 2,
                 "min": [float(min(sizes))] * 2}.get(normalize_coords)
        if denom is None:
            raise ValueError(f"normalize_coords must be 'separate', 'min' or 'max'; got {normalize_coords!r}")
        t = [(torch.arange(0.5, s, device=device, dtype=torch.float32) + grid_offset) / d for s, d in zip(sizes, denom)]
    elif grid_type == "index":
        t = [torch.arange(s, device=device, dtype=torch.int64).to(torch.float32) + grid_offset for s in sizes]
    else:
        raise ValueError(f"grid_type must be 'index', 'pixel' or 'centered'; got {grid_type!r}")
    if ref_feat_shape is not None:
        t = [v / s * r for v, s, r in zip(t, sizes, ref_feat_shape)]
    coords = torch.stack(torch.meshgrid(t[0], t[1], indexing="ij"), dim=-1).reshape(-1, 2)
    return 2.0 * coords - 1.0 if grid_type == "centered" else coords


def _check_aug(name: str, value, minimum: float):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}; got {value}")
    return value


def augment_coords(coords: torch.Tensor, shift: float | None = None, jitter: float | None = None,
                   rescale: float | None = None, grid_indexing: str = "ij") -> torch.Tensor:
    """timm's training-time RoPE coordinate augmentation (DINOv3's): one transform for every position.

    ``c += U(-shift, shift)`` per axis, then ``c *= exp(U(-log J, log J))`` per axis, then
    ``c *= exp(U(-log R, log R))`` (one factor), drawn in that order on coords' device and dtype, per axis in
    timm's channel order (x first when ``grid_indexing == "xy"``), so the same RNG state gives timm's transform.

    Args:
        coords: (Nc, 2) (y, x). shift >= 0, jitter >= 1, rescale >= 1 or None (not applied).

    Returns:
        (Nc, 2), a new tensor.
    """
    shift, jitter = _check_aug("shift_coords", shift, 0.0), _check_aug("jitter_coords", jitter, 1.0)
    rescale = _check_aug("rescale_coords", rescale, 1.0)
    c = coords.flip(-1) if grid_indexing == "xy" else coords  # timm's channel order
    opts = dict(device=c.device, dtype=c.dtype)
    if shift is not None:
        c = c + torch.empty(2, **opts).uniform_(-shift, shift)[None, :]
    if jitter is not None:
        c = c * torch.empty(2, **opts).uniform_(-math.log(jitter), math.log(jitter)).exp()[None, :]
    if rescale is not None:
        c = c * torch.empty(1, **opts).uniform_(-math.log(rescale), math.log(rescale)).exp()
    return c.flip(-1) if grid_indexing == "xy" else c


def with_prefix(coords: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Prepend ``num_prefix_tokens`` rows of (0, 0) (class / register tokens: not rotated)."""
    if not num_prefix_tokens:
        return coords
    return torch.cat([coords.new_zeros(num_prefix_tokens, 2), coords], dim=0)


def _axial_freqs(bands: torch.Tensor, grid_indexing: str) -> torch.Tensor:
    """(1, 2 * nb, 2): pairs [0, nb) rotate with timm's first grid channel (y for "ij", x for "xy"), the rest with
    the second, each with ``bands``."""
    nb = bands.shape[0]
    freqs = bands.new_zeros(1, 2 * nb, 2)
    first, second = (0, 1) if grid_indexing == "ij" else (1, 0)
    freqs[0, :nb, first] = bands
    freqs[0, nb:, second] = bands
    return freqs


def _check_indexing(grid_indexing: str) -> None:
    if grid_indexing not in ("ij", "xy"):
        raise ValueError(f"grid_indexing must be 'ij' or 'xy'; got {grid_indexing!r}")


class _AugMixin:
    def _init_aug(self, shift_coords, jitter_coords, rescale_coords) -> None:
        self.shift_coords = _check_aug("shift_coords", shift_coords, 0.0)
        self.jitter_coords = _check_aug("jitter_coords", jitter_coords, 1.0)
        self.rescale_coords = _check_aug("rescale_coords", rescale_coords, 1.0)
        self.aug_active = any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def _maybe_augment(self, coords: torch.Tensor) -> torch.Tensor:
        if self.training and self.aug_active:
            return augment_coords(coords, self.shift_coords, self.jitter_coords, self.rescale_coords,
                                  self.grid_indexing)
        return coords


# ----------------------------------------------------------------------------------------------------------------
# the three families
# ----------------------------------------------------------------------------------------------------------------
class AxialRope(_AugMixin, nn.Module):
    """Axial 2-D RoPE as timm's ``RotaryEmbeddingCat`` (EVA-02, Fang et al. 2023; PE, Bolya et al. 2025).

    Args (timm's): dim (head_dim, a multiple of 4), max_res, temperature, in_pixels (pixel bands
    ``pi * linspace(1, max_res / 2, head_dim / 4)`` (linear_bands) or ``pi * 2 ** linspace(0, log2(max_res) - 1,
    head_dim / 4)``, on a [-1, 1] "pixel" grid; else bands ``temperature ** (-i / (head_dim / 4))`` on the
    "index" grid), linear_bands, ref_feat_shape (positions scaled so the grid spans the reference shape),
    grid_offset, grid_indexing ("ij" | "xy": which axis the first head_dim / 4 pairs follow), rotate_half (layout
    "half"; else "interleaved"), grid_type, normalize_coords, shift_coords / jitter_coords / rescale_coords
    (training only). ``feat_shape`` is accepted and ignored (tables are built for the grid asked for).

    No parameters or persistent buffers (as timm).

    Raises:
        ValueError: dim not a positive multiple of 4, a bad grid_indexing / grid_type, bad augmentation values.
    """

    def __init__(self, dim: int, max_res: int = 224, temperature: float = 10000.0, in_pixels: bool = True,
                 linear_bands: bool = False, feat_shape=None, ref_feat_shape=None, grid_offset: float = 0.0,
                 grid_indexing: str = "ij", rotate_half: bool = False, grid_type: str | None = None,
                 normalize_coords: str = "separate", shift_coords=None, jitter_coords=None, rescale_coords=None):
        super().__init__()
        if dim <= 0 or dim % 4:
            raise ValueError(f"axial RoPE needs head_dim divisible by 4; got {dim}")
        _check_indexing(grid_indexing)
        self.dim, self.max_res, self.temperature = dim, max_res, temperature
        self.in_pixels, self.linear_bands = in_pixels, linear_bands
        self.ref_feat_shape = tuple(ref_feat_shape) if ref_feat_shape is not None else None
        self.grid_offset, self.grid_indexing, self.rotate_half = grid_offset, grid_indexing, rotate_half
        self.grid_type = grid_type if grid_type is not None else ("pixel" if in_pixels else "index")
        self.normalize_coords = normalize_coords
        self._init_aug(shift_coords, jitter_coords, rescale_coords)

    def bands(self) -> torch.Tensor:
        """(head_dim / 4,) fp32 on the CPU, with timm's fp32 operations."""
        nb = self.dim // 4
        if self.in_pixels:
            if self.linear_bands:
                b = torch.linspace(1.0, float(self.max_res) / 2, nb, dtype=torch.float32)
            else:
                b = 2 ** torch.linspace(0, math.log(float(self.max_res), 2) - 1, nb, dtype=torch.float32)
            return b * torch.pi
        exp = torch.arange(0, nb, 1, dtype=torch.int64).to(torch.float32) / nb
        return 1.0 / (float(self.temperature) ** exp)

    def tables(self, grid_size: Sequence[int], num_prefix_tokens: int = 0, device=None) -> RopeTable:
        """The table for a (gh, gw) patch grid after ``num_prefix_tokens`` prefix tokens: coords
        (prefix + gh * gw, 2), freqs (1, head_dim / 2, 2)."""
        coords = grid_coords(grid_size, self.grid_type, self.ref_feat_shape, self.grid_offset, self.normalize_coords,
                             device=device)
        coords = with_prefix(self._maybe_augment(coords), num_prefix_tokens)
        freqs = _axial_freqs(self.bands(), self.grid_indexing).to(device)
        return RopeTable(coords, freqs, "half" if self.rotate_half else "interleaved")


class MixedRope(_AugMixin, nn.Module):
    """Learnable mixed-frequency 2-D RoPE as timm's ``RotaryEmbeddingMixed`` (RoPE-Mixed, Heo et al. 2024).

    Args (timm's): dim (the embedding dim D; head_dim = D / num_heads, a multiple of 4), depth, num_heads,
        temperature (the initial magnitudes ``temperature ** (-4 i / head_dim)``), grid_indexing (timm's channel
        0 multiplies ``freqs[0]``: y for "ij", x for "xy"), shift_coords / jitter_coords / rescale_coords
        (training only). ``feat_shape`` is accepted and ignored.

    Parameter ``freqs`` (2, depth, H, head_dim / 2): per block and head, the frequencies of timm's grid channels
    0 and 1, initialised as timm (magnitudes rotated by a random angle per block and head).

    Raises:
        ValueError: head_dim not a multiple of 4, a bad grid_indexing.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, temperature: float = 10.0, feat_shape=None,
                 grid_indexing: str = "xy", shift_coords=None, jitter_coords=None, rescale_coords=None,
                 device=None, dtype=None):
        super().__init__()
        head_dim = dim // num_heads
        if head_dim % 4 or dim % num_heads:
            raise ValueError(f"mixed RoPE needs head_dim divisible by 4; got dim={dim}, num_heads={num_heads}")
        _check_indexing(grid_indexing)
        self.dim, self.depth, self.num_heads, self.temperature = dim, depth, num_heads, temperature
        self.grid_indexing = grid_indexing
        self._init_aug(shift_coords, jitter_coords, rescale_coords)
        dtype = torch.float32 if dtype is None else dtype
        mag = 1.0 / (temperature ** (torch.arange(0, head_dim, 4, device=device, dtype=dtype) / head_dim))
        angle = torch.rand(depth, num_heads, 1, device=device, dtype=dtype) * 2 * math.pi
        first = torch.cat([mag * torch.cos(angle), mag * torch.cos(angle + math.pi / 2)], dim=-1)
        second = torch.cat([mag * torch.sin(angle), mag * torch.sin(angle + math.pi / 2)], dim=-1)
        self.freqs = nn.Parameter(torch.stack([first, second]))  # (2, depth, H, head_dim / 2)

    def no_weight_decay(self) -> set:
        return {"freqs"}

    def tables(self, grid_size: Sequence[int], num_prefix_tokens: int = 0, device=None) -> list[RopeTable]:
        """One table per block: coords (prefix + gh * gw, 2) (shared), freqs (H, head_dim / 2, 2) fp32 built from
        the parameter (differentiable)."""
        device = self.freqs.device if device is None else device
        coords = with_prefix(self._maybe_augment(grid_coords(grid_size, device=device)), num_prefix_tokens)
        f = self.freqs.float()
        yx = torch.stack([f[0], f[1]] if self.grid_indexing == "ij" else [f[1], f[0]], dim=-1)  # (depth, H, P, 2)
        return [RopeTable(coords, yx[d], "interleaved") for d in range(self.depth)]


class DinoV3Rope(_AugMixin, nn.Module):
    """DINOv3's 2-D RoPE as timm's ``RotaryEmbeddingDinoV3`` (Simeoni et al. 2025).

    Args (timm's): dim (head_dim, a multiple of 4), temperature (periods ``temperature ** (2 i / (head_dim / 2))``)
        or min_period and max_period (``min * (max / min) ** linspace(0, 1, head_dim / 4)``), normalize_coords,
        grid_offset, grid_indexing, rotate_half (default True: layout "half"), shift_coords / jitter_coords /
        rescale_coords (training only; drawn on the CPU, as timm). ``feat_shape`` is accepted and ignored.

    The angle is ``2 pi pos / period`` with pos the "centered" grid in [-1, 1]; the table's freqs are
    ``2 pi / period`` (fp64, rounded once to fp32; timm divides in fp32, a difference of an ulp or two).

    Raises:
        ValueError: head_dim not a multiple of 4, neither temperature nor min / max periods, bad grid options.
    """

    def __init__(self, dim: int, temperature: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, feat_shape=None, normalize_coords: str = "separate",
                 grid_offset: float = 0.0, grid_indexing: str = "ij", rotate_half: bool = True, shift_coords=None,
                 jitter_coords=None, rescale_coords=None):
        super().__init__()
        if dim <= 0 or dim % 4:
            raise ValueError(f"DINOv3 RoPE needs head_dim divisible by 4; got {dim}")
        if (min_period is None or max_period is None) and temperature is None:
            raise ValueError("DinoV3Rope needs temperature or min_period and max_period")
        _check_indexing(grid_indexing)
        self.dim, self.temperature, self.min_period, self.max_period = dim, temperature, min_period, max_period
        self.normalize_coords, self.grid_offset, self.grid_indexing = normalize_coords, grid_offset, grid_indexing
        self.rotate_half = rotate_half
        self._init_aug(shift_coords, jitter_coords, rescale_coords)

    def periods(self) -> torch.Tensor:
        """(head_dim / 4,) fp32 on the CPU, with timm's fp32 operations."""
        nb = self.dim // 4
        if self.min_period is not None and self.max_period is not None:
            exponents = torch.linspace(0, 1, nb, dtype=torch.float32)
            return self.min_period * ((self.max_period / self.min_period) ** exponents)
        exponents = 2.0 * torch.arange(nb, dtype=torch.float32) / (self.dim // 2)
        return float(self.temperature) ** exponents

    def tables(self, grid_size: Sequence[int], num_prefix_tokens: int = 0, device=None) -> RopeTable:
        """The table for a (gh, gw) grid after ``num_prefix_tokens`` prefix tokens: coords (prefix + gh * gw, 2)
        in [-1, 1] (before augmentation), freqs (1, head_dim / 2, 2)."""
        coords = grid_coords(grid_size, "centered", None, self.grid_offset, self.normalize_coords)  # CPU, as timm
        coords = with_prefix(self._maybe_augment(coords), num_prefix_tokens).to(device)
        bands = (2 * math.pi / self.periods().double()).float()
        freqs = _axial_freqs(bands, self.grid_indexing).to(device)
        return RopeTable(coords, freqs, "half" if self.rotate_half else "interleaved")


def rope_from_timm(module: nn.Module) -> nn.Module:
    """The :class:`AxialRope` / :class:`MixedRope` / :class:`DinoV3Rope` equivalent of a timm rope module
    (``RotaryEmbeddingCat``, ``RotaryEmbeddingMixed``, ``RotaryEmbeddingDinoV3``), with its configuration, its
    training mode and (mixed) a copy of its ``freqs``; ``.tables(grid_size, num_prefix_tokens)`` then gives the
    table(s) whose :func:`rope_ref` equals timm's ``apply_rot_embed_cat(x, module.get_embed(grid_size))`` on the
    patch tokens.

    Raises:
        NotImplementedError: another rope class (e.g. ``RotaryEmbedding`` with separate sin / cos,
            ``RotaryEmbeddingMRope``).
    """
    name = type(module).__name__
    aug = dict(shift_coords=getattr(module, "shift_coords", None), jitter_coords=getattr(module, "jitter_coords", None),
               rescale_coords=getattr(module, "rescale_coords", None))
    if name == "RotaryEmbeddingCat":
        out = AxialRope(module.dim, module.max_res, module.temperature, module.in_pixels, module.linear_bands,
                        ref_feat_shape=module.ref_feat_shape, grid_offset=module.grid_offset,
                        grid_indexing=module.grid_indexing, rotate_half=module.rotate_half,
                        grid_type=getattr(module, "grid_type", None),
                        normalize_coords=getattr(module, "normalize_coords", "separate"), **aug)
    elif name == "RotaryEmbeddingMixed":
        out = MixedRope(module.dim, module.depth, module.num_heads, module.temperature,
                        grid_indexing=module.grid_indexing, device="meta", **aug)
        out.freqs = nn.Parameter(module.freqs.detach().clone())
    elif name == "RotaryEmbeddingDinoV3":
        out = DinoV3Rope(module.dim, module.temperature, module.min_period, module.max_period,
                         normalize_coords=module.normalize_coords, grid_offset=module.grid_offset,
                         grid_indexing=module.grid_indexing, rotate_half=module.rotate_half, **aug)
    else:
        raise NotImplementedError(f"rope module {name} is not supported by fastvit_kernels (supported: "
                                  "RotaryEmbeddingCat, RotaryEmbeddingMixed, RotaryEmbeddingDinoV3)")
    return out.train(module.training)
