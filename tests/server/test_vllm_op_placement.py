"""Where the vLLM worker places the steering op, and in which order the sites run (no vLLM needed:
a stand-in with vLLM's Llama layout: layers return (mlp_out, residual))."""

from __future__ import annotations

import torch
from torch import nn

import rudder.server.backends.vllm_worker as worker


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Identity()


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = _Attn(), nn.Identity()

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return self.mlp(self.self_attn.o_proj(residual)), residual


class _Model(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer() for _ in range(n))

    def forward(self, x):
        hidden, residual = x, None
        for layer in self.model.layers:
            hidden, residual = layer(None, hidden, residual)
        return hidden + residual


class _Recorder:
    def __init__(self, sites):
        self.sites, self.seen = sites, []

    def site(self, index, x):
        self.seen.append(self.sites[index])
        return x + 1.0  # a visible edit


def test_sites_run_in_model_order_whatever_their_list_order(monkeypatch):
    # Sorted as strings, layer 10's sites come before layer 9's.
    sites = sorted(["blocks.10.hook_resid_pre", "blocks.9.hook_resid_post", "blocks.0.hook_resid_pre",
                    "blocks.0.hook_mlp_out", "blocks.3.attn.hook_z", "blocks.10.hook_resid_post"])
    model = _Model(11)
    x = torch.randn(5, 8)
    plain = model(x)
    worker.place_ops(model, sites, num_layers=11)
    recorder = _Recorder(sites)
    monkeypatch.setattr(worker, "_STEERER", recorder)
    steered = model(x)
    assert recorder.seen == ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.3.attn.hook_z",
                             "blocks.9.hook_resid_post", "blocks.10.hook_resid_pre", "blocks.10.hook_resid_post"]
    assert not torch.allclose(steered, plain)


def test_with_nothing_to_do_the_op_returns_the_stream_unchanged():
    model = _Model(3)
    x = torch.randn(4, 8)
    plain = model(x)
    worker.place_ops(model, ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"], num_layers=3)
    assert worker._STEERER is None
    torch.testing.assert_close(model(x), plain)
