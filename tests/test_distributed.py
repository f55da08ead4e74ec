"""Distributed training on PyTorch's own engine, on CPU with gloo and 2 processes: after a few steps the
parameters equal a single-process run on the same global batch (DDP and FSDP2); checkpoint save / resume."""

import os
import subprocess
import sys

import pytest
import torch

# SGD, not AdamW: Adam's first step is lr * sign(grad), which turns round-off in near-zero gradients (e.g. the
# key bias, whose true gradient is zero) into lr-sized differences; SGD keeps the comparison well-conditioned.
ARGS = ["--steps", "3", "--batch-size", "16", "--backend", "torch", "--no-progress", "--warmup-steps", "1",
        "--lr", "0.1", "--opt", "sgd"]


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _train(tmp_path, name: str, distributed: str | None, extra=()) -> dict:
    ckpt = str(tmp_path / name)
    prog = ["-m", "fastvit_kernels.train", *ARGS, "--checkpoint-dir", ckpt, *extra]
    if distributed:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *prog,
               "--distributed", distributed]
    else:
        cmd = [sys.executable, *prog]
    out = _run(cmd)
    assert "held-out accuracy" in out
    if distributed == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt, str(tmp_path / f"{name}.pt"))
        return torch.load(tmp_path / f"{name}.pt", weights_only=False)["model"]
    return torch.load(os.path.join(ckpt, "checkpoint.pt"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single", None)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_single_process(mode, single, tmp_path):
    multi = _train(tmp_path, mode, mode)
    assert multi.keys() == single.keys()
    for k in single:
        # the same global batch; only the gradient all-reduce's summation order differs
        torch.testing.assert_close(multi[k].float(), single[k].float(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{mode} {k}: {m}")


def test_resume_continues_from_checkpoint(tmp_path):
    ckpt = str(tmp_path / "a")
    _run([sys.executable, "-m", "fastvit_kernels.train", *ARGS, "--checkpoint-dir", ckpt])
    out = _run([sys.executable, "-m", "fastvit_kernels.train", *ARGS[2:], "--steps", "5", "--resume", ckpt,
                "--checkpoint-dir", str(tmp_path / "b")])
    assert "trained 5 steps" in out
    a = torch.load(os.path.join(ckpt, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(tmp_path / "b", "checkpoint.pt"), weights_only=True)
    assert a["step"] == 3 and b["step"] == 5
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_distributed_needs_torchrun():
    from fastvit_kernels.train import main

    env_rank = os.environ.pop("RANK", None)
    try:
        with pytest.raises(RuntimeError, match="needs torchrun"):
            main(["--distributed", "ddp", "--steps", "1"])
    finally:
        if env_rank is not None:
            os.environ["RANK"] = env_rank
