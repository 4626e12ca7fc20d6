"""`python -m vq_jax.evaluate` on a tiny trained tokenizer: its PSNR / SSIM / usage / rFID equal
the trainer's periodic evaluation (eval.inception_weights set), and bad weight paths give
one-line errors naming the fix."""

import json
import os

import jax
import numpy as np
import pytest
from subproc import run_script, train_args

from benchmarks import tokenizer_report
from configs import vqvae
from vq_jax import api, evaluate, fid, metrics, trainer
from vq_jax.errors import UserError
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
        recon = np.clip(apply(tok.variables, x), -1, 1)
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
    assert "rfid_reference" not in r


def test_repeat_evaluation_reuses_the_inputs_statistics(workdir, tmp_path, monkeypatch):
    """A second evaluation with the same stats_dir sends only the reconstructions through
    Inception (the inputs' statistics come from the cache) and gives the same rFID; cached
    statistics of other images are recomputed. (The caching logic is under test, so a cheap
    stand-in for Inception counts the images; the real network's rFID is tested above.)"""
    calls = []

    def features(u8, **kw):  # a deterministic [N, 2048] function of the images
        calls.append(len(u8))
        flat = np.asarray(u8, np.float64).reshape(len(u8), -1) / 255.0
        reps = -(-2048 // flat.shape[1])
        return np.tile(flat, (1, reps))[:, :2048] * np.linspace(0.5, 1.5, 2048)

    monkeypatch.setattr(evaluate.fid_lib, "feature_fn", lambda weights: None)
    monkeypatch.setattr(evaluate.fid_lib, "inception_features", features)
    kw = dict(split="test", num=8, batch_size=4, inception_weights="unused", lpips_weights=None)
    first = evaluate.evaluate_tokenizer(workdir, stats_dir=str(tmp_path), **kw)
    assert sum(calls) == 16 and "rfid_reference" not in first  # inputs + reconstructions
    calls.clear()
    again = evaluate.evaluate_tokenizer(workdir, stats_dir=str(tmp_path), **kw)
    assert sum(calls) == 8  # the reconstructions only
    assert again["rfid_reference"] == evaluate.stats_cache_path(
        str(tmp_path), api.load(workdir).config, "test", 8
    )
    np.testing.assert_allclose(again["rfid"], first["rfid"], rtol=1e-4)
    # statistics that do not describe these images (other images, or a file written before
    # the images' hash was stored) are recomputed, not used
    path = again["rfid_reference"]
    mu, sigma, n = fid.load_statistics(path)
    for digest in ("0" * 64, ""):
        fid.save_statistics(path, mu + 1.0, sigma, n, digest)
        calls.clear()
        fresh = evaluate.evaluate_tokenizer(workdir, stats_dir=str(tmp_path), **kw)
        assert sum(calls) == 16 and "rfid_reference" not in fresh  # + a pass over the inputs
        np.testing.assert_allclose(fresh["rfid"], first["rfid"], rtol=1e-4)
        np.testing.assert_allclose(fid.load_statistics(path)[0], mu, rtol=1e-6)


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


class StubPrior:
    """A prior that 'samples' known images and records how it was called: gFID's plumbing
    (class balance, seeds, sampling overrides, batching) without training one (api.load_prior
    and Prior.generate themselves are tested in test_prior.py)."""

    def __init__(self, tokenizer, images):
        import ml_collections as mlc

        self.tokenizer, self.images, self.calls = tokenizer, images, []
        self.num_classes, self.step = 10, 7
        self.config = mlc.ConfigDict({"sampling": {"temperature": 1.0, "top_k": 0}})
        self.comps = type("Comps", (), {"kind": "autoregressive"})()

    def generate(self, num, *, labels=None, seed=0, **overrides):
        start = sum(n for n, _, _, _ in self.calls)
        self.calls.append((num, np.asarray(labels).tolist(), seed, overrides))
        return self.images[start : start + num], None, labels


@pytest.mark.skipif(not HAVE_INCEPTION, reason=f"no FID Inception weights at {INCEPTION}")
def test_gfid_plumbing(workdir, monkeypatch):
    tok = api.load(workdir)
    split = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=12)])
    ref, samples = split[:4], split[4:12][::-1]  # batches of 4 only: one compiled Inception
    stub = StubPrior(tok, samples)
    monkeypatch.setattr(api, "load_prior", lambda path: stub)
    r = evaluate.evaluate_prior(
        "P", num_samples=8, num_reference=4, batch_size=4, seed=3,
        inception_weights=INCEPTION, temperature=0.5, top_k=None,
    )  # fmt: skip
    assert [c[:3] for c in stub.calls] == [(4, [0, 1, 2, 3], 3), (4, [4, 5, 6, 7], 4)]
    assert stub.calls[0][3] == {"temperature": 0.5, "top_k": None}
    assert r["sampling"] == {"temperature": 0.5, "top_k": 0}
    assert r["gfid_num_samples"] == 8 and r["gfid_num_reference"] == 4 and r["class_balanced"]
    want = metrics.fid(ref, samples, weights=INCEPTION, batch_size=4)
    np.testing.assert_allclose(r["gfid"], want, rtol=1e-6)


