"""The C++ op library as the package sees it: ``_C`` defines exactly the schemas the Python ops define, has a CPU
kernel for each, links with no undefined symbol; with ``_C`` loaded the package attaches its fakes, autograd and
Triton launchers to ``_C``'s definitions (``FASTVIT_LAUNCHER``), ``info`` says who serves each op; and a FastViT
exported with torch.export and packaged by AOTInductor runs in a fresh process that loads ``_C`` but never
imports fastvit_kernels, giving eager's logits."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import fastvit_kernels  # noqa: F401  (defines the Python ops in this process: the schemas to compare with)
from tests.csrc.conftest import ROOT, run_isolated

SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _python_schemas() -> dict[str, str]:
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastvit::")]
    return {n: str(getattr(torch.ops.fastvit, n).default._schema) for n in names}


def _with_package(library, **env) -> dict:
    """Environment of a process that imports fastvit_kernels from this checkout with ``library`` as its _C."""
    return {"PYTHONPATH": str(ROOT), "FASTVIT_C_LIBRARY": str(library), **env}


def test_cpp_schemas_equal_python_schemas_and_each_has_cpu_and_cuda_kernels(csrc_library):
    proc = run_isolated(f"""
        import json, torch
        torch.ops.load_library({str(csrc_library)!r})
        names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastvit::")]
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        print(json.dumps({{n: [str(getattr(torch.ops.fastvit, n).default._schema), has("fastvit::" + n, "CPU"),
                               has("fastvit::" + n, "CUDA")] for n in names}}))
    """)
    cpp = json.loads(proc.stdout.strip().splitlines()[-1])
    python = _python_schemas()
    assert len(python) == 22
    assert {n: s for n, (s, _, _) in cpp.items()} == python
    assert [n for n, (_, has_cpu, has_cuda) in cpp.items() if not (has_cpu and has_cuda)] == []


def test_library_links_without_undefined_symbols_and_without_python(csrc_library):
    """setup.py links with -Wl,--no-undefined (the link itself fails on a missing symbol); the library needs no
    libpython symbol (it is loaded with torch.ops.load_library, never imported) and no CUDA library."""
    needed = subprocess.run(["readelf", "-d", str(csrc_library)], capture_output=True, text=True,
                            check=True).stdout
    assert "libtorch_cpu.so" in needed and "libc10.so" in needed
    for lib in ("libpython", "libcuda", "libcudart", "libtorch_cuda", "libtorch_python"):
        assert lib not in needed, f"_C must not need {lib}:\n{needed}"
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(csrc_library)], capture_output=True, text=True,
                               check=True).stdout
    assert " Py" not in undefined and " _Py" not in undefined


def test_package_attaches_to_cpp_definitions(csrc_library):
    """launcher cpp: _C's CPU kernels serve the CPU, the Triton launchers CUDA; FastViT with backend='triton'
    runs the fused ops on the CPU through _C, forward and backward (the Python autograd formulas call _C's
    backward kernels), matching the eager model; fake tensors use the Python fakes. launcher triton: Python
    serves both devices, explicitly or by default under the Triton interpreter."""
    proc = run_isolated(f"""
        import json, torch
        import fastvit_kernels
        from fastvit_kernels import FastViT, _library
        from torch._subclasses.fake_tensor import FakeTensorMode
        assert _library.csrc_loaded() and _library.launcher() == "cpp"
        served = {{n: _library.serving(n) for n in ("fastvit::attention_fwd", "fastvit::layernorm_mlp_bwd")}}
        torch.manual_seed(0)
        cfg = {SMALL_VIT!r}
        fused = FastViT(**cfg, backend="triton")
        eager = FastViT(**cfg, backend="torch")
        eager.load_state_dict(fused.state_dict())
        x = torch.randn(2, 3, 32, 32)
        calls = []
        with torch.profiler.profile() as prof:
            out = fused(x)
        ops_run = sorted({{e.name for e in prof.events() if e.name.startswith("fastvit::")}})
        out.square().mean().backward()
        ref = eager(x)
        ref.square().mean().backward()
        grad_err = max((a.grad - b.grad).abs().max().item()
                       for a, b in zip(fused.parameters(), eager.parameters()))
        with FakeTensorMode():
            qkv = torch.empty(2, 7, 48)
            fake_out, fake_lse = torch.ops.fastvit.attention_fwd(qkv, 3, 0.25)
        print(json.dumps(dict(served=served, ops_run=ops_run, out_err=(out - ref).abs().max().item(),
                              grad_err=grad_err, fake=[list(fake_out.shape), list(fake_lse.shape)])))
    """, env=_with_package(csrc_library))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["served"] == {"fastvit::attention_fwd": {"CPU": "cpp", "CUDA": "triton"},
                             "fastvit::layernorm_mlp_bwd": {"CPU": "cpp", "CUDA": "triton"}}
    assert {"fastvit::patch_embed_fwd", "fastvit::attention_block_fwd", "fastvit::layernorm_mlp_fwd"} <= \
        set(got["ops_run"]), got["ops_run"]
    assert got["out_err"] < 1e-5 and got["grad_err"] < 1e-5, got
    assert got["fake"] == [[2, 7, 16], [2, 3, 7]]

    script = """
        import json, fastvit_kernels
        from fastvit_kernels import _library
        print(json.dumps([_library.launcher(), _library.serving("fastvit::attention_fwd")]))
    """
    both_triton = ["triton", {"CPU": "triton", "CUDA": "triton"}]
    proc = run_isolated(script, env=_with_package(csrc_library, FASTVIT_LAUNCHER="triton"))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == both_triton
    # under the Triton interpreter the default is triton: the CPU runs the Triton kernels, not _C's
    proc = run_isolated(script, env=_with_package(csrc_library, TRITON_INTERPRET="1"))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == both_triton


def test_launcher_errors_are_clear(csrc_library):
    with pytest.raises(AssertionError, match="FASTVIT_LAUNCHER=cpp but the C\\+\\+ op library"):
        run_isolated("import fastvit_kernels", env=_with_package("none", FASTVIT_LAUNCHER="cpp"))
    with pytest.raises(AssertionError, match="FASTVIT_LAUNCHER must be one of"):
        run_isolated("import fastvit_kernels", env=_with_package(csrc_library, FASTVIT_LAUNCHER="cuda"))
    with pytest.raises(AssertionError, match="FASTVIT_C_LIBRARY='/nonexistent/_C.so': no such file"):
        run_isolated("import fastvit_kernels", env=_with_package("/nonexistent/_C.so"))


def test_info_reports_the_library(csrc_library):
    proc = run_isolated("from fastvit_kernels.info import main; main(['--json'])", env=_with_package(csrc_library))
    info = json.loads(proc.stdout)["report"]["csrc"]
    assert info["loaded"] and info["path"] == str(csrc_library) and info["launcher"] == "cpp"
    assert len(info["ops"]) == 22 and all(who["CPU"] == "cpp" for who in info["ops"].values())


def test_exported_fastvit_runs_from_an_aoti_package_with_only_the_library(csrc_library, tmp_path):
    """torch.export of FastViT (inference; backend='triton' so the graph calls the fused fastvit::* ops, served
    on the CPU by _C) -> aoti_compile_and_package -> a fresh Python process that loads _C, never imports
    fastvit_kernels, and gives the eager model's logits; then the same package from a C++ program
    (AOTIModelPackageLoader, no Python at all)."""
    package, data = tmp_path / "fastvit.pt2", tmp_path / "io.pt"
    proc = run_isolated(f"""
        import json, torch
        from fastvit_kernels import FastViT
        torch.manual_seed(0)
        model = FastViT(**{SMALL_VIT!r}, backend="triton").eval()
        eager = FastViT(**{SMALL_VIT!r}, backend="torch").eval()
        eager.load_state_dict(model.state_dict())
        x = torch.randn(3, 3, 32, 32)
        ep = torch.export.export(model, (x,))
        targets = sorted({{str(n.target) for n in ep.graph.nodes if str(n.target).startswith("fastvit.")}})
        torch._inductor.aoti_compile_and_package(ep, package_path={str(package)!r})
        sin_input = torch.sin(torch.arange(3 * 3 * 32 * 32, dtype=torch.float32) * 0.001).reshape(3, 3, 32, 32)
        with torch.no_grad():
            torch.save((x, eager(x), eager(sin_input)), {str(data)!r})
        print(json.dumps(targets))
    """, env=_with_package(csrc_library))
    targets = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fastvit.attention_block_fwd.default" in targets and "fastvit.patch_embed_fwd.default" in targets
    proc = run_isolated(f"""
        import json, sys, torch
        torch.ops.load_library({str(csrc_library)!r})
        runner = torch._inductor.aoti_load_package({str(package)!r})
        x, expected, _ = torch.load({str(data)!r})
        logits = runner(x)
        assert "fastvit_kernels" not in sys.modules
        print(json.dumps(dict(shape=list(logits.shape), err=(logits - expected).abs().max().item())))
    """)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["shape"] == [3, 5] and got["err"] < 1e-5, got

    # and from C++: csrc/tools/run_pt2.cpp, built against the installed libtorch, loads _C and the package
    runner = tmp_path / "run_pt2"
    from torch.utils.cpp_extension import include_paths, library_paths

    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", str(ROOT / "csrc" / "tools" / "run_pt2.cpp"), "-o",
           str(runner), *(f"-I{p}" for p in include_paths()), *(f"-L{p}" for p in library_paths()),
           *(f"-Wl,-rpath,{p}" for p in library_paths()), "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    subprocess.run(cmd, check=True, capture_output=True)
    # libtorch dlopens its own libraries by name: the loader path must name torch/lib (README, "Deployment")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*library_paths(), env.get("LD_LIBRARY_PATH", "")])
    proc = subprocess.run([str(runner), str(csrc_library), str(package), "3", "32"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logits = torch.tensor([[float(v) for v in line.split()] for line in proc.stdout.strip().splitlines()])
    expected = torch.load(data, weights_only=False)[2]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_aot_trace_records_the_same_launches_with_the_library(csrc_library):
    """The AOT trace runs the ops' Python launchers (into its recorder) on CPU tensors: with _C loaded its CPU
    kernels must not take those calls (they would compute and launch nothing)."""
    script = """
        import json
        from fastvit_kernels import _library, aot
        jobs, _ = aot.trace([80], models=["vit_base_patch16_224"], dtypes=("fp16",), modes=("infer",), batches=(1,))
        print(json.dumps([_library.csrc_loaded(), sorted({(j.name, str(j.constexprs)) for j in jobs})]))
    """
    with_c = json.loads(run_isolated(script, env=_with_package(csrc_library)).stdout.strip().splitlines()[-1])
    without = json.loads(run_isolated(script, env=_with_package("none")).stdout.strip().splitlines()[-1])
    assert with_c[0] and not without[0]
    assert with_c[1] == without[1] and len(with_c[1]) >= 4, (with_c[1][:3], without[1][:3])
