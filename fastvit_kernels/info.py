"""``python -m fastvit_kernels.info [--check] [--json]``: what a user runs first on a new machine.

Without ``--check`` it reports, without launching a kernel: the versions (Python, torch, Triton, NumPy, this
package), the GPUs (name, compute capability, memory), which implementation serves CUDA and CPU tensors
(:mod:`fastvit_kernels.backend`), the GEMM settings (kernel form per GPU: TMA persistent or pointer; cuBLAS-or-Triton
rule; paired backward GEMMs), autotuning, the attention backward's launch plan, the Triton interpreter setting and
the tuning record's status.

``--check`` then runs, and the exit status is non-zero when any part fails:

* on a GPU: every public op of :mod:`fastvit_kernels.ops`, forward and backward, in bf16 and fp16 at ViT-B/16 and
  ViT-H/14 widths, held to the fp32 eager reference (:mod:`fastvit_kernels.reference`) by the tolerance rule of
  :mod:`fastvit_kernels.accuracy` (at most 2x PyTorch's own low-precision error); a CUDA-graph capture of a FastViT
  training step (2 blocks of ViT-B/16, bf16, SGD) whose replays are compared with the same steps run eagerly; and a
  small speed table, FastViT against the eager reference, forward + backward of ViT-B/16 (bf16), timed with
  ``triton.testing.do_bench`` and labelled with the device name;
* on a CPU: the same op checks through the Triton interpreter on a small config (``vit_test_hd80``: head_dim 80 as
  ViT-H, D = 160), in fp32 and fp16 (the interpreter has no bf16). ``TRITON_INTERPRET=1`` must be in the
  environment before any kernel is defined, so without it the command re-runs itself in a subprocess that has it.

``--inject-error OP`` is the checker's self-test: it perturbs OP's forward output before the comparison, so that
check must fail (and the exit status be non-zero).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial

import torch

from . import __version__, backend, ops, reference
from .accuracy import TOLERANCES, compare_fwd_bwd
from .configs import get_config

GPU_MODELS = ("vit_base_patch16_224", "vit_huge_patch14_224")
CPU_MODEL = "vit_test_hd80"
GPU_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float16)
GPU_CHECK_TARGET_S = 180  # what a first run on a new machine should cost (compilation and autotuning included)
OP_NAMES = ("patch_embed", "layernorm_linear", "linear_residual", "attention", "attention_block", "layernorm_mlp")


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------
def tuning_status() -> dict | str:
    """The tuning record's status: ``fastvit_kernels.tuning.status()`` where that module exists (a dict: path,
    entries, gpu, triton, matching), else the string "no tuning record support". An error raised by ``status()`` is
    returned as ``{"error": "<type>: <message>"}`` so the rest of the report still prints."""
    if importlib.util.find_spec("fastvit_kernels.tuning") is None:
        return "no tuning record support"
    try:
        return importlib.import_module("fastvit_kernels.tuning").status()
    except Exception as err:  # the report must survive a broken record
        return {"error": f"{type(err).__name__}: {err}"}


def _version(module: str) -> str | None:
    """``module.__version__`` if the module imports, else None."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None


def _gpus() -> list[dict]:
    """One dict per visible CUDA device: index, name, capability ("9.0"), arch ("sm_90"), memory_gib, sms."""
    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}", arch=f"sm_{p.major}{p.minor}",
                        memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count))
    return out


def _backend_for(device: str) -> str:
    """What serves tensors on ``device`` under the current settings, or the settings' error as text."""
    try:
        return backend.resolve_backend(torch.device(device))
    except (ValueError, RuntimeError) as err:
        return f"error: {err}"


def _setting(fn) -> str:
    """A backend setting's value, or its ValueError as text (a bad environment variable)."""
    try:
        return fn()
    except ValueError as err:
        return f"error: {err}"


