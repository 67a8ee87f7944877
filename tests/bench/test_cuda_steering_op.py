"""bench/cuda_steering_op.py replays one captured step with new tables copied into its buffers.
Without CUDA the capture cannot run, so this checks on CPU what the capture relies on: tables
copied into the first tables' tensors steer exactly as freshly built ones, on the same tensors."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rudder.core.sae import SAE, SAEConfig
from tests.bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("cuda_steering_op") as module:
        yield module


def test_copied_tables_steer_as_fresh_ones_on_the_same_buffers(bench):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    d, batch, layers = 64, 6, [0, 2]
    model = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100)).eval()
    saes = {}
    for i in layers:
        sae = SAE(SAEConfig(d_in=d, d_sae=4 * d, hook_name=f"blocks.{i}.hook_resid_post"))
        torch.nn.init.normal_(sae.W_enc, std=d ** -0.5)
        torch.nn.init.normal_(sae.W_dec, std=0.1)
        saes[sae.cfg.hook_name] = sae
    ids = torch.randint(0, 100, (batch, 1), generator=gen)
    slot = torch.tensor([0, -1, 2, 3, 4, 5])
    position = torch.arange(batch) * 2

    def logits(steering, specs):
        steering.set(specs, slot, position)
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=False).logits
    first = bench.random_specs(batch, list(saes), 4 * d, d, gen)
    second = bench.random_specs(batch, list(saes), 4 * d, d, gen)
    swapped = bench.Steering(model, layers, saes, batch)
    logits(swapped, first)
    buffers = [t for table in swapped.tables.saes.values() for t in vars(table).values() if isinstance(t, torch.Tensor)]
    got = logits(swapped, second)
    after = [t for table in swapped.tables.saes.values() for t in vars(table).values() if isinstance(t, torch.Tensor)]
    assert all(a is b for a, b in zip(buffers, after))  # the captured tensors, rewritten in place
    swapped.remove()

    fresh = bench.Steering(model, layers, saes, batch)
    want = logits(fresh, second)
    fresh.remove()
    torch.testing.assert_close(got, want)
    assert (got - plain).abs().amax(dim=(1, 2))[1] == 0  # the row of no request is left alone
    assert (got - plain).abs().max() > 1e-3  # the others are steered


def test_without_cuda_it_says_so_and_exits_cleanly(bench, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark itself runs")
    monkeypatch.setattr(sys, "argv", ["cuda_steering_op.py"])
    bench.main()
    assert "no CUDA device" in capsys.readouterr().out
