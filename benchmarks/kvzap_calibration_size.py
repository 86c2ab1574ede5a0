"""How many calibration documents the kvzap predictor needs.

Calibrates on 1, 2, 4, ... of the usual calibration documents (the Python language
reference, ``cache/predict.py``) in one pass, and after each checkpoint compares the predicted
scores with the exact reconstruction scores on niah-single prompts: rank correlation (median
over the heads) and the Jaccard overlap of the rows ``ada-kvzip-global`` keeps at
``--budget`` rows from each. Writes ``benchmarks/results/kvzap_calibration_size.json``.

    .venv/bin/python benchmarks/kvzap_calibration_size.py [--docs 8] [--prompts 4]
        [--length 2048] [--budget 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from adakv_local import LocalLLM
from adakv_local.bench.eval_tasks import make_sample
from adakv_local.cache import predict

RESULTS = Path(__file__).resolve().parent / "results"


def _kept(llm: LocalLLM, snap: object, scores: np.ndarray, budget: int) -> set:
    llm.restore(snap)
    llm.compress("ada-kvzip-global", budget, scores=scores, n_obs=1, window_share=0.0)
    return predict.kept_positions(llm.ragged)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "kvzap_calibration_size.json"))
    ns = ap.parse_args()
    n_ctx = ns.length + 1024
    with LocalLLM(None, kv_budget=n_ctx - 1, policy="full", n_ctx=n_ctx, n_threads=ns.threads,
                  seed=0) as llm:
        g = llm.n_head // llm.n_head_kv
        tests = []
        for seed in range(ns.prompts):  # the eval's first prompts are other seeds' samples
            s = make_sample("niah-single", ns.length, 500 + seed)
            llm.reset()
            llm.prefill_tokens(llm.tokenize(llm.format_chat(s.context), add_bos=False))
            snap = llm.snapshot()
            exact = llm.kvzip_scores("ada-kvzip-global")
            lens = [x.copy() for x in llm.ragged.all_lengths()]
            tests.append((snap, exact, lens, _kept(llm, snap, exact, ns.budget)))
        cache = llm._ada("calibration size")
        tok = lambda t: llm.tokenize(t, add_bos=False)  # noqa: E731
        docs = predict.calibration_docs(tok, llm.format_chat, ns.docs, predict.CALIB_TOKENS)
        work = cache.spawn(max(len(d) for d in docs) + cache.recon_chunk
                           + cache.recon_prompt.longest + 8)
        normal: list = []
        rows = []
        t0 = time.perf_counter()
        try:
            for i, doc in enumerate(docs):
                predict.accumulate(work, doc, normal)
                n = i + 1
                if n & (n - 1) and n != len(docs):  # 1, 2, 4, 8, ... and the last
                    continue
                pred = predict.fit(normal, predict._rope_neox(llm.ragged.model_ptr))
                rho, jac = [], []
                for snap, exact, lens, kept in tests:
                    llm.restore(snap)
                    cache._kvzap = pred  # the product's path with this predictor
                    p = llm.kvzip_scores("ada-kvzap-global")
                    rho.append(predict.rank_correlation(exact, p, lens, g))
                    k = _kept(llm, snap, p, ns.budget)
                    jac.append(len(k & kept) / len(k | kept))
                rows.append({"docs": n, "tokens": sum(len(d) for d in docs[:n]),
                             "seconds": round(time.perf_counter() - t0, 1),
                             "r2_median": pred.meta["r2_median"],
                             "spearman_median": float(np.mean(rho)),
                             "kept_jaccard": float(np.mean(jac))})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            work.close()
            for snap, *_ in tests:
                snap.close()
    Path(ns.json).write_text(json.dumps({"spec": vars(ns), "rows": rows}, indent=1) + "\n")
    print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
