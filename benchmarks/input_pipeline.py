"""Input-pipeline throughput against the train step's consumption, for a config.

  JAX_PLATFORMS=cpu python -m benchmarks.input_pipeline --config=configs/vqvae.py:fashion_mnist

Reports (1) the pipeline alone: images/s of the config's grain iterator (real data, the
config's preprocessing, prefetch and threads); (2) the step's consumption: images/s of the
compiled train step; (3) a real loop of both, as the trainer runs them, with the time the
loop spends blocked in `next(iterator)` as a share of the wall time. The step must not wait on
data: share close to 0, and pipeline images/s well above step images/s.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from vq_jax import data, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches for the pipeline-only measurement.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps for the loop measurement.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.mark_flags_as_required(["config"])


def _train_iter(config):
    train_src, _ = data.config_sources(config)
    ic = config.input
    return data.make_train_iter(
        train_src,
        batch_size=ic.batch_size,
        seed=config.seed,
        preprocess_fn=data.config_preprocess(config),
        random_flip=ic.random_flip,
        prefetch=ic.prefetch,
    )


def pipeline_rate(config, num_batches: int) -> float:
    """Images/s of the iterator alone (2 warm-up batches excluded)."""
    it = _train_iter(config)
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
    elapsed = time.perf_counter() - t0
    assert batch["image"].shape[0] == config.input.batch_size
    return num_batches * config.input.batch_size / elapsed


def loop_rates(config, num_steps: int) -> dict:
    """The trainer's loop shape: next(it) -> global batch -> step; time blocked on data."""
    _, mesh, step, state, _, key = common.setup_step(config)
    batch_sharding = jax.NamedSharding(mesh, jax.P(loop.DATA_AXIS))
    it = _train_iter(config)
    batch = loop.to_global(next(it), batch_sharding)
    step = step.lower(state, batch, key).compile()
    for _ in range(2):
        state, m = step(state, loop.to_global(next(it), batch_sharding), key)
    jax.block_until_ready(m)
    waits, walls = [], []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        local = next(it)
        t1 = time.perf_counter()
        state, m = step(state, loop.to_global(local, batch_sharding), key)
        jax.block_until_ready(m)
        waits.append(t1 - t0)
        walls.append(time.perf_counter() - t0)
    wall = float(np.sum(walls))
    return {
        "step_images_per_s": round(num_steps * config.input.batch_size / wall, 1),
        "data_wait_share": round(float(np.sum(waits)) / wall, 4),
        "median_data_wait_ms": round(1e3 * float(np.median(waits)), 2),
    }


def main(argv):
    del argv
    config = common.adversarial_on(_CONFIG.value)
    result = {
        "config": flags.FLAGS["config"].config_filename,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch_size": config.input.batch_size,
        "pipeline_images_per_s": round(pipeline_rate(config, _BATCHES.value), 1),
        **loop_rates(config, _STEPS.value),
    }
    result["pipeline_headroom"] = round(
        result["pipeline_images_per_s"] / result["step_images_per_s"], 1
    )
    common.report(result, _JSON.value)


if __name__ == "__main__":
    app.run(main)
