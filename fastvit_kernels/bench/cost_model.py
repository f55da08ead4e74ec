"""A cost model of one ViT training step (or inference forward) that runs anywhere, CPU included: the GPU kernel
launches, the bytes each reads and writes in device memory, and the FLOPs each executes -- for FastViT's path
and for the eager PyTorch path as a GPU dispatches it -- plus a roofline time estimate. Everything here is
MODELLED, not measured: no GPU was involved in any number this module prints.

Plans (lists of :class:`Launch`, in execution order):

* ``"fastvit"``: :class:`fastvit_kernels.FastViT` as ``model.py`` runs it: the fused
  ``fastvit::patch_embed_*``, ``fastvit::attention_block_*`` (norm1 + qkv, attention, proj + residual; or, with
  ``attention_block=False``, its three ops ``layernorm_linear_*`` / ``attention_*`` / ``linear_residual_*`` and
  the gradient-accumulation add they need) and ``fastvit::layernorm_mlp_*`` custom ops, with one launch per Triton
  kernel their launchers in ``kernels/`` issue (GEMM core and its two-problem pair form, row stats, LayerNorm
  backward with its in-kernel dgamma / dbeta reduction, column sums, attention forward / preprocess / dK dV / dQ --
  or the one fused backward kernel when B * H >= ``FUSED_BWD_MIN_HEADS`` and ``fused_bwd_builds``, as the launcher
  decides -- class row), and the parts ``model.py`` still runs through aten: the head and the loss (the ops'
  non-differentiable outputs get no zero-filled gradients: ``set_materialize_grads(False)``). The backward's
  dgrad + wgrad GEMM pairs (fc2: dW2 + dH; fc1: dW1 + d LayerNorm; proj: dx + dW; qkv: dW + d LayerNorm) are one
  ``gemm_pair`` launch each on the Hopper (TMA) kernel form (``gemm_kernel="tma"``, the default); on the pointer
  form (Ampere / Ada) fc2's pair is two launches, as are fp32 pairs on the TMA form. A TMA pair launch carries
  its modelled static schedule (``Launch.schedule``, the launcher's own ``matmul_tma.pair_schedule`` for
  ``num_sms`` SMs: makespan and busy fraction with and without balancing, also in the note); where it splits the
  weight-grad GEMM into k-slices, a ``_split_k_reduce_kernel`` launch follows. The roofline does not use it.
* ``"eager"``: the reference ``VisionTransformer`` (timm's computation, ``fused_attn=True``) as PyTorch
  dispatches it on a GPU: cuDNN convolution + bias add, cat and position add, cuBLAS GEMMs with the bias in
  the epilogue (addmm), LayerNorm forward (1 kernel) and backward (dx + dgamma/dbeta kernels), GELU and its
  backward, residual adds and autograd's gradient-accumulation adds, bias gradients as reductions,
  ``F.scaled_dot_product_attention`` as ONE FlashAttention-2 forward kernel (backward: dO.O pre-pass, the
  dQ dK dV kernel, dQ conversion), and the permute copies its backward needs (``stack`` of dq/dk/dv, then a
  copy to the packed qkv layout).
* The modern blocks (:class:`~fastvit_kernels.bench.flops.ViTShape` with RoPE, a SwiGLU MLP, an MLP norm,
  LayerScale, register tokens, separate q / k / v projections, no absolute position embedding: timm ``Eva`` --
  EVA-02, DINOv3 -- e.g. ``ViTShape.from_config("eva02_base_patch14_224")``). "eager": timm's ``EvaBlock`` as a GPU
  dispatches it: the q / k / v GEMMs (or the packed qkv GEMM, its ``torch.cat((q_bias, k_bias, v_bias))`` bias),
  RoPE on q and k of the patch tokens (``x * cos``, rot's negate + stack / cat copy, ``rot(x) * sin``, add, the
  cast back where the table is fp32 -- DINOv3 builds it per forward in fp32 -- and the ``torch.cat`` with the
  prefix tokens; backward: the products' grads and casts, rot's neg and slice_backward / cat, the gradient sums and
  the two slice_backward of q and k), SDPA, the transpose copies of the rotated dq / dk, proj, LayerScale (mul;
  backward: two muls and the gamma reduction), SwiGLU (fc1_g and fc1_x GEMMs or one packed fc1, SiLU, mul, the
  inner LayerNorm; backward: two muls, silu_backward, the chunk's cat or the fc1 input-gradient sum), residual and
  gradient-accumulation adds. "fastvit": FastEva's blocks with the fused ops, always as three attention ops (the
  ``attention_block`` argument does not apply): norm1 + qkv + RoPE as row stats + ONE ``_matmul_rope_kernel``
  launch (reads x, W, the bias, coords (N, 2) and freqs (1, head_dim / 2, 2) fp32; writes the rotated qkv) whose
  backward is TWO ``_matmul_rope_kernel`` launches (dW (+ db), d LayerNorm(x); each un-rotates d(qkv) on load,
  its pair partner's second read counted as L2-resident) + the LayerNorm backward, then the gradient-accumulation
  add; FastEva's per-forward ``torch.cat`` of the q / k / v weights and biases into the packed operand; the RoPE
  coords / freqs copied from the host once per forward; proj as ``linear_residual``, or with LayerScale
  ``F.linear`` (cuBLAS) + eager ``gamma * y`` + add; the MLP as ``layernorm_mlp`` or ``swiglu_mlp`` (with
  LayerScale: without the residual, then ``gamma * y`` + add). The RoPE GEMMs' launches are taken from the RoPE
  branch's code (``ops.layernorm_linear(rope_*)``, ``matmul._matmul_rope_kernel``), ``swiglu_mlp``'s from the
  SwiGLU branch's code (``ops/swiglu_mlp.py``): forward row stats, ONE fc1 GEMM over gate and up on
  ``_matmul_split_kernel`` (stores the (M, 2 D_hidden) pre-activation, writes the hidden), [hidden-norm row
  stats], fc2 on the GEMM core (hidden norm in its prologue, bias + residual epilogue); backward without the
  hidden norm: dW2 (hidden recomputed on load) and d(gate | up) (SwiGLU derivative epilogue) as two
  ``_matmul_split_kernel`` launches; with it (EVA-02's scale_mlp): an elementwise recompute of the hidden, the
  fc2 dW2 + dgrad pair with the hidden LayerNorm on load, the hidden LayerNorm backward, an elementwise d gate /
  d up; then ``torch.cat`` of separate gate / up weights into the packed operand, the fc1 dW1 + dgrad pair and
  the LayerNorm backward. Not modelled: RMSNorm, a GELU MLP with an MLP norm on the fastvit path, attention-pool
  / average pooling heads (the ViT plans' class-token head is used; pass ``global_pool='token'`` to timm).
* Both: cross-entropy loss, and ``torch.optim.AdamW`` in its default foreach form with timm's two parameter
  groups (weight decay on matrices only), launches counted with ``multi_tensor_apply``'s chunking rule
  (65536 elements per block, at most 320 blocks and 110 / 64 / 48 tensors per launch for 1 / 2 / 3 lists).

Bytes are the compulsory traffic of each launch: every tensor it reads counted once, every tensor it writes
counted once (tiles re-read by other thread blocks are assumed to hit L2). Executed FLOPs count matmuls only,
recomputation included (FlashAttention re-forms P in its backward: 5 matmul-equivalents; this package's
backward kernels: 7), so they exceed the model FLOPs of :mod:`fastvit_kernels.bench.flops` used for MFU.

Roofline time: per launch ``max(flops / peak FLOP/s, bytes / bandwidth)`` (+ an optional fixed cost per launch,
0 by default), summed over the launches.

Assumptions: one dtype everywhere ("pure" bf16 / fp16 / fp32 -- autocast's cast kernels are not modelled;
timm's fp32 RoPE frequency buffers stay fp32), no dropout or drop-path, no RoPE coordinate augmentation, a class
token with 'token' pooling, ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from ..kernels.attention import FUSED_BWD_MIN_HEADS, fused_bwd_builds
from ..kernels.layernorm import BWD_GROUP as LN_BWD_GROUP, bwd_programs as ln_bwd_programs
from ..kernels._common import triton_version
from ..kernels.fusion import PROLOGUE_GELU, PROLOGUE_LN, Fusion, pair_plan
from ..kernels.matmul_tma import REFERENCE_SMS, PairSchedule, pair_schedule, tma_configs
from .devices import Peak, dtype_name
from .flops import OP_CLASS_LABELS, OP_CLASSES, ViTShape, model_flops

PATHS = ("fastvit", "eager")
MODES = ("train", "forward")
_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
F32 = 4  # bytes of fp32 statistics (LayerNorm mean / rstd, log-sum-exp) and fp32 scratch
I64 = 8  # bytes of an int64 class label


@dataclass(frozen=True)
class Launch:
    """One GPU kernel launch of the plan.

    Fields: ``kernel`` (what runs, e.g. "cuBLAS GEMM" or "_matmul_kernel"); ``dispatch`` (the op PyTorch
    dispatches that issues it, named like ``str(func.overloadpacket)``: "aten.addmm", "fastvit.attention_fwd");
    ``call`` (index of that dispatched call: launches of one call share it); ``op_class`` (one of
    :data:`~fastvit_kernels.bench.flops.OP_CLASSES`); ``phase`` ("forward" | "backward" | "optimizer");
    ``flops`` (executed matmul FLOPs); ``bytes_read`` / ``bytes_written`` (device memory, bytes);
    ``triton`` (True for this package's Triton kernels); ``note``; ``schedule``: for a TMA pair-kernel launch, its
    modelled static schedule (:class:`fastvit_kernels.kernels.matmul_tma.PairSchedule`: makespan and busy fraction
    of the SMs with and without the balancing), else None.
    """

    kernel: str
    dispatch: str
    call: int
    op_class: str
    phase: str
    flops: int
    bytes_read: int
    bytes_written: int
    triton: bool = False
    note: str = ""
    schedule: PairSchedule | None = None

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def roofline_s(self, peak: Peak, launch_overhead_s: float = 0.0) -> float:
        """max(flops / peak FLOP/s, bytes / bandwidth) + launch_overhead_s, in seconds.

        Raises:
            ValueError: the peak FLOP/s or bandwidth is unknown (None).
        """
        if peak.flops_per_s is None or peak.bytes_per_s is None:
            raise ValueError(f"a roofline needs a peak FLOP/s and a bandwidth; got {peak}")
        return max(self.flops / peak.flops_per_s, self.bytes / peak.bytes_per_s) + launch_overhead_s


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """One kernel launch as a plan writes it, before :class:`_Builder` places it in a dispatched call (which adds
    the call index and the phase): ``name``, ``bytes_read`` / ``bytes_written`` (device memory, bytes), ``flops``
    (executed matmul FLOPs), ``triton`` (True for this package's Triton kernels), ``note``, ``op_class`` (None: the
    builder's current class; an op whose kernels serve several classes names each), ``schedule`` (a TMA pair
    launch's :class:`~fastvit_kernels.kernels.matmul_tma.PairSchedule`), ``fusion`` (a GEMM-core launch's
    :class:`~fastvit_kernels.kernels.fusion.Fusion`: what the pair plan reads). Fields as in :class:`Launch`."""

    name: str
    bytes_read: float
    bytes_written: float
    flops: int = 0
    triton: bool = False
    note: str = ""
    op_class: str | None = None
    schedule: PairSchedule | None = None
    fusion: Fusion | None = field(default=None, compare=False)


def _triton(**fields) -> Kernel:
    """A :class:`Kernel` of this package (``triton=True``)."""
    return Kernel(triton=True, **fields)


class _Builder:
    """Collects launches call by call; ``cls`` and ``phase`` are the current op class and phase."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.n_calls = 0
        self.cls = "other"
        self.phase = "forward"

    def call(self, dispatch: str, *kernels: Kernel) -> None:
        """One dispatched op issuing ``kernels`` in order (byte counts rounded down to whole bytes)."""
        for k in kernels:
            self.launches.append(Launch(
                kernel=k.name, dispatch=dispatch, call=self.n_calls, op_class=k.op_class or self.cls,
                phase=self.phase, flops=int(k.flops), bytes_read=int(k.bytes_read),
                bytes_written=int(k.bytes_written), triton=k.triton, note=k.note, schedule=k.schedule))
        self.n_calls += 1

    # ---- aten pieces shared by both paths (e: element size in bytes) ----
    def layer_norm(self, M: int, D: int, e: int) -> None:
        self.call("aten.native_layer_norm", Kernel(name="LayerNorm fwd", bytes_read=M * D * e + 2 * D * e,
                                                   bytes_written=M * D * e + 2 * M * F32))

    def layer_norm_bwd(self, M: int, D: int, e: int) -> None:
        self.call("aten.native_layer_norm_backward",
                  Kernel(name="LayerNorm bwd dx", bytes_read=2 * M * D * e + D * e + 2 * M * F32,
                         bytes_written=M * D * e),
                  Kernel(name="LayerNorm bwd dgamma/dbeta", bytes_read=2 * M * D * e + 2 * M * F32,
                         bytes_written=2 * D * e))

    def addmm(self, M: int, K: int, N: int, e: int, a_bytes: int | None = None, bias: bool = True,
              note: str = "") -> None:
        """``F.linear`` of M rows, K -> N: addmm with the bias in the epilogue, or (``bias=False``) mm."""
        a = M * K * e if a_bytes is None else a_bytes
        if not bias:
            self.call("aten.mm", Kernel(name="cuBLAS GEMM", flops=2 * M * K * N, bytes_read=a + K * N * e,
                                        bytes_written=M * N * e, note=note))
            return
        self.call("aten.addmm", Kernel(name="cuBLAS GEMM (+bias epilogue)", flops=2 * M * K * N,
                                       bytes_read=a + K * N * e + N * e, bytes_written=M * N * e, note=note))

    def linear_bwd(self, M: int, K: int, N: int, e: int, bias: bool = True) -> None:
        """Backward of ``y (M, N) = x (M, K) @ W^T + b``: dgrad, wgrad, bias-gradient reduction (aten order)."""
        self.call("aten.mm", Kernel(name="cuBLAS GEMM dgrad", flops=2 * M * N * K,
                                    bytes_read=M * N * e + N * K * e, bytes_written=M * K * e))
        self.call("aten.mm", Kernel(name="cuBLAS GEMM wgrad", flops=2 * M * N * K,
                                    bytes_read=M * N * e + M * K * e, bytes_written=N * K * e))
        if bias:
            self.call("aten.sum", Kernel(name="bias-grad reduction", bytes_read=M * N * e, bytes_written=N * e))

    def ew(self, dispatch: str, name: str, read: float, written: float, note: str = "") -> None:
        """One aten op issuing one elementwise / copy / reduction kernel."""
        self.call(dispatch, Kernel(name=name, bytes_read=read, bytes_written=written, note=note))

    def slice_backward(self, full: int, part: int, e: int, note: str = "") -> None:
        """``aten.slice_backward``: zeros of the input's size (``full`` elements), the gradient copied into the
        slice (``part`` elements)."""
        self.call("aten.slice_backward", Kernel(name="fill (zeros)", bytes_read=0, bytes_written=full * e, note=note),
                  Kernel(name="copy into the slice", bytes_read=part * e, bytes_written=part * e, note=note))

    def fold_layer_scale(self, D: int, K: int, e: int) -> None:
        """LayerScale folded into the branch's last Linear (weight (D, K), bias (D,)): ``gamma W`` and ``gamma b``,
        elementwise ops on parameters (``fastvit_kernels._blocks.scaled_linear``)."""
        self.ew("aten.mul", "gamma * W (LayerScale folded)", D * K * e + D * e, D * K * e)
        self.ew("aten.mul", "gamma * b", 2 * D * e, D * e)

    def fold_layer_scale_bwd(self, D: int, K: int, e: int) -> None:
        """The fold's backward (autograd through ``gamma W``, ``gamma b``): dW = gamma dW',
        d gamma = rowsum(dW' W) + b db', db = gamma db'."""
        self.ew("aten.mul", "dW = gamma * dW'", D * K * e + D * e, D * K * e)
        self.ew("aten.mul", "dW' * W", 2 * D * K * e, D * K * e)
        self.ew("aten.sum", "d gamma (rows of dW' * W)", D * K * e, D * e)
        self.ew("aten.mul", "db = gamma * db'; b * db'", 3 * D * e, 2 * D * e)
        self.ew("aten.add", "d gamma (+ b db')", 2 * D * e, D * e)

    def layer_scale(self, M: int, D: int, e: int) -> None:
        """LayerScale forward, ``gamma * y`` (gamma (D,))."""
        self.ew("aten.mul", "LayerScale gamma * y", M * D * e + D * e, M * D * e)

    def layer_scale_bwd(self, M: int, D: int, e: int) -> None:
        """Backward of ``gamma * y``: d gamma = sum over rows of (grad * y) (a mul, then autograd's sum_to_size
        reduction), d y = grad * gamma."""
        self.ew("aten.mul", "LayerScale grad * y", 2 * M * D * e, M * D * e)
        self.ew("aten.sum", "LayerScale gamma grad (sum over rows)", M * D * e, D * e)
        self.ew("aten.mul", "LayerScale grad * gamma", M * D * e + D * e, M * D * e)

    def add(self, n: int, e: int, note: str = "") -> None:
        self.call("aten.add", Kernel(name="elementwise add", bytes_read=2 * n * e, bytes_written=n * e, note=note))


def vit_parameters(shape: ViTShape) -> list[tuple[str, tuple]]:
    """(name, shape) of every parameter of the reference VisionTransformer / FastViT, in ``named_parameters()``
    order (timm's names). Supports the configurations the cost model does (class token, 'token' pooling)."""
    D, Dh, C, P = shape.embed_dim, shape.hidden, shape.in_chans, shape.patch_size
    if not shape.classic:
        return _eva_parameters(shape)
    params = [("cls_token", (1, 1, D)), ("pos_embed", (1, shape.tokens, D)),
              ("patch_embed.proj.weight", (D, C, P, P)), ("patch_embed.proj.bias", (D,))]
    for i in range(shape.depth):
        b = f"blocks.{i}."
        params += [(b + "norm1.weight", (D,)), (b + "norm1.bias", (D,)), (b + "attn.qkv.weight", (3 * D, D))]
        if shape.qkv_bias:
            params.append((b + "attn.qkv.bias", (3 * D,)))
        params += [(b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,)),
                   (b + "norm2.weight", (D,)), (b + "norm2.bias", (D,)),
                   (b + "mlp.fc1.weight", (Dh, D)), (b + "mlp.fc1.bias", (Dh,)),
                   (b + "mlp.fc2.weight", (D, Dh)), (b + "mlp.fc2.bias", (D,))]
    params += [("norm.weight", (D,)), ("norm.bias", (D,))]
    if shape.num_classes:
        params += [("head.weight", (shape.num_classes, D)), ("head.bias", (shape.num_classes,))]
    return params


