"""Where a steered decode step's time goes in the worker, outside the model: a torch-profiler
breakdown of `bench/vllm_backend.py`'s host step (the op at the site, routing the readouts, the
gates) plus the channel record the worker sends, for each of its rows.

    .venv/bin/python bench/steering_profile.py [--streams 32] [--repeat 200] [--label after]
    # the code before a change, from a worktree of its commit (rudder.* resolved there first):
    #   git worktree add /tmp/old REV && mkdir -p /tmp/oldpkg/rudder && for p in core server; do
    #   ln -s /tmp/old/$p /tmp/oldpkg/rudder/$p; done
    #   PYTHONPATH=/tmp/oldpkg .venv/bin/python bench/steering_profile.py --label before

One decode step of `--streams` requests (one row each) at blocks.15.hook_resid_post, on the
default TopK SAE and a random standard (ReLU) SAE of its shape (576 x 4,608), float32, on the
default model's own activations there (`decode_rows`), 2 torch threads. Categories, by the
profiler's self CPU time per aten op:
  encode/decode   matmuls (aten::mm, addmm, bmm, matmul, linear, einsum's kernels, and oneDNN's
                  prepacked linear, mkldnn::_linear_pointwise)
  top-k           aten::topk
  small kernels   every other aten op (indexing, where, gather, masks, isfinite, copies)
  C kernel        the SAE screen's C kernel (`rudder.core.screen_kernel`), timed around its calls
  python          the rest of the wall time: Rudder's Python around the kernels (tables, row
                  index, routing, building readouts, the gates, the channel record)
"total" is the best of 5 unprofiled timings of `--repeat` / 5 steps. Prints a table in ms per
step and writes bench/results/steering_profile.json. The model's own
step, for scale, is `plain_step_ms` of bench/results/vllm_backend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from vllm_backend import MODES, SITE, _host_step, decode_rows, sae_specs  # bench/ is on sys.path

from rudder.core import steering
from rudder.core.sae import SAE
from rudder.core.steering import SiteArtifacts, build_tables
from rudder.server.backends import channel
from rudder.server.backends.step import GateState, Span

try:
    from rudder.core import screen_kernel
except ImportError:  # the code of a commit before the C kernel
    screen_kernel = None

ROOT = Path(__file__).resolve().parents[1]
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
          "mkldnn::_linear_pointwise"}  # the last: the SAE screen's prepacked bfloat16 product


def one_step(spec, tables, spans, gates, positions, x, artifacts) -> None:
    """The host step and the record the worker would send for it."""
    _host_step(spec, tables, spans, gates, positions, x, artifacts)
    rows = [channel.Row(f"r{i}", 40, []) for i in range(len(spans))]
    channel.encode(channel.StepRecord(requests=[r.request for r in rows], hook_s=0.0, rows=rows))


class TimedKernel:
    """The screen's C kernel with the time spent in its calls (the profiler sees no aten op there)."""

    def __init__(self, lib):
        self.lib, self.seconds = lib, 0.0

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def timed(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def profile_mode(spec, args, repeat: int) -> dict[str, float]:
    for _ in range(20):  # warm the allocator and the cached properties
        one_step(spec, *args)
    wall = float("inf")
    for _ in range(5):  # the best of 5 timings: this machine is noisy
        t0 = time.perf_counter()
        for _ in range(repeat // 5):
            one_step(spec, *args)
        wall = min(wall, (time.perf_counter() - t0) / (repeat // 5) * 1e3)
    real = screen_kernel.library if screen_kernel else None
    lib = real() if real and screen_kernel.enabled() else None
    timed = TimedKernel(lib)
    if real:
        screen_kernel.library = lambda: timed if lib is not None else None
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeat):
                one_step(spec, *args)
    finally:
        if real:
            screen_kernel.library = real
    cats = {"encode/decode": 0.0, "top-k": 0.0, "small kernels": 0.0, "C kernel": timed.seconds * 1e3 / repeat}
    kernels = 0
    for e in prof.key_averages():
        if not e.key.startswith("aten::") and e.key not in MATMUL:
            continue
        ms = e.self_cpu_time_total / 1e3 / repeat
        cat = "encode/decode" if e.key in MATMUL else "top-k" if e.key == "aten::topk" else "small kernels"
        cats[cat] += ms
        kernels += e.count
    # the profiler's own overhead inflates its totals: the kernels' times are its, python is what is left
    profiled = sum(cats.values())
    out = {k: round(v, 3) for k, v in cats.items()}
    out["python"] = round(max(0.0, wall - profiled), 3)
    out["total"] = round(wall, 3)
    out["aten_ops"] = round(kernels / repeat, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--label", default="after", help="the name this profile is kept under in --out (other "
                    "labels there are kept: profile the code before a change as 'before')")
    ap.add_argument("--out", default=str(ROOT / "bench/results/steering_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        specs = sae_specs(Path(tmp))
        saes = {s.split("=", 1)[0]: SAE.load(s.split("=", 1)[1]).requires_grad_(False) for s in specs}
    artifacts = SiteArtifacts(saes=saes)
    x, positions = decode_rows(args.streams), torch.arange(args.streams) + 40
    rows = {}
    for mode, spec in MODES.items():
        if mode == "plain":
            continue
        step_args = (build_tables([spec] * args.streams, [20] * args.streams, "cpu", saes),
                     [Span(i, i, i + 1, 40, 20, spec) for i in range(args.streams)],
                     [GateState(spec, 20) for _ in range(args.streams)] if GateState.needed(spec) else [],
                     positions, x, artifacts)
        rows[mode] = profile_mode(spec, step_args, args.repeat)
    plain_step = json.loads((ROOT / "bench/results/vllm_backend.json").read_text()).get("plain_step_ms")
    cols = ["encode/decode", "top-k", "small kernels", "C kernel", "python", "total"]
    print(f"\nms per decode step of {args.streams} requests, outside the model ({torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} cores; the model's step: {plain_step} ms)")
    print(f"{'row':<26}" + "".join(f"{c:>15}" for c in cols) + f"{'aten ops':>10}")
    for mode, r in rows.items():
        print(f"{mode:<26}" + "".join(f"{r[c]:15.3f}" for c in cols) + f"{r['aten_ops']:10.0f}")
    out = Path(args.out)
    kept = json.loads(out.read_text()).get("profiles", {}) if out.exists() else {}
    code = Path(steering.__file__).resolve().parent  # the code profiled (a worktree of an older commit, say)
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    kept[args.label] = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out.write_text(json.dumps({
        "bench": "steering_profile", "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), ""),
        "threads": torch.get_num_threads(), "streams": args.streams, "repeat": args.repeat, "site": SITE,
        "plain_step_ms": plain_step, "profiles": kept}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
