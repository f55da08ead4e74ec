"""Tile configurations (autotune candidates) of the GEMM core's kernels, for the pointer kernels
(:mod:`~fastvit_kernels.kernels.matmul`) and the TMA kernels (:mod:`~fastvit_kernels.kernels.matmul_tma`) alike:
both import this module, neither imports the other's candidates.

Tiles follow Triton's matmul tutorial (grouped tile order for L2 reuse, :func:`fusion.tile_coords`). The candidates
of :func:`gemm_configs` (pruned by :func:`keep`) are autotuned with ``triton.autotune`` on a GPU, keyed on the M
bucket, N, K, the operand dtypes and every constexpr flag; ``FASTVIT_AUTOTUNE=0`` launches the first candidate
instead, and the interpreter always runs one fixed configuration (:data:`INTERPRETER_CONFIG`: few, large tiles =
few Python steps). Every candidate is compiled for sm_80 / sm_90 by ``python -m fastvit_kernels.aot check`` (no
spills); each prune below names the check that called for it. Which candidate wins is a GPU measurement.
"""

from __future__ import annotations

import torch
import triton

from .._env import autotune_requested, interpreter_enabled
from ._common import NEWER_TRITON, TRITON_3_6, triton_version

INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)


def autotune_enabled() -> bool:
    """Autotune on a GPU unless ``FASTVIT_AUTOTUNE=0`` (then the first candidate runs); never under the
    interpreter."""
    return not interpreter_enabled() and autotune_requested()


def keep(cfg: triton.Config, dtype: torch.dtype, split: bool, dgelu: bool = False, b_gelu: bool = False,
         glu: bool = False, rope: int = 0, residual: bool = False, b_ln: bool = False,
         gelu_no_bias: bool = False) -> bool:
    """Whether candidate ``cfg`` stays in the autotune set for operands of ``dtype`` (``split``: an index is
    split, the patch-embed GEMMs; ``dgelu``: the GELU' epilogue; ``b_gelu``: GELU on B's load, fc2's weight
    gradient; ``glu``: the SwiGLU epilogue or its derivative, see :func:`gemm_configs`). Each prune below says
    what found the problem.

    * fp32 (IEEE dots on the FMA units, operand tiles in registers): 4 warps spilled 300-2600 B per thread with a
      B-operand prologue (LayerNorm / GELU) or a split index (AOT check, sm_80 / sm_90, Triton 3.9).
    * split indices: ``_split_offsets`` divides in int32 (int64 division compiles to subroutine calls that
      spilled 24-1400 B); a deeper K step still does not fit: 128 x 128 x 64 with 8 warps spilled 24-264 B per
      thread in the patch-embed forward (split m / k + bias + residual, 255 registers) on sm_80 and sm_90.
      Token steps (``fusion.TokenGather``, mask token, position rows) take the split list: the patch_embed_tokens
      forward (row gather + row map + bias + mask token + position rows) spilled 240-280 B per thread with
      128 x 128 x 64 and 8 warps on sm_80 / sm_90 (AOT check, Triton 3.8).
    * Triton before ``NEWER_TRITON`` (AOT check, Triton 3.6, ViT-B/16 + ViT-H/14 bf16, sm_80 / sm_90): with a split
      index both 16-bit tiles of the newer list spilled 8-640 B per thread (patch 14 worst), while 128 x 64 x 32
      with 8 warps and 64 x 64 x 32 with 4 warps (3 stages) built clean: those are the split list there (see
      :func:`gemm_configs`); the GELU' epilogue spilled 8 B with 128 x 128 x 32 on sm_80.
    * Triton before ``TRITON_3_6`` (AOT check, Triton 3.4, same workload): GELU on B's load with A's row sums
      spilled 8 B with 128 x 64 x 32 / 4 warps on sm_80.
    * The fusions of the modern blocks (AOT check, ViT-B/16 + ViT-H/14 bf16 / fp16 with the RoPE, RMSNorm, SwiGLU
      and bias-free workloads; ViT-H's SwiGLU width 3413 is not a multiple of 16), on every Triton: a residual
      epilogue without a bias or after a LayerNorm prologue (``residual``) spilled 40-456 B with 128 x 128 x 64 and
      with 4 warps (Triton 3.4 and 3.9); a weight-grad GEMM with LayerNorm on B's load run alone (``b_ln``) 24-104 B
      with 128 x 128 x 64 (3.4); the GELU epilogue without a bias (``gelu_no_bias``: fc1 of a bias-free MLP) 8 B
      with 4 warps on sm_80 (3.8 and 3.9). Before ``NEWER_TRITON`` (3.4): the RoPE GEMMs 8-456 B with every 4-warp tile and,
      in the forward, every default tile (``rope``: the half-size list, 8 warps), and the rotate_half weight
      gradient 16 B with 128 x 64 on sm_90 (3.8); the SwiGLU derivative 48 B with 64 x 128 on sm_90 (``glu``).
    """
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    if dtype == torch.float32 and cfg.num_warps < 8:
        return False
    if split and bk >= 64 and bm * bn >= 128 * 128:
        return False
    if triton_version() < NEWER_TRITON and dtype != torch.float32:
        if split and (bm, bn, bk, cfg.num_warps) in ((128, 128, 32, 8), (128, 64, 32, 4)):
            return False
        if dgelu and (bm, bn, bk) == (128, 128, 32):
            return False
        if b_gelu and cfg.num_warps < 8 and triton_version() < TRITON_3_6:
            return False
        if rope and cfg.num_warps < 8:
            return False
        if rope in (2, 3) and (bm, bn) == (128, 64):
            return False
        if glu and (bm, bn) == (64, 128):
            return False
    if dtype != torch.float32 and not split:
        if (residual or b_ln) and bk >= 64:
            return False
        if (residual or gelu_no_bias) and cfg.num_warps < 8:
            return False
    return True


