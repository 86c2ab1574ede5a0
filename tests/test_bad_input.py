"""Bad input gets a clear exception before any work, and the object keeps working.

One table of bad calls, run against a vanilla and an Ada-KV instance: after each refused
call the cache is exactly as before (same tokens, same bytes: no work was done) and a
short completion still works. Bad constructor arguments are refused before the model is
even looked for (a missing file would otherwise be the error).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adakv_local import ContextOverflowError, LocalLLM, ModelError
from adakv_local.bindings import ragged

N_CTX = 256
LONG = "tell me more " * 200  # about 600 tokens: over n_ctx


@pytest.fixture(scope="module", params=["vanilla", "ada"])
def llm(request: pytest.FixtureRequest, default_model: Path):
    if request.param == "ada" and not ragged.available():
        pytest.skip("vanilla runtime")
    kw = {"kv_budget": 64, "window": 16, "headroom": 16} if request.param == "ada" else {}
    with LocalLLM(default_model, n_ctx=N_CTX, n_threads=1, seed=1, **kw) as m:
        m.chat("Hello there.", max_tokens=4, temperature=0)  # a conversation in the cache
        yield m


U = {"role": "user", "content": "hi"}
CASES: list[tuple[str, Callable[[LocalLLM], Any], type[BaseException], str]] = [
    ("chat: prompt longer than n_ctx", lambda m: m.chat(LONG), ContextOverflowError,
     "context window holds"),
    ("chat: long conversation", lambda m: m.chat([U, {"role": "assistant", "content": LONG}, U]),
     ContextOverflowError, "drop_oldest"),
    ("complete: prompt longer than n_ctx", lambda m: m.complete(LONG), ContextOverflowError,
     "n_ctx"),
    ("max_tokens=0", lambda m: m.chat("hi", max_tokens=0), ValueError, "max_tokens"),
    ("max_tokens=-5", lambda m: m.chat("hi", max_tokens=-5), ValueError, "max_tokens"),
    ("max_tokens=1.5", lambda m: m.complete("hi", max_tokens=1.5), ValueError, "max_tokens"),
    ("max_tokens=True", lambda m: m.chat("hi", max_tokens=True), ValueError, "max_tokens"),
    ("stream, max_tokens=0", lambda m: m.chat("hi", max_tokens=0, stream=True), ValueError,
     "max_tokens"),
    ("no messages", lambda m: m.chat([]), ValueError, "non-empty"),
    ("empty prompt", lambda m: m.chat(""), ValueError, "empty"),
    ("a dict, not a list", lambda m: m.chat(U), ValueError, "non-empty list"),
    ("a list of strings", lambda m: m.chat(["hi"]), ValueError, "must be a dict"),
    ("no role", lambda m: m.chat([{"content": "hi"}]), ValueError, "role"),
    ("unknown role", lambda m: m.chat([{"role": "robot", "content": "hi"}]), ValueError,
     "unknown role 'robot'"),
    ("content: int", lambda m: m.chat([{"role": "user", "content": 42}]), ValueError,
     "content.*int"),
    ("content: None", lambda m: m.chat([{"role": "user", "content": None}]), ValueError,
     "content"),
    ("content: bytes", lambda m: m.chat([{"role": "user", "content": b"hi"}]), ValueError,
     "content.*bytes"),
    ("content: list", lambda m: m.chat([{"role": "user", "content": ["hi"]}]), ValueError,
     "content.*list"),
    ("complete: empty", lambda m: m.complete(""), ValueError, "non-empty string"),
    ("complete: not a string", lambda m: m.complete(["hi"]), ValueError, "string"),
    ("temperature", lambda m: m.chat("hi", temperature=-1), ValueError, "temperature"),
    ("top_p", lambda m: m.chat("hi", top_p=0), ValueError, "top_p"),
    ("stop", lambda m: m.chat("hi", stop=[3]), ValueError, "stop"),
    ("seed", lambda m: m.chat("hi", seed=-1), ValueError, "seed"),
    ("prefill: no tokens", lambda m: m.prefill_tokens([]), ContextOverflowError, "need 1"),
    ("prefill: n_ctx tokens", lambda m: m.prefill_tokens([5] * N_CTX), ContextOverflowError,
     "n_ctx"),
    ("prefill: invalid token", lambda m: m.prefill_tokens([1, 2, 10**6]), ValueError,
     "token ids"),
    ("decode: invalid token", lambda m: m.decode_token(-1), ValueError, "token ids"),
    ("append: invalid token", lambda m: m.append_tokens([7, "x"]), ValueError, "token ids"),
    ("append: nothing", lambda m: m.append_tokens([]), ValueError, "empty"),
    ("append: past n_ctx", lambda m: m.append_tokens([5] * N_CTX), ContextOverflowError,
     "exceed n_ctx"),
    ("rewind: negative", lambda m: m.rewind(-1), ValueError, "n_tokens"),
    ("rewind: past the end", lambda m: m.rewind(10**6), ValueError, "n_tokens"),
]


@pytest.mark.parametrize("name, call, exc, match", CASES, ids=[c[0] for c in CASES])
def test_refused_before_any_work(llm: LocalLLM, name: str, call: Callable[[LocalLLM], Any],
                                 exc: type[BaseException], match: str) -> None:
    before = (llm.tokens_in_cache, llm.kv_stats())
    with pytest.raises(exc, match=match):
        out = call(llm)
        if hasattr(out, "__next__"):
            next(out)  # a lazy stream must have been refused already
    after = (llm.tokens_in_cache, llm.kv_stats())
    assert after[0] == before[0], "the cache changed: work was done"
    for key in ("tokens_seen", "bytes_allocated", "bytes_used", "prefill_tokens",
                "decode_tokens"):
        assert after[1][key] == before[1][key], key
    out = llm.complete("The sky is", max_tokens=2, temperature=0)  # the object still works
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


BAD_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"kv_budget": N_CTX}, "not below n_ctx"),
    ({"kv_budget": 10_000}, "not below n_ctx"),
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": 2.5}, "kv_budget"),
    ({"n_ctx": 0}, "n_ctx"),
    ({"n_ctx": True}, "n_ctx"),
    ({"n_batch": 0}, "n_batch"),
    ({"n_threads": 0}, "n_threads"),
    ({"n_gpu_layers": -2}, "n_gpu_layers"),
    ({"seed": -1}, "seed"),
    ({"overflow": "truncate"}, "overflow"),
    ({"kv_budget": 64, "policy": "magic"}, "policy"),
    ({"policy": "snapkv"}, "only apply with a KV budget"),
]


@pytest.mark.parametrize("kwargs, match", BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
def test_bad_arguments_refused_before_the_model(tmp_path: Path, kwargs: dict[str, Any],
                                                match: str) -> None:
    missing = tmp_path / "not-there.gguf"
    base = {"n_ctx": N_CTX}
    with pytest.raises(ValueError, match=match):
        LocalLLM(missing, **{**base, **kwargs})
    with pytest.raises(ModelError, match="not found"):  # the same call, valid: the file
        LocalLLM(missing, **base)


def test_small_n_ctx_long_prompt(default_model: Path) -> None:
    """n_ctx below n_batch: llama.cpp lowers its batch size to n_ctx; a long prompt used to
    be fed in one batch of 512 and abort the process (GGML_ASSERT n_tokens <= n_batch)."""
    with LocalLLM(default_model, n_ctx=64, n_threads=1) as m:
        assert m.n_ctx == 256  # llama.cpp pads the context to 256
        out = m.complete("word " * 150, max_tokens=2, temperature=0)
        assert out["usage"]["prompt_tokens"] > 64
        assert m.kv_stats()["tokens_seen"] == out["usage"]["total_tokens"]
