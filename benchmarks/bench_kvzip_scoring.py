"""Context-reconstruction scoring time vs prefill time, and its memory (issue 17 item 2).

One process per configuration (so peak RSS is its own): a seeded needle document of
~N tokens is prefilled by ``LocalLLM(kv_budget=B, policy="ada-kvzip")`` and compressed;
the report splits the compression into the reconstruction's forward passes (``feed``; with
the default method, scoring inside the attention, the scores are computed there), the
``observe_max`` graphs (method ``observe``: flash attention, then a second pass over the
rows), the running max + removal of the chunk rows (``accumulate``), the
query-ring resizes, selection and compaction, next to the prefill's own model time, and
records the extra rows and ring slots the scoring held, the ring's bytes and the RSS
before / after scoring.

    .venv/bin/python benchmarks/bench_kvzip_scoring.py [--lengths 2048,8192]
        [--chunks auto,256,512,1024] [--methods auto,observe] [--budget 256] [--threads 2]
        [--prefill full|chunked] [--policies ada-kvzip,ada-kvzap-global]
        [--json benchmarks/results/kvzip_scoring.json]
        [--model PATH]

``--model`` times another GGUF (default: the embedded model). Timings do not depend on the
weights, so a random model of a desktop size shows how the ratio moves with the model:

    .venv/bin/python -m adakv_local.testing.tiny_models llama-1b-q4k build/models/1b.gguf
    .venv/bin/python benchmarks/bench_kvzip_scoring.py --model build/models/1b.gguf \\
        --lengths 2048,4096 --json benchmarks/results/kvzip_scoring_1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss() -> int:
    """Current resident set size, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(n_tokens: int, chunk: int | None, budget: int, threads: int, prefill: str,
            prefill_chunk: int, method: str = "auto", model: str | None = None,
            policy: str = "ada-kvzip") -> dict:
    """One configuration; ``chunk`` None is LocalLLM's default (n_batch minus the prompt).
    A kvzap ``policy`` predicts the scores (its calibration is loaded or fitted before the
    clock starts)."""
    from adakv_local import LocalLLM
    from adakv_local.bench.eval_tasks import make_sample

    n_ctx = n_tokens + (chunk or 512) + 512
    llm = LocalLLM(model, kv_budget=budget, policy=policy, n_ctx=n_ctx, n_threads=threads,
                   recon_chunk=chunk, prefill=prefill, chunk=prefill_chunk, seed=0)
    if "kvzap" in policy:
        llm.calibrate_kvzap()
    s = make_sample("niah-single", n_tokens, 0,
                    count_tokens=lambda x: len(llm.tokenize(x.user_text())))
    toks = llm.tokenize(llm.format_chat([{"role": "user", "content": s.context}]),
                        add_bos=False)
    cache = llm._cache
    cache.recon_method = method
    rss0 = _rss()
    peaks = {"rss_during_scoring": 0}
    real = cache.kvzip_scores

    def scored(*a, **kw):  # RSS right after the reconstruction, before compaction
        out = real(*a, **kw)
        peaks["rss_during_scoring"] = max(peaks["rss_during_scoring"], _rss())
        return out

    cache.kvzip_scores = scored
    t0 = time.perf_counter()
    llm.prefill_tokens(toks)
    wall = time.perf_counter() - t0
    st = llm.kv_stats()
    rc = llm.ragged
    rec = st["reconstruction"]
    slot = sum(rc.n_head(il) * rc.n_embd_head(il) * 4 for il in range(rc.n_layer))
    scoring = (rec["feed_s"] + rec["observe_s"] + rec["accumulate_s"] + rec["ring_s"]
               + rec["predict_s"])
    out = {
        "model": llm.model_path.name, "model_bytes": llm.model_path.stat().st_size,
        "prompt_tokens": len(toks), "recon_chunk": cache.recon_chunk,
        "recon_chunk_option": chunk if chunk is not None else "auto", "budget": budget,
        "method": rec["method"], "policy": policy, "predict_s": rec["predict_s"],
        "prefill_mode": prefill, "threads": threads,
        "prefill_s": st["prefill_seconds"], "scoring_s": scoring,
        "ratio": scoring / st["prefill_seconds"],
        "feed_s": rec["feed_s"], "observe_s": rec["observe_s"],
        "accumulate_s": rec["accumulate_s"], "ring_s": rec["ring_s"],
        "select_s": st["select_seconds"], "compact_s": st["compact_seconds"],
        "compress_total_s": st["observe_seconds"] + st["select_seconds"]
        + st["compact_seconds"],
        "wall_s": wall, "recon_tokens": rec["tokens"], "chunks": rec["chunks"],
        "peak_extra_rows": rec["peak_extra_rows"], "peak_ring_slots": rec["peak_ring_slots"],
        "ring_bytes": rec["peak_ring_slots"] * slot, "ring_bytes_per_slot": slot,
        "peak_layer_rows": st["peak_layer_rows"],
        "rss_before_prefill": rss0, "rss_after_scoring": peaks["rss_during_scoring"],
        "rss_after": _rss(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows_kept": st["rows_kept"],
    }
    llm.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--chunks", default="auto",
                    help="text tokens per reconstruction chunk, comma-separated; auto = "
                         "LocalLLM's default (n_batch minus the reconstruction prompt)")
    ap.add_argument("--methods", default="auto",
                    help="how the maxima are computed, comma-separated: auto (inside the "
                         "attention on CPU F16 pools), attention, observe (flash attention "
                         "+ observe_max)")
    ap.add_argument("--policies", default="ada-kvzip",
                    help="comma-separated; ada-kvzap-global predicts the scores instead")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="full", choices=["full", "chunked"])
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--json", default=str(RESULTS / "kvzip_scoring.json"))
    ap.add_argument("--model", default=None,
                    help="GGUF to time (default: the embedded model)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
    ns = ap.parse_args()
    if ns.one:
        n_s, c_s, m, pol = ns.one.split(":")
        c = None if c_s == "auto" else int(c_s)
        print(json.dumps(run_one(int(n_s), c, ns.budget, ns.threads, ns.prefill,
                                 ns.prefill_chunk, m, ns.model, pol)))
        return 0
    from adakv_local.bench.machine import machine_info

    runs = []
    for n in (int(x) for x in ns.lengths.split(",")):
        for c, m, pol in ((c, m, pol) for pol in ns.policies.split(",")
                          for c in ns.chunks.split(",") for m in ns.methods.split(",")):
            cmd = [sys.executable, __file__, "--one", f"{n}:{c.strip()}:{m.strip()}:{pol}",
                   "--budget", str(ns.budget),
                   "--threads", str(ns.threads), "--prefill", ns.prefill,
                   "--prefill-chunk", str(ns.prefill_chunk)]
            if ns.model:
                cmd += ["--model", ns.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(f"{r['prompt_tokens']:>6} tokens, {pol}, chunk {r['recon_chunk']:>4}, "
                  f"{r['method']:>9}: "
                  f"prefill {r['prefill_s']:.1f} s, "
                  f"scoring {r['scoring_s']:.1f} s ({r['ratio']:.2f}x: forward "
                  f"{r['feed_s']:.1f}, observe {r['observe_s']:.1f}, accumulate "
                  f"{r['accumulate_s']:.2f}, ring {r['ring_s']:.2f}), extra rows "
                  f"{r['peak_extra_rows']}, ring {r['ring_bytes'] / 2**20:.1f} MiB, RSS "
                  f"{r['rss_before_prefill'] / 2**20:.0f} -> {r['rss_after_scoring'] / 2**20:.0f}"
                  f" MiB (peak {r['peak_rss'] / 2**20:.0f})", flush=True)
            Path(ns.json).write_text(json.dumps({"machine": machine_info(), "runs": runs},
                                                indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
