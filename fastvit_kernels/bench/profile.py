"""Training-step profiler: where the time of one ViT training step goes, by op class (patch embed, LN+qkv,
attention, proj, MLP, head, optimizer), with time share, achieved TFLOP/s (exact model FLOPs of the class) or
GB/s (the cost model's bytes of the class, for memory-bound classes such as the optimizer), and MFU.

Method:

1. warm-up steps (compilation, autotuning), then ``iters`` plain steps timed as a whole (CUDA events on a GPU,
   ``time.perf_counter`` on the CPU): the measured step time.
2. one instrumented step, the same computation as the timed ones: a ``TorchDispatchMode`` sees every op PyTorch
   dispatches (aten ops and the ``fastvit::*`` custom ops) and times it (a CUDA event after each op on a GPU; wall
   clock on the CPU). Each op is given an op class: in the forward from the public op it runs under (the ops'
   instrumentation hook, :func:`fastvit_kernels.ops._instrument.observing`: ``patch_embed`` / ``layernorm_linear``
   / ``attention`` / ``linear_residual`` / ``layernorm_mlp`` report themselves), else from the module it runs in
   (``torch.utils.module_tracker``) or, for inline Linears (a block's proj under LayerScale / dropout), its
   shapes; in the backward from the autograd node that runs it (a pre-hook on every node the forward created
   carries the forward op's class). ``attention_block``, one op, reports its three phases (norm1 + qkv,
   attention, proj) in forward and backward as the ops they equal; a phase that runs inside a custom op's
   implementation, where the dispatch mode sees no ops, is timed by a mark at its end and recorded as
   ``"<custom op>/<public op>"`` (e.g. ``"fastvit.attention_block_fwd/attention"``).
3. each class's share of the instrumented step, applied to the measured step time. The instrumentation adds
   CPU work per op, so the shares of classes made of many small ops are over-stated a little.

On a CPU the step runs a small configuration (the numbers are labelled "CPU": they time PyTorch's CPU kernels,
not this package's GPU kernels).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import cost_model
from .devices import Peak
from .flops import OP_CLASS_LABELS, OP_CLASSES, ViTShape, flops_by_class

_GEMM_OPS = {"aten.addmm", "aten.mm", "aten.sum", "aten.linear", "aten.matmul", "aten.bmm"}
_PUBLIC_OPS = {"patch_embed": "patch_embed", "attention": "attention", "layernorm_mlp": "mlp",
               "swiglu_mlp": "mlp", "layernorm_linear": "ln_qkv", "linear_residual": "proj"}


class _Timer:
    """Per-op timestamps: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class _OpClassMode(TorchDispatchMode):
    """Classifies and times every dispatched op (see the module docstring)."""

    def __init__(self, shape: ViTShape, tracker, timer: _Timer):
        super().__init__()
        self.shape = shape
        self.tracker = tracker
        self.timer = timer
        self.phase = "forward"
        self.scope: list[str] = []  # classes of the public ops (and fused-op phases) running now, innermost last
        self.bwd_class: str | None = None  # set by autograd-node pre-hooks
        self.seen_block = False
        self.last_class = "patch_embed"
        self.records: list[tuple[str, str]] = []  # (op name, op class)
        self.dispatching: list[str] = []  # the ops whose implementation runs now (innermost last)

    # ---- classification ----
    def _module_class(self, op: str, args, out) -> str:
        parents = [p for p in self.tracker.parents if p != "Global"]
        if not parents:  # outside the model: the loss
            return "head"
        inner = max(parents, key=lambda p: p.count("."))
        parts = inner.split(".")[1:]  # drop the root module's class name
        if not parts:  # the root module's own code: cat / pos add before the blocks, pooling after
            return "head" if self.seen_block else "patch_embed"
        if parts[0] == "patch_embed":
            return "patch_embed"
        if parts[0] == "blocks":
            self.seen_block = True
            rest = parts[2:]
            if not rest:
                return self._inline_class(op, args, out)
            if rest[0] == "norm1" or rest[:2] == ["attn", "qkv"]:
                return "ln_qkv"
            if rest[:2] in (["attn", "proj"], ["attn", "proj_drop"]) or rest[0] in ("ls1", "drop_path1"):
                return "proj"
            if rest[0] == "attn":
                return "attention"
            return "mlp"  # norm2, mlp.*, ls2, drop_path2
        return "head"  # norm, fc_norm, head_drop, head

    def _inline_class(self, op: str, args, out) -> str:
        """Ops a FastViT block runs itself (the qkv and proj Linears, the attention residual add)."""
        if op in _GEMM_OPS:
            three_d = 3 * self.shape.embed_dim
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
            return "ln_qkv" if any(three_d in t.shape for t in tensors) else "proj"
        return "<prev>"

    def classify(self, op: str, args, out) -> str:
        if self.phase == "optimizer":
            return "optimizer"
        if self.phase == "backward":
            return self.bwd_class or "head"
        if self.scope:
            # a block whose ops all run inside public ops never reaches _module_class: note the block here
            self.seen_block = self.seen_block or any(p.split(".")[1:2] == ["blocks"] for p in self.tracker.parents)
            return self.scope[-1]
        return self._module_class(op, args, out)

    # ---- dispatch ----
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "overloadpacket", func))
        self.dispatching.append(name)
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.dispatching.pop()
        self.timer.mark()
        cls = self.classify(name, args, out)
        if cls == "<prev>":
            cls = self.last_class
        self.last_class = cls
        self.records.append((name, cls))
        return out

    # ---- the ops' instrumentation hook ----
    def observe(self, op: str):
        """The observer of :func:`fastvit_kernels.ops._instrument.observing`: a context manager over public op (or
        fused-op phase) ``op`` that makes what runs inside it count for the op's class (no class of its own:
        ``attention_block``, whose phases report themselves)."""
        cls = _PUBLIC_OPS.get(op)
        return contextlib.nullcontext() if cls is None else self._op_scope(op, cls)

    @contextlib.contextmanager
    def _op_scope(self, op: str, cls: str):
        self.scope.append(cls)
        seen = len(self.records)
        try:
            yield
        finally:
            self.scope.pop()
        if len(self.records) == seen:
            # nothing dispatched was seen: the scope ran inside a custom op's implementation (a fused op's phase,
            # the mode is off there), so its time ends here, as one record of its class
            self.timer.mark()
            self.records.append((f"{self.dispatching[-1] if self.dispatching else 'ops'}/{op}", cls))
            self.last_class = cls
            if self.phase == "backward":  # what runs after it in the same node, as after the op it equals
                self.bwd_class = cls

    def make_prehook(self, cls: str):
        """An autograd-node pre-hook that makes the ops of that node (and of the untagged nodes run after it)
        count for ``cls``."""
        def hook(grad_outputs):
            self.bwd_class = cls
        return hook


