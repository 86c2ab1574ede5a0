"""LocalLLM with Ada-KV (kv_budget=...) end to end, on the real patched runtime and model."""

from __future__ import annotations

from pathlib import Path

import pytest

from adakv_local import LocalLLM
from adakv_local.bench.tasks import passkey
from adakv_local.bindings import ragged

pytestmark = pytest.mark.skipif(
    not ragged.available() or not hasattr(ragged.RaggedContext, "compact"),
    reason="the installed libllama lacks the ragged KV patch (run `make setup`)",
)

# Seeded passkey prompts (~1.8K tokens, essays haystack, three depths) that vanilla answers
# correctly; the 135M model misses most other seeds even with its full cache. Measured
# retention on these four with LocalLLM's defaults (ada-snapkv, causal pooling, kernel 11):
# budget 64: 0/4, 128: 1/4, 256: 3/4, 320: 4/4, 384: 4/4, 512: 3/4; with the official
# centered kernel-7 pooling: 0/4, 1/4, 2/4, -, -, 4/4. The one miss at 256 (and 512) is
# (0.25, 7): the answer becomes "the pass key is the pass key is" (the model copies "is the"
# from the question instead of the key). It is a coin flip for the model itself: with the full
# cache the key's first token leads " the" by only 0.195 nats (p 0.216 vs 0.178, the smallest
# lead of the four; it is the one seed of 20 at depth 0.25 that vanilla answers), at 256 rows
# by 0.004 nats (0.1782 vs 0.1776), and the teacher-forced and greedy paths disagree on it in
# both directions (384 rows: -0.13 nats yet answered; 512: +0.047 yet missed). Kernels 9, 13,
# 15, alpha 0.5 and uniform snapkv all answer it at 256. benchmarks/passkey_margin.py measures
# this (results/passkey_margin.json); docs/NOTES.md "Causal pooling".
PASSKEY_CASES = [(0.25, 7), (0.5, 26), (0.75, 0), (0.75, 1)]
THREADS = 2


def _answer(llm: LocalLLM, messages: list[dict], n: int = 12) -> str:
    out = llm.chat(messages, max_tokens=n, temperature=0.0)
    return out["choices"][0]["message"]["content"]


def _row_bytes_per_head(llm: LocalLLM) -> int:
    return 2 * (llm.head_dim_k + llm.head_dim_v)


def test_short_prompt_identical_to_vanilla(default_model: Path) -> None:
    """Under the budget nothing is evicted: greedy output equals vanilla's.

    Exact text equality holds because the logits agree to rounding (tests/test_ragged_exact.py:
    relative L2 < 1e-3, the same flash-attention kernel on views padded like vanilla's, see
    POOL_ALIGN) and this answer has no near tie; it is not a bitwise float comparison."""
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    with LocalLLM(default_model, n_ctx=1024, n_threads=THREADS) as v:
        ref = _answer(v, msgs, 40)
    with LocalLLM(default_model, kv_budget=256, n_ctx=1024, n_threads=THREADS) as a:
        got = _answer(a, msgs, 40)
        st = a.kv_stats()
    assert got == ref
    assert st["rows_evicted"] == 0


def test_full_prefill_drops_to_budget(default_model: Path) -> None:
    budget, headroom = 256, 64
    s = passkey(4000, 0.5, 0, source="filler")
    with LocalLLM(default_model, kv_budget=budget, headroom=headroom, n_ctx=8192,
                  n_threads=THREADS) as llm:
        llm.chat(s.messages(), max_tokens=4, temperature=0)
        st = llm.kv_stats()
        per_head = _row_bytes_per_head(llm)
        n_heads = llm.n_layer * llm.n_head_kv
    assert st["tokens_seen"] > 3500
    assert st["compressions"] >= 1 and st["rows_evicted"] > 0
    # every layer holds n_head_kv * budget rows (+/- rounding), each head + headroom
    decoded = st["decode_tokens"]  # appended to every head after the compression
    for lens in st["rows_per_head"]:
        assert abs(sum(lens) - 3 * (budget + decoded)) <= 3  # +/- rounding of the caps
    assert st["bytes_allocated"] <= n_heads * (budget + headroom + 4) * per_head
    assert st["bytes_allocated"] < st["vanilla_bytes_for_tokens"] / 8
    assert st["peak_bytes_allocated"] >= st["tokens_seen"] * n_heads * per_head * 0.9