def _gemm_kernel_form(gpu: dict | None, tma_available: bool) -> str:
    """The GEMM kernel form plain block GEMMs take on ``gpu`` (None: CPU), by the rule of
    :func:`fastvit_kernels.backend.gemm_kernel`, with the reason."""
    setting = _setting(backend.gemm_kernel)
    if setting.startswith("error"):
        return setting
    if setting == "pointer":
        return "pointer (FASTVIT_GEMM_KERNEL=pointer)"
    if not tma_available:
        return "pointer (this Triton has no host tensor descriptors)"
    if setting == "tma":
        return "tma (forced; where the operands allow it)"
    if gpu is None:
        if backend.interpreter_enabled():
            return "pointer (auto: the interpreter takes the pointer kernel; FASTVIT_GEMM_KERNEL=tma tests TMA)"
        return "none (CPU tensors run the eager reference)"
    major, minor = (int(v) for v in gpu["capability"].split("."))
    from .kernels import matmul_tma

    if 10 * major + minor >= matmul_tma.MIN_ARCH:
        return f"tma (auto: {gpu['arch']} >= sm_{matmul_tma.MIN_ARCH}; pointer if it fails to build, with a warning)"
    return f"pointer (auto: {gpu['arch']} < sm_{matmul_tma.MIN_ARCH})"


def _attention_backward_plan() -> dict:
    """The attention backward's launch-plan rule and what it gives for the standard ViTs in fp16 / bf16."""
    from .kernels import attention as attn_kernels

    min_heads = attn_kernels.FUSED_BWD_MIN_HEADS
    plans = {}
    for name in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        cfg = get_config(name)
        H = cfg["num_heads"]
        hd = cfg["embed_dim"] // H
        if attn_kernels.fused_bwd_builds(hd, torch.bfloat16):
            plans[name] = f"one launch from batch {math.ceil(min_heads / H)} (B*H >= {min_heads}), else three"
        else:
            plans[name] = f"three launches (head_dim {hd} has no spill-free one-launch tile)"
    rule = (f"one launch per layer when B*H >= {min_heads} and the dtype is fp16/bf16 with head_dim <= 64; else a "
            "delta pre-pass + dK/dV + dQ (three launches); fp32 always three")
    if backend.interpreter_enabled():
        rule += " (under the interpreter only B*H counts)"
    return dict(rule=rule, fp16_bf16=plans)


def _autotune() -> dict:
    """Autotuning of the GEMM core and the attention kernels under the current settings."""
    if backend.interpreter_enabled():
        return dict(gemm="off (interpreter: one fixed tile)", attention="off (interpreter: one fixed tile)")
    from .kernels import gemm_configs

    gemm = ("on (GPU): each shape times the candidates of kernels.gemm_configs on its first launch"
            if gemm_configs.autotune_enabled() else "off (FASTVIT_AUTOTUNE=0: the first candidate)")
    return dict(gemm=gemm, attention="on (GPU): each (head_dim, dtype, N bucket) on its first launch")


def report() -> dict:
    """Everything :mod:`fastvit_kernels.info` reports, without launching a kernel (JSON-serialisable).

    Keys: fastvit_kernels, python, platform, torch, torch_cuda (CUDA version torch was built with, None for a
    CPU build), triton, numpy (None where not installed), cuda_available, gpus (list, see ``_gpus``), backend
    (``cuda`` / ``cpu`` tensors -> "triton" | "torch", the FASTVIT_BACKEND value), interpreter (TRITON_INTERPRET
    on?), gemm (impl, kernel setting, kernel form per device, pairs, tma_descriptors), autotune, attention_backward,
    tuning_record (:func:`tuning_status`), csrc (:func:`csrc_status`: whether the C++ op library ``_C`` is loaded,
    the launcher, and who serves each ``fastvit::*`` op on CPU and CUDA).
    """
    gpus = _gpus()
    triton_version = _version("triton") if backend.triton_available() else None
    tma = False
    if triton_version is not None:
        from .kernels import matmul_tma

        tma = matmul_tma.available()
    info = dict(
        fastvit_kernels=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=triton_version,
        numpy=_version("numpy"),
        cuda_available=torch.cuda.is_available(),
        gpus=gpus,
        backend=dict(cuda=_backend_for("cuda"), cpu=_backend_for("cpu"),
                     FASTVIT_BACKEND=os.environ.get("FASTVIT_BACKEND", "auto")),
        interpreter=backend.interpreter_enabled(),
        gemm=dict(
            impl=_setting(backend.gemm_impl),
            kernel_setting=_setting(backend.gemm_kernel),
            kernel_form={**{f"cuda:{g['index']}": _gemm_kernel_form(g, tma) for g in gpus},
                         "cpu": _gemm_kernel_form(None, tma)},
            pairs=_setting(backend.gemm_pairs),
            tma_descriptors=tma,
        ),
        autotune=_autotune() if triton_version is not None else "n/a (no triton)",
        attention_backward=_attention_backward_plan() if triton_version is not None else "n/a (no triton)",
        tuning_record=tuning_status(),
        csrc=csrc_status(),
    )
    return info


