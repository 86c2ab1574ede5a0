"""How much of the question-agnostic gap is the choice of rows? An oracle that chooses them
knowing the question, then decodes as question-agnostic compression does.

For each prompt (the eval's prompts and snapshots, ``adakv-local eval``'s scoring):

- ``agnostic``: the policy compresses the document before the question (the eval's
  question-agnostic mode);
- ``aware``: the policy compresses after the question (question-aware mode: the question's
  own rows were computed over the full cache, and the first answer token too);
- ``oracle``: the rows of the document that the question-aware selection keeps are forced
  into the question-agnostic compression (raised above every score, window share 0), so the
  same rows of the document are kept, but the question is then processed against the
  compressed cache, as in a later chat turn;
- ``oracle_noshare``: the same with the question-aware selection made without the window
  share (the question's rows only raise the scores through its window maxima).

If ``oracle`` answers where ``agnostic`` does not, a better choice of rows exists at this
budget for a question-agnostic cache: the gap is the scorer's, not the budget's.

    .venv/bin/python benchmarks/oracle_question_rows.py --task niah-single --length 4096
        [--start 0] [--samples 10] [--budget 256] [--policy ada-kvzap-global]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator, kvzip_scorer
from adakv_local.bindings.policy import WINDOW_FORCED
from adakv_local.bindings.ragged import split_heads, split_layers
from adakv_local.defaults import KVZIP_WINDOW_SHARE

RESULTS = Path(__file__).resolve().parent / "results"
AGN, AWR = "question-agnostic", "question-aware"


def forced_scores(ev: Evaluator, aw: Any, ag: Any, scorer: str, policy: str, budget: int,
                  share: float) -> np.ndarray:
    """``ag``'s kvzip scores with the document rows kept by the question-aware selection
    (``policy`` at ``budget``, window share ``share``) raised to WINDOW_FORCED."""
    llm, g = ev.llm, ev.group
    llm.restore(aw.snap)
    rc = llm.ragged
    pos = [[rc.positions(il, h).copy() for h in range(rc.n_head_kv(il))]
           for il in range(rc.n_layer)]
    sels = llm.compress(policy, budget, scores=aw.kvzip[scorer], n_obs=aw.n_obs,
                        window_scores=aw.scores, window_share=share)
    out = ag.kvzip[scorer].copy()
    for il, flat in enumerate(split_layers(out, ag.lens, g)):
        for h, blk in enumerate(split_heads(flat, ag.lens[il], g)):
            kept = pos[il][h][sels[il].keep[h]] if sels else pos[il][h]
            blk[:, kept[kept < blk.shape[1]]] = WINDOW_FORCED  # not the question's rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="ada-kvzap-global")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    out = Path(ns.json or RESULTS / f"oracle_rows_{ns.task}_{ns.length}.json")
    idx = range(ns.start, ns.start + ns.samples)
    spec = EvalSpec(tasks=(ns.task,), lengths=(ns.length,), budgets=(ns.budget,),
                    policies=(ns.policy,), modes=(AGN, AWR), samples=idx.stop,
                    threads=ns.threads, seed=ns.seed)
    scorer = kvzip_scorer(ns.policy)
    b, pol = ns.budget, ns.policy
    records: list[dict[str, Any]] = []
    with Evaluator(spec) as ev:
        for i in idx:
            p = ev.prompt(ns.task, ns.length, i)
            refs = ev.references(p)
            ag, aw = refs[AGN], refs[AWR]
            try:
                rec: dict[str, Any] = {"i": i, "full": ag.score}
                for name, ref, mode in (("agnostic", ag, AGN), ("aware", aw, AWR)):
                    r = ev.evaluate(p, ref, mode, pol, b)
                    rec[name], rec[f"{name}_kl"] = r["score"], r["kl"]
                raw = ag.kvzip[scorer]
                for name, share in (("oracle", KVZIP_WINDOW_SHARE), ("oracle_noshare", 0.0)):
                    ag.kvzip[scorer] = forced_scores(ev, aw, ag, scorer, pol, b, share)
                    try:  # the forced rows only: no window share of the document's end
                        r = ev.evaluate(p, ag, AGN, pol, b, window_share=0.0)
                    finally:
                        ag.kvzip[scorer] = raw
                    rec[name], rec[f"{name}_kl"] = r["score"], r["kl"]
                    rec[f"{name}_answer"] = r["answer"]
            finally:
                ag.snap.close()
                aw.snap.close()
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if "answer" not in k}),
                  file=sys.stderr, flush=True)
            out.write_text(json.dumps({"task": ns.task, "length": ns.length, "seed": ns.seed,
                                       "budget": b, "policy": pol, "records": records},
                                      indent=1) + "\n")
    keys = ("full", "agnostic", "aware", "oracle", "oracle_noshare")
    print(f"{ns.task} {ns.length}, {pol} at {b} rows, {len(records)} prompts: " + ", ".join(
        f"{k} {100 * np.mean([r[k] for r in records]):.0f} %" for k in keys))
    print("KL: " + ", ".join(f"{k} {np.mean([r[k + '_kl'] for r in records]):.3f}"
                             for k in keys[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
