"""The cost model of a native-resolution (NaFlex) ViT training step -- MODELLED, runs anywhere, no GPU involved:
kernel launches, device-memory bytes and executed matmul FLOPs of one step over a batch of variable-length
sequences, for two paths (conventions, :class:`~fastvit_kernels.bench.cost_model.Launch` and the roofline as in
:mod:`fastvit_kernels.bench.cost_model`):

* ``"packed"``: fastvit's packed form (NaViT, Dehghani et al. 2023): the batch's real tokens back to back with
  ``cu_seqlens``; ``fastvit::patch_embed_tokens`` embeds only the kept patches (its A load gathers them through
  ``ids_keep``; position rows gathered per token; prefix rows written in the same launch), every block GEMM runs
  on sum_s (n_s + p) rows, attention is the varlen kernel (each sequence attends to itself: sum_s (n_s + p)^2
  work; its backward as preprocess + dK dV + dQ launches). The blocks are FastNaFlexVit's: norm1 + qkv as row
  stats + one GEMM, LayerScale folded into proj's and fc2's weight and bias (``gamma W``, ``gamma b``: elementwise
  ops on parameters) so that ``linear_residual`` and ``layernorm_mlp`` keep the residual in their epilogues (the
  backward's dgrad / wgrad pairs as :mod:`~fastvit_kernels.bench.cost_model` models them, then the fold's
  parameter-sized backward).
* ``"padded"``: timm's NaFlexVit on its collator's padded batch: the Linear patch embedding over every padded
  row, the position rows added per image by ``index_add_``, the register-token cat, MAE-style patch dropout as
  timm's ``PatchDropout`` (argsort of noise over every slot, padding included, then a gather: the embedding ran
  on every patch first), the additive float [B, 1, N, N] mask built from ``patch_valid`` (cat, outer and, not,
  zeros, masked_fill), and per block timm's eager kernels (cuBLAS addmm, LayerNorm, GELU, LayerScale, residual
  adds) with ``F.scaled_dot_product_attention`` given that mask: the memory-efficient backend (FlashAttention
  takes no float mask), which reads the mask in its forward and again in its backward; its backward's dq / dk / dv
  copied to the packed qkv layout (stack + permute copy). Every GEMM runs on S (N + p) rows, attention on
  (N + p)^2 per image.

Shared by both: the learned 16 x 16 position table resampled per image grid (``F.interpolate`` in fp32, the cast;
every image's grid is assumed distinct: native resolution), the masked average pooling + fc_norm + head
(timm's ``global_pool='avg'`` with ``fc_norm``; packed: a per-sequence mean), cross-entropy, AdamW
(:func:`fastvit_kernels.bench.cost_model._adamw`; the parameter list of timm's Eva layout: a (tokens, D) pos_embed
stands in for NaFlexVit's (16, 16, D) grid -- 4 rows more, the same on both paths).

Not modelled: RoPE, dropout, drop-path, autocast casts, the host-side work of the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import cost_model as cm
from .cost_model import F32, I64, Kernel, Launch, _Builder, _triton
from .devices import Peak, dtype_name
from .flops import ViTShape, naflex_model_flops

PATHS = ("packed", "padded")
POS_GRID = 16  # NaFlexVit's learned position grid side (pos_embed_grid_size)

# timm's naflexvit_base_patch16_gap: ViT-B/16, 4 register tokens, no class token, LayerScale, average pooling
# with fc_norm; a 1000-class head
NAFLEX_SHAPES: dict[str, ViTShape] = {
    "naflexvit_base_patch16_gap": ViTShape(img_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                                           num_heads=12, num_classes=1000, class_token=False, global_pool="avg",
                                           reg_tokens=4, layer_scale=True),
}
DEFAULT_TOKEN_BUDGET = 16384  # padded tokens per step: timm's NaFlex loader default (4096 * 4)


@dataclass(frozen=True)
class NaFlexBatch:
    """One batch of the comparison: ``seq_lens`` (S per-image patch counts before any dropping), ``pad_to``
    (timm's collator length N >= max(seq_lens)), ``keep_ratio`` (MAE-style: the fraction of patches kept, 1.0 =
    none dropped).

    Raises:
        ValueError: no sequence, a length below 1, pad_to below the longest, keep_ratio outside (0, 1].
    """

    seq_lens: tuple
    pad_to: int
    keep_ratio: float = 1.0

    def __post_init__(self):
        lens = tuple(int(n) for n in self.seq_lens)
        object.__setattr__(self, "seq_lens", lens)
        if not lens or min(lens) < 1:
            raise ValueError(f"seq_lens must hold at least one length, each >= 1; got {lens[:8]}")
        if self.pad_to < max(lens):
            raise ValueError(f"pad_to={self.pad_to} is below the longest sequence ({max(lens)})")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1]; got {self.keep_ratio}")

    @property
    def kept_lens(self) -> tuple:
        """Per-image kept patch counts of the packed path: max(1, round(keep_ratio * n_s))."""
        return tuple(max(1, round(self.keep_ratio * n)) for n in self.seq_lens)

    @property
    def padded_keep(self) -> int:
        """Patch slots per image after timm's PatchDropout: max(1, int(pad_to * keep_ratio)) (it draws over every
        slot, padding included)."""
        return self.pad_to if self.keep_ratio == 1.0 else max(1, int(self.pad_to * self.keep_ratio))


def default_seq_lens(lo: int = 64, hi: int = 1024, step: int = 32, repeats: int = 2, seed: int = 0) -> list[int]:
    """The fixed mixed-length list of the default comparison (mixed native resolutions): lo, lo + step, ..., hi
    patches (64..1024 in steps of 32: 31 lengths), each ``repeats`` times, in a seeded shuffled order."""
    lens = [n for n in range(lo, hi + 1, step) for _ in range(repeats)]
    perm = torch.randperm(len(lens), generator=torch.Generator().manual_seed(seed)).tolist()
    return [lens[i] for i in perm]


def budget_batches(seq_lens, token_budget: int = DEFAULT_TOKEN_BUDGET, keep_ratio: float = 1.0
                   ) -> list[NaFlexBatch]:
    """Split a length list, in order, into batches by timm's budget rule: a batch grows while (images + 1) x its
    longest length fits ``token_budget`` padded tokens; each batch is padded to its longest (``pad_to``).

    Raises:
        ValueError: an empty list or token_budget < 1.
    """
    lens = list(seq_lens)
    if not lens or token_budget < 1:
        raise ValueError(f"need lengths and token_budget >= 1; got {len(lens)} lengths, budget {token_budget}")
    out, cur = [], []
    for n in lens:
        if cur and (len(cur) + 1) * max(max(cur), n) > token_budget:
            out.append(NaFlexBatch(tuple(cur), max(cur), keep_ratio))
            cur = []
        cur.append(n)
    out.append(NaFlexBatch(tuple(cur), max(cur), keep_ratio))
    return out


# ---- shared pieces ---------------------------------------------------------------------------------------------
def _pos_tables_fwd(b: _Builder, lens, D: int, e: int) -> None:
    """The learned (16, 16, D) table resampled to each image's grid (fp32 bilinear), then cast."""
    b.cls = "patch_embed"
    for n in lens:
        b.ew("aten.upsample_bilinear2d", "pos table resample (fp32)", POS_GRID ** 2 * D * F32, n * D * F32)
        b.ew("aten._to_copy", "pos rows cast", n * D * F32, n * D * e)


