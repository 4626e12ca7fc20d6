"""Image-conditional priors (super-resolution) and the prior interface (vq_jax/priors.py)."""

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from subproc import run_script

from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api, data, errors, evaluate, metrics, priors, sampling, trainer
from vq_jax import state as state_lib
from vq_jax.nets.transformer import GPT, MaskGITTransformer, init_cache

K, KC, L, P, B = 12, 20, 8, 5, 3  # target / condition vocab, target / condition length, batch
TINY = dict(num_layers=2, num_heads=2, embed_dim=16, mlp_ratio=2.0)


def _ints(seed, shape, high):
    return jax.random.randint(jax.random.key(seed), shape, 0, high, dtype=jnp.int32)


def _gpt():
    model = GPT(vocab_size=K, seq_len=L, cond_len=P, cond_vocab=KC, **TINY)
    tokens, cond = _ints(0, (B, L), K), _ints(1, (B, P), KC)
    params = model.init(jax.random.key(2), tokens, cond=cond)["params"]
    return model, params, tokens, cond


def _decode_logits(model, params, tokens, cond, chunks):
    """Logits at every position of [start, cond, tokens] through the KV cache, fed in chunks."""
    seq = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), cond, tokens[:, :-1]], axis=1)
    cache, outs, pos = init_cache(model, B), [], 0
    for size in chunks:
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            seq[:, pos : pos + size],
            decode=True,
            mutable=["cache"],
        )
        cache, pos = mutated["cache"], pos + size
        outs.append(logits)
    assert pos == P + L
    return np.asarray(jnp.concatenate(outs, axis=1))


# --- the interface ---------------------------------------------------------------------------


def test_unknown_kind_is_rejected_in_one_line():
    with pytest.raises(errors.UserError) as e:
        priors.get("diffusion")
    assert "config.prior.kind='diffusion' is unknown" in str(e.value)
    assert "autoregressive" in str(e.value) and "\n" not in str(e.value)
    config = prior_configs.get_config("tiny")
    config.prior.kind = "diffusion"
    with pytest.raises(errors.UserError, match="is unknown"):
        state_lib.build_prior(config, (4, 4), 16)


def test_every_kind_names_network_loss_and_sampler():
    assert set(priors.kinds()) >= {"autoregressive", "maskgit"}
    for name in priors.kinds():
        kind = priors.get(name)
        assert kind.name == name and callable(kind.loss) and callable(kind.sample)
    config = prior_configs.get_config("tiny")
    for name, cls in (("autoregressive", GPT), ("maskgit", MaskGITTransformer)):
        config.prior.kind = name
        comps = state_lib.build_prior(config, (4, 4), 16)
        assert type(comps.model) is cls and comps.kind == name


def test_condition_of_keeps_old_configs_meaning():
    assert priors.condition_of({"num_classes": 10}) == "class"  # written before `condition`
    assert priors.condition_of({"num_classes": 0}) == "none"
    assert priors.condition_of({"num_classes": 0, "condition": "class"}) == "none"
    assert priors.condition_of({"num_classes": 10, "condition": "none"}) == "none"
    assert priors.condition_of({"num_classes": 0, "condition": "image"}) == "image"
    with pytest.raises(errors.UserError, match="condition='depth' is unknown"):
        priors.condition_of({"condition": "depth"})
    # a config saved before the fields existed builds the class-conditional prior it built then
    old = prior_configs.get_config("tiny").to_dict()
    del old["prior"]["condition"], old["condition_tokenizer_workdir"], old["condition_scale"]
    old = ml_collections.ConfigDict(old)
    comps = state_lib.build_prior(old, (4, 4), 16)
    assert comps.condition == "class" and comps.model.num_classes == 10 and comps.cond_len == 0
    assert api.load_condition_tokenizer(old, tok=None) is None


