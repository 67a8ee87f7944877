"""The `rudder` command.

    rudder fetch-default                  # once: download + convert the default model
    rudder serve [--model PATH] [--sae PATH ...] [--backend reference|vllm] [--host H] [--port 50051]
    rudder train sae|codebook|tokfsm ...  # offline training; rudder convert-codebook REF --base B --out O
    rudder analyze lib|polysemanticity|tokfsm|tokfsm-codes ...; rudder dashboard --sae PATH --out DIR
    rudder generate "..." --clamp SAE:FEATURE=VALUE --readout SAE      # see rudder-client
"""

from __future__ import annotations

import argparse
import logging

from rudder.cli import analysis, fetch, serve, train
from rudder.client.cli import add_client_commands, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rudder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, fetch, train, analysis):
        group.add_commands(sub)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))
