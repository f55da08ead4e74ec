"""The GEMM core's fusion description: one typed record of a GEMM launch that every form of the core reads.

A launch computes ``C = epilogue(prologue_A(A) @ prologue_B(B))`` (docs/design.md, "The GEMM core"). It is
described once, by :class:`Gemm`:

* operands (:class:`Operand`): a tensor viewed as a logical matrix through its strides, optionally walked through
  the three-level index split of :class:`IndexMap` (the patch embedding's im2col-in-the-load) with
  :class:`ImageBounds` (zero padding of an image operand);
* one prologue per operand, applied as a tile is loaded: :class:`LayerNorm` (also RMSNorm, from a zero mean),
  :class:`Gelu`, :class:`Cast` or :class:`ChannelAffine` (or none), and on B :class:`SwiGLU` (``silu(B) * B2`` of
  a second B operand);
* the :class:`Epilogue` steps, in this order: + bias, * GELU'(pre-activation) (activation derivative), GELU with
  the pre-activation stored, + residual; and A's row sums (a bias gradient) from the A tiles the main loop loads;
* token selection (:class:`TokenGather`): rows of A gathered by an index tensor (MAE / iBOT token selection in the
  patch-embedding GEMM), the token axis of a weight-grad GEMM gathered on A's columns and B's rows, C's rows written
  through a row map (prefix rows left for a small copy), index -1 = a zero row / a row not written; and the epilogue
  steps after the bias, mask-token select ``where(mask[m], mask_token[n], acc)`` then + ``pos[pos_index[m], n]``;
* the SwiGLU steps (Shazeer 2020, "GLU Variants Improve Transformer"): a second B operand ``b2`` (the up
  projection) read beside B (the gate) into a second accumulator, ``silu(gate + bias) * (up + up_bias)`` in the
  epilogue with the (gate | up) pre-activation stored (:attr:`Epilogue.swiglu`), and its derivative, two output
  tiles d gate | d up, in the epilogue of the GEMM producing dH (:attr:`Epilogue.swiglu_grad_of`).

Readers: the pointer kernels and the TMA kernel of :mod:`~fastvit_kernels.kernels.matmul` /
:mod:`~fastvit_kernels.kernels.matmul_tma` take :meth:`Fusion.constexprs`, the cuBLAS path
(:func:`fastvit_kernels.kernels.gemm_impl.cublas_gemm`) runs the same steps around ``torch.mm``, the path rule keys
on :attr:`Fusion.name`, and the cost model (:mod:`fastvit_kernels.bench.cost_model`) and the pair launchers ask
:func:`pair_plan` whether two backward GEMMs share a launch. :class:`Fusion` is the tensor-free part (kinds and
flags only), so the cost model and the AOT recorder can build and read it without tensors.

The device side of the description is here too: the prologue kinds are the named constexpr constants
``PROLOGUE_*`` (never bare numbers), and the prologue / epilogue steps are the ``@triton.jit`` helpers below, which
every kernel form calls, so a new step is written once for the Triton forms (docs/design.md, "Adding a fusion").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import triton
import triton.language as tl

from .._checks import check_gelu_approximate
from ._common import gelu, gelu_grad

# operand prologue kinds: the A_PROLOGUE / B_PROLOGUE constexprs of every GEMM kernel
PROLOGUE_NONE = tl.constexpr(0)
PROLOGUE_LN = tl.constexpr(1)  # LayerNorm from fp32 row statistics (stats along the operand's rows, affine along cols)
PROLOGUE_GELU = tl.constexpr(2)  # GELU recomputed from a stored pre-activation
PROLOGUE_CAST = tl.constexpr(3)  # conversion to the other operand's dtype
PROLOGUE_AFFINE = tl.constexpr(4)  # per-channel v * scale[c] + shift[c] in fp32, then that conversion
PROLOGUE_SWIGLU = tl.constexpr(5)  # B only: silu(B) * B2 recomputed from the stored (gate | up) pre-activation
PROLOGUE_NAMES = {0: "none", 1: "ln", 2: "gelu", 3: "cast", 4: "affine", 5: "swiglu"}

# which operand carries the image bounds: the IMG_BOUNDS constexpr of the split-index kernel
BOUNDS_NONE = tl.constexpr(0)
BOUNDS_A = tl.constexpr(1)
BOUNDS_B = tl.constexpr(2)
BOUNDS_C = tl.constexpr(3)
BOUNDS_OF = {None: 0, "a": 1, "b": 2, "c": 3}  # ImageBounds.operand -> IMG_BOUNDS

# where a launch applies 2D RoPE: the ROPE constexpr of the RoPE form (Rope.role)
ROPE_NONE = tl.constexpr(0)
ROPE_OUT = tl.constexpr(1)  # rotate the output columns (the qkv GEMM's forward epilogue)
ROPE_A_COLS = tl.constexpr(2)  # inverse rotation of A's columns on load (dgrad: d(qkv) @ W)
ROPE_A_ROWS = tl.constexpr(3)  # inverse rotation of A's rows on load (wgrad: d(qkv)^T @ LayerNorm(x))
ROPE_ROLES = {"out": 1, "a_cols": 2, "a_rows": 3}


# ------------------------------------------------------------------------------------------------------------------
# host side: the description
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """A tensor viewed as a logical matrix. ``rows`` / ``cols`` give each axis's strides in elements: an int for a
    plain axis (expanded to (D1 * s, D2 * s, s) when that index is split, so plain and split operands can share an
    index), or an (s1, s2, s3) triple for an axis walked through the three-level split of :class:`IndexMap`."""

    tensor: torch.Tensor
    rows: int | tuple
    cols: int | tuple

    @staticmethod
    def matrix(t: torch.Tensor) -> "Operand":
        """A 2-D tensor as it is: (R, C)."""
        assert t.dim() == 2
        return Operand(t, t.stride(0), t.stride(1))

    @staticmethod
    def matrix_t(t: torch.Tensor) -> "Operand":
        """A 2-D tensor transposed: logical (C, R), no copy."""
        assert t.dim() == 2
        return Operand(t, t.stride(1), t.stride(0))

    def t(self) -> "Operand":
        """The transposed view of this operand."""
        return Operand(self.tensor, self.cols, self.rows)

    @property
    def plain(self) -> bool:
        """Both axes have one stride (no three-level split)."""
        return isinstance(self.rows, int) and isinstance(self.cols, int)


@dataclass(frozen=True)
class LayerNorm:
    """Prologue: ``(v - mean[r]) * rstd[r] * weight[f] + bias[f]`` in fp32 on the operand's tile, with the fp32
    statistics along the operand's rows r (A: m; B: k) and the affine along its features f (A: k; B: n), so the
    normalised activations never reach device memory (Ba et al. 2016). RMSNorm (Zhang & Sennrich 2019) is this
    prologue with the zero mean of ``layernorm.row_stats(x, eps, rms=True)`` (and a zero bias when it has none)."""

    mean: torch.Tensor  # (rows,) fp32
    rstd: torch.Tensor  # (rows,) fp32
    weight: torch.Tensor  # (features,)
    bias: torch.Tensor  # (features,)
    kind = PROLOGUE_LN.value


@dataclass(frozen=True)
class Gelu:
    """Prologue: GELU of the loaded values (recomputing an activation from its stored pre-activation), in the
    launch's GELU form (:attr:`Gemm.gelu_approximate`)."""

    kind = PROLOGUE_GELU.value


