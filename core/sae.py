"""Sparse autoencoders for inference, in the SAELens folder format.

A folder holds `cfg.json` and `sae_weights.safetensors` with
`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`;
jumprelu adds `threshold [d_sae]`; gated has `b_gate`, `r_mag`, `b_mag [d_sae]` in place
of `b_enc`. SAEs saved by SAELens load here and SAEs saved here load in SAELens.

    f = act(W_encᵀ (x − b_dec·apply_b_dec_to_input) + b_enc)        encode
    x̂ = f W_dec + b_dec                                              decode

A gated SAE (Rajamanoharan et al. 2024) shares W_enc between its gate and its magnitude:
with p = W_encᵀ (x − b_dec), f = [p + b_gate > 0] · relu(exp(r_mag) p + b_mag).

A transcoder reads one site (`hook_name`, the MLP's input) and predicts another (`hook_name_out`,
the MLP's output): `W_dec [d_sae, d_out]`, `b_dec [d_out]`, no b_dec on the input; a skip
transcoder adds `W_skip [d_out, d_in]`: ŷ = f W_dec + b_dec + W_skip x. Its features are read
where it reads; an edit adds (f' − f) W_dec where it writes (the skip term and the error cancel).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rudder.core import screened_topk
from rudder.core.errors import ArtifactError
from rudder.core.fileio import replace_dir

if TYPE_CHECKING:
    from rudder.core.steering import SaeTable

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# ---------------------------------------------------------------- activations
# One registry: an architecture name maps to its activation. Registering twice raises.
# `fn(sae, pre)` maps all pre-activations (..., d_sae); an *elementwise* activation also maps
# the pre-activations of some features only, `fn(sae, pre, ids)` with `ids` their feature ids.
Activation = Callable[..., Tensor]
ACTIVATIONS: dict[str, Activation] = {}
ELEMENTWISE: set[str] = set()


def register_activation(name: str, elementwise: bool = False) -> Callable[[Activation], Activation]:
    def wrap(fn: Activation) -> Activation:
        if name in ACTIVATIONS:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        ACTIVATIONS[name] = fn
        if elementwise:
            ELEMENTWISE.add(name)
        return fn

    return wrap


@register_activation("standard", elementwise=True)
def _relu(sae: SAE, pre: Tensor, ids: Tensor | None = None) -> Tensor:
    return torch.relu(pre)


def topk_active(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """SAELens' TopK on pre-activations `pre (..., d_sae)`: the k largest, ReLU'd, and their ids,
    largest first. The choice is made in float32 (exact for bfloat16 values, and ~3x faster than
    torch's bfloat16 topk on CPU)."""
    values, ids = pre.float().topk(k, dim=-1)
    return torch.relu(values).to(pre.dtype), ids


def active_at(values: Tensor, ids: Tensor, feat: Tensor) -> Tensor:
    """TopK activations `values, ids (R, k)` read at features `feat (R, M)`: `(R, M)`, 0 where inactive."""
    return (values[:, :, None] * (ids[:, :, None] == feat[:, None, :])).sum(1)


@register_activation("topk")
def _topk(sae: SAE, pre: Tensor) -> Tensor:
    # SAELens' TopK: the k largest pre-activations, ReLU'd, zero elsewhere
    values, ids = topk_active(pre, sae.cfg.k)
    return torch.zeros_like(pre).scatter_(-1, ids, values)


@register_activation("jumprelu", elementwise=True)
def _jumprelu(sae: SAE, pre: Tensor, ids: Tensor | None = None) -> Tensor:
    threshold = sae.threshold if ids is None else sae.threshold[ids]
    return torch.relu(pre) * (pre > threshold)


@register_activation("gated", elementwise=True)
def _gated(sae: SAE, pre: Tensor, ids: Tensor | None = None) -> Tensor:
    # `pre` is the gate's pre-activation (the encoder bias of a gated SAE is b_gate); the magnitude path
    # rescales the same projection: exp(r_mag) (pre − b_gate) + b_mag
    b_gate, r_mag, b_mag = (t if ids is None else t[ids] for t in (sae.b_gate, sae.r_mag, sae.b_mag))
    return (pre > 0) * torch.relu(r_mag.exp() * (pre - b_gate) + b_mag)


# Transcoders, by SAELens architecture: the activation each uses
TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu",
               "jumprelu_skip_transcoder": "jumprelu"}

