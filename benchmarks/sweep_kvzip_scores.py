"""Transforms of the kvzip scores before allocation, question-agnostic: pooling along rows.

For each prompt: one prefill, the eval's question-agnostic snapshot, the kvzip scores
(predicted or exact) once; then for every variant the scores are transformed (max-pooled
along each head's rows with an odd kernel, centred or causal), the snapshot is restored,
compressed from the transformed scores, and scored as the eval scores it (accuracy, top-1,
KL vs the full cache). An exploration on a few prompts, not the eval: a variant that wins
here is a candidate for a full `adakv-local eval` run, not a new default.

    .venv/bin/python benchmarks/sweep_kvzip_scores.py --task niah-single --length 4096
        [--samples 8] [--policy ada-kvzap-global] [--budgets 256] [--variants none,c3,c5,k5]

Variants, parts joined by ``+`` (``c5+s0``): ``none`` (the scores as they are), ``cN``
(centred max pool, kernel N), ``kN`` (causal max pool: each row and the N-1 before it),
``fN`` (the first N rows of every head forced, as the window share forces its rows),
``iN`` / ``jN`` (surprisal, Selective Context's self-information: the rows around the most
surprising tokens of the document, by 3-token mean surprisal from a second prefill with
every token's logits, +-8 / +-16 rows each, forced in every head until N rows are taken),
``sX`` (window share X), ``wN`` (window N), ``aX`` (floor alpha X), ``p`` (the window
share read from a probe instead of the document's end: the user turn's first paragraph, its
text up to the first blank line, re-read after the document; the turn's own framing of what
follows, as a stand-in for a question not asked yet), ``q`` (the window share read from a
question the model writes itself: a new user turn "Ask one question about the text above."
and up to 24 greedy tokens of the model's reply, observed, then removed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local.bench.evaluate import EvalSpec, Evaluator, kvzip_scorer, log_softmax
from adakv_local.bindings.policy import WINDOW_FORCED
from adakv_local.bindings.ragged import split_heads, split_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_kvzip_needle import _probe_window  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODE = "question-agnostic"


def pool_rows(a: np.ndarray, kernel: int, align: str) -> np.ndarray:
    """Max over a window of ``kernel`` rows along the last axis (edges: what exists)."""
    if kernel <= 1:
        return a
    n = a.shape[-1]
    if align == "c":
        lo, hi = kernel // 2, kernel // 2
    else:
        lo, hi = kernel - 1, 0
    out = a.copy()
    for s in range(-lo, hi + 1):
        if s == 0:
            continue
        if s > 0:  # row r sees row r + s
            np.maximum(out[..., :n - s], a[..., s:], out=out[..., :n - s])
        else:
            np.maximum(out[..., -s:], a[..., :n + s], out=out[..., -s:])
    return out


def parse(variant: str) -> tuple[list[tuple[str, int]], dict[str, float], str | None]:
    """``variant`` (parts joined by ``+``) as score transforms, compress options and the
    window share's probe (``"p"``, ``"q"`` or None: the document's end)."""
    transforms: list[tuple[str, int]] = []
    opts: dict[str, float] = {}
    probe = None
    for part in variant.split("+"):
        if part == "none":
            continue
        kind, num = part[0], part[1:]
        if kind in "ckfij":
            transforms.append((kind, int(num)))
        elif part in ("p", "q"):
            probe = part
        elif kind == "s":
            opts["window_share"] = float(num)
        elif kind == "w":
            opts["window"] = int(num)
        elif kind == "a":
            opts["floor_alpha"] = float(num)
        else:
            raise SystemExit(f"unknown variant part {part!r}")
    return transforms, opts, probe


def surprising_rows(nll: np.ndarray, n_rows: int, half: int) -> np.ndarray:
    """Positions around the most surprising tokens: the token of highest 3-token mean
    surprisal and ``half`` rows either side, then the next outside those, until
    ``n_rows`` positions are taken."""
    c = np.convolve(nll, np.ones(3) / 3, mode="same")
    taken = np.zeros(len(nll), dtype=bool)
    for t in np.argsort(-c):
        if taken.sum() >= n_rows:
            break
        if taken[t]:
            continue
        taken[max(0, t - half):t + half + 1] = True
    return np.flatnonzero(taken)[:n_rows]


def transform(scores: np.ndarray, lens: list[np.ndarray], group: int,
              transforms: list[tuple[str, int]], nll: np.ndarray | None = None) -> np.ndarray:
    """``scores`` (observe_flat layout) after ``transforms``."""
    if not transforms:
        return scores
    out = np.array(scores, dtype=np.float32, copy=True)
    surprising = {}  # (kind, N): the rows around the most surprising tokens
    for kind, num in transforms:
        if kind in "ij":
            if nll is None:
                raise ValueError("surprisal variants need the prefill's surprisal")
            surprising[(kind, num)] = surprising_rows(nll, num, 8 if kind == "i" else 16)
    for il, layer in enumerate(split_layers(out, lens, group)):
        for blk in split_heads(layer, lens[il], group):
            for kind, num in transforms:
                if kind == "f":  # the first rows forced, as the window share forces rows
                    blk[:, :num] = WINDOW_FORCED
                elif kind in "ij":  # forced in every head
                    blk[:, surprising[(kind, num)]] = WINDOW_FORCED
                else:
                    blk[...] = pool_rows(blk, num, kind)
    return out


def opening_paragraph(ev: Evaluator, ctx: list[int]) -> list[int]:
    """The tokens of the user turn's first paragraph in ``ctx`` (the chat prefix, then the
    turn's text): from the turn's start to its first blank line."""
    llm = ev.llm
    head = llm.format_chat([{"role": "user", "content": "\x00"}]).split("\x00")[0]
    n0 = len(llm.tokenize(head, add_bos=False))
    pieces = [llm.detokenize([t]) for t in ctx[n0:n0 + 512]]
    text = "".join(pieces)
    cut = text.find("\n\n")
    if cut < 0:
        raise SystemExit("no blank line in the turn's first 512 tokens")
    ends = np.cumsum([len(x) for x in pieces])
    return list(ctx[n0:n0 + int(np.searchsorted(ends, cut, side="right"))])


SELF_QUESTION = "Ask one question about the text above."
"""The request for variant ``q``'s self-written question."""


