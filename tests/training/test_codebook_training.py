"""Codebook training: straight-through gradients, the two objectives, initialisation, dead codes, TokFSM."""

import json
import re
from pathlib import Path

import pytest
import torch

from rudder.core.code_search import CodeIndex, precision_recall, regex_labels, search
from rudder.core.codebook import Codebook, CodebookConfig, load_codebooks
from rudder.training.codebook import SnapStats, kmeans, replace_dead, train, train_snap
from rudder.training.config import CodebookTrainConfig
from rudder.training.tokfsm import TokFSM, make_model, make_tokenizer, save_model


def codebook(k=1, heads=2, n=16, d=8, seed=0):
    torch.manual_seed(seed)
    return Codebook(CodebookConfig("cb", "blocks.0.attn.hook_z", num_codes=n, k=k, d_code=d, num_heads=heads))


def cfg(**kw):
    return CodebookTrainConfig(model="unused", out="unused", **kw)


def snap_backward(cb: Codebook, c: CodebookTrainConfig, tokens: int):
    """train_snap on random inputs, then backward of <y, upstream> + the loss terms: (x, upstream, y, y_serve, ids)."""
    x = torch.randn(tokens, cb.cfg.num_heads, cb.cfg.d_code, requires_grad=True)
    upstream = torch.randn(tokens, cb.cfg.num_heads, cb.cfg.d_code)
    stats = SnapStats()
    y = train_snap(cb, x, c, stats)
    ((y * upstream).sum() + stats.loss).backward()
    y_serve, ids = cb.snap(x.detach())
    return x, upstream, y, y_serve, ids


def onto_codes(cb: Codebook, ids, per_token):
    """The gradient each code gets when every token passes per_token[t, g] / k to each of its chosen codes."""
    expected = torch.zeros_like(cb.codes)
    for t in range(ids.shape[0]):
        for g in range(ids.shape[1]):
            for c in ids[t, g]:
                expected[g, c] += per_token[t, g] / ids.shape[2]
    return expected


@pytest.mark.parametrize("k", [1, 3])
def test_aeloss_is_straight_through_and_codes_get_task_and_reconstruction_gradients(k):
    cb = codebook(k=k)
    x, upstream, y, y_serve, ids = snap_backward(cb, cfg(k=k, ln_align=0.0), 10)
    assert torch.equal(y.detach(), y_serve)  # training changes gradients, never the forward value
    torch.testing.assert_close(x.grad, upstream)  # straight through, no commitment term
    # codes: the task gradient through the mean of the chosen codes, plus d/dC mean_t ‖y − x‖²
    torch.testing.assert_close(cb.codes.grad, onto_codes(cb, ids, upstream + 2 * (y_serve - x.detach()) / 10))


def test_vqvae_codes_learn_only_from_reconstruction_and_inputs_get_the_commitment_term():
    cb = codebook()
    x, upstream, _, y_serve, ids = snap_backward(cb, cfg(loss="vqvae", commitment=0.25, ln_align=0.0), 6)
    torch.testing.assert_close(x.grad, upstream + 2 * 0.25 * (x.detach() - y_serve) / 6)
    torch.testing.assert_close(cb.codes.grad, onto_codes(cb, ids, 2 * (y_serve - x.detach()) / 6))


def test_aeloss_with_a_commitment_term_pulls_the_input_towards_its_codes():
    cb = codebook()
    x, upstream, _, y_serve, _ = snap_backward(cb, cfg(commitment=0.5, ln_align=0.0), 6)
    torch.testing.assert_close(x.grad, upstream + 2 * 0.5 * (x.detach() - y_serve) / 6)


def test_the_layernorm_learns_from_the_alignment_term():
    cb = codebook()
    stats = SnapStats()
    train_snap(cb, torch.randn(12, 2, 8), cfg(ln_align=1.0), stats)
    stats.loss.backward()
    assert cb.ln_weight.grad.abs().sum() > 0 and cb.ln_bias.grad.abs().sum() > 0


def test_dead_codes_are_replaced_by_current_inputs_and_live_ones_kept():
    cb = codebook(n=6, heads=1)
    before = cb.codes.detach().clone()
    counts = {"cb": torch.tensor([[3, 0, 1, 0, 0, 2]])}
    acts = {"cb": torch.randn(50, 1, 8)}
    n = replace_dead({"cb": cb}, counts, acts, torch.Generator().manual_seed(0))
    assert n == 3
    live, dead = [0, 2, 5], [1, 3, 4]
    assert torch.equal(cb.codes[0, live], before[0, live])
    for c in dead:  # each new code sits next to one of the inputs
        assert torch.cdist(cb.codes[0, c][None].detach(), acts["cb"][:, 0]).min() < 0.1


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0], [0, 10.0], [-10.0, -10.0]])
    x = torch.cat([c + 0.1 * torch.randn(40, 2, generator=g) for c in centres])
    found = kmeans(x, 3, iters=10, generator=g)
    assert torch.cdist(found, centres).min(dim=0).values.max() < 0.2


