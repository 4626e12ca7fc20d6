"""Tests for vq_jax/nets/transformer.py: shapes, dtypes, causality, KV-cache decoding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq_jax.nets.transformer import GPT, MaskGITTransformer, init_cache

K, L, B = 32, 16, 3
TINY = dict(num_layers=2, num_heads=2, embed_dim=32, mlp_ratio=2.0)


def _tokens(seed: int = 0, high: int = K) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 0, high, dtype=jnp.int32)


def _labels(num_classes: int) -> jax.Array | None:
    return jnp.array([0, 1, num_classes], jnp.int32) if num_classes else None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_classes", [0, 4])
def test_gpt_shapes_and_dtypes(dtype, num_classes):
    model = GPT(vocab_size=K, seq_len=L, num_classes=num_classes, dtype=dtype, **TINY)
    tokens, labels = _tokens(), _labels(num_classes)
    variables = model.init(jax.random.key(0), tokens, labels)
    logits = model.apply(variables, tokens, labels)
    chex.assert_shape(logits, (B, L, K))
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    chex.assert_shape(variables["params"]["class_embed"]["embedding"], (num_classes + 1, 32))
    chex.assert_shape(variables["params"]["pos_embed"], (L, 32))
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32
    # shorter prefixes are allowed
    chex.assert_shape(model.apply(variables, tokens[:, :5], labels), (B, 5, K))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_classes", [0, 4])
def test_maskgit_shapes_and_dtypes(dtype, num_classes):
    model = MaskGITTransformer(
        vocab_size=K, seq_len=L, num_classes=num_classes, dtype=dtype, **TINY
    )
    assert model.mask_id == K
    tokens = _tokens(high=K + 1)  # includes the mask id K
    tokens = tokens.at[:, 0].set(K)
    labels = _labels(num_classes)
    variables = model.init(jax.random.key(0), tokens, labels)
    logits = model.apply(variables, tokens, labels)
    chex.assert_shape(logits, (B, L, K))  # the mask id is never predicted
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    chex.assert_shape(variables["params"]["tok_embed"]["embedding"], (K + 1, 32))
    chex.assert_shape(variables["params"]["pos_embed"], (L + 1, 32))
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32


def test_bf16_close_to_f32():
    f32 = GPT(vocab_size=K, seq_len=L, **TINY)
    bf16 = GPT(vocab_size=K, seq_len=L, dtype=jnp.bfloat16, **TINY)
    tokens = _tokens()
    variables = f32.init(jax.random.key(0), tokens)
    a = f32.apply(variables, tokens)
    b = bf16.apply(variables, tokens)
    scale = float(jnp.std(a))
    assert float(jnp.max(jnp.abs(a - b))) < 0.1 * scale + 0.02
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # bf16 really used


@pytest.mark.parametrize("num_classes", [0, 4])
def test_gpt_causality(num_classes):
    model = GPT(vocab_size=K, seq_len=L, num_classes=num_classes, **TINY)
    tokens, labels = _tokens(), _labels(num_classes)
    variables = model.init(jax.random.key(0), tokens, labels)
    apply = jax.jit(lambda t: model.apply(variables, t, labels))
    base = np.asarray(apply(tokens))
    for j in (0, 6, L - 2, L - 1):
        changed = tokens.at[:, j].set((tokens[:, j] + 7) % K)
        out = np.asarray(apply(changed))
        diff = np.max(np.abs(out - base), axis=(0, 2))  # per position
        # logits[:, i] predicts token i from tokens < i: positions <= j must not move
        np.testing.assert_allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-6, rtol=0)
        assert np.all(diff[j + 1 :] > 1e-5), (j, diff)


def test_gpt_label_changes_every_position_and_null_class():
    model = GPT(vocab_size=K, seq_len=L, num_classes=4, **TINY)
    tokens = _tokens()
    labels = jnp.array([0, 1, 2], jnp.int32)
    variables = model.init(jax.random.key(0), tokens, labels)
    a = np.asarray(model.apply(variables, tokens, labels))
    b = np.asarray(model.apply(variables, tokens, jnp.full((B,), 4, jnp.int32)))  # null class
    assert np.all(np.max(np.abs(a - b), axis=2) > 1e-6)


def test_maskgit_is_bidirectional():
    model = MaskGITTransformer(vocab_size=K, seq_len=L, **TINY)
    tokens = _tokens()
    variables = model.init(jax.random.key(0), tokens)
    base = np.asarray(model.apply(variables, tokens))
    j = 9
    out = np.asarray(model.apply(variables, tokens.at[:, j].set(K)))  # mask token j
    diff = np.max(np.abs(out - base), axis=(0, 2))
    assert np.all(diff > 1e-6), diff  # positions before j see it too


def _decode_all(model, params, inputs, labels, chunks):
    """Run decode=True over the inputs in the given chunk sizes; return concatenated logits."""
    cache = init_cache(model, inputs.shape[0])
    assert int(cache["index"]) == 0
    for leaf in jax.tree.leaves(cache):
        assert not np.any(np.asarray(leaf))
    outs, pos = [], 0
    for size in chunks:
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            inputs[:, pos : pos + size],
            labels,
            decode=True,
            mutable=["cache"],
        )
        cache = mutated["cache"]
        pos += size
        assert int(cache["index"]) == pos
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_kv_cache_matches_full_forward(num_classes):
    model = GPT(vocab_size=K, seq_len=L, num_classes=num_classes, **TINY)
    tokens, labels = _tokens(seed=3), _labels(num_classes)
    params = model.init(jax.random.key(1), tokens, labels)["params"]
    full = np.asarray(model.apply({"params": params}, tokens, labels))
    # decode input at position p is token p-1; position 0's value is ignored (start token)
    inputs = jnp.concatenate([jnp.full((B, 1), 5, jnp.int32), tokens[:, :-1]], axis=1)
    stepwise = np.asarray(_decode_all(model, params, inputs, labels, [1] * L))
    for p in range(L):
        np.testing.assert_allclose(stepwise[:, p], full[:, p], atol=1e-5, rtol=0)
    # prefill a chunk, then single steps
    chunked = np.asarray(_decode_all(model, params, inputs, labels, [5, 1, 4] + [1] * 6))
    np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=0)


def test_train_mode_dropout():
    model = GPT(vocab_size=K, seq_len=L, dropout=0.3, **TINY)
    tokens = _tokens()
    variables = model.init(jax.random.key(0), tokens)
    eval_a = model.apply(variables, tokens, train=False)
    eval_b = model.apply(variables, tokens)
    chex.assert_trees_all_close(eval_a, eval_b)
    train_a = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a))
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))


def test_bad_inputs_raise():
    cond = GPT(vocab_size=K, seq_len=L, num_classes=4, **TINY)
    with pytest.raises(ValueError, match="labels"):
        cond.init(jax.random.key(0), _tokens())
    uncond = MaskGITTransformer(vocab_size=K, seq_len=L, **TINY)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.init(jax.random.key(0), _tokens(), jnp.zeros((B,), jnp.int32))
    with pytest.raises(ValueError, match="seq_len"):
        uncond.init(jax.random.key(0), jnp.zeros((B, L + 1), jnp.int32))
    with pytest.raises(ValueError, match="num_heads"):
        GPT(vocab_size=K, seq_len=L, num_layers=1, num_heads=3, embed_dim=32).init(
            jax.random.key(0), _tokens()
        )
