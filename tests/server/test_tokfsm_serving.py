"""The shipped TokFSM codebook model (models/tokfsm-codebook) served over gRPC: steering a
walk with a state's code, reading codes back, and finding state codes by search."""

import json
import random
from pathlib import Path

import pytest

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.training.tokfsm import TokFSM

MODEL = Path(__file__).resolve().parents[2] / "models" / "tokfsm-codebook"


@pytest.fixture(scope="module")
def served():
    engine = ReferenceEngine(MODEL)
    with BackgroundServer(engine, "tokfsm-codebook") as srv, rc.Client(srv.address, timeout=120) as c:
        yield c


def state_codes():
    return json.loads((MODEL / "tokfsm_codes.json").read_text())["state_codes"]


def test_activating_a_states_codes_over_grpc_steers_the_walk_exactly_as_offline(served):
    """For 50 states: the codes S itself activates (every codebook and head) forced at the
    prompt's last position; the server's continuation equals the offline forcing's
    (rudder.training.tokfsm_codes), the readouts show the forced codes, every first digit
    begins a successor of S, and the walk lands on S's successors more often than without."""
    import torch
    from transformers import AutoModelForCausalLM

    from rudder.core.codebook import load_codebooks
    from rudder.training.tokfsm_codes import StateCode, next_state

    fsm = TokFSM.load(MODEL)
    own_code_sets = json.loads((MODEL / "tokfsm_codes.json").read_text())["own_code_sets"]
    sets = [[StateCode(**c) for c in cs] for cs in own_code_sets]
    rng = random.Random(0)
    states = rng.sample([s for s in range(fsm.num_states) if sets[s]], 50)
    walks = torch.tensor([[rng.randrange(fsm.num_states)] for _ in states])
    prompts = fsm.encode(fsm.walk(len(states), 4, torch.Generator().manual_seed(1), start=walks[:, 0]))
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(MODEL)}
    offline = next_state(model, codebooks, fsm, prompts, [sets[s] for s in states]).tolist()
    steered_ok = baseline_ok = 0
    for s, prompt_ids, want in zip(states, prompts.tolist(), offline):
        prompt = "".join(str(t) for t in prompt_ids[1:])
        last = len(prompt)  # BOS is position 0, so the prompt's last digit sits at len(prompt)
        codes = sets[s]
        steered, baseline = [], []
        for tok in served.generate(prompt, max_tokens=2, include_baseline=True,
                                   interventions=[rc.activate_code(c.codebook, c.code, c.head,
                                                                   scope=rc.scope("range", last, last + 1))
                                                  for c in codes],
                                   readouts=rc.readouts(codebooks=sorted({c.codebook for c in codes}))):
            (baseline if tok.baseline else steered).append(tok)
        for c in codes:  # the first generated token was chosen at the forced position
            assert steered[0].readout(c.codebook).codes[c.head] == [c.code]
        assert len(steered) == 2 and len(baseline) == 2, (steered, baseline)
        got = fsm.decode(torch.tensor([[10] + [t.id for t in steered]]))[0, 0].item()
        assert got == want  # -1 when the model answered with a non-digit
        succ = set(fsm.successors[s].tolist())
        assert steered[0].id in {t // 10 for t in succ}, (s, steered[0].id)
        steered_ok += got in succ
        baseline_ok += fsm.decode(torch.tensor([[10] + [t.id for t in baseline]]))[0, 0].item() in succ
    assert steered_ok > baseline_ok, (steered_ok, baseline_ok)


def test_feature_search_finds_state_codes_by_label_and_by_regex(served):
    sc = max(state_codes(), key=lambda s: (s["precision"], s["recall"]))
    state = str(sc["state"]).zfill(2)
    by_label = served.list_features(sc["codebook"], label=f"state {state} ", limit=200)
    assert (sc["head"], sc["code"]) in {(f.head, f.id) for f in by_label.features}
    # code search: the positives are where the state is read whole (after BOS and whole states)
    found = served.list_features(sc["codebook"], regex=rf"<bos>(?:\d\d)*{state}", min_recall=0.5, limit=5)
    assert found.total >= 1
    assert found.features[0].precision >= 0.5 and found.features[0].recall >= 0.5


@pytest.mark.vllm
def test_the_shipped_model_serves_on_vllm_as_on_the_reference_backend():
    """`rudder serve --model models/tokfsm-codebook` picks vLLM (GPT-NeoX runs there), whose loader
    reads every *.safetensors in a folder: the codebooks and the code index must stay out of it.
    A state's codes forced at the last digit give the same tokens and code readouts on both."""
    import asyncio

    vllm_backend = pytest.importorskip("rudder.server.backends.vllm")
    from rudder.core.steering import CodeEdit, ReadoutSpec, Scope, SteeringSpec
    from rudder.server.backends.base import EngineRequest, Sampling
    from tests.server.engines import collect, tokens

    own = json.loads((MODEL / "tokfsm_codes.json").read_text())["own_code_sets"]
    fsm = TokFSM.load(MODEL)
    prompts = fsm.encode(fsm.walk(4, 3, __import__("torch").Generator().manual_seed(3))).tolist()
    states = [90, 5, 42, 77]
    reference = ReferenceEngine(MODEL)
    requests = []
    for ids, s in zip(prompts, states):
        last = len(ids) - 1
        codes = tuple(CodeEdit(c["codebook"], c["head"], c["code"], scope=Scope("range", last, last + 1))
                      for c in own[s])
        requests.append(EngineRequest(ids, Sampling(max_tokens=4, ignore_eos=True),
                                      SteeringSpec(codes=codes, readouts=ReadoutSpec(codebooks=("mlp.2",)))))
    want = asyncio.run(collect(reference, requests))
    engine = vllm_backend.VllmEngine(MODEL, max_model_len=128)

    async def run():
        try:
            return await collect(engine, requests)
        finally:
            await engine.stop()

    got = asyncio.run(run())
    for g, w in zip(got, want):
        assert tokens(g) == tokens(w)
        assert [e.readouts[0].codes for e in g] == [e.readouts[0].codes for e in w]
