"""The generic loop with a tiny fake task: one compiled step per phase, each called with its
phase; a task without phases keeps one executable."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from configs import vqvae
from vq_jax import loop


class _Batches:
    """Per-process batches of ones, with the get_state / set_state the loop checkpoints."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> dict[str, np.ndarray]:
        self.position += 1
        return {"x": np.ones((jax.device_count(),), np.float32)}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


def _config(steps: int) -> mlc.ConfigDict:
    config = vqvae.get_config("tiny")  # the loop reads seed and train.*
    config.train.update(steps=steps, log_every=2, eval_every=steps, checkpoint_every=steps)
    return config


def _task(traced: list, phase=None) -> tuple[loop.Task, dict]:
    """A step adding 100 in phase True and 1 otherwise (or 1 per step without phases)."""
    seen: dict = {}

    def step(state, batch, key, phase=False):
        traced.append(phase)  # runs once per compilation
        del key
        w = state["w"] + (100.0 if phase else 1.0) * jnp.mean(batch["x"])
        return {"w": w}, {"loss": w}

    def evaluate(state, step, writer):
        seen["w"], seen["step"] = float(state["w"]), step
        return {}

    task = loop.Task(
        init_fn=lambda key: {"w": jnp.zeros((), jnp.float32)},
        make_step=lambda abstract: loop.jit_step(
            step, loop.make_mesh(), abstract, phased=phase is not None
        ),
        make_train_iter=_Batches,
        evaluate=evaluate,
        phase=phase,
    )
    return task, seen


def test_one_compilation_per_phase_each_called_with_its_phase(tmp_path, capsys):
    traced: list = []
    task, seen = _task(traced, phase=lambda step: step >= 2)
    loop.run(task, _config(5), str(tmp_path / "w"), loop.make_mesh())
    assert traced == [False, True]  # compiled when first needed, once each
    assert seen == {"w": 1 + 1 + 100 + 100 + 100, "step": 5}
    out = capsys.readouterr().out
    assert "compiled train step for phase False" in out
    assert "compiled train step for phase True" in out


def test_no_phase_one_executable(tmp_path, capsys):
    traced: list = []
    task, seen = _task(traced)
    loop.run(task, _config(3), str(tmp_path / "w"), loop.make_mesh())
    assert traced == [False] and seen == {"w": 3.0, "step": 3}
    assert "compiled train step in" in capsys.readouterr().out