def test_chunked_prefill_bounded_memory(default_model: Path) -> None:
    budget, chunk, headroom = 128, 256, 32
    s = passkey(8 * budget * 1, 0.5, 0, source="filler")
    with LocalLLM(default_model, kv_budget=budget, prefill="chunked", chunk=chunk,
                  headroom=headroom, n_ctx=4096, n_threads=THREADS) as llm:
        tokens = len(llm.tokenize(llm.format_chat(s.messages()), add_bos=False))
        assert tokens >= 8 * budget
        llm.chat(s.messages(), max_tokens=4, temperature=0)
        st = llm.kv_stats()
    bound = llm.n_head_kv * (budget + chunk) + llm.n_head_kv * headroom
    assert st["compressions"] >= tokens // chunk - 1
    assert 0 < st["peak_layer_rows"] <= bound, (st["peak_layer_rows"], bound)


def test_multi_turn_memory_stays_flat(default_model: Path) -> None:
    budget = 128
    turns = [f"Fact {i}: the {w} is {c}. Repeat the fact." for i, (w, c) in enumerate(
        [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("sea", "deep"),
         ("snow", "white"), ("coal", "black"), ("rose", "red"), ("lime", "sour"),
         ("salt", "salty"), ("ice", "cold")])]
    sizes_ada, sizes_vanilla, seen = [], [], []
    msgs: list[dict] = []
    with LocalLLM(default_model, kv_budget=budget, n_ctx=4096, n_threads=THREADS) as llm, \
            LocalLLM(default_model, n_ctx=4096, n_threads=THREADS) as van:
        for t in turns:
            msgs.append({"role": "user", "content": t})
            a = _answer(llm, msgs, 24)
            _answer(van, msgs, 24)
            msgs.append({"role": "assistant", "content": a})
            st = llm.kv_stats()
            sizes_ada.append(st["bytes_allocated"])
            seen.append(st["tokens_seen"])
            sizes_vanilla.append(van.kv_stats()["bytes_used"])
            assert st["reused_tokens"] > 0 or len(msgs) == 2
    over = next(i for i, n in enumerate(seen) if n > budget + 64)
    flat = sizes_ada[over + 1:]
    # flat up to Ada-KV's per-turn rounding of the head caps (a few rows of 30x3 heads)
    assert flat and max(flat) - min(flat) <= 0.01 * max(flat), sizes_ada
    assert max(flat) <= 1.01 * sizes_ada[over] and sizes_ada[0] > 2 * max(flat)
    assert all(b > a for a, b in zip(sizes_vanilla, sizes_vanilla[1:], strict=False))
    assert sizes_ada[-1] < sizes_vanilla[-1]


def test_passkey_retained_with_ada_kv(default_model: Path) -> None:
    samples = [passkey(2000, depth, seed, source="essays") for depth, seed in PASSKEY_CASES]
    with LocalLLM(default_model, n_ctx=4096, n_threads=THREADS) as v:
        for s in samples:
            assert s.correct(_answer(v, s.messages())), "vanilla must answer this seeded case"
    kept: dict[int, list[bool]] = {}
    for budget in (256, 384):
        with LocalLLM(default_model, kv_budget=budget, policy="ada-snapkv", n_ctx=4096,
                      n_threads=THREADS) as a:
            kept[budget] = []
            for s in samples:
                a.reset()  # each prompt on its own (a shared prefix would reuse evictions)
                kept[budget].append(s.correct(_answer(a, s.messages())))
                assert a.kv_stats()["rows_evicted"] > 0
    print(f"\npasskeys answered: {({b: f'{sum(k)}/{len(k)}' for b, k in kept.items()})}")
    # The first case is a near-tie for the model itself (full cache: the key leads the next
    # token by 0.195 nats; README "passkey_margin"): since decode over unequal heads runs the
    # fused kernel (closer to the float reference: oracle KL 4e-6 vs flash attention's
    # 2.5e-5) it flips at 384 rows as it already did at 256. The three clear cases must hold.
    assert all(kept[384][1:]) and all(kept[256][1:]), kept
    assert sum(kept[384]) >= 3 and sum(kept[256]) >= 3, kept


