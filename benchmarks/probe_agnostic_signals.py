"""Two more question-agnostic signals tried on niah-single 4K (neither kept; docs/NOTES.md,
"What the question's rows are").

- ``distinct``: KeyDiff-style distinctiveness. Per KV head, ``d_j = 1 - cos(x_j, mean x)``
  over the head's V rows (``v``) or post-RoPE K rows (``k``); the kvzap scores are multiplied
  by ``exp(beta * z(d))`` (``z``: standardised in the head), so distinct rows rank higher.
  Also prints, for the six heads whose question-aware window puts the most mass on the
  needle's value tokens, the median rank of those tokens by kvzap score and by each
  distinctiveness.
- ``reconsum``: the reconstruction's attention *sums* (H2O over a reconstruction: every row's
  attention summed over all reconstruction queries, observed per chunk) as the window share's
  source instead of the document end's last ``window`` queries, for the exact maxima
  (``kvzip``, reconstructed here with the same chunks and prompts) and the predicted ones
  (``kvzap``). The oracle (benchmarks/oracle_question_rows.py) found the question's own
  share to be what rescues agnostic compression; this asks whether attention mass from
  generic queries over the whole document stands in for it.

    .venv/bin/python benchmarks/probe_agnostic_signals.py distinct --samples 0,4,6,2,5
    .venv/bin/python benchmarks/probe_agnostic_signals.py reconsum --samples 0,1,2,3,4
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
from adakv_local.bindings.policy import accumulate_max
from adakv_local.bindings.ragged import split_heads, split_layers
from adakv_local.cache.reconstruct import reconstruction_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_kvzip_needle import _span  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
AGN, AWR = "question-agnostic", "question-aware"
TASK = "niah-single"
KVZAP, KVZIP = "ada-kvzap-global", "ada-kvzip-global"


def distinctness(x: np.ndarray) -> np.ndarray:
    """``1 - cos(x_j, mean x)`` per row of ``x`` ``[rows, d]``."""
    m = x.mean(axis=0)
    return 1 - (x @ m) / (np.linalg.norm(x, axis=1) * np.linalg.norm(m) + 1e-9)


def blended(ev: Evaluator, ref: Any, scores: np.ndarray, feats: list[list[np.ndarray]],
            beta: float) -> np.ndarray:
    """``scores`` times ``exp(beta * z(feats))`` per head."""
    out = scores.copy()
    for il, flat in enumerate(split_layers(out, ref.lens, ev.group)):
        for h, blk in enumerate(split_heads(flat, ref.lens[il], ev.group)):
            d = feats[il][h]
            blk *= np.exp(beta * (d - d.mean()) / (d.std() + 1e-9)).astype(np.float32)
    return out


def median_rank(x: np.ndarray, v0: int, v1: int) -> int:
    """The median over rows ``v0..v1-1`` of how many rows score above them in ``x``."""
    return int(np.median([(x > x[j]).sum() for j in range(v0, v1)]))


def run_distinct(ev: Evaluator, i: int, length: int, budget: int) -> dict[str, Any]:
    llm, g = ev.llm, ev.group
    p = ev.prompt(TASK, length, i)
    pieces = [llm.detokenize([t]) for t in p.ctx]
    text, value = "".join(pieces), p.sample.answers[0]
    cv = text.rindex(value)
    v0, v1 = _span(pieces, cv, cv + len(value))
    refs = ev.references(p)
    ag, aw = refs[AGN], refs[AWR]
    try:
        base = ev.evaluate(p, ag, AGN, KVZAP, budget)
        kz = ag.kvzip["pred"]
        llm.restore(ag.snap)
        rc = llm.ragged
        feats = {"v": [[distinctness(v) for v in layer] for layer in ag.vrows],
                 "k": [[distinctness(rc.read_rows(il, h)[0]) for h in range(rc.n_head_kv(il))]
                       for il in range(rc.n_layer)]}
        heads = []
        awl, kzl = split_layers(aw.scores, aw.lens, g), split_layers(kz, ag.lens, g)
        for il in range(rc.n_layer):
            aws, kzs = split_heads(awl[il], aw.lens[il], g), split_heads(kzl[il], ag.lens[il], g)
            for h in range(rc.n_head_kv(il)):
                n = int(ag.lens[il][h])
                mass = float(aws[h][:, v0:v1].sum() / max(1e-12, aws[h][:, :n].sum()))
                heads.append({"layer": il, "head": h, "value_mass": mass,
                              "rank_kvzap": median_rank(kzs[h].max(axis=0), v0, v1),
                              "rank_vdistinct": median_rank(feats["v"][il][h], v0, v1),
                              "rank_kdistinct": median_rank(feats["k"][il][h], v0, v1)})
        heads.sort(key=lambda x: -x["value_mass"])
        rec: dict[str, Any] = {"i": i, "full": ag.score, "kvzap": base["score"],
                               "kvzap_kl": base["kl"], "value_tokens": [v0, v1],
                               "retrieval_heads": heads[:6]}
        for name, f in feats.items():
            for beta in (0.5, 1.0):
                ag.kvzip["pred"] = blended(ev, ag, kz, f, beta)
                try:
                    r = ev.evaluate(p, ag, AGN, KVZAP, budget)
                finally:
                    ag.kvzip["pred"] = kz
                rec[f"{name}{beta}"], rec[f"{name}{beta}_kl"] = r["score"], r["kl"]
        return rec
    finally:
        ag.snap.close()
        aw.snap.close()


def reconstruction_sums(ev: Evaluator, text: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Maxima and sums of the reconstruction queries' attention over the rows held: the
    controller's reconstruction (its chunks and prompts, ``method="observe"``), with each
    chunk's sums observed too before the chunk is removed; and the query count."""
    cache = ev.llm._ada("reconstruction sums")
    rc, g = cache.rc, ev.group
    lens0 = rc.all_lengths()
    sums: list[np.ndarray] = []
    queries: list[int] = []

    def on_chunk(_: np.ndarray, lens: list[np.ndarray]) -> None:
        n = int(lens[0][0] - lens0[0][0])  # every head holds the chunk's n rows
        # accumulate_max with no accumulator: a copy of the held rows' part
        sums.append(accumulate_max(None, rc.observe_flat(n), lens0, lens, g))
        queries.append(n)

    mx = reconstruction_scores(cache, text, cache.recon_prompt, cache.recon_chunk,
                               on_chunk=on_chunk)
    return mx, np.sum(sums, axis=0), sum(queries)


