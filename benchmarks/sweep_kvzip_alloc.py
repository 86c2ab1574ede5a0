"""The kvzip allocators' knobs, question-agnostic: Ada-KV's floor alpha and the window share.

For each prompt, one prefill, one reconstruction (the eval's question-agnostic snapshot and
scores, computed once), then ada-kvzip and ada-kvzip-global at every budget with every
(floor_alpha, window_share) pair. Writes one JSON record per (prompt, policy, variant,
budget) and prints the per-variant means (accuracy, top-1 agreement, KL vs the full cache).
An exploration on a few prompts, not the eval: a variant that wins here is a candidate for
a full `adakv-local eval` run, not a new default.

    .venv/bin/python benchmarks/sweep_kvzip_alloc.py [--task niah-single] [--length 4096]
        [--samples 8] [--budgets 256,512] [--floors 0.2,0.1,0.05,0] [--shares 0.25,0]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator

RESULTS = Path(__file__).resolve().parent / "results"
MODE = "question-agnostic"


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--policies", default="ada-kvzip,ada-kvzip-global")
    ap.add_argument("--floors", default="0.2,0.1,0.05,0")
    ap.add_argument("--shares", default="0.25,0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "kvzip_alloc_sweep.json"))
    ns = ap.parse_args()
    budgets = tuple(int(b) for b in ns.budgets.split(","))
    policies = tuple(ns.policies.split(","))
    variants = [(f, s) for f in _floats(ns.floors) for s in _floats(ns.shares)]
    spec = EvalSpec(tasks=(ns.task,), lengths=(ns.length,), budgets=budgets,
                    policies=policies, modes=(MODE,), samples=ns.samples,
                    threads=ns.threads, seed=ns.seed)
    records = []
    with Evaluator(spec) as ev:
        for i in range(ns.samples):
            p = ev.prompt(ns.task, ns.length, i)
            ref = ev.references(p)[MODE]
            try:
                for policy in policies:
                    for floor, share in variants:
                        for b in budgets:
                            r = ev.evaluate(p, ref, MODE, policy, b, floor_alpha=floor,
                                            window_share=share)
                            records.append({
                                "i": i, "policy": policy, "floor_alpha": floor,
                                "window_share": share, "budget": b, "score": r["score"],
                                "full": ref.score, "top1": r["top1"], "kl": r["kl"],
                                "answer": r["answer"]})
            finally:
                ref.snap.close()
            print(f"{ns.task} {ns.length} #{i} done", file=sys.stderr, flush=True)
            Path(ns.json).write_text(json.dumps(
                {"task": ns.task, "length": ns.length, "seed": ns.seed, "samples": i + 1,
                 "mode": MODE, "records": records}, indent=1) + "\n")
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["policy"], r["floor_alpha"], r["window_share"], r["budget"])].append(r)
    print(f"{ns.task} {ns.length}, {MODE}, {ns.samples} prompts (seed {ns.seed}); full cache "
          f"{100 * np.mean([r['full'] for r in records]):.1f} %")
    for (policy, floor, share, b), rs in sorted(cells.items()):
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("score", "top1", "kl")}
        print(f"{policy:17} floor {floor:<4g} share {share:<4g} {b:4}  acc "
              f"{100 * m['score']:5.1f} %  top-1 {100 * m['top1']:5.1f} %  KL {m['kl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
