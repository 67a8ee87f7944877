"""Sync and asyncio clients.

    from rudder.client import Client, clamp, readouts
    with Client("127.0.0.1:50051") as c:
        for tok in c.generate("Hello", interventions=[clamp("resid15", 123, 8.0)],
                              readouts=readouts(saes=["resid15"], top_k=5)):
            print(tok.text, tok.readouts)
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

import grpc

from rudder.client.errors import from_rpc_error
from rudder.client.types import Token
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc

Chat = Sequence[dict[str, str]]


def build_generate(prompt: str | None = None, chat: Chat | None = None, *, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                   presence_penalty: float | None = None, frequency_penalty: float | None = None,
                   repetition_penalty: float | None = None, min_p: float | None = None,
                   logit_bias: dict[int, float] | None = None, logprobs: int = 0,
                   interventions: Sequence[pb.Intervention] = (), readouts: pb.ReadoutRequest | None = None,
                   include_baseline: bool = False, guards: Sequence[pb.FeatureGate] = ()) -> pb.GenerateRequest:
    """Sampling as vLLM's SamplingParams: penalties (presence and frequency in [-2, 2], repetition > 0),
    `min_p`, `logit_bias` (token id -> [-100, 100]); `logprobs=N` gives each token its N
    likeliest alternatives (`Token.top_logprobs`)."""
    req = pb.GenerateRequest(interventions=interventions, readouts=readouts, include_baseline=include_baseline,
                             guards=guards)
    _set_input(req, prompt, chat)
    s = req.sampling
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("repetition_penalty", repetition_penalty),
                        ("min_p", min_p)):
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(stop)
    s.ignore_eos = ignore_eos
    s.logit_bias.update(logit_bias or {})
    s.logprobs = logprobs
    return req


def build_trace(prompt: str | None = None, chat: Chat | None = None, *,
                interventions: Sequence[pb.Intervention] = (), readouts: pb.ReadoutRequest | None = None
                ) -> pb.TraceRequest:
    req = pb.TraceRequest(interventions=interventions, readouts=readouts)
    _set_input(req, prompt, chat)
    return req


def _set_input(req, prompt: str | None, chat: Chat | None) -> None:
    if (prompt is None) == (chat is None):
        raise ValueError("give exactly one of prompt and chat")
    if prompt is not None:
        req.prompt = prompt
    else:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in chat)


def build_list_features(source: str, label: str = "", regex: str = "", limit: int = 20, offset: int = 0,
                        min_precision: float = 0.0, min_recall: float = 0.0, says: str = "") -> pb.ListFeaturesRequest:
    return pb.ListFeaturesRequest(source=source, label=label, regex=regex, limit=limit, offset=offset,
                                  min_precision=min_precision, min_recall=min_recall, says=says)


def _token(msg: pb.GenerateResponse) -> Token:
    usage = msg.usage if msg.HasField("usage") else None
    return Token.from_pb(msg.token, msg.readouts, msg.baseline, msg.stop_reason, usage,
                         msg.guard if msg.HasField("guard") else None)


def _trace_tokens(resp: pb.TraceResponse) -> list[Token]:
    return [Token.from_pb(t.token, t.readouts) for t in resp.tokens]


def _best_feature(found: pb.ListFeaturesResponse, regex: str) -> tuple[pb.FeatureSummary | None, int]:
    pattern = re.compile(regex)
    best = max(found.features, default=None,
               key=lambda f: (sum(bool(pattern.search(e)) for e in f.top_examples), -f.density))
    return best, found.total


@contextmanager
def _typed_errors() -> Iterator[None]:
    """Every call of both clients runs inside this: a failed RPC becomes the typed `RudderError` for its
    status code (see errors.py). For a stream, the whole iteration runs inside it."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None
                    ) -> grpc.ChannelCredentials:
    """TLS to the server: `ca` (PEM file) to trust its certificate (default: the system's roots);
    `cert` + `key` (PEM files) to present a client certificate to a mutual-TLS server."""
    def read(path):
        return open(path, "rb").read() if path else None
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def channel_options(load_balancing: str = "round_robin", retry: bool = True) -> list[tuple[str, str]]:
    """The channel's service config. `load_balancing`: gRPC's policy over the addresses a target
    resolves to (`dns:///rudder-headless:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`):
    round_robin spreads calls over every replica, pick_first sends them all to one. `retry`: a call
    the server answers UNAVAILABLE or CANCELLED before its first response (a replica draining or still
    warming up; a draining gRPC server cancels the calls it had queued but not started, and a proxy
    such as nginx passes that on) is tried once more, on the next address; a stream that has begun is
    never replayed, and a call this client cancelled (or whose deadline passed) is not retried."""
    config: dict = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retry:
        config["methodConfig"] = [{
            "name": [{"service": "rudder.v1.Steering"}],
            "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}]
    return [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]


class Client:
    """Blocking client. `timeout` (seconds) is each call's deadline."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 load_balancing: str = "round_robin", retry: bool = True):
        """`target`: any gRPC target (`host:port`, `dns:///host:port`, `ipv4:a:p,b:p`); `credentials`: TLS
        (see `tls_credentials`); `token`: a bearer token for servers started with one; `load_balancing`
        and `retry`: see `channel_options`."""
        options = channel_options(load_balancing, retry)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.SteeringStub(self.channel)
        self.timeout = timeout
        self.metadata = _auth_metadata(token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc: grpc.UnaryUnaryMultiCallable, request, timeout: float | None = None):
        with _typed_errors():
            return rpc(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def generate(self, prompt: str | None = None, chat: Chat | None = None, *, timeout: float | None = None,
                 **kwargs) -> Iterator[Token]:
        """Stream tokens. Keyword arguments: see `build_generate`. Breaking out of the loop cancels the call."""
        call = self.stub.Generate(build_generate(prompt, chat, **kwargs), timeout=timeout or self.timeout,
                                  metadata=self.metadata)
        try:
            with _typed_errors():
                for msg in call:
                    yield _token(msg)
        finally:
            call.cancel()

    def trace(self, prompt: str | None = None, chat: Chat | None = None, *, timeout: float | None = None,
              **kwargs) -> list[Token]:
        return _trace_tokens(self._call(self.stub.Trace, build_trace(prompt, chat, **kwargs), timeout))

    def model_info(self) -> pb.ModelInfo:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    def list_features(self, source: str, label: str = "", regex: str = "", limit: int = 20, offset: int = 0,
                      min_precision: float = 0.0, min_recall: float = 0.0, says: str = "") -> pb.ListFeaturesResponse:
        """Features by label or regex; for a codebook with a code index, `regex` runs code search
        (codes ranked by precision, then recall, on the tokens where a match ends). `says`: SAE
        features whose logit-lens tokens match it, best output score first (they make the model say it)."""
        return self._call(self.stub.ListFeatures, build_list_features(source, label, regex, limit, offset,
                                                                      min_precision, min_recall, says))

    def best_feature(self, source: str, regex: str, limit: int = 1000) -> tuple[pb.FeatureSummary | None, int]:
        """The feature whose top examples match `regex` most often (ties: the rarer one), and how many
        features match at all. `[[ ]]` marks the activating token in top examples."""
        return _best_feature(self.list_features(source, regex=regex, limit=limit), regex)

    def best_feature_by_effect(self, source: str, says: str) -> tuple[pb.FeatureSummary | None, int]:
        """The feature with the highest output score among those whose logit-lens tokens match `says`,
        and how many match (the SAE needs `rudder analyze output-scores`)."""
        found = self.list_features(source, says=says, limit=1)
        return (found.features[0] if found.features else None), found.total

    def load_sae(self, path: str, id: str = "") -> pb.SaeInfo:
        """Admin: attach the SAE folder `path` (on the server's disk) as `id`; needs --allow-admin."""
        return self._call(self.stub.LoadSae, pb.LoadSaeRequest(path=path, id=id))

    def unload_sae(self, id: str) -> None:
        """Admin: detach an SAE; needs --allow-admin."""
        self._call(self.stub.UnloadSae, pb.UnloadSaeRequest(id=id))

    def load_vector(self, path: str, name: str = "") -> pb.VectorInfo:
        """Admin: load the steering vector at `path` (a folder or FILE.gguf[@LAYER] on the server's disk)
        as `name`, to steer with by name (`steer(name)`); needs --allow-admin."""
        return self._call(self.stub.LoadVector, pb.LoadVectorRequest(path=path, name=name))

    def unload_vector(self, name: str) -> None:
        """Admin: drop a steering vector; needs --allow-admin."""
        self._call(self.stub.UnloadVector, pb.UnloadVectorRequest(name=name))


class AsyncClient:
    """asyncio client with the same methods as `Client` (a test checks it)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 load_balancing: str = "round_robin", retry: bool = True):
        """As `Client`'s."""
        options = channel_options(load_balancing, retry)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.SteeringStub(self.channel)
        self.timeout = timeout
        self.metadata = _auth_metadata(token)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, rpc: grpc.aio.UnaryUnaryMultiCallable, request, timeout: float | None = None):
        with _typed_errors():
            return await rpc(request, timeout=timeout or self.timeout, metadata=self.metadata)

    async def generate(self, prompt: str | None = None, chat: Chat | None = None, *,
                       timeout: float | None = None, **kwargs) -> AsyncIterator[Token]:
        """Stream tokens. Keyword arguments: see `build_generate`. Leaving the loop early and closing
        the generator (`aclose`) cancels the call."""
        call = self.stub.Generate(build_generate(prompt, chat, **kwargs), timeout=timeout or self.timeout,
                                  metadata=self.metadata)
        try:
            with _typed_errors():
                async for msg in call:
                    yield _token(msg)
        finally:
            call.cancel()

    async def trace(self, prompt: str | None = None, chat: Chat | None = None, *,
                    timeout: float | None = None, **kwargs) -> list[Token]:
        return _trace_tokens(await self._call(self.stub.Trace, build_trace(prompt, chat, **kwargs), timeout))

    async def model_info(self) -> pb.ModelInfo:
        return await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    async def list_features(self, source: str, label: str = "", regex: str = "", limit: int = 20, offset: int = 0,
                            min_precision: float = 0.0, min_recall: float = 0.0, says: str = ""
                            ) -> pb.ListFeaturesResponse:
        """See `Client.list_features`."""
        return await self._call(self.stub.ListFeatures, build_list_features(source, label, regex, limit, offset,
                                                                            min_precision, min_recall, says))

    async def best_feature(self, source: str, regex: str, limit: int = 1000
                           ) -> tuple[pb.FeatureSummary | None, int]:
        """See `Client.best_feature`."""
        return _best_feature(await self.list_features(source, regex=regex, limit=limit), regex)

    async def best_feature_by_effect(self, source: str, says: str) -> tuple[pb.FeatureSummary | None, int]:
        """See `Client.best_feature_by_effect`."""
        found = await self.list_features(source, says=says, limit=1)
        return (found.features[0] if found.features else None), found.total

    async def load_sae(self, path: str, id: str = "") -> pb.SaeInfo:
        """Admin: attach the SAE folder `path` (on the server's disk) as `id`; needs --allow-admin."""
        return await self._call(self.stub.LoadSae, pb.LoadSaeRequest(path=path, id=id))

    async def unload_sae(self, id: str) -> None:
        """Admin: detach an SAE; needs --allow-admin."""
        await self._call(self.stub.UnloadSae, pb.UnloadSaeRequest(id=id))

    async def load_vector(self, path: str, name: str = "") -> pb.VectorInfo:
        """Admin: load the steering vector at `path` (a folder or FILE.gguf[@LAYER] on the server's disk)
        as `name`, to steer with by name (`steer(name)`); needs --allow-admin."""
        return await self._call(self.stub.LoadVector, pb.LoadVectorRequest(path=path, name=name))

    async def unload_vector(self, name: str) -> None:
        """Admin: drop a steering vector; needs --allow-admin."""
        await self._call(self.stub.UnloadVector, pb.UnloadVectorRequest(name=name))
