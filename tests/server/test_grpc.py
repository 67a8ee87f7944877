"""The real gRPC server on a loopback port, through the SDK and through a reflection-only client."""

import asyncio
import json

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rudder import client as rc
from rudder.core.feature_metadata import FEATURE_METADATA
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.requests import Limits
from rudder.v1 import steering_pb2 as pb


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_sae_dir):
    (tiny_sae_dir / FEATURE_METADATA).write_text(json.dumps({"features": [
        {"id": 3, "label": "French capitals", "density": 0.01, "top_examples": ["the capital of France is Paris"]},
        {"id": 4, "label": "animals", "density": 0.02, "top_examples": ["the quick brown fox"]},
    ]}))
    engine = ReferenceEngine(tiny_dir, saes=[f"s={tiny_sae_dir}"])
    with BackgroundServer(engine, "tiny", limits=Limits(max_interventions=4, max_tokens=64)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with rc.Client(server.address, timeout=60) as c:
        yield c


def test_streamed_generation_with_readouts_and_baseline(client):
    toks = list(client.generate("The capital of France", max_tokens=6, ignore_eos=True,
                                interventions=[rc.clamp("s", 3, 30.0)],
                                readouts=rc.readouts(saes=["s"], top_k=3), include_baseline=True))
    steered = [t for t in toks if not t.baseline]
    base = [t for t in toks if t.baseline]
    assert len(steered) == 6 and len(base) == 6
    assert steered[-1].stop_reason == "length" and steered[-1].completion_tokens == 6
    assert all(t.readout("s").top[0] == (3, 30.0) for t in steered)  # the clamp, read back at every token
    assert all(t.readout("s").top[0][0] != 3 or t.readout("s").top[0][1] != 30.0 for t in base)
    assert [t.id for t in steered] != [t.id for t in base]


def test_async_client_and_trace(server):
    async def go():
        async with rc.AsyncClient(server.address, timeout=60) as c:
            info = await c.model_info()
            toks = await c.trace("Steering a model", readouts=rc.readouts(saes=["s"], top_k=2))
            streamed = [t async for t in c.generate(chat=[{"role": "user", "content": "hi"}], max_tokens=3)]
            return info, toks, streamed
    info, toks, streamed = asyncio.run(go())
    assert info.backend == "reference" and info.saes[0].id == "s" and info.saes[0].d_sae == 256
    assert "blocks.1.attn.hook_z" in info.sites
    assert toks and all(t.is_prompt and len(t.readout("s").top) == 2 for t in toks)
    assert 1 <= len(streamed) <= 3


def test_list_features_by_label_and_regex(client):
    assert [f.id for f in client.list_features("s", label="capital").features] == [3]
    assert [f.id for f in client.list_features("s", regex=r"brown\s+fox").features] == [4]
    with pytest.raises(rc.InvalidArgument, match="does not compile"):
        client.list_features("s", regex="(")


BAD = [
    (dict(interventions=[rc.clamp("nope", 1, 1.0)]), rc.NotFound, "unknown SAE 'nope'"),
    (dict(interventions=[rc.clamp("s", 256, 1.0)]), rc.InvalidArgument, "out of range"),
    (dict(max_tokens=-1), rc.InvalidArgument, "max_tokens must be at least 1"),
    (dict(max_tokens=1000), rc.ResourceExhausted, "limit of 64"),
    (dict(interventions=[rc.clamp("s", 1, 1.0)] * 5), rc.ResourceExhausted, "limit of 4"),
    (dict(interventions=[rc.clamp("s", 1, 1.0, scope=pb.Scope(kind=pb.Scope.RANGE, start=5, end=2))]),
     rc.InvalidArgument, "RANGE scope"),
    (dict(interventions=[rc.direction(1.0, vector=[0.0] * 64, site="blocks.99.hook_resid_post")]),
     rc.InvalidArgument, "layers 0..2"),
    (dict(interventions=[rc.direction(1.0, vector=[0.0] * 64, site="blocks.1.hook_nowhere")]),
     rc.InvalidArgument, "unknown site"),
    (dict(interventions=[rc.direction(1.0, vector=[0.0] * 3, site="blocks.1.hook_resid_post")]),
     rc.InvalidArgument, "64 wide"),
    (dict(readouts=rc.readouts(saes=["s"], top_k=10_000)), rc.ResourceExhausted, "top_k"),
    (dict(temperature=-1.0), rc.InvalidArgument, "temperature"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(client, kwargs, error, message):
    with pytest.raises(error, match=message):
        list(client.generate("The capital of France", **kwargs))
    assert len(list(client.generate("The capital of France", max_tokens=2, ignore_eos=True))) == 2


def test_empty_prompt_and_missing_input(client, server):
    with pytest.raises(rc.InvalidArgument, match="prompt is empty"):
        list(client.generate("   "))
    stub = client.stub
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no input" in e.value.details()


def test_cancelled_stream_stops_and_others_continue(client, server):
    stream = client.generate("The quick brown fox", max_tokens=60, ignore_eos=True)
    next(stream)
    stream.close()  # cancels the call
    assert len(list(client.generate("Steering", max_tokens=3, ignore_eos=True))) == 3
    engine = server.server.engine
    for _ in range(100):
        if engine.running_requests() == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.running_requests() == 0


def test_health_and_a_generic_client_built_from_reflection_alone(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="rudder.v1.Steering"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (listing,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "rudder.v1.Steering" in [s.name for s in listing.list_services_response.service]
        (files,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="rudder.v1.Steering")]))
        pool = descriptor_pool.DescriptorPool()  # knows nothing but what the server said
        for raw in files.file_descriptor_response.file_descriptor_proto:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
        req_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("rudder.v1.GenerateRequest"))
        resp_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("rudder.v1.GenerateResponse"))
        call = ch.unary_stream("/rudder.v1.Steering/Generate", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
        req = req_cls(prompt="The capital of France")
        req.sampling.max_tokens = 3
        req.sampling.ignore_eos = True
        out = list(call(req, timeout=60))
        assert len(out) == 3 and out[-1].stop_reason == 1  # LENGTH


def test_admin_rpcs_load_and_unload_saes_only_when_allowed(client, tiny_dir, tmp_path):
    from tests.tiny import make_sae

    make_sae(tmp_path / "mlp0", "blocks.0.hook_mlp_out", seed=3)
    with pytest.raises(rc.PermissionDenied, match="--allow-admin"):
        client.load_sae(str(tmp_path / "mlp0"))
    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny", allow_admin=True) as srv, \
            rc.Client(srv.address, timeout=60) as admin:
        info = admin.load_sae(str(tmp_path / "mlp0"), "m0")
        assert (info.id, info.site, info.d_sae) == ("m0", "blocks.0.hook_mlp_out", 256)
        toks = list(admin.generate("The capital", max_tokens=3, interventions=[rc.clamp("m0", 7, 40.0)],
                                   readouts=rc.readouts(saes=["m0"], top_k=1)))
        assert all(t.readout("m0").top[0][0] == 7 for t in toks)
        with pytest.raises(rc.FailedPrecondition, match="two artifacts are named 'm0'"):
            admin.load_sae(str(tmp_path / "mlp0"), "m0")
        with pytest.raises(rc.FailedPrecondition, match="missing|not|no "):
            admin.load_sae(str(tmp_path / "nowhere"))
        admin.unload_sae("m0")
        with pytest.raises(rc.NotFound, match="unknown SAE 'm0'"):
            list(admin.generate("The capital", interventions=[rc.clamp("m0", 7, 40.0)]))
        with pytest.raises(rc.NotFound, match="no SAE 'm0' is loaded"):
            admin.unload_sae("m0")
        assert [s.id for s in admin.model_info().saes] == []


def test_a_denormal_temperature_samples_greedily_instead_of_failing(client):
    """Found by the fuzzer: logits / 1.4e-45 overflowed to inf and sampling failed INTERNAL."""
    greedy = [t.id for t in client.generate("The capital", max_tokens=4, ignore_eos=True)]
    tiny = [t.id for t in client.generate("The capital", max_tokens=4, ignore_eos=True, temperature=1.4013e-45)]
    assert tiny == greedy


def test_a_guard_stops_the_stream_where_its_feature_fires_and_a_condition_waits_for_it(client):
    """A one-position clamp makes feature 3 read 30 at position `at`: a guard on it stops the
    stream there (stop reason guard, the token chosen at `at` withheld); a clamp waiting for it
    changes nothing before and acts after."""
    prompt = "The capital of France"
    at = len([t for t in client.trace(prompt) if t.is_prompt]) + 2
    opens = rc.clamp("s", 3, 30.0, scope=rc.scope("range", at, at + 1))
    plain = list(client.generate(prompt, max_tokens=8, ignore_eos=True, interventions=[opens]))
    guarded = list(client.generate(prompt, max_tokens=8, ignore_eos=True, interventions=[opens],
                                   guards=[rc.guard("s", 3, 20.0)]))
    assert [t.id for t in guarded[:-1]] == [t.id for t in plain[:3]]
    last = guarded[-1]
    assert last.stop_reason == "guard" and last.id == -1 and last.text == ""
    assert last.guard[:2] == (0, at) and last.guard[2] == pytest.approx(30.0)
    assert last.completion_tokens == 3
    waited = list(client.generate(prompt, max_tokens=8, ignore_eos=True,
                                  interventions=[opens, rc.when(rc.clamp("s", 9, 60.0), "s", 3, 20.0)]))
    assert [t.id for t in waited[:4]] == [t.id for t in plain[:4]]
    assert [t.id for t in waited[4:]] != [t.id for t in plain[4:]]
    with pytest.raises(rc.InvalidArgument, match="guards\\[0\\].*feature 99999"):
        list(client.generate(prompt, max_tokens=2, guards=[rc.guard("s", 99999, 1.0)]))
