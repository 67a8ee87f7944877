"""The feature dashboard, rendered by a real headless Chromium (Debian's package)."""

import shutil
import subprocess

import pytest
import torch

from rudder.analysis.dashboard import sae_dashboard
from rudder.core.sae import SAE, SAEConfig
from rudder.training.corpus import train_eval_split
from rudder.training.lm import HookedLM
from tests.tiny import make_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    lm = HookedLM.load(make_model(root / "m", layers=2))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=32, hook_name="blocks.1.hook_resid_post"))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.normal_(0, 0.3)
    windows = train_eval_split(lm.tokenizer, 32, eval_tokens=32 * 24, max_tokens=32 * 200).eval
    path = sae_dashboard(lm, sae, windows, root / "out", ids=[3, 7, 11])
    # the expected top example of feature 7: the token where it is largest
    feats = torch.cat([sae.encode(lm.activations(torch.tensor(windows[i:i + 8]), [sae.cfg.hook_name])
                                  [sae.cfg.hook_name]) for i in range(0, len(windows), 8)])
    flat = int(feats[:, 7].argmax())
    seq, pos = divmod(flat, 31)
    peak = lm.tokenizer.decode([windows[seq][1 + pos]])
    return path, peak, float(feats[:, 7].max().detach())


def test_the_page_holds_each_feature_with_its_top_example(page):
    path, peak, vmax = page
    text = path.read_text()
    for i in (3, 7, 11):
        assert f'id="feature-{i}"' in text
    section = text.split('id="feature-7"')[1].split("<section")[0]
    assert f'class="tok peak" style="background: rgba(255,140,0,1.00)" title="{vmax:.3f}"' in section
    assert "Logit effects" in section and "<svg" in section


@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium is not installed (apt-get install chromium; scripts/setup.sh tries)")
def test_chromium_renders_the_dashboard_and_shows_the_named_features_top_example(page, tmp_path):
    path, peak, vmax = page
    url = path.as_uri() + "#feature-7"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    section = dom.split('id="feature-7"')[1].split("<section")[0]
    assert f'title="{vmax:.3f}"' in section
    shot = tmp_path / "dashboard.png"
    subprocess.run(common + ["--window-size=1280,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a page with content, not a blank one


def test_a_codebook_dashboard_shows_a_tokfsm_state_code_on_that_state(tmp_path):
    """The shipped model's most precise state code (tokfsm_codes.json; state 97's code in mlp.1,
    precision and recall 1 on the code index): its top examples peak on the state's last digit."""
    import json
    from pathlib import Path

    from rudder.analysis.dashboard import codebook_dashboard
    from rudder.core.codebook import load_codebooks
    from rudder.training.tokfsm import TokFSM

    model = Path(__file__).resolve().parents[2] / "models" / "tokfsm-codebook"
    sc = max(json.loads((model / "tokfsm_codes.json").read_text())["state_codes"],
             key=lambda s: (s["precision"], s["recall"]))
    lm = HookedLM.load(model)
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(model)}
    windows = TokFSM.load(model).sample(64, torch.Generator().manual_seed(7)).tolist()
    page = codebook_dashboard(lm, codebooks, sc["codebook"], windows, tmp_path, [(sc["head"], sc["code"])])
    fid = sc["head"] * codebooks[sc["codebook"]].cfg.num_codes + sc["code"]
    section = page.read_text().split(f'id="feature-{fid}"')[1]
    assert f"head {sc['head']} · code {sc['code']}" in section
    state = str(sc["state"]).zfill(2)
    examples = section.split("Top activating examples")[1].split("<h4>")[0].split('<div class="ex">')[1:]
    assert examples
    for ex in examples:  # the boxed token is the state's last digit, right after its first
        before, peak = ex.split('class="tok peak"')
        assert peak.split(">")[1].startswith(state[1]) and before.rstrip().endswith(f">{state[0]}</span><span")
