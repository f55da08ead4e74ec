"""Install fastvit_kernels. Metadata and tool configuration live in pyproject.toml.

``FASTVIT_BUILD_CSRC=1 pip install --no-build-isolation -e .`` also builds the C++ op library
``fastvit_kernels._C`` from ``csrc/`` against the installed torch, with the system C++ compiler (README,
"The C++ op library"). Without that variable nothing is compiled and torch is not imported here.
"""

import glob
import os

from setuptools import setup

# torch's stable ABI version the library targets: one build loads into this torch release and later ones
TORCH_TARGET_VERSION = "0x020a000000000000"  # 2.10


def csrc_extensions() -> list:
    """The ``fastvit_kernels._C`` extension when ``FASTVIT_BUILD_CSRC=1``, else none."""
    if os.environ.get("FASTVIT_BUILD_CSRC", "0") != "1":
        return []
    from torch.utils.cpp_extension import CppExtension

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "**", "*.cpp"),
                                                                 recursive=True))
    sources = [s for s in sources if not s.startswith(os.path.join("csrc", "tools"))]  # programs, not the library
    return [CppExtension(
        "fastvit_kernels._C", sources,
        py_limited_api=True,  # loaded with torch.ops.load_library, never imported: no Python symbols needed
        extra_compile_args=["-O2", "-std=c++17", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
                            "-DPy_LIMITED_API=0x03090000"],
        extra_link_args=["-Wl,--no-undefined", "-ldl"],
    )]


def cmdclass() -> dict:
    if os.environ.get("FASTVIT_BUILD_CSRC", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


setup(ext_modules=csrc_extensions(), cmdclass=cmdclass())
