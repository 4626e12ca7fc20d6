"""The tokenizer task (VQ-VAE / VQGAN): its data, train step, preview and evaluation (with rFID).

`make_task(config, workdir, mesh)` validates the config and the data before anything compiles
and returns the `loop.Task` that `loop.run` trains.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import data, finetune, metrics
from vq_jax import fid as fid_lib
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib
from vq_jax.cpu import xla_options
from vq_jax.errors import UserError
from vq_jax.loop import DATA_AXIS, Task, jit_step, save_json, to_global
from vq_jax.state import State


def jit_train_step(
    comps: state_lib.Components,
    settings: steps_lib.LossSettings,
    mesh: jax.sharding.Mesh,
    abstract_state: Any,
    *,
    skip_nonfinite: bool = False,
):
    """The tokenizer train step, jitted and sharded by `jit_step`; its `phase` (VQGAN: which
    adversarial parts run, `steps.phase_at`) is static."""
    step_fn = steps_lib.make_tokenizer_step(comps, settings, skip_nonfinite=skip_nonfinite)
    return jit_step(step_fn, mesh, abstract_state, phased=True)


def loss_settings(config: mlc.ConfigDict) -> steps_lib.LossSettings:
    """The step's loss settings from `config.loss` (and the EMA decay from `config.train`)."""
    fields = {f for f in steps_lib.LossSettings.__dataclass_fields__}
    kw = {k: v for k, v in config.loss.items() if k in fields}
    kw["ema_decay"] = config.train.ema_decay
    if kw.get("disc_train_start", 0) < 0:
        kw["disc_train_start"] = kw["disc_start"]
    return steps_lib.LossSettings(**kw)


def check_data(source: Any, preprocess_fn, config: mlc.ConfigDict) -> None:
    """Fails before compilation if the data cannot feed the model (shape, channels, emptiness)."""
    if len(source) == 0:
        raise UserError(f"The dataset {config.input.dataset!r} has no examples.")
    data.check_sizes(source, config.input.resolution, config.input.resize)
    image = preprocess_fn(source[0]["image"])
    expected = (config.input.resolution, config.input.resolution, config.input.channels)
    if tuple(image.shape) != expected:
        raise UserError(
            f"Preprocessed images have shape {tuple(image.shape)} but the model expects "
            f"{expected}; "
            "check config.input.resolution / channels / resize."
        )


