"""Write tests/fixtures/saelens/: SAEs saved by SAELens itself, with its outputs on fixed inputs.

    python -m venv .venv-saelens && .venv-saelens/bin/pip install torch==2.13.0 sae-lens==6.54.12
    .venv-saelens/bin/python scripts/make_saelens_fixtures.py

SAELens is never a dependency of Rudder; this script runs once, in its own environment,
and the committed fixtures let CI check that our SAE module reads SAELens' files and
computes what SAELens computes.
"""

from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    SAE,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoderConfig,
    StandardSAEConfig,
    TopKSAEConfig,
    TranscoderConfig,
)
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests/fixtures/saelens"
D_IN, D_SAE = 16, 48


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, D_IN) * 2
    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny-llama"}
    configs = {
        "standard": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True),
        "topk": TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, apply_b_dec_to_input=False),
        "jumprelu": JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE),
        # as SAELens' TopK trainer leaves it: latents scaled by the decoder rows' norms (not unit here)
        "topk_rescaled": TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True),
        "gated": GatedSAEConfig(d_in=D_IN, d_sae=D_SAE),
        # an SAE of one attention head (head 1 of blocks.0.attn.hook_z; d_in = d_head)
        "standard_head": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE),
        # transcoders: read the MLP's input, predict its output (reconstruction = SAELens' forward)
        **{name: cls(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False) for name, cls in (
            ("transcoder", TranscoderConfig), ("skip_transcoder", SkipTranscoderConfig),
            ("jumprelu_transcoder", JumpReLUTranscoderConfig),
            ("jumprelu_skip_transcoder", JumpReLUSkipTranscoderConfig))},
    }
    for name, cfg in configs.items():
        for key, value in meta.items():
            setattr(cfg.metadata, key, value)
        if name == "standard_head":
            cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.0.attn.hook_z", 1
        if "transcoder" in name:
            cfg.metadata.hook_name, cfg.metadata.hook_name_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
        sae = SAE.from_dict(cfg.to_dict())
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.5)
            if name.startswith("jumprelu"):
                sae.threshold.uniform_(0, 0.5)
        folder = OUT / name
        sae.save_model(folder)
        with torch.no_grad():
            f = sae.encode(x)
            save_file({"x": x, "features": f, "reconstruction": sae(x)}, folder / "expected.safetensors")
        print(f"{folder}: SAELens {sae_lens.__version__}, L0 {(f > 0).sum(-1).float().mean():.1f}")


if __name__ == "__main__":
    main()
