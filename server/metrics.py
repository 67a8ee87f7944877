"""Prometheus metrics, served on their own HTTP port (`rudder serve --metrics-port`).

Names follow vLLM's (`vllm:time_to_first_token_seconds` → `rudder:time_to_first_token_seconds`),
plus steering's own. docs/serving.md lists every metric with its meaning.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

# vLLM's buckets for latencies, in seconds
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0, 640.0)
_STEP = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("rudder:requests", "Finished RPCs by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.request_success = Counter("rudder:request_success", "Generated sequences that ended normally, "
                                       "by stop reason (length, eos, stop)", ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("rudder:time_to_first_token_seconds", "Request received to first "
                                             "generated token sent", buckets=_LATENCY, registry=r)
        self.inter_token_latency = Histogram("rudder:inter_token_latency_seconds", "Time between two generated "
                                             "tokens of one sequence", buckets=_LATENCY, registry=r)
        self.e2e_request_latency = Histogram("rudder:e2e_request_latency_seconds", "Request received to its "
                                             "last token sent", buckets=_LATENCY, registry=r)
        self.request_queue_time = Histogram("rudder:request_queue_time_seconds", "Time a request waited in the "
                                            "engine before its first forward step", buckets=_LATENCY, registry=r)
        self.num_requests_running = Gauge("rudder:num_requests_running", "Requests in the engine's running "
                                          "batch", registry=r)
        self.num_requests_waiting = Gauge("rudder:num_requests_waiting", "Requests waiting for the engine",
                                          registry=r)
        self.prompt_tokens = Counter("rudder:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("rudder:generation_tokens", "Generated tokens streamed", registry=r)
        self.interventions = Counter("rudder:interventions", "Interventions in admitted requests, by kind "
                                     "(feature, direction, code)", ["kind"], registry=r)
        self.readout_rows = Counter("rudder:readout_rows", "Token readouts streamed (one per token and source)",
                                    registry=r)
        self.hook_time = Histogram("rudder:hook_time_per_step_seconds", "Time in Rudder's steering hooks per "
                                   "forward step that had steering or readout work", buckets=_STEP, registry=r)
        self.artifacts_loaded = Gauge("rudder:artifacts_loaded", "SAEs and codebooks attached to the model",
                                      ["kind"], registry=r)
        self.readouts_missing = Counter("rudder:readouts_missing", "Streams ended UNAVAILABLE because a step's "
                                        "readouts never reached the front end", registry=r)
        self.engine_healthy = Gauge("rudder:engine_healthy", "1 while the engine serves, 0 once it has died",
                                    registry=r)
        self.streams_in_flight = Gauge("rudder:streams_in_flight", "Generate and Trace calls being served",
                                       registry=r)
        self.gc_frozen_objects = Gauge("rudder:gc_frozen_objects", "Python objects of the server's start-up "
                                       "that its garbage collector skips (gc.freeze: 0 until it serves)", registry=r)

    def watch_engine(self, engine) -> None:
        """Gauges read from the engine at scrape time; the engine reports its hook time per step."""
        self.num_requests_running.set_function(lambda: engine.running_requests())
        self.num_requests_waiting.set_function(lambda: getattr(engine, "waiting_requests", lambda: 0)())
        self.artifacts_loaded.labels("sae").set_function(lambda: len(engine.artifacts.saes))
        self.artifacts_loaded.labels("codebook").set_function(lambda: len(engine.artifacts.codebooks))
        engine.on_hook_step = self.hook_time.observe
        self.registry.register(ArtifactInfo(engine))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a thread; returns (server, thread). Port 0 picks a free one."""
        return start_http_server(port, addr=host, registry=self.registry)


class ArtifactInfo:
    """`rudder:artifact_info{id, kind, generation, site, width}` = 1 for each artifact loaded, read at
    scrape time (as vLLM's `vllm:lora_requests_info` names its adapters): which replica serves what.
    The generation is a hash of the artifact's content (`core.artifacts.content_generation`), the
    same on every replica that loaded the same files; width: an SAE's latents, a codebook's codes,
    a vector's dimensions."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):  # no scrape at registration: the engine's artifacts may still be loading
        return [GaugeMetricFamily("rudder:artifact_info", "")]

    def collect(self):
        from rudder.core.artifacts import vector_generation

        info = GaugeMetricFamily("rudder:artifact_info", "Artifacts loaded (1 each): id, kind (sae, codebook, "
                                 "vector), generation (a hash of its content), site, width",
                                 labels=["id", "kind", "generation", "site", "width"])
        a = self.engine.artifacts
        for s in list(a.saes.values()):
            info.add_metric([s.id, "sae", f"{s.generation:015x}", s.site.name, str(s.cfg.d_sae)], 1)
        for c in list(a.codebooks.values()):
            info.add_metric([c.id, "codebook", f"{c.generation:015x}", c.site.name, str(c.codebook.cfg.num_codes)],
                            1)
        for name, v in list(a.vectors.items()):
            info.add_metric([name, "vector", f"{vector_generation(v):015x}", v.site, str(v.d_model)], 1)
        yield info
