"""Kernel plan of :func:`fastvit_kernels.ops.patch_embed_tokens`: the patch-embedding GEMM of pre-patchified tokens
with token selection inside it (docs/design.md, "Token selection in the patch-embedding GEMM").

Forward, one GEMM-core launch (:class:`~.fusion.Gemm` with a :class:`~.fusion.TokenGather`): A's row m is the
patch row ``src[m]`` (``src = b * N + ids_keep[b, j]`` in the 3-D form, ``ids_keep[m]`` packed), the epilogue adds
the bias, substitutes the mask token and adds ``pos[pos_index[src[m]]]``, and C's row m is stored at its place
behind its sequence's prefix rows (``c_rows``); the prefix rows are then written by one small copy. No gathered
patch tensor and no concatenated output is ever stored.

Backward (deterministic: no atomics, fixed-order sums):

* ``dW = dY_kept^T @ patches[src]``: one GEMM whose k axis is the tokens, gathered on A's columns (the output rows
  ``c_rows``, masked tokens as -1: a zero column, since the mask token replaced their embedding) and on B's rows
  (``src``); its A row sums are the bias gradient;
* d patches (only when patches require grad): ``dY_kept @ W`` (A rows gathered, masked rows zero), then summed
  into the source rows by :func:`segment_sum` (unselected rows zero; a patch selected twice gets both rows);
* d pos, d mask_token, d prefix (and d bias without the weight GEMM): :func:`segment_sum` of gradient rows by key.

:func:`segment_sum` is the scatter-add without atomics: the keys are sorted once (``torch.sort(stable=True)``,
deterministic), each key's segment is found with ``torch.searchsorted``, and one program per (key, column block)
sums its rows in sorted order in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .fusion import Epilogue, Gemm, Operand, TokenGather
from .matmul import gemm

SEGMENT_BLOCK_T = 32
SEGMENT_BLOCK_D = 64


@triton.jit
def _segment_sum_kernel(
    x_ptr,  # (X, D) rows to sum, row stride stride_x, unit column stride
    order_ptr,  # (T,) int64: the row of x of each sorted entry
    bounds_ptr,  # (R + 1,) int64: key r's entries are sorted positions [bounds[r], bounds[r + 1])
    out_ptr,  # (R, D) fp32 contiguous
    D, stride_x,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (key, column block): its segment's rows in sorted order, fp32, a fixed reduction tree
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    r = pid // n_d
    cols = (pid - r * n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < D
    start = tl.load(bounds_ptr + r)
    end = tl.load(bounds_ptr + r + 1)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for i0 in range(start, end, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        mask_i = i < end
        row = tl.load(order_ptr + i, mask=mask_i, other=0)
        acc += tl.load(x_ptr + row[:, None] * stride_x + cols[None, :], mask=mask_i[:, None] & mask_c[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=mask_c)


def segment_sum(x: torch.Tensor, keys: torch.Tensor, R: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic scatter-add: ``out[r] = sum of x[rows[i]] over the entries i with keys[i] == r`` (R, D) fp32.

    Args:
        x: (X, D) with unit column stride, any float dtype. keys: (T,) int, in [-1, R) (-1: the entry is dropped).
        R: rows of the result. rows: (T,) int rows of x, or None (entry i is row i; T == X).

    The entries are sorted by key with a stable sort, so each key's rows are summed in their original order, and
    the sum of one key is a fixed tree over blocks of :data:`SEGMENT_BLOCK_T` rows: the same bits on every run.
    """
    D = x.shape[1]
    out = torch.zeros((R, D), device=x.device, dtype=torch.float32)
    if R == 0 or D == 0 or keys.numel() == 0:
        return out
    sorted_keys, perm = torch.sort(keys.to(torch.int64), stable=True)
    order = perm if rows is None else rows.to(torch.int64).index_select(0, perm)
    bounds = torch.searchsorted(sorted_keys, torch.arange(R + 1, device=x.device, dtype=torch.int64))
    launch(_segment_sum_kernel, (R * triton.cdiv(D, SEGMENT_BLOCK_D),), x, order.contiguous(), bounds, out, D,
           x.stride(0), BLOCK_T=SEGMENT_BLOCK_T, BLOCK_D=SEGMENT_BLOCK_D)
    return out


