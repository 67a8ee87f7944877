"""Load and faults, bounded, on loopback, on both backends: fuzzed requests, many concurrent
streams, mass cancellation, SIGTERM under load, unload under load, a request that overflows
its steering, and (vLLM) the engine process killed. Each test prints the figures it measured
(pytest -s)."""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rudder import client as rc
from rudder.server.app import ENGINE_DIED_EXIT, BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.requests import Limits
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc
from tests.server.engines import running_after_settling, wait_for
from tests.server.test_process import free_port, wait_until_serving
from tests.tiny import make_model, make_sae

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
FUZZ_EXAMPLES = {"reference": 1000, "vllm": 300}
NO_VLLM = pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="vLLM is not installed")
BACKENDS = ["reference", pytest.param("vllm", marks=[pytest.mark.vllm, NO_VLLM])]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(backend, tiny_dir, tmp_path_factory):
    """The tiny Llama and an SAE `s` at blocks.1.hook_resid_post (for vLLM: head size 32, as its CPU
    attention needs)."""
    if backend == "reference":
        model_dir = tiny_dir
    else:
        model_dir = make_model(tmp_path_factory.mktemp("faults-llama"), heads=2, kv_heads=1)
    sae = tmp_path_factory.mktemp("faults-sae") / "s"
    make_sae(sae, "blocks.1.hook_resid_post")
    return model_dir, sae


def make_engine(backend: str, model_dir, saes: list[str]):
    if backend == "reference":
        return ReferenceEngine(model_dir, saes=saes)
    from rudder.server.backends.vllm import VllmEngine

    return VllmEngine(model_dir, saes, max_model_len=256)


@pytest.fixture(scope="module")
def server(backend, model):
    model_dir, sae = model
    engine = make_engine(backend, model_dir, [f"s={sae}"])
    with BackgroundServer(engine, "tiny", limits=Limits(max_tokens=6, max_interventions=12, max_readout_top_k=64),
                          max_concurrent=128, allow_admin=True) as srv:
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


@st.composite
def plausible_requests(draw):
    """Requests a careful client sends: valid steering of `s`, readouts, sampling within range."""
    ops = st.one_of(st.builds(dict, clamp=sane), st.builds(dict, add=sane), st.builds(dict, scale=sane),
                    st.builds(dict, ablate=st.just(True)))
    ivs = st.lists(st.builds(lambda sc, f, op: pb.Intervention(scope=sc, feature=pb.FeatureIntervention(
        sae="s", feature=f, **op)), st.builds(pb.Scope, kind=st.integers(0, 3)), st.integers(0, 255), ops),
        max_size=4)
    return pb.GenerateRequest(
        prompt=draw(st.text(min_size=1, max_size=30).filter(str.strip)), interventions=draw(ivs),
        readouts=draw(st.one_of(st.just(pb.ReadoutRequest()), st.builds(
            pb.ReadoutRequest, saes=st.just(["s"]), top_k=st.integers(0, 8), include_prompt=st.booleans()))),
        sampling=pb.SamplingParams(max_tokens=draw(st.integers(1, 6)), temperature=draw(st.floats(0, 2)),
                                   seed=draw(st.integers(0, 2**31))),
        include_baseline=draw(st.booleans()))


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


def fuzz(stub, examples: int) -> collections.Counter:
    """Send `examples` hypothesis-drawn requests; every one ends OK or with a client-side status."""
    codes: collections.Counter = collections.Counter()

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(req=st.one_of(generate_requests(), plausible_requests()))
    @example(req=pb.GenerateRequest(prompt="0", sampling=pb.SamplingParams(max_tokens=1, temperature=1.4013e-45)))
    @example(req=pb.GenerateRequest(prompt="x", interventions=[pb.Intervention(feature=pb.FeatureIntervention(
        sae="s", feature=1, clamp=3e38))]))
    def one(req):
        try:
            msgs = list(stub.Generate(req, timeout=60))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        codes[code.name] += 1
        assert code in ALLOWED, f"{code.name}: {req}"
        if code == grpc.StatusCode.OK:
            check_ok_stream(req, msgs)

    one()
    return codes


