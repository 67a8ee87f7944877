"""Hooks on named sites for the length of a `with` block.

    with hooks(model, {"blocks.3.hook_resid_post": fn}):   # fn(site_name, x (B, S, d)) -> replacement
        model(ids)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from rudder.core.hf_sites import SiteFn, hook_site
from rudder.core.sites import Site


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, SiteFn]) -> Iterator[None]:
    """Install `fns[name]` at each site `name`; all are removed on leaving, also on an exception."""
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(hook_site(model, Site.parse(name), fn))
        yield
    finally:
        for h in handles:
            h.remove()
