"""Load and faults, bounded, on loopback: fuzzed requests, many concurrent streams, mass
cancellation, SIGTERM under load. Each test prints the figures it measured (pytest -s)."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.requests import Limits
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc
from tests.server.engines import running_after_settling
from tests.server.test_process import free_port, wait_until_serving

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_sae_dir):
    engine = ReferenceEngine(tiny_dir, saes=[f"s={tiny_sae_dir}"])
    with BackgroundServer(engine, "tiny", limits=Limits(max_tokens=6, max_interventions=6, max_readout_top_k=64),
                          max_concurrent=128) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.SteeringStub(ch)


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- fuzzing

# Mostly plausible values, sometimes hostile ones: both the checks and the engine get exercised.
sane = st.floats(-50, 50, width=32)
floats = st.one_of(sane, sane, sane, st.floats(allow_nan=True, allow_infinity=True, width=32))
small = st.one_of(st.integers(0, 255), st.integers(0, 255), st.integers(-3, 300))
names = st.sampled_from(["s", "s", "s", "s", "nope", "", "z1", "s=1"])
scopes = st.one_of(st.just(pb.Scope()), st.builds(pb.Scope, kind=st.integers(0, 3)),
                   st.builds(pb.Scope, kind=st.integers(0, 6), start=st.integers(-2, 40), end=st.integers(-2, 40)))
feature_ops = st.one_of(st.builds(dict, clamp=floats), st.builds(dict, add=floats), st.builds(dict, scale=floats),
                        st.builds(dict, ablate=st.booleans()), st.just({}))
features = st.builds(lambda sae, f, op: pb.FeatureIntervention(sae=sae, feature=f, **op), names, small, feature_ops)
sites = st.sampled_from(["", "blocks.1.hook_resid_post", "blocks.9.hook_resid_post", "blocks.0.attn.hook_z", "x"])
directions = st.one_of(
    st.builds(lambda site, a, sae, f: pb.DirectionIntervention(site=site, alpha=a, sae_feature=pb.SaeFeature(
        sae=sae, feature=f)), sites, floats, names, small),
    st.builds(lambda site, a, v: pb.DirectionIntervention(site=site, alpha=a, vector=pb.Vector(values=v)),
              sites, floats, st.lists(floats, max_size=70)),
    st.builds(pb.DirectionIntervention, site=sites, alpha=floats))
codes = st.builds(lambda cb, h, c, s: pb.CodeIntervention(codebook=cb, head=h, code=c, **s), names, small, small,
                  st.one_of(st.just({}), st.builds(dict, strength=floats)))
interventions = st.lists(st.one_of(
    st.builds(lambda sc, f: pb.Intervention(scope=sc, feature=f), scopes, features),
    st.builds(lambda sc, d: pb.Intervention(scope=sc, direction=d), scopes, directions),
    st.builds(lambda sc, c: pb.Intervention(scope=sc, code=c), scopes, codes),
    st.builds(pb.Intervention, scope=scopes)), max_size=3)
readouts = st.one_of(st.just(pb.ReadoutRequest()), st.builds(
    pb.ReadoutRequest, saes=st.lists(names, max_size=2), codebooks=st.sampled_from([[], [], [], ["z1"]]),
    top_k=st.one_of(st.integers(0, 64), st.integers(-2, 300)), feature_ids=st.lists(small, max_size=4),
    include_prompt=st.booleans()))


@st.composite
def sampling(draw):
    s = pb.SamplingParams(stop=draw(st.lists(st.text(max_size=3), max_size=2)), ignore_eos=draw(st.booleans()))
    for name, strat in (("max_tokens", st.one_of(st.integers(1, 6), st.integers(-2, 10))),
                        ("temperature", st.one_of(st.floats(0, 2), floats)),
                        ("top_p", st.one_of(st.floats(0.01, 1), floats)),
                        ("top_k", st.integers(-2, 60)), ("seed", st.integers(-5, 2**40))):
        if draw(st.booleans()):
            setattr(s, name, draw(strat))
    return s


@st.composite
def generate_requests(draw):
    req = pb.GenerateRequest(sampling=draw(sampling()), interventions=draw(interventions),
                             readouts=draw(readouts), include_baseline=draw(st.booleans()))
    which = draw(st.sampled_from(["prompt", "prompt", "chat", "none"]))
    if which == "prompt":
        req.prompt = draw(st.one_of(st.text(min_size=1, max_size=40), st.text(max_size=3)))
    elif which == "chat":
        req.chat.messages.extend(pb.ChatMessage(role=draw(st.sampled_from(["user", "system", "assistant", "bot", ""])),
                                                content=draw(st.text(max_size=20)))
                                 for _ in range(draw(st.integers(0, 3))))
    return req


FUZZ_EXAMPLES = 1000
FUZZ_CODES: collections.Counter = collections.Counter()


def check_ok_stream(req: pb.GenerateRequest, msgs: list[pb.GenerateResponse]) -> None:
    """Each sequence of an OK stream (steered, and baseline if asked) ends with a stop reason and usage,
    on its last message only."""
    for baseline in (False, True) if req.include_baseline else (False,):
        seq = [m for m in msgs if m.baseline == baseline]
        assert seq, f"no {'baseline' if baseline else 'steered'} messages: {req}"
        assert seq[-1].stop_reason != pb.STOP_REASON_UNSPECIFIED, f"no final stop reason: {req}"
        assert all(m.stop_reason == pb.STOP_REASON_UNSPECIFIED for m in seq[:-1]), f"stop reason mid-stream: {req}"
        generated = sum(not m.token.is_prompt for m in seq)
        assert 1 <= generated and seq[-1].usage.completion_tokens == generated, req
        assert seq[-1].usage.prompt_tokens >= 1
    assert not any(m.baseline for m in msgs) or req.include_baseline


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(req=generate_requests())
@example(req=pb.GenerateRequest(prompt="0", sampling=pb.SamplingParams(max_tokens=1, temperature=1.4013e-45)))
def test_fuzzed_requests_get_only_client_side_statuses(stub, req):
    try:
        msgs = list(stub.Generate(req, timeout=60))
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    FUZZ_CODES[code.name] += 1
    assert code in ALLOWED, f"{code.name}: {req}"
    if code == grpc.StatusCode.OK:
        check_ok_stream(req, msgs)


@pytest.fixture(scope="module")
def fuzzed(stub) -> collections.Counter:
    """Statuses of a full fuzz run on this module's server: the test above's, or, where it did not run
    (deselected, or ordered later), a run made here."""
    if sum(FUZZ_CODES.values()) < FUZZ_EXAMPLES:
        FUZZ_CODES.clear()
        test_fuzzed_requests_get_only_client_side_statuses(stub)
    return FUZZ_CODES


def test_server_is_alive_after_the_fuzzing(server, fuzzed):
    print(f"\nfuzzed requests by status: {dict(fuzzed)}")
    assert sum(fuzzed.values()) >= FUZZ_EXAMPLES and fuzzed["OK"] >= 20
    assert set(fuzzed) <= {c.name for c in ALLOWED}
    with rc.Client(server.address, timeout=60) as c:
        toks = list(c.generate("The capital", max_tokens=3, ignore_eos=True))
    assert len(toks) == 3 and toks[-1].stop_reason == "length"
    assert running_after_settling(server.server.engine) == 0


# ---------------------------------------------------------------- load


def in_flight_after_settling(service, timeout: float = 30.0) -> int:
    """The service's open streams once finished ones have been released (just after their last message)."""
    deadline = time.monotonic() + timeout
    while service.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    return service.in_flight


