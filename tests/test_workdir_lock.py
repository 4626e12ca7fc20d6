"""One training run per workdir: a second one is refused, a dead one leaves no stale lock."""

import os
import signal

import pytest
from subproc import start_lock_holder

from configs import vqvae
from vq_jax import errors, trainer
from vq_jax.workdir_lock import WorkdirBusyError, WorkdirLock


def test_second_lock_is_refused_until_released(tmp_path):
    workdir = str(tmp_path / "w")
    with WorkdirLock(workdir):
        with pytest.raises(
            WorkdirBusyError, match=rf"in use by another training run \(pid {os.getpid()} on"
        ):
            WorkdirLock(workdir).acquire()
        with WorkdirLock(workdir, process_index=1):  # another process index: its own lock
            pass
    with WorkdirLock(workdir):  # released: free again
        pass


def test_train_refuses_a_busy_workdir_before_touching_it(tmp_path):
    workdir = str(tmp_path / "w")
    with WorkdirLock(workdir):
        with pytest.raises(errors.UserError, match=r"--workdir=.* is in use.*another --workdir"):
            trainer.train(vqvae.get_config("tiny"), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    """SIGKILL cannot run cleanup code; the kernel drops the lock with the process."""
    workdir = str(tmp_path / "w")
    proc = start_lock_holder(workdir)
    try:
        with pytest.raises(WorkdirBusyError, match=rf"pid {proc.pid} on"):
            WorkdirLock(workdir).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with WorkdirLock(workdir):
        pass
