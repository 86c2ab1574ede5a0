"""Vanilla LocalLLM (kv_budget=None) on the real runtime and the real default model."""

from __future__ import annotations

import re
from pathlib import Path

import llama_cpp
import pytest

from adakv_local import AdaKVError, LocalLLM
from adakv_local.bindings import llama as R

QUESTION = "What is the capital of France? Answer in one sentence."
N_CTX = 1024


@pytest.fixture(scope="module")
def llm(default_model: Path):
    with LocalLLM(default_model, n_ctx=N_CTX, n_threads=2, seed=7) as m:
        yield m


def _llama_cpp_greedy(model: Path, messages: list[dict], max_tokens: int) -> str:
    ref = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=2, verbose=False,
                          flash_attn=True, seed=7)
    try:
        out = ref.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)
        return out["choices"][0]["message"]["content"]
    finally:
        ref.close()


def test_greedy_chat_equals_llama_cpp(llm: LocalLLM, default_model: Path) -> None:
    msgs = [{"role": "user", "content": QUESTION}]
    ours = llm.chat(msgs, max_tokens=48, temperature=0.0)
    # the same library, the same prompt in the same batch (n_batch 512), flash attention in
    # both: the same computation, so the same greedy text
    theirs = _llama_cpp_greedy(default_model, msgs, 48)
    text = ours["choices"][0]["message"]["content"]
    assert text == theirs
    assert "Paris" in text
    assert ours["object"] == "chat.completion"
    assert ours["choices"][0]["message"]["role"] == "assistant"
    u = ours["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0


def test_stream_chunks_concatenate_to_the_answer(llm: LocalLLM) -> None:
    msgs = [{"role": "user", "content": QUESTION}]
    full = llm.chat(msgs, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
    chunks = list(llm.chat(msgs, max_tokens=32, temperature=0.0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_multi_turn_reuses_cache_and_matches_fresh(llm: LocalLLM, default_model: Path) -> None:
    llm.reset()
    msgs = [{"role": "user", "content": "Name a fruit that is yellow."}]
    a1 = llm.chat(msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    msgs += [{"role": "assistant", "content": a1},
             {"role": "user", "content": "And one that is red?"}]
    before = llm.kv_stats()["reused_tokens"]
    a2 = llm.chat(msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    reused = llm.kv_stats()["reused_tokens"] - before
    assert reused >= 10, "the first turn's tokens should be reused, not prefilled again"
    with LocalLLM(default_model, n_ctx=N_CTX, n_threads=2) as fresh:
        b2 = fresh.chat(msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    assert a2 == b2


def test_edited_history_resets(llm: LocalLLM, default_model: Path) -> None:
    llm.reset()
    llm.chat([{"role": "user", "content": "Tell me about cats."}], max_tokens=8, temperature=0)
    edited = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Tell me about dogs."}]
    out = llm.chat(edited, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    with LocalLLM(default_model, n_ctx=N_CTX, n_threads=2) as fresh:
        ref = fresh.chat(edited, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert out == ref
    assert llm.tokens_in_cache[: len(llm.tokenize(llm.format_chat(edited), add_bos=False))] \
        == llm.tokenize(llm.format_chat(edited), add_bos=False)


def test_complete_and_stop(llm: LocalLLM) -> None:
    out = llm.complete("1, 2, 3, 4,", max_tokens=12, temperature=0.0)
    assert out["object"] == "text_completion"
    text = out["choices"][0]["text"]
    assert "5" in text
    stopped = llm.complete("1, 2, 3, 4,", max_tokens=12, temperature=0.0, stop=["6"])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert "6" not in stopped["choices"][0]["text"]
    assert text.startswith(stopped["choices"][0]["text"])


def test_seeded_sampling_is_reproducible(llm: LocalLLM) -> None:
    a = llm.chat(QUESTION, max_tokens=16, temperature=0.9, seed=123)
    b = llm.chat(QUESTION, max_tokens=16, temperature=0.9, seed=123)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_kv_stats_agree_with_llama_cpp_log(default_model: Path) -> None:
    R.clear_log()
    with LocalLLM(default_model, n_ctx=2048, n_threads=2) as m:
        lines = R.recent_log(50, r"llama_kv_cache: size")
        assert lines, "llama.cpp logs its KV size at context creation"
        mib = float(re.search(r"size\s*=\s*([\d.]+) MiB", lines[-1]).group(1))
        cells = int(re.search(r"\(\s*(\d+) cells", lines[-1]).group(1))
        m.chat(QUESTION, max_tokens=8, temperature=0)
        st = m.kv_stats()
    assert cells == st["n_ctx"]
    assert abs(st["bytes_allocated"] / 2**20 - mib) < 0.01
    assert st["vanilla_bytes"] == st["bytes_allocated"]
    # 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes = 23,040 bytes per token
    assert st["row_bytes_all_heads"] == 23040
    assert st["bytes_used"] == st["tokens_seen"] * 23040
    assert st["tokens_seen"] > 10


def test_close_and_context_manager(default_model: Path) -> None:
    with LocalLLM(default_model, n_ctx=128) as m:
        assert m.chat("Hi", max_tokens=1, temperature=0)["choices"]
    assert m._cache is None  # the context and its KV cache are freed
    with pytest.raises(AdaKVError, match="closed"):
        m.chat("Hi", max_tokens=1)
    m.close()  # idempotent
