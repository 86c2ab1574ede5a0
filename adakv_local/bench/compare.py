"""``adakv-local compare``: vanilla llama.cpp vs Ada-KV, side by side, on the same prompt.

Every run (one context length x one configuration) happens in its own subprocess, so peak
RSS and allocation figures are clean. Each run prefills the same seeded passkey prompt,
then decodes greedily, and reports prefill tokens/s, median decode ms/token, KV bytes
allocated, peak RSS (and peak VRAM on a GPU build), greedy-token agreement with vanilla, and
whether the passkey was answered.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .machine import machine_info


@dataclass(frozen=True)
class RunSpec:
    """One measured run."""

    model: str | None
    context: int
    budget: int | None  # None: vanilla llama.cpp
    policy: str = "ada-snapkv"
    prefill: str = "full"
    chunk: int = 512
    decode_steps: int = 64
    threads: int | None = None
    seed: int = 0
    n_gpu_layers: int = 0
    kv_type: str = "f16"  # K and V cache type
    limit: bool = False  # vanilla at the budget's size: the decode speed a budget can reach

    @property
    def label(self) -> str:
        kv = "" if self.kv_type == "f16" else f"/{self.kv_type}"
        if self.budget is None:
            return f"vanilla{kv}" + (" (limit)" if self.limit else "")
        mode = "" if self.prefill == "full" else f"/chunked{self.chunk}"
        return f"{self.policy}@{self.budget}{mode}{kv}"


def build_prompt(llm: Any, context: int, seed: int) -> tuple[list[int], str]:
    """Chat tokens of a passkey prompt of about ``context`` tokens, and the passkey."""
    from .tasks import passkey

    s = passkey(context, 0.5, seed, source="filler")
    toks = llm.tokenize(llm.format_chat(s.messages()), add_bos=False)
    # one proportional correction so that every run sees ~``context`` prompt tokens
    s = passkey(max(64, int(context * context / max(1, len(toks)))), 0.5, seed, source="filler")
    toks = llm.tokenize(llm.format_chat(s.messages()), add_bos=False)
    return toks, s.answer


def _peak_vram() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


ADA_TIMES = ("observe_seconds", "select_seconds", "compact_seconds")
"""``kv_stats()`` timers of Ada-KV's own work."""


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    from ..llm import LocalLLM

    n_ctx = spec.context + spec.decode_steps + 256
    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "n_threads": spec.threads, "seed": spec.seed,
                              "n_gpu_layers": spec.n_gpu_layers, "type_k": spec.kv_type,
                              "type_v": spec.kv_type}
    if spec.budget is not None:
        kwargs.update(kv_budget=spec.budget, policy=spec.policy, prefill=spec.prefill,
                      chunk=spec.chunk)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = bool(spec.n_gpu_layers)
    vram = [_peak_vram() if gpu else None]  # device-wide: before loading, then sampled
    with LocalLLM(spec.model, **kwargs) as llm:
        toks, key = build_prompt(llm, spec.context, spec.seed)
        t0 = time.perf_counter()
        llm.prefill_tokens(toks)
        prefill_s = time.perf_counter() - t0
        st_prefill = llm.kv_stats()
        vram.append(_peak_vram() if gpu else None)
        steps: list[float] = []
        # continue the same cache: greedy_ids reuses every prompt token
        gen = llm.greedy_ids(toks, spec.decode_steps, ignore_eos=True, step_seconds=steps)
        answer = llm.detokenize(gen[:16])
        st = llm.kv_stats()
        vram.append(_peak_vram() if gpu else None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "label": spec.label,
        "spec": asdict(spec),
        "prompt_tokens": len(toks),
        "prefill_seconds": prefill_s,
        "prefill_tok_per_s": len(toks) / prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(steps) if steps else None,
        "decode_steps": len(steps),
        "kv_bytes_allocated": st["bytes_allocated"],
        "kv_bytes_after_prefill": st_prefill["bytes_allocated"],
        "kv_bytes_peak": st.get("peak_bytes_allocated", st["bytes_allocated"]),
        "vanilla_kv_bytes_for_tokens": st["vanilla_bytes_for_tokens"],
        "peak_rss_bytes": rss,
        "rss_before_model_bytes": rss0,
        # the most the device held while the model was loaded, less what it held before
        "peak_vram_bytes": (max(v for v in vram[1:] if v is not None) - (vram[0] or 0)
                            if gpu and any(v is not None for v in vram[1:]) else None),
        "tokens": gen,
        "answer": answer,
        "passkey": key,
        "passkey_correct": key in answer,
        "compressions": st.get("compressions", 0),
        # where the time goes: Ada-KV's own work during prefill, and in all
        "profile": {
            "prefill_compute_seconds": prefill_s - sum(st_prefill.get(k, 0.0) for k in ADA_TIMES),
            **{f"prefill_{k}": st_prefill.get(k, 0.0) for k in ADA_TIMES},
            "decode_seconds_total": sum(steps),
            **{f"total_{k}": st.get(k, 0.0) for k in ADA_TIMES},
            "compressions_during_decode": (st.get("compressions", 0)
                                           - st_prefill.get("compressions", 0)),
        },
    }


