"""The OpenAI-compatible door, through the official `openai` package, beside the gRPC door."""

import json
import urllib.request

import openai
import pytest

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine

TOKEN = "door-secret"
CLAMP = {"interventions": [{"feature": {"sae": "s", "feature": 3, "clamp": 30.0}}],
         "readouts": {"saes": ["s"], "top_k": 2}}


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_sae_dir):
    engine = ReferenceEngine(tiny_dir, saes=[f"s={tiny_sae_dir}"])
    with BackgroundServer(engine, "tiny", token=TOKEN, openai_port=0, metrics_port=0) as srv:
        yield srv


@pytest.fixture
def door(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.openai.port}/v1", api_key=TOKEN, max_retries=0)


def grpc_tokens(server, **kw):
    with rc.Client(server.address, timeout=60, token=TOKEN) as c:
        return [t for t in c.generate(**kw)]


def test_a_streamed_chat_completion_with_a_clamp_matches_the_grpc_call(server, door):
    messages = [{"role": "user", "content": "The capital of France"}]
    stream = door.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True, "rudder": CLAMP})
    chunks = list(stream)
    steered = [c for c in chunks if c.choices and "rudder" in c.choices[0].model_extra]  # one per token
    assert not any(c.choices[0].model_extra["rudder"]["token"].get("is_prompt") for c in steered)
    want = grpc_tokens(server, chat=messages, max_tokens=6, temperature=0, ignore_eos=True,
                       interventions=[rc.clamp("s", 3, 30.0)], readouts=rc.readouts(saes=["s"], top_k=2))
    assert "".join(c.choices[0].delta.content or "" for c in steered) == "".join(t.text for t in want)
    got_ids = [c.choices[0].model_extra["rudder"]["token"]["id"] for c in steered]
    assert got_ids == [t.id for t in want]
    for c, t in zip(steered, want):  # the readouts, per chunk, as the gRPC stream has them
        top = c.choices[0].model_extra["rudder"]["readouts"][0]["top"]
        assert top["ids"] == [i for i, _ in t.readout("s").top]
        assert top["values"] == pytest.approx([v for _, v in t.readout("s").top])
        assert top["ids"][0] == 3 and top["values"][0] == pytest.approx(30.0)
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    unsteered = grpc_tokens(server, chat=messages, max_tokens=6, temperature=0, ignore_eos=True)
    assert [t.id for t in unsteered] != got_ids  # the clamp did something


def test_a_completion_with_its_baseline_as_a_second_choice(server, door):
    out = door.completions.create(model="tiny", prompt="Steering a model", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True, "rudder": {**CLAMP, "include_baseline": True}})
    assert [c.index for c in out.choices] == [0, 1]
    want = grpc_tokens(server, prompt="Steering a model", max_tokens=5, temperature=0, ignore_eos=True,
                       interventions=[rc.clamp("s", 3, 30.0)], include_baseline=True)
    assert out.choices[0].text == "".join(t.text for t in want if not t.baseline)
    assert out.choices[1].text == "".join(t.text for t in want if t.baseline)
    assert out.choices[1].model_extra["rudder"]["baseline"] is True
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_bad_bodies_get_a_400_naming_the_field(door):
    with pytest.raises(openai.BadRequestError) as e:
        door.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                     extra_body={"rudder": {"interventions": [{"feature": {"sae": "s", "clampp": 1}}]}})
    assert "clampp" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:  # the service's own validation: NOT_FOUND, as over gRPC
        door.completions.create(model="tiny", prompt="hi", max_tokens=2,
                                extra_body={"rudder": {"interventions": [{"feature": {"sae": "nope", "feature": 1,
                                                                                      "clamp": 1}}]}})
    assert "nope" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        door.completions.create(model="tiny", prompt="hi", max_tokens=2, n=2)
    assert "n:" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        door.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("field, value", [("logit_bias", {"abc": "def"}), ("logprobs", 3), ("top_logprobs", 3),
                                          ("presence_penalty", 5), ("frequency_penalty", "high"),
                                          ("response_format", {"type": "json_object"}),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("store", True), ("audio", {"voice": "alloy"}), ("min_tokens", 4)])
def test_fields_the_door_cannot_honour_are_refused_by_name_not_ignored(door, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        door.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                     extra_body={field: value})
    assert str(e.value).split(" - ", 1)[1].startswith(f"{field}") or f"sampling.{field}" in str(e.value)


