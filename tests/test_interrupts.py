"""Interrupted generations leave a LocalLLM usable and its cache consistent.

A stream abandoned with ``break``, a ``KeyboardInterrupt`` or another exception raised by
the consumer between chunks, and a ``KeyboardInterrupt`` raised *inside* the generation —
at every kind of point it can land: between two Python lines of the prefill, the sampling,
a compression, and right after ``llama_decode`` returns (where a SIGINT received during the
C call is delivered), before the token history is updated — on the real runtime and model,
vanilla and with a budget (full and chunked prefill). After each:

- the cache and the token history agree: vanilla, ``llama_memory_seq_pos_max`` is the last
  history position; Ada-KV, ``n_past`` is the history's length and every head's live
  positions are increasing, end at the last history position, and fit the head's capacity;
- ``kv_stats()`` says the same;
- the next ``chat()`` works, and gives exactly the answer of a fresh object that made the
  same calls without the interrupt (same tokens decoded in the same batches, so the same
  floats: this is an equality of two identical computations, not of two differently
  shaped ones);
- a stream left open is ended by the next call, and says so if read again.

Interrupts inside the generation are injected with ``sys.settrace`` (raising from the trace
function at the n-th line or return event of the package's code), so every landing point
is reproducible; one test also sends a real SIGINT from a timer thread.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adakv_local
from adakv_local import AdaKVError, LocalLLM
from adakv_local.bindings import ragged

PKG = str(Path(adakv_local.__file__).resolve().parent)
N_CTX, N_BATCH, THREADS = 512, 32, 1
MODES: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "ada": {"kv_budget": 48, "window": 8, "headroom": 8},
    "ada-chunked": {"kv_budget": 48, "window": 8, "headroom": 8, "prefill": "chunked",
                    "chunk": 40},
}
FACTS = " ".join(f"Box {i} is {c}." for i, c in enumerate(
    ["red", "blue", "green", "small", "large", "heavy", "round", "square"]))
MSGS1 = [{"role": "user", "content": FACTS + " Now describe the boxes in one sentence."}]
MSGS2 = [{"role": "user", "content": "Name two colours."}]
GEN1, GEN2 = 10, 6  # tokens generated for the interrupted request, and for the next one

needs_ragged = pytest.mark.skipif(not ragged.available(), reason="vanilla runtime")


def _mode_params() -> list[Any]:
    return [pytest.param(m, marks=needs_ragged) if m != "vanilla" else m for m in MODES]


def _new(default_model: Path, mode: str) -> LocalLLM:
    return LocalLLM(default_model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=THREADS, seed=0,
                    **MODES[mode])


def _text(out: Any) -> str:
    return str(out["choices"][0]["message"]["content"])


def _stream(llm: LocalLLM, msgs: list[dict], n: int = GEN1) -> Iterator[dict[str, Any]]:
    return llm.chat(msgs, max_tokens=n, temperature=0.0, stream=True)  # type: ignore[return-value]


def check_consistent(llm: LocalLLM) -> list[int]:
    """The raw cache state (read without any LocalLLM call, which would settle it first),
    then the public view; returns the token history."""
    cache = llm._cache
    assert cache is not None
    toks = list(cache.tokens)
    n = len(toks)
    rc = llm.ragged
    if rc is None:
        assert int(adakv_local.llm.C.llama_memory_seq_pos_max(cache.mem, 0)) == n - 1
    else:
        assert rc.n_past == n
        for il in range(llm.n_layer):
            lens, caps = rc.lengths(il), rc.capacities(il)
            assert (lens <= caps).all()
            for h in range(llm.n_head_kv):
                pos = rc.positions(il, h)
                assert len(pos) == lens[h]
                if n:
                    assert pos[-1] == n - 1 and pos[0] >= 0 and (np.diff(pos) > 0).all(), \
                        (il, h, pos[:3], pos[-3:], n)
                else:
                    assert len(pos) == 0
    st = llm.kv_stats()
    assert st["tokens_seen"] == n and llm.tokens_in_cache == toks
    assert (st["bytes_allocated"], st["bytes_used"]) == cache.kv_bytes()
    if rc is not None:
        assert st["rows_per_head"] == [rc.lengths(il).tolist() for il in range(llm.n_layer)]
    return toks


def _prompt_len(llm: LocalLLM, msgs: list[dict]) -> int:
    return len(llm.tokenize(llm.format_chat(msgs), add_bos=False))


@functools.cache
def reference_next(default_model: Path, mode: str, n_generated: int
                   ) -> tuple[str, list[int], int]:
    """What a fresh object answers to MSGS2 after MSGS1 with ``n_generated`` (>= 1) tokens
    read to its end: the op sequence an interrupted stream of that length made. Also its
    token state and compression count before MSGS2."""
    assert n_generated >= 1
    with _new(default_model, mode) as ref:
        ref.chat(MSGS1, max_tokens=n_generated, temperature=0.0)
        state = list(ref.tokens_in_cache)
        comp = int(ref.kv_stats().get("compressions", 0))
        return _text(ref.chat(MSGS2, max_tokens=GEN2, temperature=0.0)), state, comp


# ------------------------------------------------------------------------------- consumers


@pytest.mark.parametrize("mode", _mode_params())
@pytest.mark.parametrize("how", ["break", "KeyboardInterrupt", "callback error"])
def test_consumer_stops_the_stream(default_model: Path, mode: str, how: str) -> None:
    """Break after a few chunks, a KeyboardInterrupt or a user callback's exception in the
    consumer's loop: the stream stays open until the next call ends it; the next chat()
    gives the fresh object's answer, and the old stream says it was ended."""

    def on_chunk(i: int) -> None:  # the consumer's own code
        if i == 3 and how == "callback error":
            raise ValueError("the user's callback failed")
        if i == 3 and how == "KeyboardInterrupt":
            raise KeyboardInterrupt

    with _new(default_model, mode) as llm:
        p = _prompt_len(llm, MSGS1)
        s = _stream(llm, MSGS1)
        try:
            for i, _ in enumerate(s):
                on_chunk(i)
                if i == 3 and how == "break":
                    break
        except (ValueError, KeyboardInterrupt):
            pass
        toks = check_consistent(llm)
        n_gen = len(toks) - p
        assert 1 <= n_gen <= 3
        got = _text(llm.chat(MSGS2, max_tokens=GEN2, temperature=0.0))
        with pytest.raises(AdaKVError, match="ended by a chat"):
            next(s)
        check_consistent(llm)
        s.close()  # harmless now
    want, state, _ = reference_next(default_model, mode, n_gen)
    assert state == toks
    assert got == want


