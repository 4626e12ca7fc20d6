"""What the benchmark scripts share: the tokenizer step on a synthetic batch, and call timing."""

import functools
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from vq_jax import cpu, loop
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib
from vq_jax.tasks import tokenizer as tokenizer_task


class StepSetup(NamedTuple):
    """A config's jitted (not yet compiled) train step with an initial state and a batch."""

    comps: state_lib.Components
    mesh: jax.sharding.Mesh
    step: Callable
    state: Any
    batch: dict[str, jax.Array]
    key: jax.Array


def adversarial_on(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """Configs with a discriminator: adversarial terms from step 0, so the full G + D step runs."""
    if "discriminator" in config:
        config.loss.disc_start = 0
        config.loss.disc_train_start = 0
    return config


def setup_step(config: mlc.ConfigDict) -> StepSetup:
    """The train step of `config` as the trainer jits it, its initial state and a synthetic
    batch (uniform images in [-1, 1], label 0) of the config's global shape; with the CPU
    kernels of `train.cpu_kernels` installed, as the trainer does."""
    cpu.enable(config.train.get("cpu_kernels", "auto"))
    comps = state_lib.build(config)
    mesh = loop.make_mesh()
    key = jax.random.key(config.seed)
    init_fn = functools.partial(state_lib.init_state, comps, ema=config.train.ema_decay > 0)
    abstract = jax.eval_shape(init_fn, key)
    state = jax.jit(init_fn, out_shardings=jax.NamedSharding(mesh, jax.P()))(key)
    bs, r, c = config.input.batch_size, config.input.resolution, config.input.channels
    batch = jax.device_put(
        {
            "image": jax.random.uniform(key, (bs, r, r, c), minval=-1, maxval=1),
            "label": jnp.zeros((bs,), jnp.int32),
        },
        jax.NamedSharding(mesh, jax.P(loop.DATA_AXIS)),
    )
    settings = tokenizer_task.loss_settings(config)  # the step of step 0's phase (VQGAN: static)
    step_fn = steps_lib.make_tokenizer_step(comps, settings)
    phase = steps_lib.phase_at(settings, 0)
    step = loop.jit_step(functools.partial(step_fn, phase=phase), mesh, abstract)
    return StepSetup(comps, mesh, step, state, batch, key)


def time_calls(fn: Callable, *args: Any, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn(*args) (results ready), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def report(result: dict, json_path: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to `json_path` when one is given."""
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
