"""StopStringMatcher: hold back possible partial matches, never emit a stop string."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve.engine.stop import StopStringMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    """Feeds every chunk; returns (all emitted text, stopped?) — flushing when no stop hit."""
    m = StopStringMatcher(stops)
    out = []
    for chunk in chunks:
        text, stopped = m.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Character-by-character semantics: stop at the first position where any stop ends."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - len(max(hits, key=len))], True
    return text, False


def test_no_stops_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("hello") == ("hello", False)
    assert m.flush() == ""


def test_no_stop_hit_flush_returns_held_text():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)  # "ST" may start "STOP": held
    assert m.feed("O") == ("", False)
    assert m.flush() == "STO"


def test_stop_split_across_many_chunks():
    m = StopStringMatcher(["<|end|>"])
    emitted = []
    for ch in ["Hi", " there", "<", "|", "e", "n", "d", "|", ">", " never"]:
        text, stopped = m.feed(ch)
        emitted.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "Hi there"
    assert m.matched == "<|end|>"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_held_text_released_when_match_breaks():
    m = StopStringMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("d") == ("abd", False)


def test_stop_at_the_very_start():
    assert run(["Hello"], ["Hello world"]) == ("", True)
    assert run(["Hello"], ["H", "e", "llo", " world"]) == ("", True)


def test_text_before_stop_in_same_chunk():
    assert run(["\n\n"], ["one\n\ntwo"]) == ("one", True)


def test_overlapping_stops_first_to_complete_wins():
    # "bc" completes before "abcd" could: the stream stops at "bc".
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", True)
    # Both complete at the same character: the longer one (earlier start) is cut.
    assert run(["cd", "bcd"], ["abcde"]) == ("a", True)


def test_self_overlapping_stop():
    assert run(["aab"], ["a", "a", "a", "b"]) == ("a", True)
    assert run(["aab"], ["aaa", "c"]) == ("aaac", False)


def test_empty_stop_strings_are_ignored():
    assert run(["", "x"], ["abc"]) == ("abc", False)


def test_unicode_stop():
    assert run(["。"], ["日本", "語。", "次"]) == ("日本語", True)


@settings(max_examples=200, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    text=st.text(alphabet="abcd", max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=20), max_size=6),
)
def test_chunking_does_not_change_the_result(stops, text, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(stops, chunks) == reference(stops, text)
