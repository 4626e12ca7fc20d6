"""Multi-process start-up: whether and how to call `jax.distributed.initialize`.

`plan(settings, env)` is a pure decision over flag values and an environment mapping, so it is
unit-testable without starting anything; `initialize(settings)` applies it. It must run before
anything touches a device (jax.devices(), a computation, a device_put).

When does a run become multi-process (`mode`):
  off   never; one process, whatever the environment says.
  on    always; values not given explicitly are auto-detected by JAX (Cloud TPU VM pods through
        the metadata server, SLURM, Open MPI, Kubernetes).
  auto  (default) when explicit values ask for more than one process (--num_processes, or
        JAX_NUM_PROCESSES), or the environment shows a multi-task job: a SLURM step
        (`srun`) with SLURM_NTASKS > 1, an Open MPI job with OMPI_COMM_WORLD_SIZE > 1, or a TPU
        slice whose TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES lists several workers.
        Cloud TPU VM pods started with `gcloud ... --worker=all` do not set these in the
        environment: pass --distributed=on there.

Explicit values come from flags, else from the environment variables JAX itself reads
(JAX_COORDINATOR_ADDRESS) or that we read alongside it (JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from vq_jax.errors import UserError

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# SLURM's variables for a task inside a job step (what JAX's own SLURM detection reads).
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


class DistributedConfigError(UserError):
    """Flags / environment that cannot describe a multi-process run."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The user's multi-process choices (flag values; None = not given)."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_seconds: int | None = None
    initialization_timeout_seconds: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do: `kwargs` for jax.distributed.initialize, or None for a single process."""

    kwargs: dict[str, Any] | None
    reason: str

    @property
    def multi_process(self) -> bool:
        return self.kwargs is not None


def _int_value(name: str, flag: int | None, env: Mapping[str, str], var: str) -> int | None:
    if flag is not None:
        return int(flag)
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedConfigError(
            f"{var}={raw!r} is not an integer; set it to the {name} (or pass --{name})."
        ) from None


def _env_int(env: Mapping[str, str], var: str) -> int:
    try:
        return int(env.get(var, "0"))
    except ValueError:
        return 0


def _detected_cluster(env: Mapping[str, str]) -> str | None:
    """A multi-task job visible in the environment (no network queries), or None."""
    if all(v in env for v in SLURM_STEP_VARS) and _env_int(env, "SLURM_NTASKS") > 1:
        return f"SLURM step with SLURM_NTASKS={env['SLURM_NTASKS']}"
    if _env_int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        workers = [w for w in env.get(var, "").split(",") if w.strip()]
        if len(workers) > 1:
            return f"TPU slice with {len(workers)} workers in {var}"
    return None


def plan(settings: Settings, env: Mapping[str, str]) -> Plan:
    """Decides from flag values and the environment whether to initialize, and with what.

    Raises DistributedConfigError, naming the fix, for combinations that cannot work.
    """
    if settings.mode not in MODES:
        raise DistributedConfigError(f"--distributed={settings.mode!r}; use one of {MODES}.")
    if settings.mode == "off":
        return Plan(None, "--distributed=off")
    address = settings.coordinator_address or env.get(ENV_COORDINATOR, "").strip() or None
    count = _int_value("num_processes", settings.num_processes, env, ENV_NUM_PROCESSES)
    pid = _int_value("process_id", settings.process_id, env, ENV_PROCESS_ID)
    if count is not None and count < 1:
        raise DistributedConfigError(f"num_processes={count}; it must be >= 1.")
    if pid is not None and pid < 0:
        raise DistributedConfigError(f"process_id={pid}; it must be >= 0.")
    if count is not None and pid is not None and pid >= count:
        raise DistributedConfigError(
            f"process_id={pid} is not below num_processes={count}; give each of the "
            f"{count} processes a distinct id in 0..{count - 1}."
        )
    explicit = any(v is not None for v in (address, count, pid))
    kwargs: dict[str, Any] = {}
    if settings.heartbeat_timeout_seconds is not None:
        kwargs["heartbeat_timeout_seconds"] = int(settings.heartbeat_timeout_seconds)
    if settings.initialization_timeout_seconds is not None:
        kwargs["initialization_timeout"] = int(settings.initialization_timeout_seconds)
    given = {
        k: v
        for k, v in (
            ("coordinator_address", address),
            ("num_processes", count),
            ("process_id", pid),
        )
        if v is not None
    }
    if settings.mode == "on":  # JAX auto-detects whatever is not given
        return Plan({**given, **kwargs}, "--distributed=on")
    cluster = _detected_cluster(env)
    if count == 1 and cluster is None:
        return Plan(None, "num_processes=1")
    if explicit and cluster is None:
        missing = [
            f"--{k} (or {var})"
            for k, var in (
                ("coordinator_address", ENV_COORDINATOR),
                ("num_processes", ENV_NUM_PROCESSES),
                ("process_id", ENV_PROCESS_ID),
            )
            if k not in given
        ]
        if missing:
            raise DistributedConfigError(
                f"A multi-process run needs the coordinator address, the number of processes "
                f"and this process's id; missing: {', '.join(missing)}. Give all three (the same "
                "address and count to every process), or pass --distributed=on on a cluster "
                "JAX detects by itself (Cloud TPU pod, SLURM, Open MPI)."
            )
        return Plan({**given, **kwargs}, "explicit coordinator, process count and id")
    if cluster is not None:
        return Plan({**given, **kwargs}, cluster)
    return Plan(None, "no multi-process environment detected")


def settings_from_flags(flag_values: Any) -> Settings:
    """Settings from an absl FlagValues holding the flags `define_flags` defines."""
    return Settings(
        mode=flag_values.distributed,
        coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes,
        process_id=flag_values.process_id,
        heartbeat_timeout_seconds=flag_values.heartbeat_timeout_seconds,
        initialization_timeout_seconds=flag_values.initialization_timeout_seconds,
    )


def define_flags() -> None:
    """Defines --distributed, --coordinator_address, --num_processes, --process_id and the
    timeouts on absl's global flags."""
    from absl import flags

    flags.DEFINE_enum(
        "distributed", "auto", MODES, "Multi-process mode (see vq_jax/distributed.py)."
    )
    flags.DEFINE_string(
        "coordinator_address", None, f"HOST:PORT of process 0 (or ${ENV_COORDINATOR})."
    )
    flags.DEFINE_integer("num_processes", None, f"Number of processes (or ${ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None, f"This process's id, 0.. (or ${ENV_PROCESS_ID}).")
    flags.DEFINE_integer(
        "heartbeat_timeout_seconds",
        None,
        "Seconds without a heartbeat after which a process counts as dead and the others stop "
        "(JAX's default: 100).",
    )
    flags.DEFINE_integer(
        "initialization_timeout_seconds",
        None,
        "Seconds to wait for every process to join (JAX's default: 300).",
    )


def initialize(settings: Settings, env: Mapping[str, str] | None = None) -> Plan:
    """Calls jax.distributed.initialize when `plan` says so; returns the plan."""
    decided = plan(settings, os.environ if env is None else env)
    if decided.multi_process:
        import jax

        try:
            jax.distributed.initialize(**decided.kwargs)
        except ValueError as e:  # JAX found no cluster to fill in the missing values
            raise DistributedConfigError(
                f"jax.distributed.initialize: {e} No cluster JAX detects by itself (Cloud TPU "
                "pod, SLURM, Open MPI) was found; give --coordinator_address, --num_processes "
                "and --process_id."
            ) from e
        print(
            f"process {jax.process_index()} of {jax.process_count()} ({decided.reason}); "
            f"{jax.local_device_count()} local of {jax.device_count()} devices",
            flush=True,
        )
    return decided


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here until all have arrived; a no-op in a single process.

    It waits through JAX's coordination service, not through a device collective: processes
    that compile or tokenize at different speeds (hosts differ, a busy machine) meet here before
    their next collective, whose CPU transport (gloo) gives up after 30 s of waiting for a peer
    ("Gloo context initialization failed: DEADLINE_EXCEEDED"). `name` must be unique per call.
    """
    import jax

    if jax.process_count() == 1:
        return
    # JAX has no public API for this barrier; orbax's multihost utilities use the same client.
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(
        f"vq_jax_{name}", timeout_in_ms=timeout_s * 1000
    )