def token_rows(patches_shape: tuple, ids_keep: torch.Tensor | None, n_prefix: int,
               cu_seqlens: torch.Tensor | None, device) -> tuple:
    """The index tensors of a launch: (src, c_rows, prefix_rows, M, total_rows).

    src: (M,) int64 patch row of each kept token (None: all rows in order); c_rows: (M,) int64 output row of each
    kept token (None: row m, no prefix); prefix_rows: (S * n_prefix,) int64 output rows of the prefix rows (prefix
    slot j of sequence s at entry s * n_prefix + j) or None; M kept tokens; total_rows of the output.
    """
    if len(patches_shape) == 3:
        B, N, _ = patches_shape
        n_keep = N if ids_keep is None else ids_keep.shape[1]
        src = None if ids_keep is None else (ids_keep + torch.arange(B, device=device)[:, None] * N).reshape(-1)
        M = B * n_keep
        if not n_prefix:
            return src, None, None, M, M
        m = torch.arange(M, device=device)
        seq = m // max(n_keep, 1)
        starts = torch.arange(B, device=device) * (n_prefix + n_keep)
    else:
        M = patches_shape[0] if ids_keep is None else ids_keep.shape[0]
        src = ids_keep
        if not n_prefix:
            return src, None, None, M, M
        cu = cu_seqlens.to(torch.int64)
        S = cu.numel() - 1
        m = torch.arange(M, device=device)
        seq = torch.searchsorted(cu[1:], m, right=True)
        B = S
        starts = cu[:-1] + torch.arange(S, device=device) * n_prefix
    c_rows = m + (seq + 1) * n_prefix
    prefix_rows = (starts[:, None] + torch.arange(n_prefix, device=device)[None, :]).reshape(-1)
    return src, c_rows, prefix_rows, M, M + B * n_prefix