def run_reconsum(ev: Evaluator, i: int, length: int, budget: int) -> dict[str, Any]:
    p = ev.prompt(TASK, length, i)
    ag = ev.references(p)[AGN]
    try:
        rec: dict[str, Any] = {"i": i, "full": ag.score}
        r = ev.evaluate(p, ag, AGN, KVZAP, budget)
        rec["kvzap"], rec["kvzap_kl"] = r["score"], r["kl"]
        ev.llm.restore(ag.snap)
        t = time.perf_counter()
        mx, sm, nq = reconstruction_sums(ev, list(p.ctx))
        rec["sums_seconds"] = ag.shared["recon_seconds"] = time.perf_counter() - t
        ag.kvzip["recon"] = mx
        r = ev.evaluate(p, ag, AGN, KVZIP, budget)
        rec["kvzip"], rec["kvzip_kl"] = r["score"], r["kl"]
        saved = ag.scores, ag.n_obs
        ag.scores, ag.n_obs = sm, nq  # the window share reads the sums
        try:
            for share in (0.25, 0.5):
                for name, pol in (("kvzip", KVZIP), ("kvzap", KVZAP)):
                    r = ev.evaluate(p, ag, AGN, pol, budget, window_share=share)
                    rec[f"{name}_sum{share}"], rec[f"{name}_sum{share}_kl"] = r["score"], r["kl"]
        finally:
            ag.scores, ag.n_obs = saved
        return rec
    finally:
        ag.snap.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("signal", choices=("distinct", "reconsum"))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", default="0,1,2,3,4", help="prompt indices, comma-separated")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    idx = [int(x) for x in ns.samples.split(",")]
    out = Path(ns.json or RESULTS / f"agnostic_{ns.signal}_{ns.length}.json")
    modes = (AGN, AWR) if ns.signal == "distinct" else (AGN,)
    spec = EvalSpec(tasks=(TASK,), lengths=(ns.length,), budgets=(ns.budget,),
                    policies=(KVZAP,), modes=modes, samples=max(idx) + 1,
                    threads=ns.threads, seed=ns.seed)
    run = run_distinct if ns.signal == "distinct" else run_reconsum
    records: list[dict[str, Any]] = []
    with Evaluator(spec) as ev:
        for i in idx:
            records.append(run(ev, i, ns.length, ns.budget))
            print(json.dumps({k: v for k, v in records[-1].items()
                              if not isinstance(v, list)}), file=sys.stderr, flush=True)
            out.write_text(json.dumps({"signal": ns.signal, "task": TASK, "length": ns.length,
                                       "budget": ns.budget, "seed": ns.seed,
                                       "records": records}, indent=1) + "\n")
    keys = [k for k, v in records[0].items()
            if isinstance(v, float) and not k.endswith(("_kl", "_seconds"))]
    print(f"{ns.signal}, {TASK} {ns.length} at {ns.budget} rows, {len(records)} prompts: "
          + ", ".join(f"{k} {100 * np.mean([r[k] for r in records]):.0f} %" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