def test_many_concurrent_streams_mixing_steered_and_unsteered(server):
    n, errors = 96, []
    engine, service = server.server.engine, server.server.service
    start = threading.Barrier(n)
    done = threading.Event()
    held: list[int] = []  # the service's open streams, sampled while the clients run

    def watch():
        while not done.is_set():
            held.append(service.in_flight)
            time.sleep(0.001)

    def one(i):
        try:
            with rc.Client(server.address, timeout=120) as c:
                kw = dict(interventions=[rc.clamp("s", i % 256, 10.0)], readouts=rc.readouts(saes=["s"], top_k=2)) \
                    if i % 2 else {}
                start.wait()
                toks = list(c.generate("The quick brown fox", max_tokens=6, ignore_eos=True, **kw))
                assert len(toks) == 6 and toks[-1].stop_reason == "length"
                assert all(t.readouts for t in toks) == bool(i % 2)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    print(f"\n{n} concurrent streams: {len(errors)} errors; up to {max(held)} in flight at once")
    assert not errors, errors[:3]
    # The server held more streams open than one wave of the engine serves: later ones waited in its
    # queue instead of being refused (96 < max_concurrent) or served one after another.
    assert engine.max_batch < max(held) <= n
    assert running_after_settling(engine) == 0
    assert in_flight_after_settling(service) == 0


def test_200_cancelled_streams_leave_nothing_running_and_memory_flat(server):
    engine = server.server.engine

    def cancel_some(count: int):
        with rc.Client(server.address, timeout=60) as c:
            for i in range(count):
                stream = c.generate("The quick brown fox", max_tokens=6, ignore_eos=True,
                                    interventions=[rc.clamp("s", i % 256, 5.0)] if i % 2 else [])
                next(stream)
                stream.close()  # cancels the call mid-stream

    cancel_some(50)  # warm-up: allocator pools, gRPC buffers
    before = rss_mb()
    cancel_some(200)
    left = running_after_settling(engine)
    after = rss_mb()
    print(f"\n200 cancelled streams: {left} left running; RSS {before:.0f} -> {after:.0f} MB")
    assert left == 0
    assert in_flight_after_settling(server.server.service) == 0
    assert after - before < 25, f"RSS grew {after - before:.1f} MB over 200 cancellations"


def test_sigterm_under_load_cuts_no_stream_without_a_status(tiny_dir, tiny_sae_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rudder.server.cli", "serve", "--backend", "reference",
                             "--model", str(tiny_dir),
                             "--sae", f"s={tiny_sae_dir}", "--port", str(port), "--grace", "30",
                             "--metrics-port", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        assert wait_until_serving(proc, address), "server did not start"
        outcomes: list[str] = []
        started = threading.Semaphore(0)

        def one(i):
            try:
                with rc.Client(address, timeout=120) as c:
                    last = None
                    for n, tok in enumerate(c.generate("The quick brown fox", max_tokens=40, ignore_eos=True,
                                                       interventions=[rc.clamp("s", i, 5.0)] if i % 2 else [])):
                        if n == 0:
                            started.release()
                        last = tok
                    outcomes.append("finished" if last is not None and last.stop_reason else "cut")
            except rc.RudderError as e:  # ended with a status: allowed
                started.release()
                outcomes.append(f"status {type(e).__name__}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for _ in threads:
            started.acquire(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        print(f"\nSIGTERM under load: {collections.Counter(outcomes)}")
        assert len(outcomes) == 24 and "cut" not in outcomes
        assert outcomes.count("finished") == 24  # within the grace period every stream finishes
    finally:
        if proc.poll() is None:
            proc.kill()