@pytest.mark.parametrize("mode", _mode_params())
def test_new_call_ends_an_open_stream(default_model: Path, mode: str) -> None:
    """A stream read half-way, then other calls: a non-stream chat(), a new stream, reset()
    each end the open stream; its generator is finalised (the sampler freed) at once."""
    with _new(default_model, mode) as fresh:
        ans = _text(fresh.chat(MSGS2, max_tokens=GEN2, temperature=0.0))
    with _new(default_model, mode) as llm:
        s1 = _stream(llm, MSGS1)
        next(s1), next(s1)
        assert _text(llm.chat(MSGS2, max_tokens=GEN2, temperature=0.0))
        assert not s1.open  # type: ignore[attr-defined]
        with pytest.raises(AdaKVError, match="ended by a chat"):
            next(s1)
        s2 = _stream(llm, MSGS1)
        next(s2)
        llm.reset()
        with pytest.raises(AdaKVError, match=r"ended by a reset\(\)"):
            next(s2)
        assert check_consistent(llm) == []
        s3 = _stream(llm, MSGS2, GEN2)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in s3)
        # after reset() a vanilla cache is a fresh one (same cells, same batches); an
        # Ada-KV one keeps its pools' capacities, which can change the padded attention
        # views of the last head, so only vanilla is compared
        assert text == ans if mode == "vanilla" else text
        with pytest.raises(StopIteration):  # a stream read to its end just ends
            next(s3)
        kv = llm.kv_stats()  # reading calls do not end a stream
        s4 = _stream(llm, MSGS2, GEN2)
        next(s4)
        llm.kv_stats(), llm.tokenize("x"), llm.tokens_in_cache  # noqa: B018
        assert s4.open and len(list(s4)) >= 1  # type: ignore[attr-defined]
        assert kv["tokens_seen"] > 0


# ------------------------------------------------------------------------------- injected


class Interrupter:
    """``sys.settrace`` hook: counts line and return events in the package's code (only the
    returns of the function named ``only``, when given); raises KeyboardInterrupt at event
    number ``at`` (1-based; None: only record them)."""

    def __init__(self, at: int | None = None, only: str | None = None) -> None:
        self.at, self.only, self.n = at, only, 0
        self.events: list[tuple[str, int, str]] = []
        self.where: tuple[str, int, str] | None = None

    def __enter__(self) -> Interrupter:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        if self.where is None and name.startswith(PKG) and not name.endswith(UNTRACED):
            return self._local
        return None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if self.where is not None:
            return None
        if event in ("line", "return"):
            here = (frame.f_code.co_filename[len(PKG) + 1:] + ":" + frame.f_code.co_name,
                    frame.f_lineno, event)
            if self.only is not None and (event != "return" or
                                          not here[0].endswith(self.only)):
                return self._local
            self.n += 1
            if self.at is None:
                self.events.append(here)
            elif self.n == self.at:
                self.where = here
                sys.settrace(None)
                raise KeyboardInterrupt(f"injected at {here}")
        return self._local