def self_question(ev: Evaluator, ref: Any, n_new: int = 24) -> list[int]:
    """The tokens of a user turn asking for a question about the snapshot's text, and the
    model's greedy reply (at most ``n_new`` tokens, to its end of turn); restores the
    snapshot after."""
    llm = ev.llm
    rp = llm._ada("self question").recon_prompt
    seq = [*rp.opener, *llm.tokenize(SELF_QUESTION, add_bos=False), *rp.closer]
    llm.restore(ref.snap)
    logits = llm.append_tokens(seq)
    for _ in range(n_new):
        tok = int(logits.argmax())
        if llm.is_eog(tok):
            break
        seq.append(tok)
        logits = llm.append_tokens([tok])
    llm.restore(ref.snap)
    return seq


def prefill_surprisal(ev: Evaluator, ctx: list[int]) -> np.ndarray:
    """Each token's surprisal in ``ctx`` (nats) under the model given the tokens before it
    (0 for the first), from a prefill with every token's logits (the cache is reset and left
    holding ``ctx``)."""
    llm = ev.llm
    llm.reset()
    nll = np.zeros(len(ctx))
    for s in range(0, len(ctx), 512):
        logp = log_softmax(np.asarray(llm.append_tokens(ctx[s:s + 512], all_logits=True)))
        nxt = np.asarray(ctx[s + 1:s + 1 + len(logp)])
        nll[s + 1:s + 1 + len(nxt)] = -logp[np.arange(len(nxt)), nxt]
    return nll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="256")
    ap.add_argument("--policy", default="ada-kvzap-global")
    ap.add_argument("--variants", default="none,c3,c5,c7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    budgets = tuple(int(b) for b in ns.budgets.split(","))
    variants = ns.variants.split(",")
    out = Path(ns.json or RESULTS / f"kvzip_scores_sweep_{ns.task}_{ns.length}.json")
    spec = EvalSpec(tasks=(ns.task,), lengths=(ns.length,), budgets=budgets,
                    policies=(ns.policy,), modes=(MODE,), samples=ns.samples,
                    threads=ns.threads, seed=ns.seed)
    scorer = kvzip_scorer(ns.policy)
    records = []
    with Evaluator(spec) as ev:
        for i in range(ns.start, ns.start + ns.samples):
            p = ev.prompt(ns.task, ns.length, i)
            ref = ev.references(p)[MODE]
            try:
                ev.evaluate(p, ref, MODE, ns.policy, budgets[0])  # computes ref.kvzip
                raw = ref.kvzip[scorer]
                nll = None
                if any(t[0] in "ij" for v in variants for t in parse(v)[0]):
                    nll = prefill_surprisal(ev, p.ctx)
                    ev.llm.restore(ref.snap)
                for v in variants:
                    transforms, opts, probe = parse(v)
                    ref.kvzip[scorer] = transform(raw, ref.lens, ev.group, transforms, nll)
                    saved = ref.scores, ref.n_obs
                    if probe:  # the window share reads the probe
                        toks = (opening_paragraph(ev, p.ctx) if probe == "p"
                                else self_question(ev, ref))
                        if probe == "q":
                            print(f"  self question: {ev.llm.detokenize(toks)!r}",
                                  file=sys.stderr, flush=True)
                        ref.scores, ref.n_obs = _probe_window(ev, ref, toks)
                    try:
                        rs = [ev.evaluate(p, ref, MODE, ns.policy, b, **opts) for b in budgets]
                    finally:
                        ref.scores, ref.n_obs = saved
                    for b, r in zip(budgets, rs, strict=True):
                        records.append({"i": i, "variant": v, "budget": b,
                                        "score": r["score"], "full": ref.score,
                                        "top1": r["top1"], "kl": r["kl"],
                                        "answer": r["answer"]})
                    ref.kvzip[scorer] = raw
            finally:
                ref.snap.close()
            line = " ".join(f"{r['variant']}:{r['score']:.0f}" for r in records if r["i"] == i)
            print(f"{ns.task} {ns.length} #{i} full {ref.score:.0f} | {line}",
                  file=sys.stderr, flush=True)
            out.write_text(json.dumps(
                {"task": ns.task, "length": ns.length, "seed": ns.seed, "policy": ns.policy,
                 "mode": MODE, "records": records}, indent=1) + "\n")
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["variant"], r["budget"])].append(r)
    print(f"{ns.task} {ns.length}, {MODE}, {ns.policy}, {len(records) // max(1, len(cells))} "
          f"prompts (seed {ns.seed}); full cache "
          f"{100 * np.mean([r['full'] for r in records]):.1f} %")
    for (v, b), rs in sorted(cells.items()):
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("score", "top1", "kl")}
        print(f"{v:6} {b:4}  acc {100 * m['score']:5.1f} %  top-1 {100 * m['top1']:5.1f} %  "
              f"KL {m['kl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
