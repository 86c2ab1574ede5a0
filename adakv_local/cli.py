"""The ``adakv-local`` command line: chat, demo, compare, eval, serve, models."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AdaKVError
from .models import DEFAULT_MODEL, REGISTRY, fetch, is_fetched, model_path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def kv_summary(stats: dict[str, Any]) -> str:
    """One line comparing the KV memory held with what vanilla llama.cpp holds."""
    alloc, vanilla = stats["bytes_allocated"], stats["vanilla_bytes"]
    line = (
        f"[kv] {stats['mode']}: {stats['tokens_seen']} tokens seen, KV allocated "
        f"{_fmt_bytes(alloc)} (live {_fmt_bytes(stats['bytes_used'])}); vanilla llama.cpp: "
        f"{_fmt_bytes(vanilla)} for n_ctx={stats['n_ctx']}"
    )
    if stats["mode"] != "vanilla" and vanilla:
        line += f" -> {100 * (1 - alloc / vanilla):.0f}% saved"
    return line


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help=f"GGUF path or registry name (default: {DEFAULT_MODEL})")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="average KV rows kept per head (default: none = vanilla llama.cpp)")
    p.add_argument("--policy", default="ada-snapkv",
                   help="eviction policy with --kv-budget (ada-snapkv, snapkv, pyramid, "
                        "ada-pyramid, streaming, full; reconstruction-scored, for documents "
                        "asked about in later turns: ada-kvzip-global, ada-kvzip, kvzip; the "
                        "same with predicted scores, no second pass: ada-kvzap-global, "
                        "ada-kvzap, kvzap)")
    p.add_argument("--window", type=int, default=32, help="observation window (32)")
    p.add_argument("--floor-alpha", type=float, default=0.2, help="Ada-KV safeguard (0.2)")
    p.add_argument("--window-share", type=float, default=None,
                   help="kvzip policies: share of the budget given to what the last window "
                        "queries attend to (default 0.25; 0: reconstruction scores alone)")
    _add_pooling_args(p)
    p.add_argument("--prefill", choices=["full", "chunked"], default="full")
    p.add_argument("--chunk", type=int, default=2048, help="chunked-prefill chunk (2048)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context window (default 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--verbose", "-v", action="store_true", help="show llama.cpp's log")


def _add_pooling_args(p: argparse.ArgumentParser) -> None:
    from .defaults import LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN

    p.add_argument("--kernel", type=int, default=LOCALLLM_KERNEL,
                   help=f"score pooling kernel, odd (default {LOCALLLM_KERNEL}; "
                        "the official Ada-KV code uses 7)")
    p.add_argument("--pool-align", choices=["causal", "center"], default=LOCALLLM_POOL_ALIGN,
                   help="pooling window: causal keeps the rows after an attended token "
                        f"(default {LOCALLLM_POOL_ALIGN}); center is the official Ada-KV one")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (256)")
    p.add_argument("--temperature", "-t", type=float, default=0.2,
                   help="sampling temperature (0 = greedy; default 0.2)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)


def _open(ns: argparse.Namespace, kv_budget: Any = "args") -> Any:
    from .llm import LocalLLM

    budget = ns.kv_budget if kv_budget == "args" else kv_budget
    ada: dict[str, Any] = {}
    if kv_budget == "args" or budget is not None:
        # the user's own flags: with no --kv-budget, LocalLLM refuses Ada-KV options; a
        # vanilla run the command adds for comparison (demo, compare) just leaves them out
        ada = dict(policy=ns.policy, window=ns.window, floor_alpha=ns.floor_alpha,
                   kernel=ns.kernel, pool_align=ns.pool_align, prefill=ns.prefill,
                   chunk=ns.chunk, window_share=ns.window_share)
    return LocalLLM(ns.model, kv_budget=budget, n_ctx=ns.n_ctx, n_threads=ns.threads,
                    n_gpu_layers=ns.n_gpu_layers, seed=ns.seed, verbose=ns.verbose, **ada)


def _stream_answer(llm: Any, messages: list[dict[str, str]], ns: argparse.Namespace) -> str:
    parts: list[str] = []
    for chunk in llm.chat(messages, max_tokens=ns.max_tokens, temperature=ns.temperature,
                          top_p=ns.top_p, top_k=ns.top_k, stream=True):
        piece = chunk["choices"][0]["delta"].get("content", "")
        if piece:
            parts.append(piece)
            print(piece, end="", flush=True)
    print()
    return "".join(parts)


def cmd_chat(ns: argparse.Namespace) -> int:
    """One-shot (-p) or interactive chat."""
    with _open(ns) as llm:
        messages: list[dict[str, str]] = []
        if ns.system:
            messages.append({"role": "system", "content": ns.system})
        if ns.prompt is not None:
            text = ns.prompt
            if ns.file:
                with open(ns.file, encoding="utf-8") as f:
                    text = f.read() + "\n\n" + text
            messages.append({"role": "user", "content": text})
            _stream_answer(llm, messages, ns)
            if ns.show_kv:
                print(kv_summary(llm.kv_stats()), file=sys.stderr)
            return 0
        print("adakv-local chat: type a message, /reset to start over, /kv for memory, "
              "/quit or Ctrl-D to leave.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                messages = messages[:1] if ns.system else []
                llm.reset()
                continue
            if cmd == "/kv":
                print(kv_summary(llm.kv_stats()), file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                answer = _stream_answer(llm, messages, ns)
            except AdaKVError as e:
                print(f"error: {e}", file=sys.stderr)
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": answer})
            if ns.show_kv:
                print(kv_summary(llm.kv_stats()), file=sys.stderr)


def cmd_demo(ns: argparse.Namespace) -> int:
    """The README's main job: a long prompt answered by vanilla llama.cpp and by Ada-KV on
    the default model, with the KV memory each one held."""
    from .bench.tasks import passkey

    # a seeded ~1.8K-token passkey prompt that the 135M default model answers with its
    # full cache (see tests/test_adakv_e2e.py)
    sample = passkey(2000, 0.75, 0, source="auto")
    budget = ns.kv_budget or 256
    print(f"prompt: a {len(sample.context)}-character document (Paul Graham essays) with a "
          f"pass key hidden at 75% depth, then: {sample.question!r}")
    results = []
    for label, b in (("vanilla llama.cpp", None), (f"Ada-KV ({ns.policy}, budget {budget})",
                                                   budget)):
        with _open(ns, kv_budget=b) as llm:
            if not results:
                print(f"model: {llm.model_path.name} ({llm.architecture}, {llm.n_layer} "
                      f"layers, {llm.n_head}/{llm.n_head_kv} q/kv heads)\n")
            out = llm.chat(sample.messages(), max_tokens=ns.max_tokens,
                           temperature=ns.temperature)
            text = out["choices"][0]["message"]["content"].strip()
            st = llm.kv_stats()
        ok = "correct" if sample.correct(text) else f"wrong, the key is {sample.answer}"
        print(f"{label}: {text!r} ({ok})")
        print(f"  {kv_summary(st)}")
        results.append(st)
    van, ada = results
    print(f"\nKV cache: vanilla {_fmt_bytes(van['bytes_allocated'])} allocated "
          f"({_fmt_bytes(van['bytes_used'])} live) vs Ada-KV "
          f"{_fmt_bytes(ada['bytes_allocated'])}: "
          f"{van['bytes_used'] / max(1, ada['bytes_allocated']):.1f}x less than the live "
          f"vanilla rows for the same {ada['tokens_seen']} tokens")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    """List or fetch registry models."""
    if ns.action == "list":
        for name, info in sorted(REGISTRY.items()):
            mark = "fetched" if is_fetched(name) else "not fetched"
            default = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{default}: {info.description}\n    {info.architecture}, "
                  f"{info.license}, {info.size / 1e6:.0f} MB, {mark}: {model_path(name)}")
        return 0
    path = fetch(ns.name or DEFAULT_MODEL)
    print(path)
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    """Fit (or show) the kvzap policies' score predictor of a model."""
    import json

    from .llm import LocalLLM

    with LocalLLM(ns.model, kv_budget=256, policy="ada-kvzap-global", n_ctx=512,
                  n_threads=ns.threads) as llm:
        meta = llm.calibrate_kvzap(force=ns.force)
    meta.pop("r2", None)  # per head: in the weights file
    print(json.dumps(meta, indent=1))
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x.lower().replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def cmd_compare(ns: argparse.Namespace) -> int:
    """Vanilla vs Ada-KV: memory, speed, quality; table + JSON + plot."""
    from .bench.compare import compare, plot, table

    policies = [p for p in ns.policies.split(",") if p]
    report = compare(ns.model, ns.contexts, ns.budgets, policies, prefill=ns.prefill,
                     chunk=ns.chunk, decode_steps=ns.decode_steps, threads=ns.threads,
                     n_gpu_layers=ns.n_gpu_layers, progress=not ns.quiet,
                     kv_types=[t for t in ns.kv_types.split(",") if t], limit=ns.limit)
    print(table(report))
    if ns.json:
        import json

        with open(ns.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {ns.json}", file=sys.stderr)
    if ns.plot:
        plot(report, ns.plot)
        print(f"wrote {ns.plot}", file=sys.stderr)
    failed = [r for r in report["runs"] if "error" in r]
    for r in failed:
        print(f"run {r['label']} at {r['spec']['context']} failed:\n{r['error']}",
              file=sys.stderr)
    return 1 if failed else 0


def _lengths(text: str) -> list[int]:
    """Comma-separated token counts, ``k`` meaning 1024 (``1k,2k,4096``)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated lengths like 1k,2k,4096, got {text!r}") from None
    return out


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def cmd_eval(ns: argparse.Namespace) -> int:
    """Quality of every policy and budget on offline long-context tasks."""
    from .bench.evaluate import EvalSpec, plot, run_eval, save, table

    modes = ["question-aware", "question-agnostic"] if ns.mode == "both" else [ns.mode]
    spec = EvalSpec(model=ns.model, tasks=tuple(ns.tasks), lengths=tuple(ns.lengths),
                    budgets=tuple(ns.budgets), policies=tuple(ns.policies),
                    modes=tuple(modes), samples=ns.samples, seed=ns.seed,
                    teacher_tokens=ns.teacher_tokens, threads=ns.threads, source=ns.source,
                    kernel=ns.kernel, pool_align=ns.pool_align, kv_type=ns.kv_type,
                    window_share=ns.window_share)
    report = run_eval(spec, progress=not ns.quiet, verbose=ns.verbose)
    print(table(report))
    n_prompts = spec.samples * len(spec.tasks) * len(spec.lengths)
    print(f"{len(report['records'])} evaluations of {n_prompts} prompts in "
          f"{report['seconds']:.0f} s", file=sys.stderr)
    if ns.json:
        save(report, ns.json)
        print(f"wrote {ns.json}", file=sys.stderr)
    if ns.plot:
        plot(report, ns.plot)
        print(f"wrote {ns.plot}", file=sys.stderr)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP server, one (Ada-KV) KV cache per conversation."""
    from .serve import ServeConfig, run

    opts: dict[str, Any] = dict(n_ctx=ns.n_ctx, n_threads=ns.threads,
                                n_gpu_layers=ns.n_gpu_layers, seed=ns.seed, verbose=ns.verbose)
    if ns.kv_budget is not None:
        opts.update(policy=ns.policy, window=ns.window, floor_alpha=ns.floor_alpha,
                    kernel=ns.kernel, pool_align=ns.pool_align, prefill=ns.prefill,
                    chunk=ns.chunk, window_share=ns.window_share)
    run(ServeConfig(model=ns.model, kv_budget=ns.kv_budget, llm_options=opts, host=ns.host,
                    port=ns.port, max_sessions=ns.max_sessions, session_dir=ns.session_dir,
                    max_saved_sessions=ns.max_saved_sessions, model_id=ns.model_id,
                    log_level=ns.log_level))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    ap = argparse.ArgumentParser(
        prog="adakv-local",
        description="Local GGUF inference with Ada-KV head-wise adaptive KV-cache eviction.",
        epilog="Examples:\n  adakv-local demo\n  adakv-local chat -p 'Hello' --kv-budget 256\n"
               "  adakv-local compare --contexts 1024,4096 --budgets 256 --plot cmp.png\n"
               "  adakv-local eval --tasks niah-single --lengths 1k,2k --samples 5\n"
               "  adakv-local models fetch smollm2-135m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("chat", help="chat with a model (interactive, or one-shot with -p)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("-p", "--prompt", default=None, help="one-shot prompt (no REPL)")
    p.add_argument("-f", "--file", default=None, help="prepend this text file to the prompt")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--show-kv", action="store_true",
                   help="after each answer, print KV memory held vs vanilla llama.cpp")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="a long prompt answered by vanilla and by Ada-KV, with "
                                    "the KV memory each held")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_demo, temperature=0.0, max_tokens=16)

    p = sub.add_parser("compare", help="vanilla llama.cpp vs Ada-KV: memory, speed, quality")
    p.add_argument("--model", "-m", default=None,
                   help=f"GGUF path or registry name (default: {DEFAULT_MODEL})")
    p.add_argument("--contexts", type=_ints, default=[1024, 2048, 4096, 8192],
                   help="prompt lengths in tokens (default 1024,2048,4096,8192)")
    p.add_argument("--budgets", type=_ints, default=[128, 256, 512],
                   help="KV budgets, rows per head (default 128,256,512)")
    p.add_argument("--policies", default="ada-snapkv,snapkv",
                   help="comma-separated policies (default ada-snapkv,snapkv)")
    p.add_argument("--prefill", choices=["full", "chunked"], default="full")
    p.add_argument("--chunk", type=int, default=512, help="chunk size for chunked prefill")
    p.add_argument("--decode-steps", type=int, default=64, help="greedy decode steps (64)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--kv-types", default="f16",
                   help="K/V types, comma-separated (f16, q8_0): each Ada-KV config and "
                        "vanilla run with each (ratios are against vanilla f16)")
    p.add_argument("--limit", action="store_true",
                   help="also vanilla with a prompt of each budget's size (decode's limit)")
    p.set_defaults(func=cmd_compare)

    from .bench.eval_tasks import TASKS
    from .bench.evaluate import POLICIES

    p = sub.add_parser("eval", help="quality of Ada-KV vs uniform budgets and baselines on "
                                    "offline long-context tasks")
    p.add_argument("--model", "-m", default=None,
                   help=f"GGUF path or registry name (default: {DEFAULT_MODEL})")
    p.add_argument("--tasks", type=_names, default=list(TASKS),
                   help=f"comma-separated tasks (default: all of {','.join(TASKS)})")
    p.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096],
                   help="prompt lengths in tokens, k = 1024 (default 1k,2k,4k)")
    p.add_argument("--budgets", type=_ints, default=[64, 128, 256, 512, 1024],
                   help="KV budgets, rows per head (default 64,128,256,512,1024)")
    p.add_argument("--policies", type=_names, default=list(POLICIES),
                   help=f"comma-separated policies (default: {','.join(POLICIES)})")
    p.add_argument("--mode", choices=["question-aware", "question-agnostic", "both"],
                   default="question-aware",
                   help="compress after the question (aware, default), before it (agnostic: "
                        "the multi-turn case), or both from the same prefill")
    p.add_argument("--samples", type=int, default=20, help="prompts per task and length (20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-tokens", type=int, default=64,
                   help="teacher-forced tokens for KL / top-1 agreement (64)")
    p.add_argument("--source", choices=["auto", "essays", "filler"], default="auto",
                   help="haystack text (auto: the essays when installed)")
    _add_pooling_args(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--kv-type", choices=["f16", "q8_0"], default="f16",
                   help="K/V pool type of every configuration, the full cache included "
                        "(default f16)")
    p.add_argument("--window-share", type=float, default=None,
                   help="the kvzip policies' window share (default 0.25)")
    p.add_argument("--json", default=None, help="write the report (cells and records) here")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy vs budget here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's log")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, one KV cache per "
                                     "conversation (base_url http://127.0.0.1:8000/v1)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="conversations held in memory at once; the least recently used "
                        "is evicted (default 8)")
    p.add_argument("--session-dir", default=None,
                   help="where evicted sessions are saved (default: a temporary folder)")
    p.add_argument("--max-saved-sessions", type=int, default=32,
                   help="evicted sessions kept on disk; 0 drops them (default 32)")
    p.add_argument("--model-id", default=None,
                   help="the model id clients send (default: registry name or file name)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="fit the kvzap policies' score predictor of a model "
                       "now (otherwise done at their first use; a few minutes, once per model)")
    p.add_argument("--model", "-m", default=None,
                   help=f"GGUF path or registry name (default: {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--force", action="store_true", help="fit again even if cached")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("models", help="list or fetch registry models")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", default=None, help=f"registry name ({DEFAULT_MODEL})")
    p.set_defaults(func=cmd_models)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adakv-local`` console script."""
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except (AdaKVError, ValueError, NotImplementedError, OSError) as e:
        print(f"adakv-local: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
