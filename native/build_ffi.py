"""cffi (out-of-line, API mode) builder for the native Ada-KV policy library.

Compiled at install time (setup.py -> ``cffi_modules``) into ``adakv_local.bindings._native``
from every ``native/*.c`` with ``-std=c99 -O2 -Wall -Wextra``. The cdef is the part of
``native/adakv.h`` between the ``CFFI-BEGIN`` and ``CFFI-END`` markers, so the header
stays the single source of truth for the C API.

Run directly (``python native/build_ffi.py``) to compile a module into the current
directory for quick experiments; the package itself is built by pip.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = HERE / "adakv.h"
BEGIN, END = "/* CFFI-BEGIN */", "/* CFFI-END */"
# Python's own CFLAGS (sysconfig) come first and include -fwrapv, which stops the
# compiler from vectorizing the int32-indexed hot loops (about 1.6x slower selection);
# the library never relies on signed overflow wrapping, so turn it back off.
COMPILE_ARGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-fno-wrapv"]


def _cdef() -> str:
    text = HEADER.read_text(encoding="utf-8")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:stop]


def _rel(path: Path) -> str:
    """A path relative to the working directory when possible (setuptools prefers it)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # e.g. another drive on Windows
        return str(path)


SOURCES = sorted(HERE.glob("*.c"))

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "adakv_local.bindings._native",
    '#include "adakv.h"\n',
    sources=[_rel(p) for p in SOURCES],
    include_dirs=[_rel(HERE)],
    depends=[_rel(HEADER), _rel(HERE / "adakv_internal.h")],
    extra_compile_args=COMPILE_ARGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
