"""Build hook: compiles the native Ada-KV policy library (native/) with cffi.

Everything else about the package lives in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
