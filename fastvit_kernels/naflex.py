"""FastNaFlexVit: timm's ``NaFlexVit`` (native-resolution ViT: SigLIP 2's NaFlex, Tschannen et al. 2025; NaViT's
packing, Dehghani et al. 2023) computing through this package's ops on PACKED variable-length tokens.

timm runs a NaFlex batch padded: every image's tokens padded to the batch's longest N, a (B, 1, L, L) additive mask
in every attention, and every GEMM over the padding rows too. FastNaFlexVit packs instead:

    patches (B, N, K), patch_valid (B, N)
      -> ids of the valid patches (one host read per batch: each image's valid count and patch grid)
      -> ops.patch_embed_tokens, 2-D form: only the valid patch rows are embedded, their position rows
         (the learned grid resampled once per distinct (h, w), exactly as timm) added, the prefix
         (class / register) rows put first in each image's sequence          -> x (T, D)
      -> blocks on (1, T, D) rows: norm1 + qkv, ops.attention(cu_seqlens=...) (each image attends to itself),
         proj, norm2 + MLP: every GEMM over the T real tokens only
      -> final norm, unpacked to timm's padded (B, num_prefix + N, D) form (zeros at padding positions)
      -> timm's masked pooling (token / avg / max / avgmax / map) and head.

T = sum over images of (valid patches + prefix tokens). Images (B, C, H, W) are patchified as timm's
``batch_patchify`` and run unpacked (every image has the same grid). See :class:`FastNaFlexVit`.
"""

from __future__ import annotations

import warnings
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference, reference_naflex
from ._blocks import BlocksBackend, folds_layer_scale, mlp_or_eager, norm_mlp, norm_qkv, scaled_linear
from .reference_naflex import NaFlexVitCfg, batch_patchify, check_image_input, check_naflex_input


