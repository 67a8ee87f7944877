"""Replicas of one deployment agree: an artifact's generation is a hash of its content, and
`rudder:artifact_info` on /metrics says which replica serves what."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.artifact_set import parse
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.metrics import Metrics
from tests.server.engines import wait_for
from tests.tiny import make_sae

SITE = "blocks.1.hook_resid_post"


def artifact_info(engine) -> dict[str, dict]:
    """The scraped `rudder:artifact_info` samples, by artifact id."""
    metrics = Metrics()
    metrics.watch_engine(engine)
    text = generate_latest(metrics.registry).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "rudder:artifact_info"]
    assert all(s.value == 1 for s in samples)
    return {s.labels["id"]: s.labels for s in samples}


def test_two_replicas_loading_the_same_files_in_any_order_report_the_same_generations(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    a_copy = tmp_path / "elsewhere" / "a"  # another pod's volume: the same bytes at another path
    shutil.copytree(a, a_copy)
    one = ReferenceEngine(tiny_dir, saes=[f"a={a}", f"b={b}"])
    two = ReferenceEngine(tiny_dir, saes=[f"b={b}", f"a={a_copy}"])
    first, second = artifact_info(one), artifact_info(two)
    assert first == second
    assert set(first) == {"a", "b"}
    assert first["a"]["generation"] != first["b"]["generation"]
    assert first["a"] == {"id": "a", "kind": "sae", "generation": first["a"]["generation"], "site": SITE,
                          "width": "256"}
    assert one.artifacts.generations() == two.artifacts.generations()


def test_reloading_other_weights_under_an_id_is_another_generation_and_the_same_weights_are_not(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    engine = ReferenceEngine(tiny_dir, saes=[f"s={a}"])
    before = engine.artifacts.generations()["s"]

    async def reload(path):
        await engine.unload_sae("s")
        assert "s" not in artifact_info(engine)  # 1 only while loaded
        await engine.load_sae(f"s={path}")
        return engine.artifacts.generations()["s"]

    assert asyncio.run(reload(a)) == before  # the same files: requests validated before stay valid
    changed = asyncio.run(reload(b))
    assert changed != before
    assert artifact_info(engine)["s"]["generation"] == f"{changed:015x}"


def test_the_same_steering_gets_the_same_prefix_cache_salt_on_both_replicas(tiny_dir, tmp_path):
    """The vLLM backend salts the prefix cache with the edits and their SAEs' generations: two replicas
    that loaded the same files (in another order, from other paths) share nothing stale and agree."""
    from rudder.core.steering import spec_to_wire
    from rudder.server.backends.vllm import VllmEngine
    from rudder.server.requests import Limits, RequestParser
    from rudder.v1 import steering_pb2 as pb

    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    a_copy = tmp_path / "elsewhere" / "a"
    shutil.copytree(a, a_copy)
    other = tmp_path / "other"
    make_sae(other, SITE, seed=3)  # the same id, other weights: another salt

    def salt(*saes):
        engine = ReferenceEngine(tiny_dir, saes=list(saes))
        parser = RequestParser(engine.shape, engine.artifacts, Limits())
        edit = pb.Intervention(feature=pb.FeatureIntervention(sae="a", feature=3, clamp=2.0))
        spec = parser.steering([edit], pb.ReadoutRequest())
        return VllmEngine._salt(spec, spec_to_wire(spec), 5)

    first = salt(f"a={a}", f"b={b}")
    assert first is not None
    assert salt(f"b={b}", f"a={a_copy}") == first
    assert salt(f"a={other}", f"b={b}") != first


def test_artifact_set_lines_parse_and_bad_ones_name_their_line():
    entries, problems = parse("# the fleet's SAEs\na=/data/a\n\nb = saelens:rel/id  # a release\nnonsense\n"
                              "a=/data/again\nc d=/x\n")
    assert {n: (e.source, e.line) for n, e in entries.items()} == {"a": ("/data/a", 2), "b": ("saelens:rel/id", 4)}
    assert [p.split(":")[0] for p in problems] == ["line 5", "line 6", "line 7"]
    assert "already named on line 2" in problems[1]


def test_a_server_follows_its_artifact_set_file(tiny_dir, tmp_path, caplog):
    """Edits of the file add and remove SAEs on the running server; a stream steering with a removed
    SAE ends FAILED_PRECONDITION; a bad line is logged with its number and the rest serves; LoadSae
    and UnloadSae are refused naming the file."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    saes = tmp_path / "saes.txt"
    saes.write_text(f"a={a}\n")
    engine = ReferenceEngine(tiny_dir)
    caplog.set_level(logging.ERROR, logger="rudder.server.artifact_set")
    with BackgroundServer(engine, "tiny", artifact_set=saes, artifact_set_poll_s=0.2, allow_admin=True) as srv, \
            rc.Client(srv.address, timeout=60) as c:
        assert [s.id for s in c.model_info().saes] == ["a"]  # loaded before the first call
        saes.write_text(f"a={a}\nnot a line\nb={b}\nc={tmp_path / 'missing'}\n")
        wait_for(lambda: {s.id for s in c.model_info().saes} == {"a", "b"}, "b loaded from the edited set")
        wait_for(lambda: any("line 4" in r.getMessage() and "'c'" in r.getMessage() for r in caplog.records),
                 "the missing folder logged with its line")
        assert any("line 2" in r.getMessage() for r in caplog.records)
        assert len(list(c.generate("The quick", max_tokens=3, interventions=[rc.clamp("b", 3, 4.0)]))) == 3

        # The engine is held before the stream starts, so no step of it runs until the set has been
        # applied, on a machine of any speed; the stream is admitted (validated against a) meanwhile.
        srv.call(engine.pause())
        ended: list[BaseException] = []

        def steered_by_a():
            try:
                list(c.generate("The quick brown fox", max_tokens=200, ignore_eos=True,
                                interventions=[rc.clamp("a", 3, 4.0)]))
            except rc.RudderError as e:
                ended.append(e)

        stream = threading.Thread(target=steered_by_a)
        stream.start()
        wait_for(lambda: srv.server.core.in_flight == 1, "the stream steered by a admitted")
        saes.write_text(f"b={b}\n")
        wait_for(lambda: "a" not in engine.artifacts.saes, "a unloaded from the edited set")
        srv.call(engine.resume())
        stream.join(60)
        assert len(ended) == 1 and isinstance(ended[0], rc.FailedPrecondition) and "unloaded" in str(ended[0]), ended
        assert [s.id for s in c.model_info().saes] == ["b"]

        with pytest.raises(rc.FailedPrecondition, match=str(saes)):
            c.load_sae(str(a), id="a")
        with pytest.raises(rc.FailedPrecondition, match="artifact set"):
            c.unload_sae("b")


