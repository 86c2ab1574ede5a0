"""Decode speed of the ragged KV memory with nothing evicted vs vanilla llama.cpp (not a test).

The overhead measured here is that of running attention per KV head (one flash-attention op
per KV head instead of one per layer, plus the concatenation of the heads' outputs and the
per-head masks), with every row kept. For each context length both contexts are prefilled
with the same tokens, then decode steps are timed alternately (a round of vanilla steps, a
round of ragged steps, ...), so that the noise of a shared machine hits both alike.
Also reports the prefill speed and, as an outlook on eviction, the time of ``observe`` (window
32) and of compacting every head to its last ``--keep`` rows, then the decode speed with that
many rows (vanilla keeps every row). Prints the figures and writes
``benchmarks/results/bench_ragged_decode.json``.

    python benchmarks/bench_ragged_decode.py [--contexts 1024 4096] [--steps 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ragged_decode.json"


def _log_filter():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 4:  # errors only
            sys.stderr.write(text.decode("utf-8", "replace"))

    return cb


def _decode(ctx, tokens, p0: int, n_batch: int) -> None:
    import llama_cpp

    for s in range(0, len(tokens), n_batch):
        chunk = tokens[s:s + n_batch]
        batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
        try:
            for i, t in enumerate(chunk):
                batch.token[i] = int(t)
                batch.pos[i] = p0 + s + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == len(chunk) - 1 else 0
            batch.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            llama_cpp.llama_get_logits_ith(ctx, -1)  # waits for the result
        finally:
            llama_cpp.llama_batch_free(batch)


def _timed_rounds(ctxs: dict, gen, p0: int, steps: int, rounds: int) -> dict[str, np.ndarray]:
    per = steps // rounds
    times: dict[str, list[float]] = {name: [] for name in ctxs}
    for r in range(rounds):
        for name, ctx in ctxs.items():
            for i in range(r * per, (r + 1) * per):
                t0 = time.perf_counter()
                _decode(ctx, [gen[i]], p0 + i, 1)
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * np.array(ts) for name, ts in times.items()}


def bench_context(model, n_vocab: int, n_ctx_tokens: int, steps: int, rounds: int,
                  threads: int, n_ubatch: int, keep: int) -> dict:
    import llama_cpp

    from adakv_local.bindings.ragged import RaggedContext

    rng = np.random.default_rng(0)
    prompt = rng.integers(100, n_vocab, size=n_ctx_tokens)
    gen = rng.integers(100, n_vocab, size=2 * steps)

    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx_tokens + 2 * steps + 16
    cp.n_batch = n_ubatch
    cp.n_ubatch = n_ubatch
    cp.n_seq_max = 1
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED

    vctx = llama_cpp.llama_init_from_model(model, cp)
    rc = RaggedContext.create(model, cparams=cp, n_window=32)
    ctxs = {"vanilla": vctx, "ragged": rc.ctx_ptr}
    out: dict = {"context_tokens": n_ctx_tokens, "decode_steps": steps}
    try:
        for name, ctx in ctxs.items():
            t0 = time.perf_counter()
            _decode(ctx, prompt, 0, n_ubatch)
            dt = time.perf_counter() - t0
            out[f"{name}_prefill_tok_s"] = n_ctx_tokens / dt

        times = _timed_rounds(ctxs, gen, n_ctx_tokens, steps, rounds)
        for name, ms in times.items():
            out[f"{name}_decode_ms_median"] = float(np.median(ms))
            out[f"{name}_decode_ms_mean"] = float(ms.mean())
        out["decode_overhead_pct"] = 100.0 * (out["ragged_decode_ms_median"]
                                              / out["vanilla_decode_ms_median"] - 1.0)
        out["prefill_overhead_pct"] = 100.0 * (out["vanilla_prefill_tok_s"]
                                               / out["ragged_prefill_tok_s"] - 1.0)
        out["ragged_kv_bytes_alloc"], out["ragged_kv_bytes_used"] = rc.kv_bytes()

        # outlook: observe, compact to the last `keep` rows per head, decode again
        t0 = time.perf_counter()
        rc.observe(32)
        out["observe32_ms"] = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for il in range(rc.n_layer):
            lens = rc.lengths(il)
            rc.compact(il, [np.arange(max(0, ln - keep), ln) for ln in lens],
                       np.minimum(lens, keep) + 2 * steps)
        out["compact_ms"] = 1e3 * (time.perf_counter() - t0)
        out["compacted_kv_bytes_alloc"] = rc.kv_bytes()[0]
        times = _timed_rounds(ctxs, gen[steps:], n_ctx_tokens + steps, steps, rounds)
        out["compacted_rows_per_head"] = keep
        out["vanilla_decode_ms_median_2"] = float(np.median(times["vanilla"]))
        out["ragged_compacted_decode_ms_median"] = float(np.median(times["ragged"]))
    finally:
        rc.close()
        llama_cpp.llama_free(vctx)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--keep", type=int, default=512, help="rows per head kept by the outlook")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import llama_cpp

    from adakv_local.bindings import ragged

    if not ragged.available():
        sys.exit(f"the loaded libllama ({ragged.libllama_path()}) has no ragged KV memory")
    if args.model is None:
        from adakv_local.models import DEFAULT_MODEL, fetch

        args.model = str(fetch(DEFAULT_MODEL, verify=False, quiet=True))

    cb = _log_filter()
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(args.model.encode(),
                                                 llama_cpp.llama_model_default_params())
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    results = []
    try:
        for n in args.contexts:
            r = bench_context(model, n_vocab, n, args.steps, args.rounds, args.threads,
                              args.ubatch, args.keep)
            results.append(r)
            print(f"context {n:5d}: decode vanilla {r['vanilla_decode_ms_median']:6.2f} ms/token, "
                  f"ragged {r['ragged_decode_ms_median']:6.2f} ms/token "
                  f"({r['decode_overhead_pct']:+.1f}%); prefill vanilla "
                  f"{r['vanilla_prefill_tok_s']:.0f} tok/s, ragged "
                  f"{r['ragged_prefill_tok_s']:.0f} tok/s ({r['prefill_overhead_pct']:+.1f}%)\n"
                  f"               outlook: observe(32) {r['observe32_ms']:.0f} ms, compact to "
                  f"{args.keep} rows/head {r['compact_ms']:.0f} ms, then decode "
                  f"{r['ragged_compacted_decode_ms_median']:.2f} ms/token (vanilla "
                  f"{r['vanilla_decode_ms_median_2']:.2f})", flush=True)
    finally:
        llama_cpp.llama_model_free(model)

    doc = {
        "benchmark": "bench_ragged_decode",
        "model": Path(args.model).name,
        "threads": args.threads,
        "n_ubatch": args.ubatch,
        "libllama": ragged.libllama_path(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "timing": "median wall time of llama_decode + llama_get_logits_ith per decode step; "
                  "vanilla and ragged steps alternate in rounds",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