def test_decode_compresses_when_full_and_grow_mode(default_model: Path) -> None:
    text = " ".join(f"Item {i} is a {c} box." for i, c in enumerate(
        ["red", "blue", "green", "small", "large", "heavy"] * 6))
    msgs = [{"role": "user", "content": text + "\nNow count from 1 to 100, with commas."}]
    with LocalLLM(default_model, kv_budget=64, headroom=16, window=16, n_ctx=2048,
                  n_threads=THREADS) as llm:
        out = llm.greedy_ids(llm.tokenize(llm.format_chat(msgs), add_bos=False), 120)
        st = llm.kv_stats()
    assert len(out) == 120
    assert st["tokens_seen"] > 64 + 120
    assert st["compressions"] >= 1 + 120 // 16 - 1
    # heads share a layer's budget unevenly: bound the layer, not the head
    assert max(sum(h) for h in st["capacity_per_head"]) <= 3 * (64 + 16) + 3
    with LocalLLM(default_model, kv_budget=64, headroom=16, window=16, on_full="grow",
                  n_ctx=2048, n_threads=THREADS) as llm:
        llm.greedy_ids(llm.tokenize(llm.format_chat(msgs), add_bos=False), 120)
        st = llm.kv_stats()
    assert st["compressions"] == 1  # after the prefill only; decoding grows the cache
    assert max(max(h) for h in st["rows_per_head"]) > 64 + 16


def test_kv_stats_and_stream(default_model: Path) -> None:
    with LocalLLM(default_model, kv_budget=64, window=16, n_ctx=2048,
                  n_threads=THREADS) as llm:
        chunks = list(llm.chat("Tell me a short story about a cat.", max_tokens=80,
                               temperature=0, stream=True))
        st = llm.kv_stats()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text
    for key in ("policy", "rows_per_head", "compressions", "observe_seconds",
                "select_seconds", "compact_seconds", "bytes_allocated", "vanilla_bytes"):
        assert key in st
    assert st["policy"] == "ada-snapkv"
    assert len(st["rows_per_head"]) == 30 and len(st["rows_per_head"][0]) == 3
    # a CPU build keeps every pool in host memory
    assert st["bytes_by_buffer_type"] == {"CPU": st["bytes_allocated"]}
    assert st["bytes_on_device"] == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"kv_budget": 0}, "kv_budget"), ({"kv_budget": 16, "window": 32}, "budget"),
    ({"kv_budget": 128, "floor_alpha": 1.5}, "floor_alpha"),
    ({"kv_budget": 128, "kernel": 4}, "kernel"), ({"kv_budget": 128, "policy": "magic"}, "policy"),
    ({"kv_budget": 128, "prefill": "lazy"}, "prefill"),
    ({"kv_budget": 128, "on_full": "panic"}, "on_full"),
    ({"kv_budget": 128, "pool_align": "left"}, "pool_align"),
    ({"kv_budget": 128, "policy": "ada-kvzip", "window_share": 1.0}, "window_share"),
    ({"kv_budget": 128, "window_share": 0.25}, "window_share: applies to the kvzip"),
    ({"window_share": 0.25}, "window_share only apply"),
    # policy arguments without a budget would silently run vanilla llama.cpp
    ({"policy": "snapkv"}, "policy only apply with a KV budget"),
    ({"floor_alpha": 0.5, "prefill": "chunked"}, "floor_alpha, prefill only apply"),
])
def test_bad_ada_arguments(default_model: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LocalLLM(default_model, **kwargs)
