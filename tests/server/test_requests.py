"""The request parser at the edge: each bad field gives the right domain error naming it; good input parses."""

import math

import pytest
import torch

from rudder.core.artifacts import Artifacts, AttachedCodebook
from rudder.core.codebook import Codebook, CodebookConfig
from rudder.core.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from rudder.core.hf_sites import ModelShape
from rudder.core.sites import Site
from rudder.core.steering import CodeEdit, FeatureEdit, Op, ReadoutSpec, Scope
from rudder.server.backends.base import Sampling
from rudder.server.requests import DEFAULT_MAX_TOKENS, Limits, RequestParser, parse_scope
from rudder.v1 import steering_pb2 as pb
from tests.tiny import make_sae

SAE_SITE = "blocks.1.hook_resid_post"
CB_SITE = "blocks.0.attn.hook_z"
# 4 heads of 8: attn.hook_z is 32 wide, the residual stream 64, so widths can mismatch
SHAPE = ModelShape(architecture="llama", num_layers=3, d_model=64, num_heads=4, d_head=8, vocab_size=320)
LIMITS = Limits(max_tokens=100, max_prompt_tokens=8, max_interventions=3, max_readout_top_k=5, max_feature_ids=2)


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    artifacts = Artifacts()
    path = tmp_path_factory.mktemp("saes") / "resid1"
    make_sae(path, SAE_SITE)  # d_in 64, d_sae 256
    artifacts.add_sae(f"s={path}", SHAPE, torch.device("cpu"))
    cb = Codebook(CodebookConfig("cb", CB_SITE, num_codes=16, k=2, d_code=8, num_heads=4)).requires_grad_(False)
    artifacts.codebooks["cb"] = AttachedCodebook("cb", Site.parse(CB_SITE), cb)
    return RequestParser(SHAPE, artifacts, LIMITS)


def fails(cls, *fragments):
    """Context manager: raises exactly `cls`, its message containing every fragment."""
    class Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, err, tb):
            assert kind is cls, f"expected {cls.__name__}, got {kind.__name__ if kind else 'no error'}: {err}"
            for f in fragments:
                assert f in str(err), f"{f!r} not in {str(err)!r}"
            return True

    return Check()


def feature(sae="s", feature=3, scope=None, **op):
    return pb.Intervention(scope=scope, feature=pb.FeatureIntervention(sae=sae, feature=feature, **op))


def direction(site="", alpha=1.0, scope=None, **kw):
    return pb.Intervention(scope=scope, direction=pb.DirectionIntervention(site=site, alpha=alpha, **kw))


def code(codebook="cb", head=0, code=1, scope=None, **kw):
    return pb.Intervention(scope=scope, code=pb.CodeIntervention(codebook=codebook, head=head, code=code, **kw))


def steer(parser, *interventions, readouts=None):
    return parser.steering(list(interventions), readouts or pb.ReadoutRequest())


# ---------------------------------------------------------------- scopes


@pytest.mark.parametrize("msg,expected", [
    (pb.Scope(), Scope("all")),
    (pb.Scope(kind=pb.Scope.ALL), Scope("all")),
    (pb.Scope(kind=pb.Scope.PROMPT), Scope("prompt")),
    (pb.Scope(kind=pb.Scope.GENERATED), Scope("generated")),
    (pb.Scope(kind=pb.Scope.RANGE, start=2, end=5), Scope("range", 2, 5)),
    (pb.Scope(kind=pb.Scope.RANGE, start=3), Scope("range", 3, None)),  # end 0: open
])
def test_scopes_parse(msg, expected):
    assert parse_scope(msg, "here") == expected


@pytest.mark.parametrize("msg,fragment", [
    (pb.Scope(kind=99), "unknown scope kind 99"),
    (pb.Scope(kind=pb.Scope.PROMPT, start=1), "start/end are only for a RANGE scope"),
    (pb.Scope(kind=pb.Scope.ALL, end=4), "start/end are only for a RANGE scope"),
    (pb.Scope(kind=pb.Scope.RANGE, start=5, end=2), "start=5 end=2"),
    (pb.Scope(kind=pb.Scope.RANGE, start=4, end=4), "start=4 end=4"),
    (pb.Scope(kind=pb.Scope.RANGE, start=-1, end=3), "start=-1"),
    (pb.Scope(kind=pb.Scope.RANGE, start=0, end=-2), "end=-2"),
])
def test_bad_scopes_are_invalid_and_say_where(msg, fragment):
    with fails(InvalidArgument, "interventions[0]", fragment):
        parse_scope(msg, "interventions[0]")