def csrc_status() -> dict:
    """The C++ op library's status (:mod:`fastvit_kernels._library`): loaded (bool), path (or None), launcher
    ("cpp" | "triton", or "error: ..." for a bad FASTVIT_LAUNCHER), ops ({"fastvit::x": {"CPU": who, "CUDA": who}}
    with who "cpp" | "triton" | "none"), cubins (None without ``FASTVIT_CUBINS``, else {"path": kernels.json,
    "rows": count, "route": whether CUDA launches take it (_C loaded, launcher cpp), "plans": the launch plans
    beside it ({"path", "plans", "refused", "served"} or {"path", "error"})} or {"path", "error"} when the table
    cannot be read)."""
    from . import _env, _library

    try:
        launcher = _library.launcher()
    except (ValueError, RuntimeError) as err:
        launcher = f"error: {err}"
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(_library.NAMESPACE + "::"))
    cubins = _env.cubin_table()
    if cubins is not None:
        from .kernels import _cubins

        try:
            table = _cubins.load_table(cubins)
            cubins = dict(path=table.file, rows=len(table.rows),
                          route=_library.csrc_loaded() and launcher == "cpp")
        except (OSError, ValueError, ImportError) as err:
            cubins = dict(path=cubins, error=str(err))
        else:
            cubins["plans"] = _plan_status(cubins["path"])
    return dict(loaded=_library.csrc_loaded(),
                path=None if _library.LIBRARY_PATH is None else str(_library.LIBRARY_PATH),
                launcher=launcher, ops={n: _library.serving(n) for n in names}, cubins=cubins)


def _plan_status(kernels_json: str) -> dict:
    """The launch plans beside a cubin table: {"path", "plans", "refused", "served": whether _C's CUDA kernels
    replay them (the plan route), and on the plan route "python_fallbacks": calls without a plan that ran the Python
    implementation so far}, or {"path", "error"}; as _C reads them when it is loaded, else from the file."""
    from . import _library
    from .aot import plans

    path = os.path.join(os.path.dirname(kernels_json), plans.PLANS)
    if _library.plan_route():
        try:
            n_plans, n_refused, n_fallbacks = torch.ops.fastvit_csrc.plan_counts()
        except RuntimeError as err:
            return dict(path=path, error=str(err))
        return dict(path=path, plans=n_plans, refused=n_refused, served=True, python_fallbacks=n_fallbacks)
    try:
        doc = plans.load(path)
    except (OSError, ValueError) as err:
        return dict(path=path, error=str(err))
    return dict(path=path, plans=len(doc["plans"]), refused=len(doc["refused"]), served=False)


