"""The offline corpus: named sources, WordNet parsing, round-robin packing, actionable errors."""

from __future__ import annotations

import pytest

from rudder.core.errors import InvalidArgument
from rudder.training import corpus
from tests.tiny import make_tokenizer

CAT = ("02121620 05 n 02 cat 0 true_cat 0 003 @ 02120997 n 0000 ~ 02121808 n 0000 ~ 02124623 n 0000 | "
       "feline mammal usually having thick soft fur and no ability to roar: domestic cats; wildcats  ")


def test_a_wordnet_synset_reads_as_its_lemmas_and_gloss():
    assert corpus.wordnet_synset(CAT) == ("cat, true cat: feline mammal usually having thick soft fur and no "
                                          "ability to roar: domestic cats; wildcats")
    adj = "00001740 00 a 01 able(p) 0 005 | (usually followed by `to') having the necessary means"
    assert corpus.wordnet_synset(adj) == "able: (usually followed by `to') having the necessary means"
    assert corpus.wordnet_synset("  1 This software and database is being provided") is None


def test_unknown_or_missing_sources_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(InvalidArgument, match=r"not a built-in \(stdlib, wordnet, fortunes\) nor an existing file"):
        corpus.check_sources(["novels"])
    monkeypatch.setitem(corpus.SOURCES, "wordnet", corpus.Source(corpus.wordnet, (tmp_path / "data.noun",),
                                                                 ("wordnet-base",)))
    with pytest.raises(InvalidArgument, match="apt-get install wordnet-base"):
        corpus.check_sources(["stdlib", "wordnet"])


def test_sources_interleave_so_a_cap_takes_from_each(monkeypatch):
    monkeypatch.setitem(corpus.SOURCES, "a",
                        corpus.Source(lambda: ["The quick brown fox jumps over the lazy dog."] * 40))
    monkeypatch.setitem(corpus.SOURCES, "b", corpus.Source(lambda: ["What is the capital of France?"] * 40))
    tok = make_tokenizer()
    only_a = corpus.token_windows(tok, 8, sources=["a"])
    only_b = corpus.token_windows(tok, 8, sources=["b"])
    both = corpus.token_windows(tok, 8, max_tokens=8 * 6, sources=["a", "b"])
    assert both == [only_a[0], only_b[0], only_a[1], only_b[1], only_a[2], only_b[2]]
    # one source alone is packed exactly as before: its windows in document order
    assert corpus.token_windows(tok, 8, max_tokens=8 * 3, sources=["a"]) == only_a[:3]