def test_scope_reaches_the_edit(parser):
    spec = steer(parser, feature(clamp=1.0, scope=pb.Scope(kind=pb.Scope.RANGE, start=1, end=3)))
    assert spec.features[0].scope == Scope("range", 1, 3)
    with fails(InvalidArgument, "interventions[1]", "RANGE"):
        steer(parser, feature(clamp=1.0), feature(clamp=1.0, scope=pb.Scope(kind=pb.Scope.RANGE, start=3, end=1)))


# ---------------------------------------------------------------- feature edits


@pytest.mark.parametrize("op,expected", [
    (dict(clamp=12.5), (Op.CLAMP, 12.5)), (dict(add=-2.0), (Op.ADD, -2.0)),
    (dict(scale=0.5), (Op.SCALE, 0.5)), (dict(ablate=True), (Op.ABLATE, 0.0)),
])
def test_feature_edits_parse(parser, op, expected):
    spec = steer(parser, feature(feature=7, **op))
    assert spec.features == (FeatureEdit("s", 7, expected[0], expected[1], Scope("all")),)
    assert spec.directions == () and spec.codes == () and spec.readouts == ReadoutSpec()


@pytest.mark.parametrize("iv,cls,fragments", [
    (feature(sae="", clamp=1.0), InvalidArgument, ("interventions[0]", "no SAE named", "loaded SAEs: s")),
    (feature(sae="nope", clamp=1.0), NotFound, ("interventions[0]", "unknown SAE 'nope'", "loaded SAEs: s")),
    (feature(feature=256, clamp=1.0), InvalidArgument, ("interventions[0]", "feature 256 is out of range", "0..255")),
    (feature(feature=-1, clamp=1.0), InvalidArgument, ("feature -1 is out of range",)),
    (feature(), InvalidArgument, ("interventions[0]", "clamp, add, scale or ablate")),
    (feature(clamp=math.nan), InvalidArgument, ("interventions[0]: clamp must be a finite number",)),
    (feature(add=math.inf), InvalidArgument, ("interventions[0]: add must be a finite number",)),
    (feature(scale=-math.inf), InvalidArgument, ("interventions[0]: scale must be a finite number",)),
    (pb.Intervention(), InvalidArgument, ("interventions[0]", "empty intervention")),
    (feature(clamp=3e38), InvalidArgument, ("interventions[0]: clamp=3e+38", "bound of 10000")),
    (feature(scale=-2e4), InvalidArgument, ("interventions[0]: scale=-20000", "bound of 10000")),
])
def test_bad_feature_edits(parser, iv, cls, fragments):
    with fails(cls, *fragments):
        steer(parser, iv)


def test_errors_name_the_intervention_at_fault(parser):
    with fails(NotFound, "interventions[2]", "'gone'"):
        steer(parser, feature(clamp=1.0), code(), feature(sae="gone", clamp=1.0))


def test_too_many_interventions_is_resource_exhausted(parser):
    assert len(steer(parser, *[feature(clamp=1.0)] * 3).features) == 3
    with fails(ResourceExhausted, "4 interventions", "limit of 3"):
        steer(parser, *[feature(clamp=1.0)] * 4)


# ---------------------------------------------------------------- directions


def test_vector_direction_parses(parser):
    values = [float(i) / 10 for i in range(64)]
    spec = steer(parser, direction(site="blocks.2.hook_resid_pre", alpha=-3.0, vector=pb.Vector(values=values),
                                   scope=pb.Scope(kind=pb.Scope.GENERATED)))
    (d,) = spec.directions
    assert (d.site, d.alpha, d.scope) == ("blocks.2.hook_resid_pre", -3.0, Scope("generated"))
    torch.testing.assert_close(torch.as_tensor(d.vector, dtype=torch.float32), torch.tensor(values))


def test_sae_feature_direction_is_accepted_at_the_saes_site_or_one_as_wide(parser):
    (d,) = steer(parser, direction(alpha=2.0, sae_feature=pb.SaeFeature(sae="s", feature=9))).directions
    assert d.site == SAE_SITE and d.alpha == 2.0
    (d,) = steer(parser, direction(site="blocks.0.hook_mlp_out",
                                   sae_feature=pb.SaeFeature(sae="s", feature=9))).directions
    assert d.site == "blocks.0.hook_mlp_out"


