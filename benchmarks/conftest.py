"""Benchmarks run without the Triton interpreter: on a CPU-only machine FastViT takes its eager path."""
