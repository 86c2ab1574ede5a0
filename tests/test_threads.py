"""Threads sharing one LocalLLM: calls are serialized, answers are those of sequential runs.

``LocalLLM`` takes a reentrant lock in every public method; a stream takes it for each
chunk (generation/serial.py). Checked on the real runtime and model, vanilla and Ada-KV:

- two threads calling ``chat()`` at the same time get exactly the answers of the same calls
  made one after the other. Exactly, because the conversations are built so that any two
  share their first N_BATCH tokens and differ at the next one: whichever ran before, a call
  reuses the same 32 cached rows (computed from the same tokens in the same batch) and
  prefills the rest from position 32 in the same batches, so every float is computed the
  same way in both runs (with no eviction: the prompts are under the budget);
- with compression on (prompts over the budget) and four threads mixing chat, streams,
  kv_stats, tokenize and reset, nothing fails but the documented error of a stream ended
  by another thread's call, and the cache is consistent at the end;
- a thread that abandons a stream half-way blocks no one; a stream cut by another thread's
  call raises a clear AdaKVError at its next chunk.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_interrupts import check_consistent

from adakv_local import AdaKVError, LocalLLM
from adakv_local.bindings import ragged

N_BATCH, THREADS, GEN = 32, 1, 8
MODES: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "ada": {"kv_budget": 160, "window": 16, "headroom": 16},  # the prompts fit: no eviction
}
TOPICS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot"]


def _params() -> list[Any]:
    return ["vanilla", pytest.param("ada", marks=pytest.mark.skipif(
        not ragged.available(), reason="vanilla runtime"))]


def _new(default_model: Path, mode: str, **kw: Any) -> LocalLLM:
    return LocalLLM(default_model, n_ctx=512, n_batch=N_BATCH, n_threads=THREADS, seed=0,
                    **{**MODES[mode], **kw})


def _conversations(llm: LocalLLM) -> list[list[dict[str, str]]]:
    """Six conversations whose prompts share exactly their first N_BATCH tokens."""
    def convs(system: str) -> list[list[dict[str, str]]]:
        return [[{"role": "system", "content": system},
                 {"role": "user", "content": f"{t} team: name one animal."}] for t in TOPICS]

    def common(cs: list[list[dict[str, str]]]) -> int:
        toks = [llm.tokenize(llm.format_chat(c), add_bos=False) for c in cs]
        n = 0
        while all(len(t) > n and t[n] == toks[0][n] for t in toks):
            n += 1
        return n

    for k in range(0, 40):
        for j in range(4):  # " Be kind." is a few tokens, " Now" one
            cs = convs("You answer in a few words." + " Be kind." * k + " Now" * j)
            n = common(cs)
            if n == N_BATCH:
                return cs
    raise AssertionError("no system prompt gives a common prefix of exactly N_BATCH tokens")


def _answer(llm: LocalLLM, conv: list[dict[str, str]]) -> str:
    out = llm.chat(conv, max_tokens=GEN, temperature=0.0)
    return str(out["choices"][0]["message"]["content"])


def _run_threads(targets: list[Any], timeout: float = 300.0) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(t)) for t in targets]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


def _two_threads(llm: LocalLLM) -> tuple[list[str], list[str]]:
    """The same five calls sequentially, then from two threads at once: (threaded, sequential)
    answers."""
    convs = _conversations(llm)
    _answer(llm, convs[0])  # a warm cache holding another conversation's prefix
    want = [_answer(llm, c) for c in convs[1:]]  # sequential, in one order
    _answer(llm, convs[0])
    got: dict[int, str] = {}
    start = threading.Barrier(2)

    def worker(ids: list[int]) -> None:
        start.wait()
        for i in ids:
            got[i] = _answer(llm, convs[i])

    _run_threads([lambda: worker([1, 3, 5]), lambda: worker([2, 4])])
    return [got.get(i, "") for i in range(1, 6)], want


@pytest.mark.parametrize("mode", _params())
def test_two_threads_get_the_sequential_answers(default_model: Path, mode: str) -> None:
    with _new(default_model, mode) as llm:
        got, want = _two_threads(llm)
        assert got == want and all(want)
        check_consistent(llm)
        assert llm.kv_stats()["reused_tokens"] >= 5 * N_BATCH  # all reused the prefix


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_without_the_lock_the_same_run_breaks(default_model: Path) -> None:
    """The check above can fail: the same two-thread run with the lock replaced by a no-op
    (in a subprocess: it may crash) corrupts answers or the cache, or dies."""
    import subprocess

    broken = []
    for _ in range(3):
        p = subprocess.run([sys.executable, __file__, "--unlocked", str(default_model)],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        broken.append(p.returncode != 0 or p.stdout.strip().splitlines()[-1:] != ["same"])
        if broken[-1]:
            break
    assert any(broken), "two unlocked threads gave the sequential answers three times"


@pytest.mark.parametrize("mode", _params())
def test_abandoned_and_cut_streams(default_model: Path, mode: str) -> None:
    """Thread A reads two chunks of a stream and walks away: B's chat() finishes (no
    deadlock). Thread A then reads a stream slowly while B calls chat(): A's next chunk
    raises AdaKVError naming the cause; B's answer is the sequential one."""
    with _new(default_model, mode) as llm:
        convs = _conversations(llm)
        _answer(llm, convs[0])
        want = _answer(llm, convs[2])
        _answer(llm, convs[0])
        kept: list[Any] = []

        def abandon() -> None:
            s = llm.chat(convs[1], max_tokens=50, temperature=0.0, stream=True)
            next(s), next(s)  # type: ignore[call-overload]
            kept.append(s)  # still referenced, never closed

        _run_threads([abandon])
        got: list[str] = []
        _run_threads([lambda: got.append(_answer(llm, convs[2]))], timeout=120)
        with pytest.raises(AdaKVError, match="ended by a chat"):
            next(kept[0])

        _answer(llm, convs[0])
        reading, cut = threading.Event(), threading.Event()
        outcome: list[str] = []

        def slow_reader() -> None:
            s = llm.chat(convs[3], max_tokens=200, temperature=0.0, stream=True)
            try:
                for i, _ in enumerate(s):  # type: ignore[arg-type]
                    if i == 1:
                        reading.set()
                        cut.wait(60)
            except AdaKVError as e:
                outcome.append(str(e))

        def interrupter() -> None:
            reading.wait(60)
            got.append(_answer(llm, convs[2]))
            cut.set()

        _run_threads([slow_reader, interrupter])
        assert outcome and "ended by a chat() call" in outcome[0]
        check_consistent(llm)
    assert got == [want, want]


