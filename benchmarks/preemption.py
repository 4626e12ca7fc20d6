"""Seconds from a preemption signal to the exit of `train.py`, with the step saved.

  JAX_PLATFORMS=cpu python -m benchmarks.preemption --config=configs/vqvae.py:fashion_mnist \
      --signal=SIGTERM --workdir=/tmp/bench/preempt

Starts a fresh training run in a subprocess, sends the signal at its second progress line (the
step running, a checkpoint not due), and reports the time until the process has exited, its
exit status and the step it saved. A Cloud TPU spot VM gets about 30 s of notice; the target is
10 s (issue 20).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/vqvae.py:fashion_mnist", "Config file[:variant].")
_SIGNAL = flags.DEFINE_enum("signal", "SIGTERM", ["SIGTERM", "SIGINT"], "Signal to send.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench/preempt", "Workdir (emptied first).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "train.py config overrides, e.g. --override=--config.train.steps=9999."
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config: str, sig: str, workdir: str, extra: tuple[str, ...] = ()) -> dict:
    """Runs train.py, signals it at the second progress line; the measured figures."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t_start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, progress, t_signal = [], 0, None
    for line in proc.stdout:
        lines.append(line)
        print(f"{time.time() - t_start:7.1f} s  {line}", end="", flush=True)
        if line.startswith("step ") and t_signal is None:
            progress += 1
            if progress == 2:
                t_signal = time.time()
                proc.send_signal(getattr(signal, sig))
    proc.wait()
    if t_signal is None:
        raise SystemExit("the run ended before its second progress line")
    out = "".join(lines)
    marker = "preempted: saved checkpoint at step "
    saved = int(out.split(marker)[1].split(";")[0]) if marker in out else None
    return {
        "config": config,
        "signal": sig,
        "seconds_to_exit": time.time() - t_signal,
        "exit_status": proc.returncode,
        "saved_step": saved,
    }


def main(argv: list[str]) -> None:
    del argv
    r = measure(_CONFIG.value, _SIGNAL.value, _WORKDIR.value, tuple(_OVERRIDE.value))
    print(
        f"{r['signal']}: exit status {r['exit_status']} {r['seconds_to_exit']:.1f} s after the "
        f"signal, saved step {r['saved_step']}"
    )
    if _JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    app.run(main)