def _eva_parameters(s: ViTShape) -> list[tuple[str, tuple]]:
    """timm ``Eva``'s parameters (FastEva holds the same), in ``named_parameters()`` order: a module's own
    parameters before its submodules' (cls / reg tokens and pos_embed; per block gamma_1 / gamma_2, then norm1,
    attn (q_bias, v_bias, then the projections), norm2, mlp)."""
    D, Dh, C, P = s.embed_dim, s.hidden, s.in_chans, s.patch_size
    params = [("cls_token", (1, 1, D))] if s.class_token else []
    if s.reg_tokens:
        params.append(("reg_token", (1, s.reg_tokens, D)))
    if s.pos_embed:
        params.append(("pos_embed", (1, s.tokens, D)))
    params += [("patch_embed.proj.weight", (D, C, P, P)), ("patch_embed.proj.bias", (D,))]
    norm = ("weight",) if s.norm == "rmsnorm" else ("weight", "bias")
    for i in range(s.depth):
        b = f"blocks.{i}."
        params += [(b + "gamma_1", (D,)), (b + "gamma_2", (D,))] if s.layer_scale else []
        params += [(b + "norm1." + n, (D,)) for n in norm]
        if s.qkv_bias == "qv" and s.qkv_fused:
            params += [(b + "attn.q_bias", (D,)), (b + "attn.v_bias", (D,))]
        if s.qkv_fused:
            params.append((b + "attn.qkv.weight", (3 * D, D)))
            if s.qkv_bias is True:
                params.append((b + "attn.qkv.bias", (3 * D,)))
        else:
            for n in "qkv":
                params.append((b + f"attn.{n}_proj.weight", (D, D)))
                if s.qkv_bias is True or (s.qkv_bias == "qv" and n != "k"):
                    params.append((b + f"attn.{n}_proj.bias", (D,)))
        params += [(b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,))]
        params += [(b + "norm2." + n, (D,)) for n in norm]
        if s.mlp == "swiglu":
            params += [(b + "mlp.fc1_g.weight", (Dh, D)), (b + "mlp.fc1_g.bias", (Dh,)),
                       (b + "mlp.fc1_x.weight", (Dh, D)), (b + "mlp.fc1_x.bias", (Dh,))]
        else:
            f1 = 2 * Dh if s.mlp == "swiglu_packed" else Dh
            params += [(b + "mlp.fc1.weight", (f1, D)), (b + "mlp.fc1.bias", (f1,))]
        if s.mlp_norm:
            params += [(b + "mlp.norm." + n, (Dh,)) for n in norm]
        params += [(b + "mlp.fc2.weight", (D, Dh)), (b + "mlp.fc2.bias", (D,))]
    params += [("norm." + n, (D,)) for n in norm]
    if s.num_classes:
        params += [("head.weight", (s.num_classes, D)), ("head.bias", (s.num_classes,))]
    return params


