"""Sessions: one ``LocalLLM`` (one llama.cpp context, one compressed KV cache) per
conversation, at most ``max_sessions`` in memory, least recently used evicted.

Matching a request to a session:

* an explicit session id (``X-Session-Id`` header or ``session_id`` field) picks that
  session, creating it when unknown;
* otherwise the request *continues* a session when that session's last prompt text is a
  prefix of the request's (the same conversation with new turns appended); among those,
  the one whose cached tokens share the longest prefix with the request wins — as
  ``LocalLLM`` itself chooses what to reuse. A request that continues no session gets a new
  one, so one conversation never takes over (and overwrites) another's cache.

Whatever the match, a session's ``LocalLLM`` reuses only the tokens its own cache holds
and that the request starts with; the rest is prefilled. A request is never answered from
another conversation's cache.

Threads: the pool's bookkeeping runs on the asyncio event loop (no locks needed there);
each session has its own worker thread, where its ``LocalLLM`` is created, used and closed,
and an ``asyncio.Lock`` that serializes its requests. Requests of different sessions run
concurrently: llama.cpp releases the GIL while it computes. Every ``LocalLLM`` of the
model shares its loaded weights (``adakv_local.bindings.shared_model``), so a session
costs its context and KV cache only.

Eviction saves the session with ``LocalLLM.save_session`` (when ``max_saved_sessions`` > 0)
and a returning conversation is loaded back with ``load_session``; a file that fails to
load is dropped and the conversation is prefilled again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..llm import LocalLLM

_STAT_KEYS = ("tokens_seen", "bytes_allocated", "bytes_used", "vanilla_bytes",
              "vanilla_bytes_for_tokens", "prefill_tokens", "decode_tokens", "reused_tokens",
              "cache_resets", "compressions", "rows_evicted")


def _prefix_len(a: list[int], b: list[int]) -> int:
    n, lim = 0, min(len(a), len(b))
    while n < lim and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Session:
    """One conversation's ``LocalLLM`` and what the pool knows about it.

    ``text``/``tokens``: the prompt of its latest request; ``cached``: the tokens its cache
    held after it; ``stats``: ``kv_stats()`` then (read on the session's own thread, so a
    report never touches a busy ``LocalLLM``).
    """

    id: str
    executor: ThreadPoolExecutor
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    llm: LocalLLM | None = None
    users: int = 0  # requests holding or waiting for the lock
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    last_used: int = 0
    created: float = field(default_factory=time.time)
    origin: str = "new"  # new | loaded (from a saved session) | reprefilled (file refused)
    closed: bool = False

    def report(self) -> dict[str, Any]:
        """This session's line in ``GET /v1/kv``."""
        return {"id": self.id, "busy": self.users > 0, "requests": self.requests,
                "origin": self.origin, "created": int(self.created),
                **{k: self.stats.get(k) for k in _STAT_KEYS if k in self.stats}}


@dataclass
class Saved:
    """An evicted session on disk."""

    id: str
    path: Path
    text: str
    cached: list[int]
    file_bytes: int
    last_used: int