@pytest.mark.skipif(not ragged.available(), reason="vanilla runtime")
def test_four_threads_with_compression(default_model: Path) -> None:
    """Prompts over the budget (every chat compresses), four threads mixing calls."""
    facts = " ".join(f"Item {i} is {c}." for i, c in enumerate(["red", "blue", "green"] * 8))
    with _new(default_model, "ada", kv_budget=48, window=8, headroom=8) as llm:
        ended: list[str] = []

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for step in range(6):
                what = rng.choice(("chat", "chat", "stream", "stats", "tokenize", "reset"))
                conv = [{"role": "user", "content": f"{facts} Question {seed}.{step}: "
                                                    "which item is blue?"}]
                if what == "chat":
                    assert _answer(llm, conv) is not None
                elif what == "stream":
                    try:
                        for i, _ in enumerate(llm.chat(conv, max_tokens=GEN, stream=True,
                                                       temperature=0.0)):  # type: ignore
                            if i == rng.randrange(1, 4):
                                break  # half-read: the next call ends it
                    except AdaKVError as e:
                        assert "ended by a" in str(e)
                        ended.append(str(e))
                elif what == "stats":
                    st = llm.kv_stats()  # a consistent snapshot, even mid-way
                    assert st["bytes_used"] <= st["bytes_allocated"]
                    assert all(max(h) <= st["tokens_seen"] for h in st["rows_per_head"])
                elif what == "tokenize":
                    assert llm.tokenize("hello")
                else:
                    llm.reset()

        _run_threads([lambda s=s: worker(s) for s in range(4)], timeout=600)
        toks = check_consistent(llm)
        st = llm.kv_stats()
        assert st["compressions"] >= 1
        if toks:
            assert max(max(h) for h in st["rows_per_head"]) <= len(toks)
        assert _answer(llm, [{"role": "user", "content": "Say hi."}])
        check_consistent(llm)


if __name__ == "__main__" and sys.argv[1:2] == ["--unlocked"]:  # the control run above
    with _new(Path(sys.argv[2]), "vanilla") as m:
        m._lock = _NoLock()  # type: ignore[assignment]
        try:
            g, w = _two_threads(m)
            check_consistent(m)
            print("same" if g == w else f"different: {g} vs {w}")
        except BaseException as e:  # noqa: BLE001
            print(f"failed: {type(e).__name__}: {e}")
