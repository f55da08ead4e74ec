"""``python -m fastvit_kernels.info``: the report's fields against the imported modules and the settings it reads,
``--check`` passing on this machine (the Triton interpreter on a CPU) with exit status 0, and a failing check
(the checker's ``--inject-error`` self-test) giving a non-zero one."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import numpy
import pytest
import torch
import triton

from fastvit_kernels import info
from fastvit_kernels.bench.devices import device_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_info(*args, interpret: bool | None = None, timeout: float = 600, **env_overrides):
    """Run the command in a fresh process with the FASTVIT_* settings cleared (then ``env_overrides``), and
    TRITON_INTERPRET set (True), removed (False) or inherited (None). Returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVIT_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if interpret is True:
        env["TRITON_INTERPRET"] = "1"
    elif interpret is False:
        env.pop("TRITON_INTERPRET", None)
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-m", "fastvit_kernels.info", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def report_json(**kwargs) -> dict:
    proc = run_info("--json", **kwargs)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["check"] is None
    return out["report"]


def test_report_versions_devices_and_backends():
    rep = report_json(interpret=False)
    assert rep["python"] == platform.python_version()
    assert rep["torch"] == torch.__version__
    assert rep["triton"] == triton.__version__
    assert rep["numpy"] == numpy.__version__
    assert rep["cuda_available"] == torch.cuda.is_available()
    assert len(rep["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert rep["interpreter"] is False
    # CPU tensors run the eager reference unless the interpreter is on; CUDA tensors the kernels
    assert rep["backend"]["cpu"] == "torch"
    assert rep["backend"]["cuda"] == "triton"
    assert rep["gemm"]["impl"] == rep["gemm"]["kernel_setting"] == rep["gemm"]["pairs"] == "auto"
    assert rep["gemm"]["kernel_form"]["cpu"].startswith("none")
    assert set(rep["attention_backward"]["fp16_bf16"]) == {"vit_base_patch16_224", "vit_large_patch16_224",
                                                           "vit_huge_patch14_224"}
    assert rep["attention_backward"]["fp16_bf16"]["vit_base_patch16_224"].startswith("one launch from batch 22")
    assert rep["attention_backward"]["fp16_bf16"]["vit_huge_patch14_224"].startswith("three launches (head_dim 80")


def test_report_follows_the_settings():
    rep = report_json(interpret=True, FASTVIT_GEMM_KERNEL="pointer", FASTVIT_GEMM_IMPL="cublas",
                      FASTVIT_GEMM_PAIRS="off")
    assert rep["interpreter"] is True and rep["backend"]["cpu"] == "triton"
    assert rep["gemm"]["impl"] == "cublas" and rep["gemm"]["pairs"] == "off"
    assert rep["gemm"]["kernel_form"]["cpu"] == "pointer (FASTVIT_GEMM_KERNEL=pointer)"
    assert rep["autotune"]["gemm"].startswith("off (interpreter")
    # a bad setting or a backend that cannot run is reported, not a crash
    rep = report_json(interpret=False, FASTVIT_GEMM_IMPL="bogus", FASTVIT_BACKEND="triton")
    assert rep["gemm"]["impl"].startswith("error: FASTVIT_GEMM_IMPL must be one of")
    assert rep["backend"]["cpu"].startswith("error: FASTVIT_BACKEND='triton' cannot run here")


def test_tuning_record_status():
    status = info.tuning_status()
    if importlib.util.find_spec("fastvit_kernels.tuning") is None:
        assert status == "no tuning record support"
    else:
        assert {"path", "entries", "gpu", "triton", "matching"} <= set(status)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the text names the CPU case")
def test_text_report_says_what_runs_where():
    proc = run_info(interpret=False)
    assert proc.returncode == 0, proc.stderr
    fields = {}  # "CPU tensors run" -> "torch": the label is the text before the first run of 2+ spaces
    for line in proc.stdout.splitlines()[1:]:
        label, _, value = line.strip().partition("  ")
        fields[label] = value.strip()
    assert proc.stdout.startswith("fastvit_kernels ")
    assert fields["gpu"] == "none (torch.cuda.is_available() is False)"
    assert fields["CPU tensors run"] == "torch"
    assert fields["triton"] == triton.__version__
    assert fields["torch"].startswith(torch.__version__)
    assert fields["tuning record"] == info.describe_tuning(info.tuning_status())
    assert fields["tuning record"].startswith("none (FASTVIT_TUNING unset)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check is a different (longer) run")
def test_check_passes_on_the_cpu():
    """Started without TRITON_INTERPRET: the command re-runs itself under the interpreter."""
    proc = run_info("--check", "--json", interpret=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["report"]["interpreter"] is True
    check = out["check"]
    assert check["ok"] is True and check["device"] == "cpu" and check["device_name"] == device_name("cpu")
    rows = check["ops"]
    assert {(r["op"], r["dtype"]) for r in rows} == {(op, dt) for op in info.OP_NAMES
                                                     for dt in ("float32", "float16")}
    assert all(r["ok"] and r["model"] == info.CPU_MODEL and 0 <= r["ratio"] <= 1 for r in rows)
    assert "skipped" in check["cuda_graph"] and "skipped" in check["speed"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")
def test_injected_error_fails_the_check():
    proc = run_info("--check", "--ops", "attention", "linear_residual", "--inject-error", "attention",
                    interpret=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    fails = [line for line in proc.stdout.splitlines() if line.strip().startswith("FAIL")]
    oks = [line for line in proc.stdout.splitlines() if line.strip().startswith("ok ")]
    # exactly the perturbed op's output fails, in both dtypes; the other op passes
    assert len(fails) == 2 and all(line.split()[1] == "attention" for line in fails)
    assert len(oks) == 2 and all(line.split()[1] == "linear_residual" for line in oks)
    assert "output: max error" in proc.stdout
    assert "check FAILED" in proc.stdout


@pytest.mark.parametrize("model", info.GPU_MODELS)
def test_gpu_op_cases_chain_at_full_width(model):
    """The GPU check's inputs at ViT-B/16 and ViT-H/14 widths fit each op's reference (shapes only: meta
    tensors), and the batch covers the attention backward's one-launch plan where the model has it."""
    batch = info.check_batch(model, torch.device("cuda"))
    assert batch == {"vit_base_patch16_224": 22, "vit_huge_patch14_224": 2}[model]
    assert info.check_batch(model, torch.device("cpu")) == 2
    cfg = info.get_config(model)
    D, N = cfg["embed_dim"], (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
    cases = info.op_cases(model, batch, "meta")
    assert [c.op for c in cases] == list(info.OP_NAMES)
    for c in cases:
        assert len(c.names) == len(c.inputs)
        out = c.ref(*c.inputs, **c.kwargs)
        assert out.shape == (batch, N, 3 * D if c.op == "layernorm_linear" else D), c.op
