"""The training entry point: `train(config, workdir)` picks the task by config and runs the loop.

`train.py` calls it. The loop is `loop.py`, the tasks are `tasks/` (tokenizer, prior), the resume
guard is `resume.py`; this module only sets up what one run needs (config checks, the mesh, the
workdir lock, preemption) and hands over.
"""

from __future__ import annotations

import os

import jax
import ml_collections as mlc

from vq_jax import checkpoints, cpu, finetune, loop
from vq_jax.tasks import prior as prior_task
from vq_jax.tasks import tokenizer as tokenizer_task
from vq_jax.validate import check as check_config
from vq_jax.workdir_lock import WorkdirLock


def train(config: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the model `config` describes (a tokenizer, or a prior when it has `prior`);
    resumes from the newest checkpoint in `workdir`."""
    config = finetune.with_source_generator(config, workdir)  # fine-tuning: its architecture
    os.makedirs(workdir, exist_ok=True)
    make_task = prior_task.make_task if "prior" in config else tokenizer_task.make_task
    check_config(config)  # every out-of-range field at once, before data and compilation
    # The CPU kernels: chosen and built here, once, before anything is traced (a log line; a
    # visible warning and XLA's kernels when the build fails).
    cpu.enable(config.train.get("cpu_kernels", "auto"))
    mesh = loop.make_mesh()
    lock = WorkdirLock(workdir, jax.process_index())
    lock.acquire()  # one run per workdir, before anything reads or writes its checkpoints
    try:
        newest = checkpoints.newest_step_dir(os.path.join(workdir, "checkpoints"))
        preemption = loop.Preemption(newest or 0)  # before the set-up, which can take long
        try:
            return loop.run(make_task(config, workdir, mesh), config, workdir, mesh, preemption)
        finally:
            preemption.close()
    finally:
        lock.release()
