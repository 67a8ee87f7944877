"""SAEs named by SAELens release (`saelens:RELEASE/SAE_ID`), resolved offline: a registry entry whose
Hugging Face repository sits in a local hub cache holding a folder SAELens itself wrote."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from rudder.core import sae_sources
from rudder.core.artifacts import Artifacts
from rudder.core.errors import ArtifactError
from rudder.core.hf_sites import ModelShape
from tests.core.test_sae import FIXTURES

pytest.importorskip("sae_lens", reason="the sae-lens extra (rudder[saelens]) is not installed")

SHAPE = ModelShape("llama", num_layers=2, d_model=16, num_heads=2, d_head=8, vocab_size=320)
REPO, RELEASE, COMMIT = "rudder-tests/tiny-saes", "rudder-tiny-res", "0" * 40


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A hub cache holding repo REPO (the SAELens-written `standard` fixture at standard/), the hub
    switched offline, a registry entry RELEASE for it, and an empty RUDDER_CACHE."""
    import huggingface_hub.constants as hub
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(FIXTURES / "standard", repo / "snapshots" / COMMIT / "standard")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("RUDDER_CACHE", str(tmp_path / "rudder"))
    directory = get_pretrained_saes_directory()
    monkeypatch.setitem(directory, RELEASE, PretrainedSAELookup(
        release=RELEASE, repo_id=REPO, model="tiny-llama", conversion_func=None,
        saes_map={"blocks.1/standard": "standard"}, expected_var_explained={}, expected_l0={},
        neuronpedia_id={}, norm_scaling_factor={}, config_overrides=None))
    return tmp_path


def test_a_release_resolves_through_saelens_and_is_kept(offline_hub):
    attached = Artifacts().add_sae(f"saelens:{RELEASE}/blocks.1/standard", SHAPE, torch.device("cpu"))
    assert attached.id == "blocks.1_standard" and attached.site.name == "blocks.1.hook_resid_post"
    kept = offline_hub / "rudder" / "saelens" / RELEASE / "blocks.1" / "standard"
    assert attached.path == kept
    expected = load_file(FIXTURES / "standard" / "expected.safetensors")
    torch.testing.assert_close(attached.sae.encode(expected["x"]), expected["features"], rtol=1e-5, atol=1e-5)

    shutil.rmtree(offline_hub / "hub")  # the kept folder serves from now on
    again = Artifacts().add_sae(f"mine=saelens:{RELEASE}/blocks.1/standard", SHAPE, torch.device("cpu"))
    assert again.id == "mine" and again.path == kept


def test_unknown_or_unfetchable_releases_say_what_to_do(offline_hub):
    with pytest.raises(ArtifactError, match="ID nope not found in release"):
        sae_sources.resolve(f"saelens:{RELEASE}/nope")
    with pytest.raises(ArtifactError, match="Release no-such-release not found"):
        sae_sources.resolve("saelens:no-such-release/x")
    with pytest.raises(ArtifactError, match="could not fetch it .* run once with network access"):
        sae_sources.resolve("saelens:gpt2-small-res-jb/blocks.0.hook_resid_pre")  # a real entry, not cached
    with pytest.raises(ArtifactError, match="saelens:RELEASE/SAE_ID"):
        sae_sources.resolve("saelens:only-a-release")
