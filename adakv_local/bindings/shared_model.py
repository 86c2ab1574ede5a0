"""Loaded llama.cpp models shared by every ``LocalLLM`` of the same file in a process.

A ``llama_model`` is read-only once loaded, and llama.cpp lets any number of contexts (each
with its own KV cache) run on one model, from different threads. Loading the default model
costs about 110 MB of RSS each time (the CPU backend copies the weights out of the mmap), so
eight ``LocalLLM`` objects of one file — eight server sessions — would hold eight copies.
:func:`acquire` loads a file once and counts its users; :func:`release` frees the model when
the last one is done. Key: the file (path, device, inode, size, mtime) and ``n_gpu_layers``,
so a file rewritten in place is loaded afresh.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from . import llama as R

_LOCK = threading.Lock()
_MODELS: dict[tuple[object, ...], list[Any]] = {}  # key -> [model pointer, users]
_KEYS: dict[int, tuple[object, ...]] = {}  # model pointer -> key


def _key(path: Path, n_gpu_layers: int) -> tuple[object, ...]:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            n_gpu_layers)


def acquire(path: Path, n_gpu_layers: int) -> Any:
    """The loaded model of ``path`` (loading it when no one holds it); every call must be
    paired with one :func:`release`. ModelError (from :func:`llama.load_model`) when the
    file cannot be loaded."""
    key = _key(path, n_gpu_layers)
    with _LOCK:
        entry = _MODELS.get(key)
        if entry is None:
            model = R.load_model(path, n_gpu_layers)
            entry = _MODELS[key] = [model, 0]
            _KEYS[int(model)] = key
        entry[1] += 1
        return entry[0]


def release(model: Any) -> None:
    """Drop one user of ``model``; the last one frees it (``llama_model_free``)."""
    with _LOCK:
        key = _KEYS.get(int(model))
        if key is None:  # not from acquire(): the caller owns it alone
            R.C.llama_model_free(model)
            return
        entry = _MODELS[key]
        entry[1] -= 1
        if entry[1] <= 0:
            del _MODELS[key], _KEYS[int(model)]
            R.C.llama_model_free(model)


def loaded() -> dict[str, int]:
    """Models loaded now: resolved path -> number of users (for reports and tests)."""
    with _LOCK:
        out: dict[str, int] = {}
        for key, (_, users) in _MODELS.items():
            out[str(key[0])] = out.get(str(key[0]), 0) + users
        return out
