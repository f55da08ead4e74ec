"""What the launchers hand to CUDA, checked without a GPU and without launching: grids within CUDA's limits at the
largest shapes the package supports, and the fp32 dot precision following PyTorch's matmul setting.

Each kernel object of a launcher's module is replaced (pytest's monkeypatch) by a :class:`_Capture` that records
``kernel[grid](*args, **kwargs)`` instead of running it. A callable grid is evaluated for the launch's own tile
keywords (the interpreter's fixed config) and for every autotune candidate of that kernel, so the check covers
whichever tile a GPU's autotuner picks. Inputs of the grid tests are ``meta`` tensors: shapes and strides, no
storage, so ViT-H/14-sized activations cost nothing.

CUDA limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): gridDim.x <= 2**31 - 1,
gridDim.y and gridDim.z <= 65,535.
"""

from __future__ import annotations

import pytest
import torch

from fastvit_kernels.kernels import _common, gemm_impl, matmul
from fastvit_kernels.kernels.fusion import PROLOGUE_GELU, Epilogue, Gemm, Operand
from fastvit_kernels.kernels import attention as attn

GRID_LIMITS = (2**31 - 1, 65535, 65535)


class _Capture:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records (grids, kwargs) and launches nothing.
    ``configs``: the kernel's autotune candidates (``triton.Config``), each giving one evaluation of a callable
    grid."""

    def __init__(self, configs=()):
        self.configs = list(configs)
        self.calls: list[tuple[list[tuple], dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):
                metas = [kwargs] if "BLOCK_M" in kwargs or "BLOCK_N" in kwargs else []
                metas += [{**kwargs, **c.kwargs} for c in self.configs]
                grids = [tuple(grid(m)) for m in metas]
            else:
                grids = [tuple(grid)]
            self.calls.append((grids, kwargs))

        return launch


def _assert_within_limits(grids, what: str) -> None:
    assert grids, what
    for g in grids:
        assert 1 <= len(g) <= 3, (what, g)
        for axis, (extent, limit) in enumerate(zip(g, GRID_LIMITS)):
            assert 1 <= extent <= limit, f"{what}: grid {g} axis {axis} = {extent} outside [1, {limit}]"


def _capture_attention(monkeypatch) -> dict:
    caps = {}
    for name, kind in (("_attention_fwd_kernel", "fwd"), ("_attention_bwd_dkdv_kernel", "dkdv"),
                       ("_attention_bwd_dq_kernel", "dq"), ("_attention_bwd_fused_kernel", "fused"),
                       ("_attention_bwd_preprocess_kernel", None)):
        configs = attn.attention_configs(kind, None, None, None, None) if kind else ()
        caps[name] = _Capture(configs)
        monkeypatch.setattr(attn, name, caps[name])
    return caps


# (B, N, H, head_dim): per-GPU batch 8192 of ViT-B/16 (12 heads) at 224 px, of ViT-L/16 (16 heads) at 224 and
# 1024 px (N = 64^2 + 1 = 4097), of ViT-H/14 (16 heads, head_dim 80) at 224 px and at 1036 px (N = 74^2 + 1 = 5477).
# The old (row block, B * H) grid put B * H = 131,072 on axis 1.
EXTREME_ATTENTION = [(8192, 197, 12, 64), (8192, 197, 16, 64), (8192, 4097, 16, 64), (8192, 257, 16, 80),
                     (8192, 5477, 16, 80)]


@pytest.mark.parametrize("B,N,H,head_dim", EXTREME_ATTENTION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_grids_within_cuda_limits(monkeypatch, B, N, H, head_dim, dtype):
    caps = _capture_attention(monkeypatch)
    D = H * head_dim
    qkv = torch.empty((B, N, 3 * D), device="meta", dtype=dtype)
    out, lse = attn.attention_fwd(qkv, H, head_dim**-0.5)
    for fused in (False, True):
        attn.attention_bwd(torch.empty_like(out), qkv, out, lse, H, head_dim**-0.5, fused=fused)
    for name, cap in caps.items():
        assert cap.calls, f"{name} was not launched"
        for grids, _ in cap.calls:
            _assert_within_limits(grids, f"{name} B={B} N={N} H={H}")


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_block_head_grid_counts_every_block_of_every_head(block):
    for B, N, H, _ in EXTREME_ATTENTION + [(1, 1, 1, 64), (3, 17, 2, 64)]:
        assert attn.block_head_grid(B, H, N, block) == (-(-N // block) * B * H,)
    assert attn.head_grid(8192, 16) == (131072,)


def test_attention_grid_past_cuda_limit_raises():
    with pytest.raises(ValueError, match="programs"):
        attn.block_head_grid(2**20, 2**10, 2**10, 16)
    with pytest.raises(ValueError, match="B \\* H"):
        attn.head_grid(2**22, 2**10)


def test_row64_only_for_rows_past_int32(monkeypatch):
    """int64 row offsets (the kernels' ROW64) exactly when some (N - 1) * stride_n + width passes 2**31 - 1: never
    for dense ViT activations (ViT-H/14, batch 8192, N = 5477: 21 M elements per row span), always for a
    sequence-first view of a large batch."""
    caps = _capture_attention(monkeypatch)
    B, N, H, hd = 8192, 5477, 16, 80
    qkv = torch.empty((B, N, 3 * H * hd), device="meta", dtype=torch.float16)
    out, lse = attn.attention_fwd(qkv, H, 0.1)
    attn.attention_bwd(torch.empty_like(out), qkv, out, lse, H, 0.1, fused=False)
    seq_first = torch.empty((N, B, 3 * H * hd), device="meta", dtype=torch.float16).transpose(0, 1)
    attn.attention_fwd(seq_first, H, 0.1)
    row64 = {name: [kw["ROW64"] for _, kw in cap.calls] for name, cap in caps.items() if cap.calls}
    assert row64 == {"_attention_fwd_kernel": [False, True], "_attention_bwd_preprocess_kernel": [False],
                     "_attention_bwd_dkdv_kernel": [False], "_attention_bwd_dq_kernel": [False]}
    edge = torch.empty((1, 3, 48), device="meta").as_strided((1, 3, 48), (0, 2**30 - 24, 1))
    assert not attn.needs_row64(3, edge)  # last element at 2 * (2**30 - 24) + 47 = 2**31 - 1
    assert attn.needs_row64(3, edge.as_strided((1, 3, 48), (0, 2**30 - 23, 1)))


def test_cublas_path_elementwise_grids_within_cuda_limits(monkeypatch):
    """The cuBLAS path's prologue / epilogue kernels on a (64, 2**23) operand / product: 131,072 column tiles (a
    token-major operand used transposed, 8192 images x 1024 tokens)."""
    caps = {name: _Capture() for name in ("_operand_prologue_kernel", "_gemm_epilogue_kernel")}
    for name, cap in caps.items():
        monkeypatch.setattr(gemm_impl, name, cap)
    R, C = 64, 2**23
    gemm_impl._prologue(torch.empty((R, C), device="meta", dtype=torch.float16), PROLOGUE_GELU.value, None, False,
                        torch.float16)
    a = torch.empty((R, 64), device="meta", dtype=torch.float16)
    b = torch.empty((64, C), device="meta", dtype=torch.float16)
    c = torch.empty((R, C), device="meta", dtype=torch.float16)
    gemm_impl.cublas_gemm(Gemm(Operand.matrix(a), Operand.matrix(b), Operand.matrix(c), R, C, 64,
                               epilogue=Epilogue(bias=torch.empty(C, device="meta", dtype=torch.float16))))
    for name, cap in caps.items():
        assert len(cap.calls) == 1, name
        _assert_within_limits(cap.calls[0][0], name)
    assert gemm_impl.tile_grid(R, C, 32, 64) == (2 * 2**17,)


# ------------------------------------------------------------------------------------------------------------
# fp32 dot precision
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_matmul_precision():
    """Put PyTorch's fp32 matmul setting back as the test found it (through the legacy setter, which leaves every
    getter usable after a test mixed the legacy and new APIs)."""
    saved = torch.get_float32_matmul_precision()
    saved_generic = torch.backends.fp32_precision
    yield
    torch.backends.fp32_precision = saved_generic
    torch.set_float32_matmul_precision(saved)
    assert torch.get_float32_matmul_precision() == saved


def _allow_high():
    torch.set_float32_matmul_precision("high")


def _allow_medium():
    torch.set_float32_matmul_precision("medium")


def _allow_legacy_flag():
    torch.backends.cuda.matmul.allow_tf32 = True


def _allow_new_api():
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _highest():
    torch.set_float32_matmul_precision("highest")


def _new_api_ieee():
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.fp32_precision = "ieee"


# (how the user sets it, the fp32 precision cuBLAS then uses)
SETTINGS = [(lambda: None, "ieee"), (_highest, "ieee"), (_allow_high, "tf32"), (_allow_medium, "tf32"),
            (_allow_legacy_flag, "tf32"), (_allow_new_api, "tf32"), (_new_api_ieee, "ieee")]
SETTING_IDS = ["default", "highest", "high", "medium", "allow_tf32", "fp32_precision-tf32", "fp32_precision-ieee"]


@pytest.mark.parametrize("setting,expected", SETTINGS, ids=SETTING_IDS)
def test_dot_precision_follows_torch_matmul_setting(restore_matmul_precision, setting, expected):
    setting()
    assert _common.dot_precision(torch.float32) == expected
    assert _common.fp32_matmul_allows_tf32() == (expected == "tf32")
    # 16-bit operands: Triton's default, whatever the setting (it only concerns fp32 operands)
    assert _common.dot_precision(torch.float16) == _common.dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("setting,expected", SETTINGS, ids=SETTING_IDS)
def test_attention_launches_pass_the_fp32_precision(monkeypatch, restore_matmul_precision, setting, expected):
    caps = _capture_attention(monkeypatch)
    setting()
    B, N, H, hd = 1, 8, 1, 16
    qkv = torch.randn(B, N, 3 * H * hd)
    out, lse = attn.attention_fwd(qkv, H, 0.25)
    for fused in (False, True):
        attn.attention_bwd(torch.randn_like(out), qkv, out, lse, H, 0.25, fused=fused)
    seen = {name: [kw["INPUT_PRECISION"] for _, kw in cap.calls] for name, cap in caps.items()
            if name != "_attention_bwd_preprocess_kernel"}  # no dot: no precision
    assert seen == {"_attention_fwd_kernel": [expected], "_attention_bwd_dkdv_kernel": [expected],
                    "_attention_bwd_dq_kernel": [expected], "_attention_bwd_fused_kernel": [expected]}
    # fp16 inputs are unaffected by the fp32 setting
    caps["_attention_fwd_kernel"].calls.clear()
    attn.attention_fwd(qkv.half(), H, 0.25)
    assert caps["_attention_fwd_kernel"].calls[0][1]["INPUT_PRECISION"] == "tf32"


@pytest.mark.parametrize("setting,expected", SETTINGS[:3], ids=SETTING_IDS[:3])
def test_gemm_launch_passes_the_fp32_precision(monkeypatch, restore_matmul_precision, setting, expected):
    cap = _Capture()
    cap.fn = cap  # stands in for the autotuner and, without autotuning, for its kernel
    monkeypatch.setattr(matmul, "_matmul_autotuned", cap)
    monkeypatch.setenv("FASTVIT_GEMM_IMPL", "triton")
    monkeypatch.setenv("FASTVIT_GEMM_KERNEL", "pointer")
    setting()
    matmul.linear(torch.randn(4, 32), torch.randn(16, 32))
    assert [kw["DOT_PRECISION"] for _, kw in cap.calls] == [expected]
