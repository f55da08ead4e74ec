"""``python -m fastvit_kernels.aot``: the command line of the AOT check (:mod:`fastvit_kernels.aot`: ``check``,
``grids``) and of the AOT build (:mod:`fastvit_kernels.aot.build`: ``build``). See the package's docstring."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastvit_kernels import aot  # the package module by name, so that compile workers can unpickle its jobs
from fastvit_kernels.aot import (ARCHS, DEFAULT_BATCHES, DTYPES, GRID_BATCHES, GRID_IMG_SIZES, MODELS, MODES,
                                 _jsonable, check, check_grids, format_grid_table, format_table, missing_tools)
from fastvit_kernels.aot import build


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: every variant and grid passes; 1: a failure or an
    untraced kernel; 2: the tools are missing or a bad argument)."""
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.aot", description=aot.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compile every kernel variant the ViT configs use and inspect the cubins; "
                                     "check every launch grid against CUDA's limits")
    g = sub.add_parser("grids", help="only the launch-grid check (seconds; no compiler)")
    build.add_parser(sub)
    ints = lambda text: ", ".join(map(str, text))  # noqa: E731
    for q in (p, g):
        q.add_argument("--model", action="append", help=f"model config name (repeatable; default {', '.join(MODELS)})")
        q.add_argument("--dtype", action="append", choices=list(DTYPES),
                       help="activation dtype (default bf16 fp16 fp32)")
        q.add_argument("--mode", action="append", choices=list(MODES), help="train and / or infer (default both)")
        q.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--arch", action="append", choices=list(ARCHS), help="target (repeatable; default both)")
    p.add_argument("--batch", action="append", type=int,
                   help=f"batch size to compile for (repeatable; default {ints(DEFAULT_BATCHES)})")
    p.add_argument("--grid-batch", action="append", type=int,
                   help=f"extra batch size of the grid check (repeatable; default {ints(GRID_BATCHES)})")
    p.add_argument("--grid-img", action="append", type=int,
                   help=f"input side in pixels of the grid check, 0: the model's own (default {ints(GRID_IMG_SIZES)})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    g.add_argument("--batch", action="append", type=int, help=f"batch size (repeatable; default {ints(GRID_BATCHES)})")
    g.add_argument("--img", action="append", type=int,
                   help=f"input side in pixels, 0: the model's own (repeatable; default {ints(GRID_IMG_SIZES)})")
    args = parser.parse_args(argv)

    missing = missing_tools()
    if args.command == "grids":
        missing = [m for m in missing if m == "triton"]
    if missing:
        print(f"AOT {args.command} unavailable: missing {', '.join(missing)} (Triton's bundled CUDA tools)",
              file=sys.stderr)
        return 2
    if args.command == "build":
        return build.run(args, parser)
    common = (args.model or MODELS, args.dtype or ["bf16", "fp16", "fp32"], args.mode or MODES)
    try:
        if args.command == "grids":
            result = check_grids(*common, args.batch or GRID_BATCHES, args.img or GRID_IMG_SIZES)
        else:
            result = check(args.arch or list(ARCHS), *common, args.batch or DEFAULT_BATCHES, args.jobs,
                           progress=not args.json, grid_batches=args.grid_batch or GRID_BATCHES,
                           grid_img_sizes=args.grid_img or GRID_IMG_SIZES)
    except ValueError as e:  # a bad --model / --batch value
        parser.error(str(e))
    import triton

    result["triton"] = triton.__version__
    if args.json:
        print(json.dumps(_jsonable(result), indent=1))
        return 1 if result["failures"] or result.get("not_traced") else 0
    if "rows" in result:
        print(format_table(result["rows"]) + "\n")
    print(format_grid_table(result["grids"]))
    bad_grids = sum(bool(r["problems"]) for r in result["grids"])
    variants = f"{len(result['rows'])} variants, " if "rows" in result else ""
    print(f"\n{variants}{len(result['grids'])} kernels' grids, {result['failures']} failing ({bad_grids} of them "
          f"grids), triton {triton.__version__}, {result['seconds']} s")
    if result.get("not_traced"):
        print(f"kernels no workload launches (add them to vit_workloads): {result['not_traced']}")
    return 1 if result["failures"] or result.get("not_traced") else 0



if __name__ == "__main__":
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        print("note: TRITON_INTERPRET ignored (the AOT check compiles for real targets)", file=sys.stderr)
    sys.exit(main())
