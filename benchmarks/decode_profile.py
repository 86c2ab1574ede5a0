"""Where a ragged decode step's time goes, against vanilla at the same number of KV rows.

One prefill of ``--context`` tokens is compressed to ``--budget`` rows per head and saved as a
session file (``LocalLLM.save_session``); then, each in its own process and in rounds that
alternate their order (this machine's load moves by tens of percent between minutes):

- ``ada fused``: the session loaded, ``--steps`` greedy decode steps with the patch's fused
  CPU kernel for layers whose heads hold different numbers of rows;
- ``ada per-head``: the same with ``LLAMA_RAGGED_FUSED=0`` (one flash attention per KV head:
  the path before the kernel, and what other backends take);
- ``vanilla limit``: vanilla llama.cpp with a prompt of the same number of rows (the mean
  rows per head of the compressed cache): the decode time the budget can reach.

Headroom is set above ``--steps`` so that no compression happens while decoding: the steps
time attention over the same rows, not the policy. Each step is split into the time inside
``llama_decode`` (graph build + compute, in C++) and the rest (Python: batch fill, logits
copy, argmax, bookkeeping). Writes ``benchmarks/results/decode_profile_<tag>.json``.

    .venv/bin/python benchmarks/decode_profile.py [--model PATH] [--context 8192]
        [--budget 512] [--steps 64] [--rounds 3] [--threads 2] [--tag cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _llm(ns: argparse.Namespace, budget: int | None) -> Any:
    from adakv_local import LocalLLM

    if budget is None:  # vanilla, f16, sized for its prompt as compare's limit run is
        return LocalLLM(ns.model, n_ctx=ns.rows + ns.steps + 256, n_threads=ns.threads,
                        seed=0)
    return LocalLLM(ns.model, kv_budget=budget, n_ctx=ns.context + ns.steps + 512,
                    n_threads=ns.threads, headroom=ns.steps + 16, seed=0,
                    type_k=ns.kv_type, type_v=ns.kv_type)


def _timed_decode(llm: Any, first: int, steps: int) -> dict[str, Any]:
    """``steps`` greedy steps from token ``first``: per step, the wall time and the time
    inside llama_decode."""
    from adakv_local.bindings.llama import C  # llama_cpp.llama_cpp, what decode() calls
    from adakv_local.generation.loop import greedy

    inner: list[float] = []
    real = C.llama_decode

    def timed(ctx: Any, batch: Any) -> int:
        t0 = time.perf_counter()
        rc = real(ctx, batch)
        inner.append(time.perf_counter() - t0)
        return rc

    C.llama_decode = timed  # bindings.llama.decode looks it up at every call
    try:
        walls: list[float] = []
        logits = llm.decode_token(first)  # warm-up step (graph allocation), not counted
        inner.clear()
        greedy(logits, llm.decode_token, llm.is_eog, steps, step_seconds=walls)
    finally:
        C.llama_decode = real
    cpu = time.process_time()
    ms = [1e3 * w for w in walls]
    ms_in = [1e3 * w for w in inner]
    return {"decode_ms_median": statistics.median(ms), "decode_ms_mean": statistics.fmean(ms),
            "llama_decode_ms_median": statistics.median(ms_in),
            "host_ms_median": statistics.median(a - b for a, b in zip(ms, ms_in, strict=True)),
            "process_cpu_s": cpu}


def child(ns: argparse.Namespace) -> dict[str, Any]:
    from adakv_local.bench.compare import build_prompt

    if ns.role == "prepare":
        llm = _llm(ns, ns.budget)
        toks, _ = build_prompt(llm, ns.context, 0)
        t0 = time.perf_counter()
        llm.prefill_tokens(toks)
        prefill_s = time.perf_counter() - t0
        llm.save_session(ns.session)
        st = llm.kv_stats()
        lens = [x for layer in st["rows_per_head"] for x in layer]
        return {"prompt_tokens": len(toks), "prefill_s": prefill_s,
                "rows_mean": sum(lens) / len(lens), "rows_min": min(lens),
                "rows_max": max(lens), "kv_bytes_allocated": st["bytes_allocated"]}
    if ns.role == "ada":
        llm = _llm(ns, ns.budget)
        llm.load_session(ns.session)
        out = _timed_decode(llm, llm.tokens_in_cache[-1], ns.steps)
        out["rows_mean"] = llm.kv_stats()["rows_kept"]
        return out
    llm = _llm(ns, None)  # vanilla at the limit: a prompt of the compressed cache's rows
    toks = build_prompt(llm, ns.rows + 64, 0)[0][:ns.rows]  # (a timing prompt: cut to size)
    llm.prefill_tokens(toks)
    out = _timed_decode(llm, toks[-1], ns.steps)
    out["rows_mean"] = len(toks)
    return out


def spawn(ns: argparse.Namespace, role: str, env: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", role, "--context", str(ns.context),
            "--budget", str(ns.budget), "--steps", str(ns.steps), "--threads", str(ns.threads),
            "--session", ns.session, "--kv-type", ns.kv_type]
    if ns.model:
        args += ["--model", ns.model]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-type", default="f16", help="pool type of the Ada-KV runs")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--child", dest="role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--session", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.role:
        print(json.dumps(child(ns)))
        return 0
    from adakv_local.bench.machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        ns.session = str(Path(tmp) / "ada.session")
        t0 = time.perf_counter()
        prep = spawn(ns, "prepare")
        print(f"prefilled {prep['prompt_tokens']} tokens in {prep['prefill_s']:.1f} s; rows "
              f"per head {prep['rows_mean']:.1f} (min {prep['rows_min']}, max "
              f"{prep['rows_max']})", file=sys.stderr)
        rows = round(prep["rows_mean"])
        configs = {"ada fused": lambda: spawn(ns, "ada", {"LLAMA_RAGGED_FUSED": "1"}),
                   "ada per-head": lambda: spawn(ns, "ada", {"LLAMA_RAGGED_FUSED": "0"}),
                   "vanilla limit": lambda: spawn(ns, "vanilla", rows=rows)}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
        names = list(configs)
        for r in range(ns.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                runs[name].append(configs[name]())
                print(f"round {r + 1}: {name}: "
                      f"{runs[name][-1]['decode_ms_median']:.2f} ms/token", file=sys.stderr)
    summary = {name: {key: statistics.median(x[key] for x in rs)
                      for key in ("decode_ms_median", "llama_decode_ms_median",
                                  "host_ms_median")}
               for name, rs in runs.items()}
    lim = summary["vanilla limit"]["decode_ms_median"]
    for s in summary.values():
        s["ratio_vs_limit"] = s["decode_ms_median"] / lim
    report = {"machine": machine_info(), "model": ns.model or "default",
              "context": ns.context, "budget": ns.budget, "steps": ns.steps,
              "threads": ns.threads, "kv_type": ns.kv_type, "prepare": prep,
              "seconds": time.perf_counter() - t0, "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"decode_profile_{ns.tag}.json"
    out.write_text(json.dumps(report, indent=1))
    for name, s in summary.items():
        print(f"{name:14s} {s['decode_ms_median']:7.2f} ms/token (llama_decode "
              f"{s['llama_decode_ms_median']:.2f}, host {s['host_ms_median']:.2f}), "
              f"{s['ratio_vs_limit']:.2f}x the limit")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
