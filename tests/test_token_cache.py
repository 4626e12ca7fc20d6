"""The prior's token cache is reused only for the tokenizer and data that made it."""

import os

import jax
import numpy as np

from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api
from vq_jax import state as state_lib
from vq_jax.loop import DATA_AXIS, make_mesh
from vq_jax.token_cache import cached_tokens, tokenizer_fingerprint


def _tokenizer(seed: int) -> api.Tokenizer:
    """A freshly initialised tiny tokenizer at step 0, like every converted checkpoint."""
    config = vqvae.get_config("tiny")
    comps = state_lib.build(config)
    state = state_lib.init_state(comps, jax.random.key(seed), ema=False)
    return api.Tokenizer(config, comps.model, state["params"], state["model_state"], 0)


def _first_images(tok: api.Tokenizer, n: int) -> np.ndarray:
    u8, _, _ = next(api.iterate_split(tok, "test", num=n))
    return u8


def test_cache_is_keyed_by_the_tokenizer_not_its_step(tmp_path, capsys):
    config = prior_configs.get_config("tiny")
    sharding = jax.NamedSharding(make_mesh(), jax.P(DATA_AXIS))
    cache = str(tmp_path / "tokens")
    path = os.path.join(cache, "test.npz")
    a, b = _tokenizer(0), _tokenizer(1)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(_tokenizer(0))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(a, data_dir="/elsewhere")

    tokens_a, labels_a = cached_tokens(a, config, "test", cache, sharding)
    np.testing.assert_array_equal(tokens_a[:4], a.encode(_first_images(a, 4)))
    mtime = os.stat(path).st_mtime_ns
    again, _ = cached_tokens(a, config, "test", cache, sharding)  # reused: not rewritten
    np.testing.assert_array_equal(again, tokens_a)
    assert os.stat(path).st_mtime_ns == mtime
    assert "re-tokenizing" not in capsys.readouterr().out

    # another tokenizer at the same step 0: the cache is re-made with its tokens
    tokens_b, _ = cached_tokens(b, config, "test", cache, sharding)
    assert "re-tokenizing" in capsys.readouterr().out
    assert not np.array_equal(tokens_b, tokens_a)
    np.testing.assert_array_equal(tokens_b[:4], b.encode(_first_images(b, 4)))

    # a cache from before fingerprints (keyed by step only) is re-made once, not trusted
    np.savez(path, tokens=tokens_b, labels=labels_a, tokenizer_step=0)
    tokens, _ = cached_tokens(a, config, "test", cache, sharding)
    assert "re-tokenizing" in capsys.readouterr().out
    np.testing.assert_array_equal(tokens, tokens_a)