def _spawn(spec: RunSpec, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "adakv_local.bench.compare", "--worker", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"label": spec.label, "spec": asdict(spec),
                "error": (proc.stderr or proc.stdout).strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int]:
    """(fraction of equal tokens position-wise, length of the identical prefix)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0.0, 0
    same = sum(1 for x, y in zip(a[:n], b[:n], strict=True) if x == y)
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return same / n, prefix


def compare(model: str | None, contexts: Sequence[int], budgets: Sequence[int],
            policies: Sequence[str], *, prefill: str = "full", chunk: int = 512,
            decode_steps: int = 64, threads: int | None = None, n_gpu_layers: int = 0,
            timeout: float = 1800, progress: bool = True, kv_types: Sequence[str] = ("f16",),
            limit: bool = False) -> dict[str, Any]:
    """Run vanilla (f16 and each other K/V type) and every (policy, budget, K/V type) at
    every context length (ratios are against vanilla f16); with
    ``limit``, also vanilla with a prompt of each budget's size (the same number of KV rows:
    the decode speed a budget can reach). Returns the report."""
    specs: list[RunSpec] = []
    if limit:
        for b in budgets:
            specs.append(RunSpec(model, b, None, decode_steps=decode_steps, threads=threads,
                                 n_gpu_layers=n_gpu_layers, limit=True))
    for ctx in contexts:
        # vanilla f16 (the reference of every ratio), then vanilla with each other K/V type,
        # so that a quantized pool's cost (q8_0 prefill is slower in llama.cpp's own CPU
        # attention) is not put on Ada-KV
        for kv in dict.fromkeys(["f16", *kv_types]):
            specs.append(RunSpec(model, ctx, None, decode_steps=decode_steps,
                                 threads=threads, n_gpu_layers=n_gpu_layers, kv_type=kv))
        for pol in policies:
            for b in budgets:
                for kv in kv_types:
                    specs.append(RunSpec(model, ctx, b, pol, prefill, chunk, decode_steps,
                                         threads, n_gpu_layers=n_gpu_layers, kv_type=kv))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="compare", unit="run", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for spec in specs:
        if bar is not None:
            bar.set_postfix_str(f"{spec.context} tok {spec.label}")
        runs.append(_spawn(spec, timeout))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    annotate([r for r in runs if "error" in r or not r["spec"].get("limit")])
    annotate_limit(runs)
    return {"machine": machine_info(), "threads": threads, "created": time.time(),
            "runs": runs}


def annotate_limit(runs: list[dict[str, Any]]) -> None:
    """``decode_ratio_vs_limit``: a budget run's decode time over that of vanilla with a
    prompt of the budget's size (the limit run), when the report has one."""
    limits = {r["spec"]["context"]: r for r in runs
              if r["spec"].get("limit") and "error" not in r}
    for r in runs:
        lim = limits.get(r["spec"]["budget"])
        if "error" not in r and lim is not None and r.get("decode_ms_per_token"):
            r["decode_ratio_vs_limit"] = r["decode_ms_per_token"] / lim["decode_ms_per_token"]


