from tests.helpers import make_tokenizer
from tsugiki.serve.text import TextStream


def test_stop_string_split_across_tokens_is_held_back_and_cut() -> None:
    tok = make_tokenizer()
    ids = tok("hello world, how are you today?")["input_ids"]
    s = TextStream(tok, stop=("how are",))
    out = ""
    for t in ids:
        out += s.push(t)
        if s.stopped:
            break
    assert s.stopped and out == "hello world, "


def test_flush_releases_partial_stop_prefix() -> None:
    tok = make_tokenizer()
    ids = tok("hello world, ho")["input_ids"]
    s = TextStream(tok, stop=("how are",))
    out = "".join(s.push(t) for t in ids)
    assert not out.endswith("ho")
    assert out + s.flush() == "hello world, ho"


def test_one_token_completing_two_stop_strings_cuts_at_the_earlier() -> None:
    tok = make_tokenizer()
    ids = tok("hello world")["input_ids"]
    assert len(ids) == 2  # " world" arrives as one token and completes both stop strings at once
    s = TextStream(tok, stop=("ld", "wo"))
    out = "".join(s.push(t) for t in ids)
    assert s.stopped and out == "hello "