@dataclass(frozen=True)
class Cast:
    """Prologue: convert the loaded values to the other operand's dtype (the dot runs in that dtype)."""

    kind = PROLOGUE_CAST.value


@dataclass(frozen=True)
class ChannelAffine:
    """Prologue: per-channel ``v * scale[c] + shift[c]`` in fp32, then the conversion of :class:`Cast`; channel
    ``c = feature // D1`` of the split feature index (k for A, n for B)."""

    scale: torch.Tensor  # (channels,) fp32
    shift: torch.Tensor  # (channels,) fp32
    kind = PROLOGUE_AFFINE.value


@dataclass(frozen=True)
class SwiGLU:
    """Prologue (B only): ``silu(v) * v2`` in fp32, v from B and v2 from the second B operand :attr:`Gemm.b2` at the
    same (k, n), converted to the dot's dtype: the SwiGLU hidden recomputed from the stored gate and up
    pre-activations (the fc2 weight-grad GEMM ``dW2 = dY^T @ (silu(gate) * up)``)."""

    kind = PROLOGUE_SWIGLU.value


Prologue = LayerNorm | Gelu | Cast | ChannelAffine | SwiGLU | None


@dataclass(frozen=True)
class ImageBounds:
    """Pixels outside a height x width image, on the operand ("a", "b" or "c") whose rows are split patch tokens
    and whose columns are split pixels: read as 0 after the prologue (A, B) or not written (C)."""

    operand: str
    height: int
    width: int