def patch_embed_tokens_fwd(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           pos: torch.Tensor | None, pos_index: torch.Tensor | None, ids_keep: torch.Tensor | None,
                           mask: torch.Tensor | None, mask_token: torch.Tensor | None, prefix: torch.Tensor | None,
                           cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The forward of :func:`fastvit_kernels.ops.patch_embed_tokens` on validated inputs (see the module
    docstring): (total_rows, D) in the 2-D form, (B, n_prefix + N_keep, D) in the 3-D form."""
    K = patches.shape[-1]
    D = weight.shape[0]
    n_prefix = 0 if prefix is None else prefix.shape[0]
    src, c_rows, prefix_rows, M, total = token_rows(tuple(patches.shape), ids_keep, n_prefix, cu_seqlens,
                                                    patches.device)
    x = patches.reshape(-1, K)
    out = torch.empty((total, D), device=patches.device, dtype=patches.dtype)
    pidx = None
    if pos is not None:
        pidx = pos_index.reshape(-1)
        pidx = pidx if src is None else pidx.index_select(0, src)
    gemm(Gemm(Operand.matrix(x), Operand.matrix_t(weight), Operand.matrix(out), M, D, K,
              epilogue=Epilogue(bias=bias, mask=None if mask is None else mask.reshape(-1).contiguous(),
                                mask_token=mask_token, pos=pos, pos_index=pidx),
              gather=TokenGather(a_rows=src, c_rows=c_rows)))
    if n_prefix:
        reps = prefix_rows.numel() // n_prefix
        out.index_copy_(0, prefix_rows, prefix.to(out.dtype).repeat(reps, 1))
    if patches.dim() == 3:
        return out.view(patches.shape[0], -1, D)
    return out


def patch_embed_tokens_bwd(dout: torch.Tensor, patches: torch.Tensor, weight: torch.Tensor,
                           pos_rows: int, pos_index: torch.Tensor | None, ids_keep: torch.Tensor | None,
                           mask: torch.Tensor | None, n_prefix: int, cu_seqlens: torch.Tensor | None,
                           needs: tuple) -> tuple:
    """The backward of :func:`patch_embed_tokens_fwd` (see the module docstring). ``needs``: booleans (patches,
    weight, bias, pos, mask_token, prefix) gradients wanted; ``pos_rows``: R of pos. Returns the six gradients
    (an empty tensor for one not wanted), each in its input's dtype (pos / mask_token / prefix / bias: dout's)."""
    need_x, need_w, need_b, need_pos, need_tok, need_pre = needs
    K = patches.shape[-1]
    D = weight.shape[0]
    dev = dout.device
    src, c_rows, prefix_rows, M, total = token_rows(tuple(patches.shape), ids_keep, n_prefix, cu_seqlens, dev)
    dy = dout.reshape(total, D)
    x = patches.reshape(-1, K)
    flat_mask = None if mask is None else mask.reshape(-1)
    # the output row of each kept token, -1 for a masked one (its embedding was replaced: no weight / bias /
    # patch gradient)
    rows = c_rows
    if flat_mask is not None:
        base = c_rows if c_rows is not None else torch.arange(M, device=dev)
        rows = torch.where(flat_mask, -1, base)
    dw, db = dout.new_empty(0), dout.new_empty(0)
    if need_w and M:
        dw = torch.empty((D, K), device=dev, dtype=weight.dtype)
        db32 = torch.empty((D,), device=dev, dtype=torch.float32) if need_b else None
        gemm(Gemm(Operand.matrix_t(dy), Operand.matrix(x), Operand.matrix(dw), D, K, M,
                  epilogue=Epilogue(a_rowsum=db32), gather=TokenGather(a_cols=rows, b_rows=src)))
        if need_b:
            db = db32.to(dout.dtype)
    elif need_w:
        dw = torch.zeros((D, K), device=dev, dtype=weight.dtype)
    kept = c_rows if c_rows is not None else torch.arange(M, device=dev)
    if need_b and not (need_w and M):
        keys = torch.zeros(M, device=dev, dtype=torch.int64)
        if flat_mask is not None:
            keys = torch.where(flat_mask, -1, keys)
        db = segment_sum(dy, keys, 1, rows=kept)[0].to(dout.dtype)
    dx = dout.new_empty(0)
    if need_x:
        dsel = torch.empty((M, K), device=dev, dtype=patches.dtype)
        gemm(Gemm(Operand.matrix(dy), Operand.matrix(weight), Operand.matrix(dsel), M, K, D,
                  gather=TokenGather(a_rows=rows if rows is not None else None)))
        if src is None:
            dx = dsel.view(patches.shape)
        else:
            dx = segment_sum(dsel, src, x.shape[0]).to(patches.dtype).view(patches.shape)
    dpos = dout.new_empty(0)
    if need_pos:
        pidx = pos_index.reshape(-1)
        pidx = pidx if src is None else pidx.index_select(0, src)
        dpos = segment_sum(dy, pidx, pos_rows, rows=kept).to(dout.dtype)
    dtok = dout.new_empty(0)
    if need_tok:
        keys = torch.where(flat_mask, 0, -1)
        dtok = segment_sum(dy, keys, 1, rows=kept)[0].to(dout.dtype)
    dpre = dout.new_zeros((0, D)) if need_pre else dout.new_empty(0)
    if need_pre and n_prefix:
        keys = torch.arange(n_prefix, device=dev).repeat(prefix_rows.numel() // n_prefix)
        dpre = segment_sum(dy, keys, n_prefix, rows=prefix_rows).to(dout.dtype)
    return dx, dw, db, dpos, dtok, dpre
