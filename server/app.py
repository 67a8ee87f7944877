"""The grpc.aio server: the Steering service, health, reflection, error mapping, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rudder.server.artifact_set import POLL_S, ArtifactSet
from rudder.server.backends.base import Engine, EngineRequest, Sampling
from rudder.server.config import ServeConfig
from rudder.server.generation import GenerationCore
from rudder.server.metrics import Metrics
from rudder.server.policy import Policy, outcome
from rudder.server.requests import Limits
from rudder.server.service import SteeringService
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

WATCHDOG_S = 1.0  # how often the engine's health is checked
ENGINE_DIED_EXIT = 3  # `rudder serve`'s exit code when its engine died

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Steering"].full_name
_OUR_METHODS = f"/{SERVICE_NAME}/"


@dataclass(frozen=True)
class Tls:
    """Server TLS: PEM files. With `client_ca`, clients must present a certificate it signed (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path):
            return Path(path).read_bytes()
        return grpc.ssl_server_credentials([(read(self.key), read(self.cert))],
                                           root_certificates=read(self.client_ca) if self.client_ca else None,
                                           require_client_auth=self.client_ca is not None)


Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager]


def _wrap(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """The same handler, each call run inside `async with guard(context)`; for a stream, the whole
    iteration is inside it, so errors and cancellation while streaming reach the guard too."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        inner_unary = handler.unary_unary

        async def unary(request, context):
            async with guard(context):
                return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            async with guard(context), aclosing(inner_stream(request, context)) as items:
                async for item in items:
                    yield item

        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    # Passing it through unwrapped would skip the token check.
    raise TypeError("only unary-unary and unary-stream RPCs can be intercepted; the Steering service has no others")


class PolicyInterceptor(grpc.aio.ServerInterceptor):
    """The server's `Policy` on every Steering call: admitted (bearer token, warm-up) before the
    service runs, its domain errors answered with their status and message (anything else INTERNAL,
    logged, no traceback sent), and counted in `rudder:requests` by method and status code. Health
    and reflection are left alone, open for probes."""

    def __init__(self, policy: Policy):
        self.policy = policy

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_OUR_METHODS):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        authorization = dict(details.invocation_metadata or ()).get("authorization")

        @asynccontextmanager
        async def governed(context):
            code = "CANCELLED"  # unless it ends otherwise: the client went away
            try:
                self.policy.admit(authorization)
                yield
                code = "OK"
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except grpc.aio.AbortError:  # a handler chose its status itself
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception as e:  # noqa: BLE001 - every error is answered with its status
                out = outcome(e, details.method)
                code = out.code
                await context.abort(getattr(grpc.StatusCode, out.code), out.message)
            finally:
                self.policy.count(method, code)

        return _wrap(handler, governed)


class RudderServer:
    """A started server: `port` is the bound port (useful with port 0)."""

    def __init__(self, engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 50051,
                 limits: Limits = Limits(), max_concurrent: int = 256, allow_admin: bool = False,
                 metrics_port: int | None = None, metrics_host: str = "0.0.0.0", tls: Tls | None = None,
                 token: str | None = None, openai_port: int | None = None, artifact_set: Path | None = None,
                 artifact_set_poll_s: float = POLL_S, max_connection_age_s: float = 0.0):
        """`openai_port`: also serve the OpenAI-compatible door (rudder.server.openai_door) there, at `host`.
        `artifact_set`: the SAEs follow that file (rudder.server.artifact_set), read every `artifact_set_poll_s`.
        `max_connection_age_s`: a client's connection is asked to go away (GOAWAY) after this long, so a
        long-lived client reconnects and its balancer sees new replicas; its streams in flight finish (0: never)."""
        self.engine = engine
        self.metrics = Metrics()
        self.metrics.watch_engine(engine)
        # gRPC binds with SO_REUSEPORT by default: a second server on a port in use would start and share
        # its connections with the first (clients then reach either, at random). Off: the second fails to bind.
        options = [("grpc.so_reuseport", 0)]
        if max_connection_age_s:
            options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
        self.policy = Policy(self.metrics, token)
        self._watchdog: asyncio.Task | None = None
        self.server = grpc.aio.server(interceptors=[PolicyInterceptor(self.policy)], options=options)
        self.core = GenerationCore(engine, model_name, limits, max_concurrent, self.metrics)
        self.service = SteeringService(self.core, allow_admin, artifact_set)
        self.artifact_set = ArtifactSet(artifact_set, engine, artifact_set_poll_s) if artifact_set else None
        self._reconciler: asyncio.Task | None = None
        self.metrics_http = None
        self.metrics_port = None
        if metrics_port is not None:
            self.metrics_http, _ = self.metrics.serve(metrics_port, metrics_host)
            self.metrics_port = self.metrics_http.server_port
        pb_grpc.add_SteeringServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        try:
            self.port = (self.server.add_secure_port(f"{host}:{port}", tls.credentials()) if tls
                         else self.server.add_insecure_port(f"{host}:{port}"))
        except RuntimeError as e:  # grpcio's "Failed to bind": the cause is in its C log, not the exception
            raise OSError(f"could not bind {host}:{port}: the port is in use (is another server on it?) or the "
                          "address is not this machine's; pick another --port") from e
        self.address = f"{host}:{self.port}"
        self.openai = None
        if openai_port is not None:
            from rudder.server.openai_door import OpenAIDoor

            self.openai = OpenAIDoor(self.core, self.policy, tls)
        self._openai_bind = (host, openai_port)

    @classmethod
    def from_config(cls, engine: Engine, model_name: str, cfg: ServeConfig, token: str | None = None) -> RudderServer:
        """The server `rudder serve` runs: every setting from `cfg` (the token read from its file)."""
        tls = Tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None
        return cls(engine, model_name, cfg.host, cfg.port, Limits(max_tokens=cfg.max_tokens_limit),
                   cfg.max_concurrent, cfg.allow_admin, metrics_port=cfg.metrics, metrics_host=cfg.metrics_host,
                   tls=tls, token=token, openai_port=cfg.openai_port, artifact_set=cfg.artifact_set,
                   artifact_set_poll_s=cfg.artifact_set_poll_s, max_connection_age_s=cfg.max_connection_age)

    async def start(self, freeze_heap: bool = False) -> None:
        """Answer on the port at once (health NOT_SERVING, calls UNAVAILABLE "warming up"), start the
        engine, load the artifact set, serve one warm-up request, then report SERVING (`freeze_heap`: in
        a process of its own, first leave the start-up heap out of the GC, `freeze_startup_heap`)."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        await self.engine.start()
        if self.artifact_set is not None:  # the set's SAEs before the first call; its edits while serving
            await self.artifact_set.reconcile()
            self._reconciler = asyncio.create_task(self.artifact_set.watch())
        self.core.follow_context()
        await self._warm_up()
        if self.openai is not None:
            await self.openai.serve(*self._openai_bind)
        if freeze_heap:
            self.metrics.gc_frozen_objects.set(freeze_startup_heap())
        self.policy.ready = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.engine_healthy.set(1)
        self.engine_died = asyncio.Event()
        self._watchdog = asyncio.create_task(self._watch_engine())
        log.info("serving %s on %s (backend %s)", self.service.model_name, self.address, self.engine.name)

    async def _warm_up(self) -> None:
        """One short unsteered request through the engine: what the first caller would otherwise pay
        (lazy compilation, allocator growth) is paid before the server reports ready."""
        t0 = time.monotonic()
        try:
            ids = self.engine.tokenize("Hello") or [0]
        except Exception:  # noqa: BLE001 - a tokenizer without text (TokFSM): any id warms the engine
            ids = [0]
        async with aclosing(self.engine.generate(EngineRequest(ids, Sampling(max_tokens=2, ignore_eos=True)))) as s:
            async for _ in s:
                pass
        log.info("warm-up request served in %.1f s", time.monotonic() - t0)

    async def _watch_engine(self) -> None:
        """Once the engine dies (it will not serve again): health NOT_SERVING, new calls UNAVAILABLE (the
        engine's own error fails the calls in flight), and `engine_died` set for `run_until_signal`
        to stop the process with a non-zero exit, so that Kubernetes restarts it."""
        while self.engine.healthy():
            await asyncio.sleep(WATCHDOG_S)
        log.error("the %s engine died; reporting NOT_SERVING and stopping (exit code %d)", self.engine.name,
                  ENGINE_DIED_EXIT)
        self.metrics.engine_healthy.set(0)
        self.core.dead = "the engine died; this server is stopping to be restarted: retry on another replica"
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine_died.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Drain: report NOT_SERVING, let in-flight streams finish within `grace`, then stop."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reconciler is not None:
            self._reconciler.cancel()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine.healthy():  # a paused engine could not finish the streams drained below
            await self.engine.resume()
        if self.openai is not None:  # both doors drain at once, within one grace
            await asyncio.gather(self.openai.stop(grace), self.server.stop(grace))
        else:
            await self.server.stop(grace)
        await self.engine.stop()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()

    async def run_until_signal(self, grace: float = 30.0) -> int:
        """Serve until SIGTERM or SIGINT (then drain for `grace` seconds: exit code 0) or until the
        engine dies (then stop at once: ENGINE_DIED_EXIT)."""
        await self.start(freeze_heap=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        signalled, died = asyncio.create_task(stop.wait()), asyncio.create_task(self.engine_died.wait())
        await asyncio.wait([signalled, died], return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        died.cancel()
        if self.engine_died.is_set():
            await self.stop(grace=1.0)
            return ENGINE_DIED_EXIT
        log.info("draining (grace %.0fs)", grace)
        await self.stop(grace)
        return 0


def freeze_startup_heap() -> int:
    """Leave what start-up made (the engine, the model's and tokenizer's Python objects, the artifacts:
    millions of objects) out of Python's garbage collection from now on, as `vllm serve` does once it is
    up: a full collection then walks only what serving allocates. Without it, under a readout load (each
    step's records allocate thousands of small objects), a full collection paused every stream of the
    server for about a second (measured: docs/benchmarks.md). For the process that serves until a signal,
    not for servers inside another program (`BackgroundServer`), whose heap is not theirs to freeze.
    Returns how many objects it froze (counted once here: `gc.get_freeze_count` walks them all, ~0.1 s
    for a server's heap, so a scrape must not ask it)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class BackgroundServer:
    """A server on its own event loop in a daemon thread (tests, notebooks, benchmarks).

        with BackgroundServer(engine, "tiny") as srv:
            Client(srv.address).generate(...)
    """

    def __init__(self, engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rudder-server", daemon=True)
        self.thread.start()

        async def start() -> RudderServer:
            server = RudderServer(engine, model_name, host, port, **kwargs)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.address = self.server.address

    def call(self, coro):
        """Run `coro` on the server's loop (where its engine lives, e.g. `srv.call(engine.pause())`)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
