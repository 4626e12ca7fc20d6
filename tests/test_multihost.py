"""Multi-process training on localhost: train.py processes on the CPU backend (2 fake devices
each) cooperate through jax.distributed (gloo collectives) exactly as the hosts of a pod do.

Every process is started with a deadline and killed in `finally`; a run that hangs fails the
test instead of the suite. The deadlines are sized for a loaded 2-core CI machine (where a tiny
config compiles in minutes, not seconds); a failure says what it was waiting for, and shows
every process's log.
"""

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from subproc import ROOT, run_script, script_env, train_args

import vq_jax
from configs import vqvae
from vq_jax import state as state_lib
from vq_jax import trainer

# A process silent this long counts as dead (JAX's default: 100 s). Short, so the kill test is
# quick, but not so short that a starved process on a busy machine is declared dead.
HEARTBEAT_S = 20
START_S = 600  # until every process has compiled its step (or written a checkpoint)
RUN_S = 600  # a whole tiny run
# Two processes reduce gradients and statistics with gloo, one process with XLA's in-process
# all-reduce: the same sums in another order, so float32 results agree to rounding only
# (observed: <= 1e-6 after 4 steps).
ATOL = RTOL = 1e-5
# Except attention key biases: their exact gradient is zero (softmax ignores a constant added to
# every logit of a query), so what each run computes is rounding noise, which Adam (eps=1e-8)
# scales up to steps of about +-lr. Their gradient moments (in opt_state) still meet ATOL; the
# values themselves can only be bounded by what Adam can move them: lr per step and run.
NOISE_DRIVEN = "['k']['bias']"
# How JAX reports a peer that stopped (its distributed runtime aborts the survivors).
DIED = r"another task died|stopped sending heartbeats|heartbeat timeout"
# After a peer is killed, the survivor's runtime notices within HEARTBEAT_S and then tears down;
# the rest is room for a starved process on a busy machine (a passing run does not wait for it).
NOTICE_S = HEARTBEAT_S + 100
TAIL_LINES = 25  # of each process's log in a failure message

# What a train.py log shows of its progress, in order: a failure names the last one reached.
_PHASES = (
    ("joined the cluster", r"process \d+ of \d+"),
    ("resumed", r"resumed from checkpoint step \d+"),
    ("compiled its step", r"compiled train step"),
    ("trained", r"step \d+/\d+ \("),
    ("evaluated", r"eval step \d+:"),
    ("saved on preemption", r"preempted: saved checkpoint"),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


@contextlib.contextmanager
def _processes(commands: list[list[str]], log_dir: str, devices: int):
    """Starts `python CMD` for each command (stdout+stderr to log_dir/p{i}.log); kills whatever
    still runs on exit. Yields [(Popen, log path)]."""
    os.makedirs(log_dir, exist_ok=True)
    procs = []
    try:
        for i, cmd in enumerate(commands):
            path = os.path.join(log_dir, f"p{i}.log")
            with open(path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, *cmd],
                    cwd=ROOT,
                    env=script_env(devices),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            procs.append((proc, path))
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        for proc, _ in procs:
            proc.wait(timeout=30)


def _cluster_commands(workdir: str, *extra: str, n: int = 2) -> list[list[str]]:
    address = f"127.0.0.1:{_free_port()}"
    return [
        train_args(
            "vqvae",
            workdir,
            f"--coordinator_address={address}",
            f"--num_processes={n}",
            f"--process_id={i}",
            f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
            "--initialization_timeout_seconds=300",  # the peer may start slowly on a busy machine
            *extra,
        )
        for i in range(n)
    ]


def _phase(log: str) -> str:
    """How far a train.py process got, by the last phase its log shows."""
    reached = [name for name, pattern in _PHASES if re.search(pattern, log)]
    return reached[-1] if reached else "started (no progress line yet)"


def _describe(i: int, proc: subprocess.Popen, path: str) -> str:
    """One process for a failure message: its state, its phase and its log's last lines."""
    log = _log(path)
    code = proc.poll()
    state = "still running" if code is None else f"exited {code}"
    tail = "\n".join(log.splitlines()[-TAIL_LINES:])
    return f"--- process {i} ({state}; last phase: {_phase(log)}; log {path}):\n{tail}"


def _tails(procs) -> str:
    return "\n".join(_describe(i, proc, path) for i, (proc, path) in enumerate(procs))


def _wait(procs, timeout: float, what: str = "the processes to exit") -> None:
    """Waits for every process; fails naming `what`, the processes still running and every
    process's phase and log tail at the deadline."""
    deadline = time.time() + timeout
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            running = [i for i, (p, _) in enumerate(procs) if p.poll() is None]
            pytest.fail(
                f"timed out after {timeout:.0f} s waiting for {what}: process(es) {running} "
                f"still run\n{_tails(procs)}"
            )


def _wait_for(procs, condition, timeout: float, what: str) -> None:
    """Polls `condition()` while every process runs; fails naming `what` otherwise."""
    deadline, t0 = time.time() + timeout, time.time()
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_tails(procs)}")
        exited = [i for i, (p, _) in enumerate(procs) if p.poll() is not None]
        if exited:
            pytest.fail(
                f"process(es) {exited} exited after {time.time() - t0:.0f} s while waiting for "
                f"{what}\n{_tails(procs)}"
            )
        time.sleep(0.1)


def _assert_ok(procs) -> None:
    for i, (proc, path) in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{_describe(i, proc, path)}"


