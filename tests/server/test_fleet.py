"""Replicas of one deployment agree: an artifact's generation is a hash of its content, and
`rudder:artifact_info` on /metrics says which replica serves what."""

from __future__ import annotations

import asyncio
import shutil

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rudder.server.backends.reference import ReferenceEngine
from rudder.server.metrics import Metrics
from tests.tiny import make_sae

SITE = "blocks.1.hook_resid_post"


def artifact_info(engine) -> dict[str, dict]:
    """The scraped `rudder:artifact_info` samples, by artifact id."""
    metrics = Metrics()
    metrics.watch_engine(engine)
    text = generate_latest(metrics.registry).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "rudder:artifact_info"]
    assert all(s.value == 1 for s in samples)
    return {s.labels["id"]: s.labels for s in samples}


def test_two_replicas_loading_the_same_files_in_any_order_report_the_same_generations(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    a_copy = tmp_path / "elsewhere" / "a"  # another pod's volume: the same bytes at another path
    shutil.copytree(a, a_copy)
    one = ReferenceEngine(tiny_dir, saes=[f"a={a}", f"b={b}"])
    two = ReferenceEngine(tiny_dir, saes=[f"b={b}", f"a={a_copy}"])
    first, second = artifact_info(one), artifact_info(two)
    assert first == second
    assert set(first) == {"a", "b"}
    assert first["a"]["generation"] != first["b"]["generation"]
    assert first["a"] == {"id": "a", "kind": "sae", "generation": first["a"]["generation"], "site": SITE,
                          "width": "256"}
    assert one.artifacts.generations() == two.artifacts.generations()


def test_reloading_other_weights_under_an_id_is_another_generation_and_the_same_weights_are_not(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, SITE, seed=1)
    make_sae(b, SITE, seed=2)
    engine = ReferenceEngine(tiny_dir, saes=[f"s={a}"])
    before = engine.artifacts.generations()["s"]

    async def reload(path):
        await engine.unload_sae("s")
        assert "s" not in artifact_info(engine)  # 1 only while loaded
        await engine.load_sae(f"s={path}")
        return engine.artifacts.generations()["s"]

    assert asyncio.run(reload(a)) == before  # the same files: requests validated before stay valid
    changed = asyncio.run(reload(b))
    assert changed != before
    assert artifact_info(engine)["s"]["generation"] == f"{changed:015x}"
