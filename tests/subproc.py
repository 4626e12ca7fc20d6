"""Runs the repo's scripts (train.py, sample.py) in subprocesses, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env(devices: int = 4) -> dict[str, str]:
    """This environment (compilation cache included) on `devices` fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_script(*args: str, devices: int = 4, timeout: int = 300, check: bool = True):
    """`python ARGS...` from the repo root; with `check`, asserts success showing stderr."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=script_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def train_args(config: str, workdir: str, *extra: str) -> list[str]:
    """train.py arguments for the `tiny` variant of configs/CONFIG.py."""
    return ["train.py", f"--config=configs/{config}.py:tiny", f"--workdir={workdir}", *extra]


def start_lock_holder(workdir: str) -> subprocess.Popen:
    """A process that holds `workdir`'s lock (WorkdirLock) until killed; returns once it has
    it. The caller kills it (kill it in a `finally`)."""
    code = (
        "import sys, time\n"
        "from vq_jax.workdir_lock import WorkdirLock\n"
        "WorkdirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, workdir],
        cwd=ROOT,
        env=script_env(1),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
    except BaseException:
        proc.kill()
        raise
    return proc
