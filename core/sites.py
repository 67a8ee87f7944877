"""Hook sites, named as TransformerLens names its hooks so SAELens SAEs attach unchanged.

    blocks.L.hook_resid_pre    residual stream entering layer L
    blocks.L.hook_resid_post   residual stream leaving layer L
    blocks.L.hook_mlp_out      output of layer L's MLP
    blocks.L.attn.hook_z       per-head attention output before the output projection
    blocks.L.mlp.hook_in       the MLP's input, after the norm before it (TransformerLens'
                               blocks.L.ln2.hook_normalized, accepted as the same site): where
                               transcoders read
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rudder.core.errors import InvalidArgument

KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "attn.hook_z", "mlp.hook_in")
ALIASES = {"ln2.hook_normalized": "mlp.hook_in"}
RUN_ORDER = ("hook_resid_pre", "attn.hook_z", "mlp.hook_in", "hook_mlp_out", "hook_resid_post")  # within a layer
_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in (*KINDS, *ALIASES)) + ")$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    @property
    def order(self) -> tuple[int, int]:
        """Where it runs in a forward pass: sites with smaller orders run first."""
        return self.layer, RUN_ORDER.index(self.kind)

    @property
    def per_head(self) -> bool:
        return self.kind == "attn.hook_z"

    @classmethod
    def parse(cls, name: str, num_layers: int | None = None) -> Site:
        m = _PATTERN.match(name)
        if not m:
            raise InvalidArgument(
                f"unknown site {name!r}: expected blocks.<layer>.<kind> with kind one of {', '.join(KINDS)}"
            )
        layer = int(m.group(1))
        if num_layers is not None and layer >= num_layers:
            raise InvalidArgument(f"site {name!r} names layer {layer}, but the model has layers 0..{num_layers - 1}")
        return cls(layer, ALIASES.get(m.group(2), m.group(2)))


def all_sites(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in range(num_layers) for kind in KINDS]
