"""The tokenizer training loop: mesh, jitted sharded step, checkpoints, metrics, evaluation.

`train(config, workdir)` is what `train.py` calls. It is the only place (besides `state.py`) that
reads the config tree, and, with sample.py, the only place that does I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import api, checkpoints, cpu, data, distributed, finetune, metrics
from vq_jax import fid as fid_lib
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib
from vq_jax.cpu import xla_options
from vq_jax.errors import UserError
from vq_jax.state import State
from vq_jax.validate import check as check_config
from vq_jax.workdir_lock import WorkdirLock

DATA_AXIS = "data"
MAX_IN_FLIGHT = 2  # train steps dispatched but unfinished, at most (bounds the preemption delay)


class NonFiniteError(UserError, FloatingPointError):
    """A loss or gradient became NaN/Inf."""


# Config sections that fix the shapes of the train state; a workdir written with other values
# cannot be resumed without `train.allow_config_change`.
STATE_DEFINING = ("model", "quantizer", "discriminator", "input.resolution", "input.channels")
# Entries inside those sections that choose how the same state is computed, not its shapes:
# model.conv_weight_grad was one (how convs were computed) until the CPU kernels became a
# runtime setting (train.cpu_kernels); workdirs written before still carry it.
COMPUTE_ONLY = ("model.conv_weight_grad",)
# Entries added after workdirs were first written, with the value that means "as before": a
# saved config without the key equals a current one holding this value.
ADDED_DEFAULTS: dict[str, Any] = {"model.attn_levels": []}


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: list(d) if isinstance(d, tuple | list) else d}
    return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}


def _lookup(d: dict, path: str) -> Any:
    for key in path.split("."):
        d = d.get(key, {}) if isinstance(d, dict) else {}
    return d


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys of STATE_DEFINING config entries that differ between two config dicts."""
    diffs = []
    # The quantizer section compares in its canonical form: the kind, its sizes and its own
    # fields only, whichever layout (flat, pre-registry, or per-kind subsections) each has.
    saved, current = (
        {**d, "quantizer": state_lib.canonical_quantizer_config(d["quantizer"])}
        if isinstance(d.get("quantizer"), dict) and "kind" in d["quantizer"]
        else d
        for d in (saved, current)
    )
    for path in STATE_DEFINING:
        a, b = _flatten(_lookup(saved, path), path), _flatten(_lookup(current, path), path)
        added = {k: v for k, v in ADDED_DEFAULTS.items() if k.startswith(path + ".")}
        a, b = {**added, **a}, {**added, **b}
        diffs += [
            f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in COMPUTE_ONLY
        ]
    return diffs


