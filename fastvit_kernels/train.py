"""The main job: train a FastViT and report held-out accuracy (``python -m fastvit_kernels.train``).

With no arguments it trains the small ``vit_digits`` model on scikit-learn's bundled handwritten digits (real
data, nothing downloaded) with AdamW and a warmup + cosine schedule, shows per-step loss and images/s, and prints
the held-out accuracy. ``--backend triton`` on a CPU needs ``TRITON_INTERPRET=1`` (slow: the kernels are
interpreted); on a GPU the default already runs the Triton kernels.

Distributed, on PyTorch's own engine: ``torchrun --nproc_per_node N -m fastvit_kernels.train --distributed ddp``
(DistributedDataParallel) or ``--distributed fsdp`` (FSDP2: ``fully_shard`` per block then the root; with
``--amp bf16`` a bf16 ``MixedPrecisionPolicy`` with fp32 gradient reduction). ``--batch-size`` is the global
batch, split evenly over the ranks; NCCL on GPUs, gloo on CPUs.

Native resolution (``--naflex``): images keep their aspect ratio and are cut into patch sequences
(:mod:`fastvit_kernels.naflex_data`), each batch at a maximum length drawn from ``--seq-lens`` with
``--token-budget // length`` images; the model's forward takes timm's NaFlex dict (``patches``, ``patch_coord``,
``patch_valid``) and returns logits. ``--mask-ratio r`` drops a random fraction r of each image's patches before
the model (MAE-style). The log reports images/s and tokens/s (real tokens).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from .backend import resolve_backend
from .bench.meter import ThroughputMeter
from .configs import MODEL_CONFIGS, NAFLEX_DIGITS, NAFLEX_MODELS, training_config
from .data import ImageFolder, load_digits_split, synthetic_split
from .model import create_model
from .naflex_data import (DEFAULT_SEQ_LENS, DEFAULT_TOKEN_BUDGET, NaFlexDataset, NativeImageFolder,
                          TokenBudgetBatchSampler, digits_variable_resolution, drop_tokens, real_tokens)


def _int_list(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {v!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints; got {v!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_digits", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--data", nargs="+", default=["digits"], metavar="KIND [PATH]",
                   help="'digits', 'synthetic', or 'imagefolder PATH' (class-per-folder images; PATH/train and "
                        "PATH/val when present, else a 10%% held-out split)")
    p.add_argument("--img-size", type=int, default=None, help="image side (default: the model's img_size)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over distributed ranks)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--opt", default="adamw", choices=["adamw", "sgd"], help="optimizer (sgd: momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--drop-path-rate", type=float, default=0.0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision dtype")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--distributed", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--workers", type=int, default=None, help="data-loader worker processes (imagefolder: 4)")
    p.add_argument("--checkpoint-dir", default=None, help="save model + optimizer here at the end of the run")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="log plain lines instead of a progress bar")
    p.add_argument("--naflex", action="store_true",
                   help="native-resolution training: patch sequences in timm's NaFlex dict, batched by a token budget "
                        "(the model's forward takes the dict)")
    p.add_argument("--seq-lens", type=_int_list, default=None,
                   help="--naflex: the maximum sequence lengths a batch draws from (comma-separated; default "
                        f"{','.join(map(str, DEFAULT_SEQ_LENS))}, on the digits "
                        f"{','.join(map(str, NAFLEX_DIGITS['seq_lens']))})")
    p.add_argument("--token-budget", type=int, default=None,
                   help="--naflex: padded tokens per batch (batch size = budget // sequence length; default "
                        f"{DEFAULT_TOKEN_BUDGET}, on the digits {NAFLEX_DIGITS['token_budget']})")
    p.add_argument("--mask-ratio", type=float, default=0.0,
                   help="--naflex: MAE-style fraction of each image's patches dropped before the model")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "steps"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive; got {v}")
    kind = args.data[0]
    if kind not in ("digits", "synthetic", "imagefolder"):
        p.error(f"--data must be digits, synthetic or 'imagefolder PATH'; got {kind!r}")
    if (kind == "imagefolder") != (len(args.data) == 2) or len(args.data) > 2:
        p.error(f"--data {' '.join(args.data)}: only imagefolder takes (exactly) one PATH")
    if args.naflex:
        if args.model == p.get_default("model"):  # the digits ViT takes images; its NaFlex counterpart
            args.model = NAFLEX_DIGITS["model"]
        if args.model not in NAFLEX_MODELS:
            p.error(f"--naflex needs a NaFlex model ({', '.join(sorted(NAFLEX_MODELS))}); got --model {args.model}")
        digits = args.model == NAFLEX_DIGITS["model"]
        if args.seq_lens is None:
            args.seq_lens = list(NAFLEX_DIGITS["seq_lens"] if digits else DEFAULT_SEQ_LENS)
        if args.token_budget is None:
            args.token_budget = NAFLEX_DIGITS["token_budget"] if digits else DEFAULT_TOKEN_BUDGET
        if kind == "synthetic":
            p.error("--naflex needs variable-size images: --data digits or 'imagefolder PATH'; got synthetic")
        if args.distributed != "none":
            p.error(f"--naflex does not support --distributed {args.distributed} yet")
        for flag, given in (("--resume", args.resume), ("--img-size", args.img_size)):
            if given is not None:
                p.error(f"{flag} does not apply with --naflex (sizes come from --seq-lens; no resume yet)")
        if args.token_budget < 1:
            p.error(f"--token-budget must be positive; got {args.token_budget}")
        if not 0.0 <= args.mask_ratio < 1.0:
            p.error(f"--mask-ratio must be in [0, 1); got {args.mask_ratio}")
    elif args.mask_ratio:
        p.error("--mask-ratio drops NaFlex patches: it needs --naflex")
    return args


def train_step(model: torch.nn.Module, inputs, labels: torch.Tensor, opt, scaler, sched, device: torch.device,
               amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimisation step: cross-entropy of ``model(inputs)`` (logits (B, classes)) against ``labels`` (B,) int64
    under autocast to ``amp_dtype`` (None: off), backward through the GradScaler, optimizer and scheduler steps; on
    CUDA it waits for the device, so a caller's wall-clock time covers the step. Returns the loss (a 0-d tensor)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(inputs), labels)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups as timm's ``param_groups_weight_decay``: weight decay on the matrices only.

    Args:
        model: a module with ``no_weight_decay()`` (FastViT / the reference VisionTransformer: pos_embed,
            cls_token, reg_token).
        weight_decay: the decay of the first group (AdamW's decoupled decay coefficient).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``; ``rest``
        holds biases and norm weights (parameters with ndim <= 1) and the ``no_weight_decay()`` names. Parameters
        with ``requires_grad=False`` are left out.
    """
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_datasets(args, cfg: dict, img_size: int):
    """(train dataset, held-out dataset, num_classes, in_chans) for ``--data``."""
    kind = args.data[0]
    in_chans, num_classes = cfg.get("in_chans", 3), cfg.get("num_classes", 1000)
    if kind == "digits":
        xtr, ytr, xte, yte = load_digits_split(img_size, in_chans, seed=args.seed)
        return TensorDataset(xtr, ytr), TensorDataset(xte, yte), 10, in_chans
    if kind == "synthetic":
        xtr, ytr, xte, yte = synthetic_split(num_classes, img_size, in_chans, seed=args.seed)
        return TensorDataset(xtr, ytr), TensorDataset(xte, yte), num_classes, in_chans
    root = args.data[1]
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train = ImageFolder(os.path.join(root, "train"), img_size, train=True, seed=args.seed)
        held = ImageFolder(os.path.join(root, "val"), img_size, train=False)
    else:
        full_train = ImageFolder(root, img_size, train=True, seed=args.seed)
        full_eval = ImageFolder(root, img_size, train=False)
        perm = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_held = max(1, len(perm) // 10)
        train = torch.utils.data.Subset(full_train, perm[n_held:])
        held = torch.utils.data.Subset(full_eval, perm[:n_held])
        train.classes = full_train.classes
    classes = train.classes if hasattr(train, "classes") else train.dataset.classes
    return train, held, len(classes), 3


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, in [0, 1]."""
    model.eval()
    correct = total = 0
    for xb, yb in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb.to(device))
        correct += (logits.argmax(-1).cpu() == yb).sum().item()
        total += len(yb)
    model.train()
    return correct / max(total, 1)


def _setup_distributed(args):
    """(rank, world_size, device) — initialises the process group under torchrun when --distributed is set."""
    if args.distributed == "none":
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        return 0, 1, torch.device(dev)
    if "RANK" not in os.environ:
        raise RuntimeError(f"--distributed {args.distributed} needs torchrun (RANK / WORLD_SIZE are not set)")
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def _wrap_distributed(model, args, device):
    if args.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.amp == "bf16" \
            else MixedPrecisionPolicy()
        for blk in model.blocks:
            fully_shard(blk, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def save_checkpoint(path: str, model, opt, step: int, args) -> None:
    """Model + optimizer + step: ``torch.distributed.checkpoint`` (sharded) under FSDP, one torch.save file
    (rank 0) otherwise."""
    os.makedirs(path, exist_ok=True)
    if args.distributed == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd, "step": step}, checkpoint_id=path)
    elif not dist.is_initialized() or dist.get_rank() == 0:
        inner = model.module if hasattr(model, "module") else model
        torch.save({"model": inner.state_dict(), "optim": opt.state_dict(), "step": step},
                   os.path.join(path, "checkpoint.pt"))


def load_checkpoint(path: str, model, opt, args) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    if args.distributed == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": 0}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return int(state["step"])
    ckpt = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=True)
    (model.module if hasattr(model, "module") else model).load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    return int(ckpt["step"])


def main(argv=None) -> float:
    """Run the job; returns the held-out accuracy."""
    args = parse_args(argv)
    rank, world, device = _setup_distributed(args)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    torch.manual_seed(args.seed)
    cfg = training_config(args.model)  # synthetic data draws its classes from here: a head even where the name has none
    if args.naflex:
        in_chans = cfg.get("in_chans", 3) if args.data[0] == "digits" else 3
        train_src, held_src, num_classes = naflex_sources(args, in_chans)
        model = create_model(args.model, in_chans=in_chans, num_classes=num_classes,
                             drop_path_rate=args.drop_path_rate, backend=args.backend).to(device)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return train_naflex(model, args, device, cfg["patch_size"], train_src, held_src)["accuracy"]
    img_size = args.img_size or cfg["img_size"]
    train_set, held_set, num_classes, in_chans = build_datasets(args, cfg, img_size)
    model = create_model(args.model, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                         drop_path_rate=args.drop_path_rate, backend=args.backend).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    backend = resolve_backend(device, args.backend)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    fsdp_bf16 = args.distributed == "fsdp" and amp_dtype == torch.bfloat16  # the MixedPrecisionPolicy casts
    model = _wrap_distributed(model, args, device)
    workers = args.workers if args.workers is not None else (4 if args.data[0] == "imagefolder" else 0)
    # one sampler type for every mode: rank r takes perm[r::world], so the union of the ranks' batches at each
    # step is the single-process batch for the same seed
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=False)
    if isinstance(train_set, TensorDataset):  # in-memory tensors: one gather per batch, no per-sample collate
        loader = DataLoader(train_set, batch_size=None, sampler=BatchSampler(sampler, args.batch_size // world,
                                                                             drop_last=False))
    else:
        loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=False)
    held_loader = DataLoader(held_set, batch_size=256, num_workers=workers)
    steps_per_epoch = len(loader)
    total = args.steps or args.epochs * steps_per_epoch
    raw_model = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 shards in place
    groups = param_groups(raw_model, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999)) if args.opt == "adamw" else \
        torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    warm = min(args.warmup_steps, max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # images/s, TFLOP/s and MFU per device from the exact model FLOPs (fastvit_kernels.bench); step 1 excluded
    meter = ThroughputMeter.for_model(raw_model, kind="train", device=device, warmup_steps=1 if total > 1 else 0,
                                      dtype=amp_dtype or next(raw_model.parameters()).dtype)
    step = 0
    if args.resume:
        step = load_checkpoint(args.resume, model, opt, args)
        for _ in range(step):
            sched.step()
    log = rank == 0
    if log:
        n_params = sum(p.numel() for p in model.parameters()) * (world if args.distributed == "fsdp" else 1)
        print(f"model {args.model}: ~{n_params / 1e6:.2f} M parameters, {img_size}px, backend {backend} on {device}"
              f"{f', {args.distributed} x {world}' if world > 1 else ''}; data {args.data[0]}: {len(train_set)} "
              f"train / {len(held_set)} held-out images; {total} steps")

    t_start, images_seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, disable=args.no_progress or not log, unit="step", dynamic_ncols=True)
    epoch = step // max(steps_per_epoch, 1)
    while step < total:
        sampler.set_epoch(epoch)
        if hasattr(train_set, "epoch"):
            train_set.epoch = epoch
        for i, (xb, yb) in enumerate(loader):
            if step >= total:
                break
            if epoch * steps_per_epoch + i < step:  # resumed mid-epoch: skip the batches already seen
                continue
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            t0 = time.perf_counter()
            loss = train_step(model, xb, yb, opt, scaler, sched, device,
                              amp_dtype if amp_dtype is not None and not fsdp_bf16 else None)
            dt = time.perf_counter() - t0
            step += 1
            images_seen += len(xb) * world
            ips = len(xb) * world / dt
            mfu = meter.update(len(xb), dt).mfu
            if not log:
                continue
            if args.no_progress:
                if step % 25 == 0 or step == total:
                    print(f"step {step}/{total}  loss {loss.item():.4f}  {ips:.0f} images/s"
                          + (f"  MFU {mfu:.1%}" if mfu is not None else ""))
            else:
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}")
                bar.update(1)
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - t_start
    if args.checkpoint_dir:
        save_checkpoint(args.checkpoint_dir, model, opt, step, args)
    acc = evaluate(model, held_loader, device, None if fsdp_bf16 else amp_dtype)
    if log:
        print(f"trained {step} steps in {elapsed:.1f} s ({images_seen / max(elapsed, 1e-9):.0f} images/s overall)")
        print(f"throughput per device, steps after the first: {meter.total.line()}")
        print(f"held-out accuracy: {acc:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return acc


def naflex_sources(args, in_chans: int):
    """(train source, held-out source, num_classes) of variable-size images for ``--naflex``: the digits at random
    sizes and aspect ratios (:func:`~fastvit_kernels.naflex_data.digits_variable_resolution`), or an image folder at
    native sizes (PATH/train and PATH/val when present, else a seeded 10 % held-out split)."""
    if args.data[0] == "digits":
        tr, te = digits_variable_resolution(in_chans, seed=args.seed)
        return tr, te, 10
    root = args.data[1]
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        tr = NativeImageFolder(os.path.join(root, "train"), train=True, seed=args.seed)
        return tr, NativeImageFolder(os.path.join(root, "val"), train=False), len(tr.classes)
    full_tr, full_ev = NativeImageFolder(root, train=True, seed=args.seed), NativeImageFolder(root, train=False)
    perm = torch.randperm(len(full_tr), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_held = max(1, len(perm) // 10)
    return (torch.utils.data.Subset(full_tr, perm[n_held:]), torch.utils.data.Subset(full_ev, perm[:n_held]),
            len(full_tr.classes))


def _naflex_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in ("patches", "patch_coord", "patch_valid")}


def train_naflex(model: torch.nn.Module, args, device, patch_size: int, train_src, held_src) -> dict:
    """The ``--naflex`` training loop: AdamW (or SGD) with warmup + cosine, cross-entropy on
    ``model({'patches' (B, N, K), 'patch_coord' (B, N, 2) int64, 'patch_valid' (B, N) bool}) -> logits (B, classes)``.

    Each step takes a :class:`~fastvit_kernels.naflex_data.TokenBudgetBatchSampler` batch (``args.seq_lens``,
    ``args.token_budget``, seeded by ``args.seed``), patchified with ``patch_size`` at the batch's length and padded
    to it (timm's collator), then, with ``args.mask_ratio`` > 0, MAE-style token dropping
    (:func:`~fastvit_kernels.naflex_data.drop_tokens`, a seeded generator). Evaluation runs the held-out images at
    the longest length, nothing dropped.

    Args:
        model: any module with that forward (timm's NaFlexVit, fastvit's NaFlex model, a test stand-in).
        args: :func:`parse_args`'s namespace (steps / epochs, lr, opt, weight_decay, warmup_steps, amp, seed,
            no_progress, checkpoint_dir).
        device: where the model lives.
        patch_size: P.
        train_src, held_src: indexable (image (C, H, W) float, label) sources.

    Returns:
        {'accuracy' (held-out top-1 in [0, 1]), 'steps', 'images', 'tokens' (real tokens trained on),
        'images_per_s', 'tokens_per_s' (over the whole run, first step included)}.
    """
    ds, held = NaFlexDataset(train_src, patch_size), NaFlexDataset(held_src, patch_size)
    sampler = TokenBudgetBatchSampler(len(ds), args.seq_lens, args.token_budget, seed=args.seed)
    steps_per_epoch = len(sampler)
    total = args.steps or args.epochs * steps_per_epoch
    groups = param_groups(model, args.weight_decay) if hasattr(model, "no_weight_decay") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999)) if args.opt == "adamw" else \
        torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    warm = min(args.warmup_steps, max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
    )
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    drop_gen = torch.Generator().manual_seed(args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} (NaFlex): ~{n_params / 1e6:.2f} M parameters, patch {patch_size}, on {device}; "
          f"{len(ds)} train / {len(held)} held-out images; lengths {list(sampler.seq_lens)}, "
          f"{args.token_budget} tokens per batch" + (f", mask ratio {args.mask_ratio}" if args.mask_ratio else "")
          + f"; {total} steps")
    model.train()
    step = images = tokens = 0
    t_start, epoch = time.perf_counter(), 0
    while step < total:
        sampler.set_epoch(epoch)
        if hasattr(train_src, "epoch"):
            train_src.epoch = epoch
        for seq_len, idx in sampler:
            if step >= total:
                break
            batch, labels = ds.batch(seq_len, idx)
            if args.mask_ratio:
                batch = drop_tokens(batch, args.mask_ratio, drop_gen)
            n_tok = real_tokens(batch)
            inputs, labels = _naflex_inputs(batch, device), labels.to(device)
            t0 = time.perf_counter()
            loss = train_step(model, inputs, labels, opt, scaler, sched, device, amp_dtype)
            dt = time.perf_counter() - t0
            step, images, tokens = step + 1, images + len(idx), tokens + n_tok
            if not args.no_progress or step % 25 == 0 or step == total:
                print(f"step {step}/{total}  loss {loss.item():.4f}  length {seq_len}  {len(idx)} images  "
                      f"{len(idx) / dt:.0f} images/s  {n_tok / dt:.0f} tokens/s")
        epoch += 1
    elapsed = max(time.perf_counter() - t_start, 1e-9)
    model.eval()
    correct = total_eval = 0
    L = max(args.seq_lens)
    per = max(1, args.token_budget // L)
    with torch.no_grad():
        for i in range(0, len(held), per):
            batch, labels = held.batch(L, list(range(i, min(i + per, len(held)))))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(_naflex_inputs(batch, device))
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total_eval += len(labels)
    model.train()
    acc = correct / max(total_eval, 1)
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                   os.path.join(args.checkpoint_dir, "checkpoint.pt"))
    print(f"trained {step} steps in {elapsed:.1f} s ({images / elapsed:.0f} images/s, {tokens / elapsed:.0f} "
          f"tokens/s overall, real tokens)")
    print(f"held-out accuracy: {acc:.4f}")
    return {"accuracy": acc, "steps": step, "images": images, "tokens": tokens, "images_per_s": images / elapsed,
            "tokens_per_s": tokens / elapsed}


if __name__ == "__main__":
    main()
