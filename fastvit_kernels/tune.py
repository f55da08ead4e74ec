"""``python -m fastvit_kernels.tune``: write a tuning record for one model, batch size and dtype (GPU only).

Runs training steps (forward + backward of a cross-entropy loss on random images) of the named model on the current
CUDA device with every autotuned kernel key tuned (Triton's autotuner times each candidate) and, with
``--gemm-impl measure`` (default), each plain GEMM timed on the fused Triton core and on cuBLAS + elementwise
kernels; then writes every decision, keyed by (GPU name, Triton version, kernel, key), to ``--out``
(:func:`fastvit_kernels.tuning.snapshot`). Apply it with ``FASTVIT_TUNING=<out>`` or
:func:`fastvit_kernels.tuning.use_tuning_record`: nothing is timed at run time then.

The keys hold the launch shapes (M bucket = next power of two of batch x tokens), the operand dtypes and the fusion
flags, so tune with the per-GPU batch size and the precision mode the job trains with (``--autocast`` for
``train.py --amp``). Without CUDA it exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    p = argparse.ArgumentParser(prog="python -m fastvit_kernels.tune",
                                description="Write a tuning record for one model, batch size and dtype (GPU only).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="named config (fastvit_kernels.configs)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step on this GPU (per-rank batch)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the step's GEMM operands")
    p.add_argument("--autocast", action="store_true",
                   help="fp32 parameters under torch.autocast(dtype), as train.py --amp; default: model cast to dtype")
    p.add_argument("--steps", type=int, default=1, help="training steps to run (every key is tuned on its first)")
    p.add_argument("--gemm-impl", default="measure", choices=["measure", "triton"],
                   help="measure: time Triton against cuBLAS per GEMM key and record the faster; triton: record "
                        "the fused core's tiles only")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p


def _problem(args) -> str | None:
    """Why this process cannot tune, or None."""
    from .backend import interpreter_enabled

    if not torch.cuda.is_available():
        return "it needs a CUDA GPU (none here)"
    if interpreter_enabled():
        return "TRITON_INTERPRET is set: the interpreter's timings are Python's, not the GPU's"
    if os.environ.get("FASTVIT_AUTOTUNE", "1").lower() in ("0", "false", "off", "no"):
        return "FASTVIT_AUTOTUNE is off: the kernels would not be autotuned"
    if args.autocast and args.dtype == "fp32":
        return "--autocast needs --dtype bf16 or fp16"
    if args.batch_size < 1 or args.steps < 1:
        return f"--batch-size and --steps must be >= 1; got {args.batch_size} and {args.steps}"
    return None


def main(argv=None) -> int:
    """Run the command; returns the exit status (0: record written; 2: cannot tune here, nothing written)."""
    args = build_parser().parse_args(argv)
    why = _problem(args)
    if why is not None:
        print(f"fastvit_kernels.tune: {why}. Nothing was tuned or written.", file=sys.stderr)
        return 2
    from . import create_model, tuning
    from .backend import use_gemm_impl
    from .configs import training_config

    cfg = training_config(args.model)  # with a head even where the named model has none (a cross-entropy step)
    dtype = DTYPES[args.dtype]
    tuning.use_tuning_record(None)  # start from nothing: every key is tuned here
    model = create_model(args.model, num_classes=cfg["num_classes"]).cuda().train()
    if not args.autocast:
        model = model.to(dtype)
    images = torch.randn(args.batch_size, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], device="cuda",
                         dtype=torch.float32 if args.autocast else dtype)
    labels = torch.randint(0, cfg["num_classes"], (args.batch_size,), device="cuda")
    with tuning.autotuning(sync_on_exit=False), use_gemm_impl(args.gemm_impl):
        for _ in range(args.steps):
            with torch.autocast("cuda", dtype=dtype, enabled=args.autocast):
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    record = tuning.snapshot()
    tuning.save(record, args.out)
    kinds = Counter(kernel for kernel, _ in record.entries)
    cublas = sum(1 for (k, _), v in record.entries.items() if k == "gemm_impl" and v["impl"] == "cublas")
    print(f"tuning record for {args.model}, batch {args.batch_size}, {args.dtype}"
          f"{' autocast' if args.autocast else ''} on {record.gpu} (Triton {record.triton}): "
          f"{len(record.entries)} entries -> {args.out}")
    for kernel, n in sorted(kinds.items()):
        print(f"  {kernel}: {n} keys" + (f" ({cublas} on cuBLAS)" if kernel == "gemm_impl" else ""))
    print(f"apply with FASTVIT_TUNING={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