RATIOS: tuple[tuple[str, str], ...] = (
    ("decode_ratio_vs_vanilla", "decode_ms_per_token"),
    ("prefill_ratio_vs_vanilla", "prefill_tok_per_s"),
    ("kv_bytes_ratio_vs_vanilla", "kv_bytes_allocated"),
    ("peak_rss_ratio_vs_vanilla", "peak_rss_bytes"),
)
"""(ratio field, measured field) pairs that :func:`annotate` adds."""


def annotate(runs: list[dict[str, Any]], *,
             key: Callable[[dict[str, Any]], Any] = lambda r: r["spec"]["context"],
             ratios: Sequence[tuple[str, str]] = RATIOS) -> None:
    """Add greedy agreement and ratios vs the vanilla run with the same ``key`` (context)."""
    vanilla = {key(r): r for r in runs if r["spec"]["budget"] is None and "error" not in r
               and r["spec"].get("kv_type", "f16") == "f16"}
    for r in runs:
        v = vanilla.get(key(r))
        if "error" in r or v is None:
            continue
        frac, prefix = agreement(r["tokens"], v["tokens"])
        r["greedy_agreement"] = frac
        r["greedy_identical_prefix"] = prefix
        for k_ratio, k in ratios:
            if r.get(k) and v.get(k):
                r[k_ratio] = r[k] / v[k]


def table(report: dict[str, Any]) -> str:
    """A markdown table of the report."""
    head = ("| context | config | prefill tok/s | decode ms/tok | vs limit | KV allocated "
            "| peak RSS | agree | passkey |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['spec']['context']} | {r['label']} | error: "
                         f"{r['error'].splitlines()[-1][:60]} | | | | | | |")
            continue
        agree, lim = r.get("greedy_agreement"), r.get("decode_ratio_vs_limit")
        lines.append(
            f"| {r['prompt_tokens']} | {r['label']} | {r['prefill_tok_per_s']:.0f} "
            f"| {r['decode_ms_per_token']:.1f} | {'-' if lim is None else f'{lim:.2f}x'} "
            f"| {r['kv_bytes_allocated'] / 2**20:.1f} MiB "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"| {'-' if agree is None else f'{agree:.2f}'} "
            f"| {'yes' if r['passkey_correct'] else 'no'} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """KV memory vs context and decode speed vs context, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in report["runs"]:
        if "error" not in r:
            by_label.setdefault(r["label"], []).append(r)
    for label, rs in sorted(by_label.items(), key=lambda kv: kv[0] != "vanilla"):
        rs.sort(key=lambda r: r["prompt_tokens"])
        x = [r["prompt_tokens"] for r in rs]
        style = {"color": "black", "linewidth": 2.5} if label == "vanilla" else {}
        ax1.plot(x, [r["kv_bytes_allocated"] / 2**20 for r in rs], "o-", label=label, **style)
        ax2.plot(x, [r["decode_ms_per_token"] for r in rs], "o-", label=label, **style)
    m = report["machine"]
    ax1.set(xlabel="context (tokens)", ylabel="KV cache allocated (MiB)", title="KV memory")
    ax2.set(xlabel="context (tokens)", ylabel="decode ms / token (median)",
            title="decode speed")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"adakv-local vs vanilla llama.cpp — {m['cpu']}, "
                 f"{report['threads'] or m['cores']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adakv_local.bench.compare --worker SPEC``: one measured run (internal; the
    user-facing command is ``adakv-local compare``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        spec = RunSpec(**json.loads(args[1]))
        print(json.dumps(run_one(spec)))
        return 0
    print("usage: python -m adakv_local.bench.compare --worker SPEC_JSON "
          "(internal; run `adakv-local compare` instead)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
