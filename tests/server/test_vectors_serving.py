"""Steering vectors served by name (reference backend; the vLLM half is in test_vllm_backend.py):
the same tokens as the vector given inline, listed in GetModelInfo, and bad requests are
one-line errors while the server keeps serving."""

from __future__ import annotations

import pytest
import torch

from rudder import client as rc
from rudder.core.errors import ArtifactError
from rudder.core.vectors import CalibrationPoint, SteeringVector
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine

SITE = "blocks.1.hook_resid_post"


def save_vector(path, d=64, strength=6.0, site=SITE, seed=0, scope="all"):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    SteeringVector(site, v / v.norm(), "diffmean", strength=strength, site_norm=20.0, budget=1.0, scope=scope,
                   calibration=[CalibrationPoint(strength or 1.0, 0.8, 0.5, 0.6)],
                   provenance={"concept": "cats"}, features=[{"sae": "resid1", "feature": 7, "cosine": 0.5}]).save(path)
    return path


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    engine = ReferenceEngine(tiny_dir)
    engine.artifacts.add_vector(f"cats={save_vector(root / 'cats')}", engine.shape)
    engine.artifacts.add_vector(f"raw={save_vector(root / 'raw', strength=None, seed=1)}", engine.shape)
    engine.artifacts.add_vector(f"asked={save_vector(root / 'asked', strength=20.0, seed=2, scope='prompt')}",
                                engine.shape)
    with BackgroundServer(engine, "tiny") as srv, rc.Client(srv.address, timeout=60) as c:
        yield c, engine.artifacts.vectors


def generate(c, interventions, prompt="The quick brown fox"):
    return [t.id for t in c.generate(prompt, max_tokens=12, ignore_eos=True, interventions=interventions)]


def test_a_vector_by_name_steers_as_the_same_vector_given_inline(served):
    c, vectors = served
    v = vectors["cats"]
    inline = generate(c, [rc.direction(v.strength, vector=v.vector.tolist(), site=v.site)])
    assert generate(c, [rc.steer("cats")]) == inline
    assert inline != generate(c, [])  # it steers at all
    stronger = generate(c, [rc.direction(3 * v.strength, vector=v.vector.tolist(), site=v.site)])
    assert generate(c, [rc.steer("cats", alpha=3 * v.strength)]) == stronger
    gen_only = rc.scope("generated")
    assert generate(c, [rc.steer("cats", scope=gen_only)]) == generate(
        c, [rc.direction(v.strength, vector=v.vector.tolist(), site=v.site, scope=gen_only)])


def test_a_prompt_scoped_vector_acts_on_the_prompt_unless_the_request_gives_a_scope(served):
    c, vectors = served
    v = vectors["asked"]

    def inline(scope):
        return [rc.direction(v.strength, vector=v.vector.tolist(), site=v.site, scope=rc.scope(scope))]

    assert generate(c, [rc.steer("asked")]) == generate(c, inline("prompt"))
    assert generate(c, inline("prompt")) != generate(c, inline("all"))  # the scope matters here
    assert generate(c, [rc.steer("asked", scope=rc.scope("all"))]) == generate(c, inline("all"))


def test_model_info_lists_the_vectors(served):
    c, _ = served
    info = {v.name: v for v in c.model_info().vectors}
    assert set(info) == {"cats", "raw", "asked"}
    assert (info["cats"].scope, info["asked"].scope) == ("all", "prompt")
    assert (info["cats"].site, info["cats"].method, info["cats"].concept) == (SITE, "diffmean", "cats")
    assert info["cats"].alpha == pytest.approx(6.0) and not info["raw"].HasField("alpha")
    (f,) = info["cats"].features  # what it writes, in an SAE's features (rudder train vector --sae)
    assert (f.sae, f.feature, f.cosine) == ("resid1", 7, pytest.approx(0.5))


@pytest.mark.parametrize("intervention,error,message", [
    (rc.steer("dogs"), rc.NotFound, "unknown steering vector 'dogs'; loaded: asked, cats, raw"),
    (rc.steer("raw"), rc.InvalidArgument, "'raw' was not calibrated; give an alpha"),
    (rc.steer("cats", alpha=float("nan")), rc.InvalidArgument, "alpha"),
])
def test_bad_requests_are_one_line_errors_and_the_server_keeps_serving(served, intervention, error, message):
    c, _ = served
    with pytest.raises(error, match=message):
        generate(c, [intervention])
    assert len(generate(c, [rc.steer("raw", alpha=2.0)])) == 12