def test_a_transcoder_feature_direction_goes_where_the_transcoder_writes(parser, tmp_path):
    """Its decoder row is a direction at the MLP's output, not at the input the transcoder reads."""
    from tests.tiny import make_transcoder

    make_transcoder(tmp_path / "t", layer=1)
    artifacts = Artifacts()
    artifacts.add_sae(f"t={tmp_path / 't'}", SHAPE, torch.device("cpu"))
    (d,) = steer(RequestParser(SHAPE, artifacts, LIMITS),
                 direction(alpha=2.0, sae_feature=pb.SaeFeature(sae="t", feature=9))).directions
    assert d.site == "blocks.1.hook_mlp_out"


V64 = pb.Vector(values=[0.0] * 64)


@pytest.mark.parametrize("iv,cls,fragments", [
    (direction(site=SAE_SITE), InvalidArgument, ("interventions[0]", "sae_feature, vector or steering_vector")),
    (direction(vector=V64), InvalidArgument, ("interventions[0]", "needs a site")),
    (direction(site="blocks.1.resid", vector=V64), InvalidArgument, ("unknown site 'blocks.1.resid'",)),
    (direction(site="blocks.3.hook_resid_post", vector=V64), InvalidArgument, ("layers 0..2",)),
    (direction(site=SAE_SITE, vector=pb.Vector(values=[1.0] * 3)), InvalidArgument,
     ("interventions[0]", "3 values", f"{SAE_SITE} is 64 wide")),
    (direction(site=CB_SITE, vector=V64), InvalidArgument, ("64 values", f"{CB_SITE} is 32 wide")),
    (direction(site=SAE_SITE, vector=pb.Vector(values=[0.0] * 63 + [math.nan])), InvalidArgument,
     ("interventions[0]", "non-finite")),
    (direction(site=SAE_SITE, alpha=math.inf, vector=V64), InvalidArgument, ("interventions[0]: alpha", "finite")),
    (direction(sae_feature=pb.SaeFeature(sae="nope", feature=1)), NotFound, ("interventions[0]", "unknown SAE 'nope'")),
    (direction(sae_feature=pb.SaeFeature(sae="", feature=1)), InvalidArgument, ("no SAE named",)),
    (direction(sae_feature=pb.SaeFeature(sae="s", feature=256)), InvalidArgument, ("feature 256 is out of range",)),
    (direction(site=CB_SITE, sae_feature=pb.SaeFeature(sae="s", feature=1)), InvalidArgument,
     (f"{CB_SITE} is 32 wide",)),
    (direction(site="blocks.9.hook_resid_post", sae_feature=pb.SaeFeature(sae="s", feature=1)), InvalidArgument,
     ("layers 0..2",)),
    (direction(alpha=math.nan, sae_feature=pb.SaeFeature(sae="s", feature=1)), InvalidArgument, ("alpha",)),
    (direction(alpha=1e30, sae_feature=pb.SaeFeature(sae="s", feature=1)), InvalidArgument,
     ("alpha=1e+30", "bound of 10000")),
    (direction(site=SAE_SITE, alpha=2.0, vector=pb.Vector(values=[1e3] * 64)), InvalidArgument,
     ("norm (8000) times |alpha|", "bound of 10000")),
])
def test_bad_directions(parser, iv, cls, fragments):
    with fails(cls, *fragments):
        steer(parser, iv)


# ---------------------------------------------------------------- codes


def test_code_edits_parse(parser):
    spec = steer(parser, code(head=3, code=15), code(head=3, code=2, strength=2.5))
    assert spec.codes == (CodeEdit("cb", 3, 15, 1.0, Scope("all")), CodeEdit("cb", 3, 2, 2.5, Scope("all")))


@pytest.mark.parametrize("ivs,cls,fragments", [
    ([code(codebook="nope")], NotFound, ("interventions[0]", "unknown codebook 'nope'", "loaded: cb")),
    ([code(head=4)], InvalidArgument, ("interventions[0]", "head 4 is out of range", "0..3")),
    ([code(head=-1)], InvalidArgument, ("head -1 is out of range",)),
    ([code(code=16)], InvalidArgument, ("interventions[0]", "code 16 is out of range", "0..15")),
    ([code(strength=math.nan)], InvalidArgument, ("interventions[0]: strength", "finite")),
    ([code(head=1, code=1), code(head=1, code=2), code(head=1, code=3)], InvalidArgument,
     ("codebook 'cb' head 1", "more forced codes than its k")),
])
def test_bad_code_edits(parser, ivs, cls, fragments):
    with fails(cls, *fragments):
        steer(parser, *ivs)


def test_k_forced_codes_per_head_are_fine(parser):
    assert len(steer(parser, code(head=1, code=1), code(head=1, code=2), code(head=2, code=3)).codes) == 3


