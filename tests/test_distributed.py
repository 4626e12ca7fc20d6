"""vq_jax.distributed.plan: when a run becomes multi-process, decided from flags and env only."""

import pytest

from vq_jax import distributed
from vq_jax.distributed import DistributedConfigError, Settings, plan

SLURM_STEP = {
    "SLURM_JOB_ID": "123",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


def test_single_process_never_initializes():
    assert not plan(Settings(), {}).multi_process
    assert not plan(Settings(num_processes=1), {}).multi_process
    assert not plan(Settings(), {"JAX_NUM_PROCESSES": "1"}).multi_process
    # An sbatch script itself (no srun step) or a one-task step is one process.
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert not plan(Settings(), batch_script).multi_process
    assert not plan(Settings(), {**SLURM_STEP, "SLURM_NTASKS": "1"}).multi_process
    assert not plan(Settings(), {"TPU_WORKER_HOSTNAMES": "localhost"}).multi_process
    # --distributed=off wins over everything.
    everything = {**SLURM_STEP, "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
    assert not plan(Settings(mode="off", num_processes=2), everything).multi_process


def test_explicit_flags_and_environment():
    flags = Settings(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    assert plan(flags, {}).kwargs == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert plan(Settings(), env).kwargs == {
        "coordinator_address": "h:9",
        "num_processes": 4,
        "process_id": 2,
    }
    # Flags override the environment; the timeouts pass through.
    got = plan(Settings(process_id=0, heartbeat_timeout_seconds=7), env).kwargs
    assert got == {
        "coordinator_address": "h:9",
        "num_processes": 4,
        "process_id": 0,
        "heartbeat_timeout_seconds": 7,
    }


@pytest.mark.parametrize(
    "settings, env, match",
    [
        (Settings(num_processes=2, process_id=0), {}, r"missing: --coordinator_address"),
        (Settings(coordinator_address="h:1"), {}, r"--num_processes .*--process_id"),
        (Settings(coordinator_address="h:1", num_processes=2), {}, r"missing: --process_id"),
        (Settings(num_processes=2, process_id=2), {}, r"process_id=2 is not below"),
        (Settings(num_processes=0), {}, r"must be >= 1"),
        (Settings(), {"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' is not an integer"),
        (Settings(mode="maybe"), {}, r"use one of"),
    ],
)
def test_bad_combinations_name_the_fix(settings, env, match):
    with pytest.raises(DistributedConfigError, match=match):
        plan(settings, env)


def test_detected_clusters_let_jax_fill_in_the_rest():
    p = plan(Settings(), SLURM_STEP)
    assert p.multi_process and p.kwargs == {} and "SLURM" in p.reason
    p = plan(Settings(), {"OMPI_COMM_WORLD_SIZE": "4"})
    assert p.multi_process and "Open MPI" in p.reason
    p = plan(Settings(), {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert p.multi_process and "4 workers" in p.reason
    # Partial explicit values are allowed on a detected cluster (e.g. a fixed port).
    p = plan(Settings(coordinator_address="node001:5555"), SLURM_STEP)
    assert p.kwargs == {"coordinator_address": "node001:5555"}
    # --distributed=on: always, JAX auto-detects (Cloud TPU VM pods via the metadata server).
    p = plan(Settings(mode="on", initialization_timeout_seconds=60), {})
    assert p.kwargs == {"initialization_timeout": 60}


def test_initialize_does_nothing_for_one_process():
    assert not distributed.initialize(Settings(), env={}).multi_process
