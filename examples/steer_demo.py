"""The README's demo client: find a feature by its top examples, clamp it, watch the readouts.

    python examples/steer_demo.py --server 127.0.0.1:50051 [--regex REGEX] [--strength 6] [--prompt TEXT]

It searches the first SAE's feature metadata for features whose top examples match
`--regex` (`[[ ]]` marks the activating token), takes the one with the most matching
examples, clamps it on the generated tokens to `--strength` times its max activation,
and streams a greedy chat answer: each steered token as it arrives, with the clamped
feature's value and the top features there; then the unsteered answer for comparison.
Without an SAE on the server it steers along a direction instead (an embedding row).
"""

from __future__ import annotations

import argparse
import math
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rudder import client as rc

SPACE = r"\[\[ ?(?:moon|moons|planet|planets|comet|comets|celestial|star|stars|galaxy|sun)\]\]"


def wait_until_serving(address: str, timeout: float = 900) -> None:
    start = time.monotonic()
    deadline, said = start + timeout, start
    print(f"waiting for the server at {address} (vLLM compiles the model on its first start: a few minutes "
          "on 2 cores; later starts reuse vLLM's compile cache)", flush=True)
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"no server became ready at {address} within {timeout:.0f}s; "
                                 "see the server's log (demo-server.log in RUDDER_CACHE)")
            if now - said >= 30:
                print(f"  still starting ({now - start:.0f}s)", flush=True)
                said = now
            time.sleep(1)


def show(tok: rc.Token, sae: str, feature: int) -> None:
    r = tok.readout(sae)
    top = " ".join(f"{f}:{v:.1f}" for f, v in r.top) if r else ""
    print(f"  [{tok.position:3d}] {tok.text!r:<14} feature {feature} = {r.selected.get(feature, 0.0):5.1f}   "
          f"top {top}", flush=True)


def pick(client: rc.Client, sae: str, regex: str):
    try:
        feature, total = client.best_feature(sae, regex)
    except (rc.FailedPrecondition, rc.InvalidArgument) as e:  # no feature_metadata.json; a bad regex
        raise SystemExit(f"error: {e.details}") from None
    if feature is None:
        raise SystemExit(f"error: no feature of {sae} has a top example matching /{regex}/; "
                         f"try a broader --regex (`rudder features {sae} --regex ...` lists matches)")
    return feature, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--prompt", default="Write one sentence about your favourite hobby.")
    ap.add_argument("--regex", default=SPACE, help="regex over top examples ([[token]] marks the activating token)")
    ap.add_argument("--strength", type=float, default=3.0,
                    help="clamp value in multiples of the feature's max activation")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if not math.isfinite(args.strength):
        ap.error("--strength must be a finite number (a multiple of the feature's max activation), "
                 f"got {args.strength}")
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
        feature, total = pick(c, sae, args.regex)
        value = args.strength * feature.max_activation
        print(f"SAE {sae} at {info.saes[0].site}: {info.saes[0].d_sae} features; {total} match /{args.regex}/")
        print(f"feature {feature.id}, top example {feature.top_examples[0]!r}, max activation "
              f"{feature.max_activation:.1f}: clamped to {args.strength:g} x {feature.max_activation:.1f} "
              f"= {value:.1f} "
              "on the generated tokens\n")
        steered, baseline = [], []
        for tok in c.generate(chat=chat, max_tokens=args.max_tokens, include_baseline=True,
                              interventions=[rc.clamp(sae, feature.id, value, scope=rc.scope("generated"))],
                              readouts=rc.readouts(saes=[sae], top_k=3, feature_ids=[feature.id])):
            if tok.baseline:
                baseline.append(tok)
            else:  # streamed live, with the features active at the token
                show(tok, sae, feature.id)
                steered.append(tok)
        print("\nunsteered, the same request without the clamp:")
        for tok in baseline:
            show(tok, sae, feature.id)
        print(f"\nprompt  : {args.prompt}\nbaseline: {''.join(t.text for t in baseline)}\n"
              f"steered : {''.join(t.text for t in steered)}")


if __name__ == "__main__":
    main()