def evaluate_split(
    eval_step,
    params: Any,
    model_state: Any,
    batches: Iterator[dict],
    sharding,
    on_batch: Callable[[dict[str, jax.Array]], None] | None = None,
    progress: metrics.ProgressLine | None = None,
) -> tuple[dict[str, float], dict[str, jax.Array] | None]:
    """Exact means over the held-out split (every process passes its own batches; the step
    sums over the global batch), plus the first global batch for the image grid.
    `on_batch(global_batch)` runs on every batch (e.g. to gather Inception statistics);
    `progress` prints "eval i/n batches" lines while it runs."""
    totals, first = None, None
    for i, batch in enumerate(batches):
        if progress is not None:
            progress.update(i)
        global_batch = to_global(batch, sharding)
        sums = eval_step(params, model_state, global_batch)
        if on_batch is not None:
            on_batch(global_batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if first is None:
            first = global_batch
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    result = {k: float(totals[k]) / n for k in ("l1", "mse", "psnr", "ssim") if k in totals}
    result.update(metrics.usage_summary(totals["code_counts"]))
    result["num_examples"] = int(n)
    return result, first


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array split on the data axis (its addressable shards, in order;
    replicas of the same rows counted once)."""
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


class RFIDStats:
    """rFID during the trainer's evaluation: every process runs Inception on its own rows of
    each eval batch (originals and reconstructions); the sums are combined across processes.
    The originals' statistics are kept after the first evaluation (the split does not change)."""

    def __init__(self, comps: state_lib.Components, mesh: jax.sharding.Mesh, weights: str):
        fid_lib.feature_fn(weights)  # a bad path fails at start, naming the fix
        self.weights = weights
        batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
        repl = jax.NamedSharding(mesh, jax.P())
        model = comps.model

        def recon(p: Any, ms: Any, x: jax.Array) -> jax.Array:
            return jnp.clip(model.apply({"params": p, **ms}, x, train=False)[0], -1.0, 1.0)

        self._recon = jax.jit(
            recon,
            in_shardings=(repl, repl, batch_sharding),
            out_shardings=batch_sharding,
            compiler_options=xla_options.mesh_compiler_options(mesh),
        )
        self._real: fid_lib.StatsAccumulator | None = None

    def start(self, params: Any, model_state: Any) -> None:
        self._vars = (params, model_state)
        self._fake = fid_lib.StatsAccumulator()
        self._real_new = fid_lib.StatsAccumulator() if self._real is None else None

    def add(self, global_batch: dict[str, jax.Array]) -> None:
        recon = self._recon(*self._vars, global_batch["image"])
        keep = _local_rows(global_batch["mask"]) > 0
        if not keep.any():
            return
        feats = lambda x: fid_lib.inception_features(
            metrics.to_uint8(_local_rows(x)[keep]), weights=self.weights
        )
        self._fake.add(feats(recon))
        if self._real_new is not None:
            self._real_new.add(feats(global_batch["image"]))

    def finish(self) -> dict[str, float]:
        if self._real_new is not None:
            self._real = self._real_new.allgather()
        fake = self._fake.allgather()
        self._vars = None
        return {"rfid": self._real.frechet_distance(fake), "rfid_num": fake.count}


def make_task(config: mlc.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Task:
    """The VQ-VAE / VQGAN task: validates config and data before anything compiles."""
    comps = state_lib.build(config)
    is_main = jax.process_index() == 0
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    train_src, eval_src = data.config_sources(config)
    preprocess_fn = data.config_preprocess(config)
    check_data(train_src, preprocess_fn, config)
    data.check_sizes(eval_src, config.input.resolution, config.input.resize)
    ic, tc = config.input, config.train
    pcount, pindex = jax.process_count(), jax.process_index()

    def make_train_iter():
        return data.make_train_iter(
            train_src,
            batch_size=ic.batch_size // pcount,
            seed=config.seed,
            preprocess_fn=preprocess_fn,
            random_flip=ic.random_flip,
            process_index=pindex,
            process_count=pcount,
            prefetch=ic.prefetch,
        )

    def make_step(abstract):
        skip = tc.skip_nonfinite_steps
        return jit_train_step(comps, loss_settings(config), mesh, abstract, skip_nonfinite=skip)

    eval_step = jax.jit(
        steps_lib.make_eval_step(comps),
        in_shardings=(repl, repl, batch_sharding),
        out_shardings=repl,
        compiler_options=xla_options.mesh_compiler_options(mesh),
    )
    n_grid = min(tc.num_sample_images, ic.eval_batch_size)

    def grid_pairs(p: Any, ms: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images[:n_grid]
        return x, comps.model.apply({"params": p, **ms}, x)[0]

    # Every process runs it (the arrays span all of them); the result is on every process.
    reconstruct = jax.jit(
        grid_pairs,
        in_shardings=(repl, repl, batch_sharding),
        out_shardings=(repl, repl),
        compiler_options=xla_options.mesh_compiler_options(mesh),
    )

    def pairs_grid(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
        """Originals above their reconstructions, upscaled to a readable size."""
        pair = np.concatenate([metrics.to_uint8(x), metrics.to_uint8(recon)])
        return metrics.readable_grid(pair, ncols=len(x))

    def eval_batches(max_batches: int | None) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of the held-out split's global batches (the first max_batches)."""
        return data.make_eval_batches(
            eval_src,
            batch_size=ic.eval_batch_size // pcount,
            preprocess_fn=preprocess_fn,
            process_index=pindex,
            process_count=pcount,
            max_batches=max_batches,
        )

    preview_batch: list[jax.Array] = []

    def preview(state: State, step: int, writer: metrics.MetricWriter) -> None:
        if not preview_batch:  # the first eval batch, read once
            first = next(iter(eval_batches(1)))
            preview_batch.append(to_global(first, batch_sharding)["image"])
        params = state.get("ema_params", state["params"])
        pairs = jax.device_get(reconstruct(params, state["model_state"], preview_batch[0]))
        if is_main:
            grid = pairs_grid(*pairs)
            metrics.save_png(os.path.join(workdir, "preview.png"), grid)
            writer.write_images(step, "train/preview", grid[None])
            print(f"wrote {os.path.join(workdir, 'preview.png')} (reconstructions at step {step})")

    inception_weights = config.get("eval", {}).get("inception_weights", "")
    rfid = RFIDStats(comps, mesh, inception_weights) if inception_weights else None

    def evaluate(state: State, step: int, writer: metrics.MetricWriter) -> dict[str, float]:
        params = state.get("ema_params", state["params"])
        batches = eval_batches(tc.eval_batches or None)
        t0 = time.time()
        on_batch = None
        if rfid is not None:
            rfid.start(params, state["model_state"])
            on_batch = rfid.add
        progress = metrics.ProgressLine(f"eval step {step}:", len(batches), "batches")
        result, first = evaluate_split(
            eval_step, params, state["model_state"], batches, batch_sharding, on_batch, progress
        )
        if rfid is not None:
            result.update(rfid.finish())
        result["eval_seconds"] = time.time() - t0
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        pairs = None
        if first is not None:
            pairs = jax.device_get(reconstruct(params, state["model_state"], first["image"]))
        if is_main:
            save_json(os.path.join(workdir, "eval", f"step_{step}.json"), {"step": step, **result})
            if pairs is not None:
                grid = pairs_grid(*pairs)
                metrics.save_png(os.path.join(workdir, "eval", f"step_{step}.png"), grid)
                writer.write_images(step, "eval/originals_vs_reconstructions", grid[None])
            fid_part = f"rFID {result['rfid']:.2f} (N = {result['rfid_num']}) | " if rfid else ""
            print(
                f"eval step {step}: {fid_part}psnr {result['psnr']:.2f} dB | "
                f"ssim {metrics.ssim_text(result)} | "
                f"codebook usage {result['codebook_usage']:.3f} ({result['codes_used']} codes) | "
                f"perplexity {result['codebook_perplexity']:.1f}"
                + "".join(
                    f" | stage {s} usage {u:.3f}"
                    for s, u in enumerate(metrics.stage_usages(result))
                ),
                flush=True,
            )
        return result

    init_fn = functools.partial(state_lib.init_state, comps, ema=tc.ema_decay > 0)
    source = finetune.init_from(config)
    warm_start = None
    if source:
        warm_start = functools.partial(
            finetune.warm_start, comps=comps, source=source, sharding=repl
        )
    # the adversarial phase of each step (VQGAN only): a static argument, one executable each
    phase = (
        None if comps.disc is None else functools.partial(steps_lib.phase_at, loss_settings(config))
    )
    return Task(init_fn, make_step, make_train_iter, evaluate, warm_start, preview, phase)