@pytest.mark.slow
def test_fuzzed_requests_get_only_client_side_statuses_and_the_server_lives(backend, server, stub):
    codes = fuzz(stub, FUZZ_EXAMPLES[backend])
    print(f"\n{backend}: {sum(codes.values())} fuzzed requests by status: {dict(codes)}")
    assert sum(codes.values()) >= FUZZ_EXAMPLES[backend] and codes["OK"] >= FUZZ_EXAMPLES[backend] // 5
    assert "INTERNAL" not in codes and "UNAVAILABLE" not in codes
    with rc.Client(server.address, timeout=60) as c:
        toks = list(c.generate("The capital", max_tokens=3, ignore_eos=True))
    assert len(toks) == 3 and toks[-1].stop_reason == "length"
    assert running_after_settling(server.server.engine) == 0


# ---------------------------------------------------------------- load


def test_the_context_bounds_prompts_and_cuts_outputs_with_length(backend, server):
    """Context 256 (the tiny model's positions; vLLM's max_model_len): a prompt that leaves no room gets
    OUT_OF_RANGE naming both numbers; one that leaves 3 tokens ends with LENGTH after 3, with usage."""
    engine = server.server.engine
    words = "The quick brown fox jumps over the lazy dog."

    def prompt_of(n: int) -> str:
        text = words
        while len(engine.tokenize(text)) < n:
            text += " " + words
        ids = engine.tokenize(text)
        while len(ids) > n:
            text = text[:-1]
            ids = engine.tokenize(text)
        assert len(ids) == n, "could not make a prompt of that length"
        return text

    with rc.Client(server.address, timeout=120) as c:
        with pytest.raises(rc.InvalidArgument, match="the prompt is 300 tokens; this model's context is 256"):
            list(c.generate(prompt_of(300), max_tokens=6))
        toks = list(c.generate(prompt_of(253), max_tokens=6, ignore_eos=True))
    assert len(toks) == 3 and toks[-1].stop_reason == "length"
    assert (toks[-1].prompt_tokens, toks[-1].completion_tokens) == (253, 3)


def in_flight_after_settling(service, timeout: float = 30.0) -> int:
    """The service's open streams once finished ones have been released (just after their last message)."""
    deadline = time.monotonic() + timeout
    while service.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    return service.in_flight


def test_many_concurrent_streams_mixing_steered_and_unsteered(backend, server):
    """96 streams, half steered and read, opened while the engine is paused: all 96 are admitted and held
    at once (none refused, 96 < max_concurrent), then each finishes with its own tokens and readouts."""
    n, errors = 96, []
    engine, service = server.server.engine, server.server.core

    def one(i):
        try:
            with rc.Client(server.address, timeout=120) as c:
                kw = dict(interventions=[rc.clamp("s", i % 256, 10.0)], readouts=rc.readouts(saes=["s"], top_k=2)) \
                    if i % 2 else {}
                toks = list(c.generate("The quick brown fox", max_tokens=6, ignore_eos=True, **kw))
                assert len(toks) == 6 and toks[-1].stop_reason == "length"
                assert all(t.readouts for t in toks) == bool(i % 2)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    server.call(engine.pause())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: service.in_flight == n and engine.running_requests() == n,
                 f"{n} streams in flight and in the engine at once")
    finally:
        server.call(engine.resume())
    for t in threads:
        t.join()
    print(f"\n{n} concurrent streams: {len(errors)} errors")
    assert not errors, errors[:3]
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
    assert in_flight_after_settling(server.server.core) == 0
    assert after - before < 25, f"RSS grew {after - before:.1f} MB over 200 cancellations"


def serve_process(backend: str, model, *extra: str) -> tuple[subprocess.Popen, str]:
    """`rudder serve` in a child process on a free port, serving. Its log goes to a file; a start that
    fails shows the log's tail (and the ceiling is a hang's, not a timing verdict)."""
    import tempfile

    model_dir, sae = model
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="rudder-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rudder.cli", "serve", "--backend", backend,
                             "--model", str(model_dir), "--sae", f"s={sae}", "--port", str(port),
                             "--metrics-port", "-1", *extra, *(["--", "--max-model-len", "256"] if backend == "vllm"
                                                                else [])],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    if not wait_until_serving(proc, address, timeout=600):
        import psutil

        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()  # the engine core too: it would outlive a killed server by minutes
        except psutil.NoSuchProcess:
            pass
        proc.kill()
        tail = "".join(open(log.name, errors="replace").readlines()[-25:])
        pytest.fail(f"rudder serve --backend {backend} did not answer within {time.monotonic() - started:.0f} s "
                    f"(exit code {proc.poll()}); the end of its log ({log.name}):\n{tail}")
    os.unlink(log.name)  # the child keeps writing to its open file; only a failed start keeps the log
    return proc, address