def test_fields_that_ask_for_nothing_pass_and_a_message_needs_content_and_stops_are_bounded(door):
    out = door.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=False, presence_penalty=0.0, frequency_penalty=0, logit_bias={},
                                       response_format={"type": "text"}, user="someone", store=False)
    assert out.usage.completion_tokens == 2 and out.choices[0].logprobs is None
    nulls = door.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         extra_body={"n": None, "max_completion_tokens": None, "ignore_eos": True})
    assert nulls.usage.completion_tokens == 3  # null is "not given", as OpenAI reads it
    with pytest.raises(openai.BadRequestError) as e:
        door.chat.completions.create(model="tiny", messages=[{"role": "user"}], max_tokens=2)
    assert "messages[0]" in str(e.value)
    with pytest.raises(openai.APIStatusError) as e:  # the service's limit, as over gRPC (RESOURCE_EXHAUSTED)
        door.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"stop": ["x"] * 1000})
    assert "sampling.stop has 1000 strings" in str(e.value)


MESSAGES = [{"role": "user", "content": "Tell me about steering"}]


def chat_ids(door, **kw) -> list[int]:
    out = door.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True, "rudder": {"readouts": {"saes": ["s"]}}},
                                       **kw)
    return [t["token"]["id"] for t in out.choices[0].model_extra["rudder"]["tokens"]]


def test_penalties_logit_bias_and_min_p_act_at_the_door_as_over_grpc(server, door):
    plain = chat_ids(door)
    for name, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 2.0)):
        kw = {name: value} if name != "repetition_penalty" else {"extra_body": {"repetition_penalty": value,
                                                                               "ignore_eos": True}}
        if name == "repetition_penalty":
            out = door.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, **kw)
            got = [t["token"]["id"] for t in out.choices[0].model_extra["rudder"]["tokens"]]
        else:
            got = chat_ids(door, **kw)
        assert got != plain, f"{name} changed nothing"
        want = grpc_tokens(server, chat=MESSAGES, max_tokens=10, temperature=0, ignore_eos=True, **{name: value})
        assert got == [t.id for t in want], name
    assert set(chat_ids(door, logit_bias={"7": 100})) == {7}  # a +100 bias forces its token
    sampled = door.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5,
                                           extra_body={"min_p": 1.0, "ignore_eos": True})
    assert [t["token"]["id"] for t in sampled.choices[0].model_extra["rudder"]["tokens"]] == plain  # only the top