def _served(scrape_url: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(scrape_url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "rudder:requests_total" and s.labels.get("method") == "Generate")


def test_the_sdk_round_robins_over_two_replicas(tiny_dir):
    """Two servers on one port of two loopback addresses; the SDK's default policy spreads 40 calls
    over both, as each server's own rudder:requests counter says."""
    one = BackgroundServer(ReferenceEngine(tiny_dir), "tiny", host="127.0.0.1", metrics_port=0,
                           metrics_host="127.0.0.1")
    port = one.server.port
    try:
        two = BackgroundServer(ReferenceEngine(tiny_dir), "tiny", host="127.0.0.2", port=port, metrics_port=0,
                               metrics_host="127.0.0.1")
    except OSError:
        one.stop()
        pytest.skip("127.0.0.2 is not a loopback address here")
    with one, two, rc.Client(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}", timeout=60) as c:
        for _ in range(40):
            assert len(list(c.generate("The quick", max_tokens=1))) == 1
        counts = [_served(f"http://127.0.0.1:{s.server.metrics_port}/metrics") for s in (one, two)]
    assert sum(counts) == 40 and min(counts) >= 10, counts


def test_an_aged_connection_reconnects_without_losing_a_call_or_a_stream(tiny_dir):
    """With max_connection_age the server sends GOAWAY to old connections: a stream in flight when it
    comes still finishes, and the client's next call reconnects transparently."""
    engine = ReferenceEngine(tiny_dir)
    with BackgroundServer(engine, "tiny", max_connection_age_s=0.3) as srv, \
            rc.Client(srv.address, timeout=60) as c:
        stream = c.generate("The quick brown fox", max_tokens=20, ignore_eos=True)
        first = next(stream)
        srv.call(engine.pause())
        time.sleep(1.0)  # well past the age: the connection has been told to go away
        srv.call(engine.resume())
        rest = list(stream)
        assert len([first, *rest]) == 20 and rest[-1].stop_reason == "length"
        for _ in range(3):
            assert len(list(c.generate("The quick", max_tokens=2))) == 2
            time.sleep(0.4)


def test_the_port_answers_while_the_engine_warms_up_and_ready_means_warm(tiny_dir):
    """The engine's start is held: the bound port already answers, health NOT_SERVING and a call
    UNAVAILABLE ("warming up") at once; released, the server serves a warm-up request and reports SERVING."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rudder.server.app import RudderServer

    gate = threading.Event()

    class HeldStart(ReferenceEngine):
        async def start(self):
            await asyncio.to_thread(gate.wait)
            await super().start()

    engine = HeldStart(tiny_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make():
        return RudderServer(engine, "tiny", port=0)

    server = asyncio.run_coroutine_threadsafe(make(), loop).result()
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status():
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError:
                return None

        wait_for(lambda: status() is not None, "the bound port answering health checks")
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with rc.Client(address, timeout=30) as c, pytest.raises(rc.Unavailable, match="warming up"):
            list(c.generate("The quick", max_tokens=2))
        assert not started.done()
        gate.set()
        started.result(timeout=120)
        assert status() == health_pb2.HealthCheckResponse.SERVING
        with rc.Client(address, timeout=30) as c:
            assert len(list(c.generate("The quick", max_tokens=2))) == 2
    asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
