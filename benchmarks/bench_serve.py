"""`adakv-local serve` under load: K concurrent conversations, vanilla vs Ada-KV.

Each conversation opens with a ~4K-token document (``passkey(4000)``, about 3.55K tokens
with the default model's tokenizer: a seeded haystack from
``adakv_local.bench.tasks``) and a question, then asks 5 short follow-up questions, every
turn streamed (greedy, ``--max-tokens`` tokens) through the real OpenAI client against a
real server subprocess. For each mode (vanilla llama.cpp, ``--kv-budget``) and each K, a
fresh server is started with ``--max-sessions K`` and ``--threads max(1, cores // K)``; the
K conversations run in K client threads at once. Measured: KV bytes held by all sessions at
the end (``GET /v1/kv``: allocated, live, and what a full cache needs for the same
tokens), the server's RSS (end and peak, sampled every 0.2 s), requests/s over the run,
time to first token of the opening turn (the long prefill) and of the follow-ups (the
cached prefix reused), and the passkey answers of the opening turn.

    .venv/bin/python benchmarks/bench_serve.py [--ks 1,4,8] [--budget 512] [--tokens 4000]

Not part of the test suite: on the 2-core CPU machine it prefills 13 documents of ~3.6K
tokens per mode (the recorded run took 28 minutes on the shared machine, load average
6-14: its timings are slower than this CPU gives when it is not shared). Writes
benchmarks/results/serve_cpu.json (``--out`` to change); ``--modes ada-chunked`` runs the
budget with chunked prefill, which bounds the peak memory of concurrent prefills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from adakv_local.bench.machine import machine_info
from adakv_local.bench.tasks import passkey

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
FOLLOW_UPS = ("Summarise the text in one sentence.", "What is the pass key?",
              "Who wrote this kind of essay?", "Name one topic it mentions.",
              "Say your last answer again in fewer words.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Peak(threading.Thread):
    """Samples a process's RSS until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)


