"""The screen's C kernel is built once per source, flags and CPU, under RUDDER_CACHE; where it cannot be
built, a warning says what to do and the torch ops give the same answers. (Its answers themselves are
checked in test_screened_topk.py, every test there run with the kernel and without.)"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from rudder.core import screen_kernel, screened_topk


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty RUDDER_CACHE and no kernel loaded yet (and none left loaded from here afterwards)."""
    monkeypatch.setenv("RUDDER_CACHE", str(tmp_path))
    monkeypatch.delenv("RUDDER_SAE_KERNEL", raising=False)
    screen_kernel.library.cache_clear()
    yield tmp_path
    screen_kernel.library.cache_clear()


def top_of_random_encoder():
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(48, 768, generator=g), torch.randn(768, generator=g), torch.randn(10, 48, generator=g)
    values, ids = screened_topk.top_pre_acts(screened_topk.Screen.build(W, b), x, b, 8)
    want = torch.addmm(b, x, W).topk(8)
    torch.testing.assert_close(values, want.values, rtol=2e-6, atol=1e-6)
    assert torch.equal(ids, want.indices)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_the_kernel_is_built_once_into_the_cache_and_reused(fresh, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    path = screen_kernel.build()
    assert path.parent == fresh / "kernels" and path.suffix == ".so"
    built = path.stat().st_mtime_ns
    monkeypatch.setenv("CC", "cc")  # the same compiler, spelled out: the same key, nothing rebuilt
    assert screen_kernel.build() == path and path.stat().st_mtime_ns == built
    assert screen_kernel.library() is not None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    top_of_random_encoder()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_cached_kernel_that_does_not_load_is_built_again(fresh, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    path = screen_kernel.build()
    path.write_bytes(b"cut short")  # a file a killed copy left, say
    assert screen_kernel.library() is not None
    assert path.read_bytes()[:4] == b"\x7fELF"
    top_of_random_encoder()


def test_without_a_compiler_a_warning_says_what_to_do_and_the_torch_ops_answer(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    calls = []
    real = screened_topk._certified
    monkeypatch.setattr(screened_topk, "_certified", lambda *a: calls.append(1) or real(*a))
    with caplog.at_level(logging.WARNING, logger="rudder.core.screen_kernel"):
        assert screen_kernel.library() is None
        top_of_random_encoder()
    assert calls  # the torch ops ran the round
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "could not be built" in warning and "C compiler" in warning and "RUDDER_SAE_KERNEL=0" in warning
    assert not list((fresh / "kernels").iterdir())  # the failed build left nothing behind


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_each_rows_own_columns_in_one_call_equal_the_gathered_product(fresh):
    """`pre_acts_at` (an edit's own features) in C: each row's M columns, as the gathered float32
    product gives them; an id outside the dictionary raises, as indexing would, and reads nothing."""
    g = torch.Generator().manual_seed(1)
    w_t, b, x = torch.randn(300, 64, generator=g), torch.randn(300, generator=g), torch.randn(9, 64, generator=g)
    ids = torch.randint(0, 300, (9, 3), generator=g)
    got = screen_kernel.dots_at(w_t, b, x, ids)
    assert got is not None
    torch.testing.assert_close(got, torch.einsum("nd,nmd->nm", x, w_t[ids]) + b[ids], rtol=1e-5, atol=1e-5)
    ids[4, 1] = 300
    with pytest.raises(IndexError, match="outside the SAE's 300 features"):
        screen_kernel.dots_at(w_t, b, x, ids)
    # what the kernel does not take goes to the torch ops: a strided matrix, rows that need gradients
    assert screen_kernel.dots_at(w_t.t().contiguous().t(), b, x, ids.clamp(max=299)) is None
    assert screen_kernel.dots_at(w_t, b, x.requires_grad_(), ids.clamp(max=299)) is None


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_topk_edits_membership_in_one_call_raises_on_an_id_outside_the_dictionary(fresh):
    g = torch.Generator().manual_seed(2)
    W, b, x = torch.randn(32, 300, generator=g), torch.zeros(300), torch.randn(4, 32, generator=g)
    screen = screened_topk.Screen.build(W, b)
    pre = torch.addmm(b, x, W)
    above = pre.argmax(1, keepdim=True)  # a feature above 0 beside the bad id: the row would be tested
    for bad in (300, -1):
        feat = torch.cat([torch.tensor([[1], [2], [bad], [4]]), above], 1)
        with pytest.raises(IndexError, match="outside the SAE's 300 features"):
            screen_kernel.active(screen, x, b, 16, feat, 0.01)
    feat = torch.tensor([[1], [2], [300], [4]])
    acts, undecided = screen_kernel.active(screen, x, b, 16, feat.clamp(max=299), 0.01)
    top = pre.topk(16)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    decided = ~undecided
    torch.testing.assert_close(acts[decided], dense.gather(1, feat.clamp(max=299))[decided], rtol=2e-6, atol=1e-6)
