"""Paired table: the kvzip policies with the window share (``eval_kvzip_share*.json``)
against the same prompts without it (``eval_kvzip_*.json``, run before the share existed).

Records are paired by (task, length, seed, sample, mode, policy, budget); only cells and
prompts present in both count (cells only in the new runs are listed apart). ``full`` and
``ada-snapkv`` do not read the share, so their paired answers must agree (printed: a check
that the two runs saw the same prompts).

    .venv/bin/python benchmarks/window_share_table.py > benchmarks/results/window_share.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _records(paths: list[Path]) -> dict[tuple, dict]:
    out = {}
    for p in paths:
        rep = json.loads(p.read_text())
        if isinstance(rep["spec"].get("seed"), list):
            continue  # a merge of the runs read here (benchmarks/merge_reports.py)
        seed = rep["spec"].get("seed", 0)
        for r in rep["records"]:
            out[(r["task"], r["length"], seed, r["sample"], r["mode"], r["policy"],
                 r["budget"])] = r
    return out


def main() -> int:
    new = _records(sorted(RESULTS.glob("eval_kvzip_share*.json")))
    old = _records([p for p in sorted(RESULTS.glob("eval_kvzip_*.json"))
                    if "share" not in p.name])
    both = sorted(set(new) & set(old))
    if not both:
        print("no paired records", file=sys.stderr)
        return 1
    same = [new[k]["score"] == old[k]["score"] for k in both
            if k[5] in ("full", "ada-snapkv")]
    cells = sorted({(k[0], k[1]) for k in both})
    prompts = {c: len({k[2:4] for k in both if (k[0], k[1]) == c}) for c in cells}
    print(f"Paired on {', '.join(f'{t} {n} ({prompts[(t, n)]} prompts)' for t, n in cells)}; "
          f"full and ada-snapkv answers identical in both runs: {sum(same)}/{len(same)}.\n")
    acc: dict[tuple, list[float]] = defaultdict(list)
    for k in both:
        mode, policy, budget = k[4:]
        if policy in ("full", "ada-snapkv"):
            acc[(mode, policy, "", budget)].append(new[k]["score"])
        else:
            acc[(mode, policy, "share 0", budget)].append(old[k]["score"])
            acc[(mode, policy, "share 0.25", budget)].append(new[k]["score"])
    budgets = sorted({k[6] for k in both})
    for mode in ("question-aware", "question-agnostic"):
        print(f"**{mode}** — accuracy %, averaged over the paired prompts\n")
        print("| policy | window share | " + " | ".join(f"budget {b}" for b in budgets)
              + " |")
        print("|---|---|" + "---|" * len(budgets))
        rows = sorted({(k[1], k[2]) for k in acc if k[0] == mode},
                      key=lambda x: (["full", "ada-snapkv", "kvzip", "ada-kvzip",
                                      "ada-kvzip-global"].index(x[0]), x[1]))
        for policy, share in rows:
            vals = [acc.get((mode, policy, share, b)) for b in budgets]
            print(f"| {policy} | {share or '-'} | " + " | ".join(
                "" if not v else f"{100 * sum(v) / len(v):.1f}" for v in vals) + " |")
        print()
    def mean(src: dict, cell: tuple, mode: str, policy: str) -> float:
        v = [src[k]["score"] for k in both
             if k[:2] == cell and k[4] == mode and k[5] == policy and k[6] == 256]
        return 100 * sum(v) / max(1, len(v))

    print("Per cell at 256 rows (ada-kvzip-global share 0 → 0.25; ada-snapkv):\n")
    for mode in ("question-aware", "question-agnostic"):
        parts = [f"{c[0]} {c[1]}: {mean(old, c, mode, 'ada-kvzip-global'):.0f} → "
                 f"{mean(new, c, mode, 'ada-kvzip-global'):.0f} "
                 f"({mean(new, c, mode, 'ada-snapkv'):.0f})" for c in cells]
        print(f"- {mode}: " + "; ".join(parts))
    only = sorted({(k[0], k[1]) for k in new} - {(k[0], k[1]) for k in old})
    if only:  # cells first run with the share: no pairing, every policy from the new run
        print("\nCells without a run before the share (accuracy % at 256 rows, n prompts):\n")
        for cell in only:
            n = len({k[2:4] for k in new if k[:2] == cell})
            for mode in ("question-aware", "question-agnostic"):
                vals = []
                for pol in ("full", "ada-snapkv", "kvzip", "ada-kvzip", "ada-kvzip-global"):
                    v = [new[k]["score"] for k in new if k[:2] == cell and k[4] == mode
                         and k[5] == pol and k[6] == 256]
                    if v:
                        vals.append(f"{pol} {100 * sum(v) / len(v):.0f}")
                print(f"- {cell[0]} {cell[1]} ({n} prompts), {mode}: " + ", ".join(vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
