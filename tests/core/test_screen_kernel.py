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


def _decode_sized_topk_sae(seed: int):
    """A frozen TopK SAE (32 -> 512, k = 32): most rows of its decode steps the screen decides."""
    from tests.core.test_steering import frozen_topk_sae

    return frozen_topk_sae(seed, d_in=32, d_sae=512, k=32)


def _random_edit_tables(g: torch.Generator, slots: int, d_sae: int):
    """Tables of `slots` requests with 1-4 feature edits each, every op kind, scopes that start and end
    at several positions, and repeated features (ops that chain)."""
    from rudder.core.steering import FeatureEdit, Op, Scope, SteeringSpec, build_tables

    specs = []
    for _ in range(slots):
        n = int(torch.randint(1, 5, (1,), generator=g))
        feats = torch.randint(0, 6, (n,), generator=g).tolist()  # few distinct features: some chain
        edits = []
        for f in feats:
            op = Op(int(torch.randint(1, 5, (1,), generator=g)))
            value = round(float(torch.randn((), generator=g)) * 3, 2)
            a = int(torch.randint(0, 6, (1,), generator=g))
            scope = Scope("range", a, a + int(torch.randint(1, 6, (1,), generator=g))) if f % 2 else Scope()
            edits.append(FeatureEdit("s", f * (d_sae // 6), op, value, scope))
        specs.append(SteeringSpec(features=tuple(edits)))
    return build_tables(specs, [4] * slots).saes["s"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@torch.no_grad()
def test_a_steps_feature_edits_in_one_call_equal_the_torch_ops(fresh):
    """`feature_edits` (the edits after f0, on a CPU) gives `_feature_edits`' f1 and last bit for bit
    (inf, NaN and -0.0 activations, ops that chain on one feature, scopes, rows of no slot) and
    `_edit_delta`'s delta; an active op on an id outside the dictionary raises."""
    from rudder.core.steering import _edit_delta, _feature_edits
    from tests.core.test_steering import random_sae

    g = torch.Generator().manual_seed(3)
    sae = random_sae(3).requires_grad_(False)
    for trial in range(20):
        table = _random_edit_tables(g, 5, sae.cfg.d_sae)
        N, M = 40, table.feature.shape[1]
        slot = torch.randint(-1, 5, (N,), generator=g)
        pos = torch.randint(0, 10, (N,), generator=g)
        f0 = torch.randn(N, M, generator=g)
        odd = torch.rand(N, M, generator=g)
        f0[odd < 0.05] = float("inf")
        f0[(odd >= 0.05) & (odd < 0.1)] = float("nan")
        f0[(odd >= 0.1) & (odd < 0.15)] = -0.0
        got = screen_kernel.feature_edits(table, slot, pos, f0, sae.W_dec)
        assert got is not None
        f1, last, delta = got
        s, act = table.active_of(slot, pos)
        _, want_f1, want_last = _feature_edits(sae, torch.zeros(N, 16), table, s, act, f0=f0)
        assert torch.equal(last, want_last), trial
        same = (f1 == want_f1) | (f1.isnan() & want_f1.isnan())
        assert same.all() and torch.equal(f1.signbit(), want_f1.signbit()), trial
        want = _edit_delta(sae, table.feature[s], f0, want_f1, want_last)
        torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(delta[slot < 0], torch.zeros(int((slot < 0).sum()), 16))
    table.feature[0, 0] = sae.cfg.d_sae
    table.valid[0, 0], table.start[0, 0], table.end[0, 0] = True, 0, 100
    with pytest.raises(IndexError, match="outside the SAE's 64 features"):
        screen_kernel.feature_edits(table, torch.zeros(3, dtype=torch.long), torch.arange(3), torch.zeros(3, M),
                                    sae.W_dec)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@pytest.mark.parametrize("arch", ["standard", "topk"])
@pytest.mark.parametrize("rows_n", [6, 80])  # a decode step, and a prefill past screened_topk.ALL_ROWS
@torch.no_grad()
def test_a_steered_step_is_the_same_with_the_kernel_and_with_the_torch_ops(fresh, monkeypatch, arch, rows_n):
    """The whole site op on frozen SAEs (as served): edits alone, and edits with a readout, give the
    same stream and readouts through the C kernel as through the torch ops."""
    from dataclasses import replace

    from rudder.core.steering import RowIndex, SiteArtifacts, StepTables, steer_site
    from tests.core.test_steering import SITE, frozen_topk_sae, random_sae

    sae = frozen_topk_sae(4) if arch == "topk" else random_sae(4).requires_grad_(False)
    taken = []  # what the C calls of the edits gave: `edit` (a TopK decode step's whole edit), `feature_edits`
    def recorded(real):
        return lambda *a: taken.append(real(*a)) or taken[-1]

    for name in ("edit", "feature_edits"):
        monkeypatch.setattr(screen_kernel, name, recorded(getattr(screen_kernel, name)))
    g = torch.Generator().manual_seed(4)
    edits = _random_edit_tables(g, 4, sae.cfg.d_sae)
    x = torch.randn(rows_n, 16, generator=g) * 2
    rows = RowIndex(torch.randint(-1, 4, (rows_n,), generator=g), torch.randint(0, 10, (rows_n,), generator=g))
    for readout in (False, True):
        table = edits
        if readout:
            table = replace(edits, reads=torch.tensor([True, False, True, False]), any_reads=True, top_k=4,
                            selected=torch.tensor([0, 10, 20]))
            rows = RowIndex(rows.slot, rows.position, torch.rand(rows_n, generator=g) < 0.5)
        results = []
        for kernel in ("1", "0"):
            monkeypatch.setenv("RUDDER_SAE_KERNEL", kernel)
            out, readouts = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}),
                                       StepTables(saes={"s": table}), rows)
            results.append((out, readouts))
        (out_c, read_c), (out_t, read_t) = results
        assert taken and taken[0] is not None and all(t is None for t in taken[1:])  # the kernel, then torch
        taken.clear()
        assert not torch.equal(out_c, x)
        torch.testing.assert_close(out_c, out_t, rtol=1e-5, atol=1e-5)
        assert len(read_c) == len(read_t) == int(readout)
        for a, b in zip(read_c, read_t):
            assert torch.equal(a.rows, b.rows) and torch.equal(a.top_ids, b.top_ids)
            torch.testing.assert_close(a.top_values, b.top_values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.selected_values, b.selected_values, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@torch.no_grad()
@pytest.mark.parametrize("layout", ["every row", "a row of no slot"])
def test_a_topk_decode_readout_reads_its_top_and_edits_from_one_call(fresh, monkeypatch, layout):
    """A TopK decode step where every row reads the top of the SAE and edits it takes one C call after the
    product (`screen_kernel.read_edit`: the readout and the edited stream; where a row of no slot is in the
    step, `screen_kernel.read`: the top and the edited features' activations) and gives the stream and
    readouts of the general path (the torch ops); a step whose rows have fewer active features than the
    readout shows falls back to that path."""
    from dataclasses import replace

    from rudder.core.steering import RowIndex, SiteArtifacts, StepTables, steer_site
    from tests.core.test_steering import SITE

    sae = _decode_sized_topk_sae(5)
    taken = []

    def recorded(name, real):
        return lambda *a: taken.append((name, real(*a))) or taken[-1][1]

    for name in ("read_edit", "read"):
        monkeypatch.setattr(screen_kernel, name, recorded(name, getattr(screen_kernel, name)))
    g = torch.Generator().manual_seed(5)
    table = replace(_random_edit_tables(g, 4, sae.cfg.d_sae), reads=torch.ones(4, dtype=torch.bool), any_reads=True,
                    every_slot_reads=True, top_k=8, selected=torch.zeros(0, dtype=torch.long))
    n = 24
    slot = torch.arange(n) % 4
    if layout != "every row":
        slot[5] = -1
    rows = RowIndex(slot, torch.randint(0, 10, (n,), generator=g), slot >= 0, every_row_read=layout == "every row")
    call = "read_edit" if layout == "every row" else "read"
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(6)) * 2  # rows the screen decides
    for shift, fused in ((0.0, True), (-40.0, False)):  # then too few features above 0: the general path
        sae.b_enc.add_(shift)
        results = []
        for kernel in ("1", "0"):
            monkeypatch.setenv("RUDDER_SAE_KERNEL", kernel)
            results.append(steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), StepTables(saes={"s": table}),
                                      rows))
            answered = [name for name, got in taken if got is not None]
            assert answered == ([call] if fused and kernel == "1" else []), (shift, kernel, taken)
            assert any(name == call for name, _ in taken), taken
            taken.clear()
        (out_c, (read_c,)), (out_t, (read_t,)) = results
        assert not torch.equal(out_c, x)
        torch.testing.assert_close(out_c, out_t, rtol=1e-5, atol=1e-5)
        assert torch.equal(read_c.rows, read_t.rows) and torch.equal(read_c.top_ids, read_t.top_ids), shift
        torch.testing.assert_close(read_c.top_values, read_t.top_values, rtol=1e-5, atol=1e-5)
        R = read_c.rows.numel()
        assert R == int((slot >= 0).sum()) and read_c.selected_values.shape == read_t.selected_values.shape == (R, 0)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_topk_readout_step_in_one_call_equals_the_calls_it_fuses(fresh, monkeypatch, dtype):
    """`screen_kernel.read_edit` (a TopK decode step where every row reads the top and edits, one C call
    after the product) gives, bit for bit, the stream and readout of the calls it fuses (`read`,
    `feature_edits`, `edited_top`, then `x + delta` in the stream's dtype)."""
    from dataclasses import replace

    from rudder.core.steering import RowIndex, SiteArtifacts, StepTables, steer_site
    from tests.core.test_steering import SITE

    sae = _decode_sized_topk_sae(8)
    real, taken = screen_kernel.read_edit, []
    g = torch.Generator().manual_seed(8)
    answered, n = 0, 24
    for step in range(8):
        table = replace(_random_edit_tables(g, 4, sae.cfg.d_sae), reads=torch.ones(4, dtype=torch.bool),
                        any_reads=True, every_slot_reads=True, top_k=int(torch.randint(1, 12, (1,), generator=g)),
                        selected=torch.zeros(0, dtype=torch.long))
        rows = RowIndex(torch.randint(0, 4, (n,), generator=g), torch.randint(0, 10, (n,), generator=g),
                        torch.ones(n, dtype=torch.bool), every_row_read=True)
        x = (torch.randn(n, 32, generator=g) * 2).to(dtype)
        results = []
        for fused in (True, False):
            monkeypatch.setattr(screen_kernel, "read_edit", (lambda *a: taken.append(real(*a)) or taken[-1]) if fused
                                else (lambda *a: None))
            results.append(steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), StepTables(saes={"s": table}),
                                      rows))
        assert len(taken) == 1, step
        answered += taken.pop() is not None  # else a row needs the general path: it answered both
        (out_f, (read_f,)), (out_c, (read_c,)) = results
        assert out_f.dtype == dtype and torch.equal(out_f, out_c), step
        assert torch.equal(read_f.rows, read_c.rows) and torch.equal(read_f.top_ids, read_c.top_ids), step
        assert torch.equal(read_f.top_values, read_c.top_values), step
    assert answered >= 2


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_readouts_top_with_its_edits_written_in_equals_the_torch_ops(fresh):
    """`edited_top` gives `steering._edited_top`'s top: edited features written over their entries among
    the top, or entering it from outside, edits that are not a feature's last left out, several per row."""
    from rudder.core.steering import _edited_top

    g = torch.Generator().manual_seed(6)
    for trial in range(30):
        R, n, M, top_k = 12, 10, 3, int(torch.randint(1, 11, (1,), generator=g))
        values, at = torch.rand(R, n, generator=g).sort(dim=1, descending=True)
        ids = torch.randperm(40, generator=g)[:n].repeat(R, 1).gather(1, at)
        feat = torch.where(torch.rand(R, M, generator=g) < 0.5, ids[:, torch.randint(0, n, (M,), generator=g)],
                           torch.randint(40, 45, (R, M), generator=g))
        f1 = torch.rand(R, M, generator=g) * 1.2
        last = torch.rand(R, M, generator=g) < 0.7
        last &= ~((feat[:, :, None] == feat[:, None, :]) & torch.ones(M, M, dtype=torch.bool).triu(1)).any(-1)
        got = screen_kernel.edited_top(values, ids, feat, f1, last, top_k)
        assert got is not None
        want = _edited_top(values, ids, feat, f1, last, top_k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), trial


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_topk_edit_step_in_one_call_equals_the_calls_it_fuses(fresh, monkeypatch, dtype):
    """A TopK decode step that edits and reads nothing is one C call after the screen's product
    (`screen_kernel.edit`): its stream equals, bit for bit, the membership call and the edits' call
    (`active`, `feature_edits`) followed by `x + delta` in the stream's dtype; rows no op applies to come
    back exactly as they went in (-0.0 included), rows of no slot too. A step with a row the bounds cannot
    decide takes the general path, with the same answer."""
    from rudder.core.steering import RowIndex, SiteArtifacts, StepTables, steer_site
    from tests.core.test_steering import SITE

    sae = _decode_sized_topk_sae(7)
    real, taken = screen_kernel.edit, []
    g = torch.Generator().manual_seed(7)
    answered = 0
    for step in range(8):
        table = _random_edit_tables(g, 4, sae.cfg.d_sae)
        n = 24
        rows = RowIndex(torch.randint(-1, 4, (n,), generator=g), torch.randint(0, 10, (n,), generator=g))
        x = (torch.randn(n, 32, generator=g) * 2).to(dtype)
        x[rows.slot == -1, 0] = -0.0
        results = []
        for fused in (True, False):
            monkeypatch.setattr(screen_kernel, "edit", (lambda *a: taken.append(real(*a)) or taken[-1]) if fused
                                else (lambda *a: None))
            results.append(steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), StepTables(saes={"s": table}),
                                      rows)[0])
        assert len(taken) == 1, step
        fused = taken.pop() is not None  # else a row the bounds could not decide: the general path answered
        answered += fused
        fused_out, calls_out = results
        assert fused_out.dtype == dtype and not torch.equal(fused_out, x)
        assert torch.equal(fused_out, calls_out), step
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        none = rows.slot == -1
        assert torch.equal(fused_out[none], x[none])
        assert not fused or torch.equal(fused_out[none].view(bits), x[none].view(bits))
    assert answered >= 2  # most steps: the fused call's answer is what was compared
