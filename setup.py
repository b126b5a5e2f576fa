"""Metadata lives in setup.cfg; this file only declares the optional C kernels (align/_native.c).

Where no C compiler is found the build skips them and align/native.py falls back to numpy.
-ffp-contract=off keeps the compiler from fusing a multiply and an add into one rounding,
which would make the C results differ from numpy's in the last bit."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("align._native", ["align/_native.c"], optional=True,
                             extra_compile_args=["-O2", "-ffp-contract=off"])])
