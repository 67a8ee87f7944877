"""The README's demo client: steer with a concept vector by name, watch the SAE features per token.

    python examples/steer_demo.py --server 127.0.0.1:50051 [--vector NAME] [--prompt TEXT]
    python examples/steer_demo.py --server 127.0.0.1:50051 --regex REGEX [--strength 3]

By default it steers with the first steering vector the server lists (the default model ships
trained concept vectors, calibrated under a fluency budget; `rudder train vector` makes one),
by name at its calibrated strength, and streams a chat answer (temperature 0.6, fixed seed):
each steered token as it arrives with the top SAE features there; then the unsteered answer.
With `--regex` (or on a server without vectors) it clamps an SAE feature instead: the one whose
top examples match `--regex` most (`[[ ]]` marks the activating token), on the generated tokens,
at `--strength` times its max activation.
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


def show(tok: rc.Token, sae: str, feature: int | None) -> None:
    r = tok.readout(sae)
    top = " ".join(f"{f}:{v:.1f}" for f, v in r.top) if r else ""
    value = f"feature {feature} = {r.selected.get(feature, 0.0):5.1f}   " if r and feature is not None else ""
    print(f"  [{tok.position:3d}] {tok.text!r:<14} {value}top {top}", flush=True)


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
    ap.add_argument("--vector", help="steering vector to steer with, by name (default: the first the server lists)")
    ap.add_argument("--regex", help="clamp the SAE feature whose top examples match this instead ([[token]] marks "
                    f"the activating token; on a server without vectors: {SPACE})")
    ap.add_argument("--strength", type=float, default=3.0,
                    help="clamp value in multiples of the feature's max activation")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
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
        names = [v.name for v in info.vectors]
        if args.vector and args.vector not in names:
            raise SystemExit(f"error: the server has no vector {args.vector!r}; it has: {', '.join(names) or 'none'}")
        feature = None
        if names and args.regex is None:
            v = next(v for v in info.vectors if v.name == (args.vector or names[0]))
            interventions = [rc.steer(v.name)]
            print(f"steering vector {v.name!r} ({v.method} at {v.site}), by name at its calibrated strength "
                  f"{v.alpha:.1f}; SAE {sae}'s top features at each token\n")
        else:
            feature, total = pick(c, sae, args.regex or SPACE)
            value = args.strength * feature.max_activation
            print(f"SAE {sae} at {info.saes[0].site}: {info.saes[0].d_sae} features; {total} match "
                  f"/{args.regex or SPACE}/")
            print(f"feature {feature.id}, top example {feature.top_examples[0]!r}, max activation "
                  f"{feature.max_activation:.1f}: clamped to {args.strength:g} x {feature.max_activation:.1f} "
                  f"= {value:.1f} on the generated tokens\n")
            interventions = [rc.clamp(sae, feature.id, value, scope=rc.scope("generated"))]
        selected = [feature.id] if feature is not None else []
        steered, baseline = [], []
        for tok in c.generate(chat=chat, max_tokens=args.max_tokens, include_baseline=True,
                              temperature=args.temperature, seed=args.seed, interventions=interventions,
                              readouts=rc.readouts(saes=[sae], top_k=3, feature_ids=selected)):
            if tok.baseline:
                baseline.append(tok)
            else:  # streamed live, with the features active at the token
                show(tok, sae, feature.id if feature is not None else None)
                steered.append(tok)
        print("\nunsteered, the same request without the steering:")
        for tok in baseline:
            show(tok, sae, feature.id if feature is not None else None)
        print(f"\nprompt  : {args.prompt}\nbaseline: {''.join(t.text for t in baseline)}\n"
              f"steered : {''.join(t.text for t in steered)}")


if __name__ == "__main__":
    main()
