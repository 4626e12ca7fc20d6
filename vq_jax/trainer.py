"""The tokenizer training loop: mesh, jitted sharded step, checkpoints, metrics, evaluation.

`train(config, workdir)` is what `train.py` calls. It is the only place (besides `state.py`) that
reads the config tree, and, with sample.py, the only place that does I/O.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import checkpoints, data, metrics
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib

DATA_AXIS = "data"


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf."""


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, with a `data` axis."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def jit_train_step(
    comps: state_lib.Components,
    settings: steps_lib.LossSettings,
    mesh: jax.sharding.Mesh,
    abstract_state: Any,
):
    """The train step jitted over `mesh`: state replicated and donated, batch split on `data`."""
    repl = jax.NamedSharding(mesh, jax.P())
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    return jax.jit(
        steps_lib.make_tokenizer_step(comps, settings),
        in_shardings=(state_sharding, jax.NamedSharding(mesh, jax.P(DATA_AXIS)), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
    )


def loss_settings(config: mlc.ConfigDict) -> steps_lib.LossSettings:
    fields = {f for f in steps_lib.LossSettings.__dataclass_fields__}
    kw = {k: v for k, v in config.loss.items() if k in fields}
    kw["ema_decay"] = config.train.ema_decay
    if kw.get("disc_train_start", 0) < 0:
        kw["disc_train_start"] = kw["disc_start"]
    return steps_lib.LossSettings(**kw)


def to_global(batch: dict[str, np.ndarray], sharding: jax.NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local part."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def make_sources(config: mlc.ConfigDict) -> tuple[Any, Any]:
    ic = config.input
    kw = dict(
        data_dir=ic.data_dir,
        synthetic_size=ic.synthetic_size,
        synthetic_shape=(ic.resolution, ic.resolution, ic.channels),
        on_corrupt=ic.on_corrupt,
    )
    train_src = data.make_source(ic.dataset, ic.train_split, **kw)
    eval_src = data.make_source(ic.dataset, ic.eval_split, **kw)
    return train_src, eval_src


def make_preprocess(config: mlc.ConfigDict):
    ic = config.input
    return data.make_preprocess_fn(
        resolution=ic.resolution,
        channels=ic.channels,
        resize=ic.resize,
        convert_channels=ic.convert_channels,
    )


def check_data(source: Any, preprocess_fn, config: mlc.ConfigDict) -> None:
    """Fails before compilation if the data cannot feed the model (shape, channels, emptiness)."""
    if len(source) == 0:
        raise ValueError(f"The dataset {config.input.dataset!r} has no examples.")
    image = preprocess_fn(source[0]["image"])
    expected = (config.input.resolution, config.input.resolution, config.input.channels)
    if tuple(image.shape) != expected:
        raise ValueError(
            f"Preprocessed images have shape {tuple(image.shape)} but the model expects {expected}; "
            "check config.input.resolution / channels / resize."
        )


def _progress(step: int, total: int, rate: float, scalars: dict[str, float]) -> str:
    eta = (total - step) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    loss = scalars.get("loss", float("nan"))
    return (
        f"step {step}/{total} ({100 * step / total:.1f}%) | loss {loss:.4f} | "
        f"{rate:.2f} steps/s | ETA {eta_s}"
    )


class MetricBuffer:
    """Holds per-step measurements on device until the next log point (no per-step host sync)."""

    def __init__(self) -> None:
        self._items: list[tuple[int, dict[str, Any]]] = []

    def add(self, step: int, measurements: dict[str, jax.Array]) -> None:
        self._items.append((step, measurements))

    def check(self, last_good: int | None) -> None:
        """Fetches the buffered steps; raises NonFiniteError at the first non-finite value."""
        self._items = jax.device_get(self._items)
        for step, m in self._items:
            bad = sorted(k for k, v in m.items() if not np.all(np.isfinite(v)))
            if bad:
                raise NonFiniteError(
                    f"Non-finite {', '.join(bad)} at step {step} "
                    f"(values: { {k: float(np.mean(m[k])) for k in bad} }). Last good checkpoint: "
                    f"{last_good if last_good is not None else 'none'}. Lower the learning rate, enable "
                    "gradient clipping (config.optimizer.*.clip_norm), or compute in float32."
                )

    def flush(self, last_good: int | None) -> dict[str, float]:
        """Means over the buffered steps (after `check`), and empties the buffer."""
        self.check(last_good)
        items, self._items = self._items, []
        if not items:
            return {}
        return {k: float(np.mean([np.mean(m[k]) for _, m in items])) for k in items[0][1]}


def evaluate(
    eval_step, params: Any, model_state: Any, batches: Iterator[dict], sharding, codebook_size: int
) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Exact means over the held-out split, plus the first batch for the image grid."""
    totals, first = None, None
    for batch in batches:
        sums = eval_step(params, model_state, to_global(batch, sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if first is None:
            first = batch
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    result = {k: float(totals[k]) / n for k in ("l1", "mse", "psnr", "ssim")}
    stats = metrics.codebook_stats(totals["code_counts"])
    result["codebook_usage"] = float(stats["usage"])
    result["codebook_perplexity"] = float(stats["perplexity"])
    result["codes_used"] = int(np.sum(np.asarray(totals["code_counts"]) > 0))
    result["num_examples"] = int(n)
    del codebook_size
    return result, first


def train(config: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains a tokenizer; resumes from the newest checkpoint in `workdir`. Returns final eval."""
    comps = state_lib.build(config)  # validates the config before any data or compilation
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))

    train_src, eval_src = make_sources(config)
    preprocess_fn = make_preprocess(config)
    check_data(train_src, preprocess_fn, config)
    local_batch = config.input.batch_size // jax.process_count()
    local_eval_batch = config.input.eval_batch_size // jax.process_count()

    key = jax.random.key(config.seed)
    ema = config.train.ema_decay > 0
    init_fn = functools.partial(state_lib.init_state, comps, ema=ema)
    abstract = checkpoints.abstract_like(jax.eval_shape(init_fn, key), repl)
    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints
    )
    config_dict = json.loads(config.to_json_best_effort())
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=repl)(key)
        data_state, start = None, 0
    else:
        start, state, data_state, _ = restored
        logging.info("Resumed from checkpoint step %d in %s", start, ckpt.directory)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    it = data.make_train_iter(
        train_src,
        batch_size=local_batch,
        seed=config.seed,
        preprocess_fn=preprocess_fn,
        random_flip=config.input.random_flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=config.input.prefetch,
    )
    if data_state is not None:
        it.set_state(data_state)

    train_step = jit_train_step(comps, loss_settings(config), mesh, abstract)
    eval_step = jax.jit(
        steps_lib.make_eval_step(comps),
        in_shardings=(repl, repl, batch_sharding),
        out_shardings=repl,
    )
    all_finite = jax.jit(
        lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))
    )
    step_key = state_lib.rng_stream(key, "train_step")
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    tc = config.train
    total = tc.steps
    buffer = MetricBuffer()
    last_ckpt = ckpt.latest_step()

    def eval_params(state):
        return state.get("ema_params", state["params"])

    def run_eval(step: int) -> dict[str, float]:
        batches = data.make_eval_batches(
            eval_src,
            batch_size=local_eval_batch,
            preprocess_fn=preprocess_fn,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=tc.eval_batches or None,
        )
        t0 = time.time()
        result, first = evaluate(
            eval_step,
            eval_params(state),
            state["model_state"],
            batches,
            batch_sharding,
            comps.model.quantizer.codebook_size,
        )
        result["eval_seconds"] = time.time() - t0
        if is_main:
            writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
            os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
            with open(os.path.join(workdir, "eval", f"step_{step}.json"), "w") as f:
                json.dump({"step": step, **result}, f, indent=2)
            if first is not None:
                n = min(tc.num_sample_images, first["image"].shape[0])
                x = first["image"][:n]
                recon = jax.jit(lambda p, ms, im: comps.model.apply({"params": p, **ms}, im)[0])(
                    eval_params(state), state["model_state"], x
                )
                grid = metrics.image_grid(
                    np.concatenate([metrics.to_uint8(x), metrics.to_uint8(np.asarray(recon))]),
                    ncols=n,
                )
                metrics.save_png(os.path.join(workdir, "eval", f"step_{step}.png"), grid)
                writer.write_images(step, "eval/originals_vs_reconstructions", grid[None])
        print(
            f"eval step {step}: psnr {result['psnr']:.2f} dB | ssim {result['ssim']:.4f} | "
            f"codebook usage {result['codebook_usage']:.3f} ({result['codes_used']} codes) | "
            f"perplexity {result['codebook_perplexity']:.1f}",
            flush=True,
        )
        return result

    def save(step: int) -> None:
        nonlocal last_ckpt
        if not bool(all_finite(state)):
            raise NonFiniteError(
                f"The state at step {step} holds non-finite values; not saving it. Last good "
                f"checkpoint: {last_ckpt}."
            )
        ckpt.save(step, state, it.get_state(), config_dict)
        last_ckpt = step

    final_eval: dict[str, float] = {}
    t_log, step_log = time.time(), start
    try:
        for step in range(start, total):
            batch = to_global(next(it), batch_sharding)
            if step == start:
                t0 = time.time()
                compiled = train_step.lower(state, batch, step_key).compile()
                print(f"compiled train step in {time.time() - t0:.1f} s", flush=True)
                train_step = compiled
                t_log = time.time()
            state, measurements = train_step(state, batch, step_key)
            done = step + 1
            buffer.add(done, measurements)
            is_last = done == total
            if done % tc.log_every == 0 or is_last:
                scalars = buffer.flush(last_ckpt)
                now = time.time()
                rate = (done - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, done
                scalars["steps_per_sec"] = rate
                writer.write_scalars(done, {f"train/{k}": v for k, v in scalars.items()})
                if is_main:
                    print(_progress(done, total, rate, scalars), flush=True)
            if done % tc.checkpoint_every == 0 or is_last:
                buffer.check(last_ckpt)
                save(done)
            if done % tc.eval_every == 0 or is_last:
                final_eval = run_eval(done)
        if start >= total and total > 0:
            final_eval = run_eval(total)
    finally:
        ckpt.close()
        writer.close()
        if hasattr(it, "close"):
            it.close()
    sys.stdout.flush()
    return final_eval
