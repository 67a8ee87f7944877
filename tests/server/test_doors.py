"""Both doors answer a bad request alike: the same gRPC code, the HTTP status the one map
(server.policy) gives it, the same message, and one count each in `rudder:requests`."""

import json
import urllib.error
import urllib.request

import grpc
import pytest

from rudder import client as rc
from rudder.client.errors import RudderError as RudderClientError
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.policy import HTTP_STATUS
from rudder.server.requests import Limits

TOKEN = "doors-secret"


@pytest.fixture(scope="module")
def server(tiny_dir):
    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny", token=TOKEN, openai_port=0,
                          limits=Limits(max_tokens=8)) as srv:
        yield srv


def http(server, body: dict, token: str | None = TOKEN) -> tuple[int, str]:
    """POST /v1/completions: (status, error message)."""
    req = urllib.request.Request(f"http://127.0.0.1:{server.server.openai.port}/v1/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


def grpc_call(server, token: str | None = TOKEN, **kw) -> tuple[grpc.StatusCode, str]:
    with rc.Client(server.address, timeout=60, token=token, retry=False) as c:  # one call, counted once
        try:
            list(c.generate("Hello", **kw))
        except RudderClientError as e:
            return e.code, e.details
    return grpc.StatusCode.OK, ""


def requests_counted(server, method: str, code: str) -> float:
    return server.server.metrics.registry.get_sample_value("rudder:requests_total",
                                                           {"method": method, "code": code}) or 0.0


def both(server, body: dict, token: str | None = TOKEN, **grpc_kw):
    """The same request through each door: ((gRPC code, message), (HTTP status, message))."""
    return grpc_call(server, token, **grpc_kw), http(server, {"prompt": "Hello", **body}, token)


@pytest.mark.parametrize("case", ["unauthenticated", "over a per-request limit", "a bad field", "at capacity",
                                  "engine gone"])
def test_the_same_bad_request_gets_the_same_answer_at_both_doors(server, case):
    core = server.server.core
    token, body, kw = TOKEN, {"max_tokens": 2}, {"max_tokens": 2}
    if case == "unauthenticated":
        token = None
    elif case == "over a per-request limit":
        body, kw = {"max_tokens": 9}, {"max_tokens": 9}
    elif case == "a bad field":
        body, kw = {"max_tokens": 2, "temperature": 5}, {"max_tokens": 2, "temperature": 5.0}
    want = {"unauthenticated": ("UNAUTHENTICATED", 401), "over a per-request limit": ("RESOURCE_EXHAUSTED", 400),
            "a bad field": ("INVALID_ARGUMENT", 400), "at capacity": ("RESOURCE_EXHAUSTED", 429),
            "engine gone": ("UNAVAILABLE", 503)}[case]
    before = (requests_counted(server, "Generate", want[0]), requests_counted(server, "Completions", want[0]))
    saved = core.max_concurrent, core.dead
    try:
        if case == "at capacity":
            core.max_concurrent = 0
        elif case == "engine gone":
            core.dead = "the engine died; this server is stopping to be restarted: retry on another replica"
        (code, message), (status, http_message) = both(server, body, token, **kw)
    finally:
        core.max_concurrent, core.dead = saved
    assert code.name == want[0]
    assert status == want[1]
    assert message == http_message and message  # one message, which says what to do
    if want[0] != "RESOURCE_EXHAUSTED":
        assert status == HTTP_STATUS[want[0]]  # the one map (an over-limit request is 400: retrying will not help)
    after = (requests_counted(server, "Generate", want[0]), requests_counted(server, "Completions", want[0]))
    assert after == (before[0] + 1, before[1] + 1)


def test_a_good_request_is_counted_once_at_each_door(server):
    before = requests_counted(server, "Generate", "OK"), requests_counted(server, "Completions", "OK")
    assert grpc_call(server, max_tokens=2)[0] == grpc.StatusCode.OK
    assert http(server, {"prompt": "Hello", "max_tokens": 2})[0] == 200
    assert (requests_counted(server, "Generate", "OK"), requests_counted(server, "Completions", "OK")) == (
        before[0] + 1, before[1] + 1)