def test_one_schedule_for_training_and_decoding():
    # decoding keeps floor(U * r((t+1)/T)) masked, r the training ratio cos(pi/2 u)
    u = np.array(16)
    got = [int(sampling.maskgit_schedule(jnp.asarray(u), t, 6)) for t in range(6)]
    want = [max(int(np.floor(16 * np.cos(np.pi / 2 * (t + 1) / 6) + 1e-3)), 1) for t in range(5)]
    assert got == [*want, 0]


# --- conditional GPT -------------------------------------------------------------------------


def test_kv_cache_decoding_with_prefix_equals_full_forward():
    model, params, tokens, cond = _gpt()
    full = np.asarray(model.apply({"params": params}, tokens, cond=cond))
    chex.assert_shape(full, (B, L, K))  # target positions only
    for chunks in ([1] * (P + L), [P, 1, 3] + [1] * (L - 4), [P + 2, L - 2]):
        stepwise = _decode_logits(model, params, tokens, cond, chunks)
        np.testing.assert_allclose(stepwise[:, P:], full, atol=1e-5, rtol=0)


def test_ar_loss_counts_only_target_tokens():
    model, params, tokens, cond = _gpt()
    kind = priors.get("autoregressive")
    kw = dict(rngs={}, mask_key=jax.random.key(0), train=False, label_smoothing=0.0)
    loss, acc = kind.loss(model, params, tokens, None, cond, **kw)
    # independent: the KV-cache path's logits over the whole sequence, float64 cross-entropy of
    # the L target tokens only (the P condition positions predict nothing)
    logits = _decode_logits(model, params, tokens, cond, [1] * (P + L)).astype(np.float64)
    target_logits = logits[:, P:]
    logz = np.log(np.exp(target_logits).sum(-1))
    picked = np.take_along_axis(target_logits, np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), np.mean(logz - picked), rtol=1e-5)
    np.testing.assert_allclose(
        float(acc), np.mean(target_logits.argmax(-1) == np.asarray(tokens)), atol=1e-7
    )
    # the condition is read as context: other condition tokens, another loss
    other, _ = kind.loss(model, params, tokens, None, (cond + 1) % KC, **kw)
    assert abs(float(other) - float(loss)) > 1e-6


def test_conditional_gpt_sampling_matches_greedy_full_forward():
    model, params, _, cond = _gpt()
    out = np.asarray(
        sampling.sample_autoregressive(model, params, jax.random.key(3), B, top_k=1, cond=cond)
    )
    ref = np.zeros((B, L), np.int32)
    for p in range(L):  # greedy with a full forward pass per position, no cache
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(ref), cond=cond))
        ref[:, p] = logits[:, p].argmax(-1)
    np.testing.assert_array_equal(out, ref)


# --- conditional MaskGIT ---------------------------------------------------------------------


def test_condition_tokens_never_change_during_maskgit_decoding():
    model = MaskGITTransformer(vocab_size=K, seq_len=L, cond_len=P, cond_vocab=KC, **TINY)
    cond = _ints(4, (B, P), KC).at[:, 0].set(K)  # a condition id equal to the mask id
    params = model.init(jax.random.key(5), jnp.full((B, L), K), cond=cond)["params"]
    seen = []
    inner = sampling.maskgit_logits_fn(model, params, None, 0.0, B, cond)

    def spy(tokens):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), tokens)
        return inner(tokens)

    known = jnp.concatenate([cond, jnp.zeros((B, L), jnp.int32)], axis=1)
    known_mask = jnp.concatenate([jnp.ones((B, P), bool), jnp.zeros((B, L), bool)], axis=1)
    out, history = sampling.decode_maskgit(
        spy,
        jax.random.key(6),
        B,
        P + L,
        model.mask_id,
        num_steps=4,
        known_tokens=known,
        known_mask=known_mask,
        return_history=True,
    )
    assert len(seen) == 4
    for tokens in [*seen, np.asarray(out)]:
        np.testing.assert_array_equal(tokens[:, :P], np.asarray(cond))
    assert (np.asarray(out)[:, P:] < K).all()  # every target filled in
    assert np.asarray(history)[-1].tolist() == [0] * B
    np.testing.assert_array_equal(np.asarray(history)[0], [7] * B)  # floor(8 cos(pi/8))
    # the module sampler returns the targets of the same decoding
    targets = sampling.sample_maskgit(model, params, jax.random.key(6), B, num_steps=4, cond=cond)
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(out)[:, P:])


