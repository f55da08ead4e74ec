"""Peak dense matmul throughput and memory bandwidth of the GPUs the benchmarks report against, and MFU.

Figures are NVIDIA's datasheet numbers for dense tensor-core math (no 2:4 sparsity), fp32 accumulation:

=============  ==================  ==============  =====================================================
device         bf16 / fp16 TFLOP/s  fp32 TFLOP/s    memory bandwidth
=============  ==================  ==============  =====================================================
A100           312                 19.5            2039 GB/s (SXM4 80 GB HBM2e)
H100 SXM       989.4               67              3350 GB/s (HBM3)
H100 PCIe      756.5               51              2000 GB/s (HBM2e)
H200           989.4               67              4800 GB/s (SXM, HBM3e)
L40S           362                 91.6            864 GB/s (GDDR6)
RTX 4090       165.2               82.6            1008 GB/s (GDDR6X; fp16/bf16 with fp32 accumulate)
=============  ==================  ==============  =====================================================

fp32 is the non-tensor-core (FMA) peak: this package's fp32 GEMMs use IEEE fp32 dots, not TF32. Any figure can
be overridden (``resolve_peak(peak_tflops=..., bandwidth_gbs=...)``, the CLI's ``--peak-tflops`` /
``--bandwidth-gbs``), e.g. for a clock-limited part or a GPU not in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU's dense peaks. ``tflops``: {"bf16" | "fp16" | "fp32": TFLOP/s}; ``bandwidth_gbs``: device-memory
    bandwidth in GB/s (10^9 bytes); ``match``: lower-case substrings of ``torch.cuda.get_device_name()``;
    ``arch``: compute capability as major * 10 + minor (80 Ampere, 89 Ada, 90 Hopper)."""

    key: str
    name: str
    tflops: dict
    bandwidth_gbs: float
    match: tuple = ()
    arch: int = 90


DEVICES: dict[str, DeviceSpec] = {d.key: d for d in (
    DeviceSpec("a100", "NVIDIA A100 (SXM4 80 GB)", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0,
               ("a100",), 80),
    DeviceSpec("h100-pcie", "NVIDIA H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}, 2000.0,
               ("h100 pcie",)),
    DeviceSpec("h100-sxm", "NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}, 3350.0,
               ("h100 80gb hbm3", "h100 sxm", "h100")),
    DeviceSpec("h200", "NVIDIA H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}, 4800.0, ("h200",)),
    DeviceSpec("l40s", "NVIDIA L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}, 864.0, ("l40s",), 89),
    DeviceSpec("rtx4090", "NVIDIA GeForce RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}, 1008.0,
               ("rtx 4090",), 89),
)}
# parts that contain a table entry's substring but are different products (not matched: give a peak by flag)
_NOT_MATCHED = ("h100 nvl",)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """"bf16" | "fp16" | "fp32" for a torch dtype or one of those names (also "bfloat16", "float16", "float32").

    Raises:
        ValueError: any other dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be bfloat16, float16 or float32; got {dtype}")
        return _DTYPE_NAMES[dtype]
    names = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
             "fp32": "fp32", "float32": "fp32", "float": "fp32"}
    if str(dtype).lower() not in names:
        raise ValueError(f"dtype must be one of {sorted(set(names))}; got {dtype!r}")
    return names[str(dtype).lower()]


def lookup_device(name: str | None) -> DeviceSpec | None:
    """The table entry for a key ("h100-sxm") or a ``torch.cuda.get_device_name()`` string ("NVIDIA H100 80GB
    HBM3"); None when unknown (or None given)."""
    if not name:
        return None
    low = name.lower()
    if low in DEVICES:
        return DEVICES[low]
    if any(s in low for s in _NOT_MATCHED):
        return None
    for spec in DEVICES.values():  # table order puts "h100 pcie" before the generic "h100"
        if any(s in low for s in spec.match):
            return spec
    return None


def device_name(device: torch.device | str | None = None) -> str:
    """A readable name of ``device``: the CUDA device name, or "cpu"."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass(frozen=True)
class Peak:
    """Peak rates used for MFU and rooflines: ``flops_per_s`` (FLOP/s) and ``bytes_per_s`` (B/s), each None when
    unknown; ``source`` says where they came from (table entry, flag, or "unknown")."""

    flops_per_s: float | None
    bytes_per_s: float | None
    source: str


def resolve_peak(device: str | torch.device | None = None, dtype: torch.dtype | str = torch.bfloat16,
                 peak_tflops: float | None = None, bandwidth_gbs: float | None = None) -> Peak:
    """Peak FLOP/s for ``dtype`` and bandwidth of ``device`` (a table key, a CUDA device name, a torch device,
    or None for the current default device), with explicit overrides winning.

    Raises:
        ValueError: an override that is not positive; an unsupported dtype.
    """
    for flag, v in (("peak_tflops", peak_tflops), ("bandwidth_gbs", bandwidth_gbs)):
        if v is not None and not v > 0:
            raise ValueError(f"{flag} must be > 0; got {v}")
    dt = dtype_name(dtype)
    if isinstance(device, torch.device) or device is None or str(device).split(":")[0] in ("cuda", "cpu"):
        name = device_name(device)
    else:
        name = str(device)
    spec = lookup_device(name)
    flops = peak_tflops * 1e12 if peak_tflops is not None else (spec.tflops[dt] * 1e12 if spec else None)
    bw = bandwidth_gbs * 1e9 if bandwidth_gbs is not None else (spec.bandwidth_gbs * 1e9 if spec else None)
    parts = []
    parts.append(f"{peak_tflops:g} TFLOP/s (flag)" if peak_tflops is not None else
                 (f"{spec.name} {dt} {spec.tflops[dt]:g} TFLOP/s" if spec else f"no {dt} peak for {name!r}"))
    parts.append(f"{bandwidth_gbs:g} GB/s (flag)" if bandwidth_gbs is not None else
                 (f"{spec.bandwidth_gbs:g} GB/s" if spec else "no bandwidth"))
    return Peak(flops, bw, ", ".join(parts))


def mfu(flops: float, seconds: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / peak`` (a fraction, 0.5 = 50 %); None when the peak is
    unknown.

    Raises:
        ValueError: seconds <= 0.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0; got {seconds}")
    if peak_flops_per_s is None:
        return None
    return flops / seconds / peak_flops_per_s
