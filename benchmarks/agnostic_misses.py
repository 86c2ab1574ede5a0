"""What a compressed cache answers instead, where the full cache answers a needle prompt.

Reads `adakv-local eval` reports and, for one policy, mode and budget, sorts every prompt
the full cache answers and the policy does not:

- ``distractor``: the answer is another needle's value (niah-multikey: the values were kept,
  the key that picks the right one was not);
- ``digits lost``: the answer's first number is the value with digits missing (the needle was
  kept but for a row or two);
- ``right value``: the value after all (the task's scoring read the answer otherwise);
- ``lost``: anything else (the needle is gone: the model answers from the essay or invents).

It also prints each task's accuracy averaged over the report's lengths, per policy, mode and
budget (the issue's niah-single figures next to the six-cell means). The prompts are rebuilt
from the report's seed, so the needles' keys and values come from the same generator as the
run's; nothing is re-run.

    .venv/bin/python benchmarks/agnostic_misses.py benchmarks/results/eval_kvzap_all.json \\
        [--policy ada-kvzap-global] [--budget 256] [--mode question-agnostic]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from adakv_local.bench.evaluate import EvalSpec, Evaluator, aggregate, summary

NEEDLE = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")
"""A needle sentence of the niah tasks (their generator's wording): key, value."""


def kind(answer: str, value: str, values: list[str]) -> str:
    """How ``answer`` misses ``value`` (``values``: every needle's value in the prompt)."""
    m = re.search(r"\d[\d,]*", answer)
    got = m.group(0).replace(",", "") if m else ""
    if got == value:
        return "right value"
    if got and got != value and got in values:
        return "distractor"
    if len(got) >= 4 and got in value:
        return "digits lost"
    return "lost"


def task_means(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval's own summary (cells averaged over lengths), one task at a time: accuracy
    and KL per (task, mode, policy, budget)."""
    cells = aggregate(records)
    rows = [{"task": t, **row} for t in sorted({c["task"] for c in cells})
            for row in summary({"cells": [c for c in cells if c["task"] == t]})]
    return sorted(rows, key=lambda r: (r["task"], r["mode"], r["policy"], r["budget"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--policy", default="ada-kvzap-global")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--mode", default="question-agnostic")
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    records: list[dict[str, Any]] = []
    seeds = set()
    models = set()
    for path in ns.reports:
        rep = json.loads(path.read_text())
        models.add((rep["spec"].get("model"), rep["spec"].get("source", "auto")))
        for r in rep["records"]:
            r.setdefault("seed", rep["spec"]["seed"])
            seeds.add(r["seed"])
        records += rep["records"]
    if len(models) > 1:
        print(f"the reports ran different models or haystacks ({sorted(map(str, models))}); "
              "read one setting's reports at a time", file=sys.stderr)
        return 2
    model, source = models.pop()  # the prompts are rebuilt as the runs built them
    means = task_means(records)
    for m in means:
        print(f"{m['task']:14} {m['mode']:18} {m['policy']:18} {m['budget']:4}  "
              f"acc {100 * m['accuracy']:5.1f} %  KL {m['kl']:.3f}  ({m['cells']} lengths)")

    def key(r: dict[str, Any]) -> tuple:
        return (r["task"], r["length"], r["seed"], r["sample"])

    sel = {key(r): r for r in records if r["mode"] == ns.mode and r["budget"] == ns.budget}
    full = {key(r): r for r in records if r["mode"] == ns.mode and r["policy"] == "full"}
    misses = [(k, full[k], r) for k, r in sorted(sel.items())
              if r["policy"] == ns.policy and k in full and full[k]["score"] > r["score"]]
    sel = {k: r for k, r in sel.items() if r["policy"] == ns.policy}
    out: list[dict[str, Any]] = []
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for seed in sorted(seeds):
        spec = EvalSpec(model=model, tasks=("niah-single",), lengths=(1024,),
                        budgets=(ns.budget,), policies=("full",), modes=(ns.mode,),
                        samples=1, seed=seed, source=source)
        with Evaluator(spec) as ev:
            for (task, length, s, i), _f, r in misses:
                if s != seed:
                    continue
                sample = ev.prompt(task, length, i).sample
                values = [v for _, v in NEEDLE.findall(sample.context)]
                k = kind(r["answer"], sample.answers[0], values)
                counts[(task, length)][k] += 1
                out.append({"task": task, "length": length, "seed": s, "sample": i,
                            "key": sample.meta.get("key"), "value": sample.answers[0],
                            "needles": values, "answer": r["answer"], "kind": k})
    print(f"\n{ns.policy}, {ns.mode}, {ns.budget} rows: prompts the full cache answers and "
          "the policy does not")
    for (task, length), c in sorted(counts.items()):
        n = sum(1 for k in sel if k[0] == task and k[1] == length)
        print(f"{task:14} {length:5}  of {n}: " + ", ".join(f"{k} {v}" for k, v in sorted(
            c.items())))
    if ns.json:
        ns.json.write_text(json.dumps({"reports": [str(p) for p in ns.reports],
                                       "policy": ns.policy, "mode": ns.mode,
                                       "budget": ns.budget, "task_means": means,
                                       "misses": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