# ---------------------------------------------------------------- readouts


def test_readouts_parse(parser):
    r = parser.readouts(pb.ReadoutRequest(saes=["s"], codebooks=["cb"], top_k=5, feature_ids=[0, 255],
                                          include_prompt=True))
    assert r == ReadoutSpec(("s",), ("cb",), 5, (0, 255), True)
    assert parser.readouts(pb.ReadoutRequest()) == ReadoutSpec()
    assert steer(parser, readouts=pb.ReadoutRequest(codebooks=["cb"])).readouts == ReadoutSpec(codebooks=("cb",))


@pytest.mark.parametrize("msg,cls,fragments", [
    (pb.ReadoutRequest(saes=["nope"]), NotFound, ("readouts", "unknown SAE 'nope'")),
    (pb.ReadoutRequest(codebooks=["nope"]), NotFound, ("readouts", "unknown codebook 'nope'", "loaded: cb")),
    (pb.ReadoutRequest(saes=["s"], top_k=-1), InvalidArgument, ("readouts.top_k must be >= 0",)),
    (pb.ReadoutRequest(saes=["s"], top_k=6), ResourceExhausted, ("readouts.top_k=6", "limit of 5")),
    (pb.ReadoutRequest(saes=["s"], feature_ids=[1, 2, 3]), ResourceExhausted, ("feature_ids", "limit of 2")),
    (pb.ReadoutRequest(top_k=2), InvalidArgument, ("readouts.saes",)),
    (pb.ReadoutRequest(feature_ids=[1]), InvalidArgument, ("readouts.saes",)),
    (pb.ReadoutRequest(saes=["s"], feature_ids=[256]), InvalidArgument, ("readouts.feature_ids", "feature 256")),
])
def test_bad_readouts(parser, msg, cls, fragments):
    with fails(cls, *fragments):
        parser.readouts(msg)
    with fails(cls, *fragments):  # the same checks when they come with a request's interventions
        steer(parser, feature(clamp=1.0), readouts=msg)


# ---------------------------------------------------------------- sampling


def test_sampling_defaults_and_values(parser):
    assert parser.sampling(pb.SamplingParams()) == Sampling(DEFAULT_MAX_TOKENS, 0.0, 1.0, 0, None, (), False)
    s = parser.sampling(pb.SamplingParams(max_tokens=100, temperature=0.75, top_p=0.5, top_k=40, seed=7,
                                          stop=["\n\n", "END"], ignore_eos=True))
    assert s == Sampling(100, 0.75, 0.5, 40, 7, ("\n\n", "END"), True)
    assert parser.sampling(pb.SamplingParams(temperature=1e-6)).temperature == 0.0  # near-zero: greedy
    assert parser.sampling(pb.SamplingParams(seed=0)).seed == 0  # a set 0 is a seed, not "none"
    s = parser.sampling(pb.SamplingParams(presence_penalty=-2, frequency_penalty=1.5, repetition_penalty=2.5,
                                          min_p=0.1, logit_bias={7: -100, 3: 4.5}, logprobs=20))
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.logprobs) == (
        -2, 1.5, 2.5, pytest.approx(0.1), 20)
    assert s.logit_bias == ((3, 4.5), (7, -100.0)) and s.penalized
    assert not parser.sampling(pb.SamplingParams()).penalized


@pytest.mark.parametrize("msg,cls,fragments", [
    (pb.SamplingParams(max_tokens=0), InvalidArgument, ("sampling.max_tokens must be at least 1",)),
    (pb.SamplingParams(max_tokens=-5), InvalidArgument, ("sampling.max_tokens", "-5")),
    (pb.SamplingParams(max_tokens=101), ResourceExhausted, ("sampling.max_tokens=101", "limit of 100")),
    (pb.SamplingParams(temperature=-0.5), InvalidArgument, ("sampling.temperature must be in [0, 2]",)),
    (pb.SamplingParams(temperature=2.5), InvalidArgument, ("sampling.temperature must be in [0, 2]",)),
    (pb.SamplingParams(temperature=math.nan), InvalidArgument, ("sampling.temperature", "finite")),
    (pb.SamplingParams(top_p=0.0), InvalidArgument, ("sampling.top_p must be in (0, 1]",)),
    (pb.SamplingParams(top_p=1.5), InvalidArgument, ("sampling.top_p",)),
    (pb.SamplingParams(top_p=math.inf), InvalidArgument, ("sampling.top_p", "finite")),
    (pb.SamplingParams(top_k=-1), InvalidArgument, ("sampling.top_k must be >= 0",)),
    (pb.SamplingParams(presence_penalty=2.5), InvalidArgument, ("sampling.presence_penalty must be in [-2, 2]",)),
    (pb.SamplingParams(frequency_penalty=math.nan), InvalidArgument, ("sampling.frequency_penalty", "finite")),
    (pb.SamplingParams(repetition_penalty=0), InvalidArgument, ("sampling.repetition_penalty must be in (0",)),
    (pb.SamplingParams(min_p=1.5), InvalidArgument, ("sampling.min_p must be in [0, 1]",)),
    (pb.SamplingParams(logit_bias={10**6: 1.0}), InvalidArgument, ("token id 1000000", "vocabulary")),
    (pb.SamplingParams(logit_bias={1: 101.0}), InvalidArgument, ("logit_bias[1] must be in [-100, 100]",)),
    (pb.SamplingParams(logit_bias={i: 1.0 for i in range(301)}), ResourceExhausted, ("names 301 tokens",)),
    (pb.SamplingParams(logprobs=21), InvalidArgument, ("sampling.logprobs must be 0 to 20",)),
])
def test_bad_sampling(parser, msg, cls, fragments):
    with fails(cls, *fragments):
        parser.sampling(msg)