@pytest.mark.slow
def test_sigterm_under_load_cuts_no_stream_without_a_status(backend, model):
    """SIGTERM with 24 streams open, 16 through gRPC and 8 through the OpenAI door: within the grace
    period every stream of both doors finishes, and the server exits 0."""
    import openai

    door_port = free_port()
    proc, address = serve_process(backend, model, "--grace", "30", "--openai-port", str(door_port))
    try:
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

        def one_door(i):
            door = openai.OpenAI(base_url=f"http://127.0.0.1:{door_port}/v1", api_key="-", max_retries=0,
                                 timeout=120)
            try:
                chunks = door.completions.create(
                    model="default", prompt="The quick brown fox", max_tokens=40, stream=True,
                    extra_body={"ignore_eos": True, "rudder": {"interventions": [
                        {"feature": {"sae": "s", "feature": i, "clamp": 5.0}}]}})
                n, finish = 0, None
                for chunk in chunks:
                    if n == 0:
                        started.release()
                    n += 1
                    finish = chunk.choices[0].finish_reason if chunk.choices else finish
                outcomes.append("finished" if n == 40 and finish == "length" else "cut")
            except openai.APIError as e:  # ended with an error: allowed
                started.release()
                outcomes.append(f"status {type(e).__name__}")

        threads = ([threading.Thread(target=one, args=(i,)) for i in range(16)]
                   + [threading.Thread(target=one_door, args=(i,)) for i in range(8)])
        for t in threads:
            t.start()
        for _ in threads:
            started.acquire(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        print(f"\n{backend}: SIGTERM under load: {collections.Counter(outcomes)}")
        assert len(outcomes) == 24 and "cut" not in outcomes
        assert outcomes.count("finished") == 24  # within the grace period every stream finishes
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_steering_overflow_ends_only_its_request_and_poisons_nothing(backend, server):
    """Edits inside the bounds can still overflow when chained (ten scales of 1e4 on one feature): that
    request ends INVALID_ARGUMENT, and an unsteered request after it (in the blocks it freed) gets
    exactly the tokens and logprobs it got before."""
    with rc.Client(server.address, timeout=60) as c:
        def cats():
            return [(t.id, t.logprob) for t in c.generate("Tell me about cats.", max_tokens=6, ignore_eos=True)]

        before = cats()
        top = next(iter(c.generate("Tell me about dogs.", max_tokens=1, readouts=rc.readouts(saes=["s"], top_k=1))))
        feature = top.readout("s").top[0][0]
        with pytest.raises(rc.InvalidArgument, match="non-finite"):
            list(c.generate("Tell me about dogs.", max_tokens=6, ignore_eos=True,
                            interventions=[rc.add("s", feature, 1e4)] + [rc.scale("s", feature, 1e4)] * 10))
        with pytest.raises(rc.InvalidArgument, match="bound"):
            list(c.generate("Tell me about dogs.", max_tokens=6, interventions=[rc.clamp("s", feature, 3e38)]))
        after = cats()
    print(f"\n{backend}: unsteered before/after the overflow: {before == after}")
    assert after == before
    assert running_after_settling(server.server.engine) == 0


def test_unloading_an_sae_under_load_ends_its_requests_and_spares_the_rest(backend, server, model):
    """LoadSae `u`, 16 streams (half steer and read `u`, half plain), each sending request after request,
    UnloadSae `u` while the engine is held: every stream that uses it ends with a status that names it
    (FAILED_PRECONDITION for the request in flight, or NOT_FOUND for one sent after the unload), the
    others go on and finish every request; `u` loaded again (another width, same id) serves new requests,
    and ids validated for the old one are re-checked.

    Deterministic on any machine: the streams never run out of work (the kill test's pattern), and the
    unload happens with the engine paused, so no step runs between the hold and the unload."""
    _, sae = model
    root = sae.parent
    make_sae(root / "u-wide", "blocks.1.hook_resid_post", d_sae=256, seed=3)
    make_sae(root / "u-narrow", "blocks.1.hook_resid_post", d_sae=64, seed=4)
    outcomes: dict[int, str] = {}
    finished = collections.Counter()  # plain streams: requests finished whole
    started = threading.Semaphore(0)
    plain_done = threading.Event()
    engine = server.server.engine
    parser = server.server.core.parser
    limits, parser.limits = parser.limits, dataclasses.replace(parser.limits, max_tokens=40)
    with rc.Client(server.address, timeout=120) as admin:
        admin.load_sae(str(root / "u-wide"), id="u")

        def one(i):
            uses = i % 2 == 1
            kw = dict(interventions=[rc.clamp("u", 200, 8.0)], readouts=rc.readouts(saes=["u"], top_k=2)) \
                if uses else {}
            first, got = True, 0
            try:
                with rc.Client(server.address, timeout=120) as c:
                    while uses or not plain_done.is_set():
                        got, stop = 0, None
                        for tok in c.generate("The quick brown fox", max_tokens=40, ignore_eos=True, **kw):
                            got, stop = got + 1, tok.stop_reason
                            if first:
                                first = False
                                started.release()
                        assert got == 40 and stop == "length", f"stream {i} cut after {got}"
                        finished[i] += 1
                    outcomes[i] = "finished"
            except rc.FailedPrecondition as e:
                outcomes[i] = "failed: unloaded" if "unloaded" in e.details else f"failed: {e.details}"
            except rc.NotFound as e:
                outcomes[i] = "refused: unknown u" if "unknown SAE 'u'" in e.details else f"not found: {e.details}"
            except rc.RudderError as e:
                outcomes[i] = f"status {type(e).__name__} after {got} tokens: {e.details}"

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=120), "a stream got no token"
        server.call(engine.pause())  # from here no step runs: every stream waits on the engine or its next call
        try:
            admin.unload_sae("u")
            plain_done.set()
        finally:
            server.call(engine.resume())
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        print(f"\n{backend}: unload under load: {collections.Counter(outcomes.values())}; plain streams "
              f"finished {sum(finished.values())} requests")
        assert all(outcomes[i] == "finished" and finished[i] >= 1 for i in range(0, 16, 2)), outcomes
        assert all(outcomes[i] in ("failed: unloaded", "refused: unknown u") for i in range(1, 16, 2)), outcomes

        admin.load_sae(str(root / "u-narrow"), id="u")  # same id, another width
        with pytest.raises(rc.InvalidArgument, match="out of range"):
            list(admin.generate("x", interventions=[rc.clamp("u", 200, 8.0)]))
        toks = list(admin.generate("The quick brown fox", max_tokens=4, ignore_eos=True,
                                   interventions=[rc.clamp("u", 60, 8.0)], readouts=rc.readouts(saes=["u"], top_k=2)))
        assert len(toks) == 4 and all(t.readout("u") and max(f for f, _ in t.readout("u").top) < 64 for t in toks)
        admin.unload_sae("u")
    parser.limits = limits
    assert running_after_settling(server.server.engine) == 0


