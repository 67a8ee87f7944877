"""Helpers for driving an engine directly (no gRPC) in tests."""

from __future__ import annotations

import asyncio
import time


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
