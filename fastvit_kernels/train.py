"""The main job: train a FastViT and report held-out accuracy (``python -m fastvit_kernels.train``).

With no arguments it trains the small ``vit_digits`` model on scikit-learn's bundled handwritten digits (real
data, nothing downloaded) with AdamW and a warmup + cosine schedule, shows per-step loss and images/s, and prints
the held-out accuracy. ``--backend triton`` on a CPU needs ``TRITON_INTERPRET=1`` (slow: the kernels are
interpreted); on a GPU the default already runs the Triton kernels.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backend import resolve_backend
from .configs import MODEL_CONFIGS, get_config
from .data import load_digits_split, synthetic_split
from .model import create_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_digits", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--data", default="digits", choices=["digits", "synthetic"])
    p.add_argument("--img-size", type=int, default=None, help="image side (default: the model's img_size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--drop-path-rate", type=float, default=0.0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="torch.autocast dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="log plain lines instead of a progress bar")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "steps"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive; got {v}")
    return args


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as timm: no weight decay on biases, norms (1-D parameters) and ``no_weight_decay()`` names."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, amp_dtype) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in [0, 1]."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb)
        correct += (logits.argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(y)


def main(argv=None) -> float:
    """Run the job; returns the held-out accuracy."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = get_config(args.model)
    img_size = args.img_size or cfg["img_size"]
    in_chans, num_classes = cfg.get("in_chans", 3), cfg.get("num_classes", 1000)
    if args.data == "digits":
        num_classes = 10
        x_train, y_train, x_test, y_test = load_digits_split(img_size, in_chans, seed=args.seed)
    else:
        x_train, y_train, x_test, y_test = synthetic_split(num_classes, img_size, in_chans, seed=args.seed)
    model = create_model(args.model, img_size=img_size, num_classes=num_classes,
                         drop_path_rate=args.drop_path_rate, backend=args.backend).to(device)
    backend = resolve_backend(device, args.backend)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.steps or args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    warm = min(args.warmup_steps, max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {n_params / 1e6:.2f} M parameters, {img_size}px, backend {backend} on {device}; "
          f"data {args.data}: {len(y_train)} train / {len(y_test)} held-out images; {total} steps")

    g = torch.Generator().manual_seed(args.seed)
    step, t_start, images_seen = 0, time.perf_counter(), 0
    bar = tqdm(total=total, disable=args.no_progress, unit="step", dynamic_ncols=True)
    while step < total:
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(perm), args.batch_size):
            if step >= total:
                break
            idx = perm[i:i + args.batch_size]
            xb, yb = x_train[idx].to(device, non_blocking=True), y_train[idx].to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            images_seen += len(idx)
            ips = len(idx) / dt
            if args.no_progress:
                if step % 25 == 0 or step == total:
                    print(f"step {step}/{total}  loss {loss.item():.4f}  {ips:.0f} images/s")
            else:
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}")
                bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t_start
    acc = evaluate(model, x_test, y_test, 256, device, amp_dtype)
    print(f"trained {total} steps in {elapsed:.1f} s ({images_seen / elapsed:.0f} images/s overall)")
    print(f"held-out accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
