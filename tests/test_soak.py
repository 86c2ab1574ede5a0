"""A short soak (benchmarks/soak.py): 20 chat turns on one Ada-KV LocalLLM whose
conversation outgrows n_ctx several times; KV memory stays flat, no turn fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from adakv_local.bindings import ragged

pytestmark = pytest.mark.skipif(not ragged.available(), reason="vanilla runtime")
SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("prefill", ["full", "chunked"])
def test_short_soak_kv_flat(default_model: Path, prefill: str) -> None:
    budget, n_ctx = 64, 512
    run = _soak_module().soak(default_model, turns=20, kv_budget=budget, prefill=prefill,
                              chunk=128, n_ctx=n_ctx, threads=1, max_tokens=8,
                              turn_chars=300, warmup=6)
    s, turns = run["summary"], run["turns"]
    assert s["turns_failed"] == 0, s["first_error"]
    assert s["window_cuts"] >= 3  # the conversation outgrew the window and slid
    assert all(t["tokens_in_cache"] < n_ctx for t in turns)
    assert max(t["prompt_tokens"] for t in turns) < n_ctx
    kv = s["kv_bytes_allocated"]
    # flat after the warm-up, up to Ada-KV's per-compression rounding of the head caps
    assert kv["max"] - kv["min"] <= 0.05 * kv["max"], kv
    # and about the budget's size: 30 layers x 3 heads x (budget + headroom + decoded) rows
    row = 2 * (64 + 64)  # f16 K and V of one head
    assert kv["max"] <= 30 * 3 * (budget + 64 + 8 + 8) * row
    # a vanilla cache of this n_ctx allocates n_ctx rows per head
    assert kv["max"] < 30 * 3 * n_ctx * row / 3
    assert s["rss_growth_after_warmup"] < 0.05


# ---------------------------------------------------------------------------------------
# the window itself (pure Python: a word count stands in for the tokenizer)


def _tok(msgs: list[dict[str, str]]) -> list[int]:
    return [0] * sum(4 + len(m["content"].split()) for m in msgs)  # 4: the template's


def _chat(n_turns: int, words: int = 10) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"q{i} " + "w " * words},
                 {"role": "assistant", "content": f"a{i} " + "w " * words}]
    return msgs


def test_window_drops_whole_old_turns_and_keeps_the_cut() -> None:
    from adakv_local import ContextOverflowError
    from adakv_local.generation.window import ConversationWindow

    w = ConversationWindow("drop_oldest", 200)  # limit: 200 - 1 - min(20, 50) = 179 tokens
    msgs = _chat(5)[:-1]  # 4.5 turns: 6 + 9 * 15 = 141 tokens, fits
    assert len(w.fit(msgs, 20, _tok)) == 141 and w.dropped == 0
    msgs = _chat(7)[:-1]  # 201 tokens: over; drop down to <= 100 (half the window)
    n = len(w.fit(msgs, 20, _tok))
    assert n <= 100 and w.dropped % 2 == 0 and w.dropped > 0 and w.cuts == 1
    kept = [msgs[0], *msgs[1 + w.dropped:]]
    assert len(_tok(kept)) == n and kept[1]["role"] == "user"  # starts with a whole turn
    cut = w.dropped
    msgs = _chat(8)[:-1]  # one more turn: the same cut while it fits (no re-prefill)
    assert len(w.fit(msgs, 20, _tok)) == n + 30 and w.dropped == cut and w.cuts == 1
    edited = [msgs[0], {"role": "user", "content": "other"}, *msgs[2:]]
    w.fit(edited, 20, _tok)  # another conversation: the cut is recomputed from the whole
    assert w.cuts == 2
    with pytest.raises(ContextOverflowError, match="last user message alone"):
        w.fit([msgs[0], {"role": "user", "content": "w " * 300}], 20, _tok)
    e = ConversationWindow("error", 200)  # refuses nothing itself: LocalLLM checks n_ctx
    assert len(e.fit(_chat(20), 20, _tok)) == len(_tok(_chat(20))) and e.dropped == 0
    with pytest.raises(ValueError, match="overflow"):
        ConversationWindow("truncate", 200)
