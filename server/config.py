"""The serving configuration: what `rudder serve` runs, and how.

    rudder serve --model PATH --sae resid15=PATH --backend vllm --port 50051

Every field is a flag of `rudder serve` (rudder.cli.serve); its docstring is the
flag's `--help`. A bad combination raises ValueError when the config is made, before
anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class ServeConfig:
    """Run the gRPC steering server: a model, its SAEs and codebooks, an engine, the server around it."""

    model: Path | None = None
    """Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)"""
    saes: list[str] = field(default_factory=list, metadata={"flag": "--sae", "metavar": "[NAME=]PATH"})
    """SAELens-format SAE folder, once per SAE (default, without --model: the SAEs shipped for the default model)"""
    vectors: list[str] = field(default_factory=list, metadata={"flag": "--vector", "metavar": "[NAME=]PATH"})
    """steering vector folder (`rudder train vector`) or FILE.gguf@LAYER, once per vector: clients steer with it
    by name (default, without --model: the vectors shipped for the default model)"""
    backend: Literal["auto", "reference", "vllm"] = "auto"
    """engine: vllm (vLLM, compiled; pip install -e '.[vllm]'), reference (transformers + hooks, anywhere;
    the oracle), or auto: vllm when vLLM is installed, else reference"""
    tensor_parallel_size: int = 1
    """vllm: GPUs per model replica"""
    steer_sites: list[str] = field(default_factory=list, metadata={"metavar": "SITE"})
    """vllm: a site to place the steering op at besides those of the SAEs and codebooks (for directions
    and SAEs loaded later), e.g. blocks.10.hook_resid_post; repeat for more"""
    vllm_args: list[str] = field(default_factory=list, metadata={"positional": True, "metavar": "-- VLLM_ARGS"})
    """vllm: vLLM's own engine flags after `--`, as `vllm serve` takes them (e.g. -- --max-model-len 4096
    --quantization fp8); they win over Rudder's defaults"""
    prefix_caching: bool = True
    """vllm: turn prefix caching off (on by default, salted per steering)"""
    host: str = "127.0.0.1"
    """address the gRPC server binds"""
    port: int = 50051
    """gRPC port (0: any free port)"""
    device: str = "cpu"
    """reference: torch device of the model and its artifacts"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the model runs in; auto: vLLM's choice for the vllm backend (it runs float32 checkpoints in
    bfloat16 where the hardware has it, as `vllm serve` does), float32 for the reference backend"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    max_batch: int | None = None
    """requests per batch (default: vLLM's own for the vllm backend, 32 for the reference backend)"""
    max_concurrent: int = 256
    """streams at once; more get RESOURCE_EXHAUSTED"""
    max_tokens_limit: int = 2048
    """largest max_tokens a request may ask"""
    metrics_port: int = 9400
    """Prometheus /metrics on this HTTP port (0: any free port, -1: off)"""
    metrics_host: str = "0.0.0.0"
    """address the metrics port binds"""
    openai_port: int | None = None
    """also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on
    this port, at --host (0: any free port); steering goes in the body's `rudder` object"""
    tls_cert: str | None = None
    """serve TLS with this certificate (PEM); needs --tls-key"""
    tls_key: str | None = None
    """the certificate's private key (PEM)"""
    tls_client_ca: str | None = None
    """mutual TLS: accept only clients with a certificate this CA signed"""
    auth_token_file: Path | None = None
    """require `authorization: Bearer <token>` (the file's content) on every Steering call; health and
    reflection stay open"""
    allow_admin: bool = False
    """allow the LoadSae / UnloadSae RPCs (attach SAE folders from this machine at run time)"""
    artifact_set: Path | None = None
    """serve the SAEs a file of NAME=PATH (or NAME=saelens:RELEASE/SAE_ID) lines names, and follow its edits
    (every replica of a deployment reads the same file); LoadSae / UnloadSae are then refused"""
    artifact_set_poll_s: float = 2.0
    """seconds between two reads of --artifact-set"""
    max_connection_age: float = 300.0
    """seconds a client's connection lives before the server asks it to reconnect (streams in flight finish),
    so long-lived clients rebalance over replicas that came up since (0: never)"""
    grace: float = 30.0
    """seconds in-flight streams get on SIGTERM"""

    def __post_init__(self) -> None:
        for name, low in (("tensor_parallel_size", 1), ("max_concurrent", 1),
                          ("max_tokens_limit", 1), ("threads", 0), ("port", 0), ("metrics_port", -1), ("grace", 0),
                          ("artifact_set_poll_s", 0.1), ("max_connection_age", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.openai_port is not None and self.openai_port < 0:
            raise ValueError(f"--openai-port must be at least 0, got {self.openai_port}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    @property
    def metrics(self) -> int | None:
        """The metrics port, or None when metrics are off."""
        return None if self.metrics_port < 0 else self.metrics_port