def gemm_configs(dtype: torch.dtype, split: bool = False, arch: int | None = None,
                 dgelu: bool = False, b_gelu: bool = False, glu: bool = False, rope: int = 0,
                 residual: bool = False, b_ln: bool = False, gelu_no_bias: bool = False) -> list[triton.Config]:
    """Autotune candidates for the GEMM core, the default candidate first: ``triton.Config`` with BLOCK_M / BLOCK_N /
    BLOCK_K / GROUP_M, num_warps, num_stages. ``dtype``: the dot's operand dtype (fp16 and bf16 share a list);
    ``split``: an index is split; ``dgelu``, ``b_gelu``: as in :func:`keep`; ``arch``: compute capability (80,
    90, ...) — the lists are the same for sm_80 and sm_90 (the AOT check builds every candidate for both; the
    recorder that traces the launches has no device to ask), the argument is there for a target-specific list when
    measurements call for one.

    fp32 (IEEE dots, the FMA units): one 64 x 64 x 32 tile with 8 warps; 2 stages, but 1 stage where an index is
    split: the patch-embed fp32 launches left 8-16 B on the stack with 2 stages (AOT check, sm_80 / sm_90, Triton
    3.9), none with 1.

    The 16-bit list starts from Triton's matmul tutorial (03) tiles: 128 x 128 x 32 with 8 warps and 3 stages,
    a deeper K step, and a narrower N tile with 4 warps for launches with few tiles. Triton before
    ``NEWER_TRITON`` adds two smaller tiles for split indices, the only ones that build clean there (see
    :func:`keep`).

    ``glu`` (the SwiGLU epilogue, two accumulators, or its derivative, two stored-pre-activation tiles and two
    output tiles per accumulator tile), 16-bit: half-size tiles, 128 x 64 / 64 x 128 x 32 with 8 warps and 64 x 64
    x 32 with 4. The 16-bit list above spilled there: the SwiGLU forward 8-3816 B per thread on sm_80 (every
    tile; 128 x 128 also 16-48 B on sm_90), the derivative 72-264 B with every tile on sm_80 and sm_90 (AOT check,
    ViT-B/16 bf16, Triton 3.9). The fp32 tile built clean.

    ``rope_bwd`` (the RoPE GEMMs of the backward: d(qkv) loaded twice, value and pair partner, and un-rotated on
    load), 16-bit: the same half-size tiles. The list above spilled there: 128 x 128 x 64 and 128 x 64 x 32 with 4
    warps 8-704 B per thread (both roles, sm_80 / sm_90), and 128 x 128 x 32 56-64 B in the rotate_half weight
    gradient; the half-size tiles built clean (AOT check, ViT-B/16 bf16, Triton 3.9). The forward's RoPE epilogue
    builds clean with the default list.
    """
    del arch  # same candidates on every target (see docstring)
    if dtype == torch.float32:
        cands = [(64, 64, 32, 8, 1)] if split else [(64, 64, 32, 8, 2)]
    elif glu or rope in (2, 3) or (rope and triton_version() < NEWER_TRITON):
        cands = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
    else:
        cands = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4)]
        if split and triton_version() < NEWER_TRITON:
            cands += [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)]
    out = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in cands]
    out = [c for c in out if keep(c, dtype, split, dgelu, b_gelu, glu, rope, residual, b_ln, gelu_no_bias)]
    assert out, f"no GEMM configuration survives keep() for {dtype}, split={split}, dgelu={dgelu}, " \
                f"b_gelu={b_gelu}, glu={glu}, rope={rope}, residual={residual}, b_ln={b_ln}, " \
                f"gelu_no_bias={gelu_no_bias}"
    return out


