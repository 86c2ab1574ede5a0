"""A document turn, then a question turn, through ``LocalLLM.chat`` (issue 17 item 4).

The product's main use: a user pastes a document, the cache is compressed to the budget,
and the question comes in a later turn. Per seeded needle prompt (RULER niah-single in the
essays): turn 1 is the document (the model's greedy reply, ``--reply-tokens`` long, stays
in the conversation), turn 2 the question; the answer is scored by RULER's string match.
Every configuration is its own ``LocalLLM`` on the real chat path (compression inside the
prefill of each turn and while decoding), vanilla llama.cpp first.

Vanilla's margin (how the test prompts are chosen): its own reply to the question is
teacher-forced and, for every token of the needle's number in it, the log-probability lead
of that token over the strongest other token is taken; the margin is the smallest lead
(nats). A prompt with a margin >= 1 nat is one vanilla answers clearly, not by a coin flip.

    .venv/bin/python benchmarks/multiturn_needle.py [--lengths 1024,2048,3072] [--seeds 8]
        [--budget 256] [--policies ada-snapkv,snapkv,ada-kvzip,kvzip]
        [--json benchmarks/results/multiturn_needle.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def conversation(sample: Any, reply: str | None = None) -> list[dict[str, str]]:
    """Turn 1 (the document), or the whole conversation up to the question turn."""
    msgs = [{"role": "user", "content": sample.context}]
    if reply is not None:
        msgs += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": sample.question}]
    return msgs


def two_turns(llm: Any, sample: Any, reply_tokens: int, answer_tokens: int
              ) -> dict[str, Any]:
    """Run the two turns greedily; the replies, the score and the time of each turn."""
    t0 = time.perf_counter()
    r1 = llm.chat(conversation(sample), max_tokens=reply_tokens, temperature=0.0)
    t1 = time.perf_counter()
    reply = r1["choices"][0]["message"]["content"]
    r2 = llm.chat(conversation(sample, reply), max_tokens=answer_tokens, temperature=0.0)
    t2 = time.perf_counter()
    answer = r2["choices"][0]["message"]["content"]
    return {"reply": reply, "answer": answer, "score": sample.score(answer),
            "turn1_s": t1 - t0, "turn2_s": t2 - t1}


def margin(llm: Any, sample: Any, reply: str, answer: str) -> float | None:
    """Smallest log-prob lead of the needle's tokens in ``answer`` (teacher-forced after the
    question turn), or None when the needle is not in the answer."""
    needle = sample.answers[0]
    if needle not in answer:
        return None
    prompt = llm.tokenize(llm.format_chat(conversation(sample, reply)), add_bos=False)
    ans = llm.tokenize(answer, add_bos=False)
    llm.reset()
    first = llm.prefill_tokens(prompt)
    rest = llm.append_tokens(ans[:-1], all_logits=True) if len(ans) > 1 else np.empty((0,))
    logits = np.vstack([first[None, :], rest]) if len(ans) > 1 else first[None, :]
    # the tokens that spell the needle: those whose text overlaps its characters
    at = answer.index(needle)
    pos, spans = 0, []
    for i, t in enumerate(ans):
        piece = llm.detokenize([t])
        if pos < at + len(needle) and pos + len(piece) > at:
            spans.append(i)
        pos += len(piece)
    leads = []
    for i in spans:
        row = logits[i].astype(np.float64)
        lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        other = np.delete(lp, ans[i]).max()
        leads.append(float(lp[ans[i]] - other))
    llm.reset()
    return min(leads) if leads else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,3072")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policies", default="ada-snapkv,snapkv,ada-kvzip,kvzip")
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "multiturn_needle.json"))
    ns = ap.parse_args()
    from adakv_local import LocalLLM
    from adakv_local.bench.eval_tasks import make_sample
    from adakv_local.bench.machine import machine_info

    lengths = [int(x) for x in ns.lengths.split(",")]
    policies = [p for p in ns.policies.split(",") if p]
    n_ctx = max(lengths) + 512
    vanilla = LocalLLM(None, n_ctx=n_ctx, n_threads=ns.threads, seed=0)
    ada = {p: LocalLLM(None, kv_budget=ns.budget, policy=p, n_ctx=n_ctx,
                       n_threads=ns.threads, seed=0) for p in policies}
    cases: list[dict[str, Any]] = []
    out = {"machine": machine_info(), "budget": ns.budget, "policies": policies,
           "reply_tokens": ns.reply_tokens, "answer_tokens": ns.answer_tokens, "cases": cases}
    t_start = time.perf_counter()
    for length in lengths:
        for seed in range(ns.seed0, ns.seed0 + ns.seeds):
            s = make_sample("niah-single", length, seed, count_tokens=lambda x: len(
                vanilla.tokenize(x.user_text())))
            case: dict[str, Any] = {"length": length, "seed": seed, "needle": s.answers[0],
                                    "depth": s.meta.get("depth"),
                                    "tokens": len(vanilla.tokenize(s.context))}
            vanilla.reset()
            v = two_turns(vanilla, s, ns.reply_tokens, ns.answer_tokens)
            v["margin"] = margin(vanilla, s, v["reply"], v["answer"]) if v["score"] else None
            case["vanilla"] = v
            for p, llm in ada.items():
                llm.reset()
                r = two_turns(llm, s, ns.reply_tokens, ns.answer_tokens)
                st = llm.kv_stats()
                r["reconstruction_s"] = (st["reconstruction"]["feed_s"]
                                         + st["reconstruction"]["observe_s"])
                r["rows_kept"] = st["rows_kept"]
                case[p] = r
            cases.append(case)
            line = " ".join(f"{p}={int(case[p]['score'])}" for p in policies)
            m = case["vanilla"]["margin"]
            print(f"{length} #{seed} ({case['tokens']} tok): vanilla={int(v['score'])} "
                  f"(margin {m if m is None else round(m, 2)}) {line} "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
            Path(ns.json).write_text(json.dumps(out, indent=1) + "\n")
    for name in ["vanilla", *policies]:
        n = sum(int(c[name]["score"]) for c in cases)
        print(f"{name}: {n}/{len(cases)}")
    clear = [c for c in cases if (c["vanilla"]["margin"] or 0) >= 1.0]
    names = ", ".join(f"{c['length']}#{c['seed']}" for c in clear)
    print(f"vanilla answers with a margin >= 1 nat: {len(clear)} ({names})")
    for name in policies:
        print(f"  of those, {name}: {sum(int(c[name]['score']) for c in clear)}/{len(clear)}")
    vanilla.close()
    for llm in ada.values():
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
