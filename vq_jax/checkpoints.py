"""Orbax checkpointing: the train state, the data-iterator position and the config, one step each.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a crash
while saving never leaves a half-written step as the latest. Restores go straight into the
current shardings, so a checkpoint written on N devices restores on M devices. In a
multi-process run every process makes the same calls on one shared directory (on a file
system every host mounts): orbax writes each array once and the JSON items from process 0.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from vq_jax import distributed
from vq_jax.errors import UserError

ITEMS = ("state", "data", "config")


class CheckpointError(UserError, RuntimeError):
    """No restorable checkpoint, or one that cannot be read."""


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` with fallback to older steps on corruption."""

    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        """`read_only`: for loading (api.load, sample.py, evaluation): nothing in `directory` is
        created, moved or deleted, and a damaged step is skipped, not set aside."""
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            read_only=read_only,
        )
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # orbax warns that a read-only manager is read-only
            absl_logger.setLevel(max(level, logging.ERROR))
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        finally:
            absl_logger.setLevel(level)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts saving `step`; device-to-host copies finish before this returns."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, config) of `step` into `abstract_state`'s shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        return out.state, out.data, out.config

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def restore_latest(
        self, abstract_state: Any, *, fallback: bool = True
    ) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest readable step: (step, state, data_state, config), or None if empty.

        A step that fails to restore (truncated file, missing item) is reported and, with
        `fallback`, the previous step is tried; without it a CheckpointError says which step is
        broken.
        """
        steps = self.steps()
        broken: list[int] = []
        for step in reversed(steps):
            try:
                state, data_state, config = self.restore(step, abstract_state)
            except Exception as e:
                msg = (
                    f"Checkpoint step {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e)[:300]})."
                )
                if not fallback:
                    raise CheckpointError(
                        msg
                        + " Delete that step's directory to resume from the previous one, or allow "
                        "fallback (config.train.checkpoint_fallback=True)."
                    ) from e
                logging.warning("%s Falling back to the previous checkpoint.", msg)
                broken.append(step)
                continue
            if not self.read_only:
                self._set_aside(broken)
            return step, state, data_state, config
        if steps:
            raise CheckpointError(
                f"None of the checkpoints {steps} in {self.directory} can be restored (the "
                "warnings above say why); if their files are damaged, start a new workdir; if the "
                "config changed, restore its saved values."
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unrestorable steps to `<directory>_corrupt/` so training can save them anew;
        nothing is deleted."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory + "_corrupt"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}.{int(time.time())}")
                os.replace(os.path.join(self.directory, str(step)), target)
                logging.warning("Moved the unrestorable checkpoint step %d to %s.", step, target)
        # the others reload only once process 0 has moved them
        distributed.barrier(f"checkpoints_set_aside_{'_'.join(map(str, steps))}")
        self._manager.reload()


def newest_step_dir(directory: str) -> int | None:
    """The largest finalized step in `directory` by its name, without opening a manager (orbax
    names each finalized step's directory by its number; unfinished ones carry a suffix)."""
    if not os.path.isdir(directory):
        return None
    return max((int(d) for d in os.listdir(directory) if d.isdigit()), default=None)


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs with `sharding` for every leaf of `tree` (arrays or abstract values)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
