"""The shipped default SAE steers the default model over gRPC, as `make demo` shows."""

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rudder import client as rc
from rudder.core.default_model import default_model_dir, default_sae_dirs, is_converted
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from steer_demo import SPACE, pick  # noqa: E402  the demo's own search

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not is_converted(), reason="default model missing: run scripts/setup.sh"),
]
STRENGTH = 3.0  # x the feature's max activation, as in the demo


def test_clamping_the_sky_feature_puts_stars_into_the_answer_and_the_readout_shows_it():
    (sae_dir,) = [p for p in default_sae_dirs() if p.name == "resid15"]
    engine = ReferenceEngine(default_model_dir(), saes=[str(sae_dir)])
    with BackgroundServer(engine, "SmolLM2-135M-Instruct") as srv, rc.Client(srv.address, timeout=600) as c:
        feature, _ = pick(c, "resid15", SPACE)
        assert sum(bool(re.search(SPACE, e)) for e in feature.top_examples) >= 3, feature.top_examples
        value = STRENGTH * feature.max_activation
        chat = [{"role": "user", "content": "Write one sentence about your favourite hobby."}]
        steered, baseline = [], []
        for tok in c.generate(chat=chat, max_tokens=32, include_baseline=True,
                              interventions=[rc.clamp("resid15", feature.id, value, scope=rc.scope("generated"))],
                              readouts=rc.readouts(saes=["resid15"], feature_ids=[feature.id])):
            (baseline if tok.baseline else steered).append(tok)
    sky = re.compile(r"(?i)\b(?:stars?|moons?|planets?|sky|orbit\w*|galax\w*|universe|space)\b")
    base_text = "".join(t.text for t in baseline)
    steered_text = "".join(t.text for t in steered)
    assert not sky.search(base_text), base_text
    assert len(sky.findall(steered_text)) >= 2, steered_text
    # the readout shows the clamp: the feature reads the clamped value at every steered token after the first
    values = [t.readout("resid15").selected[feature.id] for t in steered[1:]]
    assert all(v == pytest.approx(value, rel=1e-3) for v in values)


def test_the_shipped_vectors_steer_the_default_model_onto_their_concept_by_name():
    """Each vector in models/default-vectors (rudder train vector, calibrated) on the benchmark's
    report instructions, which its calibration never saw: most answers reach the concept, few
    unsteered ones do."""
    from rudder.core.default_model import default_vector_dirs
    from rudder.training.concepts import REPORT_INSTRUCTIONS, Concept

    dirs = default_vector_dirs()
    assert dirs, "models/default-vectors is missing: the default vectors are committed with the repository"
    engine = ReferenceEngine(default_model_dir())
    names = [engine.artifacts.add_vector(str(d), engine.shape)[0] for d in dirs]
    with BackgroundServer(engine, "SmolLM2-135M-Instruct") as srv, rc.Client(srv.address, timeout=600) as c, \
            ThreadPoolExecutor(len(REPORT_INSTRUCTIONS)) as pool:
        for name in names:
            v = engine.artifacts.vectors[name]
            concept = Concept(v.provenance["concept"], v.provenance["words"])

            def answer(seed: int, instruction: str, name=name) -> tuple[str, str]:
                steered, base = [], []
                for tok in c.generate(chat=[{"role": "user", "content": instruction}], max_tokens=48,
                                      temperature=0.6, seed=seed, include_baseline=True,
                                      interventions=[rc.steer(name)]):
                    (base if tok.baseline else steered).append(tok.text)
                return "".join(steered), "".join(base)

            answers = list(pool.map(answer, range(len(REPORT_INSTRUCTIONS)), REPORT_INSTRUCTIONS))
            steered = sum(concept.on(s) for s, _ in answers)
            unsteered = sum(concept.on(b) for _, b in answers)
            assert steered >= len(REPORT_INSTRUCTIONS) // 2 and unsteered <= 2, (name, steered, unsteered, answers[:2])
