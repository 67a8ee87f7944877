"""Convert a checkpoint of the reference code (taufeeque9/codebook-features) to a Rudder codebook model.

    rudder convert-codebook REF_DIR --base BASE_DIR --out OUT_DIR

REF_DIR holds the reference's `config.json` (keys `codebook_at`, `num_codes`,
`k_codebook`, `layers_to_snap`, `codebook_type`, `similarity_metric`) and its weights
(`model.safetensors` or `pytorch_model.bin`): the wrapped model's own weights plus, per
snapped module, `...layers.L.<module>.codebook_layer.codebook.{i}.codebook.weight` and
`....ln.{weight,bias}` (group codebooks, one per head) or the same without `.{i}`.
BASE_DIR is the Hugging Face folder of the base model (config and tokenizer).

The reference outputs the codes themselves, as Rudder does, and scores LN(x) against
them by inner product or Euclidean distance; both metrics are kept, so the converted
model computes exactly what the reference computed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rudder.core.codebook import Codebook, CodebookConfig, save_codebooks
from rudder.core.errors import ArtifactError
from rudder.core.hf_sites import shape_of
from rudder.training.config import CODEBOOK_SITE_KINDS

KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(\w+)\.codebook_layer\.(?:codebook\.(\d+)\.)?"
                 r"(codebook\.weight|ln\.weight|ln\.bias)$")
SIMILARITY = {"inner_product": "inner_product", "euclidean": "euclidean", "cosine": "cosine"}


def _per_codebook(value, i: int):
    return value[i] if isinstance(value, list) else value


def _weights(ref: Path) -> dict[str, torch.Tensor]:
    if (ref / "model.safetensors").exists():
        return load_file(ref / "model.safetensors")
    if (ref / "pytorch_model.bin").exists():
        return torch.load(ref / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ArtifactError(f"{ref} has neither model.safetensors nor pytorch_model.bin")


def convert(ref: str | Path, base: str | Path, out: str | Path) -> list[CodebookConfig]:
    ref, base, out = Path(ref), Path(base), Path(out)
    for folder, what in ((ref, "the reference checkpoint"), (base, "the base model")):
        if not (folder / "config.json").exists():
            raise ArtifactError(f"{folder} has no config.json: pass {what}'s folder")
    cfg = json.loads((ref / "config.json").read_text())
    missing = [k for k in ("codebook_at", "num_codes", "k_codebook") if k not in cfg]
    if missing:
        raise ArtifactError(f"{ref / 'config.json'} lacks {missing}: is it a codebook-features checkpoint?")
    weights = _weights(ref)

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    shape = shape_of(model)
    own = model.state_dict()
    found: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    base_state = {}
    for key, tensor in weights.items():
        m = KEY.search(key)
        if m:
            layer, module, group, what = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            found[(layer, module)][int(group or 0)][what] = tensor
            continue
        name = next((key[i:] for i in [0] + [j + 1 for j, c in enumerate(key) if c == "."] if key[i:] in own), None)
        if name is None:
            raise ArtifactError(f"weight {key!r} matches nothing in the {shape.architecture} base model at {base}")
        base_state[name] = tensor
    absent = set(own) - set(base_state)
    if absent - {k for k in absent if "rotary" in k or k.endswith(".masked_bias") or k.endswith(".bias_mask")}:
        raise ArtifactError(f"the checkpoint lacks base weights {sorted(absent)[:5]}...")
    model.load_state_dict(base_state, strict=False)

    at = cfg["codebook_at"] if isinstance(cfg["codebook_at"], list) else [cfg["codebook_at"]]
    codebooks = []
    for (layer, module), groups in sorted(found.items()):
        kind = "mlp" if "mlp" in module else "attn_preproj" if "att" in module else None
        if kind is None or kind not in at:
            raise ArtifactError(f"codebook at layer {layer} module {module!r} is not one of codebook_at={at}")
        i = at.index(kind)
        codes = torch.stack([groups[g]["codebook.weight"] for g in sorted(groups)])  # (G, N, d)
        heads, n, d = codes.shape
        site = f"blocks.{layer}.{CODEBOOK_SITE_KINDS[kind]}"
        c = CodebookConfig(f"{kind}.{layer}", site,
                           num_codes=n, k=int(_per_codebook(cfg["k_codebook"], i)), d_code=d, num_heads=heads,
                           similarity=SIMILARITY[cfg.get("similarity_metric", "euclidean")])
        cb = Codebook(c)
        with torch.no_grad():
            cb.codes.copy_(codes)
            for g in sorted(groups):
                cb.ln_weight[g] = groups[g].get("ln.weight", torch.ones(d))
                cb.ln_bias[g] = groups[g].get("ln.bias", torch.zeros(d))
        codebooks.append(cb)
    if not codebooks:
        raise ArtifactError(f"no codebook weights (…codebook_layer…codebook.weight) in {ref}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    for extra in ("tokfsm.json",):
        if (base / extra).exists():
            shutil.copy(base / extra, out / extra)
    save_codebooks(codebooks, out)
    return [cb.cfg for cb in codebooks]


def run(ref: Path, base: Path, out: Path) -> list[CodebookConfig]:
    """`rudder convert-codebook`: `convert`, then list the codebooks written."""
    configs = convert(ref, base, out)
    for c in configs:
        print(f"{c.id}: {c.site}, {c.num_heads} x {c.num_codes} codes of {c.d_code}, k={c.k}, {c.similarity}")
    print(f"codebook model written to {out}")
    return configs

