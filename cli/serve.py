"""`rudder serve`: the gRPC steering server, made from a ServeConfig (rudder.server.config).

    rudder serve [--model PATH] [--sae [NAME=]PATH ...] [--backend auto|vllm|reference] [--host H] [--port 50051]
                 [--steer-sites SITE ...] [-- VLLM_ENGINE_FLAGS]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rudder.cli.common import add_config_arguments, config_from_args
from rudder.server.config import ServeConfig

if TYPE_CHECKING:
    from rudder.server.backends.base import Engine

log = logging.getLogger("rudder")


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the gRPC steering server", description=ServeConfig.__doc__)
    add_config_arguments(s, ServeConfig)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(config_from_args(ServeConfig, args))


def model_and_saes(cfg: ServeConfig) -> tuple[Path, str, list[str]]:
    """The model folder, its served name and the SAE specs: the default model and its shipped SAEs
    when `cfg.model` is None."""
    from rudder.core.default_model import MODEL_NAME, default_sae_dirs, default_sae_root, ensure_default_model

    saes = list(cfg.saes)
    if cfg.model is None:
        if not saes:
            saes = [str(p) for p in default_sae_dirs()]
            if not saes:
                log.warning("no default SAE found in %s (a source checkout's models/default-saes; set "
                            "RUDDER_DEFAULT_SAES or pass --sae): serving the model without one", default_sae_root())
        return ensure_default_model(download=False), MODEL_NAME, saes
    if not (cfg.model / "config.json").exists():
        raise SystemExit(f"error: {cfg.model} is not a Hugging Face model folder (no config.json)")
    return cfg.model, cfg.model.name, saes


def choose_backend(model_dir: Path) -> str:
    """`--backend auto`: vLLM where it is installed and serves the model's family (the production
    path), else the reference backend."""
    import json

    from rudder.core.errors import ArtifactError
    from rudder.core.hf_sites import family_error
    from rudder.server.backends.vllm_compat import check_vllm

    try:
        check_vllm()
    except ArtifactError as e:
        log.info("backend: reference (%s)", e)
        return "reference"
    family = json.loads((model_dir / "config.json").read_text()).get("model_type")
    error = family_error(family, vllm=True)
    if error and not family_error(family, vllm=False):
        log.info("backend: reference (%s)", error)
        return "reference"
    log.info("backend: vllm (vLLM is installed; --backend reference serves with the reference backend)")
    return "vllm"


def load_engine(cfg: ServeConfig) -> tuple[Engine, str]:
    """The engine `cfg` asks for, its model and artifacts loaded, and the model's served name."""
    from rudder.core.errors import RudderError

    model_dir, name, saes = model_and_saes(cfg)
    backend = cfg.backend if cfg.backend != "auto" else choose_backend(model_dir)
    vllm_only = [flag for flag, given in (("vLLM flags after --", cfg.vllm_args), ("--steer-sites", cfg.steer_sites),
                                          ("--tensor-parallel-size", cfg.tensor_parallel_size > 1)) if given]
    if backend == "reference" and vllm_only:
        raise SystemExit(f"error: {', '.join(vllm_only)} are for the vLLM backend, but this server runs the "
                         f"reference backend (see the log line above, or pass --backend vllm)")
    vectors = list(cfg.vectors)
    if cfg.model is None and not vectors:  # the default model serves its shipped vectors by name
        from rudder.core.default_model import default_vector_dirs

        vectors = [str(p) for p in default_vector_dirs()]
    try:
        engine = _engine(cfg, backend, model_dir, saes, vector_sites(vectors))
        for spec in vectors:
            engine.artifacts.add_vector(spec, engine.shape)
        return engine, name
    except RudderError as e:
        raise SystemExit(f"error: {e}") from None


def vector_sites(specs: list[str]) -> list[str]:
    """The sites of the steering vectors `[NAME=]PATH` (the vLLM backend places its op there)."""
    from rudder.core.vectors import load_vector, named

    return [load_vector(named(spec)[1]).site for spec in specs]


def _engine(cfg: ServeConfig, backend: str, model_dir: Path, saes: list[str], extra_sites: list[str]) -> Engine:
    import torch

    if backend == "vllm":
        from rudder.server.backends.vllm import VllmEngine

        # vLLM's own defaults unless asked otherwise: the engine `vllm serve` would run
        sites = list(dict.fromkeys([*cfg.steer_sites, *extra_sites]))
        return VllmEngine(model_dir, saes, dtype=cfg.dtype, max_num_seqs=cfg.max_batch, max_model_len=None,
                          gpu_memory_utilization=None, enable_prefix_caching=cfg.prefix_caching, steer_sites=sites,
                          vllm_args=cfg.vllm_args, **({"tensor_parallel_size": cfg.tensor_parallel_size}
                                                      if cfg.tensor_parallel_size > 1 else {}))
    from rudder.server.backends.reference import ReferenceEngine

    dtype = getattr(torch, "float32" if cfg.dtype == "auto" else cfg.dtype)
    return ReferenceEngine(model_dir, saes, device=cfg.device, dtype=dtype, max_batch=cfg.max_batch or 32)


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise SystemExit(f"error: {path} is empty")
    return token


def serve(cfg: ServeConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight streams for `cfg.grace` seconds."""
    import torch

    from rudder.server.app import RudderServer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    token = read_token(cfg.auth_token_file)
    engine, name = load_engine(cfg)

    async def run() -> int:  # grpc.aio objects belong to the loop they are made in
        try:
            server = RudderServer.from_config(engine, name, cfg, token)
        except OSError as e:  # a port in use: before any engine process starts
            raise SystemExit(f"error: {e}") from None
        return await server.run_until_signal(cfg.grace)

    return asyncio.run(run())