def test_regex_labels_mark_the_token_where_a_match_ends():
    texts = [["<bos>", "1", "23", "4", "5"], ["9", "12", "3"]]
    labels = regex_labels(texts, re.compile(r"23"))
    assert labels.tolist() == [[False, False, True, False, False], [False, False, True, False, False]]  # padded
    labels = regex_labels(texts, re.compile(r"1"))
    assert labels.tolist() == [[False, True, False, False, False], [False, True, False, False, False]]
    walk = [["<bos>"] + list("07073071")]  # states 07 07 30 71: the third "07" straddles two states
    labels = regex_labels(walk, re.compile(r"<bos>(?:\d\d)*07"))
    assert labels[0].nonzero().flatten().tolist() == [2, 4]


def test_precision_and_recall_of_codes():
    ids = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 2]])[:, :, None, None]  # (N=2, L=4, G=1, k=1)
    labels = torch.tensor([[False, True, True, False], [True, False, False, False]])
    precision, recall, count = precision_recall(ids, labels, num_codes=3)
    assert count[0].tolist() == [2, 3, 3]
    torch.testing.assert_close(precision[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(recall[0], torch.tensor([0.0, 1.0, 0.0]))
    best = search(ids, labels, 3, min_recall=0.5)
    assert [(h.code, h.precision, h.count) for h in best] == [(1, 1.0, 3)]


def test_tokfsm_encoding_round_trips_and_walks_follow_the_graph():
    fsm = TokFSM.build(seed=42)
    assert fsm.successors.shape == (100, 10)
    assert all(len(set(row)) == 10 for row in fsm.successors.tolist())
    ids = fsm.sample(8, torch.Generator().manual_seed(0))
    assert ids.shape == (8, 129) and (ids[:, 0] == 10).all() and (ids[:, 1:] < 10).all()
    states = fsm.decode(ids)
    assert fsm.transition_accuracy(states) == 1.0
    assert torch.equal(fsm.encode(states), ids)
    tok = make_tokenizer()
    text = "".join(fsm.state_text(s) for s in states[0].tolist())
    assert tok(text).input_ids == ids[0].tolist()
    assert tok.decode(ids[0, 1:].tolist()) == text
    broken = states.clone()
    broken[:, 1] = [s for s in range(100) if s not in fsm.successors[broken[0, 0]]][0]
    assert fsm.transition_accuracy(broken[:1]) < 1.0


@pytest.fixture(scope="module")
def tiny_codebook_model(tmp_path_factory) -> Path:
    """A tiny TokFSM model fine-tuned with attention and MLP codebooks for a few steps."""
    root = tmp_path_factory.mktemp("cbm")
    fsm = TokFSM.build()
    save_model(make_model(hidden=64, layers=2, heads=2, mlp=128), fsm, root / "base", {})
    c = CodebookTrainConfig(model=str(root / "base"), out=root / "cb", codebook_at=["attn_preproj", "mlp"],
                            num_codes=40, k=2, steps=8, batch=16, replace_dead_every=3, eval_sequences=16,
                            init="kmeans")
    metrics = train(c)
    return root / "cb", metrics


def test_training_writes_a_codebook_model_with_metrics(tiny_codebook_model):
    folder, metrics = tiny_codebook_model
    cbs = {cb.cfg.id: cb for cb in load_codebooks(folder)}
    assert set(cbs) == {"attn_preproj.0", "mlp.0", "attn_preproj.1", "mlp.1"}
    assert cbs["attn_preproj.1"].cfg.site == "blocks.1.attn.hook_z" and cbs["attn_preproj.1"].cfg.num_heads == 2
    assert cbs["mlp.0"].cfg.site == "blocks.0.hook_mlp_out" and cbs["mlp.0"].cfg.d_code == 64
    assert not torch.equal(cbs["mlp.0"].ln_weight, torch.ones_like(cbs["mlp.0"].ln_weight))  # the LN trained
    for key in ("perplexity", "next_token_accuracy", "reconstruction_mse", "dead_code_fraction",
                "transition_accuracy_greedy", "first_transition_accuracy", "invalid_next_state_mass",
                "sampled_walks_without_error"):
        assert key in metrics
    assert metrics["codes_replaced"] > 0
    assert 0 <= metrics["dead_code_fraction"] <= 1
    index = CodeIndex.load(folder)
    assert index.tokens.shape == (16, 129) and index.ids["attn_preproj.0"].shape == (16, 129, 2, 2)


def test_training_continues_from_the_codebooks_in_the_model_folder(tiny_codebook_model, tmp_path):
    folder, _ = tiny_codebook_model
    before = {cb.cfg.id: cb.codes.detach().clone() for cb in load_codebooks(folder)}
    c = CodebookTrainConfig(model=str(folder), out=tmp_path / "more", codebook_at=["attn_preproj", "mlp"],
                            num_codes=40, k=2, steps=2, batch=16, replace_dead_every=0, eval_sequences=16,
                            init="existing", lr=1e-6, model_lr_factor=0)
    train(c)
    after = {cb.cfg.id: cb.codes for cb in load_codebooks(tmp_path / "more")}
    for k, v in before.items():  # two tiny steps: the codes moved, but from where they were
        assert not torch.equal(after[k], v) and torch.allclose(after[k], v, atol=1e-4)
    with pytest.raises(Exception, match="does not match"):
        train(c.model_copy(update={"num_codes": 41}))


@pytest.mark.slow
def test_continuing_adds_the_codebooks_the_model_folder_lacks_from_sampled_activations(tiny_codebook_model, tmp_path):
    """Attention codebooks first, then init=existing with MLP codebooks too: the attention codes
    continue from where they were, and each new MLP code starts as a real MLP output of the first
    batch, taken with the attention codebooks snapping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rudder.training.codebook import Batches, site_activations, snapping

    base = tiny_codebook_model[0].parent / "base"
    attn = CodebookTrainConfig(model=str(base), out=tmp_path / "attn", codebook_at=["attn_preproj"], num_codes=40,
                               steps=2, batch=16, replace_dead_every=0, eval_sequences=16)
    train(attn)
    more = attn.model_copy(update={"model": str(tmp_path / "attn"), "out": tmp_path / "both",
                                   "codebook_at": ["attn_preproj", "mlp"], "init": "existing",
                                   "lr": 1e-7, "model_lr_factor": 0.0})
    train(more)
    before = {cb.cfg.id: cb for cb in load_codebooks(tmp_path / "attn")}
    after = {cb.cfg.id: cb for cb in load_codebooks(tmp_path / "both")}
    assert set(after) == {"attn_preproj.0", "attn_preproj.1", "mlp.0", "mlp.1"}
    for k, cb in before.items():
        torch.testing.assert_close(after[k].codes, cb.codes, atol=1e-5, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "attn").eval()
    first = Batches(tmp_path / "attn", AutoTokenizer.from_pretrained(tmp_path / "attn"), more).next()
    with snapping(model, before):
        acts = site_activations(model, first, {k: after[k] for k in ("mlp.0", "mlp.1")})
    for k in ("mlp.0", "mlp.1"):
        nearest = torch.cdist(after[k].codes.detach()[0], acts[k][:, 0]).min(dim=1).values
        assert nearest.max() < 1e-3 * acts[k].norm(dim=-1).mean()
    record = json.loads((tmp_path / "both" / "codebook_training.json").read_text())
    assert [r["config"]["codebook_at"] for r in record["earlier"]] == [["attn_preproj"]]
    with pytest.raises(Exception, match="none of the codebooks"):
        train(more.model_copy(update={"codebook_at": ["mlp"]}))


def test_the_code_index_matches_the_served_codebooks(tiny_codebook_model):
    """The index is what the reference backend reads out at the same tokens."""
    import asyncio

    from rudder.core.steering import ReadoutSpec, SteeringSpec
    from rudder.server.backends.base import EngineRequest
    from rudder.server.backends.reference import ReferenceEngine
    from tests.server.engines import collect

    folder, _ = tiny_codebook_model
    index = CodeIndex.load(folder)
    engine = ReferenceEngine(folder)
    spec = SteeringSpec(readouts=ReadoutSpec(codebooks=("attn_preproj.1", "mlp.0"), include_prompt=True))
    rows = index.tokens[:3].tolist()
    try:
        results = asyncio.run(collect(engine, [EngineRequest(r, steering=spec, trace=True) for r in rows]))
    finally:
        asyncio.run(engine.stop())
    for i, events in enumerate(results):
        for pos, ev in enumerate(events):
            got = {r.source: r for r in ev.readouts}
            for cb_id in ("attn_preproj.1", "mlp.0"):
                want = index.ids[cb_id][i, pos]  # (G, k)
                assert got[cb_id].codes == want.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_codebook_training_runs_on_llama_and_gpt2_with_the_offline_corpus(tmp_path, family):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny import make_model
    from tests.tiny import make_tokenizer as make_text_tokenizer

    if family == "llama":
        model_dir = make_model(tmp_path / "m", layers=2)
    else:
        tok = make_text_tokenizer()
        model_dir = tmp_path / "m"
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128)
                        ).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    c = CodebookTrainConfig(model=str(model_dir), out=tmp_path / "cb", codebook_at=["attn_preproj", "mlp"],
                            layers=[1], num_codes=32, steps=3, batch=4, context=32, corpus_tokens=20_000,
                            eval_sequences=4)
    metrics = train(c)
    assert metrics["perplexity"] > 1 and 0 <= metrics["next_token_accuracy"] <= 1
    sites = {cb.cfg.site for cb in load_codebooks(tmp_path / "cb")}
    assert sites == {"blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"}
