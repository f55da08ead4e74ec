"""``python -m fastvit_kernels.bench {model,profile,report}`` on a CPU."""

import json
import re
import subprocess
import sys

import pytest
import torch

from fastvit_kernels.bench import cost_model as cm
from fastvit_kernels.bench.__main__ import main
from fastvit_kernels.bench.devices import resolve_peak
from fastvit_kernels.bench.flops import ViTShape


def test_model_command(capsys):
    assert main(["model", "--model", "vit_base_patch16_224", "--batch-size", "64", "--device", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "MODELLED" in out and "NVIDIA H100 SXM" in out
    s = ViTShape.from_config("vit_base_patch16_224")
    peak = resolve_peak("h100-sxm", "bf16")
    fast, eager = (cm.step_cost(s, 64, "bf16", p, peak=peak) for p in ("fastvit", "eager"))
    assert f"| kernel launches | {fast.launches} | {eager.launches} |" in out
    assert f"{fast.roofline_s * 1e3:.3f} ms" in out
    for label in ("patch embed", "LN+qkv", "attention", "proj", "MLP", "head", "optimizer"):
        assert f"| {label} |" in out


def test_model_command_gives_a_headless_model_a_head(capsys):
    """vit_huge_patch14_224 has no head (timm's default tag); the modelled training step is a classification step
    with configs.training_config's 1000-class head, not an error."""
    assert main(["model", "--model", "vit_huge_patch14_224", "--batch-size", "8", "--device", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    s = ViTShape.from_config("vit_huge_patch14_224", num_classes=1000)
    fast = cm.step_cost(s, 8, "bf16", "fastvit", peak=resolve_peak("h100-sxm", "bf16"))
    assert f"{fast.roofline_s * 1e3:.3f} ms" in out and "| head |" in out


def test_model_command_launch_list_and_errors(capsys):
    assert main(["model", "--model", "vit_digits", "--batch-size", "4", "--mode", "forward", "--dtype", "fp32",
                 "--launches", "fastvit", "--peak-tflops", "10", "--bandwidth-gbs", "100"]) == 0
    out = capsys.readouterr().out
    n = len(cm.step_launches(ViTShape.from_config("vit_digits"), 4, "fp32", "fastvit", "forward"))
    assert len(re.findall(r"^\| \d+ \| forward \|", out, flags=re.M)) == n
    assert "10 TFLOP/s (flag)" in out
    with pytest.raises(SystemExit):
        main(["model", "--batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["model", "--model", "vit_gigantic"])


def test_profile_command_cpu(capsys):
    assert main(["profile", "--model", "vit_base_patch16_224", "--batch-size", "256", "--cpu-batch-size", "2",
                 "--warmup", "0", "--iters", "1", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: fastvit vit_micro_patch4_32, batch 2, fp32")
    assert "instead of vit_base_patch16_224 batch 256" in out
    shares = {}
    for label in ("patch embed", "LN+qkv", "attention", "proj", "MLP", "head", "optimizer"):
        m = re.search(rf"^\| {re.escape(label)} \| ([\d.]+) \| ([\d.]+)% \|", out, flags=re.M)
        assert m, f"no row for {label}"
        shares[label] = float(m.group(2))
    assert sum(shares.values()) == pytest.approx(100.0, abs=0.5)  # "other" is absent: every op was classed
    assert "| other |" not in out
    assert re.search(r"images/s, .* TFLOP/s \(model FLOPs\), MFU n/a", out)


def test_profile_command_peak_flag_gives_mfu(capsys):
    assert main(["profile", "--impl", "eager", "--cpu-model", "vit_digits", "--cpu-batch-size", "4", "--warmup",
                 "0", "--iters", "1", "--device", "cpu", "--peak-tflops", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "CPU: eager vit_digits, batch 4" in out
    m = re.search(r"([\d.eE+-]+) TFLOP/s \(model FLOPs\), MFU ([\d.eE+-]+)%", out)  # may be 6.9e-05
    assert m and float(m.group(2)) == pytest.approx(float(m.group(1)) * 100, rel=0.02)  # peak 1 TFLOP/s


def _fake_results(path):
    def bench(group, impl, mean, **info):
        return {"group": group, "name": f"test_x[{impl}]", "fullname": f"b.py::test_x[{impl}]", "param": impl,
                "params": {"impl": impl}, "extra_info": {"impl": impl, **info},
                "stats": {"min": mean, "max": mean, "mean": mean, "stddev": 0.001, "rounds": 5, "median": mean}}

    data = {"benchmarks": [
        bench("ViT-B/16 train step, batch 64, bf16", "fastvit", 0.100, images_per_s=640.0, tflops=400.0, mfu=0.404,
              device="NVIDIA H100 80GB HBM3"),
        bench("ViT-B/16 train step, batch 64, bf16", "eager_sdpa", 0.200, images_per_s=320.0, tflops=200.0,
              mfu=0.202, device="NVIDIA H100 80GB HBM3"),
        bench("CPU smoke: attention", "fastvit", 0.004, tokens_per_s=1e6),
        bench("CPU smoke: attention", "eager", 0.003, tokens_per_s=1.3e6),
    ]}
    path.write_text(json.dumps(data))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gemm_impl_command_needs_a_gpu(capsys):
    """Without CUDA the GEMM-path measurement measures nothing and says so (exit 2), rather than timing the CPU."""
    assert main(["gemm-impl", "--model", "vit_digits", "--batch-size", "2"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tmp_path / "results.json"
    _fake_results(src)
    assert main(["report", str(src)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "results.md").read_text()
    assert md in out
    assert "### ViT-B/16 train step, batch 64, bf16 (NVIDIA H100 80GB HBM3)" in md
    assert "| fastvit | 100.000 ± 1.000 | 640.0 images/s | 400 | 40.4% | - |" in md
    assert "| eager_sdpa | 200.000 ± 1.000 | 320.0 images/s | 200 | 20.2% | 2.00x |" in md
    assert "| eager | 3.000 ± 1.000 | 1,300,000.0 tokens/s | - | - | 0.75x |" in md
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_report_rejects_other_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="not pytest-benchmark --benchmark-json output"):
        main(["report", str(bad), "--no-chart"])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastvit_kernels.bench", "--help"], check=True, capture_output=True,
                         text=True).stdout
    assert all(c in out for c in ("model", "profile", "report"))
