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

With ``--breakdown`` each configuration then runs twice more, once per question:

- ``graph build``: the same steps with ``LLAMA_GRAPH_REUSE_DISABLE=1``; the difference to the
  timed run is what building the graph costs when it is not reused (llama.cpp reuses a decode
  step's graph when its shape is unchanged; the ragged graph does when no head changed its
  length class, see patches/README.md);
- ``ops``: the steps with a ggml scheduler eval callback that asks for every node, so each node
  is computed alone and timed; time is summed per op (``FLASH_ATTN_EXT``, ``MUL_MAT``,
  ``CUSTOM`` = the fused ragged kernel, ``VIEW``/``CPY``/``CONCAT``, ...). Computing nodes one
  by one adds a thread-pool round trip per node (the ``VIEW``-like no-op nodes measure it),
  so the shares are what to read, not the totals.

Headroom is set above ``--steps`` so that no compression happens while decoding: the steps
time attention over the same rows, not the policy. Each step is split into the time inside
``llama_decode`` (graph build + compute, in C++) and the rest (Python: batch fill, logits
copy, argmax, bookkeeping). Writes ``benchmarks/results/decode_profile_<tag>.json``.

    .venv/bin/python benchmarks/decode_profile.py [--model PATH] [--context 8192]
        [--budget 512] [--steps 64] [--rounds 3] [--threads 2] [--breakdown] [--tag cpu]
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


class _OpTimer:
    """A ggml scheduler eval callback that asks for every node, so that the scheduler computes
    the graph one node at a time, and sums the wall time of each node per op name."""

    def __init__(self) -> None:
        import ctypes

        import llama_cpp
        import llama_cpp.llama_cpp as C

        from adakv_local.bindings.ragged import libllama_path

        base = ctypes.CDLL(str(Path(libllama_path()).parent / "libggml-base.so"))
        base.ggml_op_desc.restype = ctypes.c_char_p
        base.ggml_op_desc.argtypes = [ctypes.c_void_p]
        self._desc = base.ggml_op_desc
        self.ms: dict[str, float] = {}
        self.nodes: dict[str, int] = {}
        self.on = False
        self._t0 = 0.0

        def cb(t: int, ask: bool, _user: int) -> bool:
            if ask:
                self._t0 = time.perf_counter()
                return True
            if self.on:
                op = self._desc(t).decode()
                self.ms[op] = self.ms.get(op, 0.0) + 1e3 * (time.perf_counter() - self._t0)
                self.nodes[op] = self.nodes.get(op, 0) + 1
            return True

        self._cb = C.ggml_backend_sched_eval_callback(cb)  # kept alive with the timer
        real = C.llama_context_default_params

        def params() -> Any:
            p = real()
            p.cb_eval = self._cb
            return p

        # bindings.llama and bindings.ragged look these up at every context creation
        C.llama_context_default_params = params
        llama_cpp.llama_context_default_params = params

    def report(self, steps: int) -> dict[str, Any]:
        order = sorted(self.ms, key=lambda k: -self.ms[k])
        return {"ms_per_step": {k: self.ms[k] / steps for k in order},
                "nodes_per_step": {k: self.nodes[k] / steps for k in order}}


def child(ns: argparse.Namespace) -> dict[str, Any]:
    from adakv_local.bench.compare import build_prompt

    timer = _OpTimer() if ns.ops else None

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
        first = llm.tokens_in_cache[-1]
    else:
        llm = _llm(ns, None)  # vanilla at the limit: a prompt of the compressed cache's rows
        toks = build_prompt(llm, ns.rows + 64, 0)[0][:ns.rows]  # (timing prompt: cut to size)
        llm.prefill_tokens(toks)
        first = toks[-1]
    if timer is not None:
        llm.decode_token(first)  # the first step allocates the graph: not counted
        timer.on = True
        real, calls = llm.decode_token, [0]

        def counted(tok: int) -> Any:
            calls[0] += 1
            return real(tok)

        llm.decode_token = counted
        out = _timed_decode(llm, first, ns.steps)
        out.update(timer.report(calls[0]))
    else:
        out = _timed_decode(llm, first, ns.steps)
    out["rows_mean"] = llm.kv_stats()["rows_kept"] if ns.role == "ada" else len(toks)
    return out


def spawn(ns: argparse.Namespace, role: str, env: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", role, "--context", str(ns.context),
            "--budget", str(ns.budget), "--steps", str(ns.steps), "--threads", str(ns.threads),
            "--session", ns.session, "--kv-type", ns.kv_type]
    if ns.model:
        args += ["--model", ns.model]
    for k, v in extra.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
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
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each config without graph reuse and per ggml op")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--ops", action="store_true", help=argparse.SUPPRESS)
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
        breakdown: dict[str, Any] = {}
        if ns.breakdown:
            envs = {"ada fused": {"LLAMA_RAGGED_FUSED": "1"},
                    "ada per-head": {"LLAMA_RAGGED_FUSED": "0"}, "vanilla limit": {}}
            for name, env in envs.items():
                role = "vanilla" if name == "vanilla limit" else "ada"
                noreuse = spawn(ns, role, dict(env, LLAMA_GRAPH_REUSE_DISABLE="1"), rows=rows)
                ops = spawn(ns, role, env, rows=rows, ops=True)
                breakdown[name] = {"no_graph_reuse": noreuse, "ops": ops}
                print(f"breakdown: {name}: no reuse {noreuse['decode_ms_median']:.2f} ms, ops "
                      + ", ".join(f"{k} {v:.2f}" for k, v in
                                  list(ops["ms_per_step"].items())[:6]), file=sys.stderr)
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
              "seconds": time.perf_counter() - t0, "runs": runs, "summary": summary,
              "breakdown": breakdown}
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