@dataclass(frozen=True)
class Rope:
    """2D rotary position embedding (Su et al. 2021, RoFormer; axial 2D as in EVA-02 / DINOv3) on the q and k
    sections of a packed qkv axis (indices [0, 2 * D) of 3 * D, heads of ``head_dim`` columns; v is left alone).

    Per head, pairs (a, b) are (2j, 2j + 1) (``layout="interleaved"``) or (j, j + head_dim / 2) (``"half"``,
    timm's ``rotate_half``), j < head_dim / 2, rotated by theta = y * freqs[h, j, 0] + x * freqs[h, j, 1] for the
    token's (y, x) = ``coords[token % Nc]``: out_a = a cos - b sin, out_b = b cos + a sin (fp32). Prefix tokens
    carry coords (0, 0): theta = 0, unrotated.

    The launch walks the qkv axis in *pair order* (index 2p + r is member r of pair p of its head), so the two
    members of a pair are neighbours in a tile whatever the layout, and addresses memory through the layout's
    permutation. ``role`` says which axis is the qkv axis: "out" (C's columns, rotated in the epilogue after the
    bias: the qkv GEMM), "a_cols" (A's columns = the k axis, inverse rotation on load: d LayerNorm(x) = d(qkv) @ W)
    or "a_rows" (A's rows, tokens along k, inverse rotation on load: dW = d(qkv)^T @ LayerNorm(x), whose row sums
    are then the bias gradient).

    coords: (Nc, 2) fp32 contiguous, Nc = tokens per image (row m is token m % Nc) or all packed tokens.
    freqs: (Hr, head_dim / 2, 2) fp32 contiguous, Hr = 1 (shared by the heads) or num_heads (per head).
    """

    coords: torch.Tensor
    freqs: torch.Tensor
    num_heads: int
    head_dim: int
    layout: str = "interleaved"
    role: str = "out"

    LAYOUTS = ("interleaved", "half")

    @property
    def half(self) -> bool:
        return self.layout == "half"

    @property
    def dim(self) -> int:
        """D = num_heads * head_dim (the qkv axis has 3 * D indices)."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class IndexMap:
    """How logical indices reach memory. ``m_split`` / ``n_split`` / ``k_split``: (D1, D2) three-level split of
    that index, ``t -> (t // D1) * s1 + ((t % D1) // D2) * s2 + (t % D2) * s3`` with the operand's stride triple
    (None: one stride); ``image_bounds``: zero padding of an image operand (needs the token and pixel splits)."""

    m_split: tuple | None = None
    n_split: tuple | None = None
    k_split: tuple | None = None
    image_bounds: ImageBounds | None = None

    @property
    def split(self) -> bool:
        return (self.m_split, self.n_split, self.k_split) != (None, None, None)


@dataclass(frozen=True)
class TokenGather:
    """Token selection by index tensors (int32 or int64, contiguous), on the unsplit token axes of a launch:

    * ``a_rows`` (M,): A's logical row m is loaded from A's row ``a_rows[m]`` (the kept patches of MAE's ids_keep:
      the forward and the patch-gradient GEMM);
    * ``a_cols`` (K,) / ``b_rows`` (K,): along k, A's column k is A's column ``a_cols[k]`` and B's row k is B's row
      ``b_rows[k]`` (the weight-gradient GEMM ``dW = dY^T @ X``, whose k axis is the tokens);
    * ``c_rows`` (M,): C's logical row m is stored at C's row ``c_rows[m]`` (the token rows of a sequence behind its
      prefix rows, which a small copy fills: no concatenation of the output).

    An index < 0 reads as a zero row / column (A, B: a dropped or masked token contributes nothing) or is not
    written (C). Indices must lie within the operand (the ops check their values before a launch). The TMA form
    cannot gather rows (no TMA gather before Blackwell), so a launch with any of these runs on the general pointer
    kernel or on the cuBLAS path (``index_select`` around ``torch.mm``)."""

    a_rows: torch.Tensor | None = None
    a_cols: torch.Tensor | None = None
    b_rows: torch.Tensor | None = None
    c_rows: torch.Tensor | None = None

    def present(self) -> tuple:
        """(a_rows, a_cols, b_rows, c_rows) as booleans."""
        return tuple(t is not None for t in (self.a_rows, self.a_cols, self.b_rows, self.c_rows))


@dataclass(frozen=True)
class Epilogue:
    """The epilogue steps of a launch, applied in this order to the fp32 product tile:

    * ``bias``: (N,) added per column;
    * ``gelu_grad_of``: (M, N) contiguous pre-activation; the tile is multiplied by GELU'(it) (the backward of
      GELU; the activation derivative);
    * ``gelu``: GELU of the tile, first storing the pre-activation to ``store_preact`` ((M, N) contiguous) when
      given (the activation with its stored pre-activation);
    * ``residual``: a logical (M, N) :class:`Operand` added last (may broadcast over the batch, e.g. pos_embed);
    * ``mask`` (M,) bool with ``mask_token`` (N,): right after the bias, ``where(mask[m], mask_token[n], acc)``
      (iBOT / DINOv2 masked-token substitution; Zhou et al. 2022), then ``pos`` (R, N) (row stride ``pos.stride(0)``,
      unit column stride) with ``pos_index`` (M,) int32 / int64: + ``pos[pos_index[m], n]``, nothing where
      ``pos_index[m] < 0`` (per-token position rows, e.g. NaFlex's resampled grid); both in fp32 (they join no
      activation, residual or SwiGLU step);

    and ``a_rowsum``: (M,) contiguous output written with ``sum_k prologue(A)[m, k]`` (fp32 accumulation, one
    program per row tile, fixed order): a weight-grad GEMM ``dW = dY^T @ X`` yields the bias gradient from the dY
    tiles it already loads.

    The SwiGLU steps (with a second B operand :attr:`Gemm.b2`; the general pointer kernel only):

    * ``swiglu``: two accumulators, gate = A @ B (+ ``bias``) and up = A @ B2 (+ ``up_bias``: (N,)); C = silu(gate)
      * up, first storing the pre-activations to ``store_preact``, here (M, 2N) contiguous: gate in columns [0, N),
      up in [N, 2N) (the layout of timm's packed ``fc1`` output);
    * ``swiglu_grad_of``: (M, 2N) contiguous (gate | up) pre-activation; the product tile is dH and two tiles are
      written, ``C[:, n] = dH * up * silu'(gate)`` (d gate) and ``C[:, N + n] = dH * silu(gate)`` (d up): C is
      logically (M, 2N) (the backward of SwiGLU)."""

    bias: torch.Tensor | None = None
    gelu_grad_of: torch.Tensor | None = None
    gelu: bool = False
    store_preact: torch.Tensor | None = None
    residual: Operand | None = None
    a_rowsum: torch.Tensor | None = None
    swiglu: bool = False
    up_bias: torch.Tensor | None = None
    swiglu_grad_of: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    mask_token: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    pos_index: torch.Tensor | None = None

    @property
    def aux(self) -> torch.Tensor | None:
        """The pre-activation buffer: read (GELU', SwiGLU') or written (GELU / SwiGLU with the pre-activation
        stored)."""
        for t in (self.gelu_grad_of, self.swiglu_grad_of, self.store_preact):
            if t is not None:
                return t
        return None


@dataclass(frozen=True)
class Fusion:
    """The tensor-free part of a launch's description: prologue kinds, epilogue steps present, GELU form, and
    whether an index is split / bounded. What the kernels' constexprs, the path rule's key, the pair plan, the cost
    model and the AOT recorder read."""

    a_prologue: int = 0
    b_prologue: int = 0
    bias: bool = False
    gelu_grad: bool = False
    gelu: bool = False
    store_preact: bool = False
    residual: bool = False
    a_rowsum: bool = False
    gelu_tanh: bool = False
    split: bool = False
    image_bounds: str | None = None
    rope: int = 0  # ROPE_* (where RoPE is applied); 0: none
    rope_half: bool = False  # the rotate_half pair layout (else interleaved)
    swiglu: bool = False
    up_bias: bool = False
    swiglu_grad: bool = False
    a_rows: bool = False  # TokenGather.a_rows
    a_cols: bool = False  # TokenGather.a_cols
    b_rows: bool = False  # TokenGather.b_rows
    c_rows: bool = False  # TokenGather.c_rows
    mask_token: bool = False  # Epilogue.mask / mask_token
    pos_rows: bool = False  # Epilogue.pos / pos_index

    @property
    def converts(self) -> bool:
        """An operand is converted on load (cast or channel affine)."""
        return bool({self.a_prologue, self.b_prologue} & {PROLOGUE_CAST.value, PROLOGUE_AFFINE.value})

    @property
    def glu(self) -> bool:
        """A SwiGLU step (second B operand: the SwiGLU epilogue or its derivative, or the SwiGLU prologue on B)."""
        return self.swiglu or self.swiglu_grad or self.b_prologue == PROLOGUE_SWIGLU.value

    @property
    def tokens(self) -> bool:
        """A token-selection step: a :class:`TokenGather` index or the mask-token / position-row epilogue."""
        return (self.a_rows or self.a_cols or self.b_rows or self.c_rows or self.mask_token or self.pos_rows)

    @property
    def plain(self) -> bool:
        """No split index, conversion, image bounds, SwiGLU step, RoPE or token step: the TMA kernel, the plain
        pointer kernel and pairs apply (the others run on the general pointer kernel, ``matmul._matmul_split_kernel``,
        or, with RoPE, ``matmul._matmul_rope_kernel``)."""
        return not (self.split or self.converts or self.image_bounds is not None or self.glu or self.rope
                    or self.tokens)

    @property
    def cublas_form(self) -> bool:
        """The cuBLAS path (:func:`fastvit_kernels.kernels.gemm_impl.cublas_gemm`) can run it: plain, or plain but
        for token steps (``index_select`` around ``torch.mm``, the mask / position steps in its epilogue kernel)."""
        return not (self.split or self.converts or self.image_bounds is not None or self.glu or self.rope)

    def tma_refusal(self) -> str | None:
        """None when the TMA form can run this fusion, else why not (a sentence): the route decision of
        :func:`fastvit_kernels.kernels.matmul.gemm` names it."""
        if self.a_rows or self.a_cols or self.b_rows or self.c_rows:
            return "a row gather / row map: TMA descriptors load and store rectangular boxes (no TMA gather " \
                   "before Blackwell), so it runs on the general pointer kernel"
        if not self.plain:
            return "a split index, conversion, image bounds, SwiGLU, RoPE or token step: general pointer kernel"
        return None

    @staticmethod
    def from_constexprs(kw: dict, suffix: str = "") -> "Fusion":
        """The fusion a kernel launch's constexpr keywords ``kw`` describe (the inverse of :meth:`constexprs`;
        ``suffix``: "0" / "1" for a pair kernel's problem). What the AOT recorder names a GEMM variant by. Flags a
        kernel form does not take (the pair forms carry no residual / GELU epilogue) read as off."""
        def get(name, default=False):
            v = kw.get(name + suffix, kw.get(name, default))
            return getattr(v, "value", v)

        split = any(get(k) for k in ("SPLIT_M", "SPLIT_N", "SPLIT_K"))
        bounds = {v: k for k, v in BOUNDS_OF.items()}[int(get("IMG_BOUNDS", 0))]
        return Fusion(a_prologue=int(get("A_PROLOGUE", 0)), b_prologue=int(get("B_PROLOGUE", 0)),
                      bias=bool(get("HAS_BIAS")), gelu_grad=bool(get("DGELU")), gelu=bool(get("ACT_GELU")),
                      store_preact=bool(get("STORE_PREACT")), residual=bool(get("HAS_RESIDUAL")),
                      a_rowsum=bool(get("A_ROWSUM")), gelu_tanh=bool(get("GELU_TANH")), split=split,
                      image_bounds=bounds, swiglu=bool(get("SWIGLU")), up_bias=bool(get("HAS_UP_BIAS")),
                      swiglu_grad=bool(get("DSWIGLU")), rope=int(get("ROPE", 0)), rope_half=bool(get("ROPE_HALF")),
                      a_rows=bool(get("GATHER_A_ROWS")), a_cols=bool(get("GATHER_A_COLS")),
                      b_rows=bool(get("GATHER_B_ROWS")), c_rows=bool(get("MAP_C_ROWS")),
                      mask_token=bool(get("MASK_TOKEN")), pos_rows=bool(get("POS_ROWS")))

    def constexprs(self) -> dict:
        """The prologue / epilogue constexprs every GEMM kernel form takes, by name."""
        return dict(A_PROLOGUE=self.a_prologue, B_PROLOGUE=self.b_prologue, HAS_BIAS=self.bias,
                    DGELU=self.gelu_grad, ACT_GELU=self.gelu, STORE_PREACT=self.store_preact,
                    HAS_RESIDUAL=self.residual, GELU_TANH=self.gelu_tanh, A_ROWSUM=self.a_rowsum)

    def glu_constexprs(self) -> dict:
        """The SwiGLU constexprs, taken by the general pointer kernel (``matmul._matmul_split_kernel``) only, the
        one form that carries the SwiGLU steps (a SwiGLU fusion is not :attr:`plain`, so no other form runs it)."""
        return dict(SWIGLU=self.swiglu, HAS_UP_BIAS=self.up_bias, DSWIGLU=self.swiglu_grad)

    def token_constexprs(self) -> dict:
        """The token-selection constexprs (:class:`TokenGather`, the mask-token / position-row epilogue), taken by
        the general pointer kernel and the cuBLAS path's epilogue kernel (a token step is not :attr:`plain`)."""
        return dict(GATHER_A_ROWS=self.a_rows, GATHER_A_COLS=self.a_cols, GATHER_B_ROWS=self.b_rows,
                    MAP_C_ROWS=self.c_rows, MASK_TOKEN=self.mask_token, POS_ROWS=self.pos_rows)

    @property
    def name(self) -> str:
        """The fusion as a stable string, e.g. "a_ln+bias+gelu_store" ("plain" for none): the path rule's key part
        (:func:`fastvit_kernels.kernels.gemm_impl.gemm_key`) and the cost model's label."""
        parts = [f"a_{PROLOGUE_NAMES[self.a_prologue]}" if self.a_prologue else "",
                 f"b_{PROLOGUE_NAMES[self.b_prologue]}" if self.b_prologue else "",
                 "bias" if self.bias else "", "up_bias" if self.up_bias else "", "dgelu" if self.gelu_grad else "",
                 "dswiglu" if self.swiglu_grad else "",
                 "gelu_store" if self.store_preact and self.gelu else ("gelu" if self.gelu else ""),
                 "swiglu_store" if self.store_preact and self.swiglu else ("swiglu" if self.swiglu else ""),
                 "residual" if self.residual else "", "tanh" if self.gelu_tanh else "",
                 "a_rowsum" if self.a_rowsum else "",
                 f"rope_{_ROPE_NAMES[self.rope]}{'_half' if self.rope_half else ''}" if self.rope else "",
                 "a_rows" if self.a_rows else "", "a_cols" if self.a_cols else "", "b_rows" if self.b_rows else "",
                 "c_rows" if self.c_rows else "", "mask_token" if self.mask_token else "",
                 "pos_rows" if self.pos_rows else ""]
        return "+".join(p for p in parts if p) or "plain"


_ROPE_NAMES = {v: k for k, v in ROPE_ROLES.items()}


def _err(arg: str, expected: str, got) -> ValueError:
    return ValueError(f"{arg}: expected {expected}; got {got}")


@dataclass(frozen=True)
class Gemm:
    """One launch of the GEMM core: ``c = epilogue(a_prologue(a) @ b_prologue(b))`` with a logical (M, K), b
    (K, N), c (M, N) (:class:`Operand`), addressed through ``index`` (:class:`IndexMap`). ``gelu_approximate``:
    "none" (exact erf) or "tanh": the form of every GELU of the launch (a :class:`Gelu` prologue, the GELU epilogue
    and GELU'). c is written and must not alias an operand (autotuning reruns the launch). ``b2``: a second B
    operand (K, N) with B's strides and dtype, read by the SwiGLU epilogue (:attr:`Epilogue.swiglu`) and the
    :class:`SwiGLU` prologue on B; with :attr:`Epilogue.swiglu_grad_of` c is logically (M, 2N).

    Raises (on construction, before anything launches):
        ValueError: an argument combination the core cannot run (named in the message): two converted operands, a
            conversion beside the other operand's LayerNorm / GELU, mixed operand dtypes without a conversion, a
            channel affine without its feature split, image bounds without the token / pixel splits, a split whose
            D2 does not divide D1, a GELU' with a GELU, a stored pre-activation without GELU, a row-sum or
            pre-activation buffer of the wrong size or layout, or a bad ``gelu_approximate``; for SwiGLU: a step
            without ``b2`` (or ``b2`` without a step), ``b2`` with other strides / dtype than b, SwiGLU beside GELU,
            a residual, a split index or image bounds, the SwiGLU prologue on A or beside the SwiGLU epilogue, a
            bias / row sums with the SwiGLU derivative, up_bias without the SwiGLU epilogue.
    """

    a: Operand
    b: Operand
    c: Operand
    M: int
    N: int
    K: int
    a_prologue: Prologue = None
    b_prologue: Prologue = None
    epilogue: Epilogue = field(default_factory=Epilogue)
    index: IndexMap = field(default_factory=IndexMap)
    gelu_approximate: str = "none"
    rope: Rope | None = None
    b2: Operand | None = None
    gather: TokenGather = field(default_factory=TokenGather)

    def __post_init__(self):
        ep, ix = self.epilogue, self.index
        if self.rope is not None:
            self._check_rope()
        self._check_tokens()
        a_conv, b_conv = _converts(self.a_prologue), _converts(self.b_prologue)
        if a_conv and b_conv:
            raise _err("a_prologue / b_prologue", "at most one converted operand (Cast / ChannelAffine)",
                       (self.a_prologue, self.b_prologue))
        if (a_conv and self.b_prologue is not None) or (b_conv and self.a_prologue is not None):
            raise _err("a_prologue / b_prologue", "no prologue on the operand beside a converted one",
                       (type(self.a_prologue).__name__, type(self.b_prologue).__name__))
        if not (a_conv or b_conv) and self.a.tensor.dtype != self.b.tensor.dtype:
            raise _err("a / b", "one dtype, or Cast / ChannelAffine on one of them",
                       (self.a.tensor.dtype, self.b.tensor.dtype))
        if isinstance(self.a_prologue, ChannelAffine) and ix.k_split is None:
            raise _err("index.k_split", "a split feature index for A's ChannelAffine", None)
        if isinstance(self.b_prologue, ChannelAffine) and ix.n_split is None:
            raise _err("index.n_split", "a split feature index for B's ChannelAffine", None)
        for name, sp in (("m_split", ix.m_split), ("n_split", ix.n_split), ("k_split", ix.k_split)):
            if sp is not None and not (sp[1] > 0 and sp[0] % sp[1] == 0):
                raise _err(f"index.{name}", "(D1, D2) with D2 > 0 dividing D1", sp)
        if ix.image_bounds is not None:
            op = ix.image_bounds.operand
            need = {"a": (ix.m_split, ix.k_split), "b": (ix.k_split, ix.n_split), "c": (ix.m_split, ix.n_split)}
            if op not in need:
                raise _err("index.image_bounds.operand", "'a', 'b' or 'c'", repr(op))
            if any(s is None for s in need[op]):
                raise _err("index.image_bounds", f"the token and pixel splits of operand {op!r}", ix)
        if ep.gelu_grad_of is not None and ep.gelu:
            raise _err("epilogue", "GELU' (gelu_grad_of) or GELU, not both", ep)
        if ep.store_preact is not None and not (ep.gelu or ep.swiglu):
            raise _err("epilogue.store_preact", "gelu=True or swiglu=True (the pre-activation of the activation "
                       "epilogue)", False)
        self._check_glu()
        aux = ep.aux
        width = 2 * self.N if (ep.swiglu or ep.swiglu_grad_of is not None) else self.N
        if aux is not None and not (aux.is_contiguous() and aux.numel() == self.M * width):
            raise _err("epilogue pre-activation", f"a contiguous ({self.M}, {width}) tensor",
                       f"shape {tuple(aux.shape)}, strides {aux.stride()}")
        if ep.a_rowsum is not None:
            if not (ep.a_rowsum.is_contiguous() and ep.a_rowsum.numel() == self.M):
                raise _err("epilogue.a_rowsum", f"a contiguous ({self.M},) tensor", tuple(ep.a_rowsum.shape))
            if self.N <= 0:
                raise _err("N", "N > 0 with a_rowsum (the programs of the first column tile compute it)", self.N)
        check_gelu_approximate(self.gelu_approximate)

    def _check_rope(self) -> None:
        r, ep = self.rope, self.epilogue
        if r.layout not in Rope.LAYOUTS:
            raise _err("rope.layout", f"one of {Rope.LAYOUTS}", repr(r.layout))
        if r.role not in ROPE_ROLES:
            raise _err("rope.role", f"one of {tuple(ROPE_ROLES)}", repr(r.role))
        if r.head_dim % 2 or r.head_dim <= 0 or r.num_heads <= 0:
            raise _err("rope.head_dim", "an even head_dim > 0 and num_heads > 0", (r.num_heads, r.head_dim))
        qkv_len = {"out": self.N, "a_cols": self.K, "a_rows": self.M}[r.role]
        if qkv_len != 3 * r.dim:
            raise _err(f"rope ({r.role} axis length)", f"3 * num_heads * head_dim = {3 * r.dim}", qkv_len)
        c, f = r.coords, r.freqs
        if not (c.dtype == torch.float32 and c.dim() == 2 and c.shape[1] == 2 and c.shape[0] > 0
                and c.is_contiguous()):
            raise _err("rope.coords", "a contiguous (Nc > 0, 2) fp32 tensor", (tuple(c.shape), c.dtype))
        if not (f.dtype == torch.float32 and f.dim() == 3 and f.shape[0] in (1, r.num_heads)
                and tuple(f.shape[1:]) == (r.head_dim // 2, 2) and f.is_contiguous()):
            raise _err("rope.freqs", f"a contiguous (1 or {r.num_heads}, {r.head_dim // 2}, 2) fp32 tensor",
                       (tuple(f.shape), f.dtype))
        if (ep.gelu_grad_of is not None or ep.gelu or ep.residual is not None or self.index.split
                or _converts(self.a_prologue) or _converts(self.b_prologue) or self.b2 is not None
                or ep.swiglu or ep.swiglu_grad_of is not None):
            raise _err("rope", "a plain GEMM with only LayerNorm prologues, bias and row sums beside it", self.fusion)
        if r.role == "out" and ep.a_rowsum is not None:
            raise _err("epilogue.a_rowsum", "None with rope role 'out'", "a row-sum buffer")
    def _check_tokens(self) -> None:
        """The token-selection part of :meth:`__post_init__`."""
        g, ep, ix = self.gather, self.epilogue, self.index
        for name, t, n in (("gather.a_rows", g.a_rows, self.M), ("gather.a_cols", g.a_cols, self.K),
                           ("gather.b_rows", g.b_rows, self.K), ("gather.c_rows", g.c_rows, self.M),
                           ("epilogue.pos_index", ep.pos_index, self.M)):
            if t is not None and not (t.dtype in (torch.int32, torch.int64) and t.dim() == 1 and t.numel() == n
                                      and t.is_contiguous()):
                raise _err(name, f"a contiguous ({n},) int32 / int64 tensor", (tuple(t.shape), t.dtype))
        if (ep.mask is None) != (ep.mask_token is None) or (ep.pos is None) != (ep.pos_index is None):
            raise _err("epilogue", "mask with mask_token and pos with pos_index (each pair together)", ep)
        if ep.mask is not None:
            if not (ep.mask.dtype == torch.bool and ep.mask.dim() == 1 and ep.mask.numel() == self.M
                    and ep.mask.is_contiguous()):
                raise _err("epilogue.mask", f"a contiguous ({self.M},) bool tensor",
                           (tuple(ep.mask.shape), ep.mask.dtype))
            if not (ep.mask_token.dim() == 1 and ep.mask_token.numel() == self.N and ep.mask_token.is_contiguous()):
                raise _err("epilogue.mask_token", f"a contiguous ({self.N},) tensor", tuple(ep.mask_token.shape))
        if ep.pos is not None and not (ep.pos.dim() == 2 and ep.pos.shape[1] == self.N and ep.pos.stride(1) == 1):
            raise _err("epilogue.pos", f"an (R, {self.N}) tensor with unit column stride",
                       (tuple(ep.pos.shape), ep.pos.stride()))
        f = self.fusion
        if not f.tokens:
            return
        if (g.a_rows is not None or g.c_rows is not None) and ix.m_split is not None or \
                (g.a_cols is not None or g.b_rows is not None) and ix.k_split is not None:
            raise _err("gather", "no split on a gathered axis", ix)
        if (ix.image_bounds is not None or f.glu or f.rope or f.converts or ep.gelu or ep.gelu_grad_of is not None
                or ep.residual is not None):
            raise _err("gather / epilogue", "token steps with no image bounds, conversion, GELU, residual, SwiGLU or "
                       "RoPE in the same launch", f.name)
        if (f.mask_token or f.pos_rows) and f.a_rowsum:
            raise _err("epilogue.a_rowsum", "None beside the mask-token / position-row epilogue", f.name)

    def _check_glu(self) -> None:
        """The SwiGLU part of :meth:`__post_init__`."""
        ep, b2 = self.epilogue, self.b2
        pro = isinstance(self.b_prologue, SwiGLU)
        if isinstance(self.a_prologue, SwiGLU):
            raise _err("a_prologue", "SwiGLU on B only (it reads the second B operand b2)", "SwiGLU on A")
        if ep.up_bias is not None and not ep.swiglu:
            raise _err("epilogue.up_bias", "the SwiGLU epilogue (swiglu=True)", "swiglu=False")
        if (ep.swiglu or pro) != (b2 is not None):
            raise _err("b2", "a second B operand exactly with the SwiGLU epilogue or the SwiGLU prologue on B",
                       "None" if b2 is None else "b2 without either")
        steps = (ep.swiglu, ep.swiglu_grad_of is not None, pro)
        if not any(steps):
            return
        if sum(steps) > 1:
            raise _err("epilogue / b_prologue", "one SwiGLU step per launch", ep)
        if b2 is not None and (b2.tensor.dtype != self.b.tensor.dtype or (b2.rows, b2.cols) != (self.b.rows,
                                                                                             self.b.cols)):
            raise _err("b2", f"b's dtype {self.b.tensor.dtype} and strides {(self.b.rows, self.b.cols)}",
                       f"{b2.tensor.dtype}, {(b2.rows, b2.cols)}")
        if ep.gelu or ep.gelu_grad_of is not None or isinstance(self.a_prologue, Gelu):
            raise _err("epilogue", "SwiGLU without GELU in the same launch", ep)
        if ep.residual is not None or self.index != IndexMap() or not (self.a.plain and self.b.plain and
                                                                        self.c.plain):
            raise _err("index / residual", "no split index, image bounds or residual with SwiGLU", self.index)
        if ep.swiglu and self.b_prologue is not None:
            raise _err("b_prologue", "none with the SwiGLU epilogue (B and b2 are weights)", self.b_prologue)
        if ep.swiglu_grad_of is not None and (ep.bias is not None or ep.a_rowsum is not None):
            raise _err("epilogue", "no bias / a_rowsum with the SwiGLU derivative", ep)

    @cached_property
    def fusion(self) -> Fusion:
        """The tensor-free description (:class:`Fusion`); built once per launch description (the launchers read it
        several times on the host path)."""
        ep, ix = self.epilogue, self.index
        return Fusion(a_prologue=_kind(self.a_prologue), b_prologue=_kind(self.b_prologue),
                      bias=ep.bias is not None, gelu_grad=ep.gelu_grad_of is not None, gelu=ep.gelu,
                      store_preact=ep.store_preact is not None, residual=ep.residual is not None,
                      a_rowsum=ep.a_rowsum is not None, gelu_tanh=self.gelu_approximate == "tanh",
                      split=ix.split, image_bounds=ix.image_bounds.operand if ix.image_bounds else None,
                      swiglu=ep.swiglu, up_bias=ep.up_bias is not None, swiglu_grad=ep.swiglu_grad_of is not None,
                      rope=ROPE_ROLES[self.rope.role] if self.rope is not None else 0,
                      rope_half=self.rope is not None and self.rope.half,
                      **dict(zip(("a_rows", "a_cols", "b_rows", "c_rows"), self.gather.present())),
                      mask_token=ep.mask is not None, pos_rows=ep.pos is not None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the dot's operands: B's when A is converted on load, else A's."""
        return self.b.tensor.dtype if _converts(self.a_prologue) else self.a.tensor.dtype

    @property
    def empty(self) -> bool:
        return self.M == 0 or self.N == 0

    @property
    def ln(self) -> LayerNorm | None:
        """The LayerNorm prologue of either operand, if any (one kernel argument set serves both)."""
        for p in (self.a_prologue, self.b_prologue):
            if isinstance(p, LayerNorm):
                return p
        return None

    def pointers(self) -> tuple:
        """The kernels' tensor arguments besides the operands, in their order: bias, residual, aux
        (pre-activation), rowsum, mean, rstd, gamma, beta (LayerNorm weight / bias or channel scale / shift). An
        absent one is C's tensor (never read: its flag is off)."""
        ep, dummy = self.epilogue, self.c.tensor
        ln = self.ln
        affine = next((p for p in (self.a_prologue, self.b_prologue) if isinstance(p, ChannelAffine)), None)
        params = (ln.weight, ln.bias) if ln else (affine.scale, affine.shift) if affine else (dummy, dummy)
        return (_or(ep.bias, dummy), ep.residual.tensor if ep.residual is not None else dummy, _or(ep.aux, dummy),
                _or(ep.a_rowsum, dummy), *((ln.mean, ln.rstd) if ln else (dummy, dummy)), *params)

    def glu_pointers(self) -> tuple:
        """The general pointer kernel's SwiGLU tensor arguments, after :meth:`pointers`: b2 (the second B
        operand), up_bias. An absent one is C's tensor (never read)."""
        dummy = self.c.tensor
        return (self.b2.tensor if self.b2 is not None else dummy, _or(self.epilogue.up_bias, dummy))


    def token_pointers(self) -> tuple:
        """The token-selection tensor arguments, after :meth:`glu_pointers`: a_rows, a_cols, b_rows, c_rows, mask
        (as uint8), mask_token, pos, pos_index. An absent one is C's tensor (never read)."""
        g, ep, dummy = self.gather, self.epilogue, self.c.tensor
        mask = ep.mask.view(torch.uint8) if ep.mask is not None else None
        return tuple(_or(t, dummy) for t in (g.a_rows, g.a_cols, g.b_rows, g.c_rows, mask, ep.mask_token, ep.pos,
                                             ep.pos_index))


def _or(t, dummy):
    return t if t is not None else dummy


def _kind(p: Prologue) -> int:
    return 0 if p is None else p.kind


def _converts(p: Prologue) -> bool:
    return isinstance(p, (Cast, ChannelAffine))


# ------------------------------------------------------------------------------------------------------------------
# the pair plan: which backward GEMMs share a launch
# ------------------------------------------------------------------------------------------------------------------
PAIR_FORMS = ("tma", "pointer")


def pair_plan(f0: Fusion, f1: Fusion, *, form: str, dtype: torch.dtype, triton_version: tuple) -> str | None:
    """Whether two independent GEMMs with fusions ``f0`` / ``f1`` run as ONE launch of the pair kernel of kernel
    ``form`` ("tma" or "pointer") for operands of ``dtype`` on Triton ``triton_version`` ((major, minor)):
    None when they do, else why not (a sentence). Called by :func:`fastvit_kernels.kernels.matmul.gemm_pair` and
    by the cost model, so the plan they describe is the one that runs.

    The pair kernels carry the backward GEMMs' fusions only (LayerNorm / GELU prologues, bias, GELU', A row sums)
    with one GELU form, and no SwiGLU step (those GEMMs run one by one on the general pointer kernel); the
    remaining exclusions are register spills the AOT check found (``python -m fastvit_kernels.aot check``):

    * TMA form, fp32 operands: 8-16 B per thread on the stack on sm_90 (Triton 3.9);
    * TMA form, Triton before 3.6, GELU on B's load (fc2's dW2 with dH): 8-96 B with every candidate on sm_90
      (Triton 3.4);
    * pointer form, a GELU prologue (fc2's pair): 8 B with every candidate on sm_90 (Triton 3.9).

    Raises:
        ValueError: ``form`` is not one of ``PAIR_FORMS``.
    """
    if form not in PAIR_FORMS:
        raise _err("form", f"one of {PAIR_FORMS}", repr(form))
    for f in (f0, f1):
        if f.glu:
            return "a SwiGLU step (second B operand): the pair kernels do not carry it"
        if not f.plain or f.residual or f.gelu or f.store_preact:
            return "a fusion the pair kernels do not carry (split index, conversion, residual or GELU epilogue)"
    if f0.gelu_tanh != f1.gelu_tanh:
        return "the two GEMMs use different GELU forms"
    gelu_pro = PROLOGUE_GELU.value in (f0.a_prologue, f0.b_prologue, f1.a_prologue, f1.b_prologue)
    if form == "tma":
        if dtype == torch.float32:
            return "fp32 pairs on the TMA kernel spilled on sm_90 (AOT check, Triton 3.9)"
        if tuple(triton_version) < (3, 6) and PROLOGUE_GELU.value in (f0.b_prologue, f1.b_prologue):
            return "GELU on B's load in a TMA pair spilled on sm_90 before Triton 3.6 (AOT check, Triton 3.4)"
    elif gelu_pro:
        return "a GELU prologue in a pointer-kernel pair spilled on sm_90 (AOT check, Triton 3.9)"
    return None


# ------------------------------------------------------------------------------------------------------------------
# device side: the steps, shared by every Triton form of the core
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear tile index ``tile`` in the grouped order: GROUP_M row tiles share their B column
    tiles in L2 (Triton's matmul tutorial)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_start(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, N_D1,
               A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The start of an output tile: (acc, a_sum, p0, p1, p2, p3) = the fp32 accumulator (BLOCK_M x BLOCK_N) and
    row-sum vector (BLOCK_M), zeroed, and what the prologues need, loaded once before the k loop
    (:func:`prologue_setup`)."""
    p0, p1, p2, p3 = prologue_setup(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, N_D1,
                                    A_PROLOGUE, B_PROLOGUE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return acc, a_sum, p0, p1, p2, p3


@triton.jit
def prologue_setup(offs_m, mask_m, offs_n, mask_n, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, N_D1,
                   A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr):
    """What the prologues need per output tile, loaded once before the k loop: (p0, p1, p2, p3) = A's LayerNorm
    mean / rstd of rows ``offs_m`` and B's LayerNorm gamma / beta, or channel scale / shift (channel
    ``n // N_D1``), of columns ``offs_n`` (0.0 where unused)."""
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    if A_PROLOGUE == PROLOGUE_LN:
        p0 = tl.load(mean_ptr + offs_m, mask=mask_m, other=0.0)
        p1 = tl.load(rstd_ptr + offs_m, mask=mask_m, other=0.0)
    if B_PROLOGUE == PROLOGUE_LN:
        p2 = tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        p3 = tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    elif B_PROLOGUE == PROLOGUE_AFFINE:
        p2 = tl.load(gamma_ptr + offs_n // N_D1, mask=mask_n, other=0.0).to(tl.float32)
        p3 = tl.load(beta_ptr + offs_n // N_D1, mask=mask_n, other=0.0).to(tl.float32)
    return p0, p1, p2, p3


@triton.jit
def apply_prologues(a, b, a_mask, b_mask, offs_k, mask_k, K_D1, p0, p1, p2, p3, mean_ptr, rstd_ptr, gamma_ptr,
                    beta_ptr, A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr, GELU_TANH: tl.constexpr):
    """A's and B's prologues on one k step's tiles (a: BLOCK_M x BLOCK_K, b: BLOCK_K x BLOCK_N), each converted to
    the dot's dtype; ``p0`` .. ``p3`` from :func:`prologue_setup`. Masked (padding) elements come out 0: the
    LayerNorm of A multiplies by gamma = 0 and adds beta = 0 on padded k, B's LayerNorm and the affines zero them
    explicitly (beta / shift would leak in), GELU(0) = 0."""
    if A_PROLOGUE == PROLOGUE_LN:
        g = tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        bt = tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        af = (a.to(tl.float32) - p0[:, None]) * p1[:, None]
        a = (af * g[None, :] + bt[None, :]).to(b.dtype)
    elif A_PROLOGUE == PROLOGUE_GELU:
        a = gelu(a.to(tl.float32), GELU_TANH).to(b.dtype)
    elif A_PROLOGUE == PROLOGUE_CAST:
        a = a.to(b.dtype)
    elif A_PROLOGUE == PROLOGUE_AFFINE:
        a_scale = tl.load(gamma_ptr + offs_k // K_D1, mask=mask_k, other=0.0).to(tl.float32)
        a_shift = tl.load(beta_ptr + offs_k // K_D1, mask=mask_k, other=0.0).to(tl.float32)
        af = a.to(tl.float32) * a_scale[None, :] + a_shift[None, :]
        a = tl.where(a_mask, af, 0.0).to(b.dtype)
    if B_PROLOGUE == PROLOGUE_LN:
        mu = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
        rs = tl.load(rstd_ptr + offs_k, mask=mask_k, other=0.0)
        bf = (b.to(tl.float32) - mu[:, None]) * rs[:, None]
        bf = bf * p2[None, :] + p3[None, :]
        b = tl.where(mask_k[:, None], bf, 0.0).to(a.dtype)
    elif B_PROLOGUE == PROLOGUE_GELU:
        b = gelu(b.to(tl.float32), GELU_TANH).to(a.dtype)
    elif B_PROLOGUE == PROLOGUE_CAST:
        b = b.to(a.dtype)
    elif B_PROLOGUE == PROLOGUE_AFFINE:
        bf = b.to(tl.float32) * p2[None, :] + p3[None, :]
        b = tl.where(b_mask, bf, 0.0).to(a.dtype)
    return a, b


@triton.jit
def accumulate(acc, a_sum, a, b, pid_n, A_ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One k step of a tile: ``acc += a @ b`` (fp32 accumulator); with A_ROWSUM the programs of the first column
    tile (``pid_n == 0``) also add the rows of ``a`` (after its prologue) to ``a_sum`` in fp32: one program per row
    tile sums its A rows over the whole K loop, so the row sums need no partials or atomics."""
    if A_ROWSUM:
        if pid_n == 0:
            a_sum += tl.sum(a.to(tl.float32), axis=1)
    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc, a_sum


@triton.jit
def store_rowsum(rowsum_ptr, a_sum, offs_m, mask_m, pid_n, A_ROWSUM: tl.constexpr):
    """Write the row sums :func:`accumulate` gathered (the ``pid_n == 0`` programs), in ``rowsum_ptr``'s dtype."""
    if A_ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, a_sum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def epilogue(acc, offs_m, offs_n, mask, mask_n, N, bias_ptr, aux_ptr, HAS_BIAS: tl.constexpr, DGELU: tl.constexpr,
             ACT_GELU: tl.constexpr, STORE_PREACT: tl.constexpr, GELU_TANH: tl.constexpr):
    """The epilogue steps of :class:`Epilogue` up to the residual add, in their order, on an fp32 (rows, cols) tile
    at rows ``offs_m`` / columns ``offs_n`` of an (M, N) product: + bias[n]; * GELU'(aux[m, n]) (DGELU); GELU,
    first storing the pre-activation to aux (ACT_GELU, STORE_PREACT). ``aux_ptr``: (M, N) contiguous. The
    residual add comes last and each form loads the residual tile itself, right there (its addressing differs, and
    loading it earlier would keep a second tile live across these steps). Called by the pointer and TMA kernels,
    the pair form's split-K reduction and the cuBLAS path's epilogue kernel."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    aux_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if DGELU:
        acc = acc * gelu_grad(tl.load(aux_ptr + aux_offs, mask=mask, other=0.0).to(tl.float32), GELU_TANH)
    if ACT_GELU:
        if STORE_PREACT:
            tl.store(aux_ptr + aux_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = gelu(acc, GELU_TANH)
    return acc


@triton.jit
def gathered(idx_ptr, t, mask_t, GATHER: tl.constexpr):
    """(index, ok) along one token axis (:class:`TokenGather`): with GATHER the memory index ``idx_ptr[t]`` of
    logical indices ``t`` (int32) and ``ok`` = in range and not negative (a negative index is a zero row / a row not
    written); else ``t`` itself and ``mask_t``."""
    if GATHER:
        i = tl.load(idx_ptr + t, mask=mask_t, other=-1)
        ok = i >= 0
        return tl.where(ok, i, 0).to(tl.int32), ok
    else:
        return t, mask_t


@triton.jit
def token_epilogue(acc, offs_m, mask_m, offs_n, mask_n, tok_mask_ptr, mask_token_ptr, pos_ptr, pos_index_ptr,
                   stride_pos, MASK_TOKEN: tl.constexpr, POS_ROWS: tl.constexpr):
    """The token steps of :class:`Epilogue` after the bias, on an fp32 (rows, cols) tile at logical rows ``offs_m`` /
    columns ``offs_n``: ``where(mask[m], mask_token[n], acc)`` (MASK_TOKEN; mask as uint8), then
    ``+ pos[pos_index[m], n]`` where ``pos_index[m] >= 0`` (POS_ROWS). Called by the general pointer kernel and the
    cuBLAS path's epilogue kernel."""
    if MASK_TOKEN:
        sel = tl.load(tok_mask_ptr + offs_m, mask=mask_m, other=0) != 0
        tok = tl.load(mask_token_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = tl.where(sel[:, None], tok[None, :], acc)
    if POS_ROWS:
        r = tl.load(pos_index_ptr + offs_m, mask=mask_m, other=-1)
        has = r >= 0
        rows = tl.where(has, r, 0).to(tl.int64) * stride_pos
        acc += tl.load(pos_ptr + rows[:, None] + offs_n[None, :], mask=has[:, None] & mask_n[None, :],
                       other=0.0).to(tl.float32)
    return acc


# ------------------------------------------------------------------------------------------------------------------
# device side: RoPE steps (the RoPE form, matmul._matmul_rope_kernel)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def rope_index(i, D, HEAD_DIM, ROPE_HALF: tl.constexpr):
    """Memory index along the qkv axis (3 * D) of pair-order index ``i`` (see :class:`Rope`): identity for the
    interleaved layout and for the v section; for "half", member r of pair p of a head sits at p + r * HEAD_DIM / 2."""
    if ROPE_HALF:
        c = i % HEAD_DIM
        mem = i - c + c // 2 + (c % 2) * (HEAD_DIM // 2)
        return tl.where(i < 2 * D, mem, i)
    else:
        return i


@triton.jit
def rope_coords(tok, mask_tok, coords_ptr, n_coords):
    """(y, x) fp32 coordinates of token rows ``tok`` (row t is token t % n_coords); 0 where masked."""
    r = (tok % n_coords).to(tl.int64) * 2
    y = tl.load(coords_ptr + r, mask=mask_tok, other=0.0)
    x = tl.load(coords_ptr + r + 1, mask=mask_tok, other=0.0)
    return y, x


@triton.jit
def rope_freqs(i, mask_i, freqs_ptr, D, HEAD_DIM, stride_freqs_h):
    """(fy, fx) fp32 frequencies of pair-order qkv indices ``i``: head (i % D) // HEAD_DIM, pair (i % HEAD_DIM) // 2;
    0 for the v section (theta = 0: unrotated) and where masked. ``stride_freqs_h``: 0 when the heads share one
    table, else HEAD_DIM (= (HEAD_DIM / 2) * 2 values per head)."""
    h = (i % D) // HEAD_DIM
    off = h * stride_freqs_h + ((i % HEAD_DIM) // 2) * 2
    m = mask_i & (i < 2 * D)
    fy = tl.load(freqs_ptr + off, mask=m, other=0.0)
    fx = tl.load(freqs_ptr + off + 1, mask=m, other=0.0)
    return fy, fx


@triton.jit
def rope_cos_sin(theta):
    """cos and sin of fp32 angles from polynomials, with no libdevice call: theta = k pi/2 + r (k = round(theta
    2/pi), pi/2 in three parts, Cody & Waite 1980), |r| <= pi/4, then Taylor polynomials of r to degree 10 / 9 (error
    < 2e-9 there, below fp32's rounding) and the quadrant k mod 4 picks and signs them. libdevice's sinf / cosf keep
    a 32-byte local array for their large-argument reduction (the AOT check counted it on every RoPE variant, sm_80
    / sm_90); the reduction's own error here is that of theta's fp32 rounding, as in an eager sin / cos table."""
    k = tl.floor(theta * 0.6366197723675814 + 0.5)
    # pi/2 = c1 + c2 + c3 with c1, c2 short enough that k * c1 and k * c2 are exact in fp32 for |k| < 2**15
    r = theta - k * 1.5703125
    r = r - k * 4.837512969970703e-04
    r = r - k * 7.549789954891882e-08
    r2 = r * r
    s = r * (1.0 + r2 * (-1.6666666666666666e-01 + r2 * (8.333333333333333e-03 + r2 * (
        -1.984126984126984e-04 + r2 * 2.7557319223985893e-06))))
    c = 1.0 + r2 * (-0.5 + r2 * (4.1666666666666664e-02 + r2 * (-1.388888888888889e-03 + r2 * (
        2.48015873015873e-05 + r2 * -2.755731922398589e-07))))
    q = k.to(tl.int32) & 3
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return cos, sin


@triton.jit
def rope_rotate_out(acc, offs_m, mask_m, n0, coords_ptr, freqs_ptr, n_coords, D, HEAD_DIM, stride_freqs_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The RoPE epilogue step: rotate the pairs of an fp32 (BLOCK_M, BLOCK_N) tile whose columns n0 + [0, BLOCK_N)
    are in pair order (columns 2p, 2p + 1 form a pair; n0 is even) for token rows ``offs_m``:
    out_a = a cos - b sin, out_b = b cos + a sin."""
    a, b = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
    first = n0 + 2 * tl.arange(0, BLOCK_N // 2)  # the pairs' first columns
    y, x = rope_coords(offs_m, mask_m, coords_ptr, n_coords)
    fy, fx = rope_freqs(first, first < 3 * D, freqs_ptr, D, HEAD_DIM, stride_freqs_h)
    c, s = rope_cos_sin(y[:, None] * fy[None, :] + x[:, None] * fx[None, :])
    out = tl.join(a * c - b * s, b * c + a * s)
    return tl.reshape(out, (BLOCK_M, BLOCK_N))


@triton.jit
def rope_unrotate(v, v_partner, theta, is_first):
    """The inverse rotation (the backward of :func:`rope_rotate_out`) of loaded values ``v`` given each one's pair
    partner ``v_partner`` (same shape) and the pair's angle ``theta``: a' = a cos + b sin, b' = b cos - a sin
    (``is_first``: v is member a). fp32 result."""
    c, s = rope_cos_sin(theta)
    sign = tl.where(is_first, 1.0, -1.0)
    return v.to(tl.float32) * c + sign * v_partner.to(tl.float32) * s


# ------------------------------------------------------------------------------------------------------------------
# device side: SwiGLU steps
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def silu(x):
    """SiLU (swish) in fp32: ``x * sigmoid(x)`` (Elfwing et al. 2017; ``torch.nn.SiLU``)."""
    return x * tl.sigmoid(x)


@triton.jit
def swiglu_operand(b, b2, DTYPE: tl.constexpr):
    """The :class:`SwiGLU` prologue on one B tile: ``silu(b) * b2`` in fp32, converted to ``DTYPE`` (the dot's).
    Masked (padding) elements load as 0 and stay 0."""
    return (silu(b.to(tl.float32)) * b2.to(tl.float32)).to(DTYPE)


@triton.jit
def swiglu_epilogue(acc, acc_up, offs_m, offs_n, mask, mask_n, N, bias_ptr, up_bias_ptr, aux_ptr,
                    HAS_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr):
    """The SwiGLU epilogue (:attr:`Epilogue.swiglu`) on the fp32 gate / up tiles at rows ``offs_m`` / columns
    ``offs_n``: + bias[n], + up_bias[n]; store both pre-activations to ``aux_ptr`` ((M, 2N) contiguous: gate at
    column n, up at N + n) when STORE_PREACT; return ``silu(gate) * up`` (fp32)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        acc_up += tl.load(up_bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        offs = offs_m.to(tl.int64)[:, None] * (2 * N) + offs_n[None, :]
        tl.store(aux_ptr + offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        tl.store(aux_ptr + offs + N, acc_up.to(aux_ptr.dtype.element_ty), mask=mask)
    return silu(acc) * acc_up


@triton.jit
def swiglu_grad(dh, gate, up):
    """(d gate, d up) of ``h = silu(gate) * up`` for the fp32 gradient ``dh``: ``dh * up * silu'(gate)`` with
    ``silu'(g) = s (1 + g (1 - s))``, s = sigmoid(g), and ``dh * silu(gate)``."""
    s = tl.sigmoid(gate)
    return dh * up * (s * (1.0 + gate * (1.0 - s))), dh * (gate * s)


@triton.jit
def swiglu_grad_epilogue(acc, offs_m, offs_n, mask, N, aux_ptr):
    """The SwiGLU derivative (:attr:`Epilogue.swiglu_grad_of`) on the fp32 dH tile ``acc``: (d gate, d up) from
    the stored pre-activations ``aux_ptr`` ((M, 2N) contiguous: gate at column n, up at N + n)."""
    offs = offs_m.to(tl.int64)[:, None] * (2 * N) + offs_n[None, :]
    gate = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(aux_ptr + offs + N, mask=mask, other=0.0).to(tl.float32)
    return swiglu_grad(acc, gate, up)
