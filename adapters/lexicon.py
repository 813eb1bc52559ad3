"""Word recognition in front of an adapter: misspelled words of a request mapped back to the task's words.

An adapter tuned on a task learns that task's words. A user's misspelling of one ("acount", "trasnfer") is a
string the model reads as several unrelated sub-word tokens, and noise augmentation in training recovers only part
of what it meant (benchmarks/README.md: about a third of plain LoRA's heavy-typo drop). A word-recognition front
end, as in Pruthi, Dhingra and Lipton, "Combating Adversarial Misspellings with Robust Word Recognition" (ACL
2019), fixes the input instead: every word that is neither a task word nor a common word of the base model's
vocabulary is replaced by the task word it most likely is, or left alone when none is close.

The tuning job builds a :class:`Lexicon` from the training texts (``lexicon.json`` beside the weights, a JSON
file: nothing is unpickled) and the gateway applies it to the user's text of every request routed to that
adapter version, before tokenization; the monitor still sees the text as sent.

The choice is a noisy-channel decision (Kernighan, Church and Gale 1990; Brill and Moore 2000):
``argmax_c log P(c | neighbours) - cost(observed, c) / temperature``, where ``P`` is a bigram model of the task
texts (interpolated with unigram counts) and ``cost`` a Damerau-Levenshtein distance in which substituting a
neighbouring key costs less than any other letter. Candidates come from a SymSpell-style index of deletions (Garbe
2012), so a lookup costs a few dictionary probes, not a pass over the vocabulary.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from tsugiki.adapters.format import LEXICON_FILE
from tsugiki.errors import AdapterError

FORMAT = 1
MAX_EDITS = 2
MIN_LENGTH = 3  # shorter words ("an", "my") have too many one-edit neighbours to correct safely
# Words of up to SHORT letters get one edit, longer ones two; common words are tokenizer words of COMMON_LENGTH
# letters or more (its 3-letter word tokens are as often fragments, "phe", "tir", as words). Chosen on CLINC150's
# val split against (5, 3): heavy typos' corrupted words restored 56% against 45%, clean words changed 58 against
# 28 (of ~4,000), and a saved robust adapter's heavy-typo accuracy 0.831 against 0.813 at the same clean 0.871.
SHORT, COMMON_LENGTH = 3, 4
# English words at least this frequent in pyspellchecker's list (OpenSubtitles counts) are known too: without them
# real words of no task and no single token were "corrected" ("six" -> "mix", "jeep" -> "fee"). Chosen on CLINC150's
# val split among none, 10^7..10^2: clean words changed 58 -> 36 of ~4,000 (most of those left are slips in the
# data itself, "betwen", or names), heavy typos' corrupted words restored 56.6% -> 55.6%; lower cuts (1000: 30,
# 54.4%; 100: 21, 53.0%) let more misspellings pass as rare real words.
ENGLISH_MIN_COUNT = 3000
_WORD = re.compile(r"^([^A-Za-z']*)([A-Za-z']+)([^A-Za-z']*)$")
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEAR = {(a, b) for r, row in enumerate(_ROWS) for c, a in enumerate(row)
         for rr in (r - 1, r, r + 1) if 0 <= rr < len(_ROWS)
         for cc in (c - 1, c, c + 1) if 0 <= cc < len(_ROWS[rr]) and (rr, cc) != (r, c)
         for b in _ROWS[rr][cc]}
NEAR_KEY_COST = 0.6  # a neighbouring key is the commonest substitution in typing data
RARE, DOMINANT, SLIP_LENGTH = 2, 10, 5  # Lexicon.build: what a typo in the training texts looks like
MAX_WORDS, MAX_WORD_LENGTH = 200_000, 40  # what a lexicon file may hold (a task has a few thousand words)


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letters and apostrophes; what :meth:`Lexicon.correct` looks at)."""
    out = []
    for tok in text.split():
        m = _WORD.match(tok)
        if m:
            out.append(m.group(2).lower())
    return out


