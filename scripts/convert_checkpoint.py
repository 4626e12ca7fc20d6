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

import importlib.util
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq_jax import convert, errors  # after the sys.path line above

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SOURCE = flags.DEFINE_enum("source", None, list(convert.SOURCES), "Where the checkpoint is from.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "taming last.ckpt or LlamaGen .pt file.")
_YAML = flags.DEFINE_string("config", None, "taming: the model.yaml released with the ckpt.")
_MODEL = flags.DEFINE_string("model", None, "llamagen: VQ-16 or VQ-8.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The vq-jax workdir to write (new or empty).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype of the converted model.")
_RESOLUTION = flags.DEFINE_integer(
    "resolution", 0, "Image size of the workdir (0: the source's, 256 for LlamaGen)."
)
_LPIPS_OUT = flags.DEFINE_string(
    "lpips_out", None, "taming: also write the LPIPS weights in its loss keys to this .npz."
)
_BASE = config_flags.DEFINE_config_file(
    "base", os.path.join(ROOT, "configs/vqvae.py"), "Config for everything but the generator."
)
flags.mark_flags_as_required(["source", "checkpoint", "workdir"])


def write_lpips(checkpoint: str, out: str) -> str:
    """The LPIPS (VGG16 + heads) weights of a taming checkpoint's loss, as convert_lpips.py
    writes them (for config.loss.lpips_weights); returns the .npz path."""
    spec = importlib.util.spec_from_file_location(
        "convert_lpips", os.path.join(ROOT, "scripts", "convert_lpips.py")
    )
    convert_lpips = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_lpips)
    try:
        flat = convert_lpips.from_taming_checkpoint(checkpoint)
    except convert.ConversionError:
        raise
    except ValueError as e:
        raise convert.ConversionError(f"{checkpoint!r}: {e}") from e
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **flat)
    return out if out.endswith(".npz") else out + ".npz"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        if _LPIPS_OUT.value and _SOURCE.value != "taming":
            raise convert.ConversionError(
                "--lpips_out needs --source=taming: LlamaGen's .pt files hold no LPIPS weights."
            )
        config = convert.convert(
            _SOURCE.value,
            _CHECKPOINT.value,
            _WORKDIR.value,
            base_config=_BASE.value,
            yaml_path=_YAML.value,
            model=_MODEL.value,
            dtype=_DTYPE.value,
            resolution=_RESOLUTION.value,
        )
        lpips_path = _LPIPS_OUT.value and write_lpips(_CHECKPOINT.value, _LPIPS_OUT.value)
    except errors.UserError as e:  # ConversionError included: one line, exit 2
        errors.exit_with("convert_checkpoint.py", e)
    m, q = config.model, config.quantizer
    print(
        f"wrote {_WORKDIR.value}: {_SOURCE.value} tokenizer, ch {m.ch} x {tuple(m.ch_mult)}, "
        f"{m.num_res_blocks} res blocks, attention at levels {tuple(m.attn_levels)}, "
        f"{q.codebook_size} codes of dim {q.embed_dim}"
        f"{' (l2-normalised)' if q.vq.l2_normalize else ''}, {config.input.resolution}x"
        f"{config.input.resolution}x{config.input.channels} images, compute {m.dtype}"
    )
    if lpips_path:
        print(f"wrote {lpips_path}: the LPIPS weights of its loss (for config.loss.lpips_weights)")


if __name__ == "__main__":
    app.run(main)
