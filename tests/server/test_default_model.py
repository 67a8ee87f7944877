"""A few checks on the real embedded default model (converted at set-up by `rudder fetch-default`)."""

import asyncio

import pytest

from rudder.core.default_model import default_model_dir, is_converted
from rudder.core.steering import DirectionEdit, ReadoutSpec, SteeringSpec
from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not is_converted(), reason="default model not converted: run `rudder fetch-default`"),
]


@pytest.fixture(scope="module")
def engine():
    return ReferenceEngine(default_model_dir())


def generate(engine, requests):
    async def go():
        await engine.start()

        async def one(r):
            return [ev async for ev in engine.generate(r)]
        return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(go())


def text(events):
    return "".join(e.text for e in events if not e.is_prompt)


def test_greedy_answer_is_paris_and_batching_changes_nothing(engine):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenize(chat=chat)
    alone = generate(engine, [EngineRequest(ids, Sampling(max_tokens=12))])[0]
    assert "Paris" in text(alone)
    v = engine.model.model.embed_tokens.weight[engine.tokenize(" ocean")[0]].detach().float()
    steered = SteeringSpec(directions=(DirectionEdit("blocks.10.hook_resid_post", v / v.norm(), 40.0),))
    together = generate(engine, [EngineRequest(ids, Sampling(max_tokens=12)),
                                 EngineRequest(ids, Sampling(max_tokens=12), steered)])
    assert [e.token_id for e in together[0]] == [e.token_id for e in alone]
    assert text(together[1]) != text(alone)


def test_the_shipped_default_sae_reads_out():
    from rudder.core.default_model import default_sae_dirs

    saes = default_sae_dirs()
    assert saes, "models/default-saes is missing: the default SAE is committed with the repository"
    engine = ReferenceEngine(default_model_dir(), saes=[str(saes[0])])
    sae_id = saes[0].name
    ids = engine.tokenize("The socket module provides access to the BSD socket interface.")
    (events,) = generate(engine, [EngineRequest(ids, steering=SteeringSpec(
        readouts=ReadoutSpec(saes=(sae_id,), top_k=8)), trace=True)])
    assert len(events) == len(ids)
    assert all(len(e.readouts[0].top_ids) == 8 for e in events)
