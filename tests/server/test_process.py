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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_dir, tiny_sae_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rudder.server.cli", "serve", "--model", str(tiny_dir),
                             "--sae", f"s={tiny_sae_dir}", "--port", str(port), "--grace", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with rc.Client(address, timeout=2) as c:
                c.model_info()
            break
        except rc.RudderError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
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