@pytest.mark.skipif(not HAVE_INCEPTION, reason=f"no FID Inception weights at {INCEPTION}")
def test_prior_sweep_rows(workdir, monkeypatch, tmp_path):
    """benchmarks.prior_sweep: one row per setting (MaskGIT steps swept for MaskGIT only), the
    same seeds for every setting, and each gFID equal to metrics.fid of that setting's samples."""
    from benchmarks import prior_sweep

    assert prior_sweep.settings_grid("autoregressive", [1.0], [0, 2], [4, 8]) == [
        {"temperature": 1.0, "cfg_scale": 0},
        {"temperature": 1.0, "cfg_scale": 2},
    ]
    tok = api.load(workdir)
    split = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=12)])
    ref, samples = split[:4], split[4:12][::-1]
    stub = StubPrior(tok, samples)
    stub.comps.kind = "maskgit"
    stub.config.sampling.maskgit_steps = 8
    monkeypatch.setattr(api, "load_prior", lambda path: stub)
    rows = prior_sweep.sweep(
        ["P"], ["M"], temperatures=[0.5], cfg_scales=[0.0, 2.0], maskgit_steps=[4],
        num_samples=4, num_reference=4, batch_size=4, seed=3, inception_weights=INCEPTION,
    )  # fmt: skip
    want_overrides = [{"temperature": 0.5, "cfg_scale": c, "maskgit_steps": 4} for c in (0.0, 2.0)]
    assert [c[3] for c in stub.calls] == want_overrides
    assert [c[:3] for c in stub.calls] == [(4, [0, 1, 2, 3], 3)] * 2
    assert [r["sampling"]["maskgit_steps"] for r in rows] == [4, 4]
    assert [r["cfg_scale"] for r in rows] == [0.0, 2.0]
    for r, part in zip(rows, (samples[:4], samples[4:]), strict=True):
        want = metrics.fid(ref, part, weights=INCEPTION, batch_size=4)
        np.testing.assert_allclose(r["gfid"], want, rtol=1e-6)
        assert r["gfid_num_samples"] == 4 and r["gfid_num_reference"] == 4
    table = prior_sweep.markdown_table(rows)
    assert table.count("\n") == 4 and "| M | 0.5 | 2 | 4 |" in table
    # --append: a repeated setting replaces its row, a new one is added after the old rows
    again = [dict(rows[1], gfid=-1.0), dict(rows[0], cfg_scale=5.0, sampling={"cfg_scale": 5.0})]
    merged = prior_sweep.merge_rows(rows, again)
    assert [(r["cfg_scale"], r["gfid"]) for r in merged] == [
        (0.0, rows[0]["gfid"]), (2.0, -1.0), (5.0, rows[0]["gfid"])
    ]  # fmt: skip
    prior_sweep.plot(rows, str(tmp_path / "sweep.png"))
    assert os.path.getsize(tmp_path / "sweep.png") > 1000


def test_tokenizer_report_table(workdir, tmp_path):
    """benchmarks.tokenizer_report: the evaluate JSON's rFID / LPIPS reach the table, and the
    train tokens/s is the median logged steps/s x batch x tokens per image."""
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"rfid": 12.345, "rfid_num": 8, "lpips": 0.1234}))
    out = str(tmp_path / "report" / "cmp")
    rows = tokenizer_report.report([workdir, workdir], ["a", "b"], out, num=4, evals=[str(ev), ""])
    tok = api.load(workdir)
    u8, _, _ = next(api.iterate_split(tok, "test", num=2))
    tokens_per_image = np.prod(tok.encode(u8).shape[1:])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["train/steps_per_sec"] for r in map(json.loads, f) if "train/steps_per_sec" in r]
    want = np.median(rates) * tok.config.input.batch_size * tokens_per_image
    np.testing.assert_allclose(rows[0]["tokens_per_sec"], want, rtol=1e-9)
    assert rows[0]["rfid"] == 12.345 and "rfid" not in rows[1]
    table = open(out + ".md").read().splitlines()
    assert (
        len(table) == 4 and "| 12.35 (8) | 0.1234 |" in table[2] and table[3].endswith("| - | - |")
    )
    for suffix in ("_grid.png", "_curves.png", "_bars.png"):
        assert os.path.getsize(out + suffix) > 0
    with pytest.raises(UserError, match="--evals"):
        tokenizer_report.report([workdir], ["a"], out, evals=[str(tmp_path / "none.json")])
    with pytest.raises(UserError, match="one entry per workdir"):
        tokenizer_report.report([workdir], ["a", "b"], out)