def _start(budget: int | None, k: int, threads: int, n_ctx: int,
           chunk: int | None) -> tuple[Any, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "adakv_local.cli", "serve", "--model-id", MODEL,
           "--n-ctx", str(n_ctx), "--threads", str(threads), "--max-sessions", str(k),
           "--port", str(port), "--log-level", "warning"]
    if budget is not None:
        cmd += ["--kv-budget", str(budget)]
    if chunk is not None:
        cmd += ["--prefill", "chunked", "--chunk", str(chunk)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in 180 s")
        time.sleep(0.2)


def _turn(client: openai.OpenAI, messages: list[dict[str, str]], sid: str,
          max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    with client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"session_id": sid}) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            elif chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - t0
    assert usage is not None
    return {"ttft_s": ttft if ttft is not None else total, "seconds": total,
            "text": "".join(parts), "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def _conversation(base: str, i: int, n_tokens: int, max_tokens: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=1800)
    sample = passkey(n_tokens, 0.5, 100 + i)
    messages = sample.messages()
    turns = []
    for q in (None, *FOLLOW_UPS):
        if q is not None:
            messages = [*messages, {"role": "assistant", "content": turns[-1]["text"]},
                        {"role": "user", "content": q}]
        turns.append(_turn(client, messages, f"conv-{i}", max_tokens))
    return {"conversation": i, "passkey": sample.answer,
            "first_answer_correct": sample.correct(turns[0]["text"]), "turns": turns}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_case(budget: int | None, k: int, n_tokens: int, n_ctx: int, max_tokens: int,
             chunk: int | None = None) -> dict[str, Any]:
    """One server, K concurrent conversations; the measurements."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // k)
    proc, base = _start(budget, k, threads, n_ctx, chunk)
    peak = _Peak(proc.pid)
    peak.start()
    try:
        idle_rss = psutil.Process(proc.pid).memory_info().rss
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as ex:
            convs = list(ex.map(lambda i: _conversation(base, i, n_tokens, max_tokens),
                                range(k)))
        wall = time.perf_counter() - t0
        kv = httpx.get(f"{base}/kv", timeout=60).json()
    finally:
        peak.stop.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    turns = [t for c in convs for t in c["turns"]]
    firsts = [c["turns"][0] for c in convs]
    follows = [t for c in convs for t in c["turns"][1:]]
    tot = kv["totals"]
    return {
        "mode": "vanilla" if budget is None else f"ada-snapkv@{budget}" + (
            f" chunked {chunk}" if chunk else ""),
        "kv_budget": budget, "k": k, "threads_per_session": threads, "n_ctx": n_ctx,
        "wall_s": wall, "requests": len(turns), "requests_per_s": len(turns) / wall,
        "ttft_first_turn_s": _mean([t["ttft_s"] for t in firsts]),
        "ttft_follow_up_s": _mean([t["ttft_s"] for t in follows]),
        "prompt_tokens_first_turn": _mean([t["prompt_tokens"] for t in firsts]),
        "prompt_tokens_last_turn": _mean([c["turns"][-1]["prompt_tokens"] for c in convs]),
        "follow_up_cached_fraction": (sum(t["cached_tokens"] for t in follows)
                                      / max(1, sum(t["prompt_tokens"] for t in follows))),
        "kv_bytes_allocated": tot["bytes_allocated"], "kv_bytes_used": tot["bytes_used"],
        "kv_vanilla_bytes_n_ctx": tot["vanilla_bytes"],
        "kv_full_cache_bytes_for_tokens": tot["vanilla_bytes_for_tokens"],
        "compressions": tot["compressions"],
        "rss_idle_bytes": idle_rss, "rss_end_bytes": kv["rss_bytes"],
        "rss_peak_bytes": peak.peak, "model_copies_loaded": kv["model_copies_loaded"],
        "first_answers_correct": sum(c["first_answer_correct"] for c in convs),
        "sessions": kv["sessions"], "conversations": convs,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,4,8", help="concurrent conversations (1,4,8)")
    ap.add_argument("--budget", type=int, default=512, help="Ada-KV rows per head (512)")
    ap.add_argument("--tokens", type=int, default=4000, help="document tokens (~4000)")
    ap.add_argument("--n-ctx", type=int, default=5120, help="context window (5120)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (16)")
    ap.add_argument("--modes", default="vanilla,ada",
                    help="vanilla, ada (full prefill) and/or ada-chunked (default vanilla,ada)")
    ap.add_argument("--chunk", type=int, default=512, help="ada-chunked's chunk (512)")
    ap.add_argument("--out", default=str(RESULTS / "serve_cpu.json"))
    ns = ap.parse_args()
    ks = [int(x) for x in ns.ks.split(",") if x]
    t0 = time.time()
    load0 = os.getloadavg()  # the machine is shared: other work shows here
    cases = []
    modes = {"vanilla": (None, None), "ada": (ns.budget, None),
             "ada-chunked": (ns.budget, ns.chunk)}
    for mode in ns.modes.split(","):
        if mode not in modes:
            ap.error(f"unknown mode {mode!r}; use {', '.join(modes)}")
        budget, chunk = modes[mode]
        for k in ks:
            case = run_case(budget, k, ns.tokens, ns.n_ctx, ns.max_tokens, chunk)
            case["load_average_after"] = os.getloadavg()
            cases.append(case)
            print(f"{case['mode']:>16} K={k}: KV {_mib(case['kv_bytes_allocated'])} MiB "
                  f"allocated ({_mib(case['kv_full_cache_bytes_for_tokens'])} MiB for a full "
                  f"cache of the same tokens), RSS end {_mib(case['rss_end_bytes'])} / peak "
                  f"{_mib(case['rss_peak_bytes'])} MiB, {case['requests_per_s']:.3f} req/s, "
                  f"TTFT first {case['ttft_first_turn_s']:.1f} s / follow-up "
                  f"{case['ttft_follow_up_s']:.2f} s, passkey {case['first_answers_correct']}"
                  f"/{k}, {case['wall_s']:.0f} s", flush=True)
    report = {"benchmark": "bench_serve", "machine": machine_info(),
              "load_average_start": load0, "load_average_end": os.getloadavg(),
              "args": vars(ns), "wall_s": time.time() - t0, "cases": cases}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {ns.out} ({report['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
