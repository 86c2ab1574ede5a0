"""Soak: a long chat on one LocalLLM — does memory stay flat, does decoding stay fast?

200 turns by default, each adding about 200 tokens of new text (a slice of the Paul Graham
essays, or the filler text) and a 32-token greedy answer, with ``kv_budget=256``: once per
prefill mode (``full``, ``chunked``). The conversation (about 50K tokens over 200 turns)
outgrows ``n_ctx`` after ~16 turns, so it runs with ``overflow="drop_oldest"``: the oldest
turns are dropped down to half the window (generation/window.py), positions stay below
``n_ctx``, and the kept conversation is prefilled again each time the cut moves. One more
run checks the default, ``overflow="error"``: the turn at which the chat is refused.

Per turn it records the KV bytes allocated, the process RSS, the decode ms/token, the
prompt size and what the window dropped; the summary gives first/last/max after the
warm-up, the RSS growth over the last 150 turns, and the decode speed of the first and last
50 turns. ``tests/test_soak.py`` runs a 20-turn version.

    .venv/bin/python benchmarks/soak.py [--turns 200] [--threads 2] [--out soak_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


def turn_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    """``n`` user messages of about ``chars`` characters of new text each."""
    from adakv_local.bench.tasks import haystack

    rng = random.Random(seed)
    return [f"Part {i + 1} of my notes: {haystack(chars, rng)}\nSummarise part {i + 1} in "
            "one sentence." for i in range(n)]


def soak(model: Any, *, turns: int = 200, kv_budget: int | None = 256,
         prefill: str = "full", chunk: int = 512, n_ctx: int = 4096, threads: int = 2,
         max_tokens: int = 32, turn_chars: int = 850, overflow: str = "drop_oldest",
         warmup: int = 50, seed: int = 0, log: Any = None) -> dict[str, Any]:
    """Run the soak on a new LocalLLM; returns ``{"config", "turns", "summary"}``."""
    from adakv_local import LocalLLM

    kw: dict[str, Any] = {"kv_budget": kv_budget}
    if kv_budget is not None:
        kw.update(prefill=prefill, chunk=chunk)
    texts = turn_texts(turns, turn_chars, seed)
    msgs: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with LocalLLM(model, n_ctx=n_ctx, n_threads=threads, seed=seed, overflow=overflow,
                  **kw) as llm:
        for i, text in enumerate(texts):
            msgs.append({"role": "user", "content": text})
            before = llm.kv_stats()
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"turn": i + 1}
            try:
                out = llm.chat(msgs, max_tokens=max_tokens, temperature=0.0)
                answer = out["choices"][0]["message"]["content"]
                rec.update(prompt_tokens=out["usage"]["prompt_tokens"],
                           completion_tokens=out["usage"]["completion_tokens"])
            except Exception as e:  # a failed turn is a finding, recorded
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=3)
                answer = ""
            rec["seconds"] = time.perf_counter() - t0
            st = llm.kv_stats()
            dec_n = st["decode_tokens"] - before["decode_tokens"]
            dec_s = st["decode_seconds"] - before["decode_seconds"]
            rec.update(
                kv_bytes_allocated=st["bytes_allocated"], kv_bytes_used=st["bytes_used"],
                tokens_in_cache=st["tokens_seen"], rss_bytes=rss_bytes(),
                decode_ms_per_token=1000 * dec_s / dec_n if dec_n else None,
                prefilled_tokens=st["prefill_tokens"] - before["prefill_tokens"],
                reused_tokens=st["reused_tokens"] - before["reused_tokens"],
                dropped_messages=st["dropped_messages"], window_cuts=st["window_cuts"],
                compressions=st.get("compressions", 0),
                peak_kv_bytes=st.get("peak_bytes_allocated", st["bytes_allocated"]))
            records.append(rec)
            if log is not None:
                log(rec)
            if "error" in rec:
                msgs.pop()  # the turn did not happen
                if overflow == "error":
                    break  # the documented refusal: the probe ends here
            else:
                msgs.append({"role": "assistant", "content": answer})
    config = {"turns": turns, "kv_budget": kv_budget, "prefill": prefill, "chunk": chunk,
              "n_ctx": n_ctx, "threads": threads, "max_tokens": max_tokens,
              "turn_chars": turn_chars, "overflow": overflow, "warmup": warmup,
              "seconds": time.perf_counter() - t_start}
    return {"config": config, "turns": records, "summary": summarize(records, warmup)}


def _fml(xs: list[float]) -> dict[str, float]:
    return {"first": xs[0], "last": xs[-1], "max": max(xs), "min": min(xs)}


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """First/last/max of KV bytes and RSS after the warm-up, RSS growth over the turns after
    it, decode ms/token of the first and last 50 turns (medians), failures."""
    ok = [r for r in records if "error" not in r]
    after = ok[warmup:] if len(ok) > warmup else ok[len(ok) // 2:]
    dec = [r["decode_ms_per_token"] for r in ok if r["decode_ms_per_token"] is not None]
    k = max(1, min(50, len(dec) // 4))
    kv = [r["kv_bytes_allocated"] for r in after]
    rss = [r["rss_bytes"] for r in after]
    return {
        "turns_ok": len(ok),
        "turns_failed": len(records) - len(ok),
        "first_error": next((r["error"] for r in records if "error" in r), None),
        "first_error_turn": next((r["turn"] for r in records if "error" in r), None),
        "after_warmup_from_turn": after[0]["turn"] if after else None,
        "kv_bytes_allocated": _fml(kv) if kv else None,
        "rss_bytes": _fml(rss) if rss else None,
        "rss_growth_after_warmup": (rss[-1] - rss[0]) / rss[0] if rss else None,
        "decode_ms_per_token_first": statistics.median(dec[:k]) if dec else None,
        "decode_ms_per_token_last": statistics.median(dec[-k:]) if dec else None,
        "max_tokens_in_cache": max((r["tokens_in_cache"] for r in ok), default=0),
        "window_cuts": ok[-1]["window_cuts"] if ok else 0,
        "max_prompt_tokens": max((r["prompt_tokens"] for r in ok), default=0),
        "seconds_per_turn": statistics.mean(r["seconds"] for r in records) if records else 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--modes", default="full,chunked", help="prefill modes to soak")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--turn-chars", type=int, default=850)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--no-error-probe", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "soak_cpu.json"))
    ns = ap.parse_args()
    from adakv_local.bench.machine import machine_info

    report: dict[str, Any] = {"machine": machine_info(), "runs": {}}

    def log(rec: dict[str, Any]) -> None:
        if rec["turn"] % 10 == 0 or "error" in rec:
            print(f"  turn {rec['turn']}: prompt {rec.get('prompt_tokens')} tok, kv "
                  f"{rec['kv_bytes_allocated'] / 2**20:.1f} MiB, rss "
                  f"{rec['rss_bytes'] / 2**20:.0f} MiB, decode "
                  f"{rec['decode_ms_per_token'] or 0:.1f} ms/tok, cuts {rec['window_cuts']}"
                  + (f", ERROR {rec['error']}" if "error" in rec else ""), flush=True)

    def save() -> None:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(report, indent=1) + "\n")

    common = dict(kv_budget=ns.budget, chunk=ns.chunk, n_ctx=ns.n_ctx, threads=ns.threads,
                  max_tokens=ns.max_tokens, turn_chars=ns.turn_chars, warmup=ns.warmup,
                  log=log)
    if not ns.no_error_probe:
        print("overflow='error' (the default): until the chat is refused", flush=True)
        report["runs"]["error-probe"] = soak(None, turns=ns.turns, overflow="error",
                                             **common)  # type: ignore[arg-type]
        save()
    for mode in ns.modes.split(","):
        print(f"prefill={mode}, overflow='drop_oldest': {ns.turns} turns", flush=True)
        report["runs"][mode] = soak(None, turns=ns.turns, prefill=mode,
                                    **common)  # type: ignore[arg-type]
        print(json.dumps(report["runs"][mode]["summary"], indent=1), flush=True)
        save()
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
