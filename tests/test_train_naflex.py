"""The ``--naflex`` training loop (``train.train_naflex``) with a stand-in model whose forward takes timm's NaFlex
dict: batches follow the token budget, real tokens are counted, MAE token dropping reaches the model, and the CLI
flags are validated."""

import pytest
import torch

from fastvit_kernels import naflex_data as nd
from fastvit_kernels.train import parse_args, train_naflex


class StandIn(torch.nn.Module):
    """Logits from the mean of each image's valid patches (a Linear K -> classes); records every input dict."""

    def __init__(self, K: int, num_classes: int = 10):
        super().__init__()
        self.fc = torch.nn.Linear(K, num_classes)
        self.seen = []

    def forward(self, x: dict) -> torch.Tensor:
        self.seen.append({k: (tuple(v.shape), v.dtype) for k, v in x.items()} | {
            "valid": x["patch_valid"].sum().item()})
        w = x["patch_valid"][..., None].float()
        return self.fc((x["patches"] * w).sum(1) / w.sum(1).clamp(min=1))


def _args(*extra):
    return parse_args(["--naflex", "--seq-lens", "4,16", "--token-budget", "64", "--steps", "6", "--no-progress",
                       "--warmup-steps", "1", *extra])


def test_train_naflex_loop_counts_real_tokens(capsys):
    tr, te = nd.digits_variable_resolution(min_size=16, max_size=40, seed=0)
    te = nd.VariableSizeImages(te.images[:40], te.labels[:40])
    model = StandIn(K=8 * 8 * 1)
    res = train_naflex(model, _args(), torch.device("cpu"), 8, tr, te)
    out = capsys.readouterr().out
    train_seen = model.seen[:6]
    assert res["steps"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert res["tokens"] == sum(s["valid"] for s in train_seen) and res["tokens_per_s"] > 0
    # budget rule: 64 // 4 = 16 images at length 4, 64 // 16 = 4 at length 16; padded to the length
    for s in train_seen:
        B, N, K = s["patches"][0]
        assert (N, B) in ((4, 16), (16, 4)) and K == 64
        assert s["patch_coord"] == ((B, N, 2), torch.int64) and s["patch_valid"] == ((B, N), torch.bool)
    assert res["images"] == sum(s["patches"][0][0] for s in train_seen)
    assert "tokens/s" in out and "images/s" in out and "held-out accuracy" in out
    # evaluation: the 40 held-out images at the longest length, 4 per batch
    assert [s["patches"][0][:2] for s in model.seen[6:]] == [(4, 16)] * 10


def test_train_naflex_mask_ratio_drops_tokens():
    tr, te = nd.digits_variable_resolution(min_size=16, max_size=40, seed=0)
    te = nd.VariableSizeImages(te.images[:4], te.labels[:4])
    full, masked = StandIn(64), StandIn(64)
    a = train_naflex(full, _args(), torch.device("cpu"), 8, tr, te)
    b = train_naflex(masked, _args("--mask-ratio", "0.75"), torch.device("cpu"), 8, tr, te)
    assert a["images"] == b["images"]  # same batches (same seed)
    assert b["tokens"] < 0.4 * a["tokens"]
    assert all(m["patches"][0][1] < f["patches"][0][1] or f["patches"][0][1] == 4
               for f, m in zip(full.seen[:6], masked.seen[:6]))


def test_naflex_cli_validation():
    args = _args("--mask-ratio", "0.25")
    assert args.naflex and args.seq_lens == [4, 16] and args.token_budget == 64 and args.mask_ratio == 0.25
    for bad in (["--naflex", "--data", "synthetic"], ["--naflex", "--mask-ratio", "1.0"], ["--mask-ratio", "0.5"],
                ["--naflex", "--seq-lens", "0,4"], ["--naflex", "--token-budget", "0"],
                ["--naflex", "--distributed", "ddp"], ["--naflex", "--img-size", "32"], ["--naflex", "--resume", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
