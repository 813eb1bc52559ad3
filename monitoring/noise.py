"""Per-request noisy-input detection: a score, the reasons, and calibrated thresholds.

Each reason has a raw signal in [0, 1] computed from the text alone (tens of microseconds per request):

* ``typo_heavy``: share of words (weighted by length up to four letters) that look like misspellings: absent
  from or rare in an English frequency list (pyspellchecker's) while one edit away from a far more common word;
  unknown words count 0.6.
* ``encoding_garbage``: mojibake and broken encodings: ftfy's count of mojibake sequences, replacement
  characters and control characters, per word.
* ``random_characters``: share of characters that are symbols, private-use, unassigned or from a script other
  than the text's main one.
* ``mixed_script``: share of words mixing letters of two or more scripts (homoglyphs, garbage).
* ``repetition``: share of characters in runs of 3+ identical characters, or of repeated words.
* ``truncated``: the text ends inside a word (the last word, three letters or more, is no English word but
  starts a common one).
* ``over_length``: prompt tokens over the configured limit (set by the server, which knows the token count).

A reason fires when its signal reaches its threshold; the request's noise score is the largest
signal/threshold ratio (>= 1 means flagged). Thresholds are calibrated on clean text so that at most the
configured share of clean requests is flagged (:meth:`NoiseDetector.calibrate`); the defaults shipped in
``noise_thresholds.json`` come from CLINC150 validation queries (see benchmarks/monitor_eval.py).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

REASONS = ("typo_heavy", "encoding_garbage", "random_characters", "mixed_script", "repetition", "truncated",
           "over_length")
_DEFAULTS_FILE = Path(__file__).with_name("noise_thresholds.json")
_FALLBACK = {"typo_heavy": 0.34, "encoding_garbage": 0.01, "random_characters": 0.05, "mixed_script": 0.01,
             "repetition": 0.12, "truncated": 1.0, "over_length": 1.0}
_WORD = re.compile(r"[^\W\d_]+")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COMMON = 2000  # words at least this frequent are never typo suspects


@lru_cache(maxsize=1)
def word_frequencies() -> dict[str, int]:
    """pyspellchecker's English word frequency list (word -> count), loaded once."""
    from spellchecker import SpellChecker

    return dict(SpellChecker(language="en", distance=1).word_frequency.dictionary)


_MAX_TYPO_WORD = 32  # longer "words" skip the edit search (its cost grows with the square of the length)


def _edits1(w: str) -> Iterable[str]:
    for i in range(len(w) + 1):
        a, b = w[:i], w[i:]
        if b:
            yield a + b[1:]
        if len(b) > 1:
            yield a + b[1] + b[0] + b[2:]
        for c in _LETTERS:
            if b:
                yield a + c + b[1:]
            yield a + c + b


@lru_cache(maxsize=65536)
def _typo_likeness(word: str) -> float:
    freq = word_frequencies()
    f = freq.get(word, 0)
    if f >= _COMMON:
        return 0.0
    if not word.isascii():
        return 0.0  # not an English word at all; the script signals cover it
    if len(word) > _MAX_TYPO_WORD:  # no dictionary word is this long: its edits (54 per letter) would stall the
        return 0.0 if f else 0.6    # request for nothing; unknown scores as an unknown word does below
    best = max((freq.get(c, 0) for c in _edits1(word)), default=0)
    s = (math.log10(best + 1) - math.log10(f + 1)) / 3.0  # orders of magnitude more common neighbour
    if f == 0:
        s = max(s, 0.6)
    return min(1.0, max(0.0, s))


def _script(ch: str) -> str:
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "UNKNOWN"
    return name.split(" ")[0]


def _bad_encoding(text: str) -> int:
    from ftfy.badness import badness

    control = sum(1 for c in text if unicodedata.category(c) in ("Cc", "Co", "Cn") and c not in "\n\t\r")
    return int(badness(text)) + text.count("\ufffd") + control


@dataclass(frozen=True)
class NoiseReport:
    """The verdict on one request: ``score >= 1`` means flagged; ``reasons`` are the reasons that fired."""

    score: float
    reasons: tuple[str, ...]
    signals: dict[str, float] = field(default_factory=dict)
    # the score of the text alone (``over_length`` left out): what the drift detector's noise CUSUM ranks, so
    # live requests (whose token counts the replica knows) and reference prompts (whose it does not) compare
    text_score: float = 0.0

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)