def _pos_tables_bwd(b: _Builder, lens, D: int, e: int) -> None:
    """Each image's position-row gradient cast to fp32, the resample's backward into the table, the sums."""
    b.cls = "patch_embed"
    for i, n in enumerate(lens):
        b.ew("aten._to_copy", "pos rows grad cast (fp32)", n * D * e, n * D * F32)
        b.ew("aten.upsample_bilinear2d_backward", "pos table resample bwd", n * D * F32, POS_GRID ** 2 * D * F32)
        if i:
            b.add(POS_GRID ** 2 * D, F32, "pos table grad accumulation")


def _head_fwd(b: _Builder, s: ViTShape, M: int, M_pool: int, S: int, e: int, padded: bool) -> None:
    """Final LayerNorm over all rows, average pooling of the patch rows (padded: masked by patch_valid),
    fc_norm, head, cross-entropy."""
    D, nc = s.embed_dim, s.num_classes
    b.cls = "head"
    b.layer_norm(M, D, e)
    if padded:
        b.ew("aten.mul", "x * patch_valid (masked pooling)", M_pool * D * e + M_pool * e, M_pool * D * e)
        b.ew("aten.sum", "sum over tokens", M_pool * D * e, S * D * e)
        b.ew("aten.sum", "valid counts", M_pool * e, S * e)
        b.ew("aten.div", "mean", S * D * e + S * e, S * D * e)
    else:
        b.ew("aten.segment_reduce", "per-sequence mean of the patch rows", M_pool * D * e, S * D * e)
    b.layer_norm(S, D, e)
    b.addmm(S, D, nc, e)
    b.call("aten._log_softmax", Kernel(name="log_softmax", bytes_read=S * nc * e, bytes_written=S * nc * e))
    b.call("aten.nll_loss_forward", Kernel(name="nll_loss", bytes_read=S * e + S * I64, bytes_written=2 * e))


