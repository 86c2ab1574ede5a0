"""Exceptions raised by adakv-local.

Every error a user can cause is raised as one of these (or a ``ValueError`` for a bad
argument), with a message that says what to do about it.
"""

from __future__ import annotations


class AdaKVError(RuntimeError):
    """Base class of adakv-local's runtime errors."""


class ModelError(AdaKVError):
    """The model file is missing, unreadable, not GGUF, or rejected by llama.cpp."""


class RuntimeBuildError(AdaKVError):
    """Building or installing the patched llama.cpp runtime failed."""


class ContextOverflowError(AdaKVError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the context window."""


class SessionError(AdaKVError):
    """A session file that cannot be loaded here: damaged, or saved with another model,
    runtime patch series, mode or Ada-KV configuration."""