def test_maskgit_loss_masks_targets_only():
    model = MaskGITTransformer(vocab_size=K, seq_len=L, cond_len=P, cond_vocab=KC, **TINY)
    tokens, cond = _ints(7, (B, L), K), _ints(8, (B, P), KC)
    params = model.init(jax.random.key(9), tokens, cond=cond)["params"]
    key = jax.random.key(10)
    kw = dict(rngs={}, mask_key=key, train=False, label_smoothing=0.0)
    loss, _ = priors.get("maskgit").loss(model, params, tokens, None, cond, **kw)
    from vq_jax import prior_losses

    masked, mask = prior_losses.maskgit_mask(key, tokens, model.mask_id)
    logits = np.asarray(model.apply({"params": params}, masked, cond=cond), np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    ce = logz - np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]
    m = np.asarray(mask)
    np.testing.assert_allclose(float(loss), ce[m].mean(), rtol=1e-5)


# --- data --------------------------------------------------------------------------------------


def test_area_downsample_is_the_block_mean():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    low = data.preprocess(image, resolution=8, channels=1, resize="pad", downsample=4)
    padded = np.zeros((32, 32), np.float64)
    padded[2:30, 2:30] = image[..., 0]
    want = np.array(
        [[padded[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].mean() for j in range(8)] for i in range(8)]
    )
    np.testing.assert_allclose(low[..., 0], want / 127.5 - 1.0, atol=1e-5)


# --- end to end: LR tokenizer, HR tokenizer, conditional prior, upsample ----------------------


@pytest.fixture(scope="module")
def sr_workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    dirs = {k: str(root / k) for k in ("hr", "lr", "prior")}
    for variant, name in (("tiny", "hr"), ("tiny_lr", "lr")):
        config = vqvae.get_config(variant)
        config.train.update(steps=1, eval_every=1, checkpoint_every=1, eval_batches=1)
        trainer.train(config, dirs[name])
    trainer.train(_sr_config(dirs), dirs["prior"])
    return dirs


def _sr_config(dirs, kind="autoregressive"):
    config = prior_configs.get_config("tiny_sr")
    config.tokenizer_workdir, config.condition_tokenizer_workdir = dirs["hr"], dirs["lr"]
    config.prior.kind = kind
    config.train.update(steps=2, eval_every=2, checkpoint_every=2, eval_batches=1)
    return config


def test_upsample_end_to_end(sr_workdirs):
    prior = api.load_prior(sr_workdirs["prior"])
    assert prior.condition == "image" and prior.comps.cond_shape == (2, 2)
    lows, truth, _ = next(api.iterate_condition_pairs(prior, "test", num=2))
    chex.assert_shape([lows, truth], [(2, 4, 4, 1), (2, 16, 16, 1)])
    # the condition image is the 4x4 area mean of the same example
    blocks = truth[..., 0].astype(np.float64).reshape(2, 4, 4, 4, 4).mean(axis=(2, 4))
    assert np.abs(lows[..., 0] - blocks).max() <= 1.0  # uint8 rounding
    # both token caches are built once; the condition one is the condition tokenizer's
    with np.load(os.path.join(sr_workdirs["prior"], "tokens", "condition", "test.npz")) as f:
        np.testing.assert_array_equal(f["tokens"][:2], prior.condition_tokenizer.encode(lows))
    images, tokens = prior.upsample(lows, num_samples=3, seed=1)
    chex.assert_shape([images, tokens], [(2, 3, 16, 16, 1), (2, 3, 8, 8)])
    assert images.dtype == np.uint8
    again, _ = prior.upsample(lows, num_samples=3, seed=1)
    np.testing.assert_array_equal(images, again)
    assert not all(np.array_equal(tokens[0, 0], tokens[0, i]) for i in (1, 2))  # one-to-many


