"""Where question-agnostic kvzip compression loses the needle (niah-single).

For each prompt: one prefill, the full cache's answer, one reconstruction (the eval's
question-agnostic scores), then:

- **retrieval heads**: the KV heads whose question-window attention (question-aware
  snapshot, the last ``window`` queries: the question and the answer prefix) puts the most
  mass on the needle's value tokens (the 7 digits), as a fraction of their mass on the
  document;
- for those heads, after ``ada-kvzip-global`` at ``--budget``: the rows granted, the value
  rows kept, and the value rows' ranks among the head's reconstruction scores;
- the answer with the policy's own scores, and with an **oracle**: the same scores with the
  needle sentence's rows forced to the top in every head (2.0, above any softmax maximum),
  the rest unchanged — if the oracle answers, what was missing was the needle's rows, not
  the rest of the document.

Writes one JSON record per prompt and prints a summary. A diagnosis on a few prompts, not
the eval.

    .venv/bin/python benchmarks/diagnose_kvzip_needle.py [--length 4096] [--samples 8]
        [--seed 0] [--budget 256] [--policy ada-kvzip-global] [--heads 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator
from adakv_local.bindings.policy import accumulate_max
from adakv_local.bindings.ragged import split_heads, split_layers

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "niah-single"
MODE = "question-agnostic"


def _span(pieces: list[str], start: int, stop: int) -> tuple[int, int]:
    """Tokens [a, b) whose text overlaps characters [start, stop) of ''.join(pieces)."""
    ends = np.cumsum([len(x) for x in pieces])
    a = int(np.searchsorted(ends, start, side="right"))
    b = int(np.searchsorted(ends, stop - 1, side="right")) + 1
    return a, b


def _positions(ev: Evaluator) -> list[list[np.ndarray]]:
    rc = ev.llm.ragged
    return [[rc.positions(il, h).copy() for h in range(rc.n_head_kv(il))]
            for il in range(rc.n_layer)]


def _probe_window(ev: Evaluator, ref: Any, probe: list[int]) -> tuple[np.ndarray, int]:
    """The window share's observation from a generic probe instead of the document's end:
    ``probe`` appended to ``ref``'s snapshot, its window observed, narrowed to the rows the
    snapshot holds (the probe's own rows dropped; nothing is evicted in the snapshot, so
    every head's rows are positions 0..n-1 and the probe's come after them)."""
    llm, g = ev.llm, ev.group
    llm.restore(ref.snap)
    llm.append_tokens(probe)
    rc = llm.ragged
    n_obs = rc.n_obs(ev.spec.window)
    # accumulate_max with no accumulator: a copy of the held rows' part of the observation
    out = accumulate_max(None, rc.observe_flat(n_obs), ref.lens, rc.all_lengths(), g)
    llm.restore(ref.snap)
    return out, n_obs


def _value_weighted(ev: Evaluator, ref: Any, scores: np.ndarray, how: str) -> np.ndarray:
    """``scores`` (the kvzip layout of ``ref``'s rows) times each row's value norm
    ``||v_j||`` (VATP-style: a row that is attended to but writes little matters little);
    ``how="head"`` divides the norms by their mean in the head, so only the ranking inside a
    head changes, ``"raw"`` leaves them as they are (the allocation across heads moves too)."""
    out = scores.copy()
    for il, flat in enumerate(split_layers(out, ref.lens, ev.group)):
        for h, blk in enumerate(split_heads(flat, ref.lens[il], ev.group)):
            norm = np.linalg.norm(ref.vrows[il][h], axis=1)
            blk *= norm / norm.mean() if how == "head" else norm
    return out


def diagnose(ev: Evaluator, index: int, length: int, budget: int, policy: str,
             n_heads: int, probe: str | None = None,
             vnorm: str | None = None) -> dict[str, Any]:
    """One prompt's record (see the module doc)."""
    llm, g = ev.llm, ev.group
    p = ev.prompt(TASK, length, index)
    pieces = [llm.detokenize([t]) for t in p.ctx]
    text = "".join(pieces)
    value = p.sample.answers[0]
    sentence = f"One of the special magic numbers for {p.sample.meta['key']} is: {value}."
    c0 = text.find(sentence)
    if c0 < 0:
        raise RuntimeError(f"prompt {index}: the needle is not in the detokenized context")
    n0, n1 = _span(pieces, c0, c0 + len(sentence))
    cv = text.index(value, c0)
    v0, v1 = _span(pieces, cv, cv + len(value))
    refs = ev.references(p)
    ag, aw = refs[MODE], refs["question-aware"]
    rec = ev.evaluate(p, ag, MODE, policy, budget)  # sets ag.kvzip["recon"]
    kz = ag.kvzip["recon"]
    llm.restore(ag.snap)
    pos = _positions(ev)
    sels = llm.compress(policy, budget, scores=kz)
    kept = [[pos[il][h][sels[il].keep[h]] if sels else pos[il][h]
             for h in range(len(pos[il]))] for il in range(len(pos))]
    awl = split_layers(aw.scores, aw.lens, g)
    kzl = split_layers(kz, ag.lens, g)
    heads = []
    for il in range(len(pos)):
        aws, kzs = split_heads(awl[il], aw.lens[il], g), split_heads(kzl[il], ag.lens[il], g)
        for h in range(len(pos[il])):
            vals = np.isin(pos[il][h], np.arange(v0, v1))
            doc = pos[il][h] < len(p.ctx)
            mass = float(aws[h][:, :len(doc)][:, vals].sum()
                         / max(1e-12, aws[h][:, :len(doc)][:, doc].sum()))
            s = kzs[h].max(axis=0)
            ranks = [int((s > x).sum()) for x in s[vals]]
            heads.append({"layer": il, "head": h, "value_mass": mass,
                          "granted": int(len(kept[il][h])),
                          "value_kept": int(np.isin(np.arange(v0, v1), kept[il][h]).sum()),
                          "value_ranks": ranks, "median_score": float(np.median(s))})
    heads.sort(key=lambda x: -x["value_mass"])
    total = sum(x["value_mass"] for x in heads)
    weighted = sum(x["value_mass"] * x["value_kept"] / (v1 - v0) for x in heads) / total
    # the oracle: the needle sentence forced to the top of every head
    forced = kz.copy()
    for il, flat in enumerate(split_layers(forced, ag.lens, g)):
        for h, blk in enumerate(split_heads(flat, ag.lens[il], g)):
            blk[:, np.isin(pos[il][h], np.arange(n0, n1))] = 2.0
    ag.kvzip["recon"] = forced
    oracle = ev.evaluate(p, ag, MODE, policy, budget)
    ag.kvzip["recon"] = kz
    probed: dict[str, Any] = {}
    if probe is not None:  # the window share from the probe's attention, not the document end
        saved = ag.scores, ag.n_obs
        ag.scores, ag.n_obs = _probe_window(ev, ag, llm.tokenize(probe, add_bos=False))
        try:
            r = ev.evaluate(p, ag, MODE, policy, budget)
        finally:
            ag.scores, ag.n_obs = saved
        probed = {"probe_answer": r["answer"], "probe_score": r["score"], "probe_kl": r["kl"]}
    if vnorm is not None:  # the reconstruction scores weighted by the rows' value norms
        ag.kvzip["recon"] = _value_weighted(ev, ag, kz, vnorm)
        try:
            r = ev.evaluate(p, ag, MODE, policy, budget)
        finally:
            ag.kvzip["recon"] = kz
        probed.update({"vnorm": vnorm, "vnorm_answer": r["answer"], "vnorm_score": r["score"],
                       "vnorm_kl": r["kl"]})
    return {"sample": index, "length": length, "prompt_tokens": len(p.ctx) + len(p.question),
            "budget": budget, "policy": policy, "depth": p.sample.meta["depth"],
            "needle_tokens": [n0, n1], "value_tokens": [v0, v1],
            "full_answer": ag.answer, "full_score": ag.score,
            "answer": rec["answer"], "score": rec["score"], "kl": rec["kl"],
            "oracle_answer": oracle["answer"], "oracle_score": oracle["score"],
            "oracle_kl": oracle["kl"], **probed, "value_kept_weighted": weighted,
            "retrieval_heads": heads[:n_heads]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="ada-kvzip-global")
    ap.add_argument("--heads", type=int, default=5, help="retrieval heads reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", default=None,
                    help="also answer with the window share read from this text appended "
                         "to the document (a generic probe) instead of the document's end")
    ap.add_argument("--vnorm", default=None, choices=["head", "raw"],
                    help="also answer with the reconstruction scores times the rows' value "
                         "norms (head: norms over their mean in the head)")
    ap.add_argument("--json", default=None,
                    help="output (default results/kvzip_needle_<length>.json)")
    ns = ap.parse_args()
    out = Path(ns.json or RESULTS / f"kvzip_needle_{ns.length}.json")
    spec = EvalSpec(tasks=(TASK,), lengths=(ns.length,), budgets=(ns.budget,),
                    policies=(ns.policy,), modes=("question-aware", MODE),
                    samples=ns.samples, seed=ns.seed, threads=ns.threads)
    records = []
    with Evaluator(spec) as ev:
        for i in range(ns.samples):
            r = diagnose(ev, i, ns.length, ns.budget, ns.policy, ns.heads, ns.probe,
                         ns.vnorm)
            records.append(r)
            top = r["retrieval_heads"][0]
            print(f"prompt {i}: full {r['full_score']:.0f} policy {r['score']:.0f} oracle "
                  f"{r['oracle_score']:.0f}; value rows kept (mass-weighted) "
                  f"{r['value_kept_weighted']:.2f}; top head L{top['layer']}.{top['head']} "
                  f"kept {top['value_kept']}/{len(top['value_ranks'])} of "
                  f"{top['granted']} granted", file=sys.stderr)
            out.write_text(json.dumps({"spec": vars(ns), "records": records}, indent=1))
    ok = [r for r in records if r["full_score"] == 1.0]
    for name, key in (("policy", "score"), ("oracle", "oracle_score"),
                      ("probe", "probe_score"), ("value norms", "vnorm_score")):
        if not ok or key not in ok[0]:
            continue
        print(f"{name}: {sum(r[key] for r in ok):.0f}/{len(ok)} of the prompts the full "
              "cache answers")
    for label, rs in (("answered", [r for r in ok if r["score"] == 1.0]),
                      ("missed", [r for r in ok if r["score"] < 1.0])):
        if rs:
            print(f"{label}: value rows kept, mass-weighted over the heads, mean "
                  f"{np.mean([r['value_kept_weighted'] for r in rs]):.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