def distance(a: str, b: str) -> float:
    """Damerau-Levenshtein distance (adjacent transpositions) with substitutions of neighbouring keys at
    :data:`NEAR_KEY_COST`."""
    prev2: list[float] = []
    prev = [float(j) for j in range(len(b) + 1)]
    for i in range(1, len(a) + 1):
        cur = [float(i)] + [0.0] * len(b)
        for j in range(1, len(b) + 1):
            x, y = a[i - 1], b[j - 1]
            sub = 0.0 if x == y else NEAR_KEY_COST if (x, y) in _NEAR else 1.0
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + sub)
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def _deletes(word: str, k: int) -> set[str]:
    """``word`` with up to ``k`` characters deleted (the SymSpell index key set)."""
    out = {word}
    for n in range(1, min(k, len(word) - 1) + 1):
        for drop in combinations(range(len(word)), n):
            out.add("".join(ch for i, ch in enumerate(word) if i not in drop))
    return out


def common_words(tokenizer: Any) -> set[str]:
    """Whole words of four letters or more (lower or Title case, lower-cased) that the tokenizer has as single
    tokens (a word-start marker ``Ġ`` or ``▁`` and letters only): common words and names of the base model's
    language, which are never 'corrected'."""
    out = set()
    for tok in tokenizer.get_vocab():
        w = tok[1:]
        if tok[:1] in ("Ġ", "▁") and w.isalpha() and len(w) >= COMMON_LENGTH and (w.islower() or w.istitle()):
            out.add(w.lower())  # Title-case tokens are mostly names: "Tulsa" must not become "salsa"
    return out


def english_words(frequencies: Mapping[str, int], min_count: int = ENGLISH_MIN_COUNT) -> set[str]:
    """The alphabetic words of an English frequency list (word -> count) seen at least ``min_count`` times."""
    return {w for w, n in frequencies.items() if n >= min_count and w.isalpha()}