def _state(workdir: str):
    """The full train state of a tokenizer workdir, restored in this (single) process."""

    def make_init(config):
        comps = state_lib.build(config)
        return lambda key: state_lib.init_state(comps, key, ema=config.train.ema_decay > 0)

    _, state, step = vq_jax.api.restore_state(workdir, make_init)
    return step, jax.device_get(state)


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _committed_steps(workdir: str) -> list[int]:
    """Finalized checkpoint steps (orbax renames a step's directory once it is complete)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return (
        sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
        if os.path.isdir(ckpt_dir)
        else []
    )


def test_two_processes_train_exactly_like_one(tmp_path):
    """2 processes x 2 devices vs 1 process x 4 devices, tiny VQ-VAE, 4 steps, same global
    batches: same state, same (globally reduced) metrics written once, same evaluation; the
    multi-process checkpoint restores in one process (what sample.py loads)."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    with _processes(_cluster_commands(multi), str(tmp_path / "logs"), devices=2) as procs:
        try:  # meanwhile, here: 1 process, 4 devices
            trainer.train(vqvae.get_config("tiny"), single)
        except BaseException:
            print(
                f"the in-process single-process run failed; the cluster meanwhile:\n{_tails(procs)}"
            )
            raise
        _wait(procs, timeout=RUN_S, what="both processes to finish 4 steps")
    _assert_ok(procs)

    step_m, state_m = _state(multi)
    step_s, state_s = _state(single)
    assert step_m == step_s == 4
    assert jax.tree.structure(state_m) == jax.tree.structure(state_s)
    tiny = vqvae.get_config("tiny")
    lr, steps = tiny.optimizer.generator.lr, tiny.train.steps
    noise_driven = 0
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(state_m)[0], jax.tree.leaves(state_s), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if name.startswith("['params']") and name.endswith(NOISE_DRIVEN):
            noise_driven += 1
            np.testing.assert_allclose(a, b, atol=2 * lr * steps, rtol=0, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL, err_msg=name)
    assert noise_driven == 5  # the 5 attention blocks' key biases; nothing else is exempt

    # Metrics: globally reduced, written once (by process 0): the single-process rows exactly.
    rows_m, rows_s = _metrics(multi), _metrics(single)
    assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == [2, 4, 4]
    for rm, rs in zip(rows_m, rows_s, strict=True):
        assert rm.keys() == rs.keys()
        for k in rm.keys() - {"step", "train/steps_per_sec", "eval/eval_seconds"}:
            np.testing.assert_allclose(rm[k], rs[k], atol=1e-4, rtol=1e-4, err_msg=k)
    assert rows_m[-1]["eval/num_examples"] == 16  # the held-out split, split across processes
    assert len(glob.glob(os.path.join(multi, "tb", "events.*"))) == 1
    assert sorted(os.listdir(os.path.join(multi, "eval"))) == ["step_4.json", "step_4.png"]
    log0, log1 = _log(procs[0][1]), _log(procs[1][1])
    assert "process 0 of 2" in log0 and "process 1 of 2" in log1
    assert "eval step 4:" in log0 and "eval step 4:" not in log1

    # What sample.py does with a workdir (vq_jax.load), here in-process to save a start-up.
    tok = vq_jax.load(multi)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    assert tok.step == 4 and tok.reconstruct(images).shape == images.shape


def test_killed_process_stops_the_others_and_a_restart_resumes(tmp_path):
    """SIGKILL one of 2 processes after a checkpoint: the survivor exits non-zero within the
    heartbeat timeout (no hang) saying another task died. Restarting both resumes from the
    newest checkpoint; SIGTERM to one of them then makes both save the same step and exit 0."""
    workdir = str(tmp_path / "w")
    long_run = [
        "--config.train.steps=1000",
        "--config.train.checkpoint_every=1",
        "--config.train.eval_every=1000",
    ]
    with _processes(_cluster_commands(workdir, *long_run), str(tmp_path / "run1"), 2) as procs:
        _wait_for(procs, lambda: _committed_steps(workdir), START_S, "a first checkpoint")
        (survivor, log0), (victim, _) = procs
        victim.kill()
        t0 = time.time()
        _wait([(survivor, log0)], NOTICE_S, "the survivor (process 0) to notice the kill")
        waited = time.time() - t0
    assert survivor.returncode != 0
    assert re.search(DIED, _log(log0)), _describe(0, survivor, log0)
    print(f"survivor stopped {waited:.1f} s after the kill (heartbeat timeout {HEARTBEAT_S} s)")

    newest = _committed_steps(workdir)[-1]
    with _processes(_cluster_commands(workdir, *long_run), str(tmp_path / "run2"), 2) as procs:
        compiled = lambda: all("compiled train step" in _log(p) for _, p in procs)
        _wait_for(procs, compiled, START_S, "both restarted processes to compile")
        procs[1][0].send_signal(signal.SIGTERM)
        _wait(procs, 300, "both processes to save and exit after SIGTERM")
    _assert_ok(procs)
    saved = set()
    for _, path in procs:
        log = _log(path)
        assert f"resumed from checkpoint step {newest} " in log
        saved |= set(re.findall(r"preempted: saved checkpoint at step (\d+);", log))
    assert len(saved) == 1, saved  # both processes stopped at the same step
    assert newest < int(saved.pop()) == _committed_steps(workdir)[-1]


def test_incomplete_flags_fail_in_one_line(tmp_path):
    """A process count without a coordinator and id: one line naming the fix, nothing started."""
    workdir = str(tmp_path / "w")
    proc = run_script(*train_args("vqvae", workdir, "--num_processes=2"), check=False, timeout=120)
    assert proc.returncode != 0
    assert "missing: --coordinator_address (or JAX_COORDINATOR_ADDRESS), --process_id" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(workdir)
