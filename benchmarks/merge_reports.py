"""Merge eval reports of the same settings (different tasks, lengths or seeds) into one.

A run stopped for time and continued with another ``--seed`` leaves two reports whose
prompts together fill a cell; this writes the merged report (``OUT.json``, ``OUT.md`` with
the table and the averages, ``OUT.png``). The spec's ``samples`` becomes the number of
prompts per cell, which must be the same in every cell (the table's ``n = ``); the inputs
must agree on every setting but tasks, lengths, samples and seed, or the merge is refused.

    .venv/bin/python benchmarks/merge_reports.py --out benchmarks/results/eval_kvzip_share_all \\
        benchmarks/results/eval_kvzip_share.json benchmarks/results/eval_kvzip_share_4k*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adakv_local.bench.evaluate import merge, plot, save, table

# settings a merged report may mix; every other spec field must agree
_MAY_DIFFER = {"tasks", "lengths", "samples", "seed"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output path without suffix")
    ap.add_argument("reports", nargs="+", type=Path)
    ns = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in ns.reports]
    first = reports[0]["spec"]
    for path, rep in zip(ns.reports[1:], reports[1:], strict=True):
        diff = sorted(k for k in set(first) | set(rep["spec"])
                      if k not in _MAY_DIFFER and first.get(k) != rep["spec"].get(k))
        if diff:
            print(f"{path}: settings differ from {ns.reports[0]} ({', '.join(diff)}); "
                  "merge only runs of the same settings", file=sys.stderr)
            return 2
    for rep in reports:  # sample indices repeat across seeds: each record keeps its seed
        for r in rep["records"]:
            r.setdefault("seed", rep["spec"].get("seed", 0))
    report = merge(reports)
    counts = {c["n"] for c in report["cells"]}
    if len(counts) != 1:
        print(f"cells hold different numbers of prompts {sorted(counts)}: the table's n "
              "would be wrong; run the missing prompts first", file=sys.stderr)
        return 2
    report["spec"]["samples"] = counts.pop()
    report["spec"]["seed"] = sorted({r["spec"].get("seed", 0) for r in reports})
    report.pop("partial", None)
    out = Path(ns.out)
    save(report, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(table(report) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"merged {len(reports)} reports, {len(report['records'])} records, "
          f"n = {report['spec']['samples']} per cell: {out}.json/.md/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
