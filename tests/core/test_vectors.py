"""Steering vectors built from examples, against hand computations, and their calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rudder.core.errors import ArtifactError, InvalidArgument
from rudder.core.vectors import CalibrationPoint, SteeringVector, build, diffmean, pca_diff, pick_strength


def examples(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    concept = torch.zeros(d)
    concept[2] = 3.0
    neg = torch.randn(n, d, generator=g)
    pos = neg + concept + 0.3 * torch.randn(n, d, generator=g)
    return pos, neg


def test_diffmean_is_the_difference_of_the_means_exactly():
    pos, neg = examples()
    by_hand = np.asarray(pos, dtype=np.float64).mean(0) - np.asarray(neg, dtype=np.float64).mean(0)
    np.testing.assert_allclose(diffmean(pos, neg).numpy(), by_hand, rtol=0, atol=1e-6)
    np.testing.assert_allclose(build("diffmean", pos, neg).numpy(), by_hand / np.linalg.norm(by_hand), atol=1e-6)


def test_pca_diff_is_the_first_component_of_the_differences_and_their_negatives_up_to_sign():
    pos, neg = examples()
    d = np.asarray(pos - neg, dtype=np.float64)
    both = np.concatenate([d, -d])  # mean zero: PCA's centring changes nothing
    _, _, vt = np.linalg.svd(both - both.mean(0))
    got = pca_diff(pos, neg).numpy()
    assert abs(float(got @ vt[0])) == pytest.approx(1.0, abs=1e-5)
    # the sign: positives project above their paired negatives on most pairs
    assert (d @ got > 0).sum() > len(d) / 2


def test_pca_diff_points_along_a_concept_that_varies_in_strength():
    g = torch.Generator().manual_seed(1)
    neg = torch.randn(32, 16, generator=g)
    axis = torch.zeros(16)
    axis[5] = 1.0
    pos = neg + torch.rand(32, 1, generator=g) * 4 * axis  # the concept, at varying strength
    assert pca_diff(pos, neg)[5].item() > 0.99


@pytest.mark.parametrize("pos,neg,match", [
    (torch.zeros(0, 4), torch.ones(3, 4), "positive and negative examples"),
    (torch.ones(3, 4), torch.zeros(0, 4), "positive and negative examples"),
    (torch.ones(3, 4), torch.ones(3, 5), "one width"),
    (torch.full((2, 4), float("nan")), torch.ones(2, 4), "NaN or infinite"),
])
def test_bad_example_sets_are_refused_in_one_line(pos, neg, match):
    with pytest.raises(InvalidArgument, match=match):
        build("diffmean", pos, neg)


def test_identical_sides_and_unknown_methods_and_unpaired_pca_are_refused():
    x = torch.ones(3, 4)
    with pytest.raises(InvalidArgument, match="zero direction"):
        build("diffmean", x, x.clone())
    with pytest.raises(InvalidArgument, match="choose one of diffmean, pca_diff"):
        build("lat", x, x)
    with pytest.raises(InvalidArgument, match="as many of each"):
        build("pca_diff", torch.randn(3, 4), torch.randn(2, 4))


def curve(*points):
    return [CalibrationPoint(s, on, drop, succ) for s, on, drop, succ in points]


def test_calibration_picks_the_best_success_within_the_fluency_budget():
    c = curve((1, 0.1, 0.1, 0.1), (2, 0.5, 0.4, 0.5), (4, 0.8, 0.9, 0.7), (8, 1.0, 3.0, 0.0), (16, 1.0, 6.0, 0.0))
    assert pick_strength(c, 1.0).strength == 4
    assert pick_strength(c, 0.5).strength == 2  # a tighter budget: a weaker setting
    assert pick_strength(curve((1, 0, 0.1, 0.3), (2, 0, 0.2, 0.3)), 1.0).strength == 2  # ties: the stronger
    assert pick_strength(curve((8, 1.0, 3.0, 0.0)), 1.0) is None  # nothing fluent enough
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="fluency budget"):
            pick_strength(c, bad)


def test_a_vector_folder_round_trips_and_refuses_another_width(tmp_path):
    pos, neg = examples()
    v = SteeringVector("blocks.1.hook_resid_post", build("diffmean", pos, neg), "diffmean", strength=3.5,
                       site_norm=12.0, model="tiny", budget=1.0, calibration=curve((3.5, 0.8, 0.5, 0.6)),
                       provenance={"examples": 12})
    v.save(tmp_path / "v")
    back = SteeringVector.load(tmp_path / "v", d_model=8)
    assert torch.equal(back.vector, v.vector)
    assert (back.site, back.method, back.strength, back.site_norm, back.calibration, back.provenance) == \
        (v.site, v.method, 3.5, 12.0, v.calibration, {"examples": 12})
    with pytest.raises(ArtifactError, match="width 8, for a model of width 576"):
        SteeringVector.load(tmp_path / "v", d_model=576)
    with pytest.raises(ArtifactError, match="not a steering vector folder"):
        SteeringVector.load(tmp_path)
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        SteeringVector("blocks.1.hook_resid_post", torch.tensor([1.0, float("inf")]), "diffmean")


# ---------------------------------------------------------------- llama.cpp / repeng control vectors


def test_a_control_vector_round_trips_through_gguf_at_its_calibrated_strength(tmp_path):
    from rudder.core.vectors import load_vector, named, write_gguf

    v = SteeringVector("blocks.4.hook_resid_post", build("diffmean", *examples()), "diffmean", strength=7.5)
    write_gguf(v, tmp_path / "cats.gguf", "llama")
    back = load_vector(tmp_path / "cats.gguf", d_model=8, model_hint="llama")
    assert back.site == "blocks.4.hook_resid_post" and back.strength == pytest.approx(7.5)
    torch.testing.assert_close(back.vector, v.vector)
    assert named(str(tmp_path / "cats.gguf")) == ("cats", str(tmp_path / "cats.gguf"))
    with pytest.raises(ArtifactError, match="for a llama model; this model is qwen2"):
        load_vector(tmp_path / "cats.gguf", d_model=8, model_hint="qwen2")
    with pytest.raises(ArtifactError, match="width 8, for a model of width 576"):
        load_vector(tmp_path / "cats.gguf", d_model=576)


def test_a_control_vector_written_as_repeng_and_llama_cpp_do_loads(tmp_path):
    """Written with the gguf package the way repeng's export_gguf writes one (llama.cpp reads these with
    --control-vector): several layers, 1-based direction.N, raw magnitudes."""
    import gguf

    from rudder.core.vectors import load_vector

    rows = {n: np.random.default_rng(n).standard_normal(8).astype(np.float32) for n in (3, 4, 5)}
    w = gguf.GGUFWriter(str(tmp_path / "repeng.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "qwen2")
    w.add_uint32("controlvector.layer_count", len(rows))
    for n, row in rows.items():
        w.add_tensor(f"direction.{n}", row)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ArtifactError, match=r"holds directions for blocks \[2, 3, 4\]; name one"):
        load_vector(tmp_path / "repeng.gguf", d_model=8)
    v = load_vector(f"{tmp_path / 'repeng.gguf'}@3", d_model=8, model_hint="qwen2")
    assert v.site == "blocks.3.hook_resid_post"  # direction.4: the output of block 3
    np.testing.assert_allclose((v.vector * v.strength).numpy(), rows[4], rtol=1e-6)
    with pytest.raises(ArtifactError, match="for a qwen2 model; this model is llama"):
        load_vector(f"{tmp_path / 'repeng.gguf'}@3", d_model=8, model_hint="llama")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        load_vector(tmp_path / "junk.gguf")


def test_a_vectors_top_features_are_the_decoder_rows_it_points_along(tmp_path):
    from rudder.core.sae import SAE, SAEConfig
    from rudder.core.vectors import top_features

    site = "blocks.1.hook_resid_post"
    sae = SAE(SAEConfig(d_in=8, d_sae=16, hook_name=site, architecture="standard"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
        v = 3 * sae.W_dec[5] + 0.5 * sae.W_dec[9]  # mostly feature 5, scaled (cosine ignores norms)
        sae.W_dec[9] *= 7
    feats = top_features(v, site, sae, "resid1", k=3)
    assert [f["feature"] for f in feats][0] == 5 and all(f["sae"] == "resid1" for f in feats)
    by_hand = torch.nn.functional.cosine_similarity(sae.W_dec.detach(), v[None], dim=1)
    assert [f["cosine"] for f in feats] == pytest.approx(by_hand.topk(3).values.tolist(), abs=1e-4)
    with pytest.raises(InvalidArgument, match="writes blocks.1.hook_resid_post, the vector is at blocks.2"):
        top_features(v, "blocks.2.hook_resid_post", sae, "resid1")
    kept = SteeringVector(site, v / v.norm(), "trained", features=feats)
    assert SteeringVector.load(kept.save(tmp_path / "v")).features == feats
