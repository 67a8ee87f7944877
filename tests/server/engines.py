"""Helpers for driving an engine directly (no gRPC) in tests."""

from __future__ import annotations

import asyncio


async def collect(engine, requests):
    """Run `requests` concurrently on `engine`; each request's list of events."""
    await engine.start()

    async def one(r):
        return [ev async for ev in engine.generate(r)]

    return await asyncio.gather(*(one(r) for r in requests))


def tokens(events):
    """The generated token ids of one request's events."""
    return [e.token_id for e in events if not e.is_prompt]
