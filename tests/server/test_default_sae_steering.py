"""The default SAE (trained at set-up by scripts/default_sae.sh) steers the default model over gRPC."""

import re

import pytest

from rudder import client as rc
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.server.cli import default_sae_dirs
from rudder.server.default_model import default_model_dir, is_converted

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not is_converted() or not default_sae_dirs(),
                       reason="default model or SAE missing: run scripts/setup.sh and scripts/default_sae.sh"),
]
THEME = r"\[\[ time\]\]"


def test_clamping_a_feature_whose_top_examples_share_a_theme_moves_the_generation_toward_it():
    (sae_dir,) = [p for p in default_sae_dirs() if p.name == "resid15"]
    engine = ReferenceEngine(default_model_dir(), saes=[str(sae_dir)])
    with BackgroundServer(engine, "SmolLM2-135M-Instruct") as srv, rc.Client(srv.address, timeout=600) as c:
        found = c.list_features("resid15", regex=THEME, limit=100)
        assert found.features, "no feature of the default SAE fires on ' time'"
        feature = max(found.features, key=lambda f: sum(bool(re.search(THEME, e)) for e in f.top_examples))
        chat = [{"role": "user", "content": "Write one sentence about your favourite hobby."}]
        steered, baseline = [], []
        for tok in c.generate(chat=chat, max_tokens=40, include_baseline=True,
                              interventions=[rc.clamp("resid15", feature.id, 6.0, scope=rc.scope("generated"))],
                              readouts=rc.readouts(saes=["resid15"], feature_ids=[feature.id])):
            (baseline if tok.baseline else steered).append(tok)
    base_text = "".join(t.text for t in baseline).lower()
    steered_text = "".join(t.text for t in steered).lower()
    assert "time" not in base_text
    assert steered_text.count("time") >= 2, steered_text
    # the readout shows the clamp: the feature reads 6 at every steered token after the first
    values = [t.readout("resid15").selected[feature.id] for t in steered[1:]]
    assert all(v == pytest.approx(6.0, rel=1e-3) for v in values)
