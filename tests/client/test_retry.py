"""The SDK's retry policy against a real gRPC server on a loopback port: a call the server ends
UNAVAILABLE or CANCELLED before its first response (a replica draining: gRPC's core cancels the calls
it had queued but not started) is tried once more; a stream that has begun is never replayed."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from rudder.client.client import channel_options

METHOD = "/rudder.v1.Steering/Generate"


@pytest.fixture
def server():
    """A Generate that answers as the test says, call by call, and counts its calls."""
    calls: list[int] = []
    plan: list[str] = []
    lock = threading.Lock()

    def generate(request: bytes, context: grpc.ServicerContext):
        with lock:
            calls.append(1)
            what = plan[len(calls) - 1] if len(calls) <= len(plan) else "ok"
        if what == "ok":
            yield b"token"
        elif what == "token, then cancelled":
            yield b"token"
            context.abort(grpc.StatusCode.CANCELLED, "cut after its first token")
        else:  # a status before any response
            context.abort(getattr(grpc.StatusCode, what), "the server is stopping")

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("rudder.v1.Steering", {
        "Generate": grpc.unary_stream_rpc_method_handler(generate, request_deserializer=bytes,
                                                         response_serializer=bytes)})])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", plan, calls
    srv.stop(None)


def call(address: str, retry: bool = True) -> list[bytes]:
    with grpc.insecure_channel(address, options=channel_options(retry=retry)) as ch:
        stream = ch.unary_stream(METHOD, request_serializer=bytes, response_deserializer=bytes)
        return list(stream(b"", timeout=30))


@pytest.mark.parametrize("status", ["UNAVAILABLE", "CANCELLED"])
def test_a_call_ended_before_its_first_response_is_tried_once_more(server, status):
    address, plan, calls = server
    plan[:] = [status]
    assert call(address) == [b"token"] and len(calls) == 2
    plan[:] = [status, status]  # twice: the policy's two attempts are spent, the status reaches the caller
    calls.clear()
    with pytest.raises(grpc.RpcError) as e:
        call(address)
    assert e.value.code() == getattr(grpc.StatusCode, status) and len(calls) == 2
    plan[:] = [status]
    calls.clear()
    with pytest.raises(grpc.RpcError):  # retry=False: one attempt
        call(address, retry=False)
    assert len(calls) == 1


def test_a_stream_that_has_begun_is_never_replayed(server):
    address, plan, calls = server
    plan[:] = ["token, then cancelled"]
    with grpc.insecure_channel(address, options=channel_options()) as ch:
        stream = ch.unary_stream(METHOD, request_serializer=bytes, response_deserializer=bytes)(b"", timeout=30)
        assert next(stream) == b"token"
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED and len(calls) == 1
