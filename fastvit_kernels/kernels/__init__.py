"""Raw Triton kernels and their launchers: no autograd, no nn.Module (docs/design.md, "Layers").

These modules import triton and define ``@triton.jit`` functions, so the ops import them lazily, on the first
Triton launch: ``import fastvit_kernels`` neither imports triton nor queries a GPU, and ``TRITON_INTERPRET`` may
be set any time before that first launch.
"""