def format_report(info: dict) -> str:
    """The report as aligned text lines."""
    lines = [f"fastvit_kernels {info['fastvit_kernels']}"]
    row = lambda k, v: lines.append(f"  {k:<26} {v}")  # noqa: E731
    row("python", f"{info['python']} ({info['platform']})")
    row("torch", f"{info['torch']} (CUDA build: {info['torch_cuda'] or 'none'})")
    row("triton", info["triton"] or "not installed")
    row("numpy", info["numpy"] or "not installed")
    if info["gpus"]:
        for g in info["gpus"]:
            row(f"gpu {g['index']}", f"{g['name']}, compute capability {g['capability']} ({g['arch']}), "
                                    f"{g['memory_gib']} GiB, {g['sms']} SMs")
    else:
        row("gpu", "none (torch.cuda.is_available() is False)")
    b = info["backend"]
    row("CUDA tensors run", b["cuda"] + ("" if info["cuda_available"] else " (no CUDA device here)"))
    row("CPU tensors run", b["cpu"])
    row("FASTVIT_BACKEND", b["FASTVIT_BACKEND"])
    row("TRITON_INTERPRET", "on: Triton kernels run on the CPU interpreter" if info["interpreter"] else "off")
    g = info["gemm"]
    row("GEMM impl", f"{g['impl']} (FASTVIT_GEMM_IMPL: triton | cublas | measure | auto)")
    for dev, form in g["kernel_form"].items():
        row(f"GEMM kernel ({dev})", form)
    row("GEMM pairs", f"{g['pairs']} (FASTVIT_GEMM_PAIRS)")
    if isinstance(info["autotune"], dict):
        row("autotune GEMM", info["autotune"]["gemm"])
        row("autotune attention", info["autotune"]["attention"])
    if isinstance(info["attention_backward"], dict):
        row("attention backward", info["attention_backward"]["rule"])
        for name, plan in info["attention_backward"]["fp16_bf16"].items():
            row(f"  {name}", plan)
    row("tuning record", describe_tuning(info["tuning_record"]))
    c = info["csrc"]
    row("C++ op library (_C)", f"loaded from {c['path']}" if c["loaded"] else
        "not built (FASTVIT_BUILD_CSRC=1 pip install --no-build-isolation -e .)")
    row("launcher", f"{c['launcher']} (FASTVIT_LAUNCHER: cpp | triton)")
    cub = c.get("cubins")
    row("cubin table", "none (FASTVIT_CUBINS unset: CUDA launches JIT-compile)" if cub is None else
        f"{cub['path']}: {cub['error']}" if "error" in cub else
        f"{cub['path']}: {cub['rows']} cubins, " + ("CUDA launches run them" if cub["route"] else
                                                     "unused (needs _C and launcher cpp)"))
    plan = (cub or {}).get("plans")
    if plan is not None:
        row("launch plans", f"{plan['path']}: {plan['error']}" if "error" in plan else
            f"{plan['path']}: {plan['plans']} plans, {plan['refused']} calls refused; " +
            (f"_C's CUDA kernels replay them ({plan['python_fallbacks']} calls without a plan ran Python so far)"
             if plan["served"] else "unused (needs _C and launcher cpp)"))
    if c["loaded"]:
        for name, who in c["ops"].items():
            row(f"  {name.split('::')[1]}", f"CPU {who['CPU']}, CUDA {who['CUDA']}")
    else:
        row("  fastvit::* ops", f"{len(c['ops'])} Python custom ops (Triton on CUDA)")
    return "\n".join(lines)


def describe_tuning(status: dict | str) -> str:
    """One line for the tuning record's status as :func:`tuning_status` gives it."""
    if isinstance(status, str):
        return status
    if status.get("error"):
        return f"FASTVIT_TUNING={status['path']} could not be loaded: {status['error']}"
    if status.get("path") is None and not status.get("entries"):
        return ("none (FASTVIT_TUNING unset): tiles autotuned per process (the first candidate under "
                "torch.distributed), GEMM path by the fixed rule")
    where = f"{status['entries']} entries made on {status['gpu']} with Triton {status['triton']}"
    used = "in force" if status.get("matching") else "ignored here: another GPU or Triton version"
    return f"{status['path']}: {where}; {used}"


