"""Word recognition in front of an adapter (adapters/lexicon.py): corrections, what is left alone, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsugiki.adapters.lexicon import Lexicon, common_words, distance, english_words, words
from tsugiki.errors import AdapterError
from tsugiki.monitoring.corruption import corrupt

TEXTS = ["what is my account balance", "transfer money to my savings account", "freeze my credit card",
         "put milk in my shopping cart", "what is the credit card limit", "add eggs to the shopping cart",
         "when is my credit card payment due", "how do i transfer money abroad"]


@pytest.fixture
def lex() -> Lexicon:
    return Lexicon.build(TEXTS, known={"weather", "tulsa"})


def test_distance_counts_transpositions_once_and_neighbouring_keys_as_less() -> None:
    assert distance("acount", "account") == 1
    assert distance("trasnfer", "transfer") == 1  # an adjacent swap is one edit, not two
    assert distance("cart", "card") == 1 and distance("carf", "card") < 1  # f is next to d on the keyboard
    assert distance("same", "same") == 0


def test_misspelled_task_words_are_restored(lex: Lexicon) -> None:
    assert lex.correct("what is my acount balnce") == "what is my account balance"
    assert lex.correct("trasnfer mony to my savngs") == "transfer money to my savings"
    # case pattern and the punctuation around a word are kept
    assert lex.correct("Acount balnce?") == "Account balance?"
    assert lex.correct("FREEZE my CRDIT card") == "FREEZE my CREDIT card"


def test_context_decides_between_equally_close_words(lex: Lexicon) -> None:
    # 'carq' is one substitution from both 'card' and 'cart' (q is next to neither d nor t)
    assert lex.correct("freeze my credit carq") == "freeze my credit card"
    assert lex.correct("add eggs to the shopping carq") == "add eggs to the shopping cart"


def test_known_short_and_distant_words_are_left_alone(lex: Lexicon) -> None:
    # a common word of the base model's vocabulary, a name, possessives, words too short to correct safely,
    # numbers and words with no task word within reach stay as they are
    for text in ["what is the weather", "my card in tulsa", "my account's balance", "is it ok", "pay 500 today",
                 "xylophone quartet"]:
        assert lex.correct(text) == text
    assert lex.correct(" ".join(TEXTS)) == " ".join(TEXTS)  # clean task text is never changed


def test_overlong_words_cost_nothing_and_are_left_alone(lex: Lexicon) -> None:
    long = "x" * 100_000  # its two-deletion set alone would hold ~5e9 strings
    assert lex.correct(f"my acount {long}") == f"my account {long}"
    built = Lexicon.build([f"freeze my card {long}"])
    assert long not in built.counts and "card" in built.counts and Lexicon.from_json(built.to_json()) == built


def test_corrections_are_deterministic_and_help_on_the_corruption_module(lex: Lexicon) -> None:
    noisy = [corrupt(t, "typos", 0.3, s) for s in range(20) for t in TEXTS]
    fixed = [lex.correct(t) for t in noisy]
    assert fixed == [lex.correct(t) for t in noisy]
    clean = [t for s in range(20) for t in TEXTS]
    wrong = lambda xs: sum(a != b for x, c in zip(xs, clean) for a, b in zip(x.split(), c.split()))  # noqa: E731
    assert wrong(fixed) < 0.5 * wrong(noisy)  # most heavy typos of task words are undone


def test_round_trip_and_bad_files(lex: Lexicon, tmp_path: Path) -> None:
    assert Lexicon.load(tmp_path) is None  # an adapter without a lexicon
    lex.save(tmp_path)
    again = Lexicon.load(tmp_path)
    assert again is not None and again.to_json() == lex.to_json()
    assert again.correct("my acount balnce") == lex.correct("my acount balnce")
    (tmp_path / "lexicon.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not readable JSON.*rebuild it with `tsugiki tune`"):
        Lexicon.load(tmp_path)
    (tmp_path / "lexicon.json").write_text(json.dumps({"format": 1, "counts": {"a": -1}}))
    with pytest.raises(AdapterError, match="not a tsugiki lexicon.*counts must be positive"):
        Lexicon.load(tmp_path)
    (tmp_path / "lexicon.json").write_text(json.dumps({"format": 99, "counts": {}}))
    with pytest.raises(AdapterError, match="format 99"):
        Lexicon.load(tmp_path)
    # a file that would make the replica build a huge index is refused before it does
    (tmp_path / "lexicon.json").write_text(json.dumps({"format": 1, "counts": {"a" * 5000: 1}}))
    with pytest.raises(AdapterError, match="at most 200000 words of at most 40 characters"):
        Lexicon.load(tmp_path)
    (tmp_path / "lexicon.json").write_text(json.dumps({"format": 1, "counts": {"card": 1}, "temperature": 0}))
    with pytest.raises(AdapterError, match="temperature must be above 0"):
        Lexicon.load(tmp_path)


def test_common_words_are_whole_word_tokens() -> None:
    class Tok:
        def get_vocab(self) -> dict[str, int]:
            return {"Ġbalance": 0, "ĠTulsa": 1, "▁river": 2, "Ġab": 3, "Ġx9": 4, "ing": 5, "ĠUSA": 6}

    assert common_words(Tok()) == {"balance", "tulsa", "river"}
    assert words("Hi, it's 5 o'clock!") == ["hi", "it's", "o'clock"]


def test_typos_in_the_training_texts_are_not_taken_for_task_words() -> None:
    lex = Lexicon.build(TEXTS * 5 + ["what is my acount balance"])
    assert "acount" not in lex.counts and lex.counts["account"] == 10
    assert lex.correct("my acount") == "my account"
    assert not any("acount" in p for p in lex.bigrams)
    # a rare word that is no near-copy of a frequent one stays a task word
    assert Lexicon.build(TEXTS * 5 + ["pay the plumber"]).counts["plumber"] == 1


def test_frequent_english_words_are_known_and_left_alone() -> None:
    eng = english_words({"six": 300_000, "jeep": 4_000, "acount": 5, "don't": 900_000, "zzz": 10}, min_count=3000)
    assert eng == {"six", "jeep"}  # frequent enough, letters only
    plain = Lexicon.build(TEXTS + ["mix the flour"])
    assert plain.correct("six eggs") == "mix eggs"  # a real word of no task and no single token, "corrected"
    assert Lexicon.build(TEXTS + ["mix the flour"], known=eng).correct("six eggs") == "six eggs"
