"""A rollout behind a real L7 load balancer drops nothing: two `rudder serve` replicas behind nginx
(Debian's package: `grpc_pass` for gRPC, `proxy_pass` for the OpenAI door), 200 mixed streams,
one replica sent SIGTERM and started again while they run."""

from __future__ import annotations

import collections
import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rudder import client as rc
from rudder.client.errors import Cancelled
from tests.server.engines import wait_for
from tests.server.test_process import free_port, wait_until_serving
from tests.tiny import make_sae

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
STREAMS, THREADS, TOKENS = 200, 8, 12

NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    # max_fails=0: a replica that refused connections while it restarted is tried again at once
    upstream rudder_grpc {{ server 127.0.0.1:{a} max_fails=0; server 127.0.0.1:{b} max_fails=0; }}
    upstream rudder_door {{ server 127.0.0.1:{a_door} max_fails=0; server 127.0.0.1:{b_door} max_fails=0; }}
    server {{
        listen 127.0.0.1:{grpc} http2;
        location / {{ grpc_pass grpc://rudder_grpc; grpc_next_upstream error timeout; grpc_read_timeout 120s; }}
    }}
    server {{
        listen 127.0.0.1:{door};
        location / {{ proxy_pass http://rudder_door; proxy_http_version 1.1; proxy_buffering off; }}
    }}
}}
"""


class Replica:
    def __init__(self, model: Path, sae: Path, log: Path):
        self.model, self.sae, self.log = model, sae, log
        self.port, self.door, self.metrics = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rudder.cli", "serve", "--backend", "reference", "--model", str(self.model),
             "--sae", f"s={self.sae}", "--port", str(self.port), "--openai-port", str(self.door),
             "--metrics-port", str(self.metrics), "--metrics-host", "127.0.0.1", "--grace", "60"],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until_serving(self.proc, f"127.0.0.1:{self.port}"):
            self.proc.kill()
            pytest.fail(f"a replica did not start:\n{self.log.read_text()[-3000:]}")

    def served(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "rudder:requests_total" and s.labels.get("method") == "Generate"
                   and s.labels.get("code") == "OK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def fleet(tiny_dir, tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light) and could not be started")
    sae = tmp_path / "s"
    make_sae(sae, "blocks.1.hook_resid_post")
    a, b = Replica(tiny_dir, sae, tmp_path / "a.log"), Replica(tiny_dir, sae, tmp_path / "b.log")
    grpc_port, door_port = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, a=a.port, b=b.port, a_door=a.door, b_door=b.door,
                                      grpc=grpc_port, door=door_port))
    nginx = None
    try:
        a.start()
        b.start()
        nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{grpc_port}"
        wait_for(lambda: nginx.poll() is not None or _answers(address), "nginx proxying to the replicas")
        if nginx.poll() is not None:
            pytest.fail(f"nginx did not start: {nginx.stdout.read().decode()}")
        yield a, b, address, f"http://127.0.0.1:{door_port}"
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        a.stop()
        b.stop()


def _answers(address: str) -> bool:
    try:
        with rc.Client(address, timeout=5) as c:
            c.model_info()
        return True
    except rc.RudderError:
        return False


def _door_completion(url: str) -> dict:
    model = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=60).read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "The quick", "max_tokens": 4, "rudder": {
        "interventions": [{"feature": {"sae": "s", "feature": 3, "clamp": 4.0}}]}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def test_a_rolling_restart_behind_nginx_drops_no_stream(fleet):
    a, b, address, door = fleet
    kinds = {"plain": {}, "steered": {"interventions": [rc.clamp("s", 3, 4.0)]},
             "readouts": {"readouts": rc.readouts(saes=["s"], top_k=2)}}
    outcomes: collections.Counter = collections.Counter()
    cut: list[str] = []
    lock = threading.Lock()
    sent = threading.Semaphore(0)
    next_stream = iter(range(STREAMS))
    back = threading.Event()  # the second half waits for the restarted replica, so both serve a share

    def worker() -> None:
        with rc.Client(address, timeout=120) as c:
            for i in iter(lambda: next(next_stream, None), None):
                if i >= STREAMS // 2:
                    back.wait()
                kind = list(kinds)[i % 3]
                got, stop = 0, None
                try:
                    for tok in c.generate("The quick brown fox", max_tokens=TOKENS, ignore_eos=True, **kinds[kind]):
                        got, stop = got + 1, tok.stop_reason
                    outcome = "finished" if got == TOKENS and stop == "length" else "cut"
                except (rc.Unavailable, Cancelled):
                    # refused before a token, the SDK's retry spent too (a draining server's gRPC core
                    # cancels the calls it had queued but not started: nginx passes on CANCELLED)
                    outcome = "refused before a token" if got == 0 else "cut"
                except rc.RudderError as e:
                    outcome = f"cut: {type(e).__name__}"
                with lock:
                    outcomes[outcome] += 1
                    if outcome.startswith("cut"):
                        cut.append(f"stream {i} ({kind}): {outcome} after {got} tokens")
                sent.release()

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for _ in range(STREAMS // 4):  # a quarter of the streams done: roll replica a
        sent.acquire()
    served_before = a.served()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(120) == 0, "the draining replica did not exit cleanly"
    a.start()  # the same ports: nginx's upstream comes back
    back.set()
    assert _door_completion(door)["choices"][0]["text"] is not None  # the door through nginx, steered
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    shares = (served_before + a.served(), b.served())
    print(f"\n{dict(outcomes)}; replica a served {shares[0]:.0f} (then restarted), b {shares[1]:.0f}")
    assert not cut, cut[:5]
    assert sum(outcomes.values()) == STREAMS
    assert outcomes["finished"] >= STREAMS - 5, outcomes  # refused before a token only as the SDK retries run out
    assert min(shares) >= 0.1 * STREAMS, shares