def test_ssim_left_out_below_its_window_not_nan(sr_workdirs):
    """4x4 LR images are below SSIM's 11x11 window: the trainer's eval, its log line and
    `vq_jax.evaluate` leave SSIM out (no NaN in metrics.jsonl); 16x16 ones report it."""
    for name, has_ssim in (("lr", False), ("hr", True)):
        records = metrics.read_metrics(sr_workdirs[name])
        evals = [r for r in records if "eval/psnr" in r]
        assert evals and all(("eval/ssim" in r) == has_ssim for r in evals), name
        assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
        result = evaluate.evaluate_tokenizer(sr_workdirs[name], split="test", num=2)
        assert ("ssim" in result) == has_ssim and result["num_images"] == 2
        assert ("SSIM n/a" in evaluate._summary(result)) != has_ssim


def test_upsample_bad_inputs(sr_workdirs):
    prior = api.load_prior(sr_workdirs["prior"])
    with pytest.raises(errors.UserError, match=r"low-resolution images have shape \(8, 8, 1\)"):
        prior.upsample(np.zeros((1, 8, 8, 1), np.uint8))
    unconditional = api.Prior(
        prior_configs.get_config("tiny"),
        state_lib.build_prior(prior_configs.get_config("tiny"), (8, 8), 32),
        None,
        prior.tokenizer,
        0,
    )
    with pytest.raises(errors.UserError, match="condition is 'class': upsampling needs"):
        unconditional.upsample(np.zeros((1, 4, 4, 1), np.uint8))
    config = _sr_config(sr_workdirs)
    config.condition_tokenizer_workdir = ""
    with pytest.raises(errors.UserError, match="needs a condition tokenizer"):
        api.load_condition_tokenizer(config, prior.tokenizer)
    config.condition_tokenizer_workdir = sr_workdirs["hr"] + "_missing"
    with pytest.raises(errors.MissingFileError, match=r"condition_tokenizer_workdir=.*No checkp"):
        api.load_condition_tokenizer(config, prior.tokenizer)
    config.condition_tokenizer_workdir = sr_workdirs["hr"]  # 16x16: not 4x smaller
    with pytest.raises(errors.UserError, match="condition_scale=4") as e:
        api.load_condition_tokenizer(config, prior.tokenizer)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_sample_py_upsample_and_benchmark(sr_workdirs, tmp_path):
    out = str(tmp_path / "sr.npz")
    prior = sr_workdirs["prior"]
    run_script(
        "sample.py", f"--prior_workdir={prior}", "--mode=upsample", "--num=2", "--samples=2",
        f"--out={out}",
    )  # fmt: skip
    with np.load(out) as f:
        assert f["samples"].shape == (2, 2, 16, 16, 1) and f["low_res"].shape == (2, 4, 4, 1)
        assert f["bicubic"].shape == f["originals"].shape == (2, 16, 16, 1)
    from PIL import Image

    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "bad.png")
    proc = run_script(
        "sample.py", f"--prior_workdir={prior}", "--mode=upsample",
        f"--image={tmp_path / 'bad.png'}", f"--out={out}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "is 5x5 but 4x4 is needed" in proc.stderr
    from benchmarks.upsample import evaluate_upsampling, markdown_table

    rows, grid, info = evaluate_upsampling(
        [prior], ["GPT"], num=4, batch_size=2, grid_rows=2, grid_samples=2
    )
    assert [r["method"] for r in rows] == [
        "bicubic",
        "GPT",
        "ceiling (tokenizer reconstruction)",
    ]
    assert all(r["num"] == 4 and np.isfinite(r["psnr"]) for r in rows)
    assert grid.shape[0] > 2 * 16 and info["scale"] == 4 and "| bicubic |" in markdown_table(rows)