def _head_bwd(b: _Builder, s: ViTShape, M: int, M_pool: int, S: int, e: int, padded: bool) -> None:
    D, nc = s.embed_dim, s.num_classes
    b.cls, b.phase = "head", "backward"
    b.call("aten.ones_like", Kernel(name="fill (loss seed)", bytes_read=0, bytes_written=e))
    b.call("aten.nll_loss_backward", Kernel(name="fill", bytes_read=0, bytes_written=S * nc * e),
           Kernel(name="nll_loss bwd", bytes_read=S * I64 + e, bytes_written=S * e))
    b.call("aten._log_softmax_backward_data",
           Kernel(name="log_softmax bwd", bytes_read=2 * S * nc * e, bytes_written=S * nc * e))
    b.linear_bwd(S, D, nc, e)
    b.layer_norm_bwd(S, D, e)
    if padded:
        b.ew("aten.div", "mean bwd", S * D * e + S * e, S * D * e)
        b.ew("aten.expand_copy", "sum bwd (broadcast)", S * D * e, M_pool * D * e)
        b.ew("aten.mul", "masked pooling bwd", M_pool * D * e + M_pool * e, M_pool * D * e)
    else:
        b.ew("aten.segment_reduce_backward", "per-sequence mean bwd", S * D * e, M_pool * D * e)
    b.slice_backward(M * D, M_pool * D, e, "pooled patch rows into all rows")
    b.layer_norm_bwd(M, D, e)


def _attention_varlen_bwd(M: int, D: int, H: int, sq: int, e: int) -> list[Kernel]:
    """The varlen attention backward (``sq`` = sum_s (n_s + p)^2): delta, dK dV, dQ; cu_seqlens read by each."""
    lse = M * H * F32
    return [_triton(name="_attention_varlen_bwd_preprocess_kernel", bytes_read=2 * M * D * e, bytes_written=lse,
                    op_class="attention"),
            _triton(name="_attention_varlen_bwd_dkdv_kernel", flops=8 * sq * D, bytes_read=4 * M * D * e + 2 * lse,
                    bytes_written=2 * M * D * e, op_class="attention"),
            _triton(name="_attention_varlen_bwd_dq_kernel", flops=6 * sq * D, bytes_read=4 * M * D * e + 2 * lse,
                    bytes_written=M * D * e, op_class="attention")]


