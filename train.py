"""Train a VQ-VAE / VQGAN tokenizer.

  python train.py --config=configs/vqvae.py:fashion_mnist --workdir=/tmp/vqvae
  python train.py --config=configs/vqgan.py --workdir=gs://bucket/vqgan   # accelerator recipe

Override any config field: --config.optimizer.generator.lr=1e-4. Restarting with the same
workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vq_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evals.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; -v 0 brings it back
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