# ---------------------------------------------------------------- config


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    hook_name: str
    architecture: str = "standard"
    """standard (ReLU) | topk | jumprelu | gated, or a transcoder (`TRANSCODERS`)"""
    k: int | None = None
    """active features per token (topk only)"""
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    model_name: str = ""
    d_out: int | None = None
    """transcoders: the width of the site they write"""
    hook_name_out: str | None = None
    """transcoders: the site they write (the MLP's output)"""
    hook_head_index: int | None = None
    """an SAE of one attention head at attn.hook_z (d_in = d_head); `SAE.widen_to_heads` makes it an SAE
    of the whole site that reads and writes that head only"""
    center_input: bool = False
    """the SAE was trained on TransformerLens' centred residual stream (center_writing_weights): its
    input is the activation minus its mean over the site's width (set from the config's metadata)"""
    rescale_acts_by_decoder_norm: bool = False
    """SAELens TopK: latents are scaled by their decoder rows' norms; `SAE.load` folds the
    norms into the weights (same outputs) and clears this"""
    metadata: dict[str, Any] = field(default_factory=dict)
    """training provenance: objective and coefficients, tokens, eval metrics"""

    def __post_init__(self) -> None:
        if self.architecture not in ACTIVATIONS and self.architecture not in TRANSCODERS:
            raise ArtifactError(f"SAE architecture {self.architecture!r} is not supported; known: "
                                f"{', '.join(sorted([*ACTIVATIONS, *TRANSCODERS]))}")
        if self.is_transcoder and not (self.hook_name_out and self.d_out and not self.apply_b_dec_to_input):
            raise ArtifactError(f"a {self.architecture} needs hook_name_out and d_out, and apply_b_dec_to_input "
                                f"false (got {self.hook_name_out!r}, {self.d_out}, {self.apply_b_dec_to_input})")
        if self.d_in < 1 or self.d_sae < 1:
            raise ArtifactError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ArtifactError(f"SAE dtype {self.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ArtifactError(f"a topk SAE needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def activation(self) -> str:
        """The name of the activation in `ACTIVATIONS` (a transcoder's is its encoder's)."""
        return TRANSCODERS.get(self.architecture, self.architecture)

    @property
    def reads_normalized(self) -> bool:
        """At TransformerLens' ln2.hook_normalized: the MLP's input before the norm's weights (the server
        gives the SAE that map, `SAE.read_normalized`)."""
        return self.hook_name.endswith("hook_normalized")

    @property
    def width_out(self) -> int:
        """The width of the site the decoder writes."""
        return self.d_out if self.is_transcoder else self.d_in

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the SAE runs in (SAELens' `dtype`), whatever the model's."""
        return getattr(torch, self.dtype)

    def to_saelens(self) -> dict[str, Any]:
        """The SAELens v6 cfg.json dictionary (hook and model names under `metadata`)."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if self.hook_name.endswith("hook_z") else "none",
            # sae_lens_version: SAELens reads a folder without it as pre-6 and loses hook and model names
            "metadata": {**self.metadata, "hook_name": self.hook_name, "model_name": self.model_name,
                         "sae_lens_version": SAELENS_FORMAT_VERSION},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        if self.hook_head_index is not None:
            cfg["metadata"]["hook_head_index"] = self.hook_head_index
        if self.is_transcoder:
            cfg["d_out"] = self.d_out
            cfg["metadata"]["hook_name_out"] = self.hook_name_out
        return cfg

    def widened(self, num_heads: int) -> SAEConfig:
        """The config of this one-head SAE widened to all `num_heads` heads of its attn.hook_z site."""
        return replace(self, d_in=self.d_in * num_heads, hook_head_index=None)

    @classmethod
    def from_saelens(cls, raw: dict[str, Any]) -> SAEConfig:
        """Read SAELens v6 configs (names under `metadata`) and older flat ones."""
        meta = dict(raw.get("metadata") or {})
        hook_name = meta.pop("hook_name", None) or raw.get("hook_name")
        if not hook_name:
            raise ArtifactError("cfg.json names no hook: expected `metadata.hook_name` (or `hook_name`)")
        norm = raw.get("normalize_activations", "none") or "none"
        if norm != "none":
            raise ArtifactError(
                f"cfg.json has normalize_activations={norm!r}: fold the normalisation into the weights "
                "before serving (SAELens: `sae.fold_activation_norm_scaling_factor`)"
            )
        head = next((h for h in (meta.pop("hook_head_index", None), raw.get("hook_head_index"),
                                 raw.get("hook_point_head_index")) if h is not None), None)
        if head is not None and not hook_name.endswith("attn.hook_z"):
            raise ArtifactError(f"cfg.json sets hook_head_index={head} at {hook_name}: a head index means "
                                "an SAE of one attention head, at a blocks.L.attn.hook_z site")
        center = _model_processing({**raw, **(raw.get("metadata") or {})}, hook_name)
        arch = raw.get("architecture", "standard")
        hook_name_out = meta.pop("hook_name_out", None) or raw.get("hook_name_out")
        activation = raw.get("activation_fn", raw.get("activation_fn_str"))
        if arch == "standard" and activation == "topk":  # legacy SAELens TopK: a standard SAE with a topk activation
            arch = "topk"
        elif activation not in (None, "relu", "topk" if arch == "topk" else "relu"):  # (a JumpReLU's is relu too)
            raise ArtifactError(f"cfg.json: activation_fn {activation!r} with architecture {arch!r} is not "
                                f"supported; known architectures: {', '.join(sorted(ACTIVATIONS))}")
        return cls(
            d_in=int(raw["d_in"]),
            d_sae=int(raw["d_sae"]),
            hook_name=hook_name,
            architecture=arch,
            k=raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k"),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", arch not in TRANSCODERS)),
            dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
            model_name=meta.pop("model_name", None) or raw.get("model_name", ""),
            d_out=raw.get("d_out") if arch in TRANSCODERS else None,
            hook_name_out=hook_name_out if arch in TRANSCODERS else None,
            hook_head_index=None if head is None else int(head),
            center_input=center,
            rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
            metadata=meta,
        )


SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens whose folder format Rudder writes (checked in tests)

# TransformerLens weight processing (SAELens' `model_from_pretrained_kwargs`) against the raw Hugging
# Face model Rudder runs. fold_ln and center_unembed leave the sites' values alone (ln*.hook_normalized is
# the normalized value before the norm's weights either way). center_writing_weights mean-centres
# everything written to the residual stream of a LayerNorm model, so there the SAE's input is the raw
# activation minus its mean over d_model: a change of basis Rudder applies (`SAEConfig.center_input`;
# the server clears it for RMSNorm families, which TransformerLens does not centre); edits need none,
# the next norm removes the mean either way. The others are refused.
_CENTRED_SITES = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")
_PROCESSING = {
    "fold_value_biases": "the value biases are moved into the attention output bias",
    "refactor_factored_attn_matrices": "the attention matrices are refactored",
}


def _model_processing(raw: dict[str, Any], hook_name: str) -> bool:
    """Whether the SAE's input is the centred activation (center_writing_weights at a residual-stream
    site); refuse processing Rudder does not undo."""
    kwargs = raw.get("model_from_pretrained_kwargs") or {}
    for key, what in _PROCESSING.items():
        if kwargs.get(key):
            raise ArtifactError(
                f"cfg.json: model_from_pretrained_kwargs.{key}=true ({what} in TransformerLens), so this SAE's "
                f"inputs differ from the raw model's activations Rudder serves; use an SAE trained with "
                f"{key}=false (SAELens' default for most releases) or on the Hugging Face model")
    return bool(kwargs.get("center_writing_weights")) and hook_name.rsplit(".", 1)[-1] in _CENTRED_SITES