@dataclass
class Lexicon:
    """The task's words with their counts and bigrams, and the words never changed.

    Args:
        counts: task word -> occurrences in the training texts (the candidates of a correction).
        bigrams: ``"w1 w2"`` -> occurrences (``<s>`` and ``</s>`` mark the text's ends).
        known: further words left as they are (the base model's common words, frequent English words).
        temperature: edit cost per nat of language-model probability; lower trusts the spelling more.
    """

    counts: dict[str, int]
    bigrams: dict[str, int] = field(default_factory=dict)
    known: frozenset[str] = frozenset()
    temperature: float = 0.4
    _index: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    _total: int = field(default=0, init=False, repr=False)
    _left: Counter[str] = field(default_factory=Counter, init=False, repr=False)

    def __post_init__(self) -> None:
        self._total = sum(self.counts.values())
        for w in self.counts:
            for d in _deletes(w, MAX_EDITS):
                self._index.setdefault(d, []).append(w)
        for pair, n in self.bigrams.items():
            self._left[pair.split(" ", 1)[0]] += n

    # ---- building and files
    @classmethod
    def build(cls, texts: Iterable[str], known: Iterable[str] = ()) -> Lexicon:
        """A lexicon of the words of ``texts`` (the task's user texts); ``known`` words are left alone.

        Training texts have typos too (and a refresh trains on captured traffic, typos included): a rare word
        (at most :data:`RARE` occurrences, :data:`SLIP_LENGTH` letters or more, not a common word) one edit from a
        word :data:`DOMINANT` times as frequent is taken for a misspelling of it and left out, so requests with the
        same slip are corrected rather than trusted (shorter words are too often real: "atm" next to "at")."""
        counts: Counter[str] = Counter()
        bigrams: Counter[str] = Counter()
        for text in texts:
            ws = [w for w in words(text) if len(w) <= MAX_WORD_LENGTH]
            counts.update(ws)
            bigrams.update(f"{a} {b}" for a, b in zip(["<s>", *ws], [*ws, "</s>"]))
        known = set(known)
        draft = cls(dict(counts), {}, frozenset())
        slips = {w for w, n in counts.items() if n <= RARE and w not in known and len(w) >= SLIP_LENGTH
                 and w.isalpha()
                 and any(d <= 1 and counts[c] >= DOMINANT * n for c, d in draft.candidates(w) if c != w)}
        kept = dict(Counter({w: n for w, n in counts.items() if w not in slips}).most_common(MAX_WORDS))
        pairs = {p: n for p, n in bigrams.items() if all(w in kept or w in ("<s>", "</s>") for w in p.split(" "))}
        return cls(kept, pairs, frozenset(known - set(kept)))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "temperature": self.temperature, "counts": self.counts, "bigrams": self.bigrams,
                "known": sorted(self.known)}

    @classmethod
    def from_json(cls, d: Any, where: str = "lexicon") -> Lexicon:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, this version reads {FORMAT}")
            counts = {str(w): int(n) for w, n in d["counts"].items()}
            bigrams = {str(w): int(n) for w, n in d.get("bigrams", {}).items()}
            if any(n < 1 for n in [*counts.values(), *bigrams.values()]):
                raise ValueError("counts must be positive")
            # the deletion index costs O(length^2) per word: bound what a file can make a replica compute
            if len(counts) > MAX_WORDS or any(len(w) > MAX_WORD_LENGTH for w in counts):
                raise ValueError(f"at most {MAX_WORDS} words of at most {MAX_WORD_LENGTH} characters")
            temperature = float(d.get("temperature", 0.4))
            if not temperature > 0:
                raise ValueError(f"temperature must be above 0, got {temperature}")
            return cls(counts, bigrams, frozenset(str(w) for w in d.get("known", ())), temperature)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{where} is not a tsugiki lexicon ({type(e).__name__}: {e}); rebuild it with "
                               "`tsugiki tune` or remove it") from e

    def save(self, adapter_dir: str | Path) -> Path:
        path = Path(adapter_dir) / LEXICON_FILE
        path.write_text(json.dumps(self.to_json(), sort_keys=True))
        return path

    @classmethod
    def load(cls, adapter_dir: str | Path) -> Lexicon | None:
        """The lexicon an adapter directory ships, or None when it has none."""
        path = Path(adapter_dir) / LEXICON_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError(f"{path} is not readable JSON ({e}); rebuild it with `tsugiki tune` or remove "
                               "it") from e
        return cls.from_json(d, str(path))

    # ---- correction
    def _logp(self, prev: str, w: str, nxt: str) -> float:
        """log P(w | prev) + log P(nxt | w): bigrams interpolated with add-one unigrams."""
        v = len(self.counts) + 1
        uni = (self.counts.get(w, 0) + 1) / (self._total + v)

        def bi(a: str, b: str, p_b: float) -> float:
            return (self.bigrams.get(f"{a} {b}", 0) + 2 * p_b) / (self._left.get(a, 0) + 2)

        p_next = (self.counts.get(nxt, 0) + 1) / (self._total + v) if nxt != "</s>" else 0.1
        return math.log(bi(prev, w, uni)) + math.log(bi(w, nxt, p_next))

    def candidates(self, word: str) -> list[tuple[str, float]]:
        """Task words within :data:`MAX_EDITS` edits of ``word`` (lower case), with their distances."""
        limit = 1 if len(word) <= SHORT else MAX_EDITS
        seen: set[str] = set()
        out = []
        for d in _deletes(word, limit):
            for w in self._index.get(d, ()):
                if w not in seen:
                    seen.add(w)
                    dist = distance(word, w)
                    if dist <= limit:
                        out.append((w, dist))
        return out

    def is_known(self, word: str) -> bool:
        stem = word[:-2] if word.endswith("'s") else word  # possessives of known words are known
        return any(w in self.counts or w in self.known for w in {word, stem})

    def correct_words(self, ws: Sequence[str]) -> list[str]:
        """Lower-case words with unknown ones replaced by their most likely task word (left to right, each
        choice conditioned on the corrected words before it and the observed word after it)."""
        out = list(ws)
        for i, w in enumerate(out):
            # (a word far longer than any task word cannot be within reach; its deletions would cost O(length^2))
            if not MIN_LENGTH <= len(w) <= MAX_WORD_LENGTH + MAX_EDITS or self.is_known(w):
                continue
            cands = self.candidates(w)
            if not cands:
                continue
            prev = out[i - 1] if i else "<s>"
            nxt = ws[i + 1] if i + 1 < len(ws) else "</s>"
            out[i] = max(cands, key=lambda c: (self._logp(prev, c[0], nxt) - c[1] / self.temperature, c[0]))[0]
        return out

    def correct(self, text: str) -> str:
        """``text`` with its unknown words corrected; spacing, punctuation around words and the case pattern of
        each word (lower, Title, UPPER) are kept."""
        toks = text.split(" ")
        spots = [(i, m) for i, t in enumerate(toks) if (m := _WORD.match(t))]
        fixed = self.correct_words([m.group(2).lower() for _, m in spots])
        for (i, m), new in zip(spots, fixed):
            core = m.group(2)
            if new == core.lower():
                continue
            if core.isupper() and len(core) > 1:
                new = new.upper()
            elif core[:1].isupper():
                new = new[:1].upper() + new[1:]
            toks[i] = m.group(1) + new + m.group(3)
        return " ".join(toks)
