"""The training configurations, one pydantic model per trainer, read from YAML and overridden by flags.

    rudder train sae --config sae.yaml --set objective=e2e --set loss.sparsity=2.0     # SaeTrainConfig
    rudder train codebook --config cb.yaml --model DIR --out OUT                        # CodebookTrainConfig
    rudder train tokfsm --out DIR --steps 1500                                          # TokFSMTrainConfig
    rudder train vector --concept cats --words 'cats?|kittens?' --out DIR               # VectorTrainConfig

The `rudder train` flags are made from these models: every field's description is its `--help`.

SAE loss conventions follow ApolloResearch/e2e_sae (Braun et al. 2024), on activations
normalised so that E‖x‖² = d_in (the scale is folded into the weights at export):

    sparsity     coeff · mean_tokens ‖f‖_p / d_in
    mse          coeff · mean over elements (x̂ − x)²                       local: "out_to_in"
    kl           coeff · KL(p_original ‖ p_spliced), mean over tokens      e2e: "logits_kl"
    downstream   (coeff / |P|) · Σ_p mean over elements (a′_p − a_p)²      e2e+ds: "in_to_orig"

`local` uses mse + sparsity, `e2e` kl + sparsity, `e2e_ds` kl + downstream + sparsity.
TopK SAEs have no sparsity term (k sets L0); their dead latents get the AuxK loss.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rudder.core.errors import InvalidArgument
from rudder.core.sites import Site
from rudder.training.corpus import DataSource

Objective = Literal["local", "e2e", "e2e_ds"]
CORPUS_HELP = ("data (rudder.training.corpus): built-in stdlib, wordnet, fortunes; a path or glob (.txt, .jsonl, "
               ".parquet, .npy/.bin token ids, a save_to_disk folder), hf:NAME, or {path, format, column, split, "
               "dtype}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossConfig(_Strict):
    sparsity: float = Field(1.0, ge=0, description="coefficient of the Lp penalty on feature activations")
    p_norm: float = Field(1.0, gt=0)
    mse: float | None = Field(None, ge=0, description="local reconstruction MSE (default: 1 for local, 0 otherwise)")
    kl: float = Field(1.0, ge=0, description="KL to the original model's outputs (e2e, e2e_ds)")
    downstream: float = Field(1.0, ge=0, description="total downstream MSE coefficient, split evenly (e2e_ds)")
    downstream_sites: list[str] | None = Field(
        None, description="where e2e_ds compares activations (default: resid_post of every later layer)")
    aux_k: float = Field(1 / 32, ge=0, description="AuxK coefficient for TopK SAEs (Gao et al. 2024)")
    aux_k_size: int | None = Field(None, ge=1, description="latents in the AuxK reconstruction (default d_in/2)")


class DeadFeatureConfig(_Strict):
    window_tokens: int = Field(50_000, ge=1, description="a feature that has not fired in this many tokens is dead")
    resample_every_tokens: int | None = Field(
        None, ge=1, description="standard SAEs: resample dead features this often (Towards Monosemanticity); "
                                "None: four times, at 1/8, 2/8, 3/8 and 4/8 of training")
    resample_until: float = Field(0.5, ge=0, le=1, description="no resampling after this fraction of training")


class SaeTrainConfig(_Strict):
    model: str | None = Field(None, description="Hugging Face causal LM folder (default: the embedded default model)")
    sites: list[str] = Field(["blocks.15.hook_resid_pre"], min_length=1)
    d_sae: int | None = Field(None, description="dictionary size (default: expansion_factor · d_in)")
    expansion_factor: float = Field(8.0, gt=0)
    architecture: Literal["standard", "topk"] = "standard"
    k: int = Field(32, ge=1, description="active latents per token (topk)")
    objective: Objective = "local"
    loss: LossConfig = LossConfig()

    tokens: int = Field(200_000, ge=1, description="training tokens")
    context: int = Field(128, ge=2, description="tokens per sequence")
    batch_tokens: int = Field(4096, ge=1, description="tokens per optimizer step (all ranks together)")
    micro_batch_tokens: int | None = Field(None, ge=1, description="tokens per forward; gradients accumulate")
    corpus: list[str | DataSource] = Field(["stdlib"], min_length=1, description=CORPUS_HELP)
    corpus_tokens: int | None = Field(None, ge=1, description="read at most this much of the corpus (None: all)")
    buffer_tokens: int = Field(65_536, ge=1, description="local: shuffle buffer of activations")
    activations: Path | None = Field(None, description="local: train from this activation cache (rudder cache "
                                     "activations, written with this config's data settings) instead of the model")

    lr: float | None = Field(None, gt=0, description="Adam's peak learning rate (None: `default_lr`, by "
                             "architecture and dictionary size)")
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_tokens: int = Field(10_000, ge=0)
    min_lr_factor: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    dead: DeadFeatureConfig = DeadFeatureConfig()

    eval_tokens: int = Field(16_384, ge=0, description="held-out tokens for evaluation and feature metadata")
    checkpoint_every_steps: int = Field(50, ge=1)
    seed: int = 0
    device: str = "cpu"
    autocast: bool = Field(False, description="run the language model under bfloat16 autocast")
    model_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the frozen model's weights: bfloat16 halves its memory (the SAE stays float32); "
                            "auto: bfloat16 on a GPU that has it, float32 elsewhere")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights on disk; the SAE is evaluated as saved (loaders upcast to float32)")
    save_activations: Path | None = Field(
        None, description="local: also write every activation batch trained on, in order (safetensors), "
                          "so another trainer can be given the very same data (bench/default_sae_quality.py)")
    out: Path = Field(..., description="artifact folder (one site) or parent of one folder per site")

    @model_validator(mode="after")
    def _check(self) -> SaeTrainConfig:
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"d_sae must be at least 1, got {self.d_sae}")
        if self.objective == "e2e_ds" and self.loss.downstream == 0:
            raise ValueError("objective e2e_ds needs loss.downstream > 0 (else use e2e)")
        if self.micro_batch_tokens and self.micro_batch_tokens > self.batch_tokens:
            raise ValueError("micro_batch_tokens cannot exceed batch_tokens")
        if self.tokens < self.batch_tokens:
            raise ValueError(f"tokens ({self.tokens}) must cover at least one batch ({self.batch_tokens})")
        return self

    @property
    def mse_coeff(self) -> float:
        if self.loss.mse is not None:
            return self.loss.mse
        return 1.0 if self.objective == "local" else 0.0

    @property
    def sparsity_coeff(self) -> float:
        return 0.0 if self.architecture == "topk" else self.loss.sparsity


CODEBOOK_SITE_KINDS = {"attn_preproj": "attn.hook_z", "mlp": "hook_mlp_out"}


class CodebookTrainConfig(_Strict):
    """Codebook Features (rudder.training.codebook): fine-tune a causal LM with codebook bottlenecks."""

    model: str = Field(..., description="Hugging Face causal LM folder to fine-tune")
    out: Path = Field(..., description="codebook model folder to write")
    codebook_at: list[Literal["attn_preproj", "mlp"]] = Field(
        ["attn_preproj"], min_length=1, description="attn_preproj: one codebook per head before the output "
                                                   "projection; mlp: one codebook on the MLP output")
    layers: list[int] | None = Field(None, description="layers to snap (None: all)")
    num_codes: int = Field(1000, ge=1, description="codes per codebook (per head for attn_preproj)")
    k: int = Field(1, ge=1, description="active codes per token")
    loss: Literal["aeloss", "vqvae"] = "aeloss"
    commitment: float | None = Field(None, ge=0,
                                     description="β of the commitment term β‖x − sg(y)‖², which holds "
                                                 "the input near its codes (None: 0.25 for vqvae, 0 for aeloss)")
    ln_align: float = Field(0.1, ge=0, description="weight of the LayerNorm alignment term")
    init: Literal["sample", "kmeans", "random", "existing"] = Field(
        "sample", description="codes start as random real activations, their k-means centres, Gaussian noise, "
                              "or (existing) the codebooks already in the model folder: training continues, "
                              "and codebooks the folder lacks start as sampled activations")
    model_lr_factor: float = Field(0.1, ge=0, description="model lr = lr · this (0: the model stays frozen)")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_factor: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the codes")
    steps: int = Field(1000, ge=1)
    batch: int = Field(128, ge=1, description="sequences per step")
    context: int = Field(128, ge=2, description="tokens per sequence (corpus data)")
    corpus: list[str | DataSource] = Field(["stdlib"], min_length=1, description=CORPUS_HELP)
    corpus_tokens: int | None = Field(500_000, ge=1, description="read at most this much of the corpus (None: all)")
    replace_dead_every: int = Field(100, ge=0, description="steps between dead-code replacements (0: never)")
    replace_dead_until: float = Field(0.6, ge=0, le=1, description="no replacement after this fraction of training")
    eval_sequences: int = Field(256, ge=1)
    seed: int = 0
    threads: int = Field(0, ge=0)
    device: str = Field("cpu", description="torch device to train on (cuda for a GPU)")

    def sites(self, num_layers: int) -> list[tuple[str, Site]]:
        layers = range(num_layers) if self.layers is None else self.layers
        for layer in layers:
            if not 0 <= layer < num_layers:
                raise InvalidArgument(f"layers: {layer} is out of range, the model has layers 0..{num_layers - 1}")
        return [(f"{at}.{layer}", Site(layer, CODEBOOK_SITE_KINDS[at])) for layer in layers for at in self.codebook_at]


class TokFSMTrainConfig(_Strict):
    """The TokFSM base model of Codebook Features §4, trained from scratch (rudder.training.tokfsm)."""

    out: Path = Field(..., description="model folder to write (with its tokenizer and tokfsm.json)")
    steps: int = Field(1500, ge=1, description="optimizer steps")
    batch: int = Field(128, ge=1, description="TokFSM walks per step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, warm-up then the schedule)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine decay, or "
                                                    "constant (the reference's; a run can then be extended)")
    seed: int = Field(0, description="seeds the model's initialisation and the walks")
    eval_every: int = Field(0, ge=0, description="every N steps: state accuracy on sampled walks into the learning "
                            "curve (OUT/tokfsm_curve.json) and a checkpoint (OUT/checkpoint.pt); 0: at the end only")
    resume: bool = Field(False, description="continue from OUT/checkpoint.pt (model, optimizer, schedule, walks) "
                         "up to --steps")
    device: str = Field("cpu", description="torch device to train on (cuda for a GPU)")


DEFAULT_STRENGTHS = (2, 4, 6, 8, 12)


class VectorTrainConfig(_Strict):
    """A steering vector for a concept (rudder.training.vectors): examples the model writes itself (or
    given), a direction by `method`, its strength calibrated under a fluency budget."""

    concept: str = Field(..., description="the concept's name, as a prompt says it: 'cats', 'the ocean'")
    words: str | None = Field(None, description="regex alternatives that mark a text as on the concept, e.g. "
                              "'cats?|kittens?' (default: the concept's name)")
    model: str | None = Field(None, description="Hugging Face causal LM folder (default: the embedded default model)")
    site: str = Field("blocks.10.hook_resid_post", description="where the vector is added")
    method: Literal["diffmean", "pca_diff", "trained"] = Field(
        "trained", description="trained: a vector trained so the model writes the positives given the plain "
        "instructions (best here); diffmean: mean(pos) - mean(neg); pca_diff: first component of the paired "
        "differences")
    steps: int = Field(40, ge=1, description="training steps of a trained vector (batches of 8 positives)")
    scope: Literal["prompt", "all"] | None = Field(None, description="positions the vector is trained and "
                                                   "calibrated at (default: prompt for trained, all for the others)")
    lr: float = Field(0.3, gt=0, description="Adam learning rate of a trained vector")
    objective: Literal["lm", "preference"] = Field(
        "lm", description="a trained vector's loss: lm, the positives' cross-entropy (AxBench's ReFT-r1 objective); "
        "preference, plus a SimPO-style term preferring each positive to its plain answer (as RePS; no better here, "
        "docs/steering.md)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature of the examples and calibration answers")
    examples: Path | None = Field(None, description="JSON lines of {\"positive\": TEXT, \"negative\": TEXT} "
                                  "(default: the model writes them, asked to mention the concept vs not)")
    num_examples: int = Field(32, ge=1, le=32, description="instructions the model answers for its own examples")
    calibrate: bool = Field(True, description="sweep the strength on calibration instructions and keep the best "
                            "within the budget")
    strengths: list[float] | None = Field(None, min_length=1, description="swept alphas: for diffmean/pca_diff "
                                          f"in tenths of the site mean activation norm (default {DEFAULT_STRENGTHS}), "
                                          "for trained in multiples of its trained norm (default 0.75-2)")
    budget: float = Field(1.0, gt=0, description="fluency drop allowed: nats per token under the unsteered model")
    max_tokens: int = Field(48, ge=8, description="tokens per calibration answer")
    samples: int = Field(2, ge=1, description="answers per calibration instruction at each strength (more: a "
                         "steadier pick, slower)")
    sae: Path | None = Field(None, description="an SAE folder at the vector's site: the vector's top features by "
                             "cosine with its decoder rows are recorded and listed by the server")
    out: Path = Field(..., description="vector folder to write")
    gguf: Path | None = Field(None, description="also write it as a llama.cpp control vector (--control-vector FILE), "
                              "scaled by the calibrated strength")

    @model_validator(mode="after")
    def _check(self) -> VectorTrainConfig:
        if any(not math.isfinite(s) or s <= 0 for s in self.strengths or ()):
            raise ValueError(f"strengths must be finite and > 0, got {self.strengths}")
        Site.parse(self.site)
        return self


def default_lr(architecture: str, d_sae: int) -> float:
    """TopK: 4e-3 at 4,608 latents, scaled as 1/sqrt(latents) (Gao et al. 2024, sparsify); the
    activations are normalised to a mean squared norm of d_in, and there 4e-3 beat 2e-3 and 4e-4 on
    the default model at 262 k and 1 M tokens (docs/benchmarks.md, the race). Standard (L1): 4e-4."""
    return 4e-3 * math.sqrt(4608 / d_sae) if architecture == "topk" else 4e-4


def warmup_decay(step: int, total: int, warmup: int, kind: str = "cosine", floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up, then constant, cosine or linear decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    t = min((step - warmup) / max(1, total - warmup), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
    return floor + (1 - floor) * shape


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise InvalidArgument(f"--set {dotted}: {key} is not a section")
    node[leaf] = value


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                schema: type[BaseModel] = SaeTrainConfig) -> Any:
    """Read a YAML file (optional), apply `overrides` (dotted keys), validate against `schema`.

    Values given as strings are parsed as YAML scalars, so `--set loss.kl=0.5` is a float.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise InvalidArgument(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise InvalidArgument(f"config file {path} must hold a mapping at the top level")
    for key, value in (overrides or {}).items():
        _set_path(raw, key, yaml.safe_load(value) if isinstance(value, str) else value)
    return validate(schema, raw)


def validate(schema: type[BaseModel], raw: dict[str, Any]) -> Any:
    """`schema` from `raw`; a bad value is an InvalidArgument naming every bad field."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(config)'}: {err['msg']}" for err in e.errors()]
        raise InvalidArgument(f"invalid {schema.__name__}:\n" + "\n".join(lines)) from None
