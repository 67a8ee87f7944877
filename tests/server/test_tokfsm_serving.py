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


def test_activating_a_state_code_makes_the_walk_continue_from_that_state(served):
    fsm = TokFSM.load(MODEL)
    rng = random.Random(0)
    codes = rng.sample(state_codes(), 25)
    steered_ok = baseline_ok = 0
    for sc in codes:
        walk = [rng.randrange(fsm.num_states)]
        for _ in range(3):
            walk.append(int(rng.choice(fsm.successors[walk[-1]])))
        prompt = "".join(fsm.state_text(s) for s in walk)
        last = len(prompt)  # BOS is position 0, so the prompt's last digit sits at len(prompt)
        steered, baseline = [], []
        for tok in served.generate(prompt, max_tokens=2, include_baseline=True,
                                   interventions=[rc.activate_code(sc["codebook"], sc["code"], sc["head"],
                                                                   scope=rc.scope("range", last, last + 1))],
                                   readouts=rc.readouts(codebooks=[sc["codebook"]])):
            (baseline if tok.baseline else steered).append(tok)
        # the first generated token was chosen at the forced position: its readout shows the code
        assert steered[0].readout(sc["codebook"]).codes[sc["head"]] == [sc["code"]]
        succ = set(fsm.successors[sc["state"]].tolist())
        steered_ok += int("".join(t.text for t in steered)) in succ
        baseline_ok += int("".join(t.text for t in baseline)) in succ
    assert steered_ok / len(codes) >= STEERED_AT_LEAST, (steered_ok, baseline_ok)
    assert baseline_ok < steered_ok


def test_feature_search_finds_state_codes_by_label_and_by_regex(served):
    sc = max(state_codes(), key=lambda s: (s["precision"], s["recall"]))
    state = str(sc["state"]).zfill(2)
    by_label = served.list_features(sc["codebook"], label=f"state {state} ", limit=200)
    assert (sc["head"], sc["code"]) in {(f.head, f.id) for f in by_label.features}
    # code search: the positives are where the state is read whole (after BOS and whole states)
    found = served.list_features(sc["codebook"], regex=rf"<bos>(?:\d\d)*{state}", min_recall=0.5, limit=5)
    assert found.total >= 1
    assert found.features[0].precision >= 0.5 and found.features[0].recall >= 0.5
