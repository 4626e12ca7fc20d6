"""Fast, varied test parameters: the module's exact variable tree, filled from numpy."""

import jax
import jax.numpy as jnp
import numpy as np


def randn(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def fast_init(module, *args):
    """Variables with the module's exact tree/shapes/dtypes, filled by numpy (skips slow init).

    Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + noise, other leaves ~ small noise; EMA codebook
    stats follow the quantizer's own invariant (cluster_size = 1, embed_sum = codebook).
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        noise = rng.standard_normal(leaf.shape)
        if "kernel" in name:
            value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        elif "scale" in name:
            value = 1.0 + 0.1 * noise
        elif "cluster_size" in name:
            value = np.ones(leaf.shape)
        elif "codebook" in name or "embed_sum" in name:
            value = 0.5 * np.random.default_rng(1).standard_normal(leaf.shape)
        else:
            value = 0.1 * noise
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
