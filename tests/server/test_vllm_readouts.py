"""The vLLM front end's side channel for per-step rows, without an engine: a bad row does not stop the
others, a row that never comes is an error after READOUT_WAIT_S, an overflowed row ends its request."""

import asyncio

import pytest

from rudder.core.errors import InvalidArgument, ReadoutMissing
from rudder.server.backends import vllm as vllm_front
from rudder.server.backends.base import TokenReadout


def bare_engine():
    engine = object.__new__(vllm_front.VllmEngine)  # only the routing state: no model, no vLLM
    engine._rows, engine.recomputed_rows, engine.on_hook_step = {}, 0, None
    return engine


def test_rows_before_a_bad_one_still_reach_their_requests():
    async def go():
        engine = bare_engine()
        box = engine._rows["a"] = vllm_front._Rows()
        with pytest.raises(ValueError):
            engine._route(0.0, [("a-0", 5, [TokenReadout("s", top_ids=[1])], False, None), ("malformed",)])
        assert (await asyncio.wait_for(box.get(5), 1))[0].top_ids == [1]
    asyncio.run(go())


def test_a_missing_row_is_an_error_and_an_overflowed_row_ends_the_request(monkeypatch):
    monkeypatch.setattr(vllm_front, "READOUT_WAIT_S", 0.05)

    async def go():
        engine = bare_engine()
        box = engine._rows["a"] = vllm_front._Rows()
        with pytest.raises(ReadoutMissing, match="position 3"):
            await box.get(3)
        engine._route(0.0, [("a-0", 4, [], True, None)])
        with pytest.raises(InvalidArgument, match="non-finite"):
            await box.get(4)
    asyncio.run(go())


def test_a_guard_hit_is_kept_by_the_position_it_fired_at():
    from rudder.server.backends.base import GuardHit

    async def go():
        engine = bare_engine()
        box = engine._rows["a"] = vllm_front._Rows()
        engine._route(0.0, [("a-0", 6, [], False, GuardHit(0, 6, 31.0)), ("a-0", 7, [], False, None)])
        assert await box.get(6) == [] and box.hits == {6: GuardHit(0, 6, 31.0)}
    asyncio.run(go())
