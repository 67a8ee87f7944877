"""Codebook bottlenecks (Codebook Features, Tamkin, Taufeeque & Goodman 2023).

At a site, each token's activation (per head for attention sites) is replaced by
the mean of the k codes most similar to it:

    ids = topk( LN(x) · Cᵀ / ‖C‖ , k )          scoring: LayerNorm'd input, cosine
    y   = mean( C[ids] )                         output: the raw codes

(`similarity` may also be `inner_product`, LN(x)·Cᵀ, or `euclidean`, −‖LN(x) − C‖, the
reference code's two metrics, so that its checkpoints convert exactly.)

The LayerNorm only serves the scoring: the codes live in the activation's own
space, so the layer after the bottleneck sees activations of the usual scale.

Forcing code c (steering) puts it into the active set, replacing the
lowest-ranked code not itself forced, with weight s: s = 1 gives exactly the
output the codebook would give had it chosen c; other s scales its contribution.

Artifact: a folder with `codebooks.json` (one entry per codebook) and
`codebooks.safetensors` (`<id>.codes [G, N, d]`, `<id>.ln_weight [G, d]`, `<id>.ln_bias [G, d]`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rudder.core.errors import ArtifactError
from rudder.core.fileio import replace_file

CONFIG_FILE = "codebooks.json"
SIMILARITIES = ("cosine", "inner_product", "euclidean")
WEIGHTS_FILE = "codebooks.safetensors"


@dataclass
class CodebookConfig:
    id: str
    site: str
    """hook site, e.g. blocks.2.attn.hook_z (one codebook per head) or blocks.2.hook_mlp_out"""
    num_codes: int
    k: int
    d_code: int
    num_heads: int = 1
    """groups: the site's activation is split into this many equal parts, one codebook each"""
    ln_eps: float = 1e-5
    similarity: str = "cosine"
    """how LN(x) is compared with the codes: cosine | inner_product | euclidean"""

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ArtifactError(f"codebook {self.id!r}: similarity {self.similarity!r} is not one of {SIMILARITIES}")
        if not (0 < self.k <= self.num_codes):
            raise ArtifactError(
                f"codebook {self.id!r}: need 0 < k <= num_codes, got k={self.k}, num_codes={self.num_codes}"
            )
        if self.d_code < 1 or self.num_heads < 1:
            raise ArtifactError(f"codebook {self.id!r}: d_code and num_heads must be positive")


@dataclass
class ForcedCodes:
    """One pass of forced codes: each (row, head) pair appears at most once."""

    rows: Tensor  # (F,) token rows
    heads: Tensor  # (F,)
    codes: Tensor  # (F,)
    strength: Tensor  # (F,)


class Codebook(nn.Module):
    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        g, n, d = cfg.num_heads, cfg.num_codes, cfg.d_code
        self.codes = nn.Parameter(torch.randn(g, n, d) / d**0.5)
        self.ln_weight = nn.Parameter(torch.ones(g, d))
        self.ln_bias = nn.Parameter(torch.zeros(g, d))

    def scores(self, x: Tensor) -> Tensor:
        """Similarity (by default cosine) of each LayerNorm'd head activation with each code: (T, G, N)."""
        xn = F.layer_norm(x, (self.cfg.d_code,), eps=self.cfg.ln_eps) * self.ln_weight + self.ln_bias  # (T, G, d)
        if self.cfg.similarity == "euclidean":
            return -torch.cdist(xn.transpose(0, 1), self.codes).transpose(0, 1)
        return torch.bmm(xn.transpose(0, 1), self._scoring_codes()).transpose(0, 1)

    def _scoring_codes(self) -> Tensor:
        """The codes as scoring reads them, (G, d, N): unit-norm for cosine (normalising xn changes no
        ranking, so only the codes are). Served codebooks don't change, so this is cached until they do."""
        codes = self.codes
        if codes.requires_grad and torch.is_grad_enabled():
            return (F.normalize(codes, dim=-1) if self.cfg.similarity == "cosine" else codes).transpose(1, 2)
        key = (codes.data_ptr(), codes._version, codes.dtype, codes.device)
        if getattr(self, "_cache_key", None) != key:
            unit = F.normalize(codes.detach(), dim=-1) if self.cfg.similarity == "cosine" else codes.detach()
            self._cache = unit.transpose(1, 2).contiguous()
            self._cache_key = key
        return self._cache

    def snap(self, x: Tensor, forced: list[ForcedCodes] = ()) -> tuple[Tensor, Tensor]:
        """x (T, G, d) -> (y (T, G, d), ids (T, G, k)) with forced codes applied in order."""
        ids = self.scores(x).topk(self.cfg.k, dim=-1).indices  # (T, G, k), best first
        heads = torch.arange(self.cfg.num_heads, device=x.device)[None, :, None]
        if not forced:
            return self.codes[heads, ids].sum(dim=-2) / self.cfg.k, ids
        weight = torch.ones(ids.shape, dtype=x.dtype, device=x.device)
        pinned = torch.zeros(ids.shape, dtype=torch.bool, device=x.device)
        for f in forced:
            _force(ids, weight, pinned, f)
        chosen = self.codes[heads, ids]  # (T, G, k, d)
        return (weight.unsqueeze(-1) * chosen).sum(dim=-2) / self.cfg.k, ids

    def forward(self, x: Tensor) -> Tensor:
        return self.snap(x)[0]


def _force(ids: Tensor, weight: Tensor, pinned: Tensor, f: ForcedCodes) -> None:
    """Put f.codes into the active sets of f.rows (in place). `pinned` marks forced slots."""
    if f.rows.numel() == 0:
        return
    k = ids.shape[-1]
    hit = ids[f.rows, f.heads] == f.codes[:, None]  # (F, k)
    free = ~pinned[f.rows, f.heads]  # a slot forced by an earlier pass is never replaced
    lowest_free = (k - 1) - free.flip(-1).int().argmax(dim=-1)
    slot = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), lowest_free)
    ids[f.rows, f.heads, slot] = f.codes
    weight[f.rows, f.heads, slot] = f.strength.to(weight.dtype)
    pinned[f.rows, f.heads, slot] = True


# ---------------------------------------------------------------- artifact


def save_codebooks(codebooks: list[Codebook], folder: str | Path) -> Path:
    """Write the codebooks into `folder` (usually the codebook model's own folder).

    Each file goes in through a rename; the config goes last, so a reader that finds
    it also finds the weights it names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{cb.cfg.id}.{name}": p.detach().contiguous().cpu()
               for cb in codebooks for name, p in cb.named_parameters()}
    config = json.dumps({"codebooks": [asdict(cb.cfg) for cb in codebooks]}, indent=2)
    replace_file(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    replace_file(folder / CONFIG_FILE, lambda tmp: tmp.write_text(config))
    return folder


def load_codebooks(path: str | Path, device: str | torch.device = "cpu") -> list[Codebook]:
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise ArtifactError(f"{path} holds no codebooks: {CONFIG_FILE} is missing")
    weights = load_file(path / WEIGHTS_FILE)
    out = []
    for entry in json.loads((path / CONFIG_FILE).read_text())["codebooks"]:
        cb = Codebook(CodebookConfig(**entry))
        state = {name: weights.get(f"{cb.cfg.id}.{name}") for name, _ in cb.named_parameters()}
        missing = [n for n, t in state.items() if t is None]
        if missing:
            raise ArtifactError(f"{path / WEIGHTS_FILE}: codebook {cb.cfg.id!r} lacks {missing}")
        cb.load_state_dict(state)
        out.append(cb.to(device).requires_grad_(False))
    return out