class Preemption:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a save-and-exit request; a second Ctrl-C exits at
    once (status 130, nothing saved beyond what is on disk).

    One process: our own handlers. Several: JAX's preemption service (started by
    jax.distributed.initialize) catches SIGTERM on any process and makes every process stop at
    the same sync step; installing our handler there would replace JAX's, and a process that
    stopped on its own would leave the others waiting in a collective. JAX's sync step is one
    past the largest step any process last reported, and `should_stop` only fires at exactly
    that step, so the current step is reported at once: a notice during set-up (restore, token
    cache, compilation) then lands on the first step this run trains, not on step 1.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, step: int = 0, *, exit_now: Callable[[int], Any] = os._exit) -> None:
        self.requested = False
        self._interrupts = 0
        self._exit_now = exit_now
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        if self._multi:
            self.should_stop(step)
        elif threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                sys.stderr.write("interrupted again: exiting now without saving\n")
                sys.stderr.flush()
                self._exit_now(130)
                return
            sys.stderr.write(
                "interrupted: saving the current step, then exiting (Ctrl-C again: exit now)\n"
            )
            sys.stderr.flush()
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and exit (every process gets the same answer)."""
        if self._multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
        return self.requested

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, with a `data` axis."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, abstract_state: Any) -> Callable:
    """`step_fn(state, batch, key)` jitted over `mesh`: state replicated and donated, batch split
    on `data`, measurements replicated."""
    repl = jax.NamedSharding(mesh, jax.P())
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, jax.NamedSharding(mesh, jax.P(DATA_AXIS)), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
        compiler_options=xla_options.mesh_compiler_options(mesh),
    )


def jit_train_step(
    comps: state_lib.Components,
    settings: steps_lib.LossSettings,
    mesh: jax.sharding.Mesh,
    abstract_state: Any,
    *,
    skip_nonfinite: bool = False,
):
    """The tokenizer train step, jitted and sharded by `jit_step`."""
    step_fn = steps_lib.make_tokenizer_step(comps, settings, skip_nonfinite=skip_nonfinite)
    return jit_step(step_fn, mesh, abstract_state)


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


# The config's train and eval sources, and its preprocessing (data.py owns them; the API uses
# them too, without importing the trainer).
make_sources = data.config_sources
make_preprocess = data.config_preprocess


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


def format_duration(seconds: float) -> str:
    """H:MM:SS, with days in front beyond a day ("12d 13:52:19"); "?" when unknown."""
    if not np.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(round(seconds), 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hms}" if days else hms


def _progress(step: int, total: int, rate: float, scalars: dict[str, float]) -> str:
    eta = (total - step) / rate if rate > 0 else float("inf")
    loss = scalars.get("loss", float("nan"))
    return (
        f"step {step}/{total} ({100 * step / total:.1f}%) | loss {loss:.4f} | "
        f"{rate:.2f} steps/s | ETA {format_duration(eta)}"
    )


class MetricBuffer:
    """Holds per-step measurements on device until the next log point (no per-step host sync)."""

    def __init__(self) -> None:
        self._items: list[tuple[int, dict[str, Any]]] = []

    def add(self, step: int, measurements: dict[str, jax.Array]) -> None:
        """`step`: the state's step before this update (a batch poisoned by debug_nan_step=S
        shows up as step S), which the update advances to step + 1."""
        self._items.append((step, measurements))

    def check(self, last_good: int | None) -> None:
        """Fetches the buffered steps; raises NonFiniteError at the first non-finite value."""
        self._items = jax.device_get(self._items)
        for step, m in self._items:
            if m.get("skipped", 0) > 0:  # skip_nonfinite_steps: the update was not applied
                continue
            bad = sorted(k for k, v in m.items() if not np.all(np.isfinite(v)))
            if bad:
                raise NonFiniteError(
                    f"Non-finite {', '.join(bad)} at step {step} (the update from step {step} to "
                    f"{step + 1}; values: { {k: float(np.mean(m[k])) for k in bad} }). Last good "
                    "checkpoint: "
                    f"{last_good if last_good is not None else 'none'}. Lower the learning rate, "
                    "enable gradient clipping (config.optimizer.*.clip_norm), or compute in "
                    "float32."
                )

    def flush(self, last_good: int | None) -> dict[str, float]:
        """Means over the buffered steps (after `check`), and empties the buffer."""
        self.check(last_good)
        items, self._items = self._items, []
        kept = [m for _, m in items if m.get("skipped", 0) == 0]
        out = {k: float(np.mean([np.mean(m[k]) for m in kept])) for k in (kept or [{}])[0]}
        if items and "skipped" in items[0][1]:
            out["skipped"] = float(sum(m["skipped"] for _, m in items))
        return out


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
    result = {k: float(totals[k]) / n for k in ("l1", "mse", "psnr", "ssim")}
    stats = metrics.codebook_stats(totals["code_counts"])
    result["codebook_usage"] = float(stats["usage"])
    result["codebook_perplexity"] = float(stats["perplexity"])
    result["codes_used"] = int(np.sum(np.asarray(totals["code_counts"]) > 0))
    result["num_examples"] = int(n)
    return result, first


@dataclasses.dataclass
class Task:
    """What the generic loop needs from one kind of model (tokenizer, prior).

    init_fn:     key -> initial state (pure; eval_shape'd for abstract restores).
    step_fn:     the jitted train step (state, global batch, key) -> (state, measurements).
    train_iter:  per-process batches of numpy arrays, with get_state() / set_state().
    evaluate:    (state, step, writer) -> scalars; writes its own files (process 0 only).
    warm_start:  a fresh run's initial state -> the state it starts from (fine-tuning), or None.
    preview:     (state, step, writer) -> None: a cheap first picture (WORKDIR/preview.png) at
                 a run's first progress line, long before the first evaluation; or None.
    """

    init_fn: Callable[[jax.Array], State]
    make_step: Callable[[Any], Callable]
    make_train_iter: Callable[[], Any]
    evaluate: Callable[[State, int, metrics.MetricWriter], dict[str, float]]
    warm_start: Callable[[State], State] | None = None
    preview: Callable[[State, int, metrics.MetricWriter], None] | None = None


def save_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def run(
    task: Task,
    config: mlc.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    preemption: Preemption | None = None,
) -> dict:
    """The training loop shared by every task: restore or init, step, log, checkpoint, evaluate.

    Resumes from the newest restorable checkpoint in `workdir`; stops with NonFiniteError on a
    NaN/Inf measurement (no such state is ever saved); on SIGTERM saves and returns. Pass the
    `preemption` made before the task's set-up to cover that too (the caller closes it).
    """
    is_main = jax.process_index() == 0
    tc = config.train
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    key = jax.random.key(config.seed)
    abstract = checkpoints.abstract_like(jax.eval_shape(task.init_fn, key), repl)

    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    config_dict = json.loads(config.to_json_best_effort())
    diffs = []
    if ckpt.latest_step() is not None:
        diffs = config_differences(ckpt.read_config(), config_dict)
        if diffs and not tc.allow_config_change:
            ckpt.close()
            raise UserError(
                f"{workdir} was created by a different model config ({'; '.join(diffs)}). Use "
                "another --workdir, or pass --config.train.allow_config_change=True to resume "
                "anyway."
            )
    try:
        restored = ckpt.restore_latest(abstract, fallback=tc.checkpoint_fallback and not diffs)
    except checkpoints.CheckpointError as e:
        if not diffs:
            raise
        ckpt.close()  # nothing is damaged: the changed config no longer fits the saved arrays
        raise UserError(
            f"{workdir}'s checkpoints do not fit this config ({'; '.join(diffs)}): "
            "train.allow_config_change resumes only while the parameter shapes stay the same. "
            "Go back to the saved values, or use another --workdir."
        ) from e
    if restored is None:
        state = jax.jit(task.init_fn, out_shardings=repl)(key)
        if task.warm_start is not None:
            state = task.warm_start(state)
        data_state, start = None, 0
    else:
        start, state, data_state, _ = restored
        print(f"resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    it = task.make_train_iter()
    if data_state and tc.get("reset_data_iterator", False):
        print("train.reset_data_iterator: the data stream starts from its beginning", flush=True)
    elif data_state:  # a converted workdir saves none: its first run starts the stream fresh
        it.set_state(data_state)
    train_step = task.make_step(abstract)
    all_finite = jax.jit(
        lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))
    )
    step_key = state_lib.rng_stream(key, "train_step")
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    total = tc.steps
    buffer = MetricBuffer()
    last_ckpt = ckpt.latest_step()

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
    log_seconds = float(tc.get("log_every_seconds", 30.0) or float("inf"))
    in_flight: collections.deque = collections.deque()
    previewed = False
    single_process = jax.process_count() == 1
    own_preemption = preemption is None
    preemption = preemption or Preemption(start)
    try:
        if preemption.should_stop(start):  # during set-up: nothing new to save
            print(f"preempted before training; resume from step {start}; exiting", flush=True)
            return final_eval
        for step in range(start, total):
            local = next(it)
            if step == tc.debug_nan_step:  # tests: a poisoned batch
                local = {
                    k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                    for k, v in local.items()
                }
            batch = to_global(local, batch_sharding)
            if step == start:
                t0 = time.time()
                train_step = train_step.lower(state, batch, step_key).compile()
                all_finite = all_finite.lower(state).compile()  # a preemption save: no compile
                print(f"compiled train step in {time.time() - t0:.1f} s", flush=True)
                distributed.barrier(f"compiled_train_step_{start}")  # before the collectives
                t_log = time.time()
            state, measurements = train_step(state, batch, step_key)
            # At most MAX_IN_FLIGHT steps dispatched and unfinished: a preemption notice then
            # waits for one step, not for a deep queue (the CPU runs ~30 steps behind otherwise).
            in_flight.append(measurements)
            if len(in_flight) >= MAX_IN_FLIGHT:
                jax.block_until_ready(in_flight.popleft())
            done = step + 1
            buffer.add(step, measurements)
            is_last = done == total
            by_step = done % tc.log_every == 0 or is_last  # the same on every process
            # by time only with one process: a NaN found there by one process alone would leave
            # the others waiting in the next step's collectives
            by_time = single_process and time.time() - t_log >= log_seconds
            if by_step or by_time:
                scalars = buffer.flush(last_ckpt)
                now = time.time()
                rate = (done - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, done
                scalars["steps_per_sec"] = rate
                writer.write_scalars(done, {f"train/{k}": v for k, v in scalars.items()})
                if is_main:
                    print(_progress(done, total, rate, scalars), flush=True)
                # the preview runs on every process (a collective), at a log point they share
                evaluates = done % tc.eval_every == 0 or is_last  # draws its own picture
                if task.preview and not previewed and not evaluates:
                    previewed = True
                    task.preview(state, done, writer)
            if done % tc.checkpoint_every == 0 or is_last:
                buffer.check(last_ckpt)
                save(done)
            if done % tc.eval_every == 0 or is_last:
                final_eval = task.evaluate(state, done, writer)
            if not is_last and preemption.should_stop(done):
                buffer.check(last_ckpt)
                if last_ckpt != done:
                    save(done)
                ckpt.wait()
                print(f"preempted: saved checkpoint at step {done}; exiting", flush=True)
                return final_eval
        if start >= total and total > 0:
            final_eval = task.evaluate(state, total, writer)
    finally:
        if own_preemption:
            preemption.close()
        ckpt.close()
        writer.close()
        if hasattr(it, "close"):
            it.close()
    sys.stdout.flush()
    return final_eval


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


def tokenizer_task(config: mlc.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Task:
    """The VQ-VAE / VQGAN task: validates config and data before anything compiles."""
    comps = state_lib.build(config)
    is_main = jax.process_index() == 0
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    train_src, eval_src = make_sources(config)
    preprocess_fn = make_preprocess(config)
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
                f"ssim {result['ssim']:.4f} | "
                f"codebook usage {result['codebook_usage']:.3f} ({result['codes_used']} codes) | "
                f"perplexity {result['codebook_perplexity']:.1f}",
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
    return Task(init_fn, make_step, make_train_iter, evaluate, warm_start, preview)


class TokenSource:
    """Random access over cached token grids: {'image': int32 [h, w], 'label'} (the pipeline's
    keys; `TokenBatches` renames 'image' to 'tokens'). With condition grids `cond`, 'image' is
    the flattened [tokens; cond] (the pipeline carries only 'image' and 'label')."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, cond: np.ndarray | None = None):
        self._tokens, self._labels = tokens, labels.astype(np.int32)
        self._cond = cond

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image = self._tokens[i]
        if self._cond is not None:
            image = np.concatenate([image.reshape(-1), self._cond[i].reshape(-1)])
        return {"image": image, "label": self._labels[i]}


class TokenBatches:
    """The input pipeline's iterator with its batches' 'image' key renamed to 'tokens' (and split
    into 'tokens' [b, *token_shape] and 'cond' [b, *cond_shape] when both shapes are given)."""

    def __init__(
        self,
        it: Any,
        token_shape: tuple[int, ...] | None = None,
        cond_shape: tuple[int, ...] | None = None,
    ):
        self._it = it
        self._shapes = (token_shape, cond_shape)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        token_shape, cond_shape = self._shapes
        if cond_shape is None:
            return {"tokens": batch["image"], "label": batch["label"]}
        n, length = len(batch["image"]), math.prod(token_shape)
        return {
            "tokens": batch["image"][:, :length].reshape(n, *token_shape),
            "cond": batch["image"][:, length:].reshape(n, *cond_shape),
            "label": batch["label"],
        }

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


def cached_tokens(
    tok: api.Tokenizer,
    config: mlc.ConfigDict,
    split: str,
    cache_dir: str,
    sharding: jax.NamedSharding,
) -> tuple[np.ndarray, np.ndarray]:
    """The split's token grids and labels, tokenized once and cached as .npz.

    Every process reads and preprocesses its own share of the split (as in evaluation); the
    encoder runs on the global batch over all devices, and every process gets all the tokens;
    process 0 writes the cache.
    """
    path = os.path.join(cache_dir, f"{split}.npz")
    expected = tok.token_shape
    if os.path.exists(path):
        with np.load(path) as f:
            tokens, labels = f["tokens"], f["labels"]
            made_by = int(f["tokenizer_step"]) if "tokenizer_step" in f else -1
        if tokens.shape[1:] == expected and made_by == tok.step:
            return tokens, labels
        print(f"token cache {path} is stale (other tokenizer or grid); re-tokenizing", flush=True)
    pcount, pindex = jax.process_count(), jax.process_index()
    is_main = pindex == 0
    source, preprocess_fn = api.split_source(tok, split, data_dir=config.input.data_dir)
    ndev = jax.device_count()
    global_bs = -(-config.input.encode_batch_size // ndev) * ndev  # a multiple of the devices
    local_bs = global_bs // pcount
    batches = data.make_eval_batches(
        source,
        batch_size=local_bs,
        preprocess_fn=preprocess_fn,
        process_index=pindex,
        process_count=pcount,
    )
    repl = jax.NamedSharding(sharding.mesh, jax.P())

    def encode(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        indices = tok.model.apply(variables, batch["image"], method="encode")[1].indices
        return {"tokens": indices, "label": batch["label"], "mask": batch["mask"]}

    encode = jax.jit(
        encode,
        in_shardings=(repl, sharding),
        out_shardings=repl,
        compiler_options=xla_options.mesh_compiler_options(sharding.mesh),
    )
    tokens = np.zeros((len(source), *expected), np.int32)
    labels = np.zeros((len(source),), np.int32)
    rows = np.arange(global_bs)
    owner, row = np.divmod(rows, local_bs)  # row r of a global batch: process `owner`'s row
    t0 = time.time()
    progress = metrics.ProgressLine(f"tokenizing {split}:", len(batches), "batches")
    for j, batch in enumerate(batches):
        progress.update(j)
        out = jax.device_get(encode(tok._variables(), to_global(batch, sharding)))
        index = owner + (j * local_bs + row) * pcount  # make_eval_batches' example order
        keep = out["mask"] > 0
        tokens[index[keep]] = out["tokens"][keep]
        labels[index[keep]] = out["label"][keep]
        if is_main and j % 10 == 0:
            print(
                f"tokenizing {split}: {min((j + 1) * global_bs, len(source))} images "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    if is_main:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=tokens, labels=labels, tokenizer_step=tok.step)
        os.replace(tmp, path)  # atomic: a crash never leaves a partial cache
        print(f"cached {len(tokens)} {split} token grids {tokens.shape[1:]} in {path}", flush=True)
    distributed.barrier(f"tokens_{split}")  # the others read the cache process 0 wrote
    return tokens, labels


def prior_task(config: mlc.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Task:
    """The stage-2 task: a prior over the frozen tokenizer's token grids."""
    if not config.tokenizer_workdir:
        raise UserError(
            "config.tokenizer_workdir is empty; point it at a trained tokenizer: "
            "--config.tokenizer_workdir=W (a workdir written by train.py with a tokenizer config)."
        )
    state_lib.validate_batch_sizes(config)
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    tok = api.load(config.tokenizer_workdir, sharding=repl)
    ctok = api.load_condition_tokenizer(config, tok, sharding=repl)  # condition 'image' only
    comps = state_lib.build_prior(
        config, tok.token_shape, tok.codebook_size, *api.condition_grid(ctok)
    )
    ic, tc, pc = config.input, config.train, config.prior
    cache = os.path.join(workdir, "tokens")
    train_tokens, train_labels = cached_tokens(tok, config, ic.train_split, cache, batch_sharding)
    eval_tokens, eval_labels = cached_tokens(tok, config, ic.eval_split, cache, batch_sharding)
    train_cond = eval_cond = None
    if ctok is not None:  # the same examples through the condition tokenizer, cached once too
        ccache = os.path.join(cache, "condition")
        train_cond, _ = cached_tokens(ctok, config, ic.train_split, ccache, batch_sharding)
        eval_cond, _ = cached_tokens(ctok, config, ic.eval_split, ccache, batch_sharding)
    unlabeled = int(np.sum(train_labels < 0)) if comps.model.num_classes else 0
    if unlabeled:  # label -1: the dataset (or some of its images) has no class
        raise UserError(
            f"config.prior.num_classes={pc.num_classes} asks for a class-conditional prior, but "
            f"{unlabeled} of the {len(train_labels)} {ic.train_split!r} images of "
            f"{tok.config.input.dataset!r} have no label; set --config.prior.num_classes=0 for an "
            "unconditional prior (the token cache is kept), or give every image a class (folder "
            "datasets: one subfolder per class)."
        )
    if comps.model.num_classes and train_labels.max() >= pc.num_classes:
        raise UserError(
            f"the dataset has labels up to {train_labels.max()} but config.prior.num_classes="
            f"{pc.num_classes}; set it to {train_labels.max() + 1} (or 0 for unconditional)."
        )
    settings = steps_lib.PriorSettings(pc.class_dropout, pc.label_smoothing)
    pcount, pindex = jax.process_count(), jax.process_index()
    is_main = pindex == 0

    def make_train_iter():
        it = data.make_train_iter(
            TokenSource(train_tokens, train_labels, train_cond),
            batch_size=ic.batch_size // pcount,
            seed=config.seed,
            preprocess_fn=lambda t: t,
            random_flip=False,
            process_index=pindex,
            process_count=pcount,
            prefetch=ic.prefetch,
        )
        return TokenBatches(it, comps.token_shape, comps.cond_shape)

    def make_step(abstract):
        skip = tc.skip_nonfinite_steps
        return jit_step(
            steps_lib.make_prior_step(comps, settings, skip_nonfinite=skip), mesh, abstract
        )

    eval_step = jax.jit(
        steps_lib.make_prior_eval_step(comps, settings),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=repl,
    )
    eval_key = state_lib.rng_stream(jax.random.key(config.seed), "prior_eval")

    def evaluate(state: State, step: int, writer: metrics.MetricWriter) -> dict[str, float]:
        t0 = time.time()
        gb = ic.eval_batch_size
        n_batches = len(eval_tokens) // gb
        if tc.eval_batches:
            n_batches = min(n_batches, tc.eval_batches)
        lb = gb // pcount
        sums = None
        progress = metrics.ProgressLine(f"eval step {step}:", n_batches, "batches")
        for b in range(n_batches):  # full global batches only: every example weighs the same
            progress.update(b)
            sl = slice(b * gb + pindex * lb, b * gb + (pindex + 1) * lb)
            local = {"tokens": eval_tokens[sl], "label": eval_labels[sl]}
            if eval_cond is not None:
                local["cond"] = eval_cond[sl]
            batch = to_global(local, batch_sharding)
            out = eval_step(state["params"], batch, jax.random.fold_in(eval_key, b))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        result = {k: float(v) / max(n_batches, 1) for k, v in jax.device_get(sums or {}).items()}
        if "loss" in result:
            result["perplexity"] = float(np.exp(result["loss"]))
        result["eval_seconds"] = time.time() - t0
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        # Every process samples (the parameters span all of them); process 0 writes.
        prior = api.Prior(config, comps, state["params"], tok, step, ctok)
        per_class = config.sampling.samples_per_class
        num_classes = comps.model.num_classes
        if ctok is not None:  # condition (nearest-upsampled) | sample | truth's reconstruction
            n = min(per_class, len(eval_cond))
            tokens = prior.sample_tokens(n, seed=config.seed, cond_tokens=eval_cond[:n])
            lows = data.upsample_images(ctok.decode(eval_cond[:n]), tok.image_shape[:2], "nearest")
            images = np.concatenate([lows, tok.decode(tokens), tok.decode(eval_tokens[:n])])
            ncols = n
        else:
            num = per_class * max(num_classes, 1)
            labels = np.repeat(np.arange(num_classes), per_class) if num_classes else None
            images, _, _ = prior.generate(num, labels=labels, seed=config.seed)
            ncols = per_class if num_classes else 8
        if is_main:
            if ctok is None:  # one row per class, at most GRID_MAX_IMAGES in all
                rows = max(num_classes, 1)
                cols = max(1, min(per_class, metrics.GRID_MAX_IMAGES // rows))
                shown = images.reshape(rows, per_class, *images.shape[1:])[:, :cols]
                images = shown.reshape(-1, *images.shape[1:])[: metrics.GRID_MAX_IMAGES]
                ncols = cols if num_classes else min(cols, 8)
            grid = metrics.readable_grid(images, ncols=ncols)
            save_json(os.path.join(workdir, "eval", f"step_{step}.json"), {"step": step, **result})
            metrics.save_png(os.path.join(workdir, "eval", f"samples_step_{step}.png"), grid)
            writer.write_images(step, "eval/samples", grid[None])
            print(
                f"eval step {step}: loss {result.get('loss', float('nan')):.4f} | accuracy "
                f"{result.get('accuracy', float('nan')):.4f}",
                flush=True,
            )
        return result

    return Task(
        functools.partial(state_lib.init_prior_state, comps), make_step, make_train_iter, evaluate
    )


def train(config: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the model `config` describes (a tokenizer, or a prior when it has `prior`);
    resumes from the newest checkpoint in `workdir`."""
    config = finetune.with_source_generator(config, workdir)  # fine-tuning: its architecture
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    make_task = prior_task if "prior" in config else tokenizer_task
    check_config(config)  # every out-of-range field at once, before data and compilation
    cpu.enable(config.train.get("cpu_kernels", "auto"))  # builds here if needed, before tracing
    lock = WorkdirLock(workdir, jax.process_index())
    lock.acquire()  # one run per workdir, before anything reads or writes its checkpoints
    try:
        newest = checkpoints.newest_step_dir(os.path.join(workdir, "checkpoints"))
        preemption = Preemption(newest or 0)  # before the set-up, which can take long
        try:
            return run(make_task(config, workdir, mesh), config, workdir, mesh, preemption)
        finally:
            preemption.close()
    finally:
        lock.release()
