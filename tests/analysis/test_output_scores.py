"""Output scores (Arad et al. 2025) on a tiny model: a feature whose decoder row points at a token's
unembedding ranks first, the scores are the paper's formula, and the server ranks by them."""

from __future__ import annotations

import pytest
import torch

from rudder import client as rc
from rudder.analysis.output_scores import logit_lens_top, output_scores, save_output_scores
from rudder.core.feature_metadata import load_output_scores, rank_by_effect
from rudder.core.sae import SAE
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.training.lm import HookedLM
from tests.tiny import make_sae

SITE = "blocks.2.hook_resid_post"
PLANTED = 17


def word_token(tok) -> tuple[int, str]:
    """A token that decodes to a word of letters (so a regex can name it)."""
    for t in range(len(tok)):
        text = tok.decode([t]).strip()
        if len(text) >= 3 and text.isalpha():
            return t, text
    raise AssertionError("the tiny tokenizer has no word token")


@pytest.fixture(scope="module")
def planted(tiny_dir, tmp_path_factory):
    """An SAE at the last layer whose feature PLANTED writes along one word token's unembedding row."""
    path = tmp_path_factory.mktemp("scores") / "s"
    make_sae(path, SITE)
    lm = HookedLM.load(tiny_dir)
    token, text = word_token(lm.tokenizer)
    sae = SAE.load(path)
    with torch.no_grad():
        row = lm.model.get_output_embeddings().weight[token].float()
        sae.W_dec[PLANTED] = row / row.norm()
    sae.save(path)
    return lm, SAE.load(path), path, token, text


def test_the_planted_feature_scores_highest_and_its_logit_lens_names_the_token(planted):
    lm, sae, _, token, _ = planted
    scores, top = output_scores(lm, sae, prompt="the quick brown", batch=50)
    assert top[PLANTED, 0].item() == token
    assert scores.argmax().item() == PLANTED
    assert ((scores >= 0) & (scores <= 1)).all()


def test_the_score_is_the_papers_formula_for_one_feature(planted):
    lm, sae, _, _, _ = planted
    prompt, amp = "the quick brown", 10.0
    scores, top = output_scores(lm, sae, prompt=prompt, amp=amp, batch=7)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    _, acts = lm.run(ids, capture=[SITE])
    boost = amp * sae.encode(acts[SITE][0, -1:]).max()
    f = 3

    def add(x):
        x = x.clone()
        x[:, -1] += boost * sae.W_dec[f].detach()
        return x

    logits, _ = lm.run(ids, replace={SITE: add})
    probs = logits[0, -1].softmax(-1)
    order = torch.argsort(probs, descending=True)
    ranks = [(order == t).nonzero().item() for t in top[f].tolist()]
    want = (1 - min(ranks) / probs.numel()) * probs[top[f]].max().item()
    assert scores[f].item() == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(top, logit_lens_top(lm.model, sae.W_dec.detach()))


def test_a_search_by_effect_over_the_server_ranks_the_planted_feature_first(planted, tiny_dir):
    lm, sae, path, token, text = planted
    engine = ReferenceEngine(tiny_dir, saes=[f"s={path}"])
    with BackgroundServer(engine, "tiny") as srv, rc.Client(srv.address, timeout=60) as c:
        with pytest.raises(rc.FailedPrecondition, match="rudder analyze output-scores"):
            c.list_features("s", says=text)
    scores, top = output_scores(lm, sae, prompt="the quick brown")
    save_output_scores(path, scores, top, "the quick brown", 10.0)
    assert torch.equal(load_output_scores(path)[0], scores)
    engine = ReferenceEngine(tiny_dir, saes=[f"s={path}"])
    with BackgroundServer(engine, "tiny") as srv, rc.Client(srv.address, timeout=60) as c:
        best, total = c.best_feature_by_effect("s", text)
        assert best.id == PLANTED and text in best.says_tokens and total >= 1
        assert best.output_score == pytest.approx(scores[PLANTED].item(), rel=1e-5)
        with pytest.raises(rc.InvalidArgument, match="does not compile"):
            c.list_features("s", says="(")
        assert c.list_features("s", says="zzzzqqq").total == 0


def test_rank_by_effect_matches_whole_tokens_case_insensitively():
    scores = torch.tensor([0.1, 0.9, 0.5])
    top = torch.tensor([[0, 1], [2, 3], [1, 2]])
    words = {0: " Cat", 1: " cats", 2: " dog", 3: "category"}
    hits = rank_by_effect(scores, top, words.__getitem__, "cats?")
    assert [(f, w) for f, _, w in hits] == [(2, ["cats"]), (0, ["Cat", "cats"])]
