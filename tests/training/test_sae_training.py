"""SAE training on a tiny random Llama: objectives, dead features, export, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rudder.core.errors import InvalidArgument, TrainingError
from rudder.core.sae import SAE, SAEConfig
from rudder.core.sites import Site
from rudder.training.config import load_config
from rudder.training.sae import SaeTrainer, TrainingSae, aux_k_loss, downstream_sites, run

ROOT = Path(__file__).resolve().parents[2]


def config(tiny_dir, out, **overrides):
    base = {"model": str(tiny_dir), "sites": ["blocks.1.hook_resid_post"], "d_sae": 128, "tokens": 12_288,
            "context": 32, "batch_tokens": 256, "corpus_tokens": 24_000, "buffer_tokens": 2048,
            "eval_tokens": 1024, "lr": 3e-3, "warmup_tokens": 512, "checkpoint_every_steps": 10, "out": str(out)}
    return load_config(None, {**base, **overrides})


def test_local_sae_learns_to_reconstruct_and_writes_a_servable_artifact(tiny_dir, tmp_path):
    (result,) = run(config(tiny_dir, tmp_path / "sae")).values()
    assert result["explained_variance"] > 0.6
    assert result["l0"] < 64  # sparser than half the dictionary
    assert result["ce_loss_score"] > 0.3  # better than zero-ablating the site
    sae = SAE.load(tmp_path / "sae")
    meta = sae.cfg.metadata
    assert meta["objective"] == "local" and meta["training_tokens"] == 12_288
    assert meta["eval"]["l0"] == pytest.approx(result["l0"])
    assert set(meta["loss"]) >= {"sparsity", "mse"}
    features = json.loads((tmp_path / "sae" / "feature_metadata.json").read_text())["features"]
    assert len(features) == 128 and any(f["top_examples"] for f in features)
    assert not (tmp_path / "sae.ckpt").exists()  # the checkpoint goes once the artifact is written

    from rudder.core.artifacts import Artifacts
    from rudder.core.hf_sites import ModelShape
    shape = ModelShape("llama", 3, 64, 4, 16, 320)
    attached = Artifacts().add_sae(str(tmp_path / "sae"), shape, torch.device("cpu"))
    assert attached.features is not None and attached.features[0].id == 0


def test_exported_sae_on_raw_activations_equals_the_trained_one_on_scaled_ones():
    torch.manual_seed(0)
    m = TrainingSae(SAEConfig(d_in=8, d_sae=24, hook_name="blocks.0.hook_resid_pre"), scale=0.37)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    x = torch.randn(5, 8) * 3
    recon, f, _ = m(x * 0.37)
    exported = m.export({})
    torch.testing.assert_close(exported.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported.decode(exported.encode(x)), recon / 0.37, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["e2e", "e2e_ds"])
def test_end_to_end_training_lowers_the_kl_of_the_spliced_model(tiny_dir, tmp_path, objective):
    cfg = config(tiny_dir, tmp_path / objective, objective=objective, tokens=4096, lr=1e-2)
    trainer = SaeTrainer(cfg)
    before = {}
    real_build = trainer._build

    def build_and_measure(sample):
        real_build(sample)
        from rudder.training.evaluate import evaluate_sae
        (m,) = trainer.saes.values()
        before.update(evaluate_sae(trainer.lm, m.export({}), trainer.split.eval))

    trainer._build = build_and_measure
    (after,) = trainer.finish(trainer.train()).values()
    assert after["kl"] < 0.7 * before["kl"]
    sae = SAE.load(tmp_path / objective)
    assert sae.cfg.metadata["objective"] == objective and sae.cfg.metadata["loss"]["kl"] == 1.0
    if objective == "e2e_ds":
        assert sae.cfg.metadata["loss"]["downstream_sites"] == ["blocks.2.hook_resid_post"]


def test_downstream_sites_default_to_every_later_residual_stream():
    cfg = load_config(None, {"objective": "e2e_ds", "out": "x"})
    assert downstream_sites(cfg, [Site.parse("blocks.27.hook_resid_post")], 30) == [
        "blocks.28.hook_resid_post", "blocks.29.hook_resid_post"]
    assert downstream_sites(cfg, [Site.parse("blocks.28.attn.hook_z")], 30) == [
        "blocks.28.hook_resid_post", "blocks.29.hook_resid_post"]
    with pytest.raises(InvalidArgument, match="later layer"):
        downstream_sites(cfg, [Site.parse("blocks.29.hook_resid_post")], 30)


def test_topk_sae_has_exactly_k_active_latents(tiny_dir, tmp_path):
    (result,) = run(config(tiny_dir, tmp_path / "topk", architecture="topk", k=6)).values()
    assert 5 <= result["l0"] <= 6  # ReLU after the top-k may zero a few
    assert SAE.load(tmp_path / "topk").cfg.k == 6


def test_aux_k_loss_trains_only_dead_latents():
    torch.manual_seed(0)
    m = TrainingSae(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_pre", architecture="topk", k=2))
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    x = torch.randn(32, 8)
    recon, f, pre = m(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7, 11]] = True
    aux_k_loss(m, x, recon, pre, dead, k_aux=2).backward()
    grad = m.sae.W_enc.grad.abs().sum(0)
    assert (grad[~dead] == 0).all() and (grad[dead] > 0).all()


def test_topk_encodes_and_decodes_sparsely_with_the_dense_paths_values_and_gradients():
    """Gradients to every parameter and to the input (e2e training sends them upstream), through
    the k chosen latents and the AuxK ones, equal the dense encode-then-decode's."""
    torch.manual_seed(0)
    m = TrainingSae(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_pre", architecture="topk", k=3))
    for p in m.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(32, 8, requires_grad=True)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 9, 12]] = True

    def dense():  # f @ W_dec: SAELens' TopK decode, and AuxK's reference
        pre = m.sae.pre_acts(x)
        values, ids = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, ids, torch.relu(values))
        recon = f @ m.sae.W_dec + m.sae.b_dec
        aux_v, aux_i = pre.masked_fill(~dead, float("-inf")).topk(2, dim=-1)
        f_aux = torch.zeros_like(pre).scatter(-1, aux_i, torch.relu(aux_v))
        return recon, (recon - x).pow(2).mean() + torch.nn.functional.mse_loss(f_aux @ m.sae.W_dec,
                                                                               (x - recon).detach())

    def sparse():
        recon, _, pre = m(x)
        return recon, (recon - x).pow(2).mean() + aux_k_loss(m, x, recon, pre, dead, k_aux=2)

    grads = []
    for fn in (dense, sparse):
        m.zero_grad()
        x.grad = None
        recon, loss = fn()
        loss.backward()
        grads.append((recon.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, msg=name)


def test_resampling_restarts_dead_features_at_badly_reconstructed_inputs(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path / "r", **{"dead.window_tokens": 1})
    trainer = SaeTrainer(cfg)
    from rudder.training.sae import WindowStream
    trainer._build(trainer._sample(WindowStream(trainer.split.train, 0, trainer.world), 4))
    (name, m), = trainer.saes.items()
    trainer.since_fired[name][:5] = 10  # features 0..4 are dead
    x = torch.randn(16, 64)
    err = torch.zeros(16)
    err[9] = 1.0  # only input 9 is reconstructed badly
    for p in trainer.params:  # give Adam some state to reset
        p.grad = torch.ones_like(p)
    trainer.opt.step()
    assert trainer._resample({"last": {name: (x, err)}}) == 5
    want = (x[9] - m.sae.b_dec) / (x[9] - m.sae.b_dec).norm()
    torch.testing.assert_close(m.sae.W_dec[:5], want.expand(5, -1))
    assert (m.sae.b_enc[:5] == 0).all()
    assert (trainer.opt.state[m.sae.W_dec]["exp_avg"][:5] == 0).all()
    assert (trainer.opt.state[m.sae.W_dec]["exp_avg"][5:] != 0).all()


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides,message", [
    ({"sites": ["blocks.9.hook_resid_post"]}, "model has layers 0..2"),
    ({"sites": ["blocks.1.resid"]}, "unknown site"),
    ({"d_sae": 0}, "d_sae must be at least 1"),
    ({"model": "/nonexistent/model"}, "not a Hugging Face model folder"),
    ({"objective": "e2e_ds", "loss.downstream": 0}, "needs loss.downstream > 0"),
    ({"loss.kl": -1}, "loss.kl"),
])
def test_bad_configs_fail_before_training_with_a_clear_message(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        SaeTrainer(config(tiny_dir, tmp_path / "sae", **overrides))
    assert not (tmp_path / "sae").exists()


def test_unwritable_output_fails_before_training(tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InvalidArgument, match="cannot write the artifact"):
        SaeTrainer(config(tiny_dir, blocker / "sae"))


def test_nan_loss_stops_training_and_writes_nothing(tiny_dir, tmp_path):
    with pytest.raises(TrainingError, match="lower `lr`"):
        run(config(tiny_dir, tmp_path / "sae", lr=1e20, max_grad_norm=None, warmup_tokens=0))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".ckpt")] == []


