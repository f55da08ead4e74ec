"""The package's import graph (docs/design.md, "Layers"): one-way, no cycle, and importing the package installs no
import hook."""

import ast
import pathlib
import subprocess
import sys

import fastvit_kernels

ROOT = pathlib.Path(fastvit_kernels.__file__).parent
PKG = "fastvit_kernels"
# modules every layer may import: they import nothing of the package above themselves
LEAVES = {f"{PKG}._env", f"{PKG}._checks", f"{PKG}._device", f"{PKG}._library"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every package module ``path`` imports, at module level or inside a function (lazy imports count)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if not mod.startswith(PKG):
                continue
            out.add(mod)  # "from .m import f" depends on m; "from . import x" on the package
            out.update(f"{mod}.{a.name}" for a in node.names if _exists(f"{mod}.{a.name}"))  # submodules named
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PKG))
    return {m for m in out if m != name}


def _exists(mod: str) -> bool:
    rel = pathlib.Path(*mod.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ importing its own submodules is not a dependency of those submodules on it
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_kernels_import_nothing_above_them():
    """kernels/ imports only kernels/ and the leaf modules (settings reach it from _env, not backend)."""
    for mod, deps in _graph().items():
        if mod.startswith(f"{PKG}.kernels"):
            upward = {d for d in deps if not d.startswith(f"{PKG}.kernels") and d not in LEAVES | {PKG}}
            assert not upward, f"{mod} imports {sorted(upward)}"
        if mod.startswith(f"{PKG}.ops"):
            upward = {d for d in deps if not d.startswith((f"{PKG}.kernels", f"{PKG}.ops"))
                      and d not in LEAVES | {PKG, f"{PKG}.backend", f"{PKG}.reference", f"{PKG}.accuracy"}}
            assert not upward, f"{mod} imports {sorted(upward)}"


def test_graph_sees_known_edges():
    """The parser itself works: edges that exist are found (a test that cannot fail is a defect)."""
    graph = _graph()
    assert f"{PKG}.kernels.matmul_tma" in graph[f"{PKG}.kernels.matmul"]
    assert f"{PKG}.kernels.fusion" in graph[f"{PKG}.kernels.matmul_tma"]
    assert f"{PKG}.kernels.gemm_impl" in graph[f"{PKG}.kernels.matmul"]  # a lazy import
    assert f"{PKG}.kernels.matmul" not in graph[f"{PKG}.kernels.matmul_tma"]


def test_import_installs_no_import_hook():
    code = ("import sys; n = len(sys.meta_path); h = list(sys.path_hooks); import fastvit_kernels; "
            "assert len(sys.meta_path) == n and sys.path_hooks == h, sys.meta_path; "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