def test_unloading_an_sae_with_its_requests_queued_fails_each_at_its_first_token(backend, server, model):
    """The engine paused, 8 requests (4 steer with `u`) queued in it, `u` unloaded, the engine resumed:
    each request that uses `u` ends FAILED_PRECONDITION before any token of it is streamed, the others
    finish. No step can run in between, so this holds at any speed."""
    _, sae = model
    make_sae(sae.parent / "u-queued", "blocks.1.hook_resid_post", d_sae=128, seed=5)
    engine, service = server.server.engine, server.server.core
    outcomes: dict[int, tuple[str, int]] = {}
    with rc.Client(server.address, timeout=120) as admin:
        admin.load_sae(str(sae.parent / "u-queued"), id="u")
        server.call(engine.pause())
        try:
            def one(i):
                got = 0
                try:
                    with rc.Client(server.address, timeout=120) as c:
                        for _ in c.generate("The quick brown fox", max_tokens=6, ignore_eos=True,
                                            interventions=[rc.clamp("u", 7, 8.0)] if i % 2 else []):
                            got += 1
                    outcomes[i] = ("finished", got)
                except rc.RudderError as e:
                    outcomes[i] = (f"{type(e).__name__}: {e.details}", got)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            wait_for(lambda: service.in_flight == 8, "8 requests admitted")
            admin.unload_sae("u")
        finally:
            server.call(engine.resume())
        for t in threads:
            t.join(timeout=120)
    print(f"\n{backend}: unload with requests queued: {outcomes}")
    assert all(outcomes[i] == ("finished", 6) for i in range(0, 8, 2)), outcomes
    assert all(outcomes[i][0].startswith("FailedPrecondition") and "unloaded" in outcomes[i][0]
               and outcomes[i][1] == 0 for i in range(1, 8, 2)), outcomes
    assert running_after_settling(engine) == 0


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def test_a_front_end_killed_with_sigkill_takes_its_engine_with_it(backend, model):
    """`kill -9` of `rudder serve` (an OOM kill, a crash): vLLM's EngineCore and workers notice the front
    end is gone (rudder.server.backends.vllm_worker.watch_front_end) and end, leaving nothing of the
    server's session running to hold its memory."""
    if backend != "vllm":
        pytest.skip("the reference engine runs in the server's own process")
    import psutil

    proc, _ = serve_process(backend, model)
    session = os.getsid(proc.pid)  # serve_process starts it in a session of its own
    engine = psutil.Process(proc.pid).children(recursive=True)
    assert engine, "vLLM started no engine process"

    def left() -> list[int]:
        alive = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if p.pid != proc.pid and os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return alive

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    try:
        wait_for(lambda: not left(), "no process of the killed server's session left", ceiling=10.0)
    finally:
        for pid in left():  # do not leave an orphan engine to the next test
            os.kill(pid, signal.SIGKILL)
    print(f"\nfront end killed: its {len(engine)} engine processes gone after {time.monotonic() - killed:.1f} s")


