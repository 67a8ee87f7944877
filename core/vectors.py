"""Steering vectors: a direction at one site, built from examples, with the strength it was
calibrated at. Training writes them (`rudder train vector`), the server adds them as a
direction edit (x' = x + strength * v), and the benchmark compares them with SAE features.

A vector folder holds:

    vector.safetensors   {"vector": (d,) float32, unit norm}
    vector.json          {"format", "site", "d_model", "model", "method", "strength", "site_norm",
                          "budget", "scope", "calibration": [...], "provenance": {...}, "features": [...]}

`strength` is the calibrated alpha in the site's own units; `site_norm` is the mean norm of
the site's activations on the examples (strengths are swept as multiples of it); `scope` the
positions it is added at when a request names it without a scope (a trained vector: the prompt).

Methods (pos, neg: one activation row per example, (n, d)):
- DiffMean: mean(pos) - mean(neg) (AxBench's DiffMean; the "mean" aggregator of steering-vectors).
- PCA of differences: the first principal component of the paired differences pos_i - neg_i taken
  with their negatives (a set of mean zero, so the component keeps the shift the pairs share; the
  `pca` aggregator of steering-vectors, repeng's pca_diff), its sign chosen so that pos projects
  above neg on most pairs.

- Trained: a vector trained with the frozen model so that it writes the positives given the plain
  instructions (rudder.training.vectors.train_vector; AxBench's LM objective for a rank-1
  intervention).

Calibration: `pick_strength` chooses, among swept strengths whose fluency drop (nats per token
under the unsteered model) stays within a budget, the one with the highest success rate
(ties: the stronger); the whole curve is kept in vector.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rudder.core.errors import ArtifactError, InvalidArgument

FORMAT = "rudder.steering_vector/1"
WEIGHTS, META = "vector.safetensors", "vector.json"
METHODS = ("diffmean", "pca_diff", "trained")
FROM_ACTIVATIONS = ("diffmean", "pca_diff")
SCOPES = ("all", "prompt", "generated")
"""the methods `build` computes; `trained` is trained with the model (rudder.training.vectors)"""


def named(spec: str) -> tuple[str, str]:
    """`[NAME=]PATH` as (name, path); the name defaults to the folder's (a GGUF file's stem)."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    if not name:
        file = source.rpartition("@")[0] if ".gguf@" in source else source  # FILE.gguf@LAYER
        name = Path(file).name.removesuffix(".gguf")
    return name, source


def _check_examples(pos: Tensor, neg: Tensor, paired: bool) -> None:
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise InvalidArgument(f"examples must be (n, d) activation rows of one width; got {tuple(pos.shape)} "
                              f"and {tuple(neg.shape)}")
    if len(pos) == 0 or len(neg) == 0:
        raise InvalidArgument(f"a steering vector needs positive and negative examples; got {len(pos)} positive "
                              f"and {len(neg)} negative: give both sides")
    if paired and len(pos) != len(neg):
        raise InvalidArgument(f"pca_diff pairs examples: {len(pos)} positive vs {len(neg)} negative; give as many "
                              "of each, or use diffmean")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise InvalidArgument("the examples' activations hold NaN or infinite values")


def diffmean(pos: Tensor, neg: Tensor) -> Tensor:
    """mean(pos) - mean(neg), unnormalised."""
    _check_examples(pos, neg, paired=False)
    return pos.double().mean(0).float() - neg.double().mean(0).float()


def pca_diff(pos: Tensor, neg: Tensor) -> Tensor:
    """First principal component (unit norm) of the differences pos_i - neg_i and their negatives;
    sign: pos projects above its paired neg on most pairs (ties: along the mean difference)."""
    _check_examples(pos, neg, paired=True)
    diffs = (pos - neg).double()
    _, _, vh = torch.linalg.svd(torch.cat([diffs, -diffs]), full_matrices=False)
    v = vh[0]
    v = v / v.norm().clamp_min(1e-12)
    votes = torch.sign(diffs @ v).sum()
    if votes < 0 or (votes == 0 and diffs.mean(0) @ v < 0):
        v = -v
    return v.float()


