"""How close the passkey answers are: the key's probability, vanilla vs Ada-KV (issue 6).

For each seeded passkey prompt (~2K tokens of essays, tasks.passkey), the greedy answer and,
teacher-forced on "The pass key is <key>", the probability of the key's first token and of the
strongest other token at that position — with the full cache (vanilla llama.cpp) and with
LocalLLM's defaults at each budget. A prompt whose key barely beats another token under the
full cache is one where any small change of the attention flips the answer; this shows which
test prompts are such knife edges. ``--scan`` instead runs vanilla only over seeds 0..N-1 at
the given depths (how often does the model answer at all?).

    .venv/bin/python benchmarks/passkey_margin.py [--cases 0.25:7,0.5:26,0.75:0,0.75:1]
        [--budgets 64,128,256,384,512] [--scan 20 --depths 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local import LocalLLM
from adakv_local.bench.evaluate import log_softmax
from adakv_local.bench.tasks import Sample, passkey
from adakv_local.models import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "The pass key is"


def probe(llm: LocalLLM, s: Sample, n_new: int = 10) -> dict[str, Any]:
    """Greedy answer, then the key's first-token probability and its strongest rival."""
    prompt = llm.tokenize(llm.format_chat(s.messages()))
    llm.reset()
    text = llm.detokenize(llm.greedy_ids(prompt, n_new))
    ref = llm.tokenize(f"{PREFIX} {s.answer}", add_bos=False, special=False)
    at = len(llm.tokenize(PREFIX, add_bos=False, special=False))
    llm.reset()
    llm.prefill_tokens(prompt)  # compresses with a budget, as chat() does
    # the row after "The pass key is" predicts the key (every row computed, as recorded)
    p = np.exp(log_softmax(llm.append_tokens(ref[:at], all_logits=True)[-1]))
    key_tok = ref[at]
    p_key = float(p[key_tok])
    p[key_tok] = 0.0
    rival = int(p.argmax())
    return {"correct": s.correct(text), "answer": text, "p_key": round(p_key, 4),
            "p_rival": round(float(p[rival]), 4), "rival": llm.detokenize([rival]),
            "margin_nats": round(float(np.log(p_key / p[rival])), 3), "n_prompt": len(prompt)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="0.25:7,0.5:26,0.75:0,0.75:1",
                    help="depth:seed,... (default: the seeded prompts of the e2e test)")
    ap.add_argument("--budgets", default="64,128,256,384,512")
    ap.add_argument("--scan", type=int, default=0, help="vanilla only, seeds 0..N-1")
    ap.add_argument("--depths", default="0.25", help="depths for --scan")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    model = resolve_model(None)
    if ns.scan:
        cases = [(float(d), s) for d in ns.depths.split(",") for s in range(ns.scan)]
        budgets: list[int | None] = [None]
    else:
        cases = [(float(c.split(":")[0]), int(c.split(":")[1])) for c in ns.cases.split(",")]
        budgets = [None] + [int(b) for b in ns.budgets.split(",")]
    samples = {c: passkey(ns.tokens, c[0], c[1], source="essays") for c in cases}
    records = []
    for budget in budgets:
        with LocalLLM(model, kv_budget=budget, n_ctx=4096, n_threads=ns.threads) as llm:
            for (depth, seed), s in samples.items():
                r = {"budget": budget, "depth": depth, "seed": seed, **probe(llm, s)}
                records.append(r)
                print(json.dumps(r), flush=True)
    out = Path(ns.json or RESULTS / ("passkey_scan.json" if ns.scan else "passkey_margin.json"))
    out.write_text(json.dumps({"tokens": ns.tokens, "records": records}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