def test_logprobs_come_back_in_openai_shape_and_match_the_grpc_stream(server, door):
    out = door.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    want = grpc_tokens(server, chat=MESSAGES, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    content = out.choices[0].logprobs.content
    text_of = server.server.engine.token_text  # a token is named by its own text, as its alternatives are
    assert [c.token for c in content] == [text_of(t.id) for t in want]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want], abs=1e-6)
    for c, t in zip(content, want):
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([lp for _, _, lp in t.top_logprobs], abs=1e-6)
        assert [a.token for a in c.top_logprobs] == [text for _, text, _ in t.top_logprobs]
        assert c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob and len(c.top_logprobs) == 3
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)  # greedy: the likeliest
    stream = door.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    streamed = [c.choices[0].logprobs.content[0] for c in stream if c.choices and c.choices[0].logprobs]
    assert [c.logprob for c in streamed] == pytest.approx([t.logprob for t in want], abs=1e-6)
    completion = door.completions.create(model="tiny", prompt="Steering", max_tokens=4, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    ids = [t["token"]["id"] for t in completion.choices[0].model_extra["rudder"]["tokens"]]
    assert lp.tokens == [text_of(i) for i in ids] and lp.text_offset[0] == 0


def test_no_token_gets_a_401_and_the_model_is_listed(server, door):
    bare = openai.OpenAI(base_url=str(door.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bare.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert [m.id for m in door.models.list()] == ["tiny"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    assert 'rudder:requests_total{code="UNAUTHENTICATED",method="Completions"}' in metrics
    assert 'method="ChatCompletions"' in metrics


def test_a_stream_refused_before_its_first_token_gets_a_status_not_a_stream(server, door):
    """Validation runs before the response starts, so a streamed request it refuses gets the HTTP
    status and OpenAI's error object, as a plain one does."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True,
            "rudder": {"interventions": [{"feature": {"sae": "s", "feature": 99999, "clamp": 1}}]}}
    req = urllib.request.Request(f"{door.base_url}completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:  # refused before the first token: a status, not a stream
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "99999" in json.loads(e.value.read())["error"]["message"]


def test_a_guard_in_the_body_ends_the_choice_as_a_content_filter(server, door):
    prompt = "The capital of France"
    with rc.Client(server.address, timeout=60, token=TOKEN) as c:
        at = len(c.trace(prompt)) + 1  # the second generated position
    opens = {"feature": {"sae": "s", "feature": 3, "clamp": 30.0}, "scope": {"kind": "RANGE", "start": at,
                                                                            "end": at + 1}}
    out = door.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "rudder": {
                                      "interventions": [opens], "guards": [{"sae": "s", "feature": 3, "above": 20}]}})
    choice = out.choices[0]
    assert choice.finish_reason == "content_filter" and out.usage.completion_tokens == 2
    guard = choice.model_extra["rudder"]["tokens"][-1]["guard"]
    assert guard["position"] == at and guard["value"] == pytest.approx(30.0)


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_aborts_its_generation(server, stream):
    """A collected completion, or a stream still waiting for its first chunk's read, whose client
    closes the connection is aborted: the engine drops it (it would run to max_tokens). The engine is
    paused while the client goes away, so the request is in the engine, unfinished, at any speed."""
    import socket

    from tests.server.engines import running_after_settling, wait_for

    engine = server.server.engine
    cancelled = 'rudder:requests_total{code="CANCELLED",method="Completions"}'
    before, tokens_before = _metric(server, cancelled), _metric(server, "rudder:generation_tokens_total")
    body = json.dumps({"model": "tiny", "prompt": "The capital of France", "max_tokens": 240, "ignore_eos": True,
                       "stream": stream, "rudder": CLAMP}).encode()
    port = server.server.openai.port
    server.call(engine.pause())
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            wait_for(lambda: engine.running_requests() == 1, "the request in the engine")
        wait_for(lambda: _metric(server, cancelled) == before + 1, "the door to count the request CANCELLED")
    finally:  # the engine drops the cancelled request at its next step
        server.call(engine.resume())
    assert running_after_settling(engine) == 0
    generated = _metric(server, "rudder:generation_tokens_total") - tokens_before
    print(f"\n{stream=}: {generated:.0f} of 240 tokens generated before the abort")
    assert generated < 240


def test_each_chunks_rudder_object_is_protobufs_own_json_mapping():
    """The door writes every token's `{token, readouts, guard}` by hand, for speed; it must stay
    protobuf's JSON mapping of those messages. Every field of them is generated here (a field added
    to the .proto fails the field-set assertions until the door writes it too)."""
    from google.protobuf import json_format
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rudder.server.openai_door import token_json
    from rudder.v1 import steering_pb2 as pb

    def names(message) -> set[str]:
        return {f.name for f in message.DESCRIPTOR.fields}

    assert names(pb.Token) == {"id", "text", "logprob", "position", "is_prompt", "top_logprobs"}
    assert names(pb.TokenLogprob) == {"id", "text", "logprob"}
    assert names(pb.Readout) == {"source", "top", "selected", "codes"}
    assert names(pb.FeatureValues) == {"ids", "values"} and names(pb.CodeGroup) == {"head", "codes"}
    i32 = st.integers(-2**31, 2**31 - 1)
    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    normal = st.floats(min_value=-1e4, max_value=1e4, width=32)  # the usual case: numpy's path
    values = st.builds(lambda i, v: pb.FeatureValues(ids=i, values=v), st.lists(i32, max_size=6),
                       st.lists(st.one_of(normal, normal, f32), max_size=17))
    groups = st.lists(st.builds(lambda h, c: pb.CodeGroup(head=h, codes=c), st.integers(0, 7),
                                st.lists(i32, max_size=4)), max_size=3)
    readout = st.builds(lambda s, t, sel, c, has: pb.Readout(
        source=s, codes=c, **({"top": t} if has[0] else {}), **({"selected": sel} if has[1] else {})),
        st.text(max_size=5), values, values, groups, st.tuples(st.booleans(), st.booleans()))
    alternative = st.builds(pb.TokenLogprob, id=i32, text=st.text(max_size=3), logprob=st.one_of(normal, f32))
    token = st.builds(pb.Token, id=i32, text=st.text(max_size=4), logprob=st.one_of(normal, f32), position=i32,
                      is_prompt=st.booleans(), top_logprobs=st.lists(alternative, max_size=3))
    guard = st.one_of(st.none(), st.builds(pb.GuardHit, index=st.integers(0, 3), position=i32, value=f32))
    messages = st.builds(lambda t, rs, g: pb.GenerateResponse(token=t, readouts=rs, **({"guard": g} if g else {})),
                         token, st.lists(readout, max_size=3), guard)

    @settings(max_examples=400, deadline=None)
    @given(messages)
    def same(msg):
        def as_json(m):
            return json_format.MessageToDict(m, preserving_proto_field_name=True)

        expected = {"token": as_json(msg.token)}
        if msg.readouts:
            expected["readouts"] = [as_json(r) for r in msg.readouts]
        if msg.HasField("guard"):
            expected["guard"] = as_json(msg.guard)
        assert json.dumps(token_json(msg), sort_keys=True) == json.dumps(expected, sort_keys=True)

    same()
