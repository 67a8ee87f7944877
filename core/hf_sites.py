"""Where each hook site lives in a causal LM of each family, and how to hook it.

`LAYOUTS` is the one table of families: the module paths of the Hugging Face model (the reference
backend and training hook them) and, where vLLM serves the family, how vLLM's implementation of it
differs (the vLLM backend places its op by the same paths). Supported families: Llama (and others laid
out like it: Mistral, Qwen2, Qwen3, Phi-3, SmolLM), Gemma-2 and Gemma-3 text, GPT-2 and GPT-NeoX. A
site's hook sees the activation as (batch, seq, d) and returns its replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rudder.core.errors import ArtifactError
from rudder.core.sites import Site

SiteFn = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class VllmLayout:
    """How vLLM's own implementation of a family's blocks differs from Hugging Face's."""

    fused_residual: bool = True
    """blocks take and return (hidden, residual), the stream being their sum (vLLM fuses the residual
    add into the next norm); otherwise a block returns the stream itself"""
    hidden_arg: int = 1
    """position of hidden_states in a block's forward arguments ((positions, hidden_states, residual))"""
    layers: str | None = None
    """path from vLLM's model to the blocks, where not the Hugging Face one"""


LLAMA_IN_VLLM = VllmLayout()


@dataclass(frozen=True)
class Layout:
    layers: str  # attribute path from the CausalLM to the list of blocks
    mlp: str  # attribute path inside a block
    out_proj: str  # attention output projection inside a block (its input is hook_z)
    mlp_in: str  # inside the MLP: the projection whose output the nonlinearity reads (gate, for Llama)
    mlp_out: str  # inside the MLP: the output projection (its input is the neurons' activations)
    mlp_contribution: str | None = None
    """inside a block: the module whose output is the MLP's contribution to the stream (TransformerLens'
    hook_mlp_out), where that is not the MLP itself (Gemma: its post-feedforward norm)"""
    mlp_norm: str = "post_attention_layernorm"
    """inside a block: the norm whose output the MLP reads"""
    rms: bool = True
    """RMSNorm (no mean, no bias); else LayerNorm"""
    norm_offset: float = 0.0
    """a norm multiplies by (offset + weight): Gemma's 1"""
    vllm: VllmLayout | None = LLAMA_IN_VLLM
    """vLLM's blocks of this family, or None where the vLLM backend does not serve it"""


_LLAMA = Layout("model.layers", "mlp", "self_attn.o_proj", "gate_proj", "down_proj")

LAYOUTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q/k norms inside the attention
    "phi3": Layout("model.layers", "mlp", "self_attn.o_proj", "gate_up_proj", "down_proj"),  # fused qkv, gate-up
    # Gemma-2 and Gemma-3 normalise each sublayer's output before adding it to the stream
    "gemma2": Layout("model.layers", "mlp", "self_attn.o_proj", "gate_proj", "down_proj", "post_feedforward_layernorm",
                     mlp_norm="pre_feedforward_layernorm", norm_offset=1.0),
    "gemma3_text": Layout("model.layers", "mlp", "self_attn.o_proj", "gate_proj", "down_proj",
                          "post_feedforward_layernorm", mlp_norm="pre_feedforward_layernorm", norm_offset=1.0),
    "gpt2": Layout("transformer.h", "mlp", "attn.c_proj", "c_fc", "c_proj", mlp_norm="ln_2", rms=False,
                   vllm=VllmLayout(fused_residual=False, hidden_arg=0)),
    # vLLM 0.32 runs GPT-NeoX through its Transformers backend: Hugging Face's own blocks under `model`
    "gpt_neox": Layout("gpt_neox.layers", "mlp", "attention.dense", "dense_h_to_4h", "dense_4h_to_h", rms=False,
                       vllm=VllmLayout(fused_residual=False, hidden_arg=0, layers="model.layers")),
}
VLLM_FAMILIES = tuple(family for family, layout in LAYOUTS.items() if layout.vllm is not None)


def family_error(model_type: str, vllm: bool) -> str | None:
    """Why a model of `model_type` cannot be served (on the vLLM backend, if `vllm`), or None."""
    if model_type not in LAYOUTS:
        return f"model type {model_type!r} is not supported; Rudder serves {', '.join(LAYOUTS)}"
    if vllm and model_type not in VLLM_FAMILIES:
        return (f"model type {model_type!r} is not served by the vLLM backend (it serves {', '.join(VLLM_FAMILIES)}); "
                f"use --backend reference")
    return None


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    d_model: int
    num_heads: int
    d_head: int
    vocab_size: int

    def site_dim(self, site: Site) -> int:
        return self.num_heads * self.d_head if site.per_head else self.d_model

    @classmethod
    def from_config(cls, c) -> ModelShape:
        """From a Hugging Face model config (the model itself need not be loaded)."""
        return cls(architecture=c.model_type, num_layers=c.num_hidden_layers, d_model=c.hidden_size,
                   num_heads=c.num_attention_heads,
                   d_head=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   vocab_size=c.vocab_size)


def context_of(config) -> int | None:
    """The positions a Hugging Face model config allows (prompt plus output), where it says."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def block_part(model: nn.Module, layer: int, part: str) -> nn.Module:
    """A module of block `layer`, named by its Layout field: "mlp" or "out_proj"."""
    layout = layout_of(model)
    return _get(_get(model, layout.layers)[layer], getattr(layout, part))


def layout_of(model: nn.Module) -> Layout:
    error = family_error(model.config.model_type, vllm=False)
    if error:
        raise ArtifactError(error)
    return LAYOUTS[model.config.model_type]


def shape_of(model: nn.Module) -> ModelShape:
    return ModelShape.from_config(model.config)


def mlp_norm_affine(model: nn.Module, family: str, layer: int, vllm: bool = False) -> tuple[Tensor, Tensor]:
    """(scale, shift) of the norm before block `layer`'s MLP: its output is normalized · scale + shift, so
    TransformerLens' `ln2.hook_normalized` (the normalized value, before the norm's weights) is
    (MLP input − shift) / scale. `vllm`: `model` is vLLM's (the same module names; blocks may be wrapped)."""
    layout = LAYOUTS[family]
    block = _get(model, (layout.vllm.layers if vllm else None) or layout.layers)[layer]
    while hasattr(block, "inner"):  # the vLLM backend's op wrappers
        block = block.inner
    norm = _get(block, layout.mlp_norm)
    scale = norm.weight.detach().float() + layout.norm_offset
    bias = getattr(norm, "bias", None)
    return scale, (bias.detach().float() if bias is not None else torch.zeros_like(scale))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def hook_site(model: nn.Module, site: Site, fn: SiteFn) -> RemovableHandle:
    """Install `fn` at `site`; remove the returned handle to take it out."""
    layout = layout_of(model)
    block = _get(model, layout.layers)[site.layer]
    name = site.name

    if site.kind == "hook_resid_pre":
        def pre(module, args, kwargs):
            if args:
                return (fn(name, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(name, kwargs["hidden_states"])}
        return block.register_forward_pre_hook(pre, with_kwargs=True)

    if site.kind in ("attn.hook_z", "mlp.hook_in"):  # the input of the output projection, of the MLP
        def pre_input(module, args):
            return (fn(name, args[0]), *args[1:])
        return _get(block, layout.out_proj if site.kind == "attn.hook_z" else layout.mlp).register_forward_pre_hook(
            pre_input)

    target = block if site.kind == "hook_resid_post" else _get(block, layout.mlp_contribution or layout.mlp)

    def post(module, args, output):
        return _replace_first(output, fn(name, _first(output)))
    return target.register_forward_hook(post)
