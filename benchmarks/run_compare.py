"""The README's comparison: vanilla llama.cpp vs Ada-KV on the default model.

Writes benchmarks/results/compare_<tag>.json and .png (and prints the table). Every run is
its own subprocess (see adakv_local.bench.compare). On the 2-core CPU machine the full grid
(4 contexts x 3 budgets x 2 policies + vanilla) takes a while; --quick runs a smaller one.

    .venv/bin/python benchmarks/run_compare.py [--quick] [--threads 2] [--tag cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adakv_local.bench.compare import compare, plot, table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 contexts, 1 budget")
    ap.add_argument("--model", default=None,
                    help="a GGUF path (default: the embedded default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--prefill", choices=["full", "chunked"], default="full")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--contexts", default=None, help="override, e.g. 1024,8192")
    ap.add_argument("--budgets", default=None, help="override, e.g. 512")
    ap.add_argument("--policies", default="ada-snapkv,snapkv")
    ap.add_argument("--kv-types", default="f16",
                    help="K/V types of the Ada-KV and vanilla runs, e.g. f16,q8_0")
    ap.add_argument("--limit", action="store_true",
                    help="add vanilla with a prompt of each budget's size (decode's limit)")
    ns = ap.parse_args()
    contexts = [1024, 8192] if ns.quick else [1024, 2048, 4096, 8192]
    budgets = [512] if ns.quick else [128, 256, 512]
    if ns.contexts:
        contexts = [int(x) for x in ns.contexts.split(",")]
    if ns.budgets:
        budgets = [int(x) for x in ns.budgets.split(",")]
    report = compare(ns.model, contexts, budgets, ns.policies.split(","), prefill=ns.prefill,
                     chunk=ns.chunk, threads=ns.threads, kv_types=ns.kv_types.split(","),
                     limit=ns.limit)
    report["prefill"] = ns.prefill
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"compare_{ns.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, stem.with_suffix(".png"))
    print(table(report))
    print(f"wrote {stem}.json and {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
