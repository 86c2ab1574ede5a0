"""``adakv-local eval``: quality of every eviction policy and budget on offline tasks.

Cost grows with the number of prompts, not with policies x budgets: each prompt is prefilled
once with nothing evicted; its window attention is observed once; the uncompressed cache is
saved with a ragged-memory snapshot; then for every (policy, budget) the snapshot is restored,
compressed with that policy from the saved observation, and scored:

- **accuracy**: the greedy answer (after the task's answer prefix) scored by RULER's string
  match (:meth:`adakv_local.eval_tasks.EvalSample.score`);
- **fidelity** against the full cache on the same prompt: the full cache's greedy continuation
  of ``teacher_tokens`` (64) tokens is teacher-forced through the compressed cache in one
  batch; per step the KL divergence KL(full || compressed) of the next-token distributions and
  whether their top-1 tokens agree, averaged over the steps;
- **attention-output L1** per layer (``l1_layers``; ``l1`` is their mean), for the
  observation window's mean attention (the
  distribution the policies score): ``sum_j |o_j - o'_j|_1`` over the query heads, where
  ``o_j`` is the head's output over all rows and ``o'_j`` over the kept rows (renormalised),
  before the output projection; with the **bound term** of Ada-KV's Theorem 1 for it:
  ``2 * g * sum_h C_h (1 - kept_mass_h)`` (``C_h`` = the largest L1 norm of a V row of KV head
  ``h``, ``g`` query heads per KV head, ``kept_mass`` from :func:`adakv_local.policy.kept_mass`).
  L1 <= bound always holds (a test checks it).

The kvzip policies (context-reconstruction scoring) reconstruct each prompt's context
once, from the question-agnostic snapshot (:meth:`LocalLLM.kvzip_scores`: per row, the most
attention from the reconstruction queries and the last ``window`` queries); every budget
and allocator then compresses from those scores. Question-aware, the scores are the
context's reconstruction scores joined (max) with the question window's maxima at the
question-aware snapshot -- what the controller computes when a question turn follows a
scored document (``kvzip_aware="reuse"``, the default); ``"reconstruct"`` reconstructs the
whole prompt, question included, as the controller does for a one-message prompt. Their
records add ``scoring_seconds`` (the reconstruction) and ``prefill_seconds`` (the context's
prefill).

Modes: ``question-aware`` compresses after the question (SnapKV's setting: the observation
window holds the question's tokens, and the first answer token comes from the full prefill);
``question-agnostic`` compresses the context before the question is appended (the multi-turn
case: the window is the end of the document), then appends the question to the compressed
cache. One prefill serves both modes: the context is prefilled and observed, then the question
is appended and observed again.

Greedy answers are read from the teacher-forced logits while the compressed cache's top-1
agrees with the full cache's continuation; from the first disagreement on (if it falls inside
the answer) the answer is decoded token by token, so every answer is the compressed cache's
own greedy output.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._closing import Closing
from ..defaults import LOCALLLM_KERNEL, LOCALLLM_POOL_ALIGN
from .eval_tasks import TASKS, EvalSample, make_sample
from .machine import machine_info

POLICIES: tuple[str, ...] = ("full", "streaming", "snapkv", "ada-snapkv", "pyramid",
                             "ada-pyramid", "kvzip", "ada-kvzip", "ada-kvzip-global",
                             "kvzap", "ada-kvzap", "ada-kvzap-global")
KVZAP: tuple[str, ...] = ("kvzap", "ada-kvzap", "ada-kvzap-global")
"""The policies scored by predicted reconstruction scores (cache/predict.py)."""
KVZIP: tuple[str, ...] = ("kvzip", "ada-kvzip", "ada-kvzip-global", *KVZAP)
"""The policies scored by context reconstruction, exact or predicted: one scoring per prompt,
mode and scorer (:meth:`LocalLLM.kvzip_scores`) serves every budget and allocator."""
MODES: tuple[str, ...] = ("question-aware", "question-agnostic")


@dataclass(frozen=True)
class EvalSpec:
    """What ``adakv-local eval`` runs (every field has the CLI's default)."""

    model: str | None = None
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    budgets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    policies: tuple[str, ...] = POLICIES
    modes: tuple[str, ...] = ("question-aware",)
    samples: int = 20
    seed: int = 0
    teacher_tokens: int = 64
    window: int = 32
    threads: int | None = None
    source: str = "auto"
    kernel: int = LOCALLLM_KERNEL
    pool_align: str = LOCALLLM_POOL_ALIGN
    kvzip_aware: str = "reuse"
    window_share: float | None = None
    """The kvzip policies' ``window_share`` (None: ``LocalLLM``'s default, 0.25)."""
    kv_type: str = "f16"
    """K and V pool type of every configuration, the full cache included (``"f16"``,
    ``"q8_0"``): each run is scored against its own full cache."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        for t in self.tasks:
            if t not in TASKS:
                bad(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        for p in self.policies:
            if p not in POLICIES:
                bad(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
        for m in self.modes:
            if m not in MODES:
                bad(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        if not (self.tasks and self.lengths and self.budgets and self.policies and self.modes):
            bad("tasks, lengths, budgets, policies and modes must not be empty")
        for name, vals, lo in (("lengths", self.lengths, 128), ("budgets", self.budgets, 1)):
            for v in vals:
                if not isinstance(v, int) or v < lo:
                    bad(f"{name}: every value must be an integer >= {lo}, got {v!r}")
        for b in self.budgets:
            if b <= self.window:
                bad(f"budgets: {b} must exceed the observation window ({self.window})")
        for name, v, lo in (("samples", self.samples, 1), ("teacher_tokens", self.teacher_tokens,
                                                           2),
                            ("window", self.window, 1),
                            ("seed", self.seed, 0)):
            if not isinstance(v, int) or v < lo:
                bad(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            bad(f"kernel must be an odd integer >= 1, got {self.kernel!r}")
        if self.pool_align not in ("causal", "center"):
            bad(f"pool_align must be causal or center, got {self.pool_align!r}")
        if self.source not in ("auto", "essays", "filler"):
            bad(f"source must be auto, essays or filler, got {self.source!r}")
        if self.kv_type not in ("f16", "q8_0"):
            bad(f"kv_type must be f16 or q8_0, got {self.kv_type!r}")
        if self.kvzip_aware not in ("reuse", "reconstruct"):
            bad(f"kvzip_aware must be reuse or reconstruct, got {self.kvzip_aware!r}")
        if self.window_share is not None:
            from ..bindings.policy import check_window_share

            check_window_share(self.window_share)  # the policies' own check


@dataclass
class _Prompt:
    """One tokenized sample."""

    sample: EvalSample
    ctx: list[int]  # chat prefix + context
    question: list[int]  # the rest: question, end of turn, assistant start, answer prefix


@dataclass
class _Reference:
    """The full cache's behaviour on one prompt in one mode."""

    snap: Any  # CacheSnapshot just before the first answer token is predicted / compression
    scores: np.ndarray  # observe_flat of the snapshot's rows
    n_obs: int
    lens: list[np.ndarray]
    vrows: list[list[np.ndarray]]  # [layer][kv head] V rows (float32 [len, d])
    first_logits: np.ndarray  # logits predicting the first answer token (aware mode)
    tokens: list[int]  # greedy continuation g[0..T]
    logp: np.ndarray  # log-probs [T+1, V]; logp[i] predicts tokens[i]
    answer_len: int  # tokens of the answer span (to the first stop) within `tokens`
    answer: str
    score: float
    prefill_seconds: float = 0.0  # prefilling the context
    # kvzip scores of the snapshot's rows (lazily), by scorer: "recon" (exact) or "pred"
    kvzip: dict[str, np.ndarray] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # per prompt, both modes: the
    # context's scores by scorer ("recon", "recon_lens", "recon_seconds"; "pred", ...)


def kvzip_scorer(policy: str) -> str:
    """The key of a kvzip policy's scores in ``_Reference.kvzip``: ``"pred"`` (predicted,
    the kvzap policies) or ``"recon"`` (exact reconstruction)."""
    return "pred" if policy in KVZAP else "recon"


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities (float64) over the last axis of logits."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def fidelity(ref_logp: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || q) and top-1 agreement between rows of reference log-probs and logits."""
    lq = log_softmax(logits)
    kl = (np.exp(ref_logp) * (ref_logp - lq)).sum(axis=-1)
    top1 = (ref_logp.argmax(axis=-1) == lq.argmax(axis=-1)).mean()
    return float(np.maximum(kl, 0.0).mean()), float(top1)


def attention_l1(scores: np.ndarray, n_obs: int, lens: Sequence[np.ndarray],
                 vrows: Sequence[Sequence[np.ndarray]], sels: Sequence[Any], group: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer attention-output L1 loss of ``sels`` and its Ada-KV bound (see module doc).

    ``scores`` is the flat observation (window sums over ``n_obs`` queries) of the rows
    ``lens``; ``vrows[il][h]`` the V rows of KV head ``h``; ``sels`` per-layer selections
    (empty: nothing evicted, loss 0).
    """
    from ..bindings.policy import kept_mass
    from ..bindings.ragged import split_heads, split_layers

    n_layer = len(lens)
    l1 = np.zeros(n_layer)
    bound = np.zeros(n_layer)
    if not sels:
        return l1, bound
    for il, flat in enumerate(split_layers(scores, lens, group)):
        sel = sels[il]
        blocks = split_heads(flat, lens[il], group)
        km = kept_mass(blocks, sel, group)
        for h, blk in enumerate(blocks):
            ln = blk.shape[1]
            att = blk.astype(np.float64) / n_obs
            v = vrows[il][h].astype(np.float64)
            keep = sel.keep[h]
            full = att @ v
            kept = att[:, keep]
            mass = kept.sum(axis=1, keepdims=True)
            part = (kept / np.where(mass > 0, mass, 1.0)) @ v[keep]
            l1[il] += float(np.abs(full - part).sum())
            c = float(np.abs(v).sum(axis=1).max()) if ln else 0.0
            bound[il] += 2.0 * group * c * (1.0 - float(km.per_head[h]))
    return l1, bound


class Evaluator(Closing):
    """Runs :class:`EvalSpec` on one loaded model (an Ada-KV :class:`LocalLLM` that never
    evicts on its own: compression happens only through :meth:`LocalLLM.compress`)."""

    def __init__(self, spec: EvalSpec, *, verbose: bool = False) -> None:
        from ..llm import LocalLLM

        self.spec = spec
        n_ctx = max(spec.lengths) + max(256, int(0.1 * max(spec.lengths))) \
            + spec.teacher_tokens + 128
        # a budget the prompts never reach (below n_ctx, as LocalLLM requires)
        self.llm = LocalLLM(spec.model, kv_budget=n_ctx - 1, policy="full", n_ctx=n_ctx,
                            n_threads=spec.threads, window=spec.window, verbose=verbose,
                            seed=spec.seed, kernel=spec.kernel, pool_align=spec.pool_align,
                            type_k=spec.kv_type, type_v=spec.kv_type)
        self.group = self.llm.n_head // self.llm.n_head_kv

    def close(self) -> None:
        """Free the model."""
        self.llm.close()

    # -------------------------------------------------------------- prompts
    def prompt(self, task: str, length: int, index: int) -> _Prompt:
        """The tokenized ``index``-th sample of ``task`` at ~``length`` tokens."""
        llm = self.llm

        def split(s: EvalSample) -> tuple[list[int], list[int]]:
            text = llm.format_chat([{"role": "user", "content": s.user_text()}])
            text += s.answer_prefix
            cut = text.rindex("\n\n" + s.question)
            return (llm.tokenize(text[:cut], add_bos=False),
                    llm.tokenize(text[cut:], add_bos=False))

        seed = self.spec.seed * 100_003 + index
        s = make_sample(task, length, seed, source=self.spec.source,
                        count_tokens=lambda s: sum(map(len, split(s))))
        ctx, q = split(s)
        return _Prompt(s, ctx, q)

    # -------------------------------------------------------------- reference
    def _observe(self) -> tuple[np.ndarray, int, list[np.ndarray], list[list[np.ndarray]]]:
        rc = self.llm.ragged
        n_obs = rc.n_obs(self.spec.window)
        lens = rc.all_lengths()
        vrows = [[rc.read_rows(il, h)[1] for h in range(rc.n_head_kv(il))]
                 for il in range(rc.n_layer)]
        return rc.observe_flat(n_obs), n_obs, lens, vrows

    def _greedy(self, first: np.ndarray, n: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy-decode ``n`` tokens from logits ``first`` (stop tokens do not stop);
        returns the tokens and the logits that chose each."""
        toks, rows = [], []
        cur = first
        for i in range(n):
            rows.append(cur)
            tok = int(cur.argmax())
            toks.append(tok)
            if i + 1 < n:
                cur = self.llm.append_tokens([tok])
        return toks, rows

    def _limit(self, p: _Prompt) -> int:
        """Answer tokens of ``p``: its task's, at most the teacher-forced continuation."""
        return min(p.sample.max_tokens, self.spec.teacher_tokens + 1)

    def _answer_len(self, toks: Sequence[int], limit: int) -> int:
        """Tokens of the answer in ``toks``: up to an end-of-generation token or ``limit``."""
        n = min(len(toks), limit)
        return next((i for i, t in enumerate(toks[:n]) if self.llm.is_eog(t)), n)

    def references(self, p: _Prompt) -> dict[str, _Reference]:
        """Prefill ``p`` once and record the full cache's behaviour for every mode.

        The full cache's greedy continuation is the same in both modes (nothing is evicted);
        what differs is where the snapshot and the observation are taken: before the
        question (question-agnostic) or after it (question-aware).
        """
        llm = self.llm
        modes = self.spec.modes
        llm.reset()
        t0 = time.perf_counter()
        llm.prefill_tokens(p.ctx)
        t_ctx = time.perf_counter() - t0
        at: dict[str, tuple[Any, Any]] = {}
        if "question-agnostic" in modes:
            at["question-agnostic"] = (llm.snapshot(), self._observe())
        first = llm.append_tokens(p.question)
        if "question-aware" in modes:
            at["question-aware"] = (llm.snapshot(), self._observe())
        toks, rows = self._greedy(first, self.spec.teacher_tokens + 1)
        n_ans = self._answer_len(toks, self._limit(p))
        answer = llm.detokenize(toks[:n_ans])
        logp = log_softmax(np.stack(rows))
        score = p.sample.score(answer)
        refs = {}
        shared: dict[str, Any] = {}
        for mode in modes:
            snap, (scores, n_obs, lens, vrows) = at[mode]
            refs[mode] = _Reference(snap, scores, n_obs, lens, vrows, first, toks, logp, n_ans,
                                    answer, score, prefill_seconds=t_ctx, shared=shared)
        return refs

    # -------------------------------------------------------------- one configuration
    def evaluate(self, p: _Prompt, ref: _Reference, mode: str, policy: str, budget: int,
                 **options: Any) -> dict[str, Any]:
        """Score one (policy, budget) on a prompt from its reference snapshot; ``options``
        (kernel, pool_align, floor_alpha, pooling) override the spec's for this call."""
        llm = self.llm
        T = self.spec.teacher_tokens
        base = {"task": p.sample.task, "mode": mode, "policy": policy, "budget": budget,
                "prompt_tokens": len(p.ctx) + len(p.question)}
        if policy == "full":  # nothing is evicted: the reference itself
            rows = float(np.mean([x.mean() for x in ref.lens]))
            zeros = [0.0] * len(ref.lens)
            return {**base, "score": ref.score, "kl": 0.0, "top1": 1.0, "l1": 0.0,
                    "bound": 0.0, "l1_layers": zeros, "bound_layers": zeros,
                    "rows_per_head": rows, "answer": ref.answer}
        extra: dict[str, Any] = {}
        if policy in KVZIP:
            if self.spec.window_share is not None:
                options.setdefault("window_share", self.spec.window_share)
            scorer = kvzip_scorer(policy)
            if scorer not in ref.kvzip:
                ref.kvzip[scorer] = self._kvzip_scores(
                    p, ref, mode, {k: v for k, v in options.items() if k != "window_share"},
                    scorer)
            extra = {"scoring_seconds": ref.shared[f"{scorer}_seconds"],
                     "prefill_seconds": ref.prefill_seconds}
            llm.restore(ref.snap)
            # the window share reads the snapshot's window: observed once, with the reference
            sels = llm.compress(policy, budget, scores=ref.kvzip[scorer], n_obs=ref.n_obs,
                                window_scores=ref.scores, **options)
        else:
            llm.restore(ref.snap)
            sels = llm.compress(policy, budget, scores=ref.scores, n_obs=ref.n_obs,
                                **options)
        l1, bound = attention_l1(ref.scores, ref.n_obs, ref.lens, ref.vrows, sels, self.group)
        lens = llm.ragged.all_lengths()
        rows = float(np.mean([x.mean() for x in lens]))
        first = ref.first_logits if mode == "question-aware" else \
            llm.append_tokens(p.question)
        mark = len(llm.tokens_in_cache)
        logits = llm.append_tokens(ref.tokens[:T], all_logits=True)  # rows predict g[1..T]
        kl, top1 = fidelity(ref.logp[1:T + 1], logits)
        # the greedy answer: the reference's tokens while the top-1s agree, then our own
        preds = [int(first.argmax())] + [int(x) for x in logits.argmax(axis=-1)]
        limit = self._limit(p)
        span = min(ref.answer_len + 1, limit)
        k = next((i for i in range(span) if preds[i] != ref.tokens[i]), None)
        if k is None:
            answer = ref.answer
        else:
            llm.rewind(mark + k)
            toks = list(ref.tokens[:k])
            tok = preds[k]
            while len(toks) < limit:
                toks.append(tok)
                if llm.is_eog(tok) or len(toks) == limit:
                    break
                tok = int(llm.append_tokens([tok]).argmax())
            answer = llm.detokenize(toks[:self._answer_len(toks, limit)])
        return {**base, "score": p.sample.score(answer), "kl": kl, "top1": top1,
                "l1": float(l1.mean()), "bound": float(bound.mean()),
                "l1_layers": [float(x) for x in l1], "bound_layers": [float(x) for x in bound],
                "rows_per_head": rows, "answer": answer, **extra}


    def _kvzip_scores(self, p: _Prompt, ref: _Reference, mode: str,
                      options: dict[str, Any], scorer: str = "recon") -> np.ndarray:
        """The kvzip scores of ``ref``'s snapshot (see the module doc): the context is
        scored once per prompt and ``scorer`` (``"recon"``: reconstructed, ``"pred"``:
        predicted, the kvzap policies); question-aware reuses it, joined with the question
        window's maxima (or scores the whole prompt, ``kvzip_aware="reconstruct"``)."""
        llm = self.llm
        sh = ref.shared
        policy = KVZAP[0] if scorer == "pred" else KVZIP[0]
        if mode == "question-aware" and self.spec.kvzip_aware == "reconstruct":
            llm.restore(ref.snap)
            t0 = time.perf_counter()
            out = llm.kvzip_scores(policy, **options)
            sh[f"{scorer}_seconds_aware"] = time.perf_counter() - t0
            sh.setdefault(f"{scorer}_seconds", sh[f"{scorer}_seconds_aware"])
            return out
        if scorer not in sh:  # the context, from its own state (the agnostic snapshot)
            llm.restore(ref.snap)
            if mode == "question-aware":  # no agnostic snapshot: back to the context
                llm.rewind(len(p.ctx))
            t0 = time.perf_counter()
            sh[scorer] = llm.kvzip_scores(policy, **options)
            sh[f"{scorer}_seconds"] = time.perf_counter() - t0
            sh[f"{scorer}_lens"] = [x.copy() for x in llm.ragged.all_lengths()]
        if mode == "question-agnostic":
            return sh[scorer]
        # question-aware: the context's scores on its rows, max the question window's
        llm.restore(ref.snap)
        rc = llm.ragged
        window = rc.observe_flat(rc.n_obs(self.spec.window), reduce="max")
        return widen_max(sh[scorer], sh[f"{scorer}_lens"], window, ref.lens, self.group)


def widen_max(held: np.ndarray, held_lens: Sequence[np.ndarray], obs: np.ndarray,
              obs_lens: Sequence[np.ndarray], group: int) -> np.ndarray:
    """``obs`` (the ``observe_flat`` layout of ``obs_lens``) with its first
    ``held_lens[il][h]`` rows of every head maxed with ``held`` (the layout of
    ``held_lens``): scores of rows held earlier joined with a later observation."""
    out = obs.copy()
    oi = hi = 0
    for ln, hl in zip(obs_lens, held_lens, strict=True):
        for n, m in zip((int(x) for x in ln), (int(x) for x in hl), strict=True):
            if m > n:
                raise ValueError("held_lens: more rows than the observation")
            dst = out[oi:oi + group * n].reshape(group, n)
            src = held[hi:hi + group * m].reshape(group, m)
            dst[:, :m] = np.maximum(dst[:, :m], src)
            oi += group * n
            hi += group * m
    return out


# ------------------------------------------------------------------ driver and reports
def _group(records: Iterable[dict[str, Any]], keys: Sequence[str]
           ) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


CELL_KEYS = ("mode", "task", "length", "policy", "budget")
LOWER_IS_BETTER = ("kl", "l1", "bound")


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean metrics per (mode, task, length, policy, budget) cell."""
    cells = []
    for key, rs in _group(records, CELL_KEYS).items():
        cell = dict(zip(CELL_KEYS, key, strict=True))
        cell["n"] = len(rs)
        cell["prompt_tokens"] = float(np.mean([r["prompt_tokens"] for r in rs]))
        for m, name in (("score", "accuracy"), ("kl", "kl"), ("top1", "top1"), ("l1", "l1"),
                        ("bound", "bound"), ("rows_per_head", "rows_per_head")):
            cell[name] = float(np.mean([r[m] for r in rs]))
        for m in ("l1_layers", "bound_layers"):  # per layer, mean over the samples
            if all(m in r for r in rs):
                cell[m] = np.mean([r[m] for r in rs], axis=0).tolist()
        for m in ("scoring_seconds", "prefill_seconds"):  # the kvzip policies
            if all(m in r for r in rs):
                cell[m] = float(np.mean([r[m] for r in rs]))
        cells.append(cell)
    return cells


def run_eval(spec: EvalSpec, *, progress: bool = False, verbose: bool = False,
             log: Callable[[str], None] | None = None, interleave: bool = False,
             on_prompt: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``spec``; returns the report (``cells`` aggregated, ``records`` per sample).

    ``interleave``: prompt ``i`` of every task and length before prompt ``i + 1`` (a run cut
    short still covers every cell); ``on_prompt(report)``: called with the report so far
    after every prompt (to save long runs as they go)."""
    t0 = time.perf_counter()
    if interleave:
        jobs = [(t, n, i) for i in range(spec.samples) for t in spec.tasks
                for n in spec.lengths]
    else:
        jobs = [(t, n, i) for t in spec.tasks for n in spec.lengths
                for i in range(spec.samples)]
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="eval", unit="prompt", file=sys.stderr)
    with Evaluator(spec, verbose=verbose) as ev:
        model_name = ev.llm.model_path.name
        for task, length, i in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{task} {length}")
            p = ev.prompt(task, length, i)
            refs = ev.references(p)
            try:
                for mode, ref in refs.items():
                    for policy in spec.policies:
                        for budget in spec.budgets:
                            rec = ev.evaluate(p, ref, mode, policy, budget)
                            rec.update(length=length, sample=i)
                            records.append(rec)
            finally:
                for ref in refs.values():
                    ref.snap.close()
            if bar is not None:
                bar.update(1)
            elif log is not None:
                log(f"{task} {length} #{i}: full cache answered {refs[spec.modes[0]].answer!r}"
                    f" (score {refs[spec.modes[0]].score:.2f}), "
                    f"{time.perf_counter() - t0:.0f} s so far")
            if on_prompt is not None:
                on_prompt({"spec": asdict(spec), "model": model_name,
                           "machine": machine_info(), "seconds": time.perf_counter() - t0,
                           "created": time.time(), "cells": aggregate(records),
                           "records": records, "partial": True})
    if bar is not None:
        bar.close()
    return {"spec": asdict(spec), "model": model_name, "machine": machine_info(),
            "seconds": time.perf_counter() - t0, "created": time.time(),
            "cells": aggregate(records), "records": records}


def merge(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report from runs of the same settings over different tasks or lengths (the
    specs' task, length, budget and policy lists are joined in order without repeats,
    records concatenated, cells re-aggregated)."""
    if not reports:
        raise ValueError("merge: no reports")
    spec = dict(reports[0]["spec"])
    for key in ("tasks", "lengths", "budgets", "policies"):
        spec[key] = list(dict.fromkeys(x for r in reports for x in r["spec"][key]))
    records = [x for r in reports for x in r["records"]]
    return {**reports[0], "spec": spec, "records": records, "cells": aggregate(records),
            "seconds": sum(r["seconds"] for r in reports)}


def summary(report: dict[str, Any], *, mode: str | None = None) -> list[dict[str, Any]]:
    """Cells averaged over tasks and lengths: one row per (mode, policy, budget)."""
    rows = []
    keys = ("mode", "policy", "budget")
    cells = [c for c in report["cells"] if mode is None or c["mode"] == mode]
    for key, cs in _group(cells, keys).items():
        row = dict(zip(keys, key, strict=True))
        row["cells"] = len(cs)
        for m in ("accuracy", "kl", "top1", "l1", "bound", "rows_per_head"):
            row[m] = float(np.mean([c[m] for c in cs]))
        rows.append(row)
    return rows


def compare_policies(report: dict[str, Any], a: str = "ada-snapkv", b: str = "snapkv",
                     metric: str = "accuracy", tol: float = 0.0) -> dict[str, int]:
    """Cells where policy ``a`` wins, ties (within ``tol``) or loses against ``b``; for
    ``kl``, ``l1`` and ``bound`` lower wins."""
    by = {tuple(c[k] for k in CELL_KEYS): c for c in report["cells"]}
    out = {"win": 0, "tie": 0, "lose": 0}
    for key, c in by.items():
        if key[3] != a:
            continue
        other = by.get((*key[:3], b, key[4]))
        if other is None:
            continue
        d = c[metric] - other[metric]
        if metric in LOWER_IS_BETTER:
            d = -d
        out["win" if d > tol else "lose" if d < -tol else "tie"] += 1
    return out


def pooling_label(spec: dict[str, Any]) -> str:
    """``kernel N, causal|center`` of a report's spec (reports before the option: 7, center)."""
    return f"kernel {spec.get('kernel', 7)}, {spec.get('pool_align', 'center')}"


def share_label(spec: dict[str, Any]) -> str:
    """``, kvzip window share X`` when a report has kvzip policies (reports before the
    option: 0; None: the default)."""
    if not any(p in KVZIP for p in spec.get("policies", ())):
        return ""
    from ..defaults import KVZIP_WINDOW_SHARE

    share = spec.get("window_share", 0.0)
    return f", kvzip window share {KVZIP_WINDOW_SHARE if share is None else share:g}"


def table(report: dict[str, Any]) -> str:
    """Markdown: per mode, accuracy (top-1 agreement) per task, length, policy and budget,
    then the averages over tasks and lengths."""
    spec = report["spec"]
    budgets = list(spec["budgets"])
    out = []
    by = {tuple(c[k] for k in CELL_KEYS): c for c in report["cells"]}
    for mode in spec["modes"]:
        out.append(f"**{mode}** — accuracy % (top-1 agreement % with the full cache over "
                   f"{spec['teacher_tokens']} teacher-forced tokens), n = {spec['samples']} "
                   f"per cell, score pooling {pooling_label(spec)}{share_label(spec)}\n")
        out.append("| task | length | policy | " + " | ".join(f"budget {b}" for b in budgets)
                   + " |")
        out.append("|---|---|---|" + "---|" * len(budgets))
        for task in spec["tasks"]:
            for length in spec["lengths"]:
                for pol in spec["policies"]:
                    cs = [by.get((mode, task, length, pol, b)) for b in budgets]
                    if not any(cs):
                        continue
                    toks = next(c["prompt_tokens"] for c in cs if c)
                    vals = ["" if c is None else
                            f"{100 * c['accuracy']:.0f} ({100 * c['top1']:.0f})" for c in cs]
                    out.append(f"| {task} | {toks:.0f} | {pol} | " + " | ".join(vals) + " |")
        out.append("")
        out.append(f"**{mode}** — averaged over tasks and lengths\n")
        out.append("| policy | budget | accuracy % | top-1 % | KL | attn L1 | bound | rows/head |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(summary(report, mode=mode),
                        key=lambda r: (spec["policies"].index(r["policy"]), r["budget"])):
            out.append(f"| {r['policy']} | {r['budget']} | {100 * r['accuracy']:.1f} | "
                       f"{100 * r['top1']:.1f} | {r['kl']:.3f} | {r['l1']:.2f} | "
                       f"{r['bound']:.1f} | {r['rows_per_head']:.0f} |")
        out.append("")
    return "\n".join(out)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy and top-1 agreement vs budget, one line per policy, one column per task
    (averaged over lengths), one row pair per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = report["spec"]
    tasks, modes = list(spec["tasks"]), list(spec["modes"])
    fig, axes = plt.subplots(2 * len(modes), len(tasks),
                             figsize=(3.2 * len(tasks), 2.8 * 2 * len(modes)), squeeze=False)
    for im, mode in enumerate(modes):
        for it, task in enumerate(tasks):
            for row, metric in enumerate(("accuracy", "top1")):
                ax = axes[2 * im + row][it]
                for pol in spec["policies"]:
                    cs = [c for c in report["cells"] if c["mode"] == mode
                          and c["task"] == task and c["policy"] == pol]
                    bud = sorted({c["budget"] for c in cs})
                    ys = [100 * float(np.mean([c[metric] for c in cs if c["budget"] == b]))
                          for b in bud]
                    style = {"color": "black"} if pol == "full" else {}
                    ax.plot(bud, ys, "o--" if pol == "full" else "o-", label=pol,
                            markersize=3, **style)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{task} ({mode.split('-')[1]})", fontsize=9)
                ax.set_ylabel("accuracy %" if metric == "accuracy" else "top-1 agree %",
                              fontsize=8)
                ax.set_xlabel("KV budget (rows per head)", fontsize=8)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"adakv-local eval — {report['model']}, lengths "
                 f"{', '.join(map(str, spec['lengths']))}, n = {spec['samples']} — {m['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON."""
    Path(path).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and math.isnan(o):  # pragma: no cover
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

