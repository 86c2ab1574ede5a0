"""A document turn, then a question turn (issue 17 item 4), on the real runtime and model.

The user pastes a document; the cache is compressed to 256 rows per head right after that
turn, before any question exists; the assistant's reply and the question come in the next
turn (the multi-turn cache path: the common prefix is reused, the edited reply rewound). The
reconstruction-scored ``ada-kvzip-global``, and ``ada-kvzap-global`` with predicted scores,
must answer what vanilla llama.cpp (full cache) answers there.

How the prompts were chosen: seeded RULER niah-single documents at ~1K tokens (seeds from
2000 on; ``tests`` never saw them before the choice), kept when vanilla's greedy answer in
this two-turn form contains the needle *and* leads the runner-up token by at least
``MARGIN`` logits at every token that spells the needle (so a near-tie of the model itself
cannot decide the test; the check is repeated here). Seeds 2000-2007 all qualified (needle
margins 2.3-4.9 logits); the first four are used. On seeds 2000-2004, ada-kvzip-global and
ada-kvzip answered 5 of 5 and ada-snapkv, whose window is the end of the document, 0 of 5
(its answers stop after two digits). ``adakv-local eval --mode question-agnostic`` measures
the same on 40 prompts per cell (README, "Question-agnostic compression").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adakv_local import LocalLLM
from adakv_local.bench.eval_tasks import EvalSample, make_sample
from adakv_local.bindings import ragged

pytestmark = pytest.mark.skipif(not ragged.available(), reason="needs the patched runtime")

SEEDS = (2000, 2001, 2002, 2003)
MARGIN = 1.0
REPLY = "I have read the document."
BUDGET = 256


def _turns(s: EvalSample) -> tuple[list[dict], list[dict]]:
    first = [{"role": "user", "content": s.context}]
    return first, first + [{"role": "assistant", "content": REPLY},
                           {"role": "user", "content": s.question}]


def _two_turns(llm: LocalLLM, s: EvalSample) -> tuple[str, float | None]:
    """Prefill the document turn (compressed there with a budget), then the question turn;
    returns the greedy answer and, when it holds the needle, the smallest lead (logits) of
    a token that spells the needle over that step's runner-up."""
    first, second = _turns(s)
    llm.reset()
    llm.prefill_tokens(llm.tokenize(llm.format_chat(first), add_bos=False))
    logits = llm.prefill_tokens(llm.tokenize(llm.format_chat(second), add_bos=False))
    out: list[int] = []
    steps: list[tuple[float, int]] = []  # per answer token: lead, answer length after it
    answer = ""
    for _ in range(32):
        top2 = np.sort(logits)[-2:]
        tok = int(logits.argmax())
        if llm.is_eog(tok):
            break
        out.append(tok)
        answer = llm.detokenize(out)
        steps.append((float(top2[1] - top2[0]), len(answer)))
        if s.answers[0] in answer:
            break
        logits = llm.decode_token(tok)
    if s.answers[0] not in answer:
        return answer, None
    start = answer.index(s.answers[0])
    # the steps whose text ends after the needle's start
    return answer, min(gap for gap, end in steps if end > start)


@pytest.fixture(scope="module")
def samples() -> list[EvalSample]:
    return [make_sample("niah-single", 1024, seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def vanilla_answers(default_model: Path, samples: list[EvalSample]) -> None:
    with LocalLLM(default_model, n_ctx=4096, n_threads=2, seed=0) as van:
        for s in samples:  # the selection criterion (module doc), checked again
            answer, margin = _two_turns(van, s)
            assert margin is not None and s.score(answer) == 1.0, answer
            assert margin >= MARGIN, (answer, margin)


@pytest.mark.parametrize("policy", ["ada-kvzip-global", "ada-kvzap-global"])
def test_document_then_question_answers_what_vanilla_answers(
        default_model: Path, samples: list[EvalSample], vanilla_answers: None,
        policy: str) -> None:
    """Exact reconstruction scores, and the predicted ones (kvzap: no reconstruction; its
    calibration, once per model, is cached)."""
    with LocalLLM(default_model, kv_budget=BUDGET, policy=policy, n_ctx=4096,
                  n_threads=2, seed=0) as ada:
        for s in samples:
            answer, _ = _two_turns(ada, s)
            st = ada.kv_stats()
            assert st["compressions"] >= 1
            assert st["reconstruction"]["method"] == ("predict" if "kvzap" in policy
                                                      else "attention")
            # compressed to the budget (plus headroom and the question turn's rows)
            assert float(np.mean([np.mean(x) for x in st["rows_per_head"]])) \
                <= BUDGET + 64 + 64
            assert s.score(answer) == 1.0, answer
