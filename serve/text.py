"""Incremental detokenisation with stop strings, for streaming.

Text is released only when it is final: never half a UTF-8 character, never the start of what may turn out
to be a stop string (held back until it is known not to be one).
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns a growing list of generated token ids into text deltas, honouring stop strings."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all final text released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        full = self._tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character; wait for the next token
        # A stop string can only end in the new part: search from where it could start. Of several found (one
        # token can complete more than one), the text ends at the earliest.
        found = [at for s in self._stop if (at := full.find(s, max(0, len(self.text) - len(s) + 1))) != -1]
        if found:
            self.stopped = True
            return self._release(full[: min(found)])
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._release(full[: len(full) - hold])

    def flush(self) -> str:
        """At the end of generation, release text held back for a stop string that never came."""
        if self.stopped:
            return ""
        full = self._tok.decode(self.ids, skip_special_tokens=True)
        return self._release(full)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta
