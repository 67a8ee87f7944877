"""Helpers for driving an engine directly (no gRPC) in tests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest


async def collect(engine, requests):
    """Run `requests` concurrently on `engine`; each request's list of events."""
    await engine.start()

    async def one(r):
        return [ev async for ev in engine.generate(r)]

    return await asyncio.gather(*(one(r) for r in requests))


def tokens(events):
    """The generated token ids of one request's events."""
    return [e.token_id for e in events if not e.is_prompt]


def running_after_settling(engine, timeout: float = 30.0) -> int:
    """The engine's running requests once finished work has been released (it is released
    just after a stream's last message goes out), waiting up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while engine.running_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.running_requests()


def wait_for(condition, what: str, ceiling: float = 120.0) -> None:
    """Wait until `condition()` holds. The ceiling only turns a hang into a failure naming `what`; no
    verdict depends on how soon it holds."""
    deadline = time.monotonic() + ceiling
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {ceiling:.0f}s for: {what}"
        time.sleep(0.01)


class Loop:
    """One event loop in a thread; `run(coro)` waits for its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def start(loop, engine):
    loop.run(engine.start())
    return engine


def assert_same_readouts(got, want, rel=1e-3):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.token_id, g.position, g.is_prompt) == (w.token_id, w.position, w.is_prompt)
        assert [r.source for r in g.readouts] == [r.source for r in w.readouts]
        for a, b in zip(g.readouts, w.readouts):
            if b.codes is not None:
                assert a.codes == b.codes
                continue
            assert a.top_values == pytest.approx(b.top_values, rel=rel, abs=1e-3)
            assert a.selected_ids == b.selected_ids
            assert a.selected_values == pytest.approx(b.selected_values, rel=rel, abs=1e-3)
            assert set(a.top_ids) == set(b.top_ids) or a.top_values[-1] == pytest.approx(b.top_values[-1], abs=1e-3)