def test_a_site_other_than_the_vectors_own_is_refused(served):
    c, _ = served
    iv = rc.steer("cats")
    iv.direction.site = "blocks.0.hook_resid_post"
    with pytest.raises(rc.InvalidArgument, match="built at blocks.1.hook_resid_post, not blocks.0.hook_resid_post"):
        generate(c, [iv])


def test_a_vector_for_another_model_or_layer_is_refused_at_load(tiny_dir, tmp_path):
    engine = ReferenceEngine(tiny_dir)
    with pytest.raises(ArtifactError, match="width 576, for a model of width 64"):
        engine.artifacts.add_vector(str(save_vector(tmp_path / "wide", d=576)), engine.shape)
    with pytest.raises(Exception, match="names layer 7, but the model has layers 0..2"):
        engine.artifacts.add_vector(str(save_vector(tmp_path / "deep", site="blocks.7.hook_resid_post")),
                                    engine.shape)
    with pytest.raises(ArtifactError, match="not a steering vector folder"):
        engine.artifacts.add_vector(str(tmp_path), engine.shape)


def test_a_llama_cpp_control_vector_serves_by_name_at_its_stored_strength(tiny_dir, tmp_path):
    from rudder.core.vectors import write_gguf

    v = SteeringVector.load(save_vector(tmp_path / "cats"))
    write_gguf(v, tmp_path / "cats.gguf", "llama")
    engine = ReferenceEngine(tiny_dir)
    assert engine.artifacts.add_vector(str(tmp_path / "cats.gguf"), engine.shape)[0] == "cats"
    with pytest.raises(ArtifactError, match="control vector for a llama model; this model is gpt2"):
        from rudder.core.vectors import read_gguf
        read_gguf(tmp_path / "cats.gguf", 64, "gpt2")
    with BackgroundServer(engine, "tiny") as srv, rc.Client(srv.address, timeout=60) as c:
        assert c.model_info().vectors[0].alpha == pytest.approx(v.strength)
        assert generate(c, [rc.steer("cats")]) == generate(
            c, [rc.direction(v.strength, vector=v.vector.tolist(), site=v.site)])


def test_an_admin_loads_a_vector_at_run_time_steers_with_it_by_name_and_drops_it(tiny_dir, tmp_path):
    v = SteeringVector.load(save_vector(tmp_path / "cats"))
    inline = [rc.direction(v.strength, vector=v.vector.tolist(), site=v.site)]
    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny", allow_admin=True) as srv, \
            rc.Client(srv.address, timeout=60) as c:
        with pytest.raises(rc.NotFound, match="unknown steering vector 'ocean'"):
            generate(c, [rc.steer("ocean")])
        info = c.load_vector(str(tmp_path / "cats"), name="ocean")
        assert (info.name, info.site, info.alpha) == ("ocean", SITE, pytest.approx(6.0))
        assert [x.name for x in c.model_info().vectors] == ["ocean"]
        assert generate(c, [rc.steer("ocean")]) == generate(c, inline)
        with pytest.raises(rc.AlreadyExists, match="'ocean' is loaded; unload it first"):
            c.load_vector(str(tmp_path / "cats"), name="ocean")
        save_vector(tmp_path / "wide", d=576)
        with pytest.raises(rc.FailedPrecondition, match="width 576, for a model of width 64"):
            c.load_vector(str(tmp_path / "wide"))
        with pytest.raises(rc.InvalidArgument, match="LoadVector needs `path`"):
            c.load_vector("")
        c.unload_vector("ocean")
        assert not c.model_info().vectors
        with pytest.raises(rc.NotFound, match="unknown steering vector 'ocean'; loaded: none"):
            c.unload_vector("ocean")
        assert generate(c, inline)  # and it serves on
    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny") as srv, rc.Client(srv.address, timeout=60) as c:
        with pytest.raises(rc.PermissionDenied):
            c.load_vector(str(tmp_path / "cats"))