def test_killing_the_vllm_engine_turns_health_off_fails_streams_and_exits(backend, model):
    if backend != "vllm":
        pytest.skip("the reference engine runs in the server's own process")
    import psutil

    proc, address = serve_process(backend, model)
    try:
        # Each stream generates request after request until one fails. The engine is frozen (SIGSTOP)
        # before it is killed, so every stream's last request is in flight at the kill, however fast
        # the tiny model is (killing while streams ran let all of them finish first on a loaded CI).
        errors: list[tuple[str, int]] = []  # (outcome, requests that finished before it)
        started = threading.Semaphore(0)

        def one():
            done = 0
            try:
                with rc.Client(address, timeout=120) as c:
                    while True:
                        toks = 0
                        for toks, _ in enumerate(c.generate("The quick brown fox", max_tokens=60, ignore_eos=True,
                                                            interventions=[rc.clamp("s", 3, 5.0)]), 1):
                            if done == 0 and toks == 1:
                                started.release()
                        assert toks == 60, f"a stream ended after {toks} of 60 tokens without a status"
                        done += 1
            except rc.RudderError as e:
                errors.append((type(e).__name__, done))

        streams = [threading.Thread(target=one) for _ in range(4)]
        for t in streams:
            t.start()
        for _ in streams:
            assert started.acquire(timeout=60)
        core = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
                or "EngineCore" in p.name()]
        assert core, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        for p in core:
            os.kill(p.pid, signal.SIGSTOP)
        time.sleep(1.0)  # every stream is now waiting on the frozen engine
        assert all(t.is_alive() for t in streams)
        killed = time.monotonic()
        for p in core:
            os.kill(p.pid, signal.SIGKILL)
        not_serving = None
        while time.monotonic() - killed < 30 and not_serving is None:
            try:
                if health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    not_serving = time.monotonic() - killed
            except grpc.RpcError:  # the server already stopped: it went NOT_SERVING before that
                not_serving = time.monotonic() - killed
            time.sleep(0.2)
        code = proc.wait(timeout=60)
        for t in streams:
            t.join(timeout=60)
        print(f"\nengine killed: NOT_SERVING after {not_serving:.1f}s, exit code {code}, in-flight streams "
              f"{collections.Counter(e for e, _ in errors)}, requests finished before {[n for _, n in errors]}")
        assert not_serving is not None and not_serving < 10
        assert code == ENGINE_DIED_EXIT
        assert not any(t.is_alive() for t in streams)
        assert len(errors) == 4 and all(e == "Unavailable" for e, _ in errors), errors
    finally:
        if proc.poll() is None:
            proc.kill()
