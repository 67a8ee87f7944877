"""The vLLM worker's per-step bookkeeping (`_Steerer._begin`), on the runner state vLLM hands it (read
through `vllm_compat`), without an engine: which token rows belong to which steering request."""

from types import SimpleNamespace

import numpy as np
import torch

from rudder.core.artifacts import Artifacts
from rudder.core.steering import ReadoutSpec, SteeringSpec, spec_to_wire
from rudder.server.backends import channel
from rudder.server.backends.vllm_worker import EXTRA_ARGS_KEY, _Steerer

SPEC = SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=4))


def _state(spec: SteeringSpec | None, ours: str) -> SimpleNamespace:
    extra = {EXTRA_ARGS_KEY: spec_to_wire(spec), channel.REQUEST_ID_KEY: ours} if spec else {}
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def _steerer(runner) -> _Steerer:
    st = object.__new__(_Steerer)  # the per-step state only: no model, no ops placed
    st.runner, st.artifacts, st.device, st.always_on = runner, Artifacts(), torch.device("cpu"), False
    st._specs, st._gates, st._ours, st._broken = {}, {}, {}, set()
    st._table_key = st._tables = st._layout = st._rows = st.step = None
    return st


def _step(st: _Steerer, req_ids: list[str], position: int) -> tuple[list[int], list[tuple[str, int, int]]]:
    n = len(req_ids)
    st.runner.input_batch = SimpleNamespace(num_reqs=n, req_ids=req_ids, num_prompt_tokens=np.full(n, 4),
                                            num_computed_tokens_cpu=np.full(n, position))
    st.runner.query_start_loc = SimpleNamespace(np=np.arange(n + 1))
    st._begin(None, (), {"positions": torch.full((n,), position)})
    assert st.step.rows.position.tolist() == [position] * n
    return st.step.rows.slot.tolist(), list(st._reported)


def test_each_decode_step_finds_each_requests_row_when_vllm_reorders_its_batch():
    """A decode step of the same requests in the same places reuses the last step's rows (only the
    positions are new); when vLLM swaps a steering request with a plain one, with the row count and
    offsets unchanged, each request's slot and reported row follow it."""
    runner = SimpleNamespace(requests={"R1": _state(SPEC, "ours-1"), "R2": _state(SPEC, "ours-2"),
                                       "A": _state(None, ""), "C": _state(None, "")})
    st = _steerer(runner)
    first = _step(st, ["R1", "A", "R2"], 10)
    assert first == ([0, -1, 1], [("ours-1", 0, 0), ("ours-2", 2, 1)])
    slot = st.step.rows.slot
    assert _step(st, ["R1", "A", "R2"], 11) == first and st.step.rows.slot is slot  # reused
    assert _step(st, ["R1", "R2", "C"], 12) == ([0, 1, -1], [("ours-1", 0, 0), ("ours-2", 1, 1)])
    assert _step(st, ["C", "R1", "R2"], 13) == ([-1, 0, 1], [("ours-1", 1, 0), ("ours-2", 2, 1)])