def signals(text: str, *, prompt_tokens: int | None = None, max_prompt_tokens: int | None = None) -> dict[str, float]:
    """The raw signal of every reason for ``text`` (each in [0, 1])."""
    words = _WORD.findall(text)
    lw = [w.lower() for w in words]
    n_words = max(1, len(words))
    out = dict.fromkeys(REASONS, 0.0)
    if lw:
        # Short words carry little evidence either way ("im", "u"): weight by length up to four letters.
        out["typo_heavy"] = sum(_typo_likeness(w) * min(1.0, len(w) / 4) for w in lw) / len(lw)
    out["encoding_garbage"] = min(1.0, _bad_encoding(text) / n_words)
    letters = [c for c in text if c.isalpha()]
    scripts: dict[str, int] = {}
    for c in letters:
        s = _script(c)
        scripts[s] = scripts.get(s, 0) + 1
    main = max(scripts, key=lambda k: scripts[k]) if scripts else "LATIN"
    odd = 0
    for c in text:
        cat = unicodedata.category(c)
        symbol = cat in ("So", "Sk", "Co", "Cn", "Cs") or (cat == "Sm" and not c.isascii())
        if symbol or (c.isalpha() and _script(c) != main):
            odd += 1
    out["random_characters"] = odd / max(1, len(text))
    mixed = sum(1 for w in words if len({_script(c) for c in w}) > 1)
    out["mixed_script"] = mixed / n_words
    runs = sum(len(m.group(0)) for m in re.finditer(r"(.)\1{2,}", text) if not m.group(0)[0].isdigit())
    long_words = [w for w in lw if len(w) >= 3]
    repeated_words = 1.0 - len(set(long_words)) / len(long_words) if len(long_words) >= 4 else 0.0
    out["repetition"] = max(runs / max(1, len(text)), repeated_words)
    if lw and text and text[-1].isalpha():
        last = lw[-1]
        freq = word_frequencies()
        if len(last) >= 3 and last not in freq and last.isascii():
            out["truncated"] = 1.0 if _completes(last) else 0.0
    if prompt_tokens is not None and max_prompt_tokens:
        out["over_length"] = min(1.0, prompt_tokens / max_prompt_tokens)
    return out


@lru_cache(maxsize=1)
def _common_sorted() -> list[str]:
    return sorted(w for w, f in word_frequencies().items() if f >= _COMMON)


def _completes(prefix: str) -> bool:
    """Whether ``prefix`` starts a common word (so a text ending in it was probably cut)."""
    words = _common_sorted()
    i = bisect.bisect_left(words, prefix)
    return i < len(words) and words[i].startswith(prefix)


class NoiseDetector:
    """Scores requests for noise against per-reason thresholds.

    Args:
        thresholds: reason -> signal level at which it fires; defaults to the shipped calibration.
        max_prompt_tokens: prompts longer than this (in tokens) fire ``over_length``.
    """

    def __init__(self, thresholds: dict[str, float] | None = None, *, max_prompt_tokens: int | None = None) -> None:
        self.thresholds = dict(default_thresholds() if thresholds is None else thresholds)
        unknown = set(self.thresholds) - set(REASONS)
        if unknown:
            raise ValueError(f"unknown noise reasons {sorted(unknown)}; known: {', '.join(REASONS)}")
        for r in REASONS:
            t = self.thresholds.setdefault(r, _FALLBACK[r])
            if not t > 0:
                raise ValueError(f"threshold for {r!r} should be positive but the value passed is {t}")
        self.max_prompt_tokens = max_prompt_tokens

    def score(self, text: str, *, prompt_tokens: int | None = None) -> NoiseReport:
        return self.judge(signals(text, prompt_tokens=prompt_tokens, max_prompt_tokens=self.max_prompt_tokens))

    def judge(self, sig: dict[str, float]) -> NoiseReport:
        """The report for raw :func:`signals` computed earlier (reasons missing from ``sig`` count 0)."""
        sig = {r: float(sig.get(r, 0.0)) for r in REASONS}
        ratios = {r: sig[r] / self.thresholds[r] for r in REASONS}
        fired = tuple(r for r in REASONS if ratios[r] >= 1.0)
        return NoiseReport(score=max(ratios.values()), reasons=fired, signals=sig,
                           text_score=max(v for r, v in ratios.items() if r != "over_length"))

    @staticmethod
    def calibrate(clean_texts: list[str], *, false_positive_rate: float = 0.01) -> dict[str, float]:
        """Thresholds so that at most ``false_positive_rate`` of ``clean_texts`` fire any reason.

        The budget is split evenly over the reasons that clean text ever triggers; a reason that never fires
        on clean text keeps its fallback floor.
        """
        sig = np.array([[signals(t)[r] for r in REASONS] for t in clean_texts])
        active = [j for j, r in enumerate(REASONS) if r != "over_length" and (sig[:, j] > 0).any()]
        per = false_positive_rate / max(1, len(active))
        out = dict(_FALLBACK)
        for j in active:
            r = REASONS[j]
            q = float(np.quantile(sig[:, j], 1.0 - per, method="higher"))
            # strictly above every clean value at that quantile
            out[r] = max(_FALLBACK[r], float(np.nextafter(q, np.inf)))
        return out


def default_thresholds() -> dict[str, float]:
    if _DEFAULTS_FILE.is_file():
        data = json.loads(_DEFAULTS_FILE.read_text())
        return {k: float(v) for k, v in data["thresholds"].items()}
    return dict(_FALLBACK)
