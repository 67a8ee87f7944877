"""The per-sequence pipeline both backends share: EOS ids, finish decisions, linear detokenisation."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.backends.sequence import Sequence, eos_ids
from rudder.server.detokenize import IncrementalDetokenizer
from tests.server.engines import collect, tokens
from tests.tiny import make_model

TEXT = "Héllo wörld 😀 café, naïve résumé — 東京 and ünïcödé!\n\n  spaced  out\t"


def with_generation_eos(model_dir, extra: int) -> None:
    """Make `extra` an EOS in generation_config.json only (config.json and the tokenizer keep theirs)."""
    path = model_dir / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    eos = cfg.get("eos_token_id")
    cfg["eos_token_id"] = [*([eos] if isinstance(eos, int) else eos or []), extra]
    path.write_text(json.dumps(cfg))


def test_eos_ids_are_generation_config_and_tokenizer(tmp_path):
    model = make_model(tmp_path / "m", layers=1)
    tok = AutoTokenizer.from_pretrained(model)
    assert eos_ids(tok, model) == {tok.eos_token_id}
    with_generation_eos(model, 17)
    assert eos_ids(tok, model) == {tok.eos_token_id, 17}


def test_detokenizer_matches_a_whole_decode_token_by_token(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(TEXT * 20).input_ids
    d = IncrementalDetokenizer.for_tokenizer(tok)
    streamed = "".join(d.add(i) for i in ids) + d.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True)


def test_detokenizer_stops_at_a_stop_string_across_real_tokens(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(TEXT * 3).input_ids
    d = IncrementalDetokenizer.for_tokenizer(tok, stop=("résumé —",))
    out = ""
    for i in ids:
        out += d.add(i)
        if d.stopped:
            break
    assert d.stopped and out == TEXT[:TEXT.index("résumé —")]


def test_detokenizer_is_handed_one_token_per_step():
    """The cost per token does not grow with the sequence: the decoder sees each id once and
    the held-back text never exceeds the longest stop string."""
    seen = []

    def step(token_id):
        seen.append(token_id)
        return chr(token_id)

    d = IncrementalDetokenizer(step, stop=("xyz", "ab"))
    for i in range(2000):
        d.add(ord("a") + i % 3 * 2)  # a, c, e: "ab" never completes, "a" is held then released
        assert len(d._held) < 3
    assert seen == [ord("a") + i % 3 * 2 for i in range(2000)]


@pytest.mark.parametrize("engine_finish, want", [(None, None), ("length", "length"), ("eos", "eos")])
def test_the_engines_own_finish_reason_ends_a_sequence(tiny_dir, engine_finish, want):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    seq = Sequence(EngineRequest([1, 2, 3], Sampling(max_tokens=10, ignore_eos=True)), tok, frozenset())
    first = seq.token(40, -0.5, [])
    assert (first.position, first.finish) == (3, None)
    last = seq.token(41, -0.5, [], engine_finish=engine_finish)
    assert (last.position, last.finish) == (4, want)
    if want:
        with pytest.raises(RuntimeError, match="after the sequence finished"):
            seq.token(42, -0.5, [])


def test_reference_backend_stops_at_an_eos_only_in_generation_config(tmp_path):
    model = make_model(tmp_path / "m")
    engine = ReferenceEngine(model)
    request = EngineRequest(engine.tokenize("The quick brown fox"), Sampling(max_tokens=8))
    (plain,) = asyncio.run(collect(engine, [request]))
    first = tokens(plain)[0]
    assert first not in engine.eos_ids and len(plain) == 8 and plain[-1].finish == "length"

    with_generation_eos(model, first)
    (ended,) = asyncio.run(collect(ReferenceEngine(model), [request]))
    assert tokens(ended) == [first] and ended[-1].finish == "eos" and ended[-1].text == ""


class _NoBackend:
    """A tokenizer without a Rust backend (a "slow" tokenizer): only `decode`."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizer_without_decode_stream_decodes_by_window_to_the_same_text(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(TEXT * 5).input_ids
    d = IncrementalDetokenizer.for_tokenizer(_NoBackend(tok))
    assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids, skip_special_tokens=True)


def test_without_generation_config_the_eos_ids_come_from_config_json(tmp_path):
    model = make_model(tmp_path / "m", layers=1)
    (model / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], 17]
    (model / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(model)
    assert eos_ids(tok, model) == {tok.eos_token_id, 17}


def test_the_per_row_rules_a_guard_in_the_prompt_an_overflow_and_a_trace(tiny_dir):
    from rudder.core.errors import InvalidArgument
    from rudder.core.steering import ReadoutSpec, SteeringSpec
    from rudder.server.backends.base import GuardHit

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    reads = SteeringSpec(readouts=ReadoutSpec(saes=("s",), include_prompt=True))
    seq = Sequence(EngineRequest([5, 6, 7, 8], steering=reads), tok, frozenset())
    assert [e.position for e in seq.prompt_row(0, [])] == [0] and not seq.prompt_done
    events = seq.prompt_row(1, [], GuardHit(0, 1, 9.0))  # a guard before the last prompt row ends it there
    assert [e.finish for e in events] == [None, "guard"] and events[1].token_id == -1 and seq.prompt_done

    seq = Sequence(EngineRequest([5, 6, 7, 8], steering=reads), tok, frozenset())
    for t in range(3):
        seq.prompt_row(t, [])
    assert len(seq.prompt_row(3, [], GuardHit(0, 3, 9.0))) == 1  # the last row's guard is the first token's
    assert seq.row_position == 3 and seq.ends_at_row([], GuardHit(0, 3, 9.0)).finish == "guard"

    trace = Sequence(EngineRequest([5, 6, 7], trace=True), tok, frozenset())
    assert len(trace.prompt_row(0, [], GuardHit(0, 0, 9.0))) == 1 and trace.prompt_done  # a trace only reads
    with pytest.raises(InvalidArgument, match="position 2"):
        Sequence(EngineRequest([5, 6, 7]), tok, frozenset()).prompt_row(2, [], broken=True)
    plain = Sequence(EngineRequest([5, 6, 7]), tok, frozenset())
    assert plain.ends_at_row([]) is None and plain.token(9, -0.5, []).position == 3
    with pytest.raises(InvalidArgument, match="position 3"):
        plain.ends_at_row([], broken=True)
