"""``python -m fastvit_kernels.bench {model,profile,report,gemm-impl}``.

* ``model``: the cost model's comparison (FastViT vs eager PyTorch) of one training step or inference forward:
  kernel launches, device-memory bytes, FLOPs, roofline time for a device -- MODELLED, runs anywhere. A NaFlex name
  (``naflexvit_base_patch16_gap``) compares fastvit's packed variable-length step with timm's padded one over
  mixed sequence lengths (``--seq-lens``, ``--token-budget``, ``--keep-ratio``).
* ``profile``: a measured training step broken down by op class (time share, TFLOP/s or GB/s, MFU). On a GPU
  it runs the requested model and batch; on a CPU a small configuration, labelled "CPU".
* ``report``: pytest-benchmark ``--benchmark-json`` output -> markdown table (stdout and a .md file) and a bar
  chart (.png).
* ``gemm-impl``: on a GPU, time the fused Triton GEMM against cuBLAS + elementwise kernels for every GEMM of a
  training step (``FASTVIT_GEMM_IMPL=measure``) and print the decisions, with the entries where cuBLAS won as
  lines for ``kernels/gemm_impl.py``'s ``MEASURED_CHOICES``. Needs CUDA (exits 2 without).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..configs import MODEL_CONFIGS, training_config
from .devices import DEVICES, dtype_name, lookup_device, resolve_peak
from .flops import TIMM_EVA_OPTIONS
from .naflex_cost import NAFLEX_SHAPES


def _add_peak_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak dense TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the memory bandwidth (GB/s)")


def _positive(name: str):
    def conv(v: str) -> int:
        n = int(v)
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1; got {n}")
        return n
    return conv


def _seq_lens(v: str):
    if v == "default":
        return v
    try:
        lens = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq-lens must be 'default' or comma-separated ints; got {v!r}")
    if not lens or min(lens) < 1:
        raise argparse.ArgumentTypeError(f"--seq-lens needs positive lengths; got {v!r}")
    return lens


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the four subcommands."""
    p = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="cost-model comparison FastViT vs eager (modelled; runs anywhere)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--model", default="vit_base_patch16_224",
                   choices=sorted({*MODEL_CONFIGS, *TIMM_EVA_OPTIONS, *NAFLEX_SHAPES}),
                   help="a config name, a timm Eva name of the bench's own table (flops.TIMM_EVA_OPTIONS), or a NaFlex "
                        "name (naflex_cost.NAFLEX_SHAPES: packed vs padded variable-length steps)")
    m.add_argument("--seq-lens", default="default", type=_seq_lens,
                   help="NaFlex: per-image patch counts, comma-separated, or 'default' (64..1024 step 32, each twice, "
                        "in a fixed shuffled order)")
    m.add_argument("--token-budget", type=_positive("--token-budget"), default=16384,
                   help="NaFlex: padded tokens per step; the lengths are split into steps by timm's budget rule")
    m.add_argument("--keep-ratio", type=float, default=1.0,
                   help="NaFlex: MAE-style fraction of patches kept (e.g. 0.25)")
    m.add_argument("--batch-size", type=_positive("--batch-size"), default=64)
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="the one dtype of the step")
    m.add_argument("--device", default="h100-sxm",
                   help=f"roofline peaks: one of {sorted(DEVICES)} or a GPU name")
    m.add_argument("--mode", default="train", choices=["train", "forward"])
    m.add_argument("--launch-us", type=float, default=0.0, help="fixed cost per launch added to the roofline (us)")
    m.add_argument("--gemm-kernel", default="auto", choices=["auto", "tma", "pointer"],
                   help="FastViT's block-GEMM kernel form; auto: tma on sm_90+ devices of the table (and unknown "
                        "ones), pointer on A100 / L40S / RTX 4090")
    m.add_argument("--launches", choices=["fastvit", "eager"], default=None,
                   help="also print every modelled launch of that path")
    _add_peak_flags(m)

    pr = sub.add_parser("profile", help="measured training step by op class (GPU; small config on a CPU)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--model", default="vit_base_patch16_224", choices=sorted(MODEL_CONFIGS))
    pr.add_argument("--batch-size", type=_positive("--batch-size"), default=256)
    pr.add_argument("--impl", default="fastvit", choices=["fastvit", "eager"],
                    help="FastViT, or the eager reference VisionTransformer (SDPA attention)")
    pr.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="parameter and activation dtype (default bf16 on a GPU, fp32 on a CPU)")
    pr.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu', ...")
    pr.add_argument("--backend", default=None, choices=["auto", "triton", "torch"], help="FastViT's backend")
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--iters", type=_positive("--iters"), default=5)
    pr.add_argument("--cpu-model", default="vit_micro_patch4_32", choices=sorted(MODEL_CONFIGS),
                    help="the config run instead on a CPU")
    pr.add_argument("--cpu-batch-size", type=_positive("--cpu-batch-size"), default=8)
    pr.add_argument("--cpu-full", action="store_true", help="on a CPU, run --model / --batch-size as given")
    pr.add_argument("--seed", type=int, default=0)
    _add_peak_flags(pr)

    g = sub.add_parser("gemm-impl", help="measure fused Triton GEMM vs cuBLAS per GEMM of a training step (GPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", action="append", choices=sorted(MODEL_CONFIGS),
                   help="repeatable (default: vit_base_patch16_224, vit_large_patch16_224, vit_huge_patch14_224)")
    g.add_argument("--batch-size", type=_positive("--batch-size"), action="append",
                   help="repeatable (default: 64 and 256)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])

    r = sub.add_parser("report", help="pytest-benchmark JSON -> markdown table + bar chart")
    r.add_argument("json", help="the file written by pytest --benchmark-json")
    r.add_argument("--md", default=None, help="markdown output (default: JSON path with .md)")
    r.add_argument("--png", default=None, help="bar chart output (default: JSON path with .png)")
    r.add_argument("--no-chart", action="store_true", help="skip the chart (no matplotlib needed)")
    return p


def _cmd_naflex(args) -> int:
    from . import naflex_cost

    if not 0.0 < args.keep_ratio <= 1.0:
        print(f"--keep-ratio must be in (0, 1]; got {args.keep_ratio}", file=sys.stderr)
        return 2
    shape = naflex_cost.NAFLEX_SHAPES[args.model]
    lens = naflex_cost.default_seq_lens() if args.seq_lens == "default" else args.seq_lens
    batches = naflex_cost.budget_batches(lens, args.token_budget, args.keep_ratio)
    peak = resolve_peak(args.device, args.dtype, args.peak_tflops, args.bandwidth_gbs)
    gemm_kernel = args.gemm_kernel
    if gemm_kernel == "auto":
        spec = lookup_device(args.device)
        gemm_kernel = "pointer" if spec is not None and spec.arch < 90 else "tma"
    print(f"{args.model}: D={shape.embed_dim}, depth {shape.depth}, {shape.num_heads} heads of {shape.head_dim}, "
          f"{shape.prefix_tokens} prefix tokens; {len(lens)} images (patches {min(lens)}..{max(lens)}) in "
          f"{len(batches)} steps of at most {args.token_budget} padded tokens"
          + (f"; keep ratio {args.keep_ratio}" if args.keep_ratio < 1 else ""))
    res = naflex_cost.comparison(shape, batches, args.dtype, args.mode, peak, gemm_kernel=gemm_kernel)
    print(naflex_cost.comparison_table(res, peak))
    if args.mode == "train":
        fb = naflex_cost.comparison(shape, batches, args.dtype, args.mode, optimizer=False, gemm_kernel=gemm_kernel)
        print(f"\nMODELLED, forward + backward only (no optimizer): bytes packed / padded "
              f"{fb['ratio']['bytes']:.2f}, executed FLOPs {fb['ratio']['flops']:.2f}")
    return 0


def _cmd_model(args) -> int:
    from . import cost_model
    from .flops import ViTShape

    if args.model in NAFLEX_SHAPES:
        return _cmd_naflex(args)

    from .flops import TIMM_EVA_OPTIONS

    # the cost model needs a class token with a head: the Eva names' modelled form (TIMM_EVA_OPTIONS), else the
    # named config with a head where it has none
    shape = ViTShape.from_config(args.model if args.model in TIMM_EVA_OPTIONS else training_config(args.model))
    peak = resolve_peak(args.device, args.dtype, args.peak_tflops, args.bandwidth_gbs)
    gemm_kernel = args.gemm_kernel
    if gemm_kernel == "auto":
        spec = lookup_device(args.device)
        gemm_kernel = "pointer" if spec is not None and spec.arch < 90 else "tma"
    res = {path: cost_model.step_cost(shape, args.batch_size, args.dtype, path, args.mode, peak,
                                      launch_overhead_s=args.launch_us * 1e-6, gemm_kernel=gemm_kernel)
           for path in cost_model.PATHS}
    print(f"{args.model}: {shape.tokens} tokens, D={shape.embed_dim}, depth {shape.depth}, "
          f"{shape.num_heads} heads of {shape.head_dim}")
    if not shape.classic:
        opts = [f"rope={shape.rope}" + (" (rotate_half)" if shape.rope_half else "") if shape.rope else "",
                f"mlp={shape.mlp} D_hidden={shape.hidden}" + (" + MLP norm" if shape.mlp_norm else ""),
                "LayerScale" if shape.layer_scale else "", f"{shape.reg_tokens} register tokens" if shape.reg_tokens
                else "", "separate q/k/v" if not shape.qkv_fused else "", f"qkv_bias={shape.qkv_bias}",
                "" if shape.pos_embed else "no abs pos_embed"]
        print("blocks: " + ", ".join(o for o in opts if o))
    print(f"FastViT block GEMMs on the {gemm_kernel} kernel form")
    print(cost_model.comparison_table(res["fastvit"], res["eager"], peak))
    if args.launches:
        print()
        print(cost_model.launch_table(cost_model.step_launches(shape, args.batch_size, args.dtype, args.launches,
                                                               args.mode, gemm_kernel=gemm_kernel)))
    return 0


def _cmd_profile(args) -> int:
    from .. import create_model, reference
    from ..train import param_groups
    from .profile import profile_step

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_cpu = device.type == "cpu"
    name, batch = args.model, args.batch_size
    if on_cpu and not args.cpu_full:
        name, batch = args.cpu_model, args.cpu_batch_size
    dt = args.dtype or ("fp32" if on_cpu else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    torch.manual_seed(args.seed)
    cfg = training_config(name)  # with a head even where the named model has none (a cross-entropy step)
    if args.impl == "fastvit":
        model = create_model(name, num_classes=cfg["num_classes"], backend=args.backend)
    else:
        model = reference.VisionTransformer(**cfg, fused_attn=True)
    model = model.to(device=device, dtype=dtype).train()
    images = torch.randn(batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], device=device, dtype=dtype)
    labels = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    peak = resolve_peak(device, dtype, args.peak_tflops, args.bandwidth_gbs)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    label = f"{args.impl} {name}, batch {batch}, {dt}, training step on {where}"
    if on_cpu:
        label = (f"CPU: {label}" + ("" if args.cpu_full else f" (small config instead of {args.model} batch "
                                                               f"{args.batch_size}; use a GPU for real numbers)")
                 + "; times PyTorch's CPU kernels" + (" / the Triton interpreter" if os.environ.get(
                     "TRITON_INTERPRET") == "1" and args.impl == "fastvit" else ""))
    result = profile_step(model, images, labels, opt, peak=peak, path=args.impl, warmup=args.warmup,
                          iters=args.iters, label=label)
    print(result.format())
    return 0


def _cmd_gemm_impl(args) -> int:
    from .. import create_model
    from ..backend import use_gemm_impl
    from ..configs import get_config
    from ..kernels import gemm_impl

    if not torch.cuda.is_available():
        print("gemm-impl measures GPU kernels: it needs a CUDA device (none here). Nothing was measured.",
              file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gemm_impl.reset_decisions()
    for name in args.model or ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]:
        cfg = get_config(name)
        model = create_model(name).to(device="cuda", dtype=dtype).train()
        for batch in args.batch_size or [64, 256]:
            images = torch.randn(batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], device="cuda",
                                 dtype=dtype)
            with use_gemm_impl("measure"):
                model(images).float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
        del model
        torch.cuda.empty_cache()
    print(f"# GEMM path measurements on {torch.cuda.get_device_name()} ({args.dtype}); times in ms (median)")
    print("| key (arch, dtype, M bucket, N, K, fusion) | triton | cublas | faster |")
    print("|---|---|---|---|")
    wins = []
    for key, d in sorted(gemm_impl.decisions().items(), key=str):
        print(f"| {key} | {d.ms.get('triton', float('nan')):.4f} | {d.ms.get('cublas', float('nan')):.4f} | "
              f"{d.impl} |")
        if d.impl == "cublas":
            wins.append(key)
    print(f"\n# entries for MEASURED_CHOICES ({len(wins)} of {len(gemm_impl.decisions())} keys where cuBLAS won):")
    for key in wins:
        print(f"    {key!r}: \"cublas\",")
    return 0


def _cmd_report(args) -> int:
    from .report import bar_chart, load_benchmarks, markdown

    benches = load_benchmarks(args.json)
    base = os.path.splitext(args.json)[0]
    md = markdown(benches)
    md_path = args.md or base + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {md_path}")
    if not args.no_chart:
        print(f"wrote {bar_chart(benches, args.png or base + '.png')}")
    return 0


def main(argv=None) -> int:
    """Run a subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", None):
        dtype_name(args.dtype)
    return {"model": _cmd_model, "profile": _cmd_profile, "report": _cmd_report,
            "gemm-impl": _cmd_gemm_impl}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
