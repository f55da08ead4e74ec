"""Throughput accounting shared by ``benchmarks/``, the profiler and the training job.

* :mod:`.flops` -- exact model FLOPs per op class and per model (2 per multiply-add, attention matmuls included),
  from the per-op counts that :mod:`fastvit_kernels.ops` defines beside the ops (with the ``FlopCounterMode``
  formulas of the ``fastvit::*`` custom ops).
* :mod:`.devices` -- dense bf16 / fp16 / fp32 peaks and memory bandwidth of common GPUs; MFU.
* :mod:`.cost_model` -- modelled kernel launches, device-memory bytes and FLOPs of a training step, FastViT vs
  eager, with a roofline estimate (runs on any machine).
* :mod:`.memory` -- activation bytes kept for backward, counted from the autograd graph's saved tensors.
* :mod:`.meter` -- :class:`ThroughputMeter` (images/s, TFLOP/s and MFU per step) for training loops.
* :mod:`.profile`, :mod:`.report` -- the ``python -m fastvit_kernels.bench {model,profile,report}`` commands.

Importing this package imports neither triton nor matplotlib, and queries no GPU.
"""

from .devices import DEVICES, Peak, mfu, resolve_peak
from .flops import OP_CLASSES, ViTShape, flops_by_class, flops_per_image, model_flops
from .meter import StepStats, ThroughputMeter

__all__ = ["DEVICES", "OP_CLASSES", "Peak", "StepStats", "ThroughputMeter", "ViTShape", "flops_by_class",
           "flops_per_image", "mfu", "model_flops", "resolve_peak"]