# ---- the packed path --------------------------------------------------------------------------------------------
def _packed_plan(b: _Builder, s: ViTShape, batch: NaFlexBatch, e: int, train: bool, gemm_kernel: str,
                 num_sms: int) -> None:
    D, Dh, H, L, p = s.embed_dim, s.hidden, s.num_heads, s.depth, s.prefix_tokens
    K = s.in_chans * s.patch_size ** 2
    lens, kept = batch.seq_lens, batch.kept_lens
    S, T = len(lens), sum(kept)
    M = T + S * p
    sq = sum((n + p) ** 2 for n in kept)
    lse = M * H * F32
    cu = (S + 1) * 4
    GK = "_matmul_tma_kernel" if gemm_kernel == "tma" else "_matmul_kernel"
    ls = s.layer_scale
    sel = T * I64 if batch.keep_ratio < 1 else 0  # ids_keep

    def pair(first, second, shapes, cls):
        return [replace(k, op_class=cls) for k in cm._pair(first, second, gemm_kernel, e, shapes, num_sms)]

    # ---- forward ----
    _pos_tables_fwd(b, lens, D, e)
    b.ew("aten.cat", "cat the images' pos rows (R, D)", sum(lens) * D * e, sum(lens) * D * e)
    b.cls = "patch_embed"
    b.call("fastvit.patch_embed_tokens_fwd",
           _triton(name="_matmul_split_kernel", flops=2 * T * K * D,
                   bytes_read=T * K * e + sel + D * K * e + D * e + T * I64 + T * D * e + cu,
                   bytes_written=T * D * e,
                   note="kept patches gathered in the A load (ids_keep); bias + gathered pos rows in the epilogue; "
                        "rows stored through the row map past each sequence's prefix rows"),
           Kernel(name="aten.index_copy", bytes_read=(M - T) * D * e + (M - T) * I64, bytes_written=(M - T) * D * e,
                  note="the prefix rows of every sequence"))
    for _ in range(L):
        b.cls = "ln_qkv"
        b.call("fastvit.layernorm_linear_fwd",
               _triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32),
               _triton(name=GK, flops=2 * M * D * 3 * D,
                       bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + 3 * D * D * e + 3 * D * e,
                       bytes_written=3 * M * D * e, note="LayerNorm prologue; bias epilogue"))
        b.cls = "attention"
        b.call("fastvit.attention_fwd",
               _triton(name="_attention_varlen_fwd_kernel", flops=4 * sq * D, bytes_read=3 * M * D * e + cu,
                       bytes_written=M * D * e + lse, note="each sequence attends to itself (cu_seqlens)"))
        b.cls = "proj"
        if ls:
            b.fold_layer_scale(D, D, e)
        b.call("fastvit.linear_residual_fwd",
               _triton(name=GK, flops=2 * M * D * D, bytes_read=2 * M * D * e + D * D * e + D * e,
                       bytes_written=M * D * e, note="bias + residual epilogue" + (" (LayerScale folded)" if ls else "")))
        b.cls = "mlp"
        if ls:
            b.fold_layer_scale(D, Dh, e)
        res = M * D * e
        b.call("fastvit.layernorm_mlp_fwd",
               _triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32),
               _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + Dh * D * e
                       + Dh * e, bytes_written=2 * M * Dh * e, note="LayerNorm prologue; bias + GELU epilogue"),
               _triton(name=GK, flops=2 * M * Dh * D, bytes_read=M * Dh * e + D * Dh * e + D * e + res,
                       bytes_written=M * D * e, note="bias + residual epilogue"))
    _head_fwd(b, s, M, T, S, e, padded=False)
    if not train:
        return
    # ---- backward ----
    _head_bwd(b, s, M, T, S, e, padded=False)
    for _ in range(L):
        b.cls = "mlp"
        b.call("fastvit.layernorm_mlp_bwd",
               *pair(_triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + M * Dh * e,
                             bytes_written=D * Dh * e + D * e, note="dW2; GELU recomputed", fusion=cm.WGRAD_GELU),
                     _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + D * Dh * e + M * Dh * e,
                             bytes_written=M * Dh * e, note="dH; GELU' epilogue", fusion=cm.DGRAD_GELU),
                     ((D, Dh, M), (M, Dh, D)), "mlp"),
               *pair(_triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * Dh * e + M * D * e + 2 * M * F32 + 2 * D * e,
                             bytes_written=Dh * D * e + Dh * e, note="dW1; LayerNorm recomputed", fusion=cm.WGRAD_LN),
                     _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * Dh * e + Dh * D * e,
                             bytes_written=M * D * e, note="d LayerNorm(x)", fusion=cm.DGRAD),
                     ((Dh, D, M), (M, D, Dh)), "mlp"),
               *cm._ln_bwd_kernels(M, D, e, True, "mlp"))
        if ls:
            b.fold_layer_scale_bwd(D, Dh, e)
        b.cls = "proj"
        b.call("fastvit.linear_residual_bwd",
               *pair(_triton(name=GK, flops=2 * M * D * D, bytes_read=2 * M * D * e,
                             bytes_written=D * D * e + D * e, note="dW", fusion=cm.WGRAD),
                     _triton(name=GK, flops=2 * M * D * D, bytes_read=M * D * e + D * D * e,
                             bytes_written=M * D * e, note="dx", fusion=cm.DGRAD),
                     ((D, D, M), (M, D, D)), "proj"))
        if ls:
            b.fold_layer_scale_bwd(D, D, e)
        b.cls = "attention"
        b.call("fastvit.attention_bwd", *_attention_varlen_bwd(M, D, H, sq, e))
        b.cls = "ln_qkv"
        b.call("fastvit.layernorm_linear_bwd",
               *pair(_triton(name=GK, flops=2 * M * D * 3 * D,
                             bytes_read=3 * M * D * e + M * D * e + 2 * M * F32 + 2 * D * e,
                             bytes_written=3 * D * D * e + 3 * D * e, note="dW; LayerNorm recomputed",
                             fusion=cm.WGRAD_LN),
                     _triton(name=GK, flops=2 * M * D * 3 * D, bytes_read=3 * M * D * e + 3 * D * D * e,
                             bytes_written=M * D * e, note="d LayerNorm(x)", fusion=cm.DGRAD),
                     ((3 * D, D, M), (M, D, 3 * D)), "ln_qkv"),
               *cm._ln_bwd_kernels(M, D, e, False, "ln_qkv"))
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
    b.cls = "patch_embed"
    b.call("fastvit.patch_embed_tokens_bwd",
           _triton(name="_matmul_split_kernel", flops=2 * T * K * D,
                   bytes_read=T * D * e + T * K * e + sel, bytes_written=D * K * e + D * e,
                   note="dW = d(rows)^T @ kept patches (re-gathered); db = row sums"),
           Kernel(name="aten.sort", bytes_read=S * p * I64, bytes_written=2 * S * p * I64,
                  note="prefix keys (stable sort: a fixed summation order)"),
           _triton(name="_segment_sum_kernel", bytes_read=S * p * D * e + S * p * I64, bytes_written=p * D * e,
                   note="prefix-row grads summed over the sequences"),
           Kernel(name="aten.sort", bytes_read=T * I64, bytes_written=2 * T * I64, note="pos_index keys"),
           _triton(name="_segment_sum_kernel", bytes_read=T * D * e + 2 * T * I64, bytes_written=T * D * e,
                   note="pos rows grad: each token's row (one token per pos row here)"))
    _pos_tables_bwd(b, kept, D, e)


