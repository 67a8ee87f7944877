"""`rudder serve` as a real process: SIGTERM drains in-flight streams; the CLI steers through it."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rudder import client as rc
from rudder.client.cli import main as client_main
from tests.server.engines import wait_for

pytestmark = pytest.mark.slow  # `rudder serve` in a child process for each test


def _ports():
    """Ports below Linux's ephemeral range (which hands out the ports bind(0) and clients use), a block of
    its own for each pytest-xdist worker: a port the kernel gave this worker could otherwise be given to
    another worker too before this one's server binds it, and the second server would fail to start."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    yield from range(20000 + 400 * worker, 20400 + 400 * worker)


_free = _ports()


def free_port() -> int:
    """A port of this test worker's block that nothing listens on now."""
    for port in _free:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: past TIME_WAIT
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("this test worker used up its block of ports")


def wait_until_serving(proc: subprocess.Popen, address: str, timeout: float = 120) -> bool:
    """True once `rudder serve` at `address` answers; False if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with rc.Client(address, timeout=2) as c:
                c.model_info()
            return True
        except rc.RudderError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.3)


@pytest.fixture
def served(tiny_dir, tiny_sae_dir):
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rudder.cli", "serve", "--backend", "reference",
                             "--model", str(tiny_dir),
                             "--sae", f"s={tiny_sae_dir}", "--port", str(port), "--grace", "20",
                             "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    if not wait_until_serving(proc, address):
        proc.kill()
        pytest.fail(f"server did not start:\n{proc.stdout.read()}")
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield proc, address
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_sigterm_lets_the_in_flight_stream_finish(served):
    proc, address = served
    got, errors = [], []

    def stream():
        try:
            with rc.Client(address, timeout=60) as c:
                got.extend(c.generate("The quick brown fox", max_tokens=200, ignore_eos=True))
        except rc.RudderError as e:
            errors.append(e)

    t = threading.Thread(target=stream)
    t.start()
    while not got and t.is_alive():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    t.join(60)
    assert not errors and len(got) == 200 and got[-1].stop_reason == "length"
    assert proc.wait(30) == 0


def test_cli_generate_with_flags(served, capsys):
    _, address = served
    rc_ = client_main(["generate", "The capital of France", "--server", address, "--max-tokens", "3",
                       "--clamp", "s:3=25", "--readout", "s", "--top-k", "2", "--scope", "0:"])
    out = capsys.readouterr().out
    assert rc_ == 0 and out.count("s: 3=25.00") == 3
    assert client_main(["generate", "x", "--server", address, "--clamp", "s:9999=1"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_a_second_server_on_a_port_in_use_exits_instead_of_sharing_it(served, tiny_dir):
    """gRPC binds with SO_REUSEPORT by default, so a second `rudder serve` on a taken port would start and
    take part of the first one's connections at random. It exits at once with the port named instead."""
    proc, address = served
    port = address.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "rudder.cli", "serve", "--backend", "reference",
                             "--model", str(tiny_dir), "--port", port, "--metrics-port", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert f"error: could not bind 127.0.0.1:{port}: the port is in use" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert proc.poll() is None
    with rc.Client(address, timeout=60) as c:  # the first one serves on
        assert len(list(c.generate("x", max_tokens=2, ignore_eos=True))) == 2


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the Prometheus text at `url`, keyed by (name, sorted labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_metrics_are_scraped_over_http(served):
    proc, address = served
    before = scrape(proc.metrics_url)
    assert before[("rudder:artifacts_loaded", (("kind", "sae"),))] == 1
    assert before[("rudder:gc_frozen_objects", ())] > 10_000  # the start-up heap, out of the GC's way
    with rc.Client(address, timeout=60) as c:
        toks = list(c.generate("The capital of France", max_tokens=5, ignore_eos=True,
                               interventions=[rc.clamp("s", 3, 9.0), rc.add("s", 4, 1.0)],
                               readouts=rc.readouts(saes=["s"], top_k=2)))
        with pytest.raises(rc.NotFound):
            list(c.generate("x", interventions=[rc.clamp("nope", 1, 1.0)]))
    # The server counts an RPC as it closes, and the engine its wave as it ends, just after the client
    # has its last message: wait until every count the test reads has settled (the ceiling only names a hang).
    ok, not_found = (("code", "OK"), ("method", "Generate")), (("code", "NOT_FOUND"), ("method", "Generate"))
    after: dict = {}

    def settled() -> bool:
        after.clear()
        after.update(scrape(proc.metrics_url))
        return (after.get(("rudder:requests_total", ok), 0.0) > before.get(("rudder:requests_total", ok), 0.0)
                and after.get(("rudder:requests_total", not_found), 0.0)
                > before.get(("rudder:requests_total", not_found), 0.0)
                and after.get(("rudder:e2e_request_latency_seconds_count", ()), 0.0)
                > before.get(("rudder:e2e_request_latency_seconds_count", ()), 0.0)
                and after[("rudder:streams_in_flight", ())] == 0 and after[("rudder:num_requests_running", ())] == 0)

    wait_for(settled, "both RPCs counted and the engine idle in the scraped metrics")

    def grew(name, labels=()):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew("rudder:requests_total", (("code", "OK"), ("method", "Generate"))) == 1
    assert grew("rudder:requests_total", (("code", "NOT_FOUND"), ("method", "Generate"))) == 1
    assert grew("rudder:request_success_total", (("finished_reason", "length"),)) == 1
    assert grew("rudder:generation_tokens_total") == len(toks) == 5
    assert grew("rudder:prompt_tokens_total") == toks[-1].prompt_tokens
    assert grew("rudder:interventions_total", (("kind", "feature"),)) == 2
    assert grew("rudder:readout_rows_total") == 5
    assert grew("rudder:time_to_first_token_seconds_count") == 1
    assert grew("rudder:inter_token_latency_seconds_count") == 4
    assert grew("rudder:e2e_request_latency_seconds_count") == 1
    assert grew("rudder:request_queue_time_seconds_count") == 1
    assert grew("rudder:hook_time_per_step_seconds_count") >= 5  # prefill + 4 decode steps, at least
    assert after[("rudder:num_requests_running", ())] == 0
    assert after[("rudder:streams_in_flight", ())] == 0
