"""Tokens with a depth axis (residual VQ) downstream: encode / decode / evaluate, the token cache,
and a prior over them (depth flattened into the sequence, raster order with depth fastest)."""

import json
import os

import chex
import numpy as np
import pytest

import vq_jax
from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api, metrics, steps, trainer

DEPTH = 2


def test_prior_sequence_order_is_raster_with_depth_fastest():
    """Token (i, j, s) of an [h, w, depth] grid is at sequence position (i * w + j) * depth + s."""
    h, w = 2, 3
    grid = np.zeros((1, h, w, DEPTH), np.int32)
    for i in range(h):
        for j in range(w):
            for s in range(DEPTH):
                grid[0, i, j, s] = 100 * i + 10 * j + s

    class _Comps:
        cond_len = 0  # no image condition

        class model:
            num_classes = 0

    seq, _, _ = steps._prior_inputs(_Comps, {"tokens": grid, "label": np.zeros(1, np.int32)})
    expected = [100 * i + 10 * j + s for i in range(h) for j in range(w) for s in range(DEPTH)]
    np.testing.assert_array_equal(np.asarray(seq)[0], expected)


@pytest.fixture(scope="module")
def rvq_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rvq"))
    config = vqvae.get_config("tiny")
    config.quantizer.kind = "rvq"
    config.quantizer.rvq.depth = DEPTH
    config.train.steps = 2
    result = trainer.train(config, workdir)  # evaluation counts codes over every stage
    assert 0 < result["codebook_usage"] <= 1
    return workdir


@pytest.mark.slow
def test_depth_tokenizer_encodes_decodes(rvq_workdir):
    tok = vq_jax.load(rvq_workdir)
    assert tok.token_shape == (8, 8, DEPTH)
    images = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=3)])
    tokens = tok.encode(images)
    chex.assert_shape(tokens, (3, 8, 8, DEPTH))
    assert tokens.min() >= 0 and tokens.max() < tok.codebook_size
    decoded = tok.decode(tokens)
    chex.assert_shape(decoded, images.shape)
    with pytest.raises(vq_jax.UserError, match=r"decodes \[N, 8, 8, 2\]"):
        tok.decode(tokens[..., 0])


def test_evaluation_counts_each_stage(rvq_workdir):
    """vq_jax.evaluate's per-stage usage equals the codes counted in tok.encode's stage s."""
    from vq_jax import evaluate

    r = evaluate.evaluate_tokenizer(
        rvq_workdir, num=6, batch_size=4, inception_weights=None, lpips_weights=None
    )
    tok = vq_jax.load(rvq_workdir)
    images = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=6)])
    tokens = tok.encode(images)
    used = [len(np.unique(tokens[..., s])) for s in range(DEPTH)]
    assert [r[f"codes_used_stage{s}"] for s in range(DEPTH)] == used
    np.testing.assert_allclose(metrics.stage_usages(r), np.array(used) / tok.codebook_size)
    assert r["codes_used"] == len(np.unique(tokens))  # pooled over the stages
    assert "per stage" in evaluate._summary(r)
    # the trainer's evaluation (its eval batches, sharded) counts the same way
    with open(os.path.join(rvq_workdir, "eval", "step_2.json")) as f:
        by_trainer = json.load(f)
    n = by_trainer["num_examples"]
    whole = evaluate.evaluate_tokenizer(
        rvq_workdir, num=n, inception_weights=None, lpips_weights=None
    )
    assert whole["num_images"] == n
    for key in ("codes_used", "codes_used_stage0", "codes_used_stage1"):
        assert whole[key] == by_trainer[key], key


def test_tokenizer_report_counts_stages(rvq_workdir, tmp_path):
    from benchmarks import tokenizer_report

    with open(os.path.join(rvq_workdir, "eval", "step_2.json")) as f:
        by_trainer = json.load(f)
    k = vq_jax.load(rvq_workdir).codebook_size
    stages = [by_trainer[f"codes_used_stage{s}"] / k for s in range(DEPTH)]
    (row,) = tokenizer_report.report([rvq_workdir], ["rvq"], str(tmp_path / "r"), num=2)
    assert row["usage"] == pytest.approx(np.mean(stages))
    table = (tmp_path / "r.md").read_text()
    assert f"(stages {stages[0]:.3f} / {stages[1]:.3f})" in table


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["autoregressive", "maskgit"])
def test_prior_over_depth_tokens_trains_generates_and_inpaints(rvq_workdir, tmp_path, kind):
    config = prior_configs.get_config("tiny")
    config.tokenizer_workdir = rvq_workdir
    config.prior.kind = kind
    workdir = str(tmp_path / kind)
    result = trainer.train(config, workdir)
    assert np.isfinite(result["loss"])
    with np.load(os.path.join(workdir, "tokens", "train.npz")) as f:
        assert f["tokens"].shape == (64, 8, 8, DEPTH)
    prior = api.load_prior(workdir)
    assert prior.comps.model.seq_len == 8 * 8 * DEPTH
    images, tokens, _ = prior.generate(2, seed=0)
    chex.assert_shape(tokens, (2, 8, 8, DEPTH))
    chex.assert_shape(images, (2, 16, 16, 1))
    tok = prior.tokenizer
    originals = np.concatenate([u8 for u8, _, _ in api.iterate_split(tok, "test", num=2)])
    mask = np.zeros((2, 16, 16), bool)
    mask[:, :6, :6] = True
    _, filled, token_mask = prior.inpaint(originals, mask, seed=0)
    assert token_mask.shape == (2, 8, 8, DEPTH)
    known = tok.encode(originals)
    np.testing.assert_array_equal(filled[~token_mask], known[~token_mask])
