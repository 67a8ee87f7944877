"""`rudder serve --backend vllm` (gRPC streaming) against `vllm serve` with its defaults (OpenAI
streaming over HTTP), in one run, on the same chat requests.

    .venv/bin/python bench/vllm_vs_vllm_serve.py [--streams 32] [--tokens 64] [--repeats 3]

Both servers run at once on the default model (a float32 checkpoint; both run it as their
defaults choose: vLLM's `auto`, bfloat16 on a CPU with it) and are measured in turn,
interleaved round by round (each round starts at another row, after a pause of PAUSE_S so
the server measured before has gone idle); each gets both cores when it runs
(VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0) and the other sits idle. `--streams` concurrent chat
streams of `--tokens` new tokens each, greedy, EOS ignored; tokens/s = tokens streamed / wall
time. Rows:
  vllm serve         no steering
  rudder plain       no steering
  rudder steered     one clamp of the default SAE on every request
  rudder steered+readout   the same plus a top-16 readout on every token
  rudder N configs   every request clamps, with N distinct (feature, value, scope) configs in the batch
  rudder openai ...  the same server's OpenAI-compatible door (--openai-port), streaming chat with the
                     steering in extra_body: the door's cost against the gRPC rows of the same mode
Prints a table with the best of `--repeats` and the spread, the median paired ratios (each row over
Rudder plain and over `vllm serve` measured in the same round, with the lowest and highest), and writes
bench/results/vllm_vs_vllm_serve.json. With `--cpu`, each round also records where the CPU went
(`CpuLedger`): CPU milliseconds per streamed token in the client, each server's front end, vLLM's
engine core and its worker, with their involuntary context switches, and how busy the cores were;
and for Rudder's rows, the steering op's own time inside vLLM's worker, from the server's Prometheus
histogram `rudder:hook_time_per_step_seconds` (ms per step that steered or read, and its share of the
row's wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from paired import paired  # bench/ is on sys.path

import rudder.client as rc
from rudder.core.default_model import MODEL_NAME, default_sae_dirs, ensure_default_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
TOPICS = ["cats", "the sea", "volcanoes", "jazz", "chess", "bread", "rivers", "the moon", "trains", "bees",
          "glass", "maps", "owls", "tea", "clocks", "snow", "bridges", "salt", "kites", "coral", "deserts",
          "violins", "paper", "comets", "wolves", "gardens", "islands", "ink", "storms", "honey", "caves", "ships"]
SAE = "resid15"
PAUSE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}]


def start(cmd: list[str], log: Path, cores: set[int] | None = None) -> subprocess.Popen:
    """`cmd` in its own session, on `cores` if given (the servers' side of --client-core)."""
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                            start_new_session=True,
                            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(60)
    except ProcessLookupError:  # it had exited
        pass
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


async def wait_http(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as h:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("vllm serve exited; see its log")
            try:
                if (await h.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError("vllm serve did not come up")


async def openai_chat_tok_s(port: int, model: str, streams: int, tokens: int, body_of, is_token) -> float:
    """`streams` concurrent streaming chat completions through the `openai` client; tokens/s, a token
    being a chunk `is_token(chunk)` accepts. `body_of(i)` is request i's extra_body."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(model=model, messages=messages(i), max_tokens=tokens,
                                                      temperature=0, stream=True, extra_body=body_of(i))
        return sum([bool(is_token(chunk)) async for chunk in stream])

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    return sum(counts) / wall


async def run_vllm_serve(port: int, model: str, streams: int, tokens: int) -> float:
    # one content delta per token (the first chunk carries only the role)
    return await openai_chat_tok_s(port, model, streams, tokens, lambda i: {"ignore_eos": True},
                                   lambda c: c.choices and c.choices[0].delta.content)


async def wait_grpc(address: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("rudder serve exited; see its log")
        try:
            async with rc.AsyncClient(address, timeout=5) as client:
                await client.model_info()
                return
        except rc.RudderError:
            await asyncio.sleep(1)
    raise TimeoutError("rudder serve did not come up")


def steering(mode: str, i: int, features: list[int], max_act: dict[int, float]) -> dict:
    if mode == "plain":
        return {}
    distinct = {"steered": 1, "steered+readout": 1}.get(mode) or int(mode.split()[0])
    k = i % distinct
    feature = features[k % len(features)]
    scope = rc.scope("generated") if k % 2 else None
    kw = {"interventions": [rc.clamp(SAE, feature, (2 + k % 3) * max_act[feature], scope=scope)]}
    if mode == "steered+readout":
        kw["readouts"] = rc.readouts(saes=[SAE], top_k=16)
    return kw


async def run_rudder(address: str, streams: int, tokens: int, mode: str, features, max_act) -> float:
    async with rc.AsyncClient(address, timeout=600) as client:
        async def one(i: int) -> int:
            n = 0
            async for tok in client.generate(chat=messages(i), max_tokens=tokens, ignore_eos=True,
                                             **steering(mode, i, features, max_act)):
                n += not tok.is_prompt
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - t0)


async def run_rudder_openai(port: int, streams: int, tokens: int, mode: str, features, max_act) -> float:
    from google.protobuf import json_format

    def body_of(i: int) -> dict:
        kw = steering(mode, i, features, max_act)
        body = {"ignore_eos": True}
        if kw:
            body["rudder"] = {"interventions": [json_format.MessageToDict(x) for x in kw["interventions"]]}
            if "readouts" in kw:
                body["rudder"]["readouts"] = json_format.MessageToDict(kw["readouts"])
        return body

    # one chunk per token carries `rudder` (the role chunk does not)
    return await openai_chat_tok_s(port, "default", streams, tokens, body_of,
                                   lambda c: c.choices and "rudder" in (c.choices[0].model_extra or {}))


async def features_to_steer(address: str, n: int = 32) -> tuple[list[int], dict[int, float]]:
    async with rc.AsyncClient(address, timeout=60) as client:
        listed = await client.list_features(SAE, limit=400)
    live = [f for f in listed.features if f.max_activation > 0][:n]
    return [f.id for f in live], {f.id: f.max_activation for f in live}


def hook_seconds(metrics_port: int) -> tuple[float, float]:
    """Rudder's `rudder:hook_time_per_step_seconds` histogram, read from its /metrics: (sum, count)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = {s.name: s.value for fam in text_string_to_metric_families(text)
             if fam.name == "rudder:hook_time_per_step_seconds" for s in fam.samples}
    return found["rudder:hook_time_per_step_seconds_sum"], found["rudder:hook_time_per_step_seconds_count"]


class CpuLedger:
    """CPU time by role over one measured row: the bench's own process (the clients), and for each
    server its front end (the process started), vLLM's engine core and its worker (by the process
    titles vLLM sets), with involuntary context switches (a process preempted while it could run)."""

    def __init__(self, servers: dict[str, subprocess.Popen]):
        import psutil

        self.me = psutil.Process()
        self.roots = {name: psutil.Process(p.pid) for name, p in servers.items()}

    def _role(self, server: str, proc) -> str:
        title = " ".join(proc.cmdline())
        for tag, role in (("::EngineCore", "engine core"), ("::Worker", "worker")):
            if tag in title:
                return f"{server} {role}"
        return f"{server} front end" if proc.pid == self.roots[server].pid else f"{server} other"

    def snapshot(self) -> dict[str, tuple[float, int]]:
        import psutil

        out: dict[str, tuple[float, int]] = {}

        def add(role: str, proc) -> None:
            try:
                t, c = proc.cpu_times(), proc.num_ctx_switches()
            except psutil.Error:
                return
            cpu, inv = out.get(role, (0.0, 0))
            out[role] = (cpu + t.user + t.system, inv + c.involuntary)

        add("client", self.me)
        for server, root in self.roots.items():
            for proc in (root, *root.children(recursive=True)):
                try:
                    add(self._role(server, proc), proc)
                except psutil.Error:
                    pass
        return out

    @staticmethod
    def delta(before, after, wall: float, tokens: int) -> dict:
        """Per role: CPU ms per streamed token and involuntary switches per token; `busy` is the CPU
        used by everything above over the cores' capacity in the wall time."""
        roles = {r: (after[r][0] - before.get(r, (0.0, 0))[0], after[r][1] - before.get(r, (0.0, 0))[1])
                 for r in after}
        return {"busy": round(sum(c for c, _ in roles.values()) / (wall * os.cpu_count()), 3),
                **{r: {"cpu_ms_per_token": round(1e3 * c / tokens, 3), "inv_switches_per_token": round(i / tokens, 3)}
                   for r, (c, i) in sorted(roles.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated rows to measure (e.g. 'rudder steered+readout,rudder openai "
                    "steered+readout'); the JSON then goes to --out, which must be named")
    ap.add_argument("--client-core", type=int, help="run the clients on this core alone and the servers on the "
                    "others, as when clients run elsewhere: what remains is each door's own cost")
    ap.add_argument("--cpu", action="store_true", help="record where the CPU went in each round (CpuLedger)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/vllm_vs_vllm_serve.json"))
    args = ap.parse_args()
    server_cores = None
    if args.client_core is not None:
        server_cores = set(range(os.cpu_count())) - {args.client_core}
        ENV["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(server_cores)))
        os.sched_setaffinity(0, {args.client_core})
    if args.only and "--out" not in sys.argv:
        ap.error("--only needs --out: the full table's JSON (which the docs render) keeps every row")
    model = str(ensure_default_model(download=False))
    saes = [str(p) for p in default_sae_dirs()]
    http, grpc_port, door, metrics = free_port(), free_port(), free_port(), free_port()
    modes = ["plain", "steered", "steered+readout", "1 configs", "8 configs", "32 configs"]
    door_modes = ["plain", "steered+readout"]
    runs: dict[str, list[float]] = {"vllm serve": [], **{f"rudder {m}": [] for m in modes},
                                    **{f"rudder openai {m}": [] for m in door_modes}}
    if args.only:
        only = [name.strip() for name in args.only.split(",")]
        if unknown := [name for name in only if name not in runs]:
            ap.error(f"unknown rows {unknown}; the rows are {list(runs)}")
        runs = {name: [] for name in only}
    cpu: dict[str, list[dict]] = {name: [] for name in runs}
    vllm = None if "vllm serve" not in runs else start([
                  sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(http),
                  "--served-model-name", MODEL_NAME], Path("/tmp/bench-vllm-serve.log"), server_cores)
    rudder = start([sys.executable, "-m", "rudder.cli", "serve", "--backend", "vllm", "--port", str(grpc_port),
                    "--metrics-port", str(metrics), "--metrics-host", "127.0.0.1", "--openai-port", str(door)],
                   Path("/tmp/bench-rudder-serve.log"), server_cores)
    address = f"127.0.0.1:{grpc_port}"
    try:
        if vllm is not None:
            asyncio.run(wait_http(http, vllm))
        asyncio.run(wait_grpc(address, rudder))
        features, max_act = asyncio.run(features_to_steer(address))
        if vllm is not None:
            asyncio.run(run_vllm_serve(http, MODEL_NAME, 4, 8))  # warm-up both
        asyncio.run(run_rudder(address, 4, 8, "steered+readout", features, max_act))
        asyncio.run(run_rudder_openai(door, 4, 8, "steered+readout", features, max_act))
        names = list(runs)
        ledger = CpuLedger({"rudder": rudder, **({"vllm serve": vllm} if vllm is not None else {})}) if args.cpu \
            else None
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts elsewhere
                time.sleep(PAUSE_S)  # the server measured before goes idle first
                before, t0 = (ledger.snapshot(), time.perf_counter()) if ledger else (None, None)
                hook0 = hook_seconds(metrics) if ledger and name != "vllm serve" else None
                if name == "vllm serve":
                    tps = asyncio.run(run_vllm_serve(http, MODEL_NAME, args.streams, args.tokens))
                elif name.startswith("rudder openai "):
                    mode = name.removeprefix("rudder openai ")
                    tps = asyncio.run(run_rudder_openai(door, args.streams, args.tokens, mode, features, max_act))
                else:
                    mode = name.removeprefix("rudder ")
                    tps = asyncio.run(run_rudder(address, args.streams, args.tokens, mode, features, max_act))
                runs[name].append(tps)
                print(f"round {r}: {name:<24} {tps:7.1f} tok/s", flush=True)
                if ledger:
                    wall = time.perf_counter() - t0
                    cpu[name].append(CpuLedger.delta(before, ledger.snapshot(), wall, args.streams * args.tokens))
                    if hook0 is not None:  # the op's own time in vLLM's worker, as the server's histogram has it
                        time.sleep(0.5)  # the last step's record reaches the front end after its tokens may have
                        hook1 = hook_seconds(metrics)
                        steps = hook1[1] - hook0[1]
                        spent = hook1[0] - hook0[0]
                        cpu[name][-1]["op"] = {"ms_per_step": round(1e3 * spent / max(steps, 1), 3),
                                               "steps": int(steps), "share_of_wall": round(spent / wall, 4)}
                    print("   ", json.dumps(cpu[name][-1]), flush=True)
    finally:
        if vllm is not None:
            stop(vllm)
        stop(rudder)
    base = max(runs["vllm serve"]) if "vllm serve" in runs else None
    rows = [{"server": name, "best_tok_s": round(max(v), 1), "spread": round(max(v) - min(v), 1),
             **({"vs_vllm_serve": round(max(v) / base, 3)} if base else {}),
             **{f"paired_vs_{ref.replace(' ', '_')}": paired(v, runs[ref])
                for ref in ("rudder plain", "vllm serve") if ref in runs and ref != name}}
            for name, v in runs.items()]
    for row in rows:  # the OpenAI door against the gRPC door, same server, same mode
        grpc_row = "rudder " + row["server"].removeprefix("rudder openai ")
        if row["server"].startswith("rudder openai ") and grpc_row in runs:
            grpc_best = max(runs[grpc_row])
            row["vs_grpc_door"] = round(row["best_tok_s"] / grpc_best, 3)
    print(f"\n{args.streams} chat streams x {args.tokens} tokens, greedy, EOS ignored; servers on cores "
          f"{ENV['VLLM_CPU_OMP_THREADS_BIND']}, clients on "
          f"{'the same cores' if args.client_core is None else f'core {args.client_core}'} "
          f"({os.cpu_count()} cores), best of {args.repeats} interleaved rounds")
    print(f"{'server':<32} {'tok/s':>8} {'spread':>7} {'x vllm serve':>13} {'x grpc door':>12} "
          f"{'paired x plain (min-max)':>26} {'paired x vllm serve (min-max)':>30}")

    def span(p: dict | None) -> str:
        return f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})" if p else ""

    for row in rows:
        print(f"{row['server']:<32} {row['best_tok_s']:8.1f} {row['spread']:7.1f} "
              f"{row.get('vs_vllm_serve', float('nan')):13.3f} {row.get('vs_grpc_door', float('nan')):12.3f} "
              f"{span(row.get('paired_vs_rudder_plain')):>26} {span(row.get('paired_vs_vllm_serve')):>30}")
    Path(args.out).write_text(json.dumps({
        "bench": "vllm_vs_vllm_serve", "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "env": ENV, "client_core": args.client_core,
        "streams": args.streams, "tokens": args.tokens, "repeats": args.repeats, "model": MODEL_NAME,
        "sae": saes, "rows": rows, "runs": runs, **({"cpu": cpu} if args.cpu else {}),
        "targets": {"rudder plain": 0.99, "rudder steered+readout": 0.97, "openai door vs grpc door": 0.97,
                    "paired x plain": {"rudder steered": 0.97, "rudder steered+readout": 0.95},
                    "paired x vllm serve": {"rudder steered+readout": 0.97}},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
