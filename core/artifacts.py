"""Load SAEs and codebooks and check them against the model they attach to.

A mismatch (unknown site, wrong width, duplicate id) is a start-up error that
names the artifact and the fix, never a wrong answer later.

An artifact's generation is a hash of its content (`content_generation`): two servers that load
the same files, in any order, give it the same generation, so they compute the same prefix-cache
salts and report the same `rudder:artifact_info`; a reload of other files under the same id is
another generation, and requests validated against the old one drop its edits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rudder.core.code_search import CodeIndex
from rudder.core.codebook import CONFIG_FILE as CODEBOOK_CONFIG
from rudder.core.codebook import WEIGHTS_FILE as CODEBOOK_WEIGHTS
from rudder.core.codebook import Codebook, load_codebooks
from rudder.core.errors import AlreadyExists, ArtifactError, NotFound, RudderError
from rudder.core.feature_metadata import FeatureMeta, load_output_scores, read_feature_metadata
from rudder.core.fileio import sha256_files
from rudder.core.hf_sites import LAYOUTS, ModelShape, mlp_norm_affine, shape_of
from rudder.core.sae import CFG_FILE, SAE, WEIGHTS_FILE, SAEConfig, load_sae_config
from rudder.core.sae_sources import default_id, is_release, resolve
from rudder.core.sites import Site
from rudder.core.steering import SiteArtifacts
from rudder.core.vectors import SteeringVector, load_vector, named

log = logging.getLogger(__name__)


def content_generation(files: list[Path], salt: str = "") -> int:
    """A generation from content: the first 60 bits of the SHA-256 of `salt` and the files' bytes
    (an int, as specs and the worker channel carry it; 60 bits leave it positive in an int64)."""
    h = hashlib.sha256(salt.encode())
    return int(sha256_files(files, h)[:15], 16)


def vector_generation(v: SteeringVector) -> int:
    """A steering vector's generation: its direction, site, scope and calibrated strength."""
    h = hashlib.sha256(f"{v.site}|{v.scope}|{v.strength!r}|".encode())
    h.update(v.vector.numpy().tobytes())
    return int(h.hexdigest()[:15], 16)


@dataclass
class AttachedSae:
    id: str
    site: Site
    cfg: SAEConfig
    path: Path
    features: list[FeatureMeta] | None = None
    sae: SAE | None = None
    """the weights, where this process runs the SAE (not in the vLLM front end, which only validates)"""
    generation: int = 0
    """a hash of its config and weights (`content_generation`): requests are validated against one"""
    site_out: Site | None = None
    """a transcoder's output site: its edits are added there"""
    output_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    """(scores, logit-lens tokens) per feature, where `rudder analyze output-scores` cached them"""

    @property
    def sites(self) -> list[Site]:
        """The sites it reads or writes (the steering op or hook must sit at each)."""
        return [self.site] if self.site_out is None else [self.site, self.site_out]


@dataclass
class AttachedCodebook:
    id: str
    site: Site
    codebook: Codebook
    features: list[FeatureMeta] | None = None
    index_tokens: torch.Tensor | None = None
    """code search: held-out token ids (N, L) and this codebook's active codes there (N, L, G, k)"""
    index_ids: torch.Tensor | None = None
    generation: int = 0
    """a hash of the model folder's codebooks (see `content_generation`)"""