# ---------------------------------------------------------------- module


def _param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in SAE(cfg).named_parameters()}


def load_sae_config(path: str | os.PathLike) -> SAEConfig:
    """An SAE folder's config, checked against its weights' shapes without reading the weights."""
    path = Path(path)
    if not (path / CFG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise ArtifactError(f"{path} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = SAEConfig.from_saelens(json.loads((path / CFG_FILE).read_text()))
    expected = _param_shapes(cfg)
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        got = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys() if name in expected}
    if got != expected:
        raise ArtifactError(f"{path / WEIGHTS_FILE}: tensors {got} do not match the config's shapes {expected}")
    if cfg.rescale_acts_by_decoder_norm and cfg.architecture != "topk":
        raise ArtifactError(f"{path}: rescale_acts_by_decoder_norm is defined for topk SAEs only, "
                            f"not {cfg.architecture}")
    return cfg


class SAE(nn.Module):
    """An inference-only SAE. Training code subclasses or wraps it; the math is here once."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.width_out))
        self.b_dec = nn.Parameter(torch.zeros(cfg.width_out))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))
        if "skip" in cfg.architecture:
            self.W_skip = nn.Parameter(torch.zeros(cfg.width_out, cfg.d_in))
        if cfg.architecture == "gated":  # SAELens' names; b_gate is the encoder bias
            del self.b_enc
            self.b_gate, self.r_mag, self.b_mag = (nn.Parameter(torch.zeros(cfg.d_sae)) for _ in range(3))
        self.in_scale: Tensor | None = None  # `read_normalized`
        self.in_shift: Tensor | None = None

    def read_normalized(self, scale: Tensor, shift: Tensor) -> None:
        """The site's activation is the norm's output, normalized · scale + shift, and this SAE reads the
        normalized value (TransformerLens' hook_normalized): it reads (x − shift) / scale, and an edit it
        makes there is scaled back by `scale`."""
        dtype, device = self.W_enc.dtype, self.W_enc.device
        self.in_scale, self.in_shift = scale.to(device, dtype), shift.to(device, dtype)

    @property
    def encoder_bias(self) -> Tensor:
        return self.b_gate if self.cfg.architecture == "gated" else self.b_enc

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)  # as SAELens: the SAE runs in its own dtype, whatever the model's
        if self.in_scale is not None:
            x = (x - self.in_shift) / self.in_scale
        if self.cfg.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        return self._pre_acts(self._input(x))

    def _pre_acts(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # one fused kernel: the bias is not added in a second pass over (N, d_sae)
            return torch.addmm(self.encoder_bias, x, self.W_enc)
        return x @ self.W_enc + self.encoder_bias  # (..., d_sae)

    def topk_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A TopK SAE's active features at the rows `x (N, d_in)`: values and ids `(N, k)`, largest
        first; `encode` is the values scattered into zeros (no dense (N, d_sae) tensor here). A float32
        SAE on a CPU with fast bfloat16 finds them through a bfloat16 screen, exactly
        (`rudder.core.screened_topk`)."""
        if self.cfg.activation != "topk":
            raise ValueError(f"topk_encode is for TopK SAEs; this one is {self.cfg.architecture}: use encode")
        xs = self._input(x)
        if screened_topk.usable(self.W_enc, self.encoder_bias, xs):
            values, ids = screened_topk.top_pre_acts(self._screen(), xs, self.encoder_bias, self.cfg.k)
            return torch.relu(values), ids
        return topk_active(self._pre_acts(xs), self.cfg.k)

    def topk_active_at(self, x: Tensor, feat: Tensor) -> Tensor:
        """A TopK SAE's activations of the features `feat (N, M)` at the rows `x (N, d_in)`, `(N, M)`:
        0 where a feature is not among its row's k active ones. On a CPU, eager, each feature's own
        pre-activation first: TopK ReLUs its k values, so a feature at or below 0 is 0 whether or
        not it is among the k, and only rows with a feature above 0 (or NaN) need the others. Those go
        through the screen where it applies (whether each is among the k, decided from bounds, without
        finding the k), else through `topk_encode`. A decode-sized step (up to
        `screened_topk.ALL_ROWS` rows) goes to the screen's C kernel whole, in one call: its bfloat16
        product reads the whole encoder for any number of rows, so the rows at or below 0 cost little
        there, and one call saves the dozen small ops of picking them out."""
        if self.cfg.activation != "topk":
            raise ValueError(f"topk_active_at is for TopK SAEs; this one is {self.cfg.architecture}: use encode_at")
        if x.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return active_at(*self.topk_encode(x), feat)  # fixed shapes, no host synchronisation
        xs = self._input(x)
        screen = self._screen() if screened_topk.usable(self.W_enc, self.encoder_bias, xs) else None

        def in_full(rows: Tensor, found: Tensor) -> Tensor:  # the float32 top k of `rows`, read at their features
            return found.index_copy(0, rows, active_at(*topk_active(self._pre_acts(xs[rows]), self.cfg.k), feat[rows]))

        if screen is not None and xs.shape[0] <= screened_topk.ALL_ROWS:
            whole = screened_topk.topk_active_all(screen, xs, self.encoder_bias, self.cfg.k, feat)
            if whole is not None:
                acts, undecided = whole
                return in_full(undecided.nonzero().squeeze(-1), acts) if bool(undecided.any()) else acts
        pre = self._pre_acts_at(xs, feat)
        rows = (~(pre <= 0)).any(dim=1).nonzero().squeeze(-1)
        acts = torch.zeros_like(pre)
        if rows.numel() == 0:
            return acts
        if screen is None:
            return in_full(rows, acts)
        found, undecided = screened_topk.topk_active_at(screen, xs[rows], self.encoder_bias, self.cfg.k, feat[rows],
                                                        pre[rows])
        acts = acts.index_copy(0, rows, found)
        return in_full(rows[undecided], acts) if bool(undecided.any()) else acts

    def topk_read(self, x: Tensor, feat: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """What a decode step that reads a TopK SAE out and edits it needs, from one screen product in one
        C call: the top n activations at the rows `x (N, d_in)` (n <= k; values and ids `(N, n)`, largest
        first, all above 0) and the activations of the features `feat (N, M)` (`topk_active_at`'s). None
        where that does not apply (no screen or C kernel here, n above k, more than
        `screened_topk.ALL_ROWS` rows, a row the screen cannot decide or with fewer than n active
        features): `topk_encode` answers then."""
        if self.cfg.activation != "topk" or not 0 < n <= self.cfg.k or x.device.type != "cpu" \
                or not 0 < x.shape[0] <= screened_topk.ALL_ROWS:
            return None
        xs = self._input(x)
        if not screened_topk.usable(self.W_enc, self.encoder_bias, xs):
            return None
        return screened_topk.topk_read(self._screen(), xs, self.encoder_bias, self.cfg.k, n, feat)

    def topk_edit(self, x: Tensor, table: SaeTable, slot: Tensor, pos: Tensor) -> Tensor | None:
        """A decode step's edits of a TopK SAE that nobody reads out, from one screen product in one C call:
        the rows `x (N, d_in)` with `table`'s edits added (`x + (f' - f) W_dec`, in x's dtype, exactly x on
        rows no op applies to), for rows of slots `slot (N,)` (-1: none) at positions `pos (N,)`. None where
        that does not apply (no screen or C kernel here, more than `screened_topk.ALL_ROWS` rows, a
        transcoder, an input scale, a stream neither float32 nor bfloat16, a row the screen cannot decide):
        `steering._edits` answers then."""
        return self._fused_step(screened_topk.topk_edit, x, table, slot, pos)

    def topk_read_edit(self, x: Tensor, table: SaeTable, slot: Tensor, pos: Tensor) -> tuple[Tensor, ...] | None:
        """A decode step of a TopK SAE whose every row reads its top `table.top_k` out and edits it, from one
        screen product in one C call: `topk_edit`'s edited rows, and each row's readout, the top `top_k`
        activations with the edits written in, values and ids `(N, top_k)`. None where `topk_edit` would
        be, or where `top_k` + the edits is more than k, or a row needs the general path (a row the screen
        cannot decide, with fewer active features than the readout shows, or of no slot)."""
        if not 0 < table.top_k + table.feature.shape[1] <= self.cfg.k:
            return None
        return self._fused_step(screened_topk.topk_read_edit, x, table, slot, pos)

    def _fused_step(self, step, x: Tensor, table: SaeTable, slot: Tensor, pos: Tensor):
        if self.cfg.activation != "topk" or self.cfg.is_transcoder or self.in_scale is not None \
                or x.device.type != "cpu" or not 0 < x.shape[0] <= screened_topk.ALL_ROWS:
            return None
        xs = self._input(x)
        if not screened_topk.usable(self.W_enc, self.encoder_bias, xs):
            return None
        return step(self._screen(), xs, self.encoder_bias, self.cfg.k, table, slot, pos, self.W_dec, x)

    def top_activations(self, x: Tensor, n: int) -> tuple[Tensor, Tensor] | None:
        """A ReLU SAE's n largest activations at the rows `x (N, d_in)`, values and ids `(N, n)`, largest
        first, through the bfloat16 screen (float32's answer at about bfloat16's cost); None where the
        screen does not apply (another activation, another dtype or device, a CPU without fast
        bfloat16): `encode` is the way there."""
        xs = self._input(x)
        if self.cfg.activation != "standard" or not 0 < n < self.cfg.d_sae \
                or not screened_topk.usable(self.W_enc, self.encoder_bias, xs):
            return None
        values, ids = screened_topk.top_pre_acts(self._screen(), xs, self.encoder_bias, n)
        return torch.relu(values), ids

    def warm(self) -> None:
        """Build now what the first steering step would otherwise build: the bfloat16 screen, and its
        C kernel (compiled once per machine, about a second), where this SAE is screened."""
        if screened_topk.usable(self.W_enc, self.encoder_bias, self.W_enc.new_zeros(1, self.cfg.d_in)):
            self._screen()
            screened_topk.warm()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_screen_cache", None)  # copies and pickles rebuild it on first use
        return state

    def _screen(self) -> screened_topk.Screen:
        """The bfloat16 screen of this encoder, rebuilt when its weights are replaced or written in place
        (a write through `.data` bypasses the version counter it watches: drop `_screen_cache` then)."""
        cached = self.__dict__.get("_screen_cache")
        if cached is None or not cached.fits(self.W_enc, self.encoder_bias):
            cached = screened_topk.Screen.build(self.W_enc.detach(), self.encoder_bias.detach())
            self.__dict__["_screen_cache"] = cached
        return cached

    def encode(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.cfg.activation](self, self.pre_acts(x))

    @property
    def elementwise(self) -> bool:
        """Whether a feature's activation depends on its own pre-activation only (not TopK)."""
        return self.cfg.activation in ELEMENTWISE

    def encode_at(self, x: Tensor, ids: Tensor) -> Tensor:
        """The activations of features `ids (N, M)` at the rows `x (N, d_in)`, `(N, M)`, without
        encoding the whole dictionary: M encoder columns per row. Elementwise SAEs only."""
        if not self.elementwise:
            raise ValueError(f"a {self.cfg.architecture} SAE's features depend on each other: use encode")
        return ACTIVATIONS[self.cfg.activation](self, self._pre_acts_at(self._input(x), ids), ids)

    def _pre_acts_at(self, xs: Tensor, ids: Tensor) -> Tensor:
        """The pre-activations of features `ids (N, M)` at the (input-transformed) rows `xs (N, d_in)`:
        the same M columns for every row (`ids` expanded from one row) as one small matmul, else each
        row's own M columns, gathered from the screen's contiguous copy where one is built (a strided
        column gather is ~6x slower)."""
        if ids.dim() == 2 and ids.shape[0] > 1 and ids.stride(0) == 0:
            cols = ids[0]
            return torch.addmm(self.encoder_bias.index_select(0, cols), xs, self.W_enc.index_select(1, cols))
        cached = self.__dict__.get("_screen_cache")
        w_t = cached.w_t if cached is not None and cached.fits(self.W_enc, self.encoder_bias) else self.W_enc.T
        return screened_topk.pre_acts_at(w_t, self.encoder_bias, xs, ids)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec  # (..., d_in)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction (a transcoder's prediction of its output site, skip term included)."""
        out = self.decode(self.encode(x))
        return out + self._input(x) @ self.W_skip.T if hasattr(self, "W_skip") else out

    @torch.no_grad()
    def widen_to_heads(self, num_heads: int) -> None:
        """Make this SAE of head `hook_head_index` an SAE of its whole attn.hook_z site (`num_heads` x
        d_head, heads in order as the output projection reads them): the other heads' encoder rows and
        decoder columns are zero, so it reads that head alone and its edits write that head alone."""
        head, d_head = self.cfg.hook_head_index, self.cfg.d_in

        def widen(t: Tensor, dim: int) -> nn.Parameter:
            shape = list(t.shape)
            shape[dim] = d_head * num_heads
            wide = t.new_zeros(shape)
            wide.narrow(dim, head * d_head, d_head).copy_(t)
            return nn.Parameter(wide, requires_grad=t.requires_grad)

        self.W_enc, self.W_dec, self.b_dec = widen(self.W_enc, 0), widen(self.W_dec, 1), widen(self.b_dec, 0)
        self.cfg = self.cfg.widened(num_heads)

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Unit-norm decoder rows, the norms moved into the encoder: pre-activations scale by the
        norms (as SAELens' `rescale_acts_by_decoder_norm` computes them), reconstructions do not change."""
        norm = self.W_dec.norm(dim=1).clamp_min(1e-12)  # (d_sae,)
        self.W_enc.mul_(norm)
        self.b_enc.mul_(norm)
        self.W_dec.div_(norm[:, None])
        self.cfg.rescale_acts_by_decoder_norm = False

    # -------------------------------------------------------------- disk

    def save(self, path: str | os.PathLike, extra_files: dict[str, str] | None = None,
             weights_dtype: torch.dtype | None = None) -> Path:
        """Write the SAELens folder atomically: a killed save leaves the old folder or none.

        `extra_files` (name -> text, e.g. feature metadata) go into the same atomic swap.
        `weights_dtype` stores the tensors in another dtype (bfloat16 halves the file); the
        config's `dtype`, the one the SAE runs in, is unchanged, so loaders upcast.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tensors = {name: p.detach().to(weights_dtype or p.dtype).contiguous().cpu()
                   for name, p in self.named_parameters()}
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / CFG_FILE).write_text(json.dumps(self.cfg.to_saelens(), indent=2))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        replace_dir(staging, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
        path = Path(path)
        cfg = load_sae_config(path)
        sae = cls(cfg)
        weights = load_file(path / WEIGHTS_FILE)
        sae.load_state_dict({name: weights[name] for name, _ in sae.named_parameters()})
        scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
        if scale is not None:  # older SAELens: f is scaled before decoding; the same as scaling W_dec's rows
            with torch.no_grad():
                sae.W_dec.mul_(scale.to(sae.W_dec.dtype)[:, None])
        if cfg.rescale_acts_by_decoder_norm:
            sae.fold_decoder_norm()
        return sae.to(device=device, dtype=cfg.torch_dtype).requires_grad_(False)
