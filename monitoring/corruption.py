"""Text corruption: the noise real users send, reproducibly.

One module for the whole project: the monitor's noise detector is evaluated on it and the tuning job
(issue 4) augments training data with it, so what is detected and what is trained against are the same
families. Every function is a pure function of ``(text, severity, rng)``; the same seed gives the same text.

Families (``FAMILIES``): keyboard typos, character swaps, character deletions, OCR confusions, casing,
random unicode, mojibake (UTF-8 read as cp1252/latin-1), repeated characters, code-switching, truncation.
``severity`` is the fraction of words (or characters, for character-level families) affected, in (0, 1].
"""

from __future__ import annotations

import random
from collections.abc import Callable

_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for r, row in enumerate(_ROWS):
    for c, ch in enumerate(row):
        near = []
        for dr in (-1, 0, 1):
            rr = r + dr
            if 0 <= rr < len(_ROWS):
                for dc in (-1, 0, 1):
                    cc = c + dc
                    if (dr or dc) and 0 <= cc < len(_ROWS[rr]):
                        near.append(_ROWS[rr][cc])
        _NEIGHBOURS[ch] = "".join(near)

_OCR = {"o": "0", "l": "1", "i": "1", "e": "c", "a": "o", "s": "5", "b": "6", "g": "9", "m": "rn", "rn": "m",
        "cl": "d", "d": "cl", "t": "f", "u": "v", "h": "b", "z": "2"}
# Short, common function words of other languages, for code-switching (replaces English words).
_FOREIGN = ["pero", "porque", "donde", "quiero", "bitte", "danke", "warum", "aber", "parce", "avec", "pourquoi",
            "merci", "perche", "voglio", "kudasai", "nani", "doko", "zhege", "shenme", "xiexie"]


def _words(text: str) -> list[str]:
    return text.split(" ")


def _pick(n: int, severity: float, rng: random.Random) -> list[int]:
    k = max(1, round(n * severity)) if n else 0
    return sorted(rng.sample(range(n), min(k, n)))


def _per_word(fn: Callable[[str, random.Random], str],
              min_letters: int = 1) -> Callable[[str, float, random.Random], str]:
    """Apply ``fn`` to a ``severity`` share of the words (those with at least ``min_letters`` letters, if any)."""

    def apply(text: str, severity: float, rng: random.Random) -> str:
        words = _words(text)
        candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= min_letters]
        if not candidates:
            candidates = [i for i, w in enumerate(words) if any(c.isalpha() for c in w)]
        for j in _pick(len(candidates), severity, rng):
            i = candidates[j]
            words[i] = fn(words[i], rng)
        return " ".join(words)

    return apply


def _keyboard(word: str, rng: random.Random) -> str:
    idx = [i for i, c in enumerate(word) if c.lower() in _NEIGHBOURS]
    if not idx:
        return word
    i = rng.choice(idx)
    rep = rng.choice(_NEIGHBOURS[word[i].lower()])
    return word[:i] + (rep.upper() if word[i].isupper() else rep) + word[i + 1 :]


def _swap(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _delete(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1 :]


def _ocr(word: str, rng: random.Random) -> str:
    spots = [(i, k) for k in _OCR for i in range(len(word)) if word.lower().startswith(k, i)]
    if not spots:
        return word
    i, k = rng.choice(spots)
    return word[:i] + _OCR[k] + word[i + len(k) :]


def _typo_mix(word: str, rng: random.Random) -> str:
    """Heavy typos: one to two edits of mixed kinds per affected word."""
    for _ in range(rng.choice((1, 2))):
        word = rng.choice((_keyboard, _swap, _delete))(word, rng)
    return word


def casing(text: str, severity: float, rng: random.Random) -> str:
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    for j in _pick(len(letters), severity, rng):
        i = letters[j]
        chars[i] = chars[i].swapcase()
    return "".join(chars)


def random_unicode(text: str, severity: float, rng: random.Random) -> str:
    """Replace characters by random code points from many scripts and symbol blocks."""
    blocks = [(0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
              (0x2200, 0x22FF), (0x2500, 0x257F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00)]
    chars = list(text)
    for i in _pick(len(chars), severity, rng):
        lo, hi = rng.choice(blocks)
        chars[i] = chr(rng.randint(lo, hi))
    return "".join(chars)


def mojibake(text: str, severity: float, rng: random.Random) -> str:
    """UTF-8 bytes decoded as cp1252 (the classic 'Ã©' garbage), on a share of the words.

    Plain ASCII survives a wrong decoding unchanged, so affected words first get the accents or typographic
    punctuation they would carry in real text (quotes, dashes, accented letters).
    """
    accents = {"a": "á", "e": "é", "i": "í", "o": "ö", "u": "ü", "n": "ñ", "c": "ç"}

    def one(word: str, r: random.Random) -> str:
        chars = list(word)
        for i, c in enumerate(chars):
            if c in accents and r.random() < 0.5:
                chars[i] = accents[c]
        fancy = r.choice(["“" + "".join(chars) + "”", "".join(chars) + "’s", "".join(chars) + " — ",
                          "".join(chars)])
        return fancy.encode("utf-8").decode("cp1252", errors="replace")

    return _per_word(one)(text, severity, rng)


def repeated_chars(text: str, severity: float, rng: random.Random) -> str:
    def one(word: str, r: random.Random) -> str:
        i = r.randrange(len(word))
        return word[: i + 1] + word[i] * r.randint(3, 8) + word[i + 1 :]

    return _per_word(one)(text, severity, rng)


def code_switch(text: str, severity: float, rng: random.Random) -> str:
    return _per_word(lambda w, r: r.choice(_FOREIGN))(text, severity, rng)


def truncate(text: str, severity: float, rng: random.Random) -> str:
    """Cut the text, possibly mid-word, keeping ``1 - severity`` of it (at least one character)."""
    keep = max(1, round(len(text) * (1 - severity)))
    return text[:keep]


FAMILIES: dict[str, Callable[[str, float, random.Random], str]] = {
    # Typing errors land in words of three letters or more, as in real typing data.
    "keyboard": _per_word(_keyboard, 3),
    "swap": _per_word(_swap, 3),
    "delete": _per_word(_delete, 3),
    "typos": _per_word(_typo_mix, 3),
    "ocr": _per_word(_ocr, 3),
    "casing": casing,
    "random_unicode": random_unicode,
    "mojibake": mojibake,
    "repeat": repeated_chars,
    "code_switch": code_switch,
    "truncate": truncate,
}


def corrupt(text: str, family: str, severity: float, seed: int | random.Random) -> str:
    """Corrupt ``text`` with one family at ``severity`` (share of words/characters affected, in (0, 1])."""
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption family {family!r}; choose one of {', '.join(FAMILIES)}")
    if not 0.0 < severity <= 1.0:
        raise ValueError(f"severity should be in (0, 1] but the value passed is {severity}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return FAMILIES[family](text, severity, rng)
