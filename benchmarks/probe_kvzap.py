"""Experiment: can kvzip's reconstruction scores be predicted from the cache's own rows?

KVzap (Jegou & Jeblick, 2026) trains a small per-layer predictor of KVzip's scores from the
hidden states, so that question-agnostic scoring costs no second pass over the text. Here the
features are what the ragged cache already holds, per row of each KV head: its V row, the
RoPE-invariant norms of its K row's rotation pairs, and its position (log). A ridge
regression per (layer, KV head) is fitted to log(exact kvzip score) on calibration documents
(the product's calibration, cache/predict.py: the Python language reference), then tested on
the eval's prompts: rank correlation with the exact scores, overlap of the rows kept, and the
answer of ``ada-kvzip-global`` with the exact scores vs ``ada-kvzap-global`` with the
predicted ones, question-agnostic.

    .venv/bin/python benchmarks/probe_kvzap.py [--length 2048] [--samples 8] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator
from adakv_local.cache import predict

RESULTS = Path(__file__).resolve().parent / "results"
MODE = "question-agnostic"
KVZAP_OF = {"kvzip": "kvzap", "ada-kvzip": "ada-kvzap", "ada-kvzip-global": "ada-kvzap-global"}


def kept_set(ev: Evaluator, ref: Any, scores: np.ndarray, policy: str, budget: int) -> set:
    llm = ev.llm
    llm.restore(ref.snap)
    rc = llm.ragged
    sels = llm.compress(policy, budget, scores=scores, n_obs=ref.n_obs,
                        window_scores=ref.scores)
    out = predict.kept_positions(rc)
    del sels
    llm.restore(ref.snap)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="calibrate again")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="ada-kvzip-global", choices=sorted(KVZAP_OF))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    out = Path(ns.json or RESULTS / f"kvzap_probe_{ns.length}.json")
    spec = EvalSpec(tasks=(ns.task,), lengths=(ns.length,), budgets=(ns.budget,),
                    policies=(ns.policy, KVZAP_OF[ns.policy]), modes=(MODE,),
                    samples=ns.samples, seed=0, threads=ns.threads)
    with Evaluator(spec) as ev:
        llm, g = ev.llm, ev.group
        rc = llm.ragged
        t0 = time.perf_counter()
        meta = llm.calibrate_kvzap(force=ns.force)
        calib_s = time.perf_counter() - t0
        predictor = llm._ada("probe").kvzap_predictor()
        print(f"calibration: {calib_s:.0f} s here, {meta.get('seconds')} s when fitted; "
              f"fit R2 median {meta.get('r2_median'):.3f}", file=sys.stderr)

        records = []
        for i in range(ns.samples):
            p = ev.prompt(ns.task, ns.length, i)
            ag = ev.references(p)[MODE]
            exact = ev.evaluate(p, ag, MODE, ns.policy, ns.budget)
            kz = ag.kvzip["recon"]
            r = ev.evaluate(p, ag, MODE, KVZAP_OF[ns.policy], ns.budget)  # the product's path
            pz = ag.kvzip["pred"]
            a, b = kept_set(ev, ag, kz, ns.policy, ns.budget), kept_set(ev, ag, pz, ns.policy,
                                                                        ns.budget)
            llm.restore(ag.snap)
            t = time.perf_counter()
            predictor.predict(rc, g)
            pred_s = time.perf_counter() - t
            rec = {"sample": i, "tokens": len(p.ctx), "full_score": ag.score,
                   "exact_score": exact["score"], "exact_kl": exact["kl"],
                   "pred_score": r["score"], "pred_kl": r["kl"],
                   "spearman_median": predict.rank_correlation(kz, pz, ag.lens, g),
                   "kept_jaccard": len(a & b) / max(1, len(a | b)),
                   "prefill_s": ag.prefill_seconds, "scoring_s": exact.get("scoring_seconds"),
                   "predict_s": pred_s}
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr)
            out.write_text(json.dumps({"spec": vars(ns), "calibration": meta,
                                       "records": records}, indent=1))
    ok = [r for r in records if r["full_score"] == 1.0]
    for k in ("exact_score", "pred_score"):
        print(f"{k}: {sum(r[k] for r in ok):.0f}/{len(ok)}; KL "
              f"{np.mean([r[k.replace('score', 'kl')] for r in records]):.3f}")
    print(f"spearman {np.mean([r['spearman_median'] for r in records]):.3f}, kept jaccard "
          f"{np.mean([r['kept_jaccard'] for r in records]):.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
