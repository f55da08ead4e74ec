"""The main job and convergence: FastViT on the Triton path trains on real digits like the reference path."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import create_model
from fastvit_kernels.data import load_digits_split, synthetic_split
from fastvit_kernels.train import main


def _loss_curve(backend: str, steps: int, device: str) -> list[float]:
    torch.manual_seed(0)
    x, y, _, _ = load_digits_split()
    model = create_model("vit_digits", depth=1, global_pool="avg", backend=backend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_triton_path_follows_reference_loss_curve(device):
    steps = 30
    ref = _loss_curve("torch", steps, "cpu")
    fast = _loss_curve("triton", steps, device)
    # the model learns: the last five steps average clearly below the first five (chance: ln 10 = 2.30)
    assert sum(ref[-5:]) / 5 < sum(ref[:5]) / 5 - 0.15
    # and the two paths agree step by step (fp32: only summation order differs)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), f"step {i}: triton {a:.6f} vs reference {b:.6f}"


def test_main_job_short_run(capsys):
    acc = main(["--epochs", "1", "--no-progress", "--backend", "torch", "--batch-size", "128"])
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "images/s" in out and "backend torch" in out
    assert 0.0 <= acc <= 1.0


@pytest.mark.slow
def test_main_job_default_reaches_90_percent(capsys):
    acc = main(["--no-progress", "--backend", "torch"])
    assert acc >= 0.90, capsys.readouterr().out


def test_synthetic_data_and_options(capsys):
    acc = main(["--data", "synthetic", "--model", "vit_micro_patch4_32", "--img-size", "16", "--steps", "3",
                "--no-progress", "--backend", "torch", "--amp", "bf16", "--batch-size", "8"])
    assert 0.0 <= acc <= 1.0
    x, y, xt, yt = synthetic_split(10, 16, 3, n_train=8, n_test=4)
    assert x.shape == (8, 3, 16, 16) and y.max() < 10 and xt.shape == (4, 3, 16, 16)


def test_bad_cli_values():
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])
