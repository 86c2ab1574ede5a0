"""The README's quality table: ``adakv-local eval`` on the default model.

Runs one task at a time and rewrites benchmarks/results/eval_<tag>.json, .md and .png after
each, so a long run leaves usable results as it goes; with ``--interleave`` one run takes
prompt ``i`` of every task and length before prompt ``i + 1`` and rewrites the JSON and .md
after every prompt (a run cut short still covers every cell). Defaults: the README's grid
(see ``--help``); ``--quick`` is a smoke run of a few minutes.

    .venv/bin/python benchmarks/run_eval.py [--quick] [--threads 2] [--tag cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adakv_local.bench.evaluate import EvalSpec, merge, plot, run_eval, save, table
from adakv_local.defaults import LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1K only, 3 samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--tasks", default="niah-single,niah-multikey")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--policies", default="full,streaming,snapkv,ada-snapkv")
    ap.add_argument("--modes", default="question-aware,question-agnostic")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0,
                    help="base seed of the prompts (another seed: other prompts, e.g. to "
                         "extend a cell whose run was cut short)")
    ap.add_argument("--kernel", type=int, default=LOCALLLM_KERNEL,
                    help=f"score pooling kernel ({LOCALLLM_KERNEL})")
    ap.add_argument("--pool-align", default=LOCALLLM_POOL_ALIGN, choices=["causal", "center"])
    ap.add_argument("--interleave", action="store_true",
                    help="all tasks in one run, prompt by prompt; save after every prompt")
    ap.add_argument("--kvzip-aware", default="reuse", choices=["reuse", "reconstruct"],
                    help="question-aware kvzip scores: the context's reconstruction + the "
                         "question window (reuse), or a reconstruction of the whole prompt")
    ap.add_argument("--window-share", type=float, default=None,
                    help="the kvzip policies' window share (default: LocalLLM's, 0.25)")
    ns = ap.parse_args()
    lengths = (1024,) if ns.quick else _ints(ns.lengths)
    samples = 3 if ns.quick else ns.samples
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"eval_{ns.tag}"
    if ns.interleave:
        spec = EvalSpec(tasks=tuple(ns.tasks.split(",")), lengths=lengths,
                        budgets=_ints(ns.budgets), policies=tuple(ns.policies.split(",")),
                        modes=tuple(ns.modes.split(",")), samples=samples,
                        threads=ns.threads, kernel=ns.kernel, pool_align=ns.pool_align,
                        kvzip_aware=ns.kvzip_aware, seed=ns.seed,
                        window_share=ns.window_share)

        def checkpoint(report: dict) -> None:
            save(report, base.with_suffix(".json"))
            base.with_suffix(".md").write_text(table(report) + "\n")

        report = run_eval(spec, log=lambda m: print(m, file=sys.stderr, flush=True),
                          interleave=True, on_prompt=checkpoint)
        checkpoint(report)
        plot(report, base.with_suffix(".png"))
        print(table(report))
        return 0
    reports = []
    for task in ns.tasks.split(","):
        spec = EvalSpec(tasks=(task,), lengths=lengths, budgets=_ints(ns.budgets),
                        policies=tuple(ns.policies.split(",")),
                        modes=tuple(ns.modes.split(",")), samples=samples,
                        threads=ns.threads, kernel=ns.kernel, pool_align=ns.pool_align,
                        kvzip_aware=ns.kvzip_aware, seed=ns.seed,
                        window_share=ns.window_share)
        reports.append(run_eval(spec, progress=sys.stderr.isatty(),
                                log=lambda m: print(m, file=sys.stderr, flush=True)))
        report = merge(reports)
        save(report, base.with_suffix(".json"))
        base.with_suffix(".md").write_text(table(report) + "\n")
        plot(report, base.with_suffix(".png"))
        print(f"{task} done ({report['seconds']:.0f} s so far); wrote {base}.json/.md/.png",
              file=sys.stderr, flush=True)
    print(table(merge(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
