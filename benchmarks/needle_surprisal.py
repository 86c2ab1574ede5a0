"""Where the needles rank by surprisal: is what a later question asks for what the model
could not predict?

For each prompt of a needle task: every context token's surprisal from a prefill with all
logits (`sweep_kvzip_scores.prefill_surprisal`), then, per needle sentence ("One of the
special magic numbers for <key> is: <value>."), the rank (0 = most surprising of the
prompt's tokens) of its most surprising token, of its key word and of its value's digits,
and of the sentence's best 3-token mean (what `sweep_kvzip_scores.py`'s ``iN`` / ``jN``
variants select by). Needles are listed in document order.

    .venv/bin/python benchmarks/needle_surprisal.py --task niah-multikey --length 4096 \\
        --samples 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agnostic_misses import NEEDLE  # noqa: E402
from diagnose_kvzip_needle import _span  # noqa: E402
from sweep_kvzip_scores import prefill_surprisal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ranks(x: np.ndarray) -> np.ndarray:
    """Each entry's rank in ``x``, 0 for the largest."""
    r = np.empty(len(x), dtype=int)
    r[np.argsort(-x, kind="stable")] = np.arange(len(x))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    out = Path(ns.json or RESULTS / f"needle_surprisal_{ns.task}_{ns.length}.json")
    spec = EvalSpec(tasks=(ns.task,), lengths=(ns.length,), budgets=(256,),
                    policies=("full",), modes=("question-agnostic",), samples=ns.samples,
                    threads=ns.threads, seed=ns.seed)
    records = []
    with Evaluator(spec) as ev:
        llm = ev.llm
        for i in range(ns.samples):
            p = ev.prompt(ns.task, ns.length, i)
            nll = prefill_surprisal(ev, p.ctx)
            tok_rank = ranks(nll)
            mean_rank = ranks(np.convolve(nll, np.ones(3) / 3, mode="same"))
            pieces = [llm.detokenize([t]) for t in p.ctx]
            needles = []
            for m in NEEDLE.finditer("".join(pieces)):  # in document order
                span = range(*_span(pieces, m.start(), m.end()))
                needles.append({
                    "key": m.group(1), "tokens": [span.start, span.stop],
                    "best_token_rank": int(min(tok_rank[t] for t in span)),
                    "key_rank": int(tok_rank[_span(pieces, *m.span(1))[0]]),
                    "digit_ranks": [int(tok_rank[t])
                                    for t in range(*_span(pieces, *m.span(2)))],
                    "best_mean3_rank": int(min(mean_rank[t] for t in span))})
            rec = {"i": i, "tokens": len(p.ctx), "asked": p.sample.meta.get("key"),
                   "median_surprisal": float(np.median(nll[1:])), "needles": needles}
            records.append(rec)
            print(f"#{i} {len(p.ctx)} tokens, median surprisal "
                  f"{rec['median_surprisal']:.2f} nats; per needle (best token / key / "
                  "median digit / best 3-mean rank): " + "; ".join(
                      f"{n['key']} {n['best_token_rank']}/{n['key_rank']}/"
                      f"{int(np.median(n['digit_ranks']))}/{n['best_mean3_rank']}"
                      for n in needles), flush=True)
            out.write_text(json.dumps({"task": ns.task, "length": ns.length,
                                       "seed": ns.seed, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