# ---- the padded path (timm NaFlexVit) ------------------------------------------------------------------------
def _padded_plan(b: _Builder, s: ViTShape, batch: NaFlexBatch, e: int, train: bool) -> None:
    D, Dh, H, L, p = s.embed_dim, s.hidden, s.num_heads, s.depth, s.prefix_tokens
    K = s.in_chans * s.patch_size ** 2
    lens, S, Np = batch.seq_lens, len(batch.seq_lens), batch.pad_to
    Nk = batch.padded_keep  # patch slots per image in the encoder
    N = Nk + p
    M, Me = S * N, S * Np  # encoder rows; embedded rows
    drop = batch.keep_ratio < 1
    lse = M * H * F32
    ls = s.layer_scale
    att = 4 * S * N * N * D
    mask = S * N * N * e  # the float [B, 1, N, N] mask
    # ---- forward ----
    b.cls = "patch_embed"
    b.addmm(Me, K, D, e, note="patch embedding Linear on every padded row")
    _pos_tables_fwd(b, lens, D, e)
    for n in lens:
        b.ew("aten.index_add_", "x[b, :n] += pos rows", 2 * n * D * e, n * D * e)
    if drop:  # timm PatchDropout (its prefix tokens are not there yet in NaFlexVit: embeds, then dropout)
        b.ew("aten.randn", "noise over every slot", 0, Me * F32)
        b.ew("aten.sort", "argsort of the noise", Me * F32, Me * I64 + Me * F32)
        b.ew("aten.gather", "kept patch rows", S * Nk * I64 + S * Nk * D * e, S * Nk * D * e)
        b.ew("aten.gather", "patch_valid of the kept slots", S * Nk * (I64 + 1), S * Nk)
    b.ew("aten.cat", "cat [reg tokens; patches]", (S * Nk + p) * D * e, M * D * e)
    b.cls = "attention"  # create_attention_mask
    b.ew("aten.cat", "mask: cat [prefix valid; patch_valid]", S * Nk, S * N)
    b.ew("aten.bitwise_and", "mask: valid_i & valid_j [B, 1, N, N] bool", 2 * S * N, S * N * N)
    b.ew("aten.zeros_like", "mask: float zeros [B, 1, N, N]", 0, mask)
    b.ew("aten.bitwise_not", "mask: ~mask_bool", S * N * N, S * N * N)
    b.ew("aten.masked_fill_", "mask: finfo.min where masked", S * N * N + mask, mask)
    for _ in range(L):
        b.cls = "ln_qkv"
        b.layer_norm(M, D, e)
        b.addmm(M, D, 3 * D, e)
        b.cls = "attention"
        b.call("aten._scaled_dot_product_efficient_attention",
               Kernel(name="memory-efficient attention fwd (float mask)", flops=att,
                      bytes_read=3 * M * D * e + mask, bytes_written=M * D * e + lse,
                      note="the [B, 1, N, N] mask read (broadcast over heads: once, L2)"))
        b.cls = "proj"
        b.addmm(M, D, D, e)
        if ls:
            b.layer_scale(M, D, e)
        b.add(M * D, e, "residual")
        b.cls = "mlp"
        b.layer_norm(M, D, e)
        b.addmm(M, D, Dh, e)
        b.call("aten.gelu", Kernel(name="GELU", bytes_read=M * Dh * e, bytes_written=M * Dh * e))
        b.addmm(M, Dh, D, e)
        if ls:
            b.layer_scale(M, D, e)
        b.add(M * D, e, "residual")
    _head_fwd(b, s, M, S * Nk, S, e, padded=True)
    if not train:
        return
    # ---- backward ----
    _head_bwd(b, s, M, S * Nk, S, e, padded=True)
    for _ in range(L):
        b.cls = "mlp"
        if ls:
            b.layer_scale_bwd(M, D, e)
        b.linear_bwd(M, Dh, D, e)
        b.call("aten.gelu_backward", Kernel(name="GELU bwd", bytes_read=2 * M * Dh * e, bytes_written=M * Dh * e))
        b.linear_bwd(M, D, Dh, e)
        b.layer_norm_bwd(M, D, e)
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
        b.cls = "proj"
        if ls:
            b.layer_scale_bwd(M, D, e)
        b.linear_bwd(M, D, D, e)
        b.cls = "attention"
        b.call("aten._scaled_dot_product_efficient_attention_backward",
               Kernel(name="memory-efficient attention bwd delta (dO . O)", bytes_read=2 * M * D * e,
                      bytes_written=lse),
               Kernel(name="memory-efficient attention bwd dQ dK dV (float mask)", flops=10 * S * N * N * D,
                      bytes_read=4 * M * D * e + 2 * lse + mask, bytes_written=3 * M * D * e,
                      note="P recomputed with the mask read again"))
        b.call("aten.stack", Kernel(name="stack dq, dk, dv (permute copy)", bytes_read=3 * M * D * e,
                                    bytes_written=3 * M * D * e))
        b.call("aten.clone", Kernel(name="copy to packed (B, N, 3D) (permute copy)", bytes_read=3 * M * D * e,
                                    bytes_written=3 * M * D * e))
        b.cls = "ln_qkv"
        b.linear_bwd(M, D, 3 * D, e)
        b.layer_norm_bwd(M, D, e)
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
    b.cls = "patch_embed"
    b.ew("aten.sum", "reg_token grad (sum over batch)", S * p * D * e, p * D * e)
    b.ew("aten.slice_backward", "patch rows' grad out of the cat", S * Nk * D * e, S * Nk * D * e)
    if drop:
        b.slice_backward(Me * D, S * Nk * D, e, "gather bwd: zeros + scatter of the kept rows")
    for n in lens:
        b.ew("aten.index_select", "index_add_ bwd: pos rows grad", n * D * e, n * D * e)
    _pos_tables_bwd(b, lens, D, e)
    b.call("aten.mm", Kernel(name="cuBLAS GEMM wgrad", flops=2 * Me * K * D, bytes_read=Me * D * e + Me * K * e,
                             bytes_written=D * K * e, note="patch embedding dW over every padded row"))
    b.ew("aten.sum", "bias-grad reduction", Me * D * e, D * e)