# ----------------------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OpCase:
    """One op at one model's shapes: ``fn`` (the op on the Triton path) and ``ref`` (its eager reference) take
    ``inputs`` (fp32 tensors, cast per dtype by the checker) and ``kwargs``; ``names`` name the inputs."""

    op: str
    fn: object
    ref: object
    inputs: list
    names: list
    kwargs: dict


def op_cases(model: str, batch: int, device: str | torch.device, seed: int = 0) -> list[OpCase]:
    """The six public ops at the shapes of ``model`` (a :data:`fastvit_kernels.MODEL_CONFIGS` name): D = embed_dim,
    H = num_heads, N = patches + class token, hidden = mlp_ratio * D; inputs drawn in fp32 on ``device`` with
    weights scaled by 1 / sqrt(fan_in) so every activation stays O(1).

    Raises:
        KeyError: unknown model name.
    """
    cfg = get_config(model)
    D, H, P = cfg["embed_dim"], cfg["num_heads"], cfg["patch_size"]
    C, img = cfg.get("in_chans", 3), cfg["img_size"]
    N = (img // P) ** 2 + 1
    hidden = int(D * cfg.get("mlp_ratio", 4.0))
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    def x():
        return r(batch, N, D, shift=0.5)

    def ln():
        return [r(D, scale=0.1, shift=1.0), r(D, scale=0.1)]

    triton_path = dict(backend="triton")
    return [
        OpCase("patch_embed", partial(ops.patch_embed, **triton_path), reference.patch_embed_ref,
               [r(batch, C, img, img), r(D, C, P, P, scale=(C * P * P) ** -0.5), r(D, scale=0.1),
                r(1, N, D, scale=0.1), r(1, 1, D, scale=0.1)],
               ["images", "weight", "bias", "pos_embed", "cls_token"], {}),
        OpCase("layernorm_linear", partial(ops.layernorm_linear, **triton_path), reference.layernorm_linear_ref,
               [x(), *ln(), r(3 * D, D, scale=D**-0.5), r(3 * D, scale=0.1)],
               ["x", "norm_weight", "norm_bias", "weight", "bias"], {}),
        OpCase("linear_residual", partial(ops.linear_residual, **triton_path), reference.linear_residual_ref,
               [r(batch, N, D), r(D, D, scale=D**-0.5), r(D, scale=0.1), r(batch, N, D)],
               ["x", "weight", "bias", "residual"], {}),
        OpCase("attention", partial(ops.attention, **triton_path), reference.attention_ref,
               [r(batch, N, 3 * D)], ["qkv"], dict(num_heads=H)),
        OpCase("attention_block", partial(ops.attention_block, **triton_path), reference.attention_block_ref,
               [x(), *ln(), r(3 * D, D, scale=D**-0.5), r(3 * D, scale=0.1), r(D, D, scale=D**-0.5),
                r(D, scale=0.1)],
               ["x", "norm_weight", "norm_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias"],
               dict(num_heads=H)),
        OpCase("layernorm_mlp", partial(ops.layernorm_mlp, **triton_path), reference.layernorm_mlp_ref,
               [x(), *ln(), r(hidden, D, scale=D**-0.5), r(hidden, scale=0.1), r(D, hidden, scale=hidden**-0.5),
                r(D, scale=0.1)],
               ["x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"], {}),
    ]


def _perturbed(fn):
    """``fn`` with its output shifted by 1 + 10% of its largest magnitude: a forward error no tolerance accepts
    (the gradients are unchanged: the shift is a constant)."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out + (1.0 + 0.1 * out.detach().abs().max().item())
    return run


def check_batch(model: str, device: torch.device) -> int:
    """The batch an op check runs at: 2, except on a GPU for a model whose attention backward has the one-launch
    plan (fp16 / bf16, head_dim <= 64: ViT-B/16), which takes enough images for it (B * H >=
    FUSED_BWD_MIN_HEADS: ViT-B/16 -> 22), so the plan training batches run is the one checked."""
    if torch.device(device).type != "cuda":
        return 2
    from .kernels.attention import FUSED_BWD_MIN_HEADS, fused_bwd_builds

    cfg = get_config(model)
    H = cfg["num_heads"]
    if not fused_bwd_builds(cfg["embed_dim"] // H, torch.bfloat16):
        return 2
    return max(2, math.ceil(FUSED_BWD_MIN_HEADS / H))


def check_ops(models, dtypes, device, only=None, inject=None, emit=print) -> list[dict]:
    """Every op (or those in ``only``) at every model's shapes in every dtype, forward + backward, against the fp32
    reference on the same device (:func:`fastvit_kernels.accuracy.compare_fwd_bwd`). ``inject``: the op whose
    output is perturbed (self-test). ``emit`` receives one text line per check as it completes.

    Returns one dict per check: op, model, dtype, batch, ok, worst (the tensor with the highest share of its
    allowed error), ratio (that share; None for a crash or a non-finite / misshapen result), error (its max
    absolute error, or None), message (the failures, "" when ok), seconds. An exception counts as a failure,
    its text in ``message``."""
    device = torch.device(device)
    rows = []
    for model in models:
        batch = check_batch(model, device)
        cases = [c for c in op_cases(model, batch, device) if only is None or c.op in only]
        for case in cases:
            fn = _perturbed(case.fn) if case.op == inject else case.fn
            for dtype in dtypes:
                t0 = time.perf_counter()
                row = dict(op=case.op, model=model, dtype=str(dtype).replace("torch.", ""), batch=batch)
                try:
                    torch.manual_seed(0)  # the output gradient compare_fwd_bwd draws
                    _, results = compare_fwd_bwd(fn, case.ref, case.inputs, dtype, case.names, ref_device=device,
                                                 **case.kwargs)
                    worst = max(results, key=lambda c: c.ratio)
                    failed = [c.message for c in results if not c.ok]
                    finite = math.isfinite(worst.ratio)  # None in the record: JSON has no infinity
                    row.update(ok=not failed, worst=worst.name, ratio=worst.ratio if finite else None,
                               error=worst.error if finite else None, message="; ".join(failed))
                except Exception as err:  # a crash is a failed check, reported with the rest
                    row.update(ok=False, worst="", ratio=None, error=None, message=f"{type(err).__name__}: {err}")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                status = "ok  " if row["ok"] else "FAIL"
                share = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
                emit(f"  {status} {row['op']:<17} {model:<22} {row['dtype']:<9} B={batch:<3} "
                     f"worst {row['worst'] or '-'}: {share} of allowed ({row['seconds']:.1f} s)"
                     + (f"\n       {row['message']}" if row["message"] else ""))
    return rows


def check_cuda_graph(device, dtype=torch.bfloat16, batch: int = 8, steps: int = 3) -> dict:
    """Capture one FastViT training step (forward, cross-entropy, backward, SGD step; 2 blocks of ViT-B/16, pure
    ``dtype``) in a CUDA graph after 3 warm-up steps (autotuning and GEMM-path timing happen there, on a side
    stream, as PyTorch's whole-network capture recipe asks), then replay it on ``steps`` new batches and run the
    same steps eagerly on a copy of the model taken after capture (SGD without momentum keeps no state, so the copy
    starts equal). Logits, loss and every parameter after the last step must agree within the ``dtype`` atol of
    :data:`fastvit_kernels.accuracy.TOLERANCES` (times max(1, max|eager|)); the kernels are deterministic, so a
    difference means the graph read stale inputs or lost a launch.

    Returns: dict(ok, message, logits_error, loss_error, param_error, seconds). An exception is a failure."""
    from .model import create_model

    t0 = time.perf_counter()
    device = torch.device(device)
    try:
        torch.manual_seed(0)
        model = create_model("vit_base_patch16_224", depth=2, backend="triton").to(device=device, dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        static_x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        static_y = torch.randint(0, 1000, (batch,), device=device)

        def step(m, o, x, y):
            o.zero_grad(set_to_none=True)
            logits = m(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            o.step()
            return logits, loss

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(model, opt, static_x, static_y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_logits, static_loss = step(model, opt, static_x, static_y)
        twin = copy.deepcopy(model)  # capture ran nothing: the copy holds the weights the first replay starts from
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        errors = dict(logits_error=0.0, loss_error=0.0)
        atol = TOLERANCES[dtype]["atol"]
        ok = True
        for _ in range(steps):
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            y = torch.randint(0, 1000, (batch,), device=device)
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            logits, loss = step(twin, twin_opt, x, y)
            for key, a, b in (("logits_error", static_logits, logits), ("loss_error", static_loss, loss)):
                err = (a.float() - b.float()).abs().max().item()
                errors[key] = max(errors[key], err)
                ok &= err <= atol * max(1.0, b.float().abs().max().item())
        param_error = 0.0
        for p, q in zip(model.parameters(), twin.parameters()):
            err = (p.float() - q.float()).abs().max().item()
            param_error = max(param_error, err)
            ok &= err <= atol * max(1.0, q.float().abs().max().item())
        torch.cuda.synchronize(device)
        message = "" if ok else "graph replay differs from the eager steps beyond the dtype's atol"
        return dict(ok=bool(ok), message=message, param_error=param_error, **errors,
                    seconds=round(time.perf_counter() - t0, 2))
    except Exception as err:
        return dict(ok=False, message=f"{type(err).__name__}: {err}", seconds=round(time.perf_counter() - t0, 2))


def speed_table(device, dtype=torch.bfloat16, batch: int = 32) -> dict:
    """Forward + backward (cross-entropy) of ViT-B/16 at ``batch`` in pure ``dtype``: FastViT (Triton path) and
    the eager reference (:class:`fastvit_kernels.reference.VisionTransformer`, naive softmax attention), each timed
    with ``triton.testing.do_bench`` (median, ms; autotuning happens in its first call, before timing).

    Returns: dict(device, model, dtype, batch, rows: [dict(impl, ms, images_per_s)], speedup (eager ms / FastViT
    ms), ok, message); an exception is a failure."""
    from triton.testing import do_bench

    from .bench.devices import device_name
    from .model import create_model

    device = torch.device(device)
    out = dict(device=device_name(device), model="vit_base_patch16_224", dtype=str(dtype).replace("torch.", ""),
               batch=batch, rows=[])
    try:
        torch.manual_seed(0)
        fast = create_model("vit_base_patch16_224", backend="triton").to(device=device, dtype=dtype)
        eager = reference.VisionTransformer(**get_config("vit_base_patch16_224")).to(device=device, dtype=dtype)
        eager.load_state_dict(fast.state_dict())
        x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        y = torch.randint(0, 1000, (batch,), device=device)
        for impl, m in (("FastViT", fast), ("eager reference", eager)):
            def fwd_bwd(m=m):
                m.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(m(x).float(), y).backward()
            ms = do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")
            out["rows"].append(dict(impl=impl, ms=round(ms, 3), images_per_s=round(batch / ms * 1e3, 1)))
        out["speedup"] = round(out["rows"][1]["ms"] / out["rows"][0]["ms"], 3)
        out.update(ok=True, message="")
    except Exception as err:
        out.update(ok=False, message=f"{type(err).__name__}: {err}")
    return out


def run_check(only=None, inject=None, emit=print) -> dict:
    """The whole ``--check`` in this process (see the module docstring): GPU when CUDA is available and the
    interpreter is off, else the interpreter on the CPU (``TRITON_INTERPRET=1`` must already be set there).

    Returns dict(device, device_name, mode, ops (rows of :func:`check_ops`), cuda_graph, speed (each a dict, or
    {"skipped": why}), seconds, ok)."""
    from .bench.devices import device_name

    t0 = time.perf_counter()
    gpu = torch.cuda.is_available() and not backend.interpreter_enabled()
    device = torch.device("cuda" if gpu else "cpu")
    result = dict(device=str(device), device_name=device_name(device),
                  mode="GPU" if gpu else "CPU, Triton interpreter")
    emit(f"check on {result['device_name']} ({result['mode']})")
    if not backend.triton_available():
        result.update(ops=[], cuda_graph={"skipped": "no triton"}, speed={"skipped": "no triton"}, ok=False,
                      seconds=0.0)
        emit("  FAIL triton is not installed: no kernel can run")
        return result
    models, dtypes = (GPU_MODELS, GPU_DTYPES) if gpu else ((CPU_MODEL,), CPU_DTYPES)
    emit("ops, forward + backward against the fp32 reference (fp16/bf16: at most 2x PyTorch's own error):")
    result["ops"] = check_ops(models, dtypes, device, only=only, inject=inject, emit=emit)
    ok = all(r["ok"] for r in result["ops"])
    if gpu:
        emit("CUDA graph: capture + replay of a training step (2 blocks of ViT-B/16, bf16, SGD) vs eager:")
        graph = check_cuda_graph(device)
        ok &= graph["ok"]
        emit(f"  {'ok  ' if graph['ok'] else 'FAIL'} " + (graph["message"] or
             f"max |replay - eager|: logits {graph['logits_error']:.2e}, loss {graph['loss_error']:.2e}, "
             f"parameters {graph['param_error']:.2e} ({graph['seconds']:.1f} s)"))
        speed = speed_table(device)
        ok &= speed["ok"]
        emit(f"speed on {speed['device']} (GPU, do_bench median): {speed['model']} forward + backward, "
             f"{speed['dtype']}, batch {speed['batch']}:")
        if speed["ok"]:
            for r in speed["rows"]:
                emit(f"  {r['impl']:<16} {r['ms']:9.2f} ms {r['images_per_s']:9.1f} images/s")
            emit(f"  FastViT speed-up over the eager reference: {speed['speedup']:.2f}x")
        else:
            emit(f"  FAIL {speed['message']}")
    else:
        graph = {"skipped": "no GPU (CUDA graphs need one)"}
        speed = {"skipped": "no GPU (no speed is measured on the CPU)"}
        emit(f"CUDA graph: skipped, {graph['skipped']}")
        emit(f"speed: skipped, {speed['skipped']}")
    result.update(cuda_graph=graph, speed=speed, ok=bool(ok), seconds=round(time.perf_counter() - t0, 1))
    emit(f"check {'passed' if ok else 'FAILED'} in {result['seconds']:.1f} s")
    if gpu and result["seconds"] > GPU_CHECK_TARGET_S:  # mostly compilation and autotuning: worth knowing
        emit(f"note: the GPU check took longer than its {GPU_CHECK_TARGET_S} s target")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring). Returns the exit status: 0, or 1 when ``--check`` failed."""
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.info",
                                     description="What runs where on this machine; --check runs every op on it.")
    parser.add_argument("--check", action="store_true",
                        help="run the ops forward + backward against the fp32 reference (GPU: bf16/fp16 at "
                             "ViT-B/16 and ViT-H/14, a CUDA-graph training step, a speed table; CPU: the Triton "
                             "interpreter on a small config); non-zero exit status on any failure")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--ops", nargs="+", choices=OP_NAMES, metavar="OP",
                        help=f"check only these ops (of {', '.join(OP_NAMES)})")
    parser.add_argument("--inject-error", choices=OP_NAMES, metavar="OP",
                        help="self-test of the checker: perturb OP's output before the comparison (must fail)")
    args = parser.parse_args(argv)

    if args.check and not torch.cuda.is_available() and not backend.interpreter_enabled():
        # the kernels must be defined under the interpreter: re-run in a process that has it from the start
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "fastvit_kernels.info", *argv],
                               env={**os.environ, "TRITON_INTERPRET": "1"})

    info = report()
    if not args.json:
        print(format_report(info), flush=True)
    check = None
    if args.check:
        emit = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
        check = run_check(only=args.ops, inject=args.inject_error, emit=emit)
    if args.json:
        print(json.dumps(dict(report=info, check=check), indent=2, default=str))  # str: a Path in the record
    return 0 if check is None or check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
