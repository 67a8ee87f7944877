"""`rudder train sae|codebook|tokfsm` and `rudder convert-codebook`.

    rudder train sae --config sae.yaml --set objective=e2e --out PATH
    rudder train codebook --config cb.yaml --model DIR --out OUT
    rudder train tokfsm --out DIR [--steps 1500]
    rudder train vector --concept cats --words 'cats?|kittens?' --out DIR
    rudder convert-codebook REF_DIR --base BASE_DIR --out OUT_DIR

The flags come from the typed configs in rudder.training.config: the SAE and codebook
trainers read a YAML file (`--config`) overridden by `--set KEY=VALUE` and a few
shortcut flags; the TokFSM trainer has one flag per field.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel

from rudder.cli.common import add_config_arguments, config_values, offline
from rudder.core.errors import InvalidArgument
from rudder.training.config import (
    CodebookTrainConfig,
    SaeTrainConfig,
    TokFSMTrainConfig,
    VectorTrainConfig,
    load_config,
    validate,
)

SAE_SHORTCUTS = {"--model": "model", "--site": "sites", "--objective": "objective", "--architecture": "architecture",
                 "--d-sae": "d_sae", "--tokens": "tokens", "--corpus": "corpus", "--out": "out"}
CODEBOOK_SHORTCUTS = {"--model": "model", "--corpus": "corpus", "--out": "out"}
VECTOR_SHORTCUTS = {"--concept": "concept", "--words": "words", "--model": "model", "--site": "site",
                    "--method": "method", "--examples": "examples", "--budget": "budget", "--sae": "sae",
                    "--out": "out"}
"""flag -> the config field it sets (a list field takes comma-separated values)"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train artifacts offline")
    tsub = t.add_subparsers(dest="what", required=True)
    ts = tsub.add_parser("sae", help="an SAE: local, e2e or e2e_ds objective; ReLU+L1 or TopK",
                         description="Train an SAE on the offline corpus (see rudder.training.sae).")
    add_yaml_config_arguments(ts, SaeTrainConfig, SAE_SHORTCUTS)
    ts.set_defaults(func=cmd_train_sae)
    tc = tsub.add_parser("codebook", help="a codebook model: fine-tune a causal LM with codebook bottlenecks",
                         description="Codebook Features (see rudder.training.codebook).")
    add_yaml_config_arguments(tc, CodebookTrainConfig, CODEBOOK_SHORTCUTS)
    tc.set_defaults(func=cmd_train_codebook)
    tf = tsub.add_parser("tokfsm", help="the TokFSM base model (Codebook Features §4), from scratch",
                         description=TokFSMTrainConfig.__doc__)
    add_config_arguments(tf, TokFSMTrainConfig)
    tf.set_defaults(func=cmd_train_tokfsm)
    tv = tsub.add_parser("vector", help="a steering vector for a concept (trained, DiffMean, PCA), strength calibrated",
                         description=VectorTrainConfig.__doc__)
    add_yaml_config_arguments(tv, VectorTrainConfig, VECTOR_SHORTCUTS)
    tv.set_defaults(func=cmd_train_vector)

    ca = sub.add_parser("cache", help="write model activations to disk, to train SAEs from")
    casub = ca.add_subparsers(dest="what", required=True)
    cact = casub.add_parser("activations", help="the activations a local SAE run of this config draws",
                            description="Write an activation cache (see rudder.training.cache); train from it "
                                        "with `rudder train sae ... --set activations=DIR`.")
    add_yaml_config_arguments(cact, SaeTrainConfig, SAE_SHORTCUTS)
    cact.add_argument("--shard-tokens", type=int, default=1 << 18, help="rows per shard (default 262144)")
    cact.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="stored dtype (read back as float32)")
    cact.set_defaults(func=cmd_cache_activations)

    cc = sub.add_parser("convert-codebook", help="convert a codebook-features (reference code) checkpoint")
    cc.add_argument("ref", type=Path, help="the reference checkpoint folder")
    cc.add_argument("--base", type=Path, required=True, help="Hugging Face folder of the base model")
    cc.add_argument("--out", type=Path, required=True, help="codebook model folder to write")
    cc.set_defaults(func=cmd_convert_codebook)


# ---------------------------------------------------------------- YAML config + overrides


def add_yaml_config_arguments(p: argparse.ArgumentParser, schema: type[BaseModel], shortcuts: dict[str, str]) -> None:
    p.add_argument("--config", help=f"YAML file with {schema.__name__} fields (see rudder.training.config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, dotted for sections: --set loss.sparsity=2")
    for flag, key in shortcuts.items():
        field = schema.model_fields[key]
        listed = " (comma-separated)" if get_origin(field.annotation) is list else ""
        about = f": {field.description}" if field.description else ""
        p.add_argument(flag, dest=f"opt_{key}", metavar=key.upper(), default=None,
                       help=f"sets `{key}`{listed}{about}".replace("%", "%%"))


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` flags as a dict of dotted keys."""
    overrides: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise InvalidArgument(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def yaml_config_from_args(schema: type[BaseModel], shortcuts: dict[str, str], args: argparse.Namespace) -> Any:
    """`--config`, then `--set`, then the shortcut flags (the last word wins), validated against `schema`."""
    overrides: dict[str, Any] = parse_sets(args.set)
    for key in shortcuts.values():
        value = getattr(args, f"opt_{key}")
        if value is None:
            continue
        listed = get_origin(schema.model_fields[key].annotation) is list
        overrides[key] = [s.strip() for s in value.split(",")] if listed else value
    return load_config(args.config, overrides, schema=schema)


# ---------------------------------------------------------------- commands


@offline
def cmd_train_sae(args: argparse.Namespace) -> int:
    from rudder.training.sae import run

    run(yaml_config_from_args(SaeTrainConfig, SAE_SHORTCUTS, args))
    return 0


@offline
def cmd_cache_activations(args: argparse.Namespace) -> int:
    from rudder.training.cache import write

    cfg = yaml_config_from_args(SaeTrainConfig, SAE_SHORTCUTS, args)
    write(cfg, cfg.out, shard_tokens=args.shard_tokens, dtype=args.dtype)
    return 0


@offline
def cmd_train_codebook(args: argparse.Namespace) -> int:
    from rudder.training.codebook import run

    run(yaml_config_from_args(CodebookTrainConfig, CODEBOOK_SHORTCUTS, args))
    return 0


@offline
def cmd_train_tokfsm(args: argparse.Namespace) -> int:
    from rudder.training.tokfsm import run

    run(validate(TokFSMTrainConfig, config_values(TokFSMTrainConfig, args)))
    return 0


@offline
def cmd_train_vector(args: argparse.Namespace) -> int:
    from rudder.training.vectors import run

    run(yaml_config_from_args(VectorTrainConfig, VECTOR_SHORTCUTS, args), reference_server)
    return 0


@contextmanager
def reference_server(model: str):
    """A Rudder server on the reference backend for a training run's generations; gives its address."""
    from rudder.server.app import BackgroundServer
    from rudder.server.backends.reference import ReferenceEngine

    with BackgroundServer(ReferenceEngine(model), "vector") as srv:
        yield srv.address


@offline
def cmd_convert_codebook(args: argparse.Namespace) -> int:
    from rudder.training.convert_codebook import run

    run(args.ref, args.base, args.out)
    return 0