class Packing:
    """The layout of a packed NaFlex batch: S = B sequences back to back in T rows, image b's prefix rows first,
    then its kept valid patches in their padded order.

    Attributes:
        cu_seqlens: (S + 1,) int32 on the tokens' device, cumulative sequence lengths (prefix rows included): what
            ``ops.attention(..., cu_seqlens=)`` takes.
        lengths: the S sequence lengths (host ints).
        slots: (B, L) bool, L = num_prefix + N': which positions of timm's padded (B, L) layout the T packed rows
            fill, in row-major order (prefix positions always True).
        T: number of packed rows.
    """

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int], slots: torch.Tensor):
        self.cu_seqlens, self.lengths, self.slots = cu_seqlens, lengths, slots
        self.T = sum(lengths)
        self._seq_index = None
        self._dest = None

    @property
    def seq_index(self) -> torch.Tensor:
        """(T,) int64: the sequence (image) of each packed row."""
        if self._seq_index is None:
            dev = self.cu_seqlens.device
            self._seq_index = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=dev), torch.tensor(self.lengths, device=dev),
                output_size=self.T)
        return self._seq_index

    @property
    def dest(self) -> torch.Tensor:
        """(T,) int64: each packed row's position in the flattened padded (B * L) layout."""
        if self._dest is None:
            self._dest = self.slots.reshape(-1).nonzero_static(size=self.T).squeeze(1)
        return self._dest

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows (T, D) -> timm's padded (B, L, D), zeros at the positions no row fills; differentiable."""
        B, L = self.slots.shape
        return x.new_zeros(B * L, x.shape[-1]).index_copy(0, self.dest, x).view(B, L, -1)

    def drop_path(self, x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
        """Stochastic depth per image on packed rows (1, T, D): each sequence's rows kept (scaled by 1 / keep) or
        zeroed together (timm's per-sample ``drop_path``; one Bernoulli draw per image, as timm, but not the same
        random stream as timm's padded model)."""
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = x.new_empty(len(self.lengths)).bernoulli_(keep).div_(keep)
        return x * mask[self.seq_index][None, :, None]


class FastNaFlexBlock(reference.Block):
    """timm's pre-norm ``Block`` (parameters as :class:`fastvit_kernels.reference.Block`) computing through the
    ops, on padded-free packed rows or on equal-length images.

    ``forward(x, packing)``: x (1, T, D) packed sequences (:class:`Packing`); ``forward(x)``: x (B, N, D), every
    image the same length. Either way: norm1 + qkv (``ops.layernorm_linear``; qk_norm eager),
    ``ops.attention`` (with ``cu_seqlens`` when packed: each image attends to itself), proj + residual
    (``ops.linear_residual``, LayerScale folded into proj's weight and bias
    (:func:`fastvit_kernels._blocks.folds_layer_scale`, not in fp16); around proj dropout, stochastic depth or an
    fp16 LayerScale: ``F.linear`` and those on the branch), norm2 + MLP (``ops.layernorm_mlp``, the residual in its
    epilogue and LayerScale folded into fc2 unless stochastic depth or an fp16 LayerScale sits on the branch; MLP
    dropout while training: the eager MLP, with a one-time warning). Stochastic depth is per image
    (:meth:`Packing.drop_path` when packed). Attention dropout is not available (FastNaFlexVit rejects
    attn_drop_rate > 0)."""

    backend: str | None = None  # set by FastNaFlexVit

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        attn, training = self.attn, self.training
        drop_path = packing.drop_path if packing is not None else reference.drop_path
        qkv = self._qkv(x)
        if packing is not None:
            o = ops.attention(qkv[0], attn.num_heads, attn.scale, cu_seqlens=packing.cu_seqlens,
                              backend=self.backend)[None]
        else:
            o = ops.attention(qkv, attn.num_heads, attn.scale, backend=self.backend)
        p1 = self.drop_path1.drop_prob
        no_branch_ops = not (training and (p1 > 0 or attn.proj_drop.p > 0))
        if isinstance(self.ls1, nn.Identity) and no_branch_ops:
            x = ops.linear_residual(o, attn.proj.weight, attn.proj.bias, x, backend=self.backend)
        elif isinstance(self.ls1, reference.LayerScale) and no_branch_ops and folds_layer_scale(x):
            weight, bias = scaled_linear(attn.proj.weight, attn.proj.bias, self.ls1.gamma)
            x = ops.linear_residual(o, weight, bias, x, backend=self.backend)
        else:
            branch = attn.proj_drop(F.linear(o, attn.proj.weight, attn.proj.bias))
            x = x + drop_path(self.ls1(branch), p1, training)
        p2 = self.drop_path2.drop_prob
        if training and self.mlp.drop1.p > 0:
            if not getattr(self, "_warned", False):
                warnings.warn("FastNaFlexVit: MLP dropout (proj_drop_rate) > 0 is not implemented by the fused ops; "
                              "the MLP runs eager PyTorch while training", stacklevel=2)
                self._warned = True
            y = self.mlp(self.norm2(x))
        elif isinstance(self.ls2, nn.Identity) and not (training and p2 > 0):
            return self._mlp(x, add_residual=True)
        else:
            if isinstance(self.ls2, reference.LayerScale) and not (training and p2 > 0) and folds_layer_scale(x):
                y = norm_mlp(x, self.norm2, self.mlp, True, self.backend, layer_scale=self.ls2.gamma)
                if y is not None:  # LayerScale folded into fc2, the residual in its epilogue
                    return y
            y = self._mlp(x, add_residual=False)
        return x + drop_path(self.ls2(y), p2, training)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """norm1 + qkv (+ qk_norm): (B, N, D) -> (B, N, 3 D); ``ops.layernorm_linear`` for a LayerNorm / RMSNorm
        (:func:`fastvit_kernels._blocks.norm_qkv`), then qk_norm over head_dim (eager)."""
        attn, norm1 = self.attn, self.norm1
        qkv = norm_qkv(x, norm1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, backend=self.backend)
        if qkv is None:
            qkv = F.linear(norm1(x), attn.qkv.weight, attn.qkv.bias)
        if not isinstance(attn.q_norm, nn.Identity):
            B, N, _ = qkv.shape
            q, k, v = qkv.view(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
            qkv = torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=2).reshape(B, N, -1)
        return qkv

    def _mlp(self, x: torch.Tensor, add_residual: bool) -> torch.Tensor:
        """``[x +] mlp(norm2(x))``, (B, N, D): ``ops.layernorm_mlp`` (:func:`fastvit_kernels._blocks.norm_mlp`),
        eager for a norm it does not apply."""
        return mlp_or_eager(x, self.norm2, self.mlp, add_residual, self.backend)


class FastNaFlexVit(BlocksBackend, reference_naflex.NaFlexVit):
    """Drop-in for timm's ``NaFlexVit`` running NaFlex batches as packed variable-length sequences.

    Args: timm's: ``cfg`` (a :class:`fastvit_kernels.reference_naflex.NaFlexVitCfg`, or timm's; the supported
        subset in its docstring), ``in_chans``, ``num_classes``, ``img_size``, ``**kwargs`` (cfg fields); plus
        ``backend``: "auto" | "triton" | "torch" | None (None: ``FASTVIT_BACKEND`` or "auto").
        Parameter names are timm's: a timm state_dict loads with ``strict=True`` (or use :meth:`from_timm`).

    Input (``forward``), as timm:
        * a NaFlex dict from timm's collator: {'patches' (B, N, K) float, K = ph * pw * C in (ph, pw, C) order,
          'patch_coord' (B, N, 2) int (y, x), 'patch_valid' (B, N) bool} (other keys ignored);
        * patches (B, N, K) with ``patch_coord=`` and ``patch_valid=``;
        * images (B, C, H, W) (patchified inside; all images share one grid, run unpacked: (B, N, D) blocks).

    Output: logits (B, num_classes) (pooled features (B, D) when num_classes == 0).
    ``forward_features`` on NaFlex input returns timm's dict {'patches': (B, num_prefix + N', D), 'patch_valid':
    (B, N')} (N' = N, or the kept count under patch dropout): ONLY VALID TOKENS ARE COMPUTED; the features at
    padding positions are zeros (timm's are whatever its padded rows computed; pooling masks them either way).

    Packing (NaFlex input): valid patches only are embedded and run; T = valid patches + B * num_prefix rows. The
    packed layout needs ONE host read per batch (each image's valid-patch count and, with a position embedding,
    its patch grid (h, w) = max patch_coord + 1 over all N rows, as timm); the position rows are timm's (the
    learned grid interpolated once per distinct (h, w) in fp32, added to an image's first h * w tokens),
    recomputed every call (differentiable; nothing cached). :meth:`forward_packed` exposes the packed tokens.

    Training: patch dropout (patch_drop_rate) draws timm's ``PatchDropoutWithIndices`` indices (same RNG draw:
    the same kept patches as timm under the same seed when no other random op runs first, e.g. pos_drop_rate 0)
    and embeds only the kept valid patches (``ids_keep``). Stochastic depth is per image (timm's distribution;
    another random stream). Dropout after the embedding (pos_drop_rate) runs on the packed rows (another random
    stream).

    Raises:
        TypeError: an unknown keyword. ValueError: an unsupported configuration (named field, see
        :func:`fastvit_kernels.reference_naflex.check_cfg`; also ``attn_drop_rate > 0``: the fused attention has no
        dropout); NaFlex input without patch_coord / patch_valid or with bad shapes; a custom ``attn_mask``;
        without prefix tokens, an image with no valid patch (an empty sequence).
    """

    def __init__(self, cfg: NaFlexVitCfg | None = None, in_chans: int = 3, num_classes: int = 1000, img_size=None,
                 backend: str | None = None, **kwargs):
        if "block_fn" in kwargs:
            raise ValueError("FastNaFlexVit sets block_fn itself; use fastvit_kernels.reference_naflex.NaFlexVit "
                             "for a custom block")
        super().__init__(cfg, in_chans, num_classes, img_size, block_fn=FastNaFlexBlock, **kwargs)
        if self.cfg.attn_drop_rate > 0:
            raise ValueError(f"NaFlexVitCfg.attn_drop_rate={self.cfg.attn_drop_rate} is not supported by "
                             "FastNaFlexVit (the packed attention op has no dropout); use 0, or "
                             "fastvit_kernels.reference_naflex.NaFlexVit")
        self.backend = backend
        ops.register_flop_formulas(only_if_loaded=True)

    @classmethod
    def from_timm(cls, model: nn.Module, backend: str | None = None) -> "FastNaFlexVit":
        """Build a FastNaFlexVit with the architecture of a timm ``NaFlexVit`` and load its weights
        (``strict=True``), on the source model's device and dtype, in its training mode.

        Raises:
            NotImplementedError: the model uses something FastNaFlexVit does not implement (RoPE, EVA blocks, conv
                patch embedding, input / embed norms, grid-sample positions, the patch interpolator, ...), naming
                each.
        """
        kwargs, problems = _naflex_kwargs(model)
        if problems:
            raise NotImplementedError(f"FastNaFlexVit.from_timm: not supported: {', '.join(problems)}")
        ref = model.embeds.proj.weight
        with torch.device("meta"):
            fast = cls(**kwargs, backend=backend)
        fast = fast.to_empty(device=ref.device).to(ref.dtype)
        fast.load_state_dict(model.state_dict(), strict=True)
        return fast.train(model.training)

    # --- NaFlex input: packed ---------------------------------------------------------------------------------
    def forward_packed(self, patches: torch.Tensor, patch_coord: torch.Tensor,
                       patch_valid: torch.Tensor) -> tuple[torch.Tensor, Packing, torch.Tensor]:
        """NaFlex patches -> (tokens (T, D) after the blocks and the final norm, their :class:`Packing`, the
        patch validity (B, N') of timm's padded layout: patch_valid, gathered by patch dropout in training).

        Args: patches (B, N, K), patch_coord (B, N, 2) int, patch_valid (B, N) bool (see the class docstring).

        Raises:
            ValueError / TypeError: bad NaFlex input (:func:`fastvit_kernels.reference_naflex.check_naflex_input`);
                an empty sequence (no prefix tokens and an image with no valid patch).
        """
        check_naflex_input(patches, patch_coord, patch_valid, self.embeds)
        x, packing, valid = self._embed_packed(patches, patch_coord, patch_valid.bool())
        x = self.norm_pre(x)[None]  # (1, T, D): the row-wise ops see one long sequence
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, packing, use_reentrant=False)
            else:
                x = blk(x, packing)
        return self.norm(x[0]), packing, valid

    def _embed_packed(self, patches, patch_coord, valid):
        """Patch dropout, the one host read, the position rows and the packed embedding: (T, D), Packing, the
        padded layout's patch validity (B, N')."""
        pe, P = self.embeds, self.num_prefix_tokens
        B, N, K = patches.shape
        dev = patches.device
        src = None  # global patch row (of the B * N) behind each position of the padded layout; None = identity
        if self.training and self.patch_drop_rate > 0:
            keep = reference_naflex.patch_dropout_keep(B, N, self.patch_drop_rate, dev)  # (B, N') timm's draw
            valid = valid.gather(1, keep)
            src = (keep + torch.arange(B, device=dev)[:, None] * N).reshape(-1)
        # the one host read: each image's kept valid count and (with positions) its patch grid
        stats = valid.sum(dim=1, keepdim=True)
        with_pos = pe.pos_embed_type != "none"
        if with_pos:
            stats = torch.cat([patch_coord.amax(dim=1).to(stats.dtype) + 1, stats], dim=1)
        rows = stats.tolist()
        counts = [r[-1] for r in rows]
        if P == 0 and min(counts) == 0:
            raise ValueError(f"image {counts.index(0)} has no valid patch (after patch dropout) and the model has no "
                             "prefix tokens: its packed sequence would be empty")
        T_patch = sum(counts)
        lengths = [c + P for c in counts]
        packing = Packing(torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=dev), lengths,
                          torch.cat([valid.new_ones(B, P), valid], dim=1))
        kept = valid.reshape(-1).nonzero_static(size=T_patch).squeeze(1)  # padded-layout positions, row-major
        ids_keep = kept if src is None else src[kept]
        pos = pos_index = None
        if with_pos:
            pos, pos_index = self._position_rows([tuple(r[:2]) for r in rows], N, dev)
        prefix = pe.prefix_rows()
        w, b = pe.proj.weight, pe.proj.bias
        flat = patches.reshape(B * N, K)
        if prefix is None or min(counts) > 0:
            cu_patch = torch.tensor([0, *accumulate(counts)], dtype=torch.int32, device=dev) \
                if prefix is not None else None
            x = ops.patch_embed_tokens(flat, w, b, pos, pos_index, ids_keep=ids_keep, prefix=prefix,
                                       cu_seqlens=cu_patch, backend=self.backend)
        else:
            # an image whose patches were all dropped: a sequence of prefix rows only, which the op's cu_seqlens
            # (over the patch rows, strictly increasing) cannot express; place the prefix rows here instead
            emb = ops.patch_embed_tokens(flat, w, b, pos, pos_index, ids_keep=ids_keep, backend=self.backend)
            D = emb.shape[-1]
            patch_part = emb.new_zeros(valid.numel(), D).index_copy(0, kept, emb).view(B, -1, D)
            padded = torch.cat([prefix.to(emb.dtype).expand(B, -1, -1), patch_part], dim=1)
            x = padded.reshape(-1, D).index_select(0, packing.dest)
        return pe.pos_drop(x), packing, valid

    def _position_rows(self, sizes: list[tuple[int, int]], N: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's NaFlex position embedding as (pos (R, D), pos_index (B * N,) int64): the rows of each distinct
        patch grid (h, w) once (:meth:`NaFlexEmbeds.pos_rows`), stacked; token n of image b takes row
        offset(h_b, w_b) + n when n < h_b * w_b (timm adds an image's grid rows to its first h * w tokens), -1
        (no position) otherwise."""
        offsets: dict = {}
        tables = []
        R = 0
        for s in sizes:
            if s not in offsets:
                offsets[s] = R
                tables.append(self.embeds.pos_rows(s, self.embeds.proj.weight.dtype))
                R += s[0] * s[1]
        pos = torch.cat(tables, dim=0)
        off = torch.tensor([offsets[s] for s in sizes], device=dev)[:, None]
        hw = torch.tensor([h * w for h, w in sizes], device=dev)[:, None]
        n = torch.arange(N, device=dev)[None, :]
        return pos, torch.where(n < hw, off + n, -1).reshape(-1)

    # --- images: unpacked (one grid for the batch) --------------------------------------------------------------
    def _forward_images(self, images: torch.Tensor) -> torch.Tensor:
        check_image_input(images, self.in_chans)
        pe, P = self.embeds, self.num_prefix_tokens
        patches, grid = batch_patchify(images, pe.patch_size, pad=pe.dynamic_img_pad, channels_last=pe.channels_last)
        B, N, _ = patches.shape
        pos = pe.pos_rows(grid, pe.proj.weight.dtype)
        pos_index = torch.arange(N, device=images.device).expand(B, N) if pos is not None else None
        ids_keep = None
        if self.training and self.patch_drop_rate > 0:
            ids_keep = reference_naflex.patch_dropout_keep(B, N, self.patch_drop_rate, images.device)
        x = ops.patch_embed_tokens(patches, pe.proj.weight, pe.proj.bias, pos, pos_index, ids_keep=ids_keep,
                                   prefix=pe.prefix_rows(), backend=self.backend)
        x = self.norm_pre(pe.pos_drop(x))
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, patches: torch.Tensor, patch_coord: torch.Tensor | None = None,
                         patch_valid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """NaFlex patches (with patch_coord and patch_valid) -> timm's dict {'patches': (B, num_prefix + N', D),
        'patch_valid': (B, N')}: :meth:`forward_packed`, unpacked (zeros at padding positions: only valid tokens
        are computed). Images (B, C, H, W) -> tokens (B, num_prefix + N, D).

        Raises:
            ValueError: a custom attn_mask (packing derives each image's sequence from patch_valid); bad input.
        """
        if attn_mask is not None:
            raise ValueError("FastNaFlexVit does not take a custom attn_mask: the packed sequences follow "
                             "patch_valid; use fastvit_kernels.reference_naflex.NaFlexVit for arbitrary masks")
        if patch_coord is None and patch_valid is None:
            return self._forward_images(patches)
        x, packing, valid = self.forward_packed(patches, patch_coord, patch_valid)
        return {"patches": packing.unpack(x), "patch_valid": valid}


def _hidden_ratio(hidden: int, dim: int) -> float:
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _naflex_kwargs(model: nn.Module) -> tuple[dict, list[str]]:
    """FastNaFlexVit constructor arguments reproducing a timm ``NaFlexVit``, and the list of what is not
    supported."""
    problems = []
    e, blk = model.embeds, model.blocks[0]
    attn, mlp, D = blk.attn, blk.mlp, model.embed_dim
    if type(blk).__name__ != "Block":
        problems.append(f"block {type(blk).__name__}")
    if type(attn).__name__ != "Attention" or not hasattr(attn, "qkv"):
        problems.append(f"attention {type(attn).__name__}")
    if type(mlp).__name__ != "Mlp" or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        problems.append(f"MLP {type(mlp).__name__} (or scale_mlp_norm)")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        problems.append("scale_attn_inner_norm")
    if getattr(model, "rope", None) is not None:
        problems.append("rope_type")
    if not getattr(e, "is_linear", False):
        problems.append("embed_proj_type='conv'")
    if getattr(e, "norm_input", None) is not None:
        problems.append("input_norm_layer")
    if not isinstance(e.norm, nn.Identity):
        problems.append("embed_norm_layer")
    if getattr(e, "patch_interpolator", None) is not None:
        problems.append("enable_patch_interpolator")
    if getattr(e, "pos_embed_use_grid_sample", False):
        problems.append("pos_embed_use_grid_sample")
    act = getattr(mlp, "act", None)
    approximate = getattr(act, "approximate", "none") if isinstance(act, nn.GELU) else None
    if approximate is None and type(act).__name__ in ("GELU", "GELUTanh"):
        approximate = "tanh" if type(act).__name__ == "GELUTanh" else "none"
    if approximate is None:
        problems.append(f"MLP activation {type(act).__name__}")
    try:
        norm = reference.norm_spec_of(blk.norm1)
    except NotImplementedError:
        norm = None
        problems.append(f"norm_layer {type(blk.norm1).__name__}")
    if problems:
        return {}, problems
    pool = getattr(model, "attn_pool", None)
    dp = getattr(model.blocks[-1], "drop_path1", None)
    patch_drop = getattr(model, "patch_drop", None)
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    cfg = NaFlexVitCfg(
        patch_size=tuple(e.patch_size), embed_dim=D, depth=len(model.blocks), num_heads=attn.num_heads,
        mlp_ratio=_hidden_ratio(mlp.fc1.out_features, D), qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity), proj_bias=attn.proj.bias is not None,
        attn_drop_rate=attn.attn_drop.p, use_key_only_attn_mask=model.use_key_only_attn_mask,
        init_values=1e-5 if hasattr(blk.ls1, "gamma") else None,  # the value comes with the weights
        drop_rate=model.head_drop.p, pos_drop_rate=e.pos_drop.p,
        patch_drop_rate=patch_drop.prob if patch_drop is not None else 0.0, proj_drop_rate=attn.proj_drop.p,
        drop_path_rate=getattr(dp, "drop_prob", 0.0) or 0.0, class_token=model.has_class_token,
        reg_tokens=model.num_reg_tokens, pos_embed=e.pos_embed_type,
        pos_embed_grid_size=tuple(e.pos_embed_grid_size) if e.pos_embed_grid_size is not None else None,
        pos_embed_interp_mode=e.pos_embed_interp_mode, pos_embed_ar_preserving=e.pos_embed_ar_preserving,
        pos_embed_antialias=e.pos_embed_antialias, pos_embed_align_corners=e.pos_embed_align_corners,
        dynamic_img_pad=e.dynamic_img_pad, patchify_channels_last=getattr(e, "channels_last", True),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=fc_norm or not isinstance(model.norm, nn.Identity), fc_norm=fc_norm,
        global_pool=model.global_pool, pool_include_prefix=model.pool_include_prefix,
        attn_pool_num_heads=pool.num_heads if pool is not None else None,
        attn_pool_mlp_ratio=_hidden_ratio(pool.mlp.fc1.out_features, D) if pool is not None else None,
        norm_layer=norm, act_layer="gelu_tanh" if approximate == "tanh" else None,
    )
    return dict(cfg=cfg, in_chans=e.in_chans, num_classes=model.num_classes), []

