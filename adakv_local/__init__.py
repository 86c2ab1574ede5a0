"""adakv-local: local GGUF inference with Ada-KV head-wise adaptive KV-cache eviction.

>>> from adakv_local import LocalLLM
>>> llm = LocalLLM("smollm2-135m")            # a registry name or a path to a .gguf file
>>> llm.chat("Hello!")["choices"][0]["message"]["content"]
>>> llm.kv_stats()["bytes_allocated"]

``LocalLLM`` (which needs the patched llama.cpp runtime) is imported lazily, so the policy
library (``adakv_local.bindings.policy``) and the tools work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AdaKVError,
    ContextOverflowError,
    ModelError,
    RuntimeBuildError,
    SessionError,
)

__version__ = "0.1.0"
__all__ = [
    "AdaKVError",
    "ContextOverflowError",
    "LocalLLM",
    "ModelError",
    "RuntimeBuildError",
    "SessionError",
    "__version__",
]

if TYPE_CHECKING:
    from .llm import LocalLLM


def __getattr__(name: str) -> Any:
    if name == "LocalLLM":
        from .llm import LocalLLM

        return LocalLLM
    raise AttributeError(f"module 'adakv_local' has no attribute {name!r}")