def pair_configs(dtype: torch.dtype) -> list[triton.Config]:
    """Candidates of the pointer kernel's pair form: those of :func:`gemm_configs` for unsplit operands, without the
    4-warp tile (128 x 64 x 32, 4 warps, 4 stages left 8 B per thread on the stack in the proj pair on sm_80: AOT
    check, Triton 3.9); before ``NEWER_TRITON`` also without the deep K step (128 x 128 x 64 left 8 B in the qkv
    pair, LayerNorm prologue + row sums, on sm_80: AOT check, Triton 3.6)."""
    old = triton_version() < NEWER_TRITON
    return [c for c in gemm_configs(dtype) if c.num_warps >= 8 and not (old and c.kwargs["BLOCK_K"] >= 64)]


def tma_configs(dtype: torch.dtype, pair: bool = False, pre_hook=None, b_gelu: bool = False) -> list[triton.Config]:
    """Candidates of the TMA kernel (``pair``: of its pair form; ``b_gelu``: a problem of the pair recomputes GELU
    on B's load, fc2's dW2), default first: the 16-bit tiles of :func:`gemm_configs` with deeper pipelines (TMA
    copies need no registers in flight), each with ``pre_hook`` (the TMA module's block-shape hook). Prunes of the
    pair form:

    * before ``TRITON_3_6``: the deep K step: the qkv pair (LayerNorm prologue + row sums) spilled 424 B on sm_90
      (AOT check, Triton 3.4);
    * before ``NEWER_TRITON``, with ``b_gelu``: the 4-warp tile: fc2's pair (GELU on B's load + row sums | GELU')
      spilled 16 B with 128 x 64 x 32 on sm_90 (AOT check, Triton 3.8; 3.6 built it clean, 3.7 is unchecked).
    """
    out = []
    for c in gemm_configs(dtype):
        if pair and c.kwargs["BLOCK_K"] >= 64 and triton_version() < TRITON_3_6:
            continue
        if pair and b_gelu and c.num_warps < 8 and triton_version() < NEWER_TRITON:
            continue
        stages = c.num_stages if dtype == torch.float32 else max(c.num_stages, 3)
        out.append(triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages, pre_hook=pre_hook))
    return out


def launch_config(c: triton.Config) -> dict:
    """A candidate as launch keywords (tiles, num_warps, num_stages)."""
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def fixed_config(candidates: list[triton.Config]) -> dict:
    """The configuration a launch uses without autotuning, as launch keywords: :data:`INTERPRETER_CONFIG` under the
    interpreter, else the first of ``candidates``."""
    if interpreter_enabled():
        return dict(INTERPRETER_CONFIG)
    return launch_config(candidates[0])


def config_id(c: triton.Config) -> tuple:
    """A hashable identity of a candidate (tiles, warps, stages)."""
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


def union(lists) -> list[triton.Config]:
    """The candidates of several lists, each once (first occurrence kept): what an autotuner holds; its
    ``early_config_prune`` then picks one list per launch (:func:`pick`)."""
    return list({config_id(c): c for cands in lists for c in cands}.values())


def pick(configs: list, wanted: list[triton.Config]) -> list:
    """The autotuner's own objects of ``configs`` that are in ``wanted``, in ``wanted``'s order."""
    by_id = {config_id(c): c for c in configs}
    return [by_id[config_id(c)] for c in wanted if config_id(c) in by_id]
