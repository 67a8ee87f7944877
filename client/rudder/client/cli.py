"""Steer and watch activations from the shell.

    rudder generate "The capital of France is" --clamp resid15:123=8 --readout resid15 --top-k 5
    rudder trace "Hello world" --readout resid15 --top-k 3
    rudder info
    rudder features resid15 --regex "Paris"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict

from rudder.client import types as t
from rudder.client.client import Client, tls_credentials
from rudder.client.errors import RudderError

_FEATURE = re.compile(r"^(?P<sae>[^:]+):(?P<feature>\d+)(=(?P<value>[-+0-9.eE]+))?$")


def _feature_arg(text: str, need_value: bool) -> tuple[str, int, float]:
    m = _FEATURE.match(text)
    if not m or (need_value and m.group("value") is None):
        form = "SAE:FEATURE=VALUE" if need_value else "SAE:FEATURE"
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return m.group("sae"), int(m.group("feature")), float(m.group("value") or 0)


_GATE = re.compile(r"^(?P<sae>[^:]+):(?P<feature>\d+)>(?P<above>[-+0-9.eE]+)(@(?P<tokens>\d+))?$")


def _gate_arg(text: str) -> tuple[str, int, float, int | None]:
    m = _GATE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected SAE:FEATURE>VALUE (with --when, [@TOKENS]), got {text!r}")
    return m.group("sae"), int(m.group("feature")), float(m.group("above")), \
        int(m.group("tokens")) if m.group("tokens") else None


def _scope_arg(text: str):
    if text in ("all", "prompt", "generated"):
        return t.scope(text)
    m = re.match(r"^(\d+):(\d*)$", text)
    if not m:
        raise argparse.ArgumentTypeError(f"scope is all, prompt, generated or START:END, got {text!r}")
    return t.scope("range", int(m.group(1)), int(m.group(2) or 0))


def interventions_from(args) -> list:
    sc = args.scope
    out = []
    for name, build in (("clamp", t.clamp), ("add", t.add), ("scale", t.scale)):
        for spec in getattr(args, name):
            sae, feature, value = _feature_arg(spec, True)
            out.append(build(sae, feature, value, scope=sc))
    for spec in args.ablate:
        sae, feature, _ = _feature_arg(spec, False)
        out.append(t.ablate(sae, feature, scope=sc))
    for spec in args.direction:
        sae, feature, alpha = _feature_arg(spec, True)
        out.append(t.direction(alpha, sae=sae, feature=feature, scope=sc))
    for spec in getattr(args, "steer", []):
        name, _, alpha = spec.partition("=")
        try:
            out.append(t.steer(name, float(alpha) if alpha else None, scope=sc))
        except ValueError:
            raise SystemExit(f"--steer expects NAME or NAME=ALPHA, got {spec!r}") from None
    for spec in args.code:
        m = re.match(r"^([^:]+):(\d+):(\d+)(\*([-+0-9.eE]+))?$", spec)
        if not m:
            raise SystemExit(f"--code expects CODEBOOK:HEAD:CODE[*STRENGTH], got {spec!r}")
        out.append(t.activate_code(m.group(1), int(m.group(3)), int(m.group(2)), float(m.group(5) or 1), scope=sc))
    if getattr(args, "when", None):
        sae, feature, above, tokens = args.when
        out = [t.when(iv, sae, feature, above, tokens) for iv in out]
    return out


def readouts_from(args):
    sources = args.readout
    if not sources:
        return None
    info_saes = {s for s in sources if not s.startswith("codebook:")}
    codebooks = [s.removeprefix("codebook:") for s in sources if s.startswith("codebook:")]
    ids = [int(x) for x in args.feature_ids.split(",")] if args.feature_ids else []
    return t.readouts(saes=sorted(info_saes), codebooks=codebooks, top_k=args.top_k, feature_ids=ids,
                      include_prompt=getattr(args, "include_prompt", False))


def _format_readouts(tok: t.Token) -> str:
    parts = []
    for r in tok.readouts:
        if r.codes is not None:
            parts.append(f"{r.source}: " + " ".join(f"h{h}={c}" for h, c in enumerate(r.codes)))
        else:
            top = " ".join(f"{f}={v:.2f}" for f, v in r.top)
            sel = " ".join(f"[{f}]={v:.2f}" for f, v in r.selected.items())
            parts.append(f"{r.source}: {top} {sel}".rstrip())
    return "  |  ".join(parts)


def add_steering_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clamp", action="append", default=[], metavar="SAE:FEATURE=VALUE", help="set a feature's value")
    p.add_argument("--add", action="append", default=[], metavar="SAE:FEATURE=DELTA", help="add to a feature")
    p.add_argument("--scale", action="append", default=[], metavar="SAE:FEATURE=FACTOR", help="scale a feature")
    p.add_argument("--ablate", action="append", default=[], metavar="SAE:FEATURE", help="zero a feature")
    p.add_argument("--direction", action="append", default=[], metavar="SAE:FEATURE=ALPHA",
                   help="add ALPHA times the feature's decoder row")
    p.add_argument("--steer", action="append", default=[], metavar="VECTOR[=ALPHA]",
                   help="add a steering vector loaded on the server, at its calibrated strength or ALPHA")
    p.add_argument("--code", action="append", default=[], metavar="CODEBOOK:HEAD:CODE[*STRENGTH]",
                   help="force a codebook code")
    p.add_argument("--scope", type=_scope_arg, default=None, help="all (default), prompt, generated or START:END")
    p.add_argument("--readout", action="append", default=[], metavar="SAE|codebook:ID",
                   help="read this SAE (or codebook:ID) out at every token")
    p.add_argument("--top-k", type=int, default=5, help="features per token in readouts")
    p.add_argument("--feature-ids", default="", help="comma-separated features always reported")


def add_client_commands(sub) -> None:
    g = sub.add_parser("generate", help="stream a (steered) generation")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--include-prompt", action="store_true", help="also show the prompt tokens' readouts")
    g.add_argument("--baseline", action="store_true", help="also generate unsteered, side by side")
    g.add_argument("--json", action="store_true", help="one JSON object per token")
    g.add_argument("--guard", action="append", default=[], type=_gate_arg, metavar="SAE:FEATURE>VALUE",
                   help="stop as soon as the feature reads above VALUE (stop reason guard)")
    g.add_argument("--when", type=_gate_arg, default=None, metavar="SAE:FEATURE>VALUE[@TOKENS]",
                   help="the interventions wait until the feature reads above VALUE, then act on the "
                        "tokens after it (for TOKENS tokens, if given)")
    add_steering_flags(g)
    g.set_defaults(func=cmd_generate)

    tr = sub.add_parser("trace", help="per-token readouts of a prompt, no generation")
    tr.add_argument("prompt")
    tr.add_argument("--json", action="store_true")
    add_steering_flags(tr)
    tr.set_defaults(func=cmd_trace)

    i = sub.add_parser("info", help="the served model, its sites, SAEs and codebooks")
    i.set_defaults(func=cmd_info)

    f = sub.add_parser("features", help="search an SAE's or codebook's features")
    f.add_argument("source")
    f.add_argument("--label", default="")
    f.add_argument("--regex", default="")
    f.add_argument("--says", default="", help="SAE features that make the model say a token matching this regex, "
                   "best output score first (needs `rudder analyze output-scores`)")
    f.add_argument("--limit", type=int, default=20)
    f.add_argument("--min-precision", type=float, default=0.0, help="code search: least precision kept")
    f.add_argument("--min-recall", type=float, default=0.0, help="code search: least recall kept")
    f.set_defaults(func=cmd_features)
    for p in (g, tr, i, f):
        p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the Rudder server")
        p.add_argument("--token", default=os.environ.get("RUDDER_TOKEN"),
                       help="bearer token, for servers started with one (default: $RUDDER_TOKEN)")
        p.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA certificate (PEM)")
        p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _print_token(tok: t.Token, as_json: bool, show_readouts: bool) -> None:
    if as_json:
        print(json.dumps(asdict(tok)), flush=True)
    elif show_readouts:
        tag = "prompt " if tok.is_prompt else ("base   " if tok.baseline else "")
        print(f"{tag}[{tok.position:4d}] {tok.text!r:<14} {_format_readouts(tok)}", flush=True)
    else:
        print(tok.text, end="", flush=True)


def _client(args) -> Client:
    creds = tls_credentials(args.tls_ca) if args.tls_ca else None
    return Client(args.server, timeout=args.timeout, credentials=creds, token=args.token)


def cmd_generate(args) -> int:
    with _client(args) as c:
        prompt, chat = (None, [{"role": "user", "content": args.prompt}]) if args.chat else (args.prompt, None)
        show = bool(args.readout) or args.baseline
        steered, baseline = [], []
        for tok in c.generate(prompt, chat, max_tokens=args.max_tokens, temperature=args.temperature,
                              seed=args.seed, stop=args.stop, interventions=interventions_from(args),
                              readouts=readouts_from(args), include_baseline=args.baseline,
                              guards=[t.guard(sae, f, above) for sae, f, above, _ in args.guard]):
            (baseline if tok.baseline else steered).append(tok)
            _print_token(tok, args.json, show)
            if tok.guard is not None and not args.json:
                which, at, value = tok.guard
                print(f"\n[stopped: guard {args.guard[which][0]}:{args.guard[which][1]} read {value:.2f} "
                      f"at position {at}]", flush=True)
        if not args.json:
            print()
            if show:
                print("steered :", "".join(x.text for x in steered if not x.is_prompt))
                if args.baseline:
                    print("baseline:", "".join(x.text for x in baseline if not x.is_prompt))
    return 0


def cmd_trace(args) -> int:
    with _client(args) as c:
        for tok in c.trace(args.prompt, interventions=interventions_from(args), readouts=readouts_from(args)):
            _print_token(tok, args.json, True)
    return 0


def cmd_info(args) -> int:
    from google.protobuf.json_format import MessageToJson

    with _client(args) as c:
        info = c.model_info()
        info.ClearField("sites")
        print(MessageToJson(info))
    return 0


def cmd_features(args) -> int:
    with _client(args) as c:
        resp = c.list_features(args.source, args.label, args.regex, args.limit,
                               min_precision=args.min_precision, min_recall=args.min_recall, says=args.says)
        print(f"{resp.total} features match")
        for f in resp.features:
            if f.says_tokens:
                print(f"{f.id:6d}  output score {f.output_score:.3f}  says {' '.join(f.says_tokens)}  "
                      f"{f.top_examples[:1]}")
            elif f.precision or f.recall:
                print(f"head {f.head} code {f.id:5d}  precision {f.precision:.3f}  recall {f.recall:.3f}  "
                      f"density {f.density:.4f}")
            else:
                print(f"{f.id:6d}  density {f.density:.4f}  {f.label}  {f.top_examples[:1]}")
    return 0


def run(args) -> int:
    try:
        return args.func(args)
    except RudderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rudder-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