_CHUNK = 65536  # elements per block in multi_tensor_apply
_MAX_BLOCKS = 320
_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MAX_TENSORS_SCALARLIST = {1: 96, 2: 64, 3: 48, 4: 36, 5: 30}


def multi_tensor_launches(numels: list[int], depth: int, scalar_list: bool = False) -> int:
    """Kernel launches of one ``torch._foreach_*`` op over tensors of ``numels`` elements with ``depth`` tensor
    lists, following ``multi_tensor_apply`` (ATen/native/cuda/MultiTensorApply.cuh): a launch whenever 320
    blocks of 65536 elements, or the per-launch tensor limit (110 / 64 / 48 for depth 1 / 2 / 3; 96 at depth 1
    for scalar-list ops) is reached, and one for the rest. Empty tensors are skipped."""
    limit = (_MAX_TENSORS_SCALARLIST if scalar_list else _MAX_TENSORS)[depth]
    sizes = [n for n in numels if n > 0]
    launches = n_tensors = n_blocks = 0
    for i, n in enumerate(sizes):
        n_tensors += 1
        chunks = -(-n // _CHUNK)
        for c in range(chunks):
            n_blocks += 1
            last_chunk = c == chunks - 1
            if (n_tensors == limit and last_chunk) or n_blocks == _MAX_BLOCKS or (last_chunk and i == len(sizes) - 1):
                launches += 1
                n_blocks = 0
                n_tensors = 0 if last_chunk else 1
    return launches


# (foreach op, depth, scalar-list variant, lists read, lists written) of torch's multi-tensor AdamW step,
# decoupled weight decay, not capturable, no amsgrad (torch/optim/adam.py, _multi_tensor_adam); lists are
# p (params), g (grads), m (exp_avg), v (exp_avg_sq), s (the sqrt(v) temporary)
_ADAMW_FOREACH = (
    ("_foreach_mul_ (weight decay)", 1, False, "p", "p"),
    ("_foreach_lerp_", 2, False, "mg", "m"),
    ("_foreach_mul_", 1, False, "v", "v"),
    ("_foreach_addcmul_", 3, False, "vg", "v"),
    ("_foreach_sqrt", 2, False, "v", "s"),
    ("_foreach_div_", 1, True, "s", "s"),
    ("_foreach_add_", 1, False, "s", "s"),
    ("_foreach_addcdiv_", 3, True, "pms", "p"),
)


def _adamw(b: _Builder, shape: ViTShape, e: int, weight_decay: float) -> None:
    decay, no_decay = [], []
    for name, shp in vit_parameters(shape):
        n = 1
        for s in shp:
            n *= s
        (decay if len(shp) > 1 and name not in ("pos_embed", "cls_token", "reg_token") else no_decay).append(n)
    b.cls, b.phase = "optimizer", "optimizer"
    for numels, wd in ((decay, weight_decay), (no_decay, 0.0)):
        total = sum(numels)
        for op, depth, scalar_list, reads, writes in _ADAMW_FOREACH:
            if op.endswith("(weight decay)") and wd == 0:
                continue
            dispatch = "aten." + op.split(" ")[0]
            n_launch = multi_tensor_launches(numels, depth, scalar_list)
            # spread the op's bytes evenly over its launches (the launches are of similar size)
            r, w = len(reads) * total * e, len(writes) * total * e
            b.call(dispatch, *[Kernel(name="multi_tensor_apply " + op.split(" ")[0], bytes_read=r / n_launch,
                                      bytes_written=w / n_launch) for _ in range(n_launch)])


def _check(shape: ViTShape, batch_size: int, path: str, mode: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not shape.class_token or shape.global_pool != "token" or shape.num_classes < 1:
        raise ValueError("the cost model covers ViTs with a class token, global_pool='token' and a head "
                         f"(num_classes >= 1); got class_token={shape.class_token}, "
                         f"global_pool={shape.global_pool!r}, num_classes={shape.num_classes}")
    if shape.classic and shape.qkv_bias is not True:
        raise ValueError("the cost model assumes qkv_bias=True (timm's default)")
    if shape.norm != "layernorm":
        raise ValueError(f"the cost model does not model norm={shape.norm!r} yet (LayerNorm only)")
    if path == "fastvit" and shape.mlp == "gelu" and shape.mlp_norm:
        raise ValueError("the cost model does not model a GELU MLP with an MLP norm on the fastvit path (FastEva "
                         "runs it eager)")


def _head_fwd(b: _Builder, s: ViTShape, B: int, e: int, loss: bool) -> None:
    D, nc, M = s.embed_dim, s.num_classes, B * s.tokens
    b.cls = "head"
    b.layer_norm(M, D, e)  # final norm over all tokens, then x[:, 0] (a view)
    b.addmm(B, D, nc, e)
    if loss:
        b.call("aten._log_softmax", Kernel(name="log_softmax", bytes_read=B * nc * e, bytes_written=B * nc * e))
        b.call("aten.nll_loss_forward", Kernel(name="nll_loss", bytes_read=B * e + B * I64, bytes_written=2 * e))


def _head_bwd(b: _Builder, s: ViTShape, B: int, e: int) -> None:
    D, nc, M = s.embed_dim, s.num_classes, B * s.tokens
    b.cls, b.phase = "head", "backward"
    b.call("aten.ones_like", Kernel(name="fill (loss seed)", bytes_read=0, bytes_written=e))
    b.call("aten.nll_loss_backward", Kernel(name="fill", bytes_read=0, bytes_written=B * nc * e),
           Kernel(name="nll_loss bwd", bytes_read=B * I64 + e, bytes_written=B * e))
    b.call("aten._log_softmax_backward_data",
           Kernel(name="log_softmax bwd", bytes_read=2 * B * nc * e, bytes_written=B * nc * e))
    b.linear_bwd(B, D, nc, e)
    b.call("aten.select_backward", Kernel(name="fill", bytes_read=0, bytes_written=M * D * e),
           Kernel(name="copy", bytes_read=B * D * e, bytes_written=B * D * e))
    b.layer_norm_bwd(M, D, e)


def _rope_sizes(s: ViTShape, B: int, e: int) -> tuple[int, int, int, int]:
    """(Mp, tab, et, eo) of timm's eager RoPE: Mp = B * num_patches rows rotated; tab: bytes of one of the sin /
    cos halves of the (num_patches, 2 * head_dim) table (broadcast over batch and heads: counted once); et: the
    table's element size ("cat": EVA-02's cached buffer, cast with the model; "dinov3": built per forward in fp32);
    eo: the element size of the rotation's products (dtype promotion: fp32 with an fp32 table)."""
    et = F32 if s.rope == "dinov3" else e
    return B * s.num_patches, s.num_patches * s.head_dim * et, et, max(e, et)


def _eager_rope_fwd(b: _Builder, s: ViTShape, B: int, e: int, which: str) -> None:
    """timm ``apply_rot_embed_cat`` on the patch tokens of q or k (B, H, N, head_dim), then ``torch.cat`` with the
    prefix tokens: ``x * cos + rot(x) * sin`` with rot = ``torch.stack([-x[..., 1::2], x[..., ::2]], -1)``
    (interleaved) or ``torch.cat([-x2, x1], -1)`` (rotate_half), the cast back to x's dtype where the table is
    fp32."""
    D, M = s.embed_dim, B * s.tokens
    Mp, tab, et, eo = _rope_sizes(s, B, e)
    n = Mp * D  # elements of the rotated part of q (or k)
    b.ew("aten.mul", f"RoPE {which} * cos", n * e + tab, n * eo)
    b.ew("aten.neg", f"RoPE rot({which}): negate the odd half", n // 2 * e, n // 2 * e)
    if s.rope_half:
        b.ew("aten.cat", f"RoPE rot({which}): cat [-x2, x1]", n * e, n * e)
    else:
        b.ew("aten.stack", f"RoPE rot({which}): stack [-x_odd, x_even] (interleave copy)", n * e, n * e)
    b.ew("aten.mul", f"RoPE rot({which}) * sin", n * e + tab, n * eo)
    b.ew("aten.add", f"RoPE {which} sum", 2 * n * eo, n * eo)
    if eo != e:
        b.ew("aten._to_copy", f"RoPE {which} cast to the activation dtype", n * eo, n * e)
    b.ew("aten.cat", f"cat [{which} prefix tokens; rotated]", M * D * e, M * D * e)


def _eager_rope_bwd(b: _Builder, s: ViTShape, B: int, e: int, which: str) -> None:
    """Autograd's backward of :func:`_eager_rope_fwd` for q or k: the cat's backward is views; the cast back
    (fp32 table); each product's grad * table (cast to the input's dtype where it is fp32); rot's backward (neg,
    then interleaved: two slice_backward (zeros + copy) for the strided halves; half: the chunk's backward cat);
    the gradient accumulations at x = q[:, :, prefix:] (3 sources interleaved, 2 half); the slice_backward of
    x and of the prefix slice, and their sum."""
    D, M = s.embed_dim, B * s.tokens
    Mp, tab, et, eo = _rope_sizes(s, B, e)
    n = Mp * D
    if eo != e:
        b.ew("aten._to_copy", f"RoPE {which}: grad cast to fp32 (ToCopyBackward)", n * e, n * eo)
    for table in ("sin", "cos"):
        b.ew("aten.mul", f"RoPE {which}: grad * {table}", n * eo + tab, n * eo)
        if eo != e:
            b.ew("aten._to_copy", f"RoPE {which}: grad cast to the input dtype", n * eo, n * e)
        if table == "sin":  # rot's backward
            b.ew("aten.neg", f"RoPE rot({which}) bwd: negate", n // 2 * e, n // 2 * e)
            if s.rope_half:
                b.ew("aten.cat", f"RoPE rot({which}) bwd: chunk's backward (cat)", n * e, n * e)
            else:
                b.slice_backward(n, n // 2, e, f"RoPE rot({which}) bwd: odd half")
                b.slice_backward(n, n // 2, e, f"RoPE rot({which}) bwd: even half")
    for _ in range(1 if s.rope_half else 2):
        b.add(n, e, f"RoPE {which}: grad accumulation at the rotated slice")
    b.slice_backward(M * D, n, e, f"{which}[:, :, prefix:] backward")
    b.slice_backward(M * D, M * D - n, e, f"{which}[:, :, :prefix] backward")
    b.add(M * D, e, f"grad accumulation ({which}: prefix + rotated slices)")


def _dinov3_table(b: _Builder, s: ViTShape) -> None:
    """timm ``RotaryEmbeddingDinoV3.get_embed(shape)`` once per forward (dynamic_img_size): the grid built on the
    host, copied to the device, then angles, sin, cos, their layout and the [sin, cos] cat (fp32)."""
    Np, hd = s.num_patches, s.head_dim
    b.ew("aten._to_copy", "H2D copy of the coordinate grid", 0, Np * 2 * F32, "host read not counted")
    b.ew("aten.mul", "2 pi * coords", Np * 2 * F32, Np * 2 * F32)
    b.ew("aten.div", "angles = coords / periods", Np * 2 * F32 + hd // 4 * F32, Np * hd // 2 * F32)
    for f in ("sin", "cos"):
        b.ew(f"aten.{f}", f"angles.{f}()", Np * hd // 2 * F32, Np * hd // 2 * F32)
        b.ew("aten.cat" if s.rope_half else "aten.repeat_interleave", f"{f} layout", Np * hd // 2 * F32,
             Np * hd * F32)
    b.ew("aten.cat", "cat [sin, cos]", 2 * Np * hd * F32, 2 * Np * hd * F32)


def _eager_stem_fwd(b: _Builder, s: ViTShape, B: int, e: int) -> None:
    D, Np, N = s.embed_dim, s.num_patches, s.tokens
    M, CPP, img = B * N, s.in_chans * s.patch_size**2, B * s.in_chans * s.img_size[0] * s.img_size[1]
    npt = s.prefix_tokens
    b.cls = "patch_embed"
    b.call("aten.convolution",
           Kernel(name="cuDNN convolution", flops=2 * B * Np * D * CPP, bytes_read=img * e + D * CPP * e,
                  bytes_written=B * Np * D * e),
           Kernel(name="bias add (in place)", bytes_read=B * Np * D * e + D * e, bytes_written=B * Np * D * e))
    b.call("aten.cat", Kernel(name="cat [cls; patches]" if not s.reg_tokens else "cat [cls; reg; patches]",
                              bytes_read=(B * Np * D + npt * D) * e, bytes_written=M * D * e))
    if s.pos_embed:
        b.add(M * D, e, "+ pos_embed (broadcast read counted as full size)")
    if s.rope == "dinov3":
        _dinov3_table(b, s)


def _eager_stem_bwd(b: _Builder, s: ViTShape, B: int, e: int) -> None:
    D, Np, N = s.embed_dim, s.num_patches, s.tokens
    M, CPP, img = B * N, s.in_chans * s.patch_size**2, B * s.in_chans * s.img_size[0] * s.img_size[1]
    b.cls = "patch_embed"
    if s.pos_embed:
        b.call("aten.sum", Kernel(name="pos_embed grad (sum over batch)", bytes_read=M * D * e,
                                  bytes_written=N * D * e))
    b.call("aten.sum", Kernel(name="cls_token grad (sum over batch)", bytes_read=B * D * e, bytes_written=D * e))
    if s.reg_tokens:
        R = s.reg_tokens
        b.call("aten.sum", Kernel(name="reg_token grad (sum over batch)", bytes_read=B * R * D * e,
                                  bytes_written=R * D * e))
    b.call("aten.convolution_backward",
           Kernel(name="copy grad to contiguous", bytes_read=B * Np * D * e, bytes_written=B * Np * D * e),
           Kernel(name="cuDNN wgrad", flops=2 * B * Np * D * CPP, bytes_read=B * Np * D * e + img * e,
                  bytes_written=D * CPP * e),
           Kernel(name="bias-grad reduction", bytes_read=B * Np * D * e, bytes_written=D * e))


def _eager_plan(b: _Builder, s: ViTShape, B: int, e: int, train: bool) -> None:
    D, Dh, H, N, Np, L = s.embed_dim, s.hidden, s.num_heads, s.tokens, s.num_patches, s.depth
    M = B * N
    att = 4 * B * N * N * D  # forward attention FLOPs (two matmuls)
    lse = B * H * N * F32
    qkv_bias = bool(s.qkv_bias)
    # ---- forward ----
    _eager_stem_fwd(b, s, B, e)
    for _ in range(L):
        b.cls = "ln_qkv"
        b.layer_norm(M, D, e)
        if s.qkv_fused:
            if s.qkv_bias == "qv":
                b.ew("aten.cat", "qkv bias: cat [q_bias; k_bias (zeros); v_bias]", 3 * D * e, 3 * D * e)
            b.addmm(M, D, 3 * D, e, bias=qkv_bias)
        else:  # separate q / k / v projections; timm's "qv" form: k_proj without a bias
            for n in "qkv":
                b.addmm(M, D, D, e, bias=s.qkv_bias is True or (qkv_bias and n != "k"), note=f"{n}_proj")
        if s.rope:
            for which in ("q", "k"):
                _eager_rope_fwd(b, s, B, e, which)
        b.cls = "attention"
        b.call("aten._scaled_dot_product_flash_attention",
               Kernel(name="FlashAttention-2 fwd", flops=att, bytes_read=3 * M * D * e, bytes_written=M * D * e + lse))
        b.cls = "proj"
        b.addmm(M, D, D, e)
        if s.layer_scale:
            b.layer_scale(M, D, e)
        b.add(M * D, e, "residual")
        b.cls = "mlp"
        b.layer_norm(M, D, e)
        if s.mlp == "gelu":
            b.addmm(M, D, Dh, e)
            b.call("aten.gelu", Kernel(name="GELU", bytes_read=M * Dh * e, bytes_written=M * Dh * e))
        else:
            if s.mlp == "swiglu":
                b.addmm(M, D, Dh, e, note="fc1_g")
                b.addmm(M, D, Dh, e, note="fc1_x")
            else:
                b.addmm(M, D, 2 * Dh, e, note="packed fc1 (gate | up)")
            b.ew("aten.silu", "SiLU(gate)", M * Dh * e, M * Dh * e)
            b.ew("aten.mul", "SiLU(gate) * up", 2 * M * Dh * e, M * Dh * e)
        if s.mlp_norm:
            b.layer_norm(M, Dh, e)
        b.addmm(M, Dh, D, e)
        if s.layer_scale:
            b.layer_scale(M, D, e)
        b.add(M * D, e, "residual")
    _head_fwd(b, s, B, e, loss=train)
    if not train:
        return
    # ---- backward ----
    _head_bwd(b, s, B, e)
    for _ in range(L):
        b.cls = "mlp"
        if s.layer_scale:
            b.layer_scale_bwd(M, D, e)
        b.linear_bwd(M, Dh, D, e)  # fc2
        if s.mlp_norm:
            b.layer_norm_bwd(M, Dh, e)
        if s.mlp == "gelu":
            b.call("aten.gelu_backward", Kernel(name="GELU bwd", bytes_read=2 * M * Dh * e, bytes_written=M * Dh * e))
            b.linear_bwd(M, D, Dh, e)  # fc1
        else:
            b.ew("aten.mul", "grad * up (d SiLU(gate))", 2 * M * Dh * e, M * Dh * e)
            b.ew("aten.mul", "grad * SiLU(gate) (d up)", 2 * M * Dh * e, M * Dh * e)
            b.ew("aten.silu_backward", "SiLU bwd", 2 * M * Dh * e, M * Dh * e)
            if s.mlp == "swiglu":
                b.linear_bwd(M, D, Dh, e)  # fc1_x
                b.linear_bwd(M, D, Dh, e)  # fc1_g
                b.add(M * D, e, "grad accumulation (fc1_g + fc1_x inputs)")
            else:
                b.ew("aten.cat", "chunk's backward: cat [d gate, d up]", 2 * M * Dh * e, 2 * M * Dh * e)
                b.linear_bwd(M, D, 2 * Dh, e)  # packed fc1
        b.layer_norm_bwd(M, D, e)
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
        b.cls = "proj"
        if s.layer_scale:
            b.layer_scale_bwd(M, D, e)
        b.linear_bwd(M, D, D, e)
        b.cls = "attention"
        b.call("aten._scaled_dot_product_flash_attention_backward",
               Kernel(name="FlashAttention-2 bwd dO.O (+ clears fp32 dQ accumulator)", bytes_read=2 * M * D * e,
                      bytes_written=lse + M * D * F32),
               Kernel(name="FlashAttention-2 bwd dQ dK dV", flops=10 * B * N * N * D,
                      bytes_read=4 * M * D * e + 2 * lse, bytes_written=2 * M * D * e + M * D * F32),
               Kernel(name="FlashAttention-2 bwd convert dQ", bytes_read=M * D * F32, bytes_written=M * D * e))
        if s.rope:
            b.cls = "ln_qkv"
            for which in ("k", "q"):
                _eager_rope_bwd(b, s, B, e, which)
            b.cls = "attention"
        if s.qkv_fused:
            b.call("aten.stack", Kernel(name="stack dq, dk, dv (permute copy)", bytes_read=3 * M * D * e,
                                        bytes_written=3 * M * D * e))
            b.call("aten.clone", Kernel(name="copy to packed (B, N, 3D) (permute copy)", bytes_read=3 * M * D * e,
                                        bytes_written=3 * M * D * e))
            b.cls = "ln_qkv"
            b.linear_bwd(M, D, 3 * D, e, bias=qkv_bias)
        else:
            # FlashAttention's dq / dk / dv take their input's memory layout (empty_like): dv (and, without RoPE,
            # dq / dk) is already (B, N, H, hd) in memory, a view of (B, N, D); the rotated q / k were fresh
            # (B, H, N, hd) tensors, so their gradients are copied back to (B, N, D)
            for n in ("kq" if s.rope else ""):
                b.call("aten.clone", Kernel(name=f"d{n}: copy to (B, N, D) (transpose copy)", bytes_read=M * D * e,
                                            bytes_written=M * D * e))
            b.cls = "ln_qkv"
            for n in "vkq":
                b.linear_bwd(M, D, D, e, bias=s.qkv_bias is True or (qkv_bias and n != "k"))
            for _ in range(2):
                b.add(M * D, e, "grad accumulation (q / k / v projection inputs)")
        b.layer_norm_bwd(M, D, e)
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
    _eager_stem_bwd(b, s, B, e)


# the fusions of the backward's GEMMs (ops/linear.py, ops/layernorm_mlp.py: matmul.linear_backward), which the
# pair plan reads: weight grads (bias grads as A row sums; LayerNorm or GELU recomputed on B's load) and dgrads
WGRAD = Fusion(a_rowsum=True)
WGRAD_LN = Fusion(b_prologue=PROLOGUE_LN.value, a_rowsum=True)
WGRAD_GELU = Fusion(b_prologue=PROLOGUE_GELU.value, a_rowsum=True)
DGRAD = Fusion()
DGRAD_GELU = Fusion(gelu_grad=True)


def _pair(first: Kernel, second: Kernel, gemm_kernel: str, e: int, shapes: tuple = None,
          num_sms: int = REFERENCE_SMS) -> list[Kernel]:
    """The launches of ``matmul.gemm_pair`` for two GEMM launches: one launch of the pair kernel (FLOPs and bytes the
    sums of the two: the operand both read -- dY or dH -- is counted twice, the two problems' tiles read it at
    different times, so no L2 reuse is assumed), or the two launches where gemm_pair runs them one by one: where
    the launchers' own predicate, :func:`fastvit_kernels.kernels.fusion.pair_plan`, on the two launches'
    ``fusion`` for this kernel form, dtype (``e`` = 4: fp32, else bf16) and the installed Triton, gives a reason.

    On the TMA form, ``shapes`` ((M, N, K) of each GEMM) give the pair's schedule on ``num_sms`` programs with the
    16-bit default tile (:func:`~fastvit_kernels.kernels.matmul_tma.pair_schedule`, the launcher's own function;
    MODELLED), set as the pair launch's ``schedule``. When it splits the long problem into S k-slices, that
    problem's output becomes S fp32 partial tiles (S * M * N * 4 bytes, row sums S * M * 4) written by the pair
    launch and read by a second launch, ``_split_k_reduce_kernel``, which writes the output the pair launch would
    have."""
    dtype = torch.float32 if e == 4 else torch.bfloat16
    if pair_plan(first.fusion, second.fusion, form=gemm_kernel, dtype=dtype, triton_version=triton_version()):
        return [first, second]
    name = "_matmul_tma_pair_kernel" if gemm_kernel == "tma" else "_matmul_pair_kernel"
    note = f"{first.note} + {second.note} (one launch)"
    if gemm_kernel != "tma":
        return [_triton(name=name, flops=first.flops + second.flops, bytes_read=first.bytes_read + second.bytes_read,
                        bytes_written=first.bytes_written + second.bytes_written, note=note)]
    cfg = tma_configs(torch.bfloat16, pair=True)[0].kwargs
    sched = pair_schedule(shapes, num_sms, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
    note += (f"; static schedule on {num_sms} SMs (modelled): {sched.baseline_efficiency:.1%} busy unbalanced, "
             f"{sched.efficiency:.1%} balanced ({sched.split} k-slice{'s' if sched.split > 1 else ''})")
    written = first.bytes_written + second.bytes_written
    if sched.split == 1:
        return [_triton(name=name, flops=first.flops + second.flops, bytes_read=first.bytes_read + second.bytes_read,
                        bytes_written=written, note=note, schedule=sched)]
    long, (m, n, _) = (first, second)[sched.first], shapes[sched.first]
    rowsum = long.fusion.a_rowsum
    partials = sched.split * (m * n + (m if rowsum else 0)) * F32
    return [_triton(name=name, flops=first.flops + second.flops, bytes_read=first.bytes_read + second.bytes_read,
                    bytes_written=written - long.bytes_written + partials, note=note, schedule=sched),
            _triton(name="_split_k_reduce_kernel", bytes_read=partials, bytes_written=long.bytes_written,
                    note=f"sums the {sched.split} fp32 partials of the pair's long problem in slice order")]


def _ln_bwd_kernels(M: int, D: int, e: int, dres: bool, cls: str) -> list[Kernel]:
    """The launches of ``layernorm.layernorm_bwd`` over (M, D) rows: the fill of its fresh int32 ticket counters
    (global + one per group; layernorm.ticket_counter), then ``_layernorm_bwd_kernel`` reading x, dy (+ the
    residual's gradient), gamma and the row stats; every program's fp32 dgamma / dbeta partial row is written once
    and read once by its group's last program, whose group row the global last program reads."""
    P = ln_bwd_programs(M, D)
    G = -(-P // LN_BWD_GROUP)
    partials = 2 * (P + G) * D * F32
    return [Kernel(name="fill", bytes_read=0, bytes_written=(1 + G) * 4,
                   note="LayerNorm-backward ticket counters", op_class=cls),
            _triton(name="_layernorm_bwd_kernel",
                    bytes_read=(3 if dres else 2) * M * D * e + D * e + 2 * M * F32 + partials,
                    bytes_written=M * D * e + partials + 2 * D * e,
                    note="dx" + (" + the residual's gradient" if dres else "") + "; dgamma / dbeta by a two-level "
                    "in-kernel reduction of fp32 partials", op_class=cls)]


def _attention_bwd_kernels(B: int, H: int, N: int, D: int, e: int) -> list[Kernel]:
    """The attention backward's launches, by the launcher's rule (e == 2: fp16 / bf16, which it treats alike)."""
    M, lse = B * N, B * H * N * F32
    if B * H >= FUSED_BWD_MIN_HEADS and fused_bwd_builds(D // H, torch.bfloat16 if e == 2 else torch.float32):
        # one program per (batch, head): q, k, v, O, dO and lse read once (re-reads of a head's tiles by the
        # program that just read them hit L2); delta written to a (B, H, N) fp32 scratch and read back (counted,
        # though it is small and L2-resident); dq, dk, dv written once
        return [_triton(name="_attention_bwd_fused_kernel", flops=14 * B * N * N * D,
                        bytes_read=5 * M * D * e + 2 * lse, bytes_written=3 * M * D * e + lse,
                        note="delta, then dK/dV, then dQ per (batch, head)", op_class="attention")]
    return [_triton(name="_attention_bwd_preprocess_kernel", bytes_read=2 * M * D * e, bytes_written=lse,
                    op_class="attention"),
            _triton(name="_attention_bwd_dkdv_kernel", flops=8 * B * N * N * D,
                    bytes_read=4 * M * D * e + 2 * lse, bytes_written=2 * M * D * e, op_class="attention"),
            _triton(name="_attention_bwd_dq_kernel", flops=6 * B * N * N * D,
                    bytes_read=4 * M * D * e + 2 * lse, bytes_written=M * D * e, op_class="attention")]


def _fastvit_plan(b: _Builder, s: ViTShape, B: int, e: int, train: bool, attention_block: bool = True,
                  gemm_kernel: str = "tma", num_sms: int = REFERENCE_SMS, fold_ls: bool = True) -> None:
    if not s.classic:
        _fastvit_modern_plan(b, s, B, e, train, gemm_kernel, num_sms, fold_ls)
        return
    D, Dh, H, N, Np, L = s.embed_dim, s.hidden, s.num_heads, s.tokens, s.num_patches, s.depth
    M, CPP, img = B * N, s.in_chans * s.patch_size**2, B * s.in_chans * s.img_size[0] * s.img_size[1]
    att = 4 * B * N * N * D
    lse = B * H * N * F32
    # the block GEMMs' kernel form (matmul.gemm / gemm_pair); the patch embedding's GEMMs run on _matmul_split_kernel
    GK = "_matmul_tma_kernel" if gemm_kernel == "tma" else "_matmul_kernel"

    def pair(first: Kernel, second: Kernel, shapes: tuple, cls: str = "mlp") -> list[Kernel]:
        return [replace(k, op_class=cls) for k in _pair(first, second, gemm_kernel, e, shapes, num_sms)]

    # ---- forward ----
    b.cls = "patch_embed"
    b.call("fastvit.patch_embed_fwd",
           _triton(name="_matmul_split_kernel", flops=2 * B * Np * D * CPP,
                   bytes_read=img * e + D * CPP * e + D * e + Np * D * e, bytes_written=B * Np * D * e,
                   note="pixels gathered in the A load; bias + pos_embed epilogue"),
           _triton(name="_prefix_rows_kernel", bytes_read=2 * D * e, bytes_written=B * D * e,
                   note="class row: cls_token + pos_embed[0]"))
    # the attention half's kernels (model.py: one fastvit::attention_block op; blocks with LayerScale / qk_norm /
    # dropout: its three ops), each with its op class
    qkv_fwd = [_triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32,
                       note="norm1 row statistics", op_class="ln_qkv"),
               _triton(name=GK, flops=2 * M * D * 3 * D,
                       bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + 3 * D * D * e + 3 * D * e,
                       bytes_written=M * 3 * D * e, note="LayerNorm prologue; bias epilogue", op_class="ln_qkv")]
    att_fwd = [_triton(name="_attention_fwd_kernel", flops=att, bytes_read=3 * M * D * e,
                       bytes_written=M * D * e + lse, op_class="attention")]
    proj_fwd = [_triton(name=GK, flops=2 * M * D * D, bytes_read=M * D * e + D * D * e + D * e + M * D * e,
                        bytes_written=M * D * e, note="bias + residual epilogue", op_class="proj")]

    def attention_half(suffix: str, parts: list) -> None:
        """The attention half's (op, kernels) parts as one fastvit::attention_block op or as its three ops."""
        if attention_block:
            b.call(f"fastvit.attention_block_{suffix}", *[k for _, kernels in parts for k in kernels])
        else:
            for op, kernels in parts:
                b.call(f"fastvit.{op}_{suffix}", *kernels)

    for _ in range(L):
        attention_half("fwd", [("layernorm_linear", qkv_fwd), ("attention", att_fwd), ("linear_residual", proj_fwd)])
        b.cls = "mlp"
        b.call("fastvit.layernorm_mlp_fwd",
               _triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32),
               _triton(name=GK, flops=2 * M * D * Dh,
                       bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + Dh * D * e + Dh * e,
                       bytes_written=2 * M * Dh * e,
                       note="LayerNorm prologue; bias + GELU epilogue, stores the pre-activation"),
               _triton(name=GK, flops=2 * M * Dh * D, bytes_read=M * Dh * e + D * Dh * e + D * e + M * D * e,
                       bytes_written=M * D * e, note="bias + residual epilogue"))
    _head_fwd(b, s, B, e, loss=train)
    if not train:
        return
    # ---- backward ----
    _head_bwd(b, s, B, e)
    def ln_bwd(dres: bool, cls: str) -> list[Kernel]:
        return _ln_bwd_kernels(M, D, e, dres, cls)

    for _ in range(L):
        b.cls = "mlp"
        b.call("fastvit.layernorm_mlp_bwd",
               *pair(_triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + M * Dh * e,
                             bytes_written=D * Dh * e + D * e,
                             note="dW2; GELU recomputed; db2 = row sums of its dY^T tiles", fusion=WGRAD_GELU),
                     _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + D * Dh * e + M * Dh * e,
                             bytes_written=M * Dh * e, note="dH; GELU' epilogue", fusion=DGRAD_GELU),
                     ((D, Dh, M), (M, Dh, D))),
               *pair(_triton(name=GK, flops=2 * M * D * Dh,
                             bytes_read=M * Dh * e + M * D * e + 2 * M * F32 + 2 * D * e,
                             bytes_written=Dh * D * e + Dh * e,
                             note="dW1; LayerNorm recomputed; db1 = row sums of its dH^T tiles", fusion=WGRAD_LN),
                     _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * Dh * e + Dh * D * e,
                             bytes_written=M * D * e, note="d LayerNorm(x)", fusion=DGRAD),
                     ((Dh, D, M), (M, D, Dh))),
               *ln_bwd(True, "mlp"))
        proj_bwd = pair(_triton(name=GK, flops=2 * M * D * D, bytes_read=2 * M * D * e,
                                bytes_written=D * D * e + D * e,
                                note="dW; db = row sums of its dY^T tiles (residual grad = dY: no kernel)",
                                fusion=WGRAD),
                        _triton(name=GK, flops=2 * M * D * D, bytes_read=M * D * e + D * D * e,
                                bytes_written=M * D * e, note="dx", fusion=DGRAD),
                        ((D, D, M), (M, D, D)), "proj")
        att_bwd = _attention_bwd_kernels(B, H, N, D, e)
        qkv_bwd = pair(_triton(name=GK, flops=2 * M * D * 3 * D,
                               bytes_read=3 * M * D * e + M * D * e + 2 * M * F32 + 2 * D * e,
                               bytes_written=3 * D * D * e + 3 * D * e,
                               note="dW; LayerNorm recomputed; db = row sums of its dY^T tiles", fusion=WGRAD_LN),
                       _triton(name=GK, flops=2 * M * D * 3 * D, bytes_read=3 * M * D * e + 3 * D * D * e,
                               bytes_written=M * D * e, note="d LayerNorm(x)", fusion=DGRAD),
                       ((3 * D, D, M), (M, D, 3 * D)), "ln_qkv") + ln_bwd(attention_block, "ln_qkv")
        attention_half("bwd", [("linear_residual", proj_bwd), ("attention", att_bwd), ("layernorm_linear", qkv_bwd)])
        if not attention_block:
            b.cls = "ln_qkv"
            b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
    b.cls = "patch_embed"
    b.call("fastvit.patch_embed_bwd",
           _triton(name="_column_sum_kernel", bytes_read=M * D * e, bytes_written=N * D * F32 + N * D * e,
                   note="fp32 sum over the batch (pos / bias / cls grads), and the pos_embed grad in the weight dtype"),
           _triton(name="_column_sum_tail_kernel", bytes_read=N * D * F32, bytes_written=D * e + D * e,
                   note="bias grad (sum of the patch rows) and the cls_token grad in the weight dtype"),
           _triton(name="_matmul_split_kernel", flops=2 * B * Np * D * CPP, bytes_read=B * Np * D * e + img * e,
                   bytes_written=D * CPP * e, note="dW; patches re-gathered"))


WGRAD_LN_NOBIAS = Fusion(b_prologue=PROLOGUE_LN.value)


def _fastvit_modern_plan(b: _Builder, s: ViTShape, B: int, e: int, train: bool, gemm_kernel: str = "tma",
                         num_sms: int = REFERENCE_SMS, fold_ls: bool = True) -> None:
    """The fused path for the modern blocks (timm ``Eva`` as FastEva runs it, with the fused ops of the RoPE qkv
    GEMM and the SwiGLU MLP): per block the three attention ops (norm1 + qkv with RoPE
    ``fastvit::layernorm_linear_rope``, ``fastvit::attention``, proj as ``fastvit::linear_residual``), then the
    MLP op (``fastvit::layernorm_mlp`` or ``fastvit::swiglu_mlp``) with the residual in its epilogue; LayerScale
    folded into proj's and fc2's weight and bias (``fold_ls``; fp16 compute: ``F.linear`` + eager
    ``gamma * y`` + add for proj, the MLP op without its residual, then ``gamma * y`` + add). See the module
    docstring for what is taken from which branch's code."""
    D, Dh, H, N, Np, L = s.embed_dim, s.hidden, s.num_heads, s.tokens, s.num_patches, s.depth
    M, CPP, img = B * N, s.in_chans * s.patch_size**2, B * s.in_chans * s.img_size[0] * s.img_size[1]
    npt, hd = s.prefix_tokens, s.head_dim
    att = 4 * B * N * N * D
    lse = B * H * N * F32
    GK = "_matmul_tma_kernel" if gemm_kernel == "tma" else "_matmul_kernel"
    fold = s.layer_scale and fold_ls  # LayerScale folded into proj / fc2 (fastvit_kernels._blocks)
    ls = s.layer_scale and not fold_ls  # LayerScale as an eager scale + add on the branch
    qkv_b = 3 * D * e if s.qkv_bias else 0  # the (3 D,) bias the qkv GEMM reads (k's part zeros in the "qv" form)
    # RoPE arguments the rope GEMMs read: coords (N, 2) fp32 and freqs (1, head_dim / 2, 2) fp32 (timm's cat /
    # dinov3 tables: one for all heads); no (N, head_dim) sin / cos table
    rope_tab = N * 2 * F32 + hd // 2 * 2 * F32 if s.rope else 0
    rope_name = ("rope_out", "rope_a_rows", "rope_a_cols")
    half = "_half" if s.rope_half else ""

    def pair(first: Kernel, second: Kernel, shapes: tuple, cls: str) -> list[Kernel]:
        return [replace(k, op_class=cls) for k in _pair(first, second, gemm_kernel, e, shapes, num_sms)]

    # ---- forward ----
    if s.pos_embed:
        b.cls = "patch_embed"
        b.call("fastvit.patch_embed_fwd",
               _triton(name="_matmul_split_kernel", flops=2 * B * Np * D * CPP,
                       bytes_read=img * e + D * CPP * e + D * e + Np * D * e, bytes_written=B * Np * D * e,
                       note="pixels gathered in the A load; bias + pos_embed epilogue"),
               _triton(name="_prefix_rows_kernel", bytes_read=2 * npt * D * e, bytes_written=B * npt * D * e,
                       note="prefix rows: cls (/ reg) tokens + their pos_embed rows"))
    else:  # FastEva.embed: no absolute position embedding (or a dynamic image size): timm's eager embedding
        _eager_stem_fwd(b, s.with_(rope=None), B, e)
    if s.rope:  # the RoPE module's (coords, freqs), built on the host per forward and copied over
        b.cls = "patch_embed"
        b.ew("aten._to_copy", "H2D copy of the RoPE coords", 0, N * 2 * F32, "host read not counted")
        b.ew("aten._to_copy", "H2D copy of the RoPE freqs", 0, hd // 2 * 2 * F32, "host read not counted")
    for _ in range(L):
        b.cls = "ln_qkv"
        # FastEva's qkv_params: the packed qkv weight / bias, concatenated per forward from timm's parameters
        if not s.qkv_fused:
            b.ew("aten.cat", "cat [q; k; v] weights (FastEva.qkv_params)", 3 * D * D * e, 3 * D * D * e)
            if s.qkv_bias:
                if s.qkv_bias == "qv":
                    b.ew("aten.new_zeros", "fill (k bias zeros)", 0, D * e)
                b.ew("aten.cat", "cat [q; k; v] biases (FastEva.qkv_params)", 3 * D * e, 3 * D * e)
        elif s.qkv_bias == "qv":
            b.ew("aten.cat", "cat [q_bias; k_bias; v_bias] (FastEva.qkv_params)", 3 * D * e, 3 * D * e)
        stats = _triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32,
                        note="norm1 row statistics")
        qkv_read = M * D * e + 2 * M * F32 + 2 * D * e + 3 * D * D * e + qkv_b
        if s.rope:
            b.call("fastvit.layernorm_linear_rope_fwd", stats,
                   _triton(name="_matmul_rope_kernel", flops=2 * M * D * 3 * D, bytes_read=qkv_read + rope_tab,
                           bytes_written=M * 3 * D * e,
                           note=f"a_ln{'+bias' if s.qkv_bias else ''}+{rope_name[0]}{half}: LayerNorm prologue; "
                                "bias, then the rotation of q / k from coords x freqs in the epilogue"))
        else:
            b.call("fastvit.layernorm_linear_fwd", stats,
                   _triton(name=GK, flops=2 * M * D * 3 * D, bytes_read=qkv_read, bytes_written=M * 3 * D * e,
                           note="LayerNorm prologue" + ("; bias epilogue" if s.qkv_bias else "")))
        b.cls = "attention"
        b.call("fastvit.attention_fwd", _triton(name="_attention_fwd_kernel", flops=att, bytes_read=3 * M * D * e,
                                                bytes_written=M * D * e + lse))
        b.cls = "proj"
        if ls:
            b.addmm(M, D, D, e, note="proj as F.linear (LayerScale on the branch)")
            b.layer_scale(M, D, e)
            b.add(M * D, e, "residual")
        else:
            if fold:
                b.fold_layer_scale(D, D, e)
            b.call("fastvit.linear_residual_fwd",
                   _triton(name=GK, flops=2 * M * D * D, bytes_read=M * D * e + D * D * e + D * e + M * D * e,
                           bytes_written=M * D * e, note="bias + residual epilogue"))
        b.cls = "mlp"
        if fold:
            b.fold_layer_scale(D, Dh, e)
        res = 0 if ls else M * D * e  # add_residual=False with LayerScale
        stats2 = _triton(name="_layernorm_stats_kernel", bytes_read=M * D * e, bytes_written=2 * M * F32)
        if s.mlp == "gelu":
            b.call("fastvit.layernorm_mlp_fwd", stats2,
                   _triton(name=GK, flops=2 * M * D * Dh,
                           bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + Dh * D * e + Dh * e,
                           bytes_written=2 * M * Dh * e,
                           note="LayerNorm prologue; bias + GELU epilogue, stores the pre-activation"),
                   _triton(name=GK, flops=2 * M * Dh * D, bytes_read=M * Dh * e + D * Dh * e + D * e + res,
                           bytes_written=M * D * e, note="bias" + ("" if ls else " + residual") + " epilogue"))
        else:
            hnorm = [_triton(name="_layernorm_stats_kernel", bytes_read=M * Dh * e, bytes_written=2 * M * F32,
                             note="MLP hidden-norm row statistics")] if s.mlp_norm else []
            hn_read = 2 * M * F32 + 2 * Dh * e if s.mlp_norm else 0
            b.call("fastvit.swiglu_mlp_fwd", stats2,
                   _triton(name="_matmul_split_kernel", flops=2 * M * D * 2 * Dh,
                           bytes_read=M * D * e + 2 * M * F32 + 2 * D * e + 2 * Dh * D * e + 2 * Dh * e,
                           bytes_written=2 * M * Dh * e + M * Dh * e,
                           note="fc1 over gate and up (two accumulators, each A tile loaded and normalised once); "
                                "stores the (gate | up) pre-activation, writes silu(gate) * up"),
                   *hnorm,
                   _triton(name=GK, flops=2 * M * Dh * D, bytes_read=M * Dh * e + hn_read + D * Dh * e + D * e + res,
                           bytes_written=M * D * e,
                           note=("hidden LayerNorm prologue; " if s.mlp_norm else "") + "bias"
                                + ("" if ls else " + residual") + " epilogue"))
        if ls:
            b.layer_scale(M, D, e)
            b.add(M * D, e, "residual")
    _head_fwd(b, s, B, e, loss=train)
    if not train:
        return
    # ---- backward ----
    _head_bwd(b, s, B, e)
    for _ in range(L):
        b.cls = "mlp"
        if ls:
            b.layer_scale_bwd(M, D, e)
        if s.mlp == "gelu":
            b.call("fastvit.layernorm_mlp_bwd",
                   *pair(_triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + M * Dh * e,
                                 bytes_written=D * Dh * e + D * e,
                                 note="dW2; GELU recomputed; db2 = row sums of its dY^T tiles", fusion=WGRAD_GELU),
                         _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + D * Dh * e + M * Dh * e,
                                 bytes_written=M * Dh * e, note="dH; GELU' epilogue", fusion=DGRAD_GELU),
                         ((D, Dh, M), (M, Dh, D)), "mlp"),
                   *pair(_triton(name=GK, flops=2 * M * D * Dh,
                                 bytes_read=M * Dh * e + M * D * e + 2 * M * F32 + 2 * D * e,
                                 bytes_written=Dh * D * e + Dh * e,
                                 note="dW1; LayerNorm recomputed; db1 = row sums of its dH^T tiles", fusion=WGRAD_LN),
                         _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * Dh * e + Dh * D * e,
                                 bytes_written=M * D * e, note="d LayerNorm(x)", fusion=DGRAD),
                         ((Dh, D, M), (M, D, Dh)), "mlp"),
                   *_ln_bwd_kernels(M, D, e, not ls, "mlp"))
        else:
            if s.mlp_norm:  # ops.swiglu_mlp with the hidden LayerNorm (branch h-mlp's code)
                fc2 = [_triton(name="_swiglu_kernel", bytes_read=2 * M * Dh * e, bytes_written=M * Dh * e,
                               note="hidden = silu(gate) * up recomputed (the hidden norm's input)"),
                       *pair(_triton(name=GK, flops=2 * M * D * Dh,
                                     bytes_read=M * D * e + M * Dh * e + 2 * M * F32 + 2 * Dh * e,
                                     bytes_written=D * Dh * e + D * e,
                                     note="dW2; hidden LayerNorm recomputed; db2 = row sums of its dY^T tiles",
                                     fusion=WGRAD_LN),
                             _triton(name=GK, flops=2 * M * D * Dh, bytes_read=M * D * e + D * Dh * e,
                                     bytes_written=M * Dh * e, note="d LayerNorm(hidden)", fusion=DGRAD),
                             ((D, Dh, M), (M, Dh, D)), "mlp"),
                       *_ln_bwd_kernels(M, Dh, e, False, "mlp"),
                       _triton(name="_swiglu_kernel", bytes_read=M * Dh * e + 2 * M * Dh * e,
                               bytes_written=2 * M * Dh * e, note="d gate, d up from d hidden (backward form)")]
            else:  # the SwiGLU steps on the split kernel: two launches (the pair kernels do not carry them)
                fc2 = [_triton(name="_matmul_split_kernel", flops=2 * M * D * Dh, bytes_read=M * D * e + 2 * M * Dh * e,
                               bytes_written=D * Dh * e + D * e,
                               note="dW2; hidden recomputed on load from the pre-activation (B's SwiGLU prologue); "
                                    "db2 = row sums of its dY^T tiles"),
                       _triton(name="_matmul_split_kernel", flops=2 * M * D * Dh,
                               bytes_read=M * D * e + D * Dh * e + 2 * M * Dh * e, bytes_written=2 * M * Dh * e,
                               note="dH = dY @ W2 with the SwiGLU derivative in the epilogue: d(gate | up)")]
            # the d norm(x) GEMM reads fc1 as one packed (2 D_hidden, D) operand: two separate parameters (timm
            # SwiGLU's fc1_g / fc1_x) are concatenated first
            cat = [Kernel(name="cat [W_gate; W_up] (packed operand)", bytes_read=2 * Dh * D * e,
                          bytes_written=2 * Dh * D * e)] if s.mlp == "swiglu" else []
            b.call("fastvit.swiglu_mlp_bwd", *fc2, *cat,
                   *pair(_triton(name=GK, flops=2 * M * D * 2 * Dh,
                                 bytes_read=2 * M * Dh * e + M * D * e + 2 * M * F32 + 2 * D * e,
                                 bytes_written=2 * Dh * D * e + 2 * Dh * e,
                                 note="dW1 (gate | up); LayerNorm recomputed; db1 = row sums", fusion=WGRAD_LN),
                         _triton(name=GK, flops=2 * M * D * 2 * Dh, bytes_read=2 * M * Dh * e + 2 * Dh * D * e,
                                 bytes_written=M * D * e, note="d LayerNorm(x)", fusion=DGRAD),
                         ((2 * Dh, D, M), (M, D, 2 * Dh)), "mlp"),
                   *_ln_bwd_kernels(M, D, e, not ls, "mlp"))
        if ls:
            b.add(M * D, e, "grad accumulation (residual + MLP branch)")
        if fold:
            b.fold_layer_scale_bwd(D, Dh, e)
        b.cls = "proj"
        if ls:
            b.layer_scale_bwd(M, D, e)
            b.linear_bwd(M, D, D, e)
        else:
            if fold:
                b.fold_layer_scale_bwd(D, D, e)
            b.call("fastvit.linear_residual_bwd",
                   *pair(_triton(name=GK, flops=2 * M * D * D, bytes_read=2 * M * D * e,
                                 bytes_written=D * D * e + D * e,
                                 note="dW; db = row sums of its dY^T tiles (residual grad = dY: no kernel)",
                                 fusion=WGRAD),
                         _triton(name=GK, flops=2 * M * D * D, bytes_read=M * D * e + D * D * e,
                                 bytes_written=M * D * e, note="dx", fusion=DGRAD),
                         ((D, D, M), (M, D, D)), "proj"))
        b.cls = "attention"
        b.call("fastvit.attention_bwd", *_attention_bwd_kernels(B, H, N, D, e))
        b.cls = "ln_qkv"
        db = 3 * D * e if s.qkv_bias else 0
        if s.rope:
            b.call("fastvit.layernorm_linear_rope_bwd",
                   _triton(name="_matmul_rope_kernel", flops=2 * M * D * 3 * D,
                           bytes_read=3 * M * D * e + M * D * e + 2 * M * F32 + 2 * D * e + rope_tab,
                           bytes_written=3 * D * D * e + db,
                           note=f"b_ln{'+a_rowsum' if s.qkv_bias else ''}+{rope_name[1]}{half}: dW "
                                f"{'(+ db row sums) ' if s.qkv_bias else ''}= d(qkv)^T @ LayerNorm(x), the inverse "
                                "rotation of d(qkv) on load; each value's pair partner is loaded too (a second read "
                                "of d(qkv), counted as L2-resident: compulsory bytes once)"),
                   _triton(name="_matmul_rope_kernel", flops=2 * M * D * 3 * D,
                           bytes_read=3 * M * D * e + 3 * D * D * e + rope_tab, bytes_written=M * D * e,
                           note=f"{rope_name[2]}{half}: d LayerNorm(x) = d(qkv) @ W, the inverse rotation on load "
                                "(partner loads as in dW); the pair kernels do not carry RoPE: two launches"),
                   *_ln_bwd_kernels(M, D, e, False, "ln_qkv"))
        else:
            b.call("fastvit.layernorm_linear_bwd",
                   *pair(_triton(name=GK, flops=2 * M * D * 3 * D,
                                 bytes_read=3 * M * D * e + M * D * e + 2 * M * F32 + 2 * D * e,
                                 bytes_written=3 * D * D * e + db, note="dW; LayerNorm recomputed",
                                 fusion=WGRAD_LN if s.qkv_bias else WGRAD_LN_NOBIAS),
                         _triton(name=GK, flops=2 * M * D * 3 * D, bytes_read=3 * M * D * e + 3 * D * D * e,
                                 bytes_written=M * D * e, note="d LayerNorm(x)", fusion=DGRAD),
                         ((3 * D, D, M), (M, D, 3 * D)), "ln_qkv"),
                   *_ln_bwd_kernels(M, D, e, False, "ln_qkv"))
        b.add(M * D, e, "grad accumulation (residual + LayerNorm branch)")
    if s.pos_embed:
        b.cls = "patch_embed"
        b.call("fastvit.patch_embed_bwd",
               _triton(name="_column_sum_kernel", bytes_read=M * D * e, bytes_written=N * D * F32 + N * D * e,
                       note="fp32 sum over the batch (pos / bias / prefix grads), and the pos_embed grad"),
               _triton(name="_column_sum_tail_kernel", bytes_read=N * D * F32, bytes_written=D * e + npt * D * e,
                       note="bias grad (sum of the patch rows) and the prefix-token grads in the weight dtype"),
               _triton(name="_matmul_split_kernel", flops=2 * B * Np * D * CPP, bytes_read=B * Np * D * e + img * e,
                       bytes_written=D * CPP * e, note="dW; patches re-gathered"))
    else:
        _eager_stem_bwd(b, s, B, e)


def step_launches(shape: ViTShape, batch_size: int, dtype="bf16", path: str = "fastvit", mode: str = "train",
                  optimizer: bool = True, weight_decay: float = 0.05, attention_block: bool = True,
                  gemm_kernel: str = "tma", num_sms: int = REFERENCE_SMS) -> list[Launch]:
    """The modelled launches of one training step (``mode="train"``: forward, cross-entropy, backward, AdamW)
    or one inference forward (``mode="forward"``: logits only) of ``batch_size`` images.

    Args:
        shape: the model's sizes (class token, 'token' pooling, a head).
        batch_size: B >= 1.
        dtype: "bf16" | "fp16" | "fp32" (or a torch dtype): the one dtype of parameters and activations.
        path: "fastvit" | "eager" (see the module docstring).
        mode: "train" | "forward".
        optimizer: include the AdamW step (train mode only).
        weight_decay: the decay group's weight decay (0 drops its multiply).
        attention_block: FastViT's attention half as one ``fastvit::attention_block`` op (model.py); False: as
            its three ops (a block with LayerScale / qk_norm / dropout), with the gradient-accumulation add that
            implies.
        gemm_kernel: FastViT's block-GEMM kernel form: "tma" (Hopper: ``_matmul_tma_kernel`` and its pair form)
            or "pointer" (Ampere / Ada, the CPU interpreter: ``_matmul_kernel``, with fc2's backward pair as two
            launches); see :func:`fastvit_kernels.backend.gemm_kernel`. fp32 pairs on "tma" are two launches.
        num_sms: the SMs (persistent programs) the TMA pair kernel's schedule is modelled for (132: H100 SXM /
            H200); it decides whether a pair splits its weight-grad GEMM (one more launch: the reduction).

    Returns:
        launches in execution order.

    Raises:
        ValueError: an unknown path / mode / dtype / gemm_kernel, batch_size < 1, num_sms < 1, or a model outside
            the covered family.
    """
    _check(shape, batch_size, path, mode)
    e = _ELEM[dtype_name(dtype)]
    b = _Builder()
    if path == "fastvit":
        if gemm_kernel not in ("tma", "pointer"):
            raise ValueError(f"gemm_kernel must be 'tma' or 'pointer'; got {gemm_kernel!r}")
        if num_sms < 1:
            raise ValueError(f"num_sms must be >= 1; got {num_sms}")
        _fastvit_plan(b, shape, batch_size, e, mode == "train", attention_block, gemm_kernel, num_sms,
                      fold_ls=dtype_name(dtype) != "fp16")
    else:
        _eager_plan(b, shape, batch_size, e, mode == "train")
    if mode == "train" and optimizer:
        _adamw(b, shape, e, weight_decay)
    return b.launches


@dataclass
class CostSummary:
    """Totals of a plan: ``launches``, ``bytes`` (read + written), ``bytes_read``, ``bytes_written``,
    ``flops`` (executed), ``model_flops`` (for MFU), ``roofline_s`` (None without a peak), ``by_class``
    ({op class: {"launches", "bytes", "flops", "roofline_s"}})."""

    path: str
    mode: str
    batch_size: int
    dtype: str
    launches: int
    bytes_read: int
    bytes_written: int
    flops: int
    model_flops: int
    roofline_s: float | None
    by_class: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def summarize(launches: list[Launch], shape: ViTShape, batch_size: int, dtype="bf16", path: str = "fastvit",
              mode: str = "train", peak: Peak | None = None, launch_overhead_s: float = 0.0) -> CostSummary:
    """Totals and per-op-class totals of ``launches``; the roofline only when ``peak`` has both rates."""
    can_roof = peak is not None and peak.flops_per_s is not None and peak.bytes_per_s is not None
    by_class = {c: dict(launches=0, bytes=0, flops=0, roofline_s=0.0 if can_roof else None)
                for c in (*OP_CLASSES, "other")}
    for ln in launches:
        d = by_class[ln.op_class]
        d["launches"] += 1
        d["bytes"] += ln.bytes
        d["flops"] += ln.flops
        if can_roof:
            d["roofline_s"] += ln.roofline_s(peak, launch_overhead_s)
    return CostSummary(
        path=path, mode=mode, batch_size=batch_size, dtype=dtype_name(dtype), launches=len(launches),
        bytes_read=sum(ln.bytes_read for ln in launches), bytes_written=sum(ln.bytes_written for ln in launches),
        flops=sum(ln.flops for ln in launches),
        model_flops=model_flops(shape, batch_size, "train" if mode == "train" else "forward"),
        roofline_s=sum(d["roofline_s"] for d in by_class.values()) if can_roof else None,
        by_class={c: d for c, d in by_class.items() if d["launches"]},
    )


def step_cost(shape: ViTShape, batch_size: int, dtype="bf16", path: str = "fastvit", mode: str = "train",
              peak: Peak | None = None, optimizer: bool = True, launch_overhead_s: float = 0.0,
              gemm_kernel: str = "tma") -> CostSummary:
    """:func:`step_launches` then :func:`summarize` (same arguments; see there)."""
    launches = step_launches(shape, batch_size, dtype, path, mode, optimizer, gemm_kernel=gemm_kernel)
    return summarize(launches, shape, batch_size, dtype, path, mode, peak, launch_overhead_s)


def dispatch_counts(launches: list[Launch], phases=("forward", "backward")) -> Counter:
    """How many times each op is dispatched in the given phases (one per call, however many launches it has):
    what a ``TorchDispatchMode`` trace of the same step should show."""
    seen = {}
    for ln in launches:
        if ln.phase in phases:
            seen[ln.call] = ln.dispatch
    return Counter(seen.values())


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fmt_time(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.3f} ms"


def comparison_table(fast: CostSummary, eager: CostSummary, peak: Peak | None = None) -> str:
    """A markdown table comparing two summaries (totals, then launches / bytes / roofline per op class), with
    the ratio FastViT / eager, headed "modelled"."""
    head = (f"MODELLED (cost model, no measurement): {fast.mode} step, batch {fast.batch_size}, {fast.dtype}"
            + (f"; roofline peaks: {peak.source}" if peak is not None else ""))
    rows = [head, "", "| quantity | FastViT | eager (SDPA) | FastViT / eager |", "|---|---|---|---|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "n/a"

    rows.append(f"| kernel launches | {fast.launches} | {eager.launches} | {ratio(fast.launches, eager.launches)} |")
    rows.append(f"| device-memory bytes (read + written) | {_fmt_bytes(fast.bytes)} | {_fmt_bytes(eager.bytes)} | "
                f"{ratio(fast.bytes, eager.bytes)} |")
    per_img_f, per_img_e = fast.bytes / fast.batch_size, eager.bytes / eager.batch_size
    rows.append(f"| bytes per image | {_fmt_bytes(per_img_f)} | {_fmt_bytes(per_img_e)} | "
                f"{ratio(per_img_f, per_img_e)} |")
    rows.append(f"| executed matmul FLOPs | {fast.flops / 1e12:.3f} T | {eager.flops / 1e12:.3f} T | "
                f"{ratio(fast.flops, eager.flops)} |")
    rows.append(f"| model FLOPs (for MFU) | {fast.model_flops / 1e12:.3f} T | {eager.model_flops / 1e12:.3f} T | "
                f"{ratio(fast.model_flops, eager.model_flops)} |")
    if fast.roofline_s is not None and eager.roofline_s is not None:
        rows.append(f"| roofline time | {_fmt_time(fast.roofline_s)} | {_fmt_time(eager.roofline_s)} | "
                    f"{ratio(fast.roofline_s, eager.roofline_s)} |")
        if peak is not None and peak.flops_per_s:
            mf = fast.model_flops / fast.roofline_s / peak.flops_per_s
            me = eager.model_flops / eager.roofline_s / peak.flops_per_s
            rows.append(f"| roofline MFU bound | {mf:.1%} | {me:.1%} | |")
    rows += ["", "| op class | launches FastViT / eager | bytes FastViT / eager | roofline FastViT / eager |",
             "|---|---|---|---|"]
    for c in (*OP_CLASSES, "other"):
        f, g = fast.by_class.get(c), eager.by_class.get(c)
        if not f and not g:
            continue
        f = f or dict(launches=0, bytes=0, roofline_s=None)
        g = g or dict(launches=0, bytes=0, roofline_s=None)
        rows.append(f"| {OP_CLASS_LABELS[c]} | {f['launches']} / {g['launches']} | {_fmt_bytes(f['bytes'])} / "
                    f"{_fmt_bytes(g['bytes'])} | {_fmt_time(f['roofline_s'])} / {_fmt_time(g['roofline_s'])} |")
    return "\n".join(rows)


def launch_table(launches: list[Launch]) -> str:
    """One markdown row per launch (phase, op class, dispatched op, kernel, FLOPs, bytes read / written)."""
    rows = ["| # | phase | op class | dispatched op | kernel | GFLOP | MB read | MB written | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, ln in enumerate(launches):
        rows.append(f"| {i} | {ln.phase} | {OP_CLASS_LABELS[ln.op_class]} | {ln.dispatch} | {ln.kernel} | "
                    f"{ln.flops / 1e9:.3f} | {ln.bytes_read / 1e6:.3f} | {ln.bytes_written / 1e6:.3f} | {ln.note} |")
    return "\n".join(rows)