def step_launches(shape: ViTShape, batch: NaFlexBatch, dtype="bf16", path: str = "packed", mode: str = "train",
                  optimizer: bool = True, weight_decay: float = 0.05, gemm_kernel: str = "tma",
                  num_sms: int = cm.REFERENCE_SMS) -> list[Launch]:
    """The modelled launches of one NaFlex training step (``mode="train"``: forward, cross-entropy, backward,
    AdamW) or forward (``"forward"``: logits) over one :class:`NaFlexBatch`.

    Args:
        shape: the model's sizes (e.g. :data:`NAFLEX_SHAPES` ``["naflexvit_base_patch16_gap"]``); prefix tokens p
            = class + register tokens; ``layer_scale`` honoured; ``img_size`` only sizes the optimizer's pos_embed.
        batch: the sequence lengths, timm's padded length and the keep ratio.
        dtype: "bf16" | "fp16" | "fp32": the one dtype of parameters and activations.
        path: "packed" | "padded" (module docstring).
        mode, optimizer, weight_decay, gemm_kernel, num_sms: as :func:`fastvit_kernels.bench.cost_model.step_launches`.

    Returns:
        launches in execution order.

    Raises:
        ValueError: an unknown path / mode / dtype / gemm_kernel; a GELU-MLP LayerNorm ViT is assumed (other
            shapes raise); the packed path of a LayerScale model in fp16 (its blocks keep the eager scale there).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if mode not in cm.MODES:
        raise ValueError(f"mode must be one of {cm.MODES}; got {mode!r}")
    if gemm_kernel not in ("tma", "pointer"):
        raise ValueError(f"gemm_kernel must be 'tma' or 'pointer'; got {gemm_kernel!r}")
    if shape.mlp != "gelu" or shape.norm != "layernorm" or shape.rope or shape.mlp_norm or not shape.qkv_fused \
            or shape.qkv_bias is not True or shape.num_classes < 1:
        raise ValueError("the NaFlex cost model covers LayerNorm / GELU-MLP ViTs with a fused biased qkv and a head "
                         f"(no RoPE); got {shape}")
    e = cm._ELEM[dtype_name(dtype)]
    if path == "packed" and shape.layer_scale and dtype_name(dtype) == "fp16":
        raise ValueError("the packed NaFlex plan folds LayerScale into proj / fc2, which the blocks do not do in fp16 "
                         "compute (fastvit_kernels._blocks.folds_layer_scale); fp16 is not modelled: use bf16 or fp32")
    b = _Builder()
    if path == "packed":
        _packed_plan(b, shape, batch, e, mode == "train", gemm_kernel, num_sms)
    else:
        _padded_plan(b, shape, batch, e, mode == "train")
    if mode == "train" and optimizer:
        cm._adamw(b, shape, e, weight_decay)
    return b.launches


def model_flops(shape: ViTShape, batch: NaFlexBatch, path: str, mode: str = "train") -> int:
    """Model FLOPs (:func:`fastvit_kernels.bench.flops.naflex_model_flops`) of one batch on ``path``: packed
    counts the kept real tokens; padded every slot (N = timm's kept slots), with the embedding over every padded
    row."""
    kind = "train" if mode == "train" else "forward"
    if path == "packed":
        return naflex_model_flops(shape, batch.kept_lens, kind)
    S = len(batch.seq_lens)
    return naflex_model_flops(shape, [1] * S, kind, pad_to=batch.padded_keep, embed_tokens=S * batch.pad_to)


def step_cost(shape: ViTShape, batches, dtype="bf16", path: str = "packed", mode: str = "train",
              peak: Peak | None = None, optimizer: bool = True, launch_overhead_s: float = 0.0,
              gemm_kernel: str = "tma") -> cm.CostSummary:
    """Totals over ``batches`` (one :class:`NaFlexBatch` or a list: one step each) as a
    :class:`~fastvit_kernels.bench.cost_model.CostSummary` (``batch_size``: the images, ``model_flops``: those of
    :func:`model_flops`)."""
    batches = [batches] if isinstance(batches, NaFlexBatch) else list(batches)
    launches = [ln for bt in batches
                for ln in step_launches(shape, bt, dtype, path, mode, optimizer, gemm_kernel=gemm_kernel)]
    images = sum(len(bt.seq_lens) for bt in batches)
    summary = cm.summarize(launches, shape, 1, dtype, path, mode, peak, launch_overhead_s)
    summary.batch_size = images
    summary.model_flops = sum(model_flops(shape, bt, path, mode) for bt in batches)
    return summary


def comparison(shape: ViTShape, batches, dtype="bf16", mode: str = "train", peak: Peak | None = None,
               optimizer: bool = True, gemm_kernel: str = "tma") -> dict:
    """{'packed': CostSummary, 'padded': CostSummary, 'ratio': {'bytes', 'flops', 'model_flops', 'launches'}
    (packed / padded), 'tokens': real tokens kept, 'slots': padded slots} over ``batches``."""
    res = {p: step_cost(shape, batches, dtype, p, mode, peak, optimizer, gemm_kernel=gemm_kernel) for p in PATHS}
    a, b = res["packed"], res["padded"]
    batches = [batches] if isinstance(batches, NaFlexBatch) else list(batches)
    res["ratio"] = {"bytes": a.bytes / b.bytes, "flops": a.flops / b.flops,
                    "model_flops": a.model_flops / b.model_flops, "launches": a.launches / b.launches}
    res["tokens"] = sum(sum(bt.kept_lens) for bt in batches)
    res["slots"] = sum(len(bt.seq_lens) * bt.padded_keep for bt in batches)
    return res


def comparison_table(res: dict, peak: Peak | None = None, title: str = "") -> str:
    """A markdown table of :func:`comparison`'s result, headed MODELLED."""
    a, b = res["packed"], res["padded"]
    head = (f"MODELLED (cost model, no measurement): {title}{a.mode} steps, {a.batch_size} images, "
            f"{res['tokens']} real tokens in {res['slots']} padded slots, {a.dtype}"
            + (f"; roofline peaks: {peak.source}" if peak is not None else ""))
    rows = [head, "", "| quantity | fastvit packed | timm padded + float mask | packed / padded |", "|---|---|---|---|"]

    def ratio(x, y):
        return f"{x / y:.2f}" if y else "n/a"

    rows.append(f"| kernel launches | {a.launches} | {b.launches} | {ratio(a.launches, b.launches)} |")
    rows.append(f"| device-memory bytes | {cm._fmt_bytes(a.bytes)} | {cm._fmt_bytes(b.bytes)} | "
                f"{ratio(a.bytes, b.bytes)} |")
    rows.append(f"| executed matmul FLOPs | {a.flops / 1e12:.3f} T | {b.flops / 1e12:.3f} T | {ratio(a.flops, b.flops)} |")
    rows.append(f"| model FLOPs | {a.model_flops / 1e12:.3f} T | {b.model_flops / 1e12:.3f} T | "
                f"{ratio(a.model_flops, b.model_flops)} |")
    if a.roofline_s is not None and b.roofline_s is not None:
        rows.append(f"| roofline time | {cm._fmt_time(a.roofline_s)} | {cm._fmt_time(b.roofline_s)} | "
                    f"{ratio(a.roofline_s, b.roofline_s)} |")
    rows += ["", "| op class | launches packed / padded | bytes packed / padded | FLOPs packed / padded |",
             "|---|---|---|---|"]
    for c in (*cm.OP_CLASSES, "other"):
        f, g = a.by_class.get(c), b.by_class.get(c)
        if not f and not g:
            continue
        f = f or dict(launches=0, bytes=0, flops=0)
        g = g or dict(launches=0, bytes=0, flops=0)
        rows.append(f"| {cm.OP_CLASS_LABELS[c]} | {f['launches']} / {g['launches']} | {cm._fmt_bytes(f['bytes'])} / "
                    f"{cm._fmt_bytes(g['bytes'])} | {f['flops'] / 1e9:.1f} G / {g['flops'] / 1e9:.1f} G |")
    return "\n".join(rows)