class _GradFnTagger(TorchFunctionMode):
    """Above autograd: after each torch function of the forward, tags the autograd nodes it created with the
    class of the ops it dispatched (a pre-hook per node), so the backward inherits the forward's classes."""

    def __init__(self, mode: _OpClassMode):
        super().__init__()
        self.mode = mode
        self.tagged = set()
        self.keep = []  # the tagged nodes, so their ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.mode.phase == "forward" and torch.is_grad_enabled():
            hook = None
            stack = [t.grad_fn for t in torch.utils._pytree.tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            while stack:
                node = stack.pop()
                if node is None or id(node) in self.tagged or type(node).__name__ == "AccumulateGrad":
                    continue
                hook = hook or self.mode.make_prehook(self.mode.last_class)
                node.register_prehook(hook)
                self.tagged.add(id(node))
                self.keep.append(node)
                stack.extend(fn for fn, _ in node.next_functions)
        return out


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


@dataclass
class ProfileRow:
    """One op class: ``seconds`` (apportioned share of the measured step), ``share`` (0..1), ``flops`` (model
    FLOPs), ``bytes`` (modelled device-memory bytes), ``ops`` (dispatched ops seen)."""

    op_class: str
    seconds: float
    share: float
    flops: int
    bytes: int
    ops: int


@dataclass
class ProfileResult:
    """A profiled training step: ``rows`` per op class, ``step_s`` (measured mean step time), ``batch_size``,
    ``model_flops`` (per step), ``peak`` (for MFU), ``label`` (what ran, where; "CPU" on a CPU)."""

    rows: list
    step_s: float
    batch_size: int
    model_flops: int
    peak: Peak
    label: str

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.step_s

    @property
    def mfu(self) -> float | None:
        return None if self.peak.flops_per_s is None else self.model_flops / self.step_s / self.peak.flops_per_s

    def format(self) -> str:
        """A markdown table plus a summary line."""
        lines = [self.label, "",
                 "| op class | time (ms) | share | GFLOP | TFLOP/s | GB (modelled) | GB/s | MFU |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            tf = r.flops / r.seconds / 1e12 if r.flops and r.seconds > 0 else None
            gbs = r.bytes / r.seconds / 1e9 if r.bytes and r.seconds > 0 else None
            m = (None if self.peak.flops_per_s is None or not r.flops or r.seconds <= 0
                 else r.flops / r.seconds / self.peak.flops_per_s)
            lines.append(f"| {OP_CLASS_LABELS[r.op_class]} | {r.seconds * 1e3:.3f} | {r.share:.1%} | "
                         f"{r.flops / 1e9:.2f} | {'-' if tf is None else f'{tf:.3g}'} | {r.bytes / 1e9:.3f} | "
                         f"{'-' if gbs is None else f'{gbs:.1f}'} | {'-' if m is None else _pct(m)} |")
        mfu = "n/a (no peak known for this device; pass --peak-tflops)" if self.mfu is None else _pct(self.mfu)
        lines += ["", f"step {self.step_s * 1e3:.2f} ms (measured), {self.images_per_s:.1f} images/s, "
                      f"{self.model_flops / self.step_s / 1e12:.3g} TFLOP/s (model FLOPs), MFU {mfu}; "
                      f"peak: {self.peak.source}"]
        return "\n".join(lines)


def trace_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, shape: ViTShape | None = None) -> list[tuple[str, str, float]]:
    """Run one instrumented training step (forward, cross-entropy, backward, ``optimizer.step()``) and return
    ``(op, op class, seconds)`` for every op PyTorch dispatched, in order (op named like
    ``str(func.overloadpacket)``, e.g. "aten.addmm", "fastvit.attention_fwd"; times from CUDA events on a GPU,
    the wall clock on the CPU), and for every phase of a fused op that ran inside its custom op's implementation
    (named ``"<custom op>/<public op>"``, e.g. "fastvit.attention_block_bwd/attention"; its custom op's own
    record then holds only what ran after the phases). Gradients are set to None before and after."""
    from torch.utils.module_tracker import ModuleTracker

    from ..ops._instrument import observing

    timer = _Timer(images.device.type == "cuda")
    mode = _OpClassMode(shape or ViTShape.from_model(model), None, timer)
    optimizer.zero_grad(set_to_none=True)
    with _GradFnTagger(mode), mode, observing(mode.observe):
        timer.mark()
        with ModuleTracker() as tracker:
            mode.tracker = tracker
            loss = F.cross_entropy(model(images), labels)
        mode.phase = "backward"
        loss.backward()
        mode.phase = "optimizer"
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [(name, cls, dt) for (name, cls), dt in zip(mode.records, timer.intervals())]


def profile_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer, *, peak: Peak, path: str = "fastvit", warmup: int = 2,
                 iters: int = 5, label: str = "") -> ProfileResult:
    """Profile one training step (forward, cross-entropy, backward, optimizer step) of ``model``.

    Args:
        model: a :class:`fastvit_kernels.reference.VisionTransformer` or FastViT, in train mode, on the device.
        images: (B, C, H, W) on the model's device, in its dtype. labels: (B,) int64 class indices.
        optimizer: stepping ``model``'s parameters.
        peak: peak FLOP/s for MFU (may be unknown).
        path: "fastvit" | "eager": whose cost-model bytes the GB/s column uses.
        warmup, iters: untimed warm-up steps and timed steps (>= 1).
        label: the first line of the formatted table.

    Returns:
        a :class:`ProfileResult`.

    Raises:
        ValueError: iters < 1 or warmup < 0.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")

    cuda = images.device.type == "cuda"
    shape = ViTShape.from_model(model)
    B = images.shape[0]

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    timer = _Timer(cuda)
    timer.mark()
    for _ in range(iters):
        step()
    timer.mark()
    step_s = sum(timer.intervals()) / iters

    records = trace_step(model, images, labels, optimizer, shape)
    per_class = {c: 0.0 for c in (*OP_CLASSES, "other")}
    counts = {c: 0 for c in per_class}
    for name, cls, dt in records:
        per_class[cls if cls in per_class else "other"] += dt
        if "/" not in name:  # a fused op's phase is time, not a dispatched op
            counts[cls if cls in per_class else "other"] += 1
    total = sum(per_class.values()) or 1.0
    flops = flops_by_class(shape, B, "train")
    dtype = next(model.parameters()).dtype
    try:
        by_class = cost_model.step_cost(shape, B, dtype, path, "train").by_class
    except ValueError:  # a model outside the cost model's family: no modelled bytes
        by_class = {}
    rows = [ProfileRow(c, per_class[c] / total * step_s, per_class[c] / total, flops.get(c, 0),
                       by_class.get(c, {}).get("bytes", 0), counts[c])
            for c in (*OP_CLASSES, "other") if counts[c] or per_class[c] or flops.get(c, 0)]
    return ProfileResult(rows, step_s, B, sum(flops.values()), peak, label)