class SessionPool:
    """The sessions of one server (create, match, evict, save, load, report).

    Args:
        factory: makes a new session's ``LocalLLM`` (called on that session's thread).
        anchor: a small ``LocalLLM`` of the same model, kept for the server's life: it holds
            the shared weights when no session exists and tokenizes requests for matching.
        max_sessions, session_dir, max_saved_sessions: see :class:`~.config.ServeConfig`.
    """

    def __init__(self, factory: Callable[[], LocalLLM], anchor: LocalLLM, *,
                 max_sessions: int, session_dir: str | Path | None,
                 max_saved_sessions: int) -> None:
        self.factory = factory
        self.anchor = anchor
        self.max_sessions = max_sessions
        self.max_saved = max_saved_sessions
        self._own_dir = session_dir is None
        self.dir = Path(session_dir) if session_dir is not None else Path(
            tempfile.mkdtemp(prefix="adakv-serve-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.live: dict[str, Session] = {}
        self.saved: dict[str, Saved] = {}
        self._clock = itertools.count(1)
        self._freed = asyncio.Condition()
        self.evictions = 0
        self.loads = 0

    # ------------------------------------------------------------------ matching
    def match(self, text: str, tokens: list[int]) -> Session | Saved | None:
        """The session ``text`` continues, longest shared token prefix first (a live one
        before a saved one at equal length); None when it continues none."""
        best: Session | Saved | None = None
        best_n = -1
        for s in [*self.live.values(), *self.saved.values()]:
            if s.closed if isinstance(s, Session) else False:
                continue
            if not s.text or not text.startswith(s.text):
                continue
            n = _prefix_len(s.cached or getattr(s, "tokens", []), tokens)
            if n > best_n or (n == best_n and isinstance(best, Saved)
                              and isinstance(s, Session)):
                best, best_n = s, n
        return best

    async def checkout(self, text: str, tokens: list[int],
                       session_id: str | None) -> Session:
        """The session for a request, its lock held (release with :meth:`checkin`)."""
        while True:
            if session_id is not None:
                found: Session | Saved | None = (self.live.get(session_id)
                                                 or self.saved.get(session_id))
            else:
                found = self.match(text, tokens)
            if isinstance(found, Session):
                s = found
                s.users += 1
                try:
                    await s.lock.acquire()
                except BaseException:
                    s.users -= 1
                    raise
                if s.closed:  # evicted while we waited (cannot happen with users > 0)
                    s.users -= 1
                    s.lock.release()
                    continue
            else:
                sid = found.id if found is not None else (
                    session_id or f"sess-{uuid.uuid4().hex[:16]}")
                s = await self._open(sid, found)
            s.last_used = next(self._clock)
            s.text, s.tokens = text, tokens  # claimed: a twin request waits for this one
            return s

    def checkin(self, s: Session, stats: dict[str, Any] | None) -> None:
        """Release ``s`` after a request; ``stats``: its ``kv_stats()`` and cached tokens
        (None when the request failed before reading them)."""
        if stats is not None:
            s.cached = stats.pop("_cached")
            s.stats = stats
            s.requests += 1
        s.users -= 1
        s.lock.release()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    # ------------------------------------------------------------------ life cycle
    async def run(self, s: Session, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(llm, *args)`` on the session's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(s.executor, fn, s.llm, *args)

    async def _open(self, sid: str, saved: Saved | None) -> Session:
        s = Session(sid, ThreadPoolExecutor(1, thread_name_prefix=f"adakv-{sid[:24]}"))
        s.users = 1
        await s.lock.acquire()  # free: returns at once
        self.live[sid] = s
        if saved is not None:
            del self.saved[sid]
        try:
            while len(self.live) > self.max_sessions:
                victim = self._lru_idle()
                if victim is None:
                    async with self._freed:
                        await self._freed.wait()
                    continue
                await self._evict(victim)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(s.executor, self._create, s, saved)
        except BaseException:
            self.live.pop(sid, None)
            s.closed = True
            s.users = 0
            s.lock.release()
            s.executor.shutdown(wait=False)
            if saved is not None:
                saved.path.unlink(missing_ok=True)
            raise
        return s

    def _create(self, s: Session, saved: Saved | None) -> None:
        """On the session's thread: the LocalLLM, with the saved cache when there is one."""
        s.llm = self.factory()
        if saved is not None:
            try:
                s.llm.load_session(saved.path)
                s.origin = "loaded"
                self.loads += 1
            except Exception as e:  # a refused file: prefill the conversation again
                print(f"adakv-local serve: session {s.id}: could not load its saved cache "
                      f"({e}); it will be prefilled again", file=sys.stderr)
                s.origin = "reprefilled"
            finally:
                saved.path.unlink(missing_ok=True)
        st = s.llm.kv_stats()
        st["_cached"] = s.llm.tokens_in_cache
        s.cached = st.pop("_cached")
        s.stats = st

    def _lru_idle(self) -> Session | None:
        idle = [s for s in self.live.values() if s.users == 0 and not s.closed]
        return min(idle, key=lambda s: s.last_used) if idle else None

    async def _evict(self, s: Session) -> None:
        """Drop ``s`` from memory, saving its cache first when sessions are kept."""
        s.closed = True
        del self.live[s.id]
        self.evictions += 1
        loop = asyncio.get_running_loop()
        saved = await loop.run_in_executor(s.executor, self._close, s, self.max_saved > 0)
        s.executor.shutdown(wait=False)
        if saved is not None:
            self.saved[s.id] = saved
            while len(self.saved) > self.max_saved:
                old = min(self.saved.values(), key=lambda x: x.last_used)
                del self.saved[old.id]
                old.path.unlink(missing_ok=True)

    def _close(self, s: Session, save: bool) -> Saved | None:
        llm, s.llm = s.llm, None
        if llm is None:
            return None
        try:
            if save and s.cached:
                path = self.dir / (hashlib.sha256(s.id.encode()).hexdigest()[:32] + ".adakv")
                try:
                    meta = llm.save_session(path)
                except Exception as e:  # disk full, ...: the session is dropped instead
                    print(f"adakv-local serve: session {s.id}: could not save its cache "
                          f"({e}); dropped", file=sys.stderr)
                    return None
                return Saved(s.id, path, s.text, list(s.cached),
                             int(meta.get("file_bytes", path.stat().st_size)), s.last_used)
            return None
        finally:
            llm.close()

    async def close(self) -> None:
        """Close every session and delete the saved ones (server shutdown)."""
        for s in list(self.live.values()):
            s.closed = True
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(s.executor, self._close, s, False)
            s.executor.shutdown(wait=True)
        self.live.clear()
        for sv in self.saved.values():
            sv.path.unlink(missing_ok=True)
        self.saved.clear()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """``GET /v1/kv``: every session's KV bytes against vanilla llama.cpp's, and the
        totals."""
        sessions = [s.report() for s in sorted(self.live.values(), key=lambda s: s.id)]

        def total(key: str) -> int:
            return sum(int(s.get(key) or 0) for s in sessions)

        return {
            "object": "kv.report",
            "max_sessions": self.max_sessions,
            "sessions": sessions,
            "totals": {k: total(k) for k in ("bytes_allocated", "bytes_used", "vanilla_bytes",
                                             "vanilla_bytes_for_tokens", "compressions")},
            "evictions": self.evictions,
            "loaded_from_disk": self.loads,
            "saved": {"count": len(self.saved),
                      "file_bytes": sum(s.file_bytes for s in self.saved.values()),
                      "ids": sorted(self.saved)},
        }
