"""Ragged KV memory with nothing evicted vs vanilla llama.cpp, every layer on the GPU (issue 9).

The GPU counterpart of ``tests/test_ragged_exact.py``: for each model one ``llama_model`` is
loaded with ``n_gpu_layers=-1`` (KV and attention offloaded too, ``offload_kqv``), and two
contexts with flash attention share it: vanilla (``llama_init_from_model``) and ragged
(:meth:`adakv_local.bindings.ragged.RaggedContext.create`, starting at 64 rows per head so that the
prompt also exercises the growth of the pools). Both decode the same seeded ~1,000-token
prompt in one ``llama_decode`` (4 ubatches of 256) with logits for every position; then
vanilla decodes 64 greedy tokens and the ragged context is fed the same tokens (teacher
forcing, so that one flipped argmax does not make the rest of the comparison meaningless).

Reported per model: max and median relative L2 error of the logits per position (prefill and
decode), whether they are bitwise equal, the fraction of decode steps whose argmax agrees,
the median decode ms/token of each context at ~1K tokens (the cost of per-KV-head attention
with every row kept), and the GPU memory taken by loading the model (proof of offload).
GPU flash attention is not bit-exact across view lengths and kernel configurations (ragged
runs one flash-attention op per KV head), so the pass criterion is ``max rel L2 < --tol``
(default 1e-2) rather than the CPU tests' 1e-3; the numbers are what matters.

Models: the four tiny presets of :mod:`adakv_local.testing.tiny_models` (llama MHA/GQA, qwen2,
qwen3; written to a temporary folder) and every ``--model PATH``.

    python benchmarks/gpu_exactness.py [--model PATH ...] [--json OUT.json] [--tol 1e-2]
    python benchmarks/gpu_exactness.py --profile PATH   # only a ragged decode run, for nsys
    python benchmarks/gpu_exactness.py --profile PATH [--profile-vanilla] --kernels-csv K.csv
        # the same decode run under torch.profiler (no nsys): GPU time per kernel into K.csv
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from bench_gpu import VramSampler, gpu_info  # benchmarks/ is on sys.path when run as a script

from adakv_local.bindings import ragged
from adakv_local.testing.tiny_models import TINY_PRESETS, write_preset

N_PROMPT = 1000
N_DECODE = 64
N_UBATCH = 256
_WARNINGS: list[str] = []


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # warnings and errors only (GGML_LOG_LEVEL_WARN = 3, ERROR = 4)
    if level in (3, 4):
        msg = text.decode("utf-8", "replace")
        _WARNINGS.append(msg)
        if os.environ.get("ADAKV_TEST_VERBOSE"):
            sys.stderr.write(msg)


def _init() -> None:
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


@contextmanager
def gpu_model(path: Path, n_gpu_layers: int = -1) -> Iterator[Any]:
    """Load a GGUF with ``n_gpu_layers`` layers offloaded; freed on exit."""
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise RuntimeError(f"could not load {path}: {''.join(_WARNINGS[-3:])}")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def context_params(n_ctx: int, n_batch: int, n_ubatch: int) -> Any:
    """Flash attention on, one sequence, KV and attention offloaded."""
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_ubatch
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = max(1, os.cpu_count() or 1)
    cp.offload_kqv = True
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return cp


@contextmanager
def vanilla_context(model: Any, cp: Any) -> Iterator[Any]:
    """llama.cpp's own context on ``model``; freed on exit."""
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError(f"llama_init_from_model failed: {''.join(_WARNINGS[-3:])}")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def decode(ctx: Any, tokens: Sequence[int], p0: int, n_vocab: int,
           all_logits: bool = True) -> np.ndarray:
    """Decode ``tokens`` at positions ``p0..`` in one ``llama_decode``; logits [n_out, n_vocab]."""
    n = len(tokens)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i] = int(t)
            batch.pos[i] = p0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}: {''.join(_WARNINGS[-3:])}")
        n_out = n if all_logits else 1
        ptr = llama_cpp.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row relative L2 error of ``a`` against the reference ``b``."""
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


def prompt_tokens(n: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    """Seeded random prompt tokens (as in the tests: no special tokens)."""
    lo = min(100, n_vocab // 4)
    return np.random.default_rng(seed).integers(lo, n_vocab, size=n).astype(np.int32)


def compare_model(path: Path, n_prompt: int = N_PROMPT, n_decode: int = N_DECODE,
                  n_ubatch: int = N_UBATCH) -> dict[str, Any]:
    """Vanilla vs ragged (nothing evicted) on the GPU; returns the measured figures."""
    sampler = VramSampler()
    vram0 = sampler.read()
    with gpu_model(path) as model:
        vram_model = sampler.read()
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        toks = prompt_tokens(n_prompt, n_vocab)
        cp = context_params(n_prompt + n_decode + 8, n_batch=n_prompt, n_ubatch=n_ubatch)

        with vanilla_context(model, cp) as ctx:
            v_pre = decode(ctx, toks, 0, n_vocab)
            v_toks: list[int] = []
            v_dec, v_ms = [], []
            cur = v_pre[-1]
            for s in range(n_decode):
                tok = int(np.argmax(cur))
                v_toks.append(tok)
                t0 = time.perf_counter()
                cur = decode(ctx, [tok], n_prompt + s, n_vocab)[0]
                v_ms.append(1000 * (time.perf_counter() - t0))
                v_dec.append(cur)

        with ragged.RaggedContext.create(model, cparams=cp, initial_capacity=64) as rc:
            r_pre = decode(rc.ctx_ptr, toks, 0, n_vocab)
            r_dec, r_ms = [], []
            agree = 0
            cur = r_pre[-1]
            for s, tok in enumerate(v_toks):  # teacher forcing with vanilla's tokens
                agree += int(np.argmax(cur)) == tok
                t0 = time.perf_counter()
                cur = decode(rc.ctx_ptr, [tok], n_prompt + s, n_vocab)[0]
                r_ms.append(1000 * (time.perf_counter() - t0))
                r_dec.append(cur)
            lens = rc.all_lengths()
            alloc, used = rc.kv_bytes()

    e_pre, e_dec = rel_l2(r_pre, v_pre), rel_l2(np.array(r_dec), np.array(v_dec))
    return {
        "model": str(path),
        "n_prompt": n_prompt, "n_decode": n_decode, "n_ubatch": n_ubatch,
        "prefill_max_rel_l2": float(e_pre.max()),
        "prefill_median_rel_l2": float(np.median(e_pre)),
        "decode_max_rel_l2": float(e_dec.max()),
        "decode_median_rel_l2": float(np.median(e_dec)),
        "bitwise": bool(np.array_equal(r_pre, v_pre) and np.array_equal(r_dec, v_dec)),
        "greedy_argmax_agreement": agree / max(1, n_decode),
        "every_head_keeps_every_row": all(bool((ln == n_prompt + n_decode).all())
                                          for ln in lens),
        "ragged_kv_bytes_allocated": alloc, "ragged_kv_bytes_used": used,
        "vanilla_decode_ms_per_token": statistics.median(v_ms),
        "ragged_decode_ms_per_token": statistics.median(r_ms),
        "vram_model_bytes": (vram_model - vram0) if None not in (vram0, vram_model) else None,
    }


def _kernel_table(prof: Any) -> list[dict[str, Any]]:
    """GPU kernels recorded by a ``torch.profiler`` run (CUPTI sees every kernel of the
    process, llama.cpp's included): name, total ns, launches; the columns of nsys's
    ``cuda_gpu_kern_sum`` CSV, so one summary reads either."""
    from torch.autograd import DeviceType

    acc: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != DeviceType.CUDA:
            continue
        t = acc.setdefault(ev.name, [0.0, 0.0])
        t[0] += 1000.0 * (ev.time_range.end - ev.time_range.start)  # us -> ns
        t[1] += 1
    return [{"Name": k, "Total Time (ns)": int(v[0]), "Instances": int(v[1])}
            for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0])]


def profile_run(path: Path, n_prompt: int, n_steps: int, *, vanilla: bool = False,
                kernels_csv: Path | None = None) -> dict[str, Any]:
    """Prefill ``n_prompt`` tokens, then time ``n_steps`` single-token decode steps in a
    ragged context (nothing evicted) or, with ``vanilla``, llama.cpp's own. Meant to run under
    ``nsys profile``; with ``kernels_csv`` (no nsys needed) the decode steps run under
    ``torch.profiler`` and the per-kernel GPU time is written there as CSV."""
    import contextlib

    prof = None
    with gpu_model(path) as model:
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        toks = prompt_tokens(n_prompt + n_steps, n_vocab, seed=1)
        cp = context_params(n_prompt + n_steps + 8, n_batch=512, n_ubatch=512)
        with contextlib.ExitStack() as stack:
            if vanilla:
                ctx = stack.enter_context(vanilla_context(model, cp))
            else:
                ctx = stack.enter_context(ragged.RaggedContext.create(model, cparams=cp)).ctx_ptr
            for s in range(0, n_prompt, 512):
                decode(ctx, toks[s:min(s + 512, n_prompt)], s, n_vocab, all_logits=False)
            if kernels_csv is not None:
                import torch
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.init()
                prof = stack.enter_context(profile(activities=[ProfilerActivity.CUDA]))
            t0 = time.perf_counter()
            for s in range(n_steps):
                decode(ctx, [int(toks[n_prompt + s])], n_prompt + s, n_vocab)
            ms = 1000 * (time.perf_counter() - t0) / max(1, n_steps)
    out: dict[str, Any] = {"model": str(path), "context": "vanilla" if vanilla else "ragged",
                           "n_prompt": n_prompt, "decode_steps": n_steps,
                           "decode_ms_per_token": ms}
    if prof is not None and kernels_csv is not None:
        import csv

        rows = _kernel_table(prof)
        with open(kernels_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["Name", "Total Time (ns)", "Instances"])
            w.writeheader()
            w.writerows(rows)
        out["kernels"] = len(rows)
        out["kernel_launches"] = sum(r["Instances"] for r in rows)
        out["note"] = "decode time measured while profiling"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="a GGUF model to compare as well (repeatable)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the four tiny presets")
    ap.add_argument("--tol", type=float, default=1e-2, help="max relative L2 error allowed")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--profile", type=Path, default=None,
                    help="only run a ragged decode of this model (for nsys), then exit")
    ap.add_argument("--profile-prompt", type=int, default=4096)
    ap.add_argument("--profile-steps", type=int, default=64)
    ap.add_argument("--profile-vanilla", action="store_true",
                    help="profile llama.cpp's own context instead of a ragged one")
    ap.add_argument("--kernels-csv", type=Path, default=None,
                    help="with --profile: record GPU kernels with torch.profiler into this CSV")
    ns = ap.parse_args(argv)

    if not ragged.available():
        print(f"error: the loaded libllama ({ragged.libllama_path()}) lacks the ragged KV "
              "symbols: install the patched runtime first", file=sys.stderr)
        return 2
    _init()
    if ns.profile is not None:
        print(json.dumps(profile_run(ns.profile, ns.profile_prompt, ns.profile_steps,
                                     vanilla=ns.profile_vanilla, kernels_csv=ns.kernels_csv)))
        return 0

    report: dict[str, Any] = {
        "what": "ragged (nothing evicted) vs vanilla logits, n_gpu_layers=-1 "
                "(benchmarks/gpu_exactness.py)",
        "gpu": gpu_info(),
        "supports_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        # the pytest files load models with llama_model_default_params(): this says whether
        # that offloads every layer (-1) in this build
        "default_params_n_gpu_layers": int(llama_cpp.llama_model_default_params().n_gpu_layers),
        "tolerance_max_rel_l2": ns.tol,
        "models": {},
    }
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="adakv-gpu-exact-") as tmp:
        paths: dict[str, Path] = {}
        if not ns.no_tiny:
            paths.update({p: write_preset(Path(tmp) / f"{p}.gguf", p) for p in TINY_PRESETS})
        paths.update({p.stem: p for p in ns.model})
        for name, path in paths.items():
            t0 = time.perf_counter()
            try:
                res = compare_model(path)
            except Exception as e:  # report and go on with the next model
                res = {"model": str(path), "error": f"{type(e).__name__}: {e}"}
            res["seconds"] = time.perf_counter() - t0
            ok = "error" not in res and max(res["prefill_max_rel_l2"],
                                            res["decode_max_rel_l2"]) < ns.tol \
                and res["every_head_keeps_every_row"]
            res["passed"] = bool(ok)
            if not ok:
                failed.append(name)
            report["models"][name] = res
            if "error" in res:
                print(f"[gpu_exactness] {name}: ERROR {res['error']}", flush=True)
            else:
                print(f"[gpu_exactness] {name}: prefill max rel L2 "
                      f"{res['prefill_max_rel_l2']:.3g}, decode {res['decode_max_rel_l2']:.3g}, "
                      f"bitwise {res['bitwise']}, argmax agreement "
                      f"{res['greedy_argmax_agreement']:.2f}, decode ms/tok vanilla "
                      f"{res['vanilla_decode_ms_per_token']:.2f} ragged "
                      f"{res['ragged_decode_ms_per_token']:.2f} -> "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
            if ns.json is not None:  # after every model: a timeout keeps what was done
                ns.json.parent.mkdir(parents=True, exist_ok=True)
                ns.json.write_text(json.dumps({**report, "failed": failed}, indent=1))
    report["failed"] = failed
    report["passed"] = not failed
    if ns.json is not None:
        ns.json.write_text(json.dumps(report, indent=1))
    if report["default_params_n_gpu_layers"] != -1 or not report["supports_gpu_offload"]:
        print("[gpu_exactness] note: default model params do not offload every layer, or the "
              "build has no GPU offload", flush=True)
    print(f"[gpu_exactness] {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
