"""One model, several threads, interrupted streams: how ``LocalLLM`` stays consistent.

A ``LocalLLM`` owns one llama.cpp context and one KV cache; two calls must never run on it
at the same time. :func:`serialized` makes the public methods of a class take the
instance's ``threading.RLock`` (reentrant: a method may call another), so two threads
calling ``chat()`` on one object get the answers they would get one after the other.

A stream (``chat(..., stream=True)``) is a :class:`Stream`: it takes the lock for each
chunk, not for its whole life, so a thread that abandons a stream half-way never blocks the
others. The price: a call that changes the cache (``chat``, ``complete``, ``reset``, the
token-level API, ...) ends any stream still open on the object, since the stream's next
token would be decoded after someone else's tokens. That stream then raises
:class:`~adakv_local.errors.AdaKVError` saying so, instead of silently stopping; a stream
whose consumer simply stopped (``break``) is closed the same way at the next call, or by
``close()``.

Exceptions: whatever escapes a method or a chunk (a ``KeyboardInterrupt`` between two
tokens, an exception from the consumer's own code, a llama.cpp error) is followed by the
cache's ``settle()``, which puts the token history and llama.cpp's memory back in
agreement; every call also settles first, in case the interrupt landed in the handler.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import AdaKVError

__all__ = ["LOCALLLM_ENDING", "LOCALLLM_LOCKED", "Stream", "ended_by", "serialized",
           "settle_quietly"]

_C = TypeVar("_C", bound=type)
ENDED = "done"

LOCALLLM_LOCKED = ("tokenize", "detokenize", "format_chat", "kv_stats", "tokens_in_cache",
                   "snapshot", "save_session")
"""``LocalLLM`` members that read the cache: they take the lock."""
LOCALLLM_ENDING = ("chat", "complete", "reset", "prefill_tokens", "decode_token",
                   "greedy_ids", "append_tokens", "rewind", "restore", "compress",
                   "load_session", "kvzip_scores", "close")
"""``LocalLLM`` members that change the cache: they take the lock and end an open stream."""


def ended_by(name: str) -> str:
    """What a stream ended by a ``name()`` call raises when read again."""
    return (f"this stream was ended by a {name}() call on the same LocalLLM before it "
            "finished; read a stream to its end (or close() it) first, or use one LocalLLM "
            "per concurrent conversation")


def settle_quietly(owner: Any) -> None:
    """``owner._cache.settle()`` if there is a cache, never raising (it runs while another
    exception is on its way out, and that one matters more)."""
    cache = getattr(owner, "_cache", None)
    if cache is not None:
        try:
            cache.settle()
        except Exception:  # pragma: no cover - a closed or failing context
            pass


class Stream(Iterator[dict[str, Any]]):
    """The chunks of one streamed generation, one lock-holding step at a time.

    Args:
        chunks: the generator of response chunks.
        lock: the owning object's lock.
        settle: called (under the lock) after an exception escaped a step.
    """

    def __init__(self, chunks: Iterator[dict[str, Any]], lock: threading.RLock,
                 settle: Callable[[], None]) -> None:
        self._chunks: Iterator[dict[str, Any]] | None = chunks
        self._lock = lock
        self._settle = settle
        self._ended: str | None = None  # ENDED, or why another call ended it

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        with self._lock:
            if self._ended is not None or self._chunks is None:
                if self._ended in (None, ENDED):
                    raise StopIteration
                raise AdaKVError(self._ended)
            try:
                return next(self._chunks)
            except StopIteration:
                self._finish(ENDED)
                raise
            except BaseException:
                self._finish(ENDED)
                self._settle()
                raise

    def close(self, reason: str | None = None) -> None:
        """Stop the generation now (its sampler is freed); ``reason`` (given when another
        call ends it) is what a later ``next()`` raises instead of ``StopIteration``."""
        with self._lock:
            if self._ended is None:
                self._finish(reason or ENDED)

    @property
    def open(self) -> bool:
        """Whether more chunks may come."""
        return self._ended is None

    def _finish(self, why: str) -> None:
        self._ended = why
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            getattr(chunks, "close", lambda: None)()


def serialized(*, locked: tuple[str, ...], ending: tuple[str, ...]) -> Callable[[_C], _C]:
    """Class decorator: the methods (and properties) named in ``locked`` and ``ending`` run
    under ``self._lock``; those in ``ending`` first end the open stream
    (``self._close_stream(name)``); an exception escaping any of them is followed by
    :func:`settle_quietly`. Names the class lacks are skipped."""

    def wrap(fn: Callable[..., Any], name: str, ends: bool) -> Callable[..., Any]:
        @functools.wraps(fn)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if ends:
                    self._close_stream(name)
                try:
                    return fn(self, *args, **kwargs)
                except BaseException:
                    settle_quietly(self)
                    raise

        return method

    def decorate(cls: _C) -> _C:
        for names, ends in ((locked, False), (ending, True)):
            for name in names:
                attr = cls.__dict__.get(name)
                if isinstance(attr, property) and attr.fget is not None:
                    setattr(cls, name, property(wrap(attr.fget, name, ends), attr.fset,
                                                attr.fdel, attr.__doc__))
                elif callable(attr):
                    setattr(cls, name, wrap(attr, name, ends))
        return cls

    return decorate
