"""The generic training loop: mesh, jit and shardings, metric buffering, preemption, `run`.

`run(task, config, workdir, mesh)` restores or initializes a `Task`'s state, steps it, logs,
checkpoints and evaluates; it knows nothing about which model it trains. The resume guard it
applies lives in `resume.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import checkpoints, distributed, metrics
from vq_jax import state as state_lib
from vq_jax.cpu import xla_options
from vq_jax.errors import UserError
from vq_jax.resume import config_differences
from vq_jax.state import State

DATA_AXIS = "data"
MAX_IN_FLIGHT = 2  # train steps dispatched but unfinished, at most (bounds the preemption delay)


class NonFiniteError(UserError, FloatingPointError):
    """A loss or gradient became NaN/Inf."""


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


def jit_step(
    step_fn: Callable, mesh: jax.sharding.Mesh, abstract_state: Any, *, phased: bool = False
) -> Callable:
    """`step_fn(state, batch, key)` jitted over `mesh`: state replicated and donated, batch split
    on `data`, measurements replicated. `phased`: `step_fn(state, batch, key, phase)` with
    `phase` a static (hashable) argument, one executable per phase."""
    repl = jax.NamedSharding(mesh, jax.P())
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, jax.NamedSharding(mesh, jax.P(DATA_AXIS)), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
        static_argnums=(3,) if phased else (),
        compiler_options=xla_options.mesh_compiler_options(mesh),
    )


def to_global(batch: dict[str, np.ndarray], sharding: jax.NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local part."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


# The config's train and eval sources, and its preprocessing (data.py owns them; the API uses
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
        """`step`: the state's step before this update (a batch that breaks the update from S
        to S + 1 shows up as step S)."""
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


@dataclasses.dataclass
class Task:
    """What the generic loop needs from one kind of model (tokenizer, prior).

    init_fn:         key -> initial state (pure; eval_shape'd for abstract restores).
    make_step:       abstract state -> the jitted train step (made with `jit_step`):
                     (state, global batch, key) -> (state, measurements), or, when `phase` is
                     set, (state, global batch, key, phase) with `phase` static.
    make_train_iter: () -> per-process batches of numpy arrays, with get_state() / set_state().
    evaluate:        (state, step, writer) -> scalars; writes its own files (process 0 only).
    warm_start:      a fresh run's initial state -> the state it starts from (fine-tuning), or
                     None.
    preview:         (state, step, writer) -> None: a cheap first picture (WORKDIR/preview.png)
                     at a run's first progress line, long before the first evaluation; or None.
    phase:           step -> a hashable phase (e.g. which losses are on), computed on the host
                     before each step; the loop compiles the step once per distinct phase, when
                     first needed. None: one executable, called without a phase.
    """

    init_fn: Callable[[jax.Array], State]
    make_step: Callable[[Any], Callable]
    make_train_iter: Callable[[], Any]
    evaluate: Callable[[State, int, metrics.MetricWriter], dict[str, float]]
    warm_start: Callable[[State], State] | None = None
    preview: Callable[[State, int, metrics.MetricWriter], None] | None = None
    phase: Callable[[int], Hashable] | None = None


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
    compiled: dict[Hashable, Callable] = {}  # one executable per phase
    single_process = jax.process_count() == 1
    own_preemption = preemption is None
    preemption = preemption or Preemption(start)
    try:
        if preemption.should_stop(start):  # during set-up: nothing new to save
            print(f"preempted before training; resume from step {start}; exiting", flush=True)
            return final_eval
        for step in range(start, total):
            batch = to_global(next(it), batch_sharding)
            phase = task.phase(step) if task.phase is not None else None
            if phase not in compiled:
                t0 = time.time()
                args = (state, batch, step_key) + ((phase,) if task.phase is not None else ())
                compiled[phase] = train_step.lower(*args).compile()
                if step == start:
                    all_finite = all_finite.lower(state).compile()  # a preemption save: no compile
                seconds = time.time() - t0
                which = f" for phase {phase}" if task.phase is not None else ""
                print(f"compiled train step{which} in {seconds:.1f} s", flush=True)
                distributed.barrier(f"compiled_train_step_{step}")  # before the collectives
                t_log = time.time() if step == start else t_log + seconds
            state, measurements = compiled[phase](state, batch, step_key)
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