# ---------------------------------------------------------------- prompts


class Tokenizer:
    """Stands in for the engine's tokenize: one id per word (or per message), and records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, text=None, chat=None):
        self.calls.append((text, chat))
        return list(range(len(text.split()))) if text is not None else list(range(len(chat)))


@pytest.mark.parametrize("kind", [pb.GenerateRequest, pb.TraceRequest])
def test_prompt_and_chat_tokenize(parser, kind):
    tok = Tokenizer()
    assert parser.prompt(kind(prompt="the capital of France"), tok) == [0, 1, 2, 3]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="be brief"),
                                     pb.ChatMessage(role="user", content="hi")])
    assert parser.prompt(kind(chat=chat), tok) == [0, 1]
    assert tok.calls == [("the capital of France", None),
                         (None, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])]


@pytest.mark.parametrize("request_,cls,fragments", [
    (pb.GenerateRequest(), InvalidArgument, ("no input", "`prompt` or `chat`")),
    (pb.GenerateRequest(prompt=" \n "), InvalidArgument, ("prompt is empty",)),
    (pb.GenerateRequest(chat=pb.ChatMessages()), InvalidArgument, ("chat has no messages",)),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="a"),
                                                       pb.ChatMessage(role="robot", content="b")])),
     InvalidArgument, ("chat.messages[1].role", "'robot'")),
    (pb.GenerateRequest(prompt="one two three four five six seven eight nine"), ResourceExhausted,
     ("9 tokens", "limit of 8")),
])
def test_bad_prompts(parser, request_, cls, fragments):
    with fails(cls, *fragments):
        parser.prompt(request_, Tokenizer())


def test_the_context_bounds_the_prompt_and_cuts_the_output(parser):
    """A prompt that leaves no room for a token is OUT_OF_RANGE naming both numbers; max_tokens past
    the context is cut to fit (the stream then ends with LENGTH)."""
    ctx = Limits(max_tokens=100, max_prompt_tokens=50).within(6)
    bounded = RequestParser(SHAPE, parser.artifacts, ctx)
    with fails(OutOfRange, "the prompt is 6 tokens", "context is 6 tokens"):
        bounded.prompt(pb.GenerateRequest(prompt="one two three four five six"), Tokenizer())
    assert len(bounded.prompt(pb.GenerateRequest(prompt="one two three four five"), Tokenizer())) == 5
    assert ctx.output_tokens(100, 5) == 1 and ctx.output_tokens(100, 2) == 4 and ctx.output_tokens(3, 2) == 3
    assert Limits().output_tokens(100, 5000) == 100  # no context of the engine's own


def test_specs_carry_the_generation_of_each_sae_they_name(parser):
    spec = steer(parser, feature(clamp=1.0))
    assert spec.generations == (("s", parser.artifacts.saes["s"].generation),)
    assert spec.current({"s": spec.generations[0][1]}) is spec
    stale = spec.current({"s": spec.generations[0][1] + 1})  # unloaded and loaded again
    assert stale.features == () and stale.generations == ()
    assert spec.current({}).features == ()  # unloaded


def test_a_prompt_that_tokenizes_to_nothing_is_invalid(parser):
    with fails(InvalidArgument, "tokenizes to nothing"):
        parser.prompt(pb.GenerateRequest(prompt="text"), lambda text=None, chat=None: [])