def split_named(spec: str) -> tuple[str, Path]:
    """`[NAME=]SOURCE` as (id, local folder): SOURCE is a folder (the id defaults to its name) or a SAELens
    release `saelens:RELEASE/SAE_ID` (the id defaults to SAE_ID), fetched and kept on first use."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    path = resolve(source)
    return name or (default_id(source) if is_release(source) else path.name), path


@dataclass
class Artifacts:
    saes: dict[str, AttachedSae] = field(default_factory=dict)
    codebooks: dict[str, AttachedCodebook] = field(default_factory=dict)
    vectors: dict[str, SteeringVector] = field(default_factory=dict)  # resolved by the front end into directions
    changes: int = 0  # SAEs attached or removed so far: a cheap "has anything changed?"

    def by_site(self) -> dict[str, SiteArtifacts]:
        sites: dict[str, SiteArtifacts] = {}
        for cb in self.codebooks.values():
            sites.setdefault(cb.site.name, SiteArtifacts()).codebooks[cb.id] = cb.codebook
        for a in self.saes.values():
            if a.sae is not None:
                sites.setdefault(a.site.name, SiteArtifacts()).saes[a.id] = a.sae
                if a.site_out is not None:
                    sites.setdefault(a.site_out.name, SiteArtifacts())
        return sites

    def sae_modules(self) -> dict[str, SAE]:
        """SAEs by id, for resolving directions given by feature."""
        return {i: a.sae for i, a in self.saes.items() if a.sae is not None}

    def remove_sae(self, sae_id: str) -> None:
        if sae_id not in self.saes:
            raise NotFound(f"no SAE {sae_id!r} is loaded; loaded: {', '.join(sorted(self.saes)) or 'none'}")
        del self.saes[sae_id]
        self.changes += 1

    def generations(self) -> dict[str, int]:
        """Each attached SAE's generation, by id (see `SteeringSpec.current`)."""
        return {i: a.generation for i, a in self.saes.items()}

    def sources(self) -> dict[str, AttachedSae | AttachedCodebook]:
        return {**self.saes, **self.codebooks}

    # -------------------------------------------------------------- loading

    def add_vector(self, spec: str, shape: ModelShape,
                   check_site: Callable[[str], None] | None = None) -> tuple[str, SteeringVector]:
        """Attach the steering vector `[NAME=]PATH` (see `check_vector`); `check_site` raises for a
        site the engine cannot steer (a load at run time)."""
        name, vector = self.check_vector(spec, shape)
        if check_site is not None:
            check_site(vector.site)
        if name in self.vectors:
            raise AlreadyExists(f"a steering vector named {name!r} is loaded; unload it first or give the new "
                                "one another name (NAME=PATH)")
        self.vectors[name] = vector
        return name, vector

    @staticmethod
    def check_vector(spec: str, shape: ModelShape) -> tuple[str, SteeringVector]:
        """The steering vector `[NAME=]PATH`, read and checked: a folder (`rudder train vector`) or a
        llama.cpp / repeng control vector (`FILE.gguf`, `FILE.gguf@LAYER`); the name defaults to the
        folder's or file's. A vector of another width or model, or at a layer the model lacks, is refused."""
        name, path = named(spec)
        vector = load_vector(path, shape.d_model, shape.architecture)
        site = Site.parse(vector.site, shape.num_layers)
        if shape.site_dim(site) != vector.d_model:
            raise ArtifactError(f"{path}: a vector of width {vector.d_model} for {site.name}, which is "
                                f"{shape.site_dim(site)} wide")
        return name, vector

    def add_sae(self, spec: str, shape: ModelShape, device: torch.device, weights: bool = True,
                generation: int | None = None, model: torch.nn.Module | None = None,
                vllm: bool = False) -> AttachedSae:
        """Attach the SAE folder `[NAME=]PATH`; with `weights=False` only its config (checked against
        its weights' shapes) is read, for a process that validates requests but runs no SAE.
        `generation`: as the front end computed it (default: `content_generation` of its files).
        `model` (vLLM's own, if `vllm`): the served model, whose norms an SAE that reads TransformerLens'
        ln2.hook_normalized reads through (`hf_sites.mlp_norm_affine`)."""
        sae_id, path = split_named(spec)
        try:
            sae = SAE.load(path, device=device) if weights else None  # in its own dtype, as SAELens runs it
            cfg = sae.cfg if sae is not None else load_sae_config(path)
            site = Site.parse(cfg.hook_name, shape.num_layers)
            site_out = Site.parse(cfg.hook_name_out, shape.num_layers) if cfg.is_transcoder else None
        except RudderError as e:
            raise ArtifactError(f"SAE {sae_id!r} ({path}): {e}") from e
        if sae_id in self.sources():
            raise ArtifactError(f"two artifacts are named {sae_id!r}; name one with --sae NAME=PATH")
        if cfg.hook_head_index is not None:  # an SAE of one head: served as one of the whole site
            if not 0 <= cfg.hook_head_index < shape.num_heads or cfg.d_in != shape.d_head:
                raise ArtifactError(
                    f"SAE {sae_id!r} ({path}) reads head {cfg.hook_head_index} with d_in={cfg.d_in}, but this "
                    f"{shape.architecture} model has {shape.num_heads} heads of {shape.d_head}")
            if sae is not None:
                sae.widen_to_heads(shape.num_heads)
            cfg = sae.cfg if sae is not None else cfg.widened(shape.num_heads)
        for field_name, width, at in (("d_in", cfg.d_in, site), ("d_out", cfg.width_out, site_out or site)):
            want = shape.site_dim(at)
            if width != want:
                raise ArtifactError(
                    f"SAE {sae_id!r} ({path}) has {field_name}={width} but site {at.name} of this "
                    f"{shape.architecture} model is {want} wide: it was trained for another model or site")
        if cfg.center_input and LAYOUTS[shape.architecture].rms:
            cfg.center_input = False  # TransformerLens centres only LayerNorm models: the flag changed nothing
        if sae is not None and cfg.reads_normalized:
            if model is None:
                raise ArtifactError(f"SAE {sae_id!r} ({path}) reads {cfg.hook_name}: this backend cannot undo the norm")
            sae.read_normalized(*mlp_norm_affine(model, shape.architecture, site.layer, vllm=vllm))
        if site_out is not None and site_out.order <= site.order:
            raise ArtifactError(f"transcoder {sae_id!r} ({path}) writes {site_out.name}, which runs before "
                                f"{site.name}, where it reads: it must write a later site")
        if sae is not None:
            sae.warm()
        self.changes += 1
        if generation is None:
            generation = content_generation([path / CFG_FILE, path / WEIGHTS_FILE])
        attached = AttachedSae(sae_id, site, cfg, path, read_feature_metadata(path), sae, generation, site_out,
                               load_output_scores(path))
        self.saes[sae_id] = attached
        log.info("attached SAE %s at %s (%d features, %s)", sae_id, site.name, cfg.d_sae, cfg.architecture)
        return attached

    def add_codebooks(self, folder: Path, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> None:
        index = CodeIndex.load(folder)
        books = [folder / CODEBOOK_CONFIG, folder / CODEBOOK_WEIGHTS]
        for cb in load_codebooks(folder, device=device):
            site = Site.parse(cb.cfg.site, shape.num_layers)
            width = cb.cfg.num_heads * cb.cfg.d_code
            if width != shape.site_dim(site):
                raise ArtifactError(
                    f"codebook {cb.cfg.id!r} covers {cb.cfg.num_heads}x{cb.cfg.d_code}={width} dims but site "
                    f"{site.name} is {shape.site_dim(site)} wide"
                )
            if cb.cfg.id in self.sources():
                raise ArtifactError(f"two artifacts are named {cb.cfg.id!r}")
            meta = read_feature_metadata(folder / cb.cfg.id) if (folder / cb.cfg.id).is_dir() else None
            ids = index.ids.get(cb.cfg.id) if index is not None else None
            self.codebooks[cb.cfg.id] = AttachedCodebook(cb.cfg.id, site, cb.to(dtype), meta,
                                                         index.tokens if ids is not None else None, ids,
                                                         content_generation(books, salt=cb.cfg.id))
            log.info("codebook %s at %s: %d codes, k=%d, %d heads", cb.cfg.id, site.name, cb.cfg.num_codes,
                     cb.cfg.k, cb.cfg.num_heads)


def load_sae_for(model: torch.nn.Module, path: str | Path) -> SAE:
    """An SAE folder (or `saelens:` release) loaded as the server attaches it to `model`, a Hugging Face
    model: checked against it, a one-head SAE widened, `ln2.hook_normalized` read through the model's
    norm, centring as the family needs. For offline analyses (dashboards, polysemanticity)."""
    return Artifacts().add_sae(str(path), shape_of(model), next(model.parameters()).device, model=model).sae


def has_codebooks(model_dir: Path) -> bool:
    return (model_dir / CODEBOOK_CONFIG).exists()
