"""`AsyncClient` against a real server on a loopback port: features, admin SAE calls, typed errors,
and the same answers as the blocking `Client`."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from tests.tiny import make_sae

FEATURES = [
    {"id": 3, "label": "French capitals", "density": 0.01, "top_examples": ["the capital of France is Paris"]},
    {"id": 4, "label": "animals", "density": 0.02, "top_examples": ["the quick brown fox", "a brown fox ran"]},
    {"id": 5, "label": "more animals", "density": 0.001, "top_examples": ["a brown fox", "the cat"]},
]


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    """An SAE with feature metadata (served as "s") and one to attach later through the admin calls."""
    root = tmp_path_factory.mktemp("client-saes")
    make_sae(root / "s", "blocks.1.hook_resid_post")
    (root / "s" / "feature_metadata.json").write_text(json.dumps({"features": FEATURES}))
    make_sae(root / "mlp0", "blocks.0.hook_mlp_out", seed=3)
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, saes):
    engine = ReferenceEngine(tiny_dir, saes=[f"s={saes / 's'}"])
    with BackgroundServer(engine, "tiny", allow_admin=True) as srv:
        yield srv


def run(make_coro):
    """Run `make_coro(client)` with a fresh AsyncClient (its channel belongs to this event loop)."""
    async def go(address):
        async with rc.AsyncClient(address, timeout=60) as c:
            return await make_coro(c)
    return go


def test_list_features_and_best_feature_match_the_blocking_client(server):
    async def calls(c):
        return (await c.list_features("s", label="capital"), await c.list_features("s", regex=r"brown\s+fox"),
                await c.list_features("s", limit=1, offset=1), await c.best_feature("s", r"brown fox"))

    by_label, by_regex, page, (best, total) = asyncio.run(run(calls)(server.address))
    assert [f.id for f in by_label.features] == [3]
    assert [f.id for f in by_regex.features] == [4, 5] and by_regex.total == 2
    assert len(page.features) == 1 and page.total == 3
    assert (best.id, total) == (4, 2)  # 4's top examples match twice, 5's once
    with rc.Client(server.address, timeout=60) as c:
        assert c.list_features("s", regex=r"brown\s+fox") == by_regex
        assert c.best_feature("s", r"brown fox") == (best, total)


def test_load_steer_and_unload_an_sae(server, saes):
    async def calls(c):
        info = await c.load_sae(str(saes / "mlp0"), "m0")
        listed = [s.id for s in (await c.model_info()).saes]
        toks = [t async for t in c.generate("The capital", max_tokens=3, ignore_eos=True,
                                            interventions=[rc.clamp("m0", 7, 40.0)],
                                            readouts=rc.readouts(saes=["m0"], top_k=1))]
        unloaded = await c.unload_sae("m0")
        return info, listed, toks, unloaded, [s.id for s in (await c.model_info()).saes]

    info, listed, toks, unloaded, after = asyncio.run(run(calls)(server.address))
    assert (info.id, info.site, info.d_sae) == ("m0", "blocks.0.hook_mlp_out", 256)
    assert listed == ["s", "m0"] and after == ["s"]
    assert len(toks) == 3 and all(t.readout("m0").top[0][0] == 7 for t in toks)
    assert unloaded is None


async def _raises(error, match, coro):
    with pytest.raises(error, match=match):
        await coro


def test_failures_arrive_as_typed_errors_with_the_servers_message(server, saes):
    async def calls(c):
        await _raises(rc.InvalidArgument, "does not compile", c.list_features("s", regex="("))
        await _raises(rc.NotFound, "unknown SAE or codebook 'nope'", c.list_features("nope"))
        await _raises(rc.FailedPrecondition, "missing|not|no ", c.load_sae(str(saes / "nowhere")))
        await _raises(rc.NotFound, "no SAE 'm1' is loaded", c.unload_sae("m1"))
        stream = c.generate("x", interventions=[rc.clamp("nope", 1, 1.0)])
        await _raises(rc.NotFound, "unknown SAE 'nope'", stream.__anext__())

    asyncio.run(run(calls)(server.address))


def test_permission_denied_without_allow_admin(tiny_dir, saes):
    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny") as srv:
        async def calls(c):
            await _raises(rc.PermissionDenied, "--allow-admin", c.load_sae(str(saes / "mlp0")))
            await _raises(rc.PermissionDenied, "--allow-admin", c.unload_sae("s"))

        asyncio.run(run(calls)(srv.address))


def test_closing_a_stream_early_cancels_it_on_the_server(server):
    async def calls(c):
        stream = c.generate("The quick brown fox", max_tokens=60, ignore_eos=True)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(run(calls)(server.address)).text is not None
    engine = server.server.engine
    deadline = time.monotonic() + 10
    while engine.running_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running_requests() == 0
