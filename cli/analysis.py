"""`rudder analyze lib|polysemanticity|tokfsm|tokfsm-codes` and `rudder dashboard`.

    rudder analyze lib --layer 15 --out lib-l15
    rudder analyze polysemanticity --sae PATH --out poly.json
    rudder analyze output-scores --sae PATH
    rudder analyze tokfsm MODEL_DIR
    rudder analyze tokfsm-codes MODEL_DIR [--jsd]
    rudder dashboard --sae PATH --out DIR [--features 12,40]

The flags come from the configs in rudder.analysis.config; the work is done in
rudder.analysis (and, for TokFSM models, rudder.training.tokfsm / tokfsm_codes).
"""

from __future__ import annotations

import argparse
import json

from rudder.analysis.config import (
    DashboardConfig,
    LibConfig,
    OutputScoresConfig,
    PolysemanticityConfig,
    TokFSMCodesConfig,
    TokFSMMetricsConfig,
)
from rudder.cli.common import add_config_arguments, config_from_args, offline, summary


@offline
def cmd_lib(args: argparse.Namespace) -> int:
    from rudder.analysis.lib import run

    run(config_from_args(LibConfig, args))
    return 0


@offline
def cmd_polysemanticity(args: argparse.Namespace) -> int:
    from rudder.analysis.polysemanticity import run

    run(config_from_args(PolysemanticityConfig, args))
    return 0


@offline
def cmd_output_scores(args: argparse.Namespace) -> int:
    from rudder.analysis.output_scores import run

    run(config_from_args(OutputScoresConfig, args))
    return 0


@offline
def cmd_tokfsm(args: argparse.Namespace) -> int:
    from rudder.training.tokfsm import model_metrics

    print(json.dumps(model_metrics(config_from_args(TokFSMMetricsConfig, args).model), indent=2))
    return 0


@offline
def cmd_tokfsm_codes(args: argparse.Namespace) -> int:
    from rudder.training import tokfsm_codes, tokfsm_patching

    cfg = config_from_args(TokFSMCodesConfig, args)
    if cfg.jsd:
        tokfsm_patching.run(cfg.model, cfg.jsd_json, cfg.jsd_png)
    else:
        tokfsm_codes.run(cfg.model, cfg.min_recall, cfg.trials)
    return 0


@offline
def cmd_dashboard(args: argparse.Namespace) -> int:
    from rudder.analysis.dashboard import run

    print(f"wrote {run(config_from_args(DashboardConfig, args))}")
    return 0


ANALYSES = {
    "lib": (LibConfig, cmd_lib),
    "polysemanticity": (PolysemanticityConfig, cmd_polysemanticity),
    "output-scores": (OutputScoresConfig, cmd_output_scores),
    "tokfsm": (TokFSMMetricsConfig, cmd_tokfsm),
    "tokfsm-codes": (TokFSMCodesConfig, cmd_tokfsm_codes),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    an = sub.add_parser("analyze", help="analysis methods: LIB, polysemanticity (neuron embeddings), TokFSM codes")
    asub = an.add_subparsers(dest="what", required=True)
    for name, (config, cmd) in ANALYSES.items():
        p = asub.add_parser(name, help=summary(config), description=config.__doc__)
        add_config_arguments(p, config)
        p.set_defaults(func=cmd)
    db = sub.add_parser("dashboard", help=summary(DashboardConfig), description=DashboardConfig.__doc__)
    add_config_arguments(db, DashboardConfig)
    db.set_defaults(func=cmd_dashboard)
