"""How LocalLLM's score pooling was chosen (docs/NOTES.md, "Causal pooling").

For each prompt of each task, one prefill and one observation (the eval's snapshot), then
ada-snapkv at every budget with every pooling variant (official centered kernel 7, causal
kernels 9-15), question-aware. Writes one JSON record per (prompt, variant, budget) and prints
the per-variant means (accuracy, top-1 agreement, KL vs the full cache, attention L1).

    .venv/bin/python benchmarks/sweep_pooling.py [--tasks niah-single,niah-multikey]
        [--length 2048] [--samples 10] [--budgets 128,256]
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
VARIANTS = [(7, "center"), (9, "causal"), (11, "causal"), (13, "causal"), (15, "causal")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="niah-single,niah-multikey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--budgets", default="128,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "pooling_sweep.json"))
    ns = ap.parse_args()
    budgets = tuple(int(b) for b in ns.budgets.split(","))
    records = []
    for task in ns.tasks.split(","):
        spec = EvalSpec(tasks=(task,), lengths=(ns.length,), budgets=budgets,
                        policies=("ada-snapkv",), samples=ns.samples, threads=ns.threads)
        with Evaluator(spec) as ev:
            for i in range(ns.samples):
                p = ev.prompt(task, ns.length, i)
                ref = ev.references(p)["question-aware"]
                try:
                    for kernel, align in VARIANTS:
                        for b in budgets:
                            r = ev.evaluate(p, ref, "question-aware", "ada-snapkv", b,
                                            kernel=kernel, pool_align=align)
                            records.append({
                                "task": task, "i": i, "var": f"{align}{kernel}", "budget": b,
                                "score": r["score"], "full": ref.score, "top1": r["top1"],
                                "kl": r["kl"], "l1": r["l1"], "answer": r["answer"]})
                finally:
                    ref.snap.close()
                print(f"{task} #{i} done", file=sys.stderr, flush=True)
    Path(ns.json).write_text(json.dumps({"length": ns.length, "samples": ns.samples,
                                         "records": records}, indent=1) + "\n")
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["task"], r["var"], r["budget"])].append(r)
    for (task, var, b), rs in sorted(cells.items()):
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("score", "full", "top1", "kl", "l1")}
        print(f"{task:14} {var:9} {b:4}  acc {100 * m['score']:5.1f} % (full "
              f"{100 * m['full']:5.1f} %)  top-1 {100 * m['top1']:5.1f} %  KL {m['kl']:.3f}  "
              f"L1 {m['l1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
