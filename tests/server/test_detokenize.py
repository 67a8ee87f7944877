"""Stop strings: never streamed, even when split across tokens; held-back text is flushed at the end."""

from rudder.server.detokenize import IncrementalDetokenizer


def feed(detok, text):
    return [detok.add(ord(c)) for c in text]


def test_a_stop_string_split_across_tokens_is_never_streamed():
    d = IncrementalDetokenizer(chr, stop=("END",))
    out = feed(d, "okEN")
    assert "".join(out) == "ok" and not d.stopped
    assert d.add(ord("D")) == "" and d.stopped
    assert d.flush() == ""


def test_a_held_back_prefix_is_released_when_it_stops_matching_or_at_the_end():
    d = IncrementalDetokenizer(chr, stop=("END",))
    assert "".join(feed(d, "aEx")) == "aEx"
    d2 = IncrementalDetokenizer(chr, stop=("END",))
    assert "".join(feed(d2, "bE")) == "b"
    assert d2.flush() == "E"


def test_without_stop_strings_text_streams_as_decoded():
    d = IncrementalDetokenizer(chr)
    assert feed(d, "hi") == ["h", "i"] and d.flush() == ""
