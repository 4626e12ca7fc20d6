"""Stage 2 end to end: tokenizer -> token cache -> prior steps -> generate / inpaint."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from subproc import run_script

import vq_jax
from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api, errors, trainer


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tok"))
    config = vqvae.get_config("tiny")
    config.train.steps = 2
    trainer.train(config, workdir)
    return workdir


def _prior_config(tokenizer_workdir, kind="autoregressive", **train):
    config = prior_configs.get_config("tiny")
    config.tokenizer_workdir = tokenizer_workdir
    config.prior.kind = kind
    config.train.update(train)
    return config


@pytest.fixture(scope="module", params=["autoregressive", "maskgit"])
def prior_workdir(request, tokenizer_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(f"prior_{request.param}"))
    result = trainer.train(_prior_config(tokenizer_workdir, request.param), workdir)
    assert np.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    return workdir


def test_prior_training_writes_cache_checkpoints_metrics_and_samples(prior_workdir):
    with np.load(os.path.join(prior_workdir, "tokens", "train.npz")) as f:
        assert f["tokens"].shape == (64, 8, 8) and f["tokens"].dtype == np.int32
        assert f["labels"].shape == (64,)
    assert os.path.exists(os.path.join(prior_workdir, "tokens", "test.npz"))
    rows = [json.loads(x) for x in open(os.path.join(prior_workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for k in ("train/accuracy", "train/perplexity", "train/l2_grads", "train/lr"):
        assert np.isfinite(train_rows[-1][k])
    assert os.path.exists(os.path.join(prior_workdir, "eval", "samples_step_4.png"))


def test_token_cache_is_reused(tokenizer_workdir, prior_workdir, capsys):
    config = _prior_config(tokenizer_workdir, steps=4)
    config.prior.kind = json.load(open(os.path.join(prior_workdir, "config.json")))["prior"]["kind"]
    trainer.train(config, prior_workdir)  # already at step 4: evaluates only
    out = capsys.readouterr().out
    assert "tokenizing" not in out and "resumed from checkpoint step 4" in out


def test_cache_matches_the_tokenizer(tokenizer_workdir, prior_workdir):
    tok = vq_jax.load(tokenizer_workdir)
    images = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=10)])
    with np.load(os.path.join(prior_workdir, "tokens", "test.npz")) as f:
        np.testing.assert_array_equal(f["tokens"][:10], tok.encode(images))


def test_generate_shapes_reproducibility_and_class_conditioning(prior_workdir):
    prior = api.load_prior(prior_workdir)
    images, tokens, labels = prior.generate(4, labels=3, seed=1)
    chex.assert_shape(images, (4, 16, 16, 1))
    chex.assert_shape(tokens, (4, 8, 8))
    assert images.dtype == np.uint8 and (labels == 3).all()
    assert tokens.min() >= 0 and tokens.max() < 32
    again = prior.generate(4, labels=3, seed=1)[1]
    np.testing.assert_array_equal(tokens, again)
    # The class reaches every position's logits...
    model, seq_len = prior.comps.model, 64
    inputs = jax.numpy.full((1, seq_len), getattr(model, "mask_id", 0))
    logits = [model.apply({"params": prior.params}, inputs, jax.numpy.array([c])) for c in (3, 7)]
    assert float(jax.numpy.abs(logits[0] - logits[1]).min(axis=-1).max()) > 0
    # ...and changes the samples. (Only asserted for the GPT: after 4 training steps a tiny
    # MaskGIT's class token reaches the others through near-uniform attention, moving logits by
    # ~1e-3 of their spread, too little to flip a categorical draw with the same noise.)
    if prior.comps.kind == "autoregressive":
        other = prior.generate(4, labels=7, seed=1)[1]
        assert not np.array_equal(tokens, other)


def test_inpainting_keeps_known_tokens(prior_workdir):
    prior = api.load_prior(prior_workdir)
    tok = prior.tokenizer
    originals = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=3)])
    mask = np.zeros((3, 16, 16), bool)
    mask[:, 4:9, 6:12] = True
    completed, tokens, token_mask = prior.inpaint(originals, mask, labels=np.arange(3), seed=0)
    expected_mask = np.zeros((3, 8, 8), bool)
    expected_mask[:, 2:5, 3:6] = True  # token (i, j) covers pixels [2i, 2i+2) x [2j, 2j+2)
    np.testing.assert_array_equal(token_mask, expected_mask)
    known = tok.encode(originals)
    np.testing.assert_array_equal(tokens[~token_mask], known[~token_mask])
    chex.assert_shape(completed, (3, 16, 16, 1))
    with pytest.raises(ValueError, match="inpainting mask has shape"):
        prior.inpaint(originals, np.zeros((3, 8, 8), bool))


def test_sample_py_generate_and_inpaint(prior_workdir, tmp_path):
    out = str(tmp_path / "gen.npz")
    run_script(
        "sample.py",
        f"--prior_workdir={prior_workdir}",
        "--mode=generate",
        "--num=6",
        "--seed=2",
        "--temperature=0.7",
        "--maskgit_steps=2",
        f"--out={out}",
    )
    # the sampling flags reach the sampler: the same tokens as the API with those overrides
    want = api.load_prior(prior_workdir).generate(6, seed=2, temperature=0.7, maskgit_steps=2)[1]
    with np.load(out) as f:
        assert f["images"].shape == (6, 16, 16, 1) and f["images"].dtype == np.uint8
        assert f["tokens"].shape == (6, 8, 8)
        np.testing.assert_array_equal(f["tokens"], want)
        np.testing.assert_array_equal(f["labels"], np.arange(6) % 10)
    assert os.path.exists(str(tmp_path / "gen.png"))
    out = str(tmp_path / "inp.npz")
    run_script(
        "sample.py",
        f"--prior_workdir={prior_workdir}",
        "--mode=inpaint",
        "--split=test",
        "--num=2",
        "--box=0,0,8,16",
        f"--out={out}",
    )
    with np.load(out) as f:
        assert f["completed"].shape == f["originals"].shape == (2, 16, 16, 1)
        assert f["token_mask"][:, :4].all() and not f["token_mask"][:, 4:].any()


def test_prior_resume_equals_uninterrupted(tokenizer_workdir, tmp_path):
    """A run that lost everything after its step-2 checkpoint resumes to identical params."""
    workdir = str(tmp_path / "p")
    trainer.train(_prior_config(tokenizer_workdir, steps=4), workdir)
    straight = jax.device_get(api.load_prior(workdir).params)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if killed before step 4
    trainer.train(_prior_config(tokenizer_workdir, steps=4), workdir)
    resumed = api.load_prior(workdir)
    assert resumed.step == 4
    chex.assert_trees_all_equal(straight, jax.device_get(resumed.params))


def test_prior_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_workdir is empty"):
        trainer.train(_prior_config(""), str(tmp_path / "p"))
    (tmp_path / "tok_without_ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoints in"):
        trainer.train(_prior_config(str(tmp_path / "tok_without_ckpt")), str(tmp_path / "p2"))


def test_workdir_kind_and_step_mistakes_are_user_errors(tokenizer_workdir, prior_workdir):
    """A prior loaded as a tokenizer (and back), or a step that is not there: named, no traceback
    from deep inside the restore."""
    with pytest.raises(errors.UserError, match=r"holds a prior, not a tokenizer.*load_prior"):
        vq_jax.load(prior_workdir)
    with pytest.raises(errors.UserError, match=r"holds a tokenizer, not a prior"):
        vq_jax.load_prior(tokenizer_workdir)
    with pytest.raises(errors.UserError, match=r"step=3: .* valid: one of \[2\]"):
        vq_jax.load(tokenizer_workdir, step=3)