DECODE = "bindings/llama.py:decode"
UNTRACED = ("ragged.py", "policy.py", "modelfile.py")
"""Files whose lines are not traced: the numpy-heavy wrappers of the C libraries (tracing
them makes a request many times slower); interrupts still land between their calls."""


def _injection_points(events: list[tuple[str, int, str]], n_spread: int) -> list[int]:
    """Some returns of ``bindings.llama.decode`` (just after llama_decode came back, before
    the history update), plus ``n_spread`` events spread over the whole request."""
    decode = [i + 1 for i, e in enumerate(events) if e[0] == DECODE and e[2] == "return"]
    spread = np.linspace(1, len(events) - 8, n_spread).astype(int).tolist()
    return sorted(set(decode[:2] + decode[-1:] + spread))


@pytest.mark.parametrize("mode", _mode_params()[:2])  # vanilla, ada (full prefill)
def test_interrupt_anywhere_inside_the_generation(default_model: Path, mode: str) -> None:
    """A KeyboardInterrupt at 10 points spread over a whole request (prefill, compression,
    sampling, the stream's own code) and just after some decodes: the state is consistent
    at once, and the next chat() works and leaves it consistent. (Chunked prefill's extra
    compressions are interrupted in the test below.)"""
    with _new(default_model, mode) as llm:
        list(_stream(llm, MSGS1))  # first calls take other paths (the template compiles)
        llm.reset()
        with Interrupter() as rec:
            full = list(_stream(llm, MSGS1))
        assert full and rec.events
        places: set[str] = set()
        for at in _injection_points(rec.events, 10):
            llm.reset()  # each interrupted request from the same start
            with pytest.raises(KeyboardInterrupt), Interrupter(at) as inj:
                for _ in _stream(llm, MSGS1):
                    pass
            assert inj.where is not None
            places.add(inj.where[0])
            toks = check_consistent(llm)  # without any LocalLLM call in between
            assert _text(llm.chat(MSGS2, max_tokens=GEN2, temperature=0.0)) is not None
            after = check_consistent(llm)
            assert len(after) > _prompt_len(llm, MSGS2) and after[:3] == toks[:3] or not toks
    assert DECODE in places
    assert {w.split("/")[0] for w in places} >= {"cache", "generation", "bindings"}, places


@pytest.mark.parametrize("mode", _mode_params())
@pytest.mark.parametrize("n_gen", [1, 4])
def test_interrupt_after_a_decode_gives_the_fresh_answer(default_model: Path, mode: str,
                                                         n_gen: int) -> None:
    """A KeyboardInterrupt right after the llama_decode of generated token n_gen + 1, before
    the history knew of it: the token is undone, and the next chat() answers exactly like a
    fresh object that read a stream of n_gen tokens to its end."""
    with _new(default_model, mode) as llm:
        p = _prompt_len(llm, MSGS1)
        with _new(default_model, mode) as probe, Interrupter(only=DECODE) as rec:
            probe.prefill_tokens(probe.tokenize(probe.format_chat(MSGS1), add_bos=False))
        n_prefill = len(rec.events)  # the prompt's decodes (chunked: one per chunk part)
        assert n_prefill >= len(range(0, p, N_BATCH))
        with pytest.raises(KeyboardInterrupt), \
                Interrupter(n_prefill + n_gen + 1, only=DECODE) as inj:
            for _ in _stream(llm, MSGS1):
                pass
        assert inj.where is not None
        toks = check_consistent(llm)
        assert len(toks) == p + n_gen
        comp = int(llm.kv_stats().get("compressions", 0))
        got = _text(llm.chat(MSGS2, max_tokens=GEN2, temperature=0.0))
        check_consistent(llm)
    want, state, ref_comp = reference_next(default_model, mode, n_gen)
    assert state == toks
    assert comp == ref_comp  # no decode-time compression inside the undone step
    assert got == want


# ------------------------------------------------------------------------------- real SIGINT


def test_real_sigint_during_generation(default_model: Path) -> None:
    """A SIGINT from another thread while a long generation runs (it lands in llama_decode
    most of the time, where the KeyboardInterrupt waits for the C call to return)."""
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    armed = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        for mode in ("vanilla", "ada") if ragged.available() else ("vanilla",):
            with _new(default_model, mode) as llm:
                for delay in (0.05, 0.3, 0.6):
                    llm.reset()
                    armed.set()
                    timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
                    timer.start()
                    t0 = time.perf_counter()
                    try:
                        for _ in _stream(llm, MSGS1, 400):
                            pass
                    except KeyboardInterrupt:
                        pass
                    timer.join()
                    armed.clear()
                    assert time.perf_counter() - t0 < 60
                    check_consistent(llm)
                    assert _text(llm.chat(MSGS2, max_tokens=GEN2, temperature=0.0))
                    check_consistent(llm)
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, old)
