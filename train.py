"""Train a VQ-VAE / VQGAN tokenizer.

  python train.py --config=configs/vqvae.py:fashion_mnist --workdir=/tmp/vqvae
  python train.py --config=configs/vqgan.py --workdir=/shared/vqgan   # accelerator recipe

Override any config field: --config.optimizer.generator.lr=1e-4. Restarting with the same
workdir resumes from its newest checkpoint.

Multi-process (one process per host or per GPU; see README "Multi-host"):

  python train.py ... --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
  python train.py ... --distributed=on     # Cloud TPU VM pod: JAX finds the other workers

SLURM steps (`srun`) with more than one task are detected without flags.
"""

import re

from absl import app, flags, logging
from ml_collections import config_flags

from vq_jax import distributed, errors, trainer, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evals.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; -v 0 brings it back
    try:  # before anything touches a device
        distributed.initialize(distributed.settings_from_flags(flags.FLAGS))
    except distributed.DistributedConfigError as e:
        errors.exit_with("train.py", e)
    try:
        trainer.train(_CONFIG.value, _WORKDIR.value)
    except errors.UserError as e:  # config, data, workdir: one line, no traceback
        errors.exit_with("train.py", e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with flag and config-override mistakes reported in one line (exit 2),
    not a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
        if missing is None:
            raise
        name = missing.group(1)
        errors.exit_with(
            "train.py",
            errors.UserError(
                f"--{name} is required ({flags.FLAGS[name].help}); e.g. python train.py "
                "--config=configs/vqvae.py:fashion_mnist --workdir=/tmp/vqvae"
            ),
        )
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        detail = str(e.args[0] if e.args else e)
        detail = " ".join(detail.replace("\\n", " ").replace("\\'", "'").split())
        if len(detail) > 1 and detail[0] == detail[-1] == "'":  # KeyError's repr quotes
            detail = detail[1:-1]
        errors.exit_with(
            "train.py",
            errors.UserError(
                f"invalid config override: {detail}. Config files are locked: only existing "
                "fields can be set, with values of their type; see the config file."
            ),
        )
    try:  # a scalar given for a tuple field (ml_collections would make it a 1-tuple)
        validate.check_overrides(_CONFIG.value, argv[1:])
    except errors.UserError as e:
        errors.exit_with("train.py", e)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