def build(method: str, pos: Tensor, neg: Tensor) -> Tensor:
    """A unit-norm steering direction from examples by `method` (one of FROM_ACTIVATIONS)."""
    if method == "trained":
        raise InvalidArgument("a trained vector is trained with the model, not built from activations: "
                              "rudder.training.vectors.train_vector (rudder train vector --method trained)")
    if method not in FROM_ACTIVATIONS:
        raise InvalidArgument(f"unknown vector method {method!r}; choose one of {', '.join(METHODS)}")
    v = diffmean(pos, neg) if method == "diffmean" else pca_diff(pos, neg)
    n = v.norm()
    if not math.isfinite(n.item()) or n.item() == 0:
        raise InvalidArgument(f"{method}: the positive and negative examples give a zero direction "
                              "(identical activations); give examples that differ in the concept")
    return v / n


@dataclass
class CalibrationPoint:
    strength: float  # alpha, in the site's units
    on_topic: float  # share of answers on the concept
    fluency_drop: float  # nats per token below the unsteered answers' mean, under the unsteered model
    success: float  # share on topic, fluent and not repetitive
    repeated_trigrams: float = 0.0


def pick_strength(curve: list[CalibrationPoint], budget: float = 1.0) -> CalibrationPoint | None:
    """The point with the highest success among those whose fluency drop is within `budget`
    (ties: the stronger); None if none is."""
    if not (budget > 0 and math.isfinite(budget)):
        raise InvalidArgument(f"the fluency budget is nats per token the steering may cost; it must be > 0, "
                              f"got {budget}")
    fine = [p for p in curve if p.fluency_drop <= budget]
    return max(fine, key=lambda p: (p.success, p.strength)) if fine else None


@dataclass
class SteeringVector:
    site: str
    vector: Tensor  # (d,), unit norm
    method: str
    strength: float | None = None  # calibrated alpha; None: not calibrated
    site_norm: float | None = None
    model: str = ""
    budget: float | None = None
    calibration: list[CalibrationPoint] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    features: list[dict] = field(default_factory=list)  # [{"sae", "feature", "cosine"}]: see `top_features`
    scope: str = "all"  # the positions it is added at unless a request says: all | prompt | generated

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise InvalidArgument(f"a steering vector's scope is one of {', '.join(SCOPES)}, got {self.scope!r}")
        v = torch.as_tensor(self.vector, dtype=torch.float32)
        if v.ndim != 1 or v.numel() == 0:
            raise InvalidArgument(f"a steering vector is one (d,) row; got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise InvalidArgument("the steering vector holds NaN or infinite components")
        self.vector = v

    @property
    def d_model(self) -> int:
        return self.vector.numel()

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from rudder.core.fileio import replace_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        replace_file(folder / WEIGHTS, lambda p: save_file({"vector": self.vector.contiguous()}, str(p)))
        meta = {"format": FORMAT, "site": self.site, "d_model": self.d_model, "model": self.model,
                "method": self.method, "strength": self.strength, "site_norm": self.site_norm,
                "budget": self.budget, "calibration": [asdict(p) for p in self.calibration],
                "scope": self.scope, "provenance": self.provenance, "features": self.features}
        replace_file(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2)))
        return folder

    @classmethod
    def load(cls, folder: str | Path, d_model: int | None = None) -> SteeringVector:
        """Read a vector folder; `d_model`: refuse one of another width."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / META).exists() or not (folder / WEIGHTS).exists():
            raise ArtifactError(f"{folder} is not a steering vector folder (it needs {META} and {WEIGHTS}); "
                                "make one with `rudder train vector`")
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
        vector = load_file(str(folder / WEIGHTS))["vector"]
        if d_model is not None and vector.numel() != d_model:
            raise ArtifactError(f"{folder}: a vector of width {vector.numel()}, for a model of width {d_model}: "
                                f"it was built for another model ({meta.get('model') or 'unnamed'})")
        try:
            return cls(site=meta["site"], vector=vector, method=meta["method"], strength=meta.get("strength"),
                       site_norm=meta.get("site_norm"), model=meta.get("model", ""), budget=meta.get("budget"),
                       calibration=[CalibrationPoint(**p) for p in meta.get("calibration", [])],
                       provenance=meta.get("provenance", {}), features=meta.get("features", []),
                       scope=meta.get("scope", "all"))
        except InvalidArgument as e:
            raise ArtifactError(f"{folder}: {e}") from e


def check_sae_site(sae, site: str, name: str) -> None:
    writes = sae.cfg.hook_name_out or sae.cfg.hook_name
    if writes != site:
        raise InvalidArgument(f"SAE {name!r} writes {writes}, the vector is at {site}: give an SAE of the vector's "
                              "site to name its features")


def top_features(vector: Tensor, site: str, sae, name: str, k: int = 10) -> list[dict]:
    """The `k` features of `sae` (a rudder.core.sae.SAE) whose decoder rows point most along
    `vector`, by cosine: what the vector writes, in the SAE's words. The SAE must write `site`."""
    check_sae_site(sae, site, name)
    rows = sae.W_dec.detach().float()
    cos = (rows @ vector.float()) / (rows.norm(dim=1) * vector.float().norm()).clamp_min(1e-12)
    top = cos.topk(min(k, cos.numel()))
    return [{"sae": name, "feature": int(i), "cosine": round(float(c), 4)} for c, i in zip(top.values, top.indices)]


