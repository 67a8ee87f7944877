"""A frozen Hugging Face causal LM with hook sites, for training and evaluating artifacts.

    lm = HookedLM.load(folder)
    acts = lm.activations(ids, ["blocks.15.hook_resid_pre"])          # stops after the last site
    logits, acts = lm.run(ids, capture=[...], replace={site: fn})     # full forward, sites spliced

The first position of every sequence is an attention sink whose residual norm is
tens of times the others'. SAEs never see it: `activations` leaves it out and
`run` passes it through every replacement unchanged. Some later positions become sinks
too (in SmolLM2-135M at layer 15, about 1 window in 25 has one at position 1, with a norm
~150x the median: 2 such rows held 87% of the sum of squares of 6,096). `sink_rows`
finds them by norm; training drops them (`drop_sinks=True`) and `run` passes them
through as it does position 0, so they neither dominate the loss nor the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rudder.core.errors import InvalidArgument
from rudder.core.hf_sites import ModelShape, layout_of, shape_of
from rudder.core.hooks import hooks
from rudder.core.sites import Site

SINK_NORM_RATIO = 10.0
"""a position whose activation norm exceeds this multiple of its sequence's median is a sink"""

Replacement = Callable[[Tensor], Tensor]
"""Maps a site's activations (batch, seq-1, d) without the sink position to replacements."""


def sink_rows(x: Tensor) -> Tensor:
    """(batch, seq, d) activations of positions 1.. → (batch, seq) bool: the sinks among them."""
    n = x.float().norm(dim=-1)  # (B, S)
    return n > SINK_NORM_RATIO * n.median(dim=-1, keepdim=True).values


class _Stop(Exception):
    """Raised by the last capture hook: nothing after it is needed."""


def check_model_folder(folder: str | Path) -> int:
    """Fail early, before anything heavy loads: the folder must be a causal LM. Returns its layer count."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise InvalidArgument(f"model {folder} is not a Hugging Face model folder (no config.json there); "
                              "pass --set model=PATH, or run `rudder fetch-default` for the default model")
    return AutoConfig.from_pretrained(folder).num_hidden_layers


@dataclass
class HookedLM:
    model: nn.Module
    tokenizer: object
    shape: ModelShape
    autocast: bool = False

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", autocast: bool = False,
             dtype: torch.dtype = torch.float32) -> HookedLM:
        """The frozen model, its weights in `dtype` (bfloat16 halves its memory; activations are
        handed out in float32 either way)."""
        check_model_folder(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        layout_of(model)  # an unsupported family fails here, by name
        return cls(model, tokenizer, shape_of(model), autocast)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def site(self, name: str) -> Site:
        return Site.parse(name, self.shape.num_layers)

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def activations(self, ids: Tensor, sites: Iterable[str], drop_sinks: bool = False) -> dict[str, Tensor]:
        """Activations at `sites`, (batch·(seq−1), d) in float32, without the sink position.

        `drop_sinks`: also leave out the later sink positions (`sink_rows` at any site), so
        the rows no longer map to positions; training takes this, position-indexed readers not."""
        sites = sorted({self.site(s) for s in sites})
        out: dict[str, Tensor] = {}
        sinks: list[Tensor] = []
        last = sites[-1]

        def grab(name: str, x: Tensor) -> Tensor:
            if drop_sinks:
                sinks.append(sink_rows(x[:, 1:]).reshape(-1))
            out[name] = x[:, 1:].reshape(-1, x.shape[-1]).float()
            if len(out) == len(sites) and name == last.name:
                raise _Stop
            return x

        try:
            with hooks(self.model, {s.name: grab for s in sites}), self._autocast():
                self.model(ids.to(self.device))
        except _Stop:
            pass
        if drop_sinks:
            keep = ~torch.stack(sinks).any(0)
            out = {name: rows[keep] for name, rows in out.items()}
        return out

    def run(self, ids: Tensor, capture: Iterable[str] = (),
            replace: dict[str, Replacement] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Full forward: logits (batch, seq, vocab) in float32 and the captured sites' activations
        (batch, seq−1, d), after any replacement. Gradients flow if the replacements need them."""
        replace = replace or {}
        capture = set(capture)
        captured: dict[str, Tensor] = {}
        wanted = {self.site(s) for s in capture} | {self.site(s) for s in replace}

        def hook(name: str, x: Tensor) -> Tensor:
            if name in replace:
                body = x[:, 1:]
                new = torch.where(sink_rows(body)[..., None], body, replace[name](body).to(x.dtype))
                x = torch.cat([x[:, :1], new], dim=1)
            if name in capture:
                captured[name] = x[:, 1:].float()
            return x

        with hooks(self.model, {s.name: hook for s in sorted(wanted)}), self._autocast():
            logits = self.model(ids.to(self.device)).logits
        return logits.float(), captured
