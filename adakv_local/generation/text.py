"""Token bytes to streamed text: incremental UTF-8 decoding and stop strings.

A token may end inside a multi-byte character, and generated text may end with the start
of a stop string; :class:`StopText` holds back exactly what cannot be emitted yet, so a
stream never shows a stop string or half of a character.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopText:
    """Accumulates token pieces; says what can be emitted and whether a stop string hit."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded, not yet emitted

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns (text to emit now, whether a stop string was hit).

        After a hit the text before the stop string is returned and nothing is held.
        """
        self._text += self._dec.decode(piece)
        text = self._text
        hit = min((text.find(s) for s in self.stop if s in text), default=-1)
        if hit >= 0:
            self._text = ""
            return text[:hit], True
        # emit everything that cannot be the start of a stop string
        hold = 0
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                hold = k
                break
        self._text = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held text (and any incomplete character) at the end of the generation."""
        text = self._text + self._dec.decode(b"", final=True)
        self._text = ""
        return text
