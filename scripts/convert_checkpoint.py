"""Convert a pretrained PyTorch tokenizer into a vq-jax workdir (config + step-0 checkpoint).

  # taming-transformers' VQGAN: the released folder's checkpoints/last.ckpt + configs/model.yaml
  python scripts/convert_checkpoint.py --source=taming --checkpoint=last.ckpt \
      --config=model.yaml --workdir=/tmp/vqgan_imagenet_f16_16384
  # LlamaGen: vq_ds16_c2i.pt (--model=VQ-16) or vq_ds8_c2i.pt (--model=VQ-8)
  python scripts/convert_checkpoint.py --source=llamagen --checkpoint=vq_ds16_c2i.pt \
      --model=VQ-16 --workdir=/tmp/llamagen_vq16

Then `vq_jax.load(W)`, `sample.py --workdir=W`, `--config.tokenizer_workdir=W` (priors) and
`--config.train.init_from=W` (fine-tuning) use it like a trained workdir. Everything that is
not the generator (data, losses, optimizer) comes from --base (default configs/vqvae.py, the
ImageNet recipe), overridable like train.py's config: --base.input.dataset=folder ...
Needs torch to read the files (pip install -e '.[torch]'); pytorch_lightning is not needed.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq_jax import convert  # after the sys.path line above

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SOURCE = flags.DEFINE_enum("source", None, list(convert.SOURCES), "Where the checkpoint is from.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "taming last.ckpt or LlamaGen .pt file.")
_YAML = flags.DEFINE_string("config", None, "taming: the model.yaml released with the ckpt.")
_MODEL = flags.DEFINE_string("model", None, "llamagen: VQ-16 or VQ-8.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The vq-jax workdir to write (new or empty).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype of the converted model.")
_BASE = config_flags.DEFINE_config_file(
    "base", os.path.join(ROOT, "configs/vqvae.py"), "Config for everything but the generator."
)
flags.mark_flags_as_required(["source", "checkpoint", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        config = convert.convert(
            _SOURCE.value,
            _CHECKPOINT.value,
            _WORKDIR.value,
            base_config=_BASE.value,
            yaml_path=_YAML.value,
            model=_MODEL.value,
            dtype=_DTYPE.value,
        )
    except convert.ConversionError as e:
        sys.exit(f"convert_checkpoint.py: {e}")
    m, q = config.model, config.quantizer
    print(
        f"wrote {_WORKDIR.value}: {_SOURCE.value} tokenizer, ch {m.ch} x {tuple(m.ch_mult)}, "
        f"{m.num_res_blocks} res blocks, attention at levels {tuple(m.attn_levels)}, "
        f"{q.codebook_size} codes of dim {q.embed_dim}"
        f"{' (l2-normalised)' if q.l2_normalize else ''}, {config.input.resolution}x"
        f"{config.input.resolution}x{config.input.channels} images, compute {m.dtype}"
    )


if __name__ == "__main__":
    app.run(main)