def test_cli_reports_a_bad_config_without_a_traceback(tiny_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rudder.cli", "train", "sae", "--model", str(tiny_dir),
                           "--site", "blocks.7.hook_resid_pre", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "layers 0..2" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- resume, torchrun


def _train_cmd(tiny_dir, out, *extra):
    return [sys.executable, "-m", "rudder.cli", "train", "sae", "--model", str(tiny_dir), "--site",
            "blocks.1.hook_resid_post", "--out", str(out), "--tokens", "61440", "--set", "batch_tokens=256",
            "--set", "context=32", "--set", "corpus_tokens=24000", "--set", "buffer_tokens=2048", "--set",
            "d_sae=128", "--set", "eval_tokens=512", "--set", "checkpoint_every_steps=20", *extra]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "sae"
    ckpt = tmp_path / "sae.ckpt" / "checkpoint.pt"
    proc = subprocess.Popen(_train_cmd(tiny_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 240
    done = subprocess.run(_train_cmd(tiny_dir, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {ckpt} at step {killed_at}" in done.stderr
    assert SAE.load(out).cfg.metadata["training_tokens"] == 61440
    assert not ckpt.exists()


@pytest.mark.slow
def test_torchrun_trains_data_parallel_on_two_processes(tiny_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_train_cmd(tiny_dir, out, "--set", "tokens=8192", "--set", "threads=1")[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    sae = SAE.load(out)
    assert sae.cfg.metadata["world_size"] == 2
    assert sae.cfg.metadata["eval"]["explained_variance"] > 0.3


@pytest.mark.parametrize("objective", ["local", "e2e"])
def test_a_bfloat16_frozen_model_trains_a_float32_sae_about_as_well(tiny_dir, tmp_path, objective):
    results = {}
    for dtype in ("float32", "bfloat16"):
        trainer = SaeTrainer(config(tiny_dir, tmp_path / dtype, model_dtype=dtype, objective=objective, tokens=4096))
        assert {p.dtype for p in trainer.lm.model.parameters()} == {getattr(torch, dtype)}
        (results[dtype],) = trainer.finish(trainer.train()).values()
        sae = SAE.load(tmp_path / dtype)
        assert sae.W_enc.dtype == torch.float32 and sae.cfg.metadata["config"]["model_dtype"] == dtype
    f32, bf16 = results["float32"], results["bfloat16"]
    assert bf16["kl"] == pytest.approx(f32["kl"], rel=0.1)
    assert bf16["explained_variance"] == pytest.approx(f32["explained_variance"], abs=0.05)


@pytest.mark.slow
def test_ranks_given_different_configs_stop_before_training_with_one_line(tiny_dir, tmp_path):
    wrapper = tmp_path / "rank_lr.py"
    wrapper.write_text("import os, sys\nfrom rudder.cli import main\n"
                       "sys.exit(main(sys.argv[1:] + ['--set', f\"lr={1e-3 * (1 + int(os.environ['RANK']))}\"]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
           *_train_cmd(tiny_dir, tmp_path / "sae")[3:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    # each rank's one line (torchrun then reports the failed children with its own traceback)
    assert done.stderr.count("error: the ranks were given different configs") == 2, done.stderr[-3000:]
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("architecture, encoder_scale", [("topk", 1.0), ("standard", 0.1)])
def test_initialisation_ties_the_encoder_to_the_decoder(architecture, encoder_scale):
    """TopK starts from the decoder's transpose (Gao et al. 2024, A.1), so its first reconstruction
    of a latent's own direction is the direction itself; the standard SAE starts at a tenth."""
    cfg = SAEConfig(d_in=16, d_sae=64, hook_name="blocks.0.hook_resid_post", architecture=architecture,
                    k=4 if architecture == "topk" else None)
    m = TrainingSae(cfg)
    x = torch.randn(256, 16) + 3.0
    m.initialise(x, torch.Generator().manual_seed(0))
    assert torch.allclose(m.sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.allclose(m.sae.W_enc, encoder_scale * m.sae.W_dec.T)
    assert torch.allclose(m.sae.b_dec, x.median(dim=0).values)
