"""Building the patched llama.cpp runtime: ``python -m adakv_local.build``.

:mod:`.runtime` downloads the pinned llama-cpp-python sdist, applies ``patches/``, builds
and caches the wheel and installs it. Imports nothing of the rest of the package (it runs
before llama_cpp exists).
"""
