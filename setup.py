"""Install fastvit_kernels. Metadata and tool configuration live in pyproject.toml."""

from setuptools import setup

setup()