# ---------------------------------------------------------------- llama.cpp / repeng control vectors

GGUF_ARCH = "controlvector"


def gguf_site(name: str) -> str:
    """`direction.N` of a control vector is the residual stream after block N-1 (repeng's hidden-state
    index; llama.cpp's 1-based tensors)."""
    return f"blocks.{int(name.split('.')[1]) - 1}.hook_resid_post"


def write_gguf(v: SteeringVector, path: str | Path, model_hint: str) -> Path:
    """A llama.cpp control vector (`--control-vector FILE`), as repeng writes them: one `direction.N`
    tensor, scaled by the calibrated strength (llama.cpp adds it as stored, on every position)."""
    import gguf

    from rudder.core.sites import Site

    site = Site.parse(v.site)
    if site.name != f"blocks.{site.layer}.hook_resid_post":
        raise InvalidArgument(f"a control vector acts on the residual stream after a block; {v.site} is not one")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", 1)
    writer.add_tensor(f"direction.{site.layer + 1}", (v.vector * (v.strength or 1.0)).numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf(path: str | Path, d_model: int | None = None, model_hint: str | None = None,
              layer: int | None = None) -> SteeringVector:
    """A llama.cpp / repeng control vector as a steering vector: the direction of `layer` (a block
    index; needed when the file holds several), its norm as the strength."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueErrors and struct errors
        raise ArtifactError(f"{path} is not a GGUF file: {e}") from None

    def text(key: str) -> str | None:
        f = reader.get_field(key)
        return None if f is None else bytes(f.parts[f.data[0]]).decode()

    if text("general.architecture") != GGUF_ARCH:
        raise ArtifactError(f"{path}: general.architecture is {text('general.architecture')!r}, not "
                            f"{GGUF_ARCH!r}: not a control vector")
    hint = text(f"{GGUF_ARCH}.model_hint")
    if model_hint and hint and hint != model_hint:
        raise ArtifactError(f"{path} is a control vector for a {hint} model; this model is {model_hint}")
    tensors = {t.name: t for t in reader.tensors if t.name.startswith("direction.")}
    layers = sorted(int(n.split(".")[1]) - 1 for n in tensors)
    if not layers:
        raise ArtifactError(f"{path} holds no direction.N tensors")
    if layer is None and len(layers) > 1:
        raise ArtifactError(f"{path} holds directions for blocks {layers}; name one (NAME=PATH@LAYER)")
    pick = layers[0] if layer is None else layer
    if pick not in layers:
        raise ArtifactError(f"{path} has no direction for block {pick}; it has {layers}")
    values = torch.tensor(tensors[f"direction.{pick + 1}"].data, dtype=torch.float32).reshape(-1)
    if d_model is not None and values.numel() != d_model:
        raise ArtifactError(f"{path}: a control vector of width {values.numel()}, for a model of width {d_model}: "
                            f"it was made for another model ({hint or 'no model hint'})")
    norm = values.norm().item()
    if not math.isfinite(norm) or norm == 0:
        raise ArtifactError(f"{path}: direction.{pick + 1} is zero or not finite")
    return SteeringVector(gguf_site(f"direction.{pick + 1}"), values / norm, "control_vector", strength=norm,
                          model=hint or "", provenance={"gguf": str(path)})


def load_vector(spec_path: str | Path, d_model: int | None = None, model_hint: str | None = None) -> SteeringVector:
    """A vector folder, or a control-vector GGUF (`FILE.gguf`, or `FILE.gguf@LAYER` for one of several)."""
    text = str(spec_path)
    stem, at, layer = text.rpartition("@")
    if at and stem.endswith(".gguf") and layer.isdigit():
        return read_gguf(stem, d_model, model_hint, int(layer))
    if text.endswith(".gguf"):
        return read_gguf(text, d_model, model_hint)
    return SteeringVector.load(text, d_model)
