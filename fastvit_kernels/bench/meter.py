"""Images/s, achieved TFLOP/s and MFU of a training (or inference) loop, step by step, from the exact model
FLOPs of :mod:`fastvit_kernels.bench.flops` and the device peaks of :mod:`fastvit_kernels.bench.devices`.

Usage in a loop::

    meter = ThroughputMeter.for_model(model, kind="train", dtype=torch.bfloat16, device="cuda")
    for images, labels in loader:
        with meter.step(images.shape[0]):
            ...forward, backward, optimizer step...
        print(meter.last.line())
    print(meter.total.line())

On a CUDA device a step is timed with CUDA events (the ``with`` block ends with a synchronisation on the end
event); on the CPU with ``time.perf_counter``. Steps timed elsewhere can be fed with :meth:`ThroughputMeter.update`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .devices import resolve_peak
from .flops import ViTShape, flops_per_image


@dataclass(frozen=True)
class StepStats:
    """Throughput of one step or of several: ``images``, ``seconds`` (wall / CUDA-event time), ``flops`` (model
    FLOPs done), ``peak_flops_per_s`` (None if unknown)."""

    images: int
    seconds: float
    flops: float
    peak_flops_per_s: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tflops(self) -> float:
        """Achieved model TFLOP/s."""
        return self.flops / self.seconds / 1e12 if self.seconds > 0 else float("nan")

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation as a fraction of the peak (None when the peak is unknown)."""
        if self.peak_flops_per_s is None or not self.seconds > 0:
            return None
        return self.flops / self.seconds / self.peak_flops_per_s

    def line(self) -> str:
        """"1234 images/s, 5.67 TFLOP/s, MFU 12.3 %" (MFU "n/a" without a peak)."""
        m = "n/a (no peak known for this device)" if self.mfu is None else f"{self.mfu:.1%}"
        return f"{self.images_per_s:.0f} images/s, {self.tflops:.3g} TFLOP/s, MFU {m}"


class ThroughputMeter:
    """Accumulates step times and image counts; reports images/s, model TFLOP/s and MFU.

    Args:
        flops_per_image: model FLOPs per image of one step (e.g. ``flops_per_image(shape, "train")``), > 0.
        peak_flops_per_s: the device's peak FLOP/s for the dtype in use, or None (MFU then reads None).
        device: where steps run (CUDA: timed with CUDA events); default the current default device.
        warmup_steps: the first steps are timed but left out of :attr:`total` (compilation, autotuning).

    Raises:
        ValueError: flops_per_image <= 0 or warmup_steps < 0.
    """

    def __init__(self, flops_per_image: float, peak_flops_per_s: float | None = None, *, device=None,
                 warmup_steps: int = 0):
        if not flops_per_image > 0:
            raise ValueError(f"flops_per_image must be > 0; got {flops_per_image}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        self.flops_per_image = float(flops_per_image)
        self.peak_flops_per_s = peak_flops_per_s
        self.device = torch.device(device) if device is not None else None
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._images = 0
        self._seconds = 0.0
        self.last: StepStats | None = None
        self._start = None

    @classmethod
    def for_model(cls, model_or_shape, *, kind: str = "train", dtype=torch.bfloat16, device=None,
                  peak_device: str | None = None, peak_tflops: float | None = None,
                  warmup_steps: int = 0) -> "ThroughputMeter":
        """A meter for a ViT (a built model, a :class:`ViTShape`, or a config name).

        Args:
            kind: "train" (forward + backward; 3x forward) or "forward".
            dtype: the compute dtype (bf16 / fp16 / fp32), which picks the peak.
            device: the device the steps run on (timing; its name picks the peak table entry).
            peak_device: a table key or GPU name to take the peak from instead (e.g. "h100-sxm").
            peak_tflops: override the peak (TFLOP/s).
        """
        if isinstance(model_or_shape, ViTShape):
            shape = model_or_shape
        elif isinstance(model_or_shape, (str, dict)):
            shape = ViTShape.from_config(model_or_shape)
        else:
            shape = ViTShape.from_model(model_or_shape)
        peak = resolve_peak(peak_device if peak_device is not None else device, dtype, peak_tflops=peak_tflops)
        return cls(flops_per_image(shape, kind), peak.flops_per_s, device=device, warmup_steps=warmup_steps)

    def _cuda(self) -> bool:
        dev = self.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dev.type == "cuda"

    def start(self) -> None:
        """Mark the start of a step."""
        if self._cuda():
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, batch_size: int) -> StepStats:
        """Mark the end of the step started by :meth:`start` (synchronises on CUDA); returns its stats.

        Raises:
            RuntimeError: no step was started.
        """
        if self._start is None:
            raise RuntimeError("ThroughputMeter.stop() without start()")
        if self._cuda():
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            seconds = self._start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - self._start
        self._start = None
        return self.update(batch_size, seconds)

    @contextlib.contextmanager
    def step(self, batch_size: int):
        """Time the enclosed block as one step of ``batch_size`` images."""
        self.start()
        yield self
        self.stop(batch_size)

    def update(self, batch_size: int, seconds: float) -> StepStats:
        """Record a step of ``batch_size`` images that took ``seconds``; returns its stats.

        Raises:
            ValueError: batch_size < 0 or seconds <= 0.
        """
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0; got {batch_size}")
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0; got {seconds}")
        self.steps += 1
        self.last = StepStats(batch_size, seconds, batch_size * self.flops_per_image, self.peak_flops_per_s)
        if self.steps > self.warmup_steps:
            self._images += batch_size
            self._seconds += seconds
        return self.last

    @property
    def total(self) -> StepStats:
        """All steps after the warm-up ones together (seconds 0 and NaN rates before any)."""
        return StepStats(self._images, self._seconds, self._images * self.flops_per_image, self.peak_flops_per_s)
