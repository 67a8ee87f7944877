"""The README's demo client: find a feature by its top examples, clamp it, watch the readouts.

    python examples/steer_demo.py --server 127.0.0.1:50051 [--regex "socket"] [--value 12]

Without an SAE on the server it steers along a direction instead (an embedding row).
"""

from __future__ import annotations

import argparse
import re
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rudder import client as rc


def wait_until_serving(address: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"no server became ready at {address} within {timeout:.0f}s")
            time.sleep(1)


def show(tok: rc.Token, sae: str) -> None:
    r = tok.readout(sae)
    feats = " ".join(f"{f}:{v:.1f}" for f, v in r.top) if r else ""
    tag = "baseline" if tok.baseline else "steered "
    print(f"  {tag} [{tok.position:3d}] {tok.text!r:<16} top features {feats}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--prompt", default="Write one sentence about your favourite hobby.")
    ap.add_argument("--regex", default=r"\[\[ time\]\]", help="regex over top examples ([[token]] marks the activating token)")
    ap.add_argument("--value", type=float, default=6.0, help="clamp value of the feature")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    wait_until_serving(args.server)
    with rc.Client(args.server, timeout=600) as c:
        info = c.model_info()
        print(f"model {info.name} ({info.architecture}, {info.num_layers} layers) on the {info.backend} backend")
        chat = [{"role": "user", "content": args.prompt}]
        if not info.saes:
            print("no SAE loaded: steering along a direction instead")
            for tok in c.generate(chat=chat, max_tokens=args.max_tokens, include_baseline=True,
                                  interventions=[rc.direction(8.0, vector=[1.0] * info.d_model,
                                                              site="blocks.10.hook_resid_post")]):
                print(tok.text, end="", flush=True)
            return
        sae = info.saes[0].id
        found = c.list_features(sae, regex=args.regex, limit=100)
        if not found.features:
            raise SystemExit(f"no feature of {sae} has a top example matching /{args.regex}/")
        # the feature whose top examples match most often: its theme is the clearest
        feature = max(found.features, key=lambda f: sum(bool(re.search(args.regex, e)) for e in f.top_examples))
        print(f"SAE {sae} at {info.saes[0].site}: {info.saes[0].d_sae} features; {found.total} match /{args.regex}/")
        print(f"clamping feature {feature.id} to {args.value}; its top example: {feature.top_examples[0]!r}\n")
        steered, baseline = [], []
        for tok in c.generate(chat=chat, max_tokens=args.max_tokens, include_baseline=True,
                              interventions=[rc.clamp(sae, feature.id, args.value, scope=rc.scope("generated"))],
                              readouts=rc.readouts(saes=[sae], top_k=4)):
            show(tok, sae)
            (baseline if tok.baseline else steered).append(tok.text)
        print(f"\nprompt  : {args.prompt}\nbaseline: {''.join(baseline)}\nsteered : {''.join(steered)}")


if __name__ == "__main__":
    main()
