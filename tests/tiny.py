"""Tiny random models and artifacts, built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from rudder.core.sae import SAE, SAEConfig

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Steering a language model means changing its activations on purpose.",
    "Sparse autoencoders find features; codebooks snap activations to codes.",
] * 8

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Gemma and GPT-2 tie the unembedding to the embedding (vLLM's implementations always do)
TIED = {"gemma2", "gemma3_text", "gpt2"}


def _config(family: str, tokenizer, layers: int, heads: int, kv_heads: int, hidden: int, **extra):
    """A tiny config of `family` (a transformers model_type); `extra`: more config fields."""
    common = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=family in TIED, **extra)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                                    bos_token_id=tokenizer.eos_token_id, **common)
    sizes = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 max_position_embeddings=256)
    if family == "gpt_neox":  # Pythia: parallel residual, rotary on a quarter of each head
        return AutoConfig.for_model("gpt_neox", use_parallel_residual=True, rotary_pct=0.25,
                                    bos_token_id=tokenizer.eos_token_id, **sizes, **common)
    return AutoConfig.for_model(family, num_key_value_heads=kv_heads, head_dim=hidden // heads, **sizes, **common)


def make_model(path: Path, layers: int = 3, seed: int = 0, heads: int = 4, kv_heads: int = 2,
               hidden: int = 64, family: str = "llama", **config) -> Path:
    """A tiny random model of `family` (any in `rudder.core.hf_sites.LAYOUTS`; `config`: more config
    fields, e.g. rope_scaling). vLLM's CPU attention
    needs a head size (hidden / heads) of at least 32: use heads=2, kv_heads=1 there, or hidden=128
    with 4 heads (tensor parallelism splits the heads)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, tokenizer, layers, heads, kv_heads, hidden, **config))
    # Larger weights than the default init make the output depend on the input and give
    # greedy decoding clear winners (fewer float near-ties between batched and lone runs).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
        if family.startswith("gemma"):  # Gemma scales its embeddings by sqrt(hidden): undo it, or the tied
            model.get_input_embeddings().weight.div_(hidden**0.5)  # model just repeats its last token
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_sae(path: Path, hook_name: str, d_in: int = 64, d_sae: int = 256, architecture: str = "standard",
             k: int | None = None, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook_name, architecture=architecture, k=k,
                        model_name="tiny-llama"))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 0.2)
    sae.save(path)
    return sae


def make_transcoder(path: Path, layer: int, d: int = 64, d_sae: int = 256, architecture: str = "transcoder",
                    seed: int = 0) -> SAE:
    """A random transcoder from layer `layer`'s MLP input (blocks.L.mlp.hook_in: after the norm's
    weights) to its output, saved as SAELens saves one."""
    torch.manual_seed(seed)
    tc = SAE(SAEConfig(d_in=d, d_sae=d_sae, d_out=d, hook_name=f"blocks.{layer}.mlp.hook_in",
                       hook_name_out=f"blocks.{layer}.hook_mlp_out", architecture=architecture,
                       apply_b_dec_to_input=False, model_name="tiny-llama"))
    with torch.no_grad():
        tc.W_enc.normal_(0, 1 / d**0.5)
        tc.W_dec.copy_(tc.W_enc.T / tc.W_enc.T.norm(dim=1, keepdim=True))
        tc.b_enc.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
        if hasattr(tc, "W_skip"):
            tc.W_skip.normal_(0, 0.1 / d**0.5)
        if hasattr(tc, "threshold"):
            tc.threshold.uniform_(0, 0.2)
    tc.save(path)
    return tc
