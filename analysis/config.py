"""The analysis configurations, one dataclass per `rudder analyze` / `rudder dashboard` command.

    rudder analyze lib --layer 15 --out lib-l15                          # LibConfig
    rudder analyze polysemanticity --sae PATH --out poly.json            # PolysemanticityConfig
    rudder analyze tokfsm MODEL                                          # TokFSMMetricsConfig
    rudder analyze tokfsm-codes MODEL                                    # TokFSMCodesConfig
    rudder analyze tokfsm-codes MODEL --jsd                              # (Figure 4: patching JSD)
    rudder dashboard --sae PATH --out DIR                                # DashboardConfig

The commands' flags are made from these fields: a field's docstring is its `--help`, its
default the flag's; `metadata={"positional": True}` makes it an argument.
`model: None` means the embedded default model (rudder.core.default_model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LibConfig:
    """Local Interaction Basis of one MLP (input, neurons, output) against PCA."""

    layer: int
    """the MLP's layer"""
    out: Path
    """folder for lib.safetensors and lib.json"""
    model: Path | None = None
    """Hugging Face model folder (default: the embedded default)"""
    tokens: int = 2048
    """held-out corpus tokens"""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"--tokens must be at least 1, got {self.tokens}")


@dataclass
class OutputScoresConfig:
    """Output scores of an SAE's features (Arad et al. 2025): which features make the model say what their
    logit-lens tokens say, cached next to the SAE for `rudder features SAE --says REGEX`."""

    sae: Path
    """SAELens-format SAE folder (the scores are written into it)"""
    model: Path | None = None
    """Hugging Face model folder (default: the embedded default)"""
    prompt: str = "From my experience,"
    """the neutral prompt the feature is boosted at (its last token)"""
    amp: float = 10.0
    """boost: amp x the largest feature activation at that token"""
    k: int = 20
    """logit-lens tokens per feature"""

    def __post_init__(self) -> None:
        if not self.amp > 0 or self.k < 1:
            raise ValueError(f"--amp must be > 0 and --k at least 1, got {self.amp} and {self.k}")


@dataclass
class PolysemanticityConfig:
    """Neurons against SAE features at one site (Foote 2024)."""

    sae: Path
    """SAELens-format SAE folder"""
    model: Path | None = None
    """Hugging Face model folder (default: the embedded default)"""
    units: int = 200
    """neurons and features scored (random, among those alive)"""
    tokens: int = 16384
    """held-out corpus tokens"""
    fraction: float = 0.5
    """examples: activation >= fraction x the unit's max"""
    threshold: float = 0.5
    """cosine similarity joining two examples"""
    out: Path | None = None
    """write the scores as JSON here"""

    def __post_init__(self) -> None:
        if self.units < 1 or self.tokens < 1:
            raise ValueError(f"--units and --tokens must be at least 1, got {self.units} and {self.tokens}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")


@dataclass
class DashboardConfig:
    """A static HTML feature dashboard for an SAE or a codebook."""

    out: Path
    """folder for index.html"""
    sae: Path | None = None
    """SAELens-format SAE folder"""
    codebook: str | None = None
    """a codebook of the codebook model --model, e.g. attn_preproj.1"""
    model: Path | None = None
    """Hugging Face model folder (default: the embedded default)"""
    features: str = ""
    """comma-separated feature ids, or HEAD:CODE for codebooks (default: the densest)"""
    max_features: int = 200
    """features shown when --features is not given"""
    tokens: int = 32768
    """held-out corpus tokens"""

    def __post_init__(self) -> None:
        if (self.sae is None) == (self.codebook is None):
            raise ValueError("pass --sae PATH or --codebook ID (with --model, the codebook model)")

    @property
    def wanted(self) -> list[str]:
        return [x.strip() for x in self.features.split(",") if x.strip()]


@dataclass
class TokFSMMetricsConfig:
    """Transition accuracies and how walks go wrong, for a TokFSM model (its codebooks on)."""

    model: Path = field(metadata={"positional": True})
    """a TokFSM model folder (a base model, or one with codebooks)"""


@dataclass
class TokFSMCodesConfig:
    """TokFSM state codes and steering with them (Codebook Features §4)."""

    model: Path = field(metadata={"positional": True})
    """a TokFSM codebook model folder"""
    min_recall: float = 0.5
    """a state's best code: the most precise code with at least this recall"""
    trials: int = 20
    """steering prompts per state"""
    jsd: bool = False
    """instead: Figure 4's normalised JSD of patching a state's codes (training/tokfsm_patching.py)"""
    jsd_json: Path | None = None
    """with --jsd: also write the numbers here (e.g. bench/results/tokfsm_jsd.json)"""
    jsd_png: Path | None = None
    """with --jsd: draw the figure, beside the reference's, here"""
