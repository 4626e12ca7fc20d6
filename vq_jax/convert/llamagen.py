"""LlamaGen's VQ tokenizers (tokenizer/tokenizer_image/vq_model.py): `{"model": state_dict}`.

The architecture is named (`VQ-16`, `VQ-8`): ch 128, 2 res blocks, z 256, GroupNorm(32), and
attention after every res block of the lowest-resolution level only. Codebook size and
dimension come from `quantize.embedding.weight`. Codes and encoder outputs are l2-normalised
before the lookup and the decoder gets the normalised codes: vq-jax's `VectorQuantizer` with
`l2_normalize=True` and no low-dimensional projection (`quant_conv` already maps to the code
dimension).

Key names (read from that file): `encoder.conv_blocks.{i}.res.{j}` / `.attn.{j}` /
`.downsample.conv` by level; `decoder.conv_blocks.{k}` in execution order, so k = 0 is the
lowest resolution (vq-jax level n-1-k); `{en,de}coder.mid.{0,1,2}` (res, attn, res);
`quantize.embedding.weight`; the `quantize.codebook_used` buffer is usage bookkeeping, skipped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from vq_jax.convert.arch import Architecture, ConversionError
from vq_jax.convert.mapping import leaf_name
from vq_jax.convert.torch_file import load_torch_file, to_numpy

SOURCE = "llamagen"
CODEBOOK_KEY = "quantize.embedding.weight"
HINT = (
    "check --model (VQ-16 or VQ-8) matches the checkpoint, and that it is a LlamaGen VQ "
    "checkpoint (taming's last.ckpt: --source=taming)."
)


@dataclasses.dataclass(frozen=True)
class LlamaGenModel:
    """The named part of a LlamaGen VQ architecture (the codebook comes from the weights)."""

    ch_mult: tuple[int, ...]
    ch: int = 128
    num_res_blocks: int = 2
    z_channels: int = 256
    in_channels: int = 3
    resolution: int = 256


MODELS = {
    "VQ-16": LlamaGenModel(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": LlamaGenModel(ch_mult=(1, 2, 2, 4)),
}


def model_by_name(name: str | None) -> LlamaGenModel:
    if name not in MODELS:
        raise ConversionError(
            f"--model={name!r} is not a LlamaGen VQ model; use one of {', '.join(MODELS)} "
            "(VQ-16 for vq_ds16_*.pt, VQ-8 for vq_ds8_*.pt)."
        )
    return MODELS[name]


def state_dict(checkpoint: str) -> Mapping[str, Any]:
    """The state dict under `model` in a LlamaGen `.pt` file."""
    obj = load_torch_file(checkpoint, "--checkpoint")
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]
    if isinstance(obj, Mapping) and "state_dict" in obj:
        raise ConversionError(
            f"{checkpoint!r} holds a Lightning 'state_dict' (taming's layout), not LlamaGen's "
            "{'model': state_dict}; use --source=taming with its --config=model.yaml."
        )
    keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(
        f"{checkpoint!r} has no 'model' state dict (found {keys}); pass LlamaGen's vq_ds*.pt."
    )


def architecture(sd: Mapping[str, Any], model: LlamaGenModel) -> Architecture:
    """The vq-jax architecture: `model`'s shape and the codebook's size and dimension."""
    if CODEBOOK_KEY not in sd:
        raise ConversionError(
            f"the {SOURCE} checkpoint lacks key {CODEBOOK_KEY!r} (expected shape (codebook_size, "
            f"code_dim), e.g. (16384, 8)); {HINT}"
        )
    shape = to_numpy(sd[CODEBOOK_KEY]).shape
    if len(shape) != 2:
        raise ConversionError(
            f"key {CODEBOOK_KEY!r} of the {SOURCE} checkpoint has shape {tuple(shape)}, expected "
            f"(codebook_size, code_dim); {HINT}"
        )
    return Architecture(
        ch=model.ch,
        ch_mult=model.ch_mult,
        num_res_blocks=model.num_res_blocks,
        attn_levels=(len(model.ch_mult) - 1,),
        z_channels=model.z_channels,
        in_channels=model.in_channels,
        codebook_size=int(shape[0]),
        embed_dim=int(shape[1]),
        l2_normalize=True,
        resolution=model.resolution,
    )


_LEVEL = re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)")
_RESAMPLE = re.compile(r"(down|up)_(\d+)_(downsample|upsample)")
_MID = {"mid_block_1": "mid.0", "mid_attn_1": "mid.1", "mid_block_2": "mid.2"}


def key_fn(num_levels: int):
    """LlamaGen's state-dict key of a vq-jax parameter path, for `num_levels` levels."""

    def block_index(kind: str, level: str) -> str:
        return level if kind == "down" else str(num_levels - 1 - int(level))

    def torch_key(path: tuple[str, ...]) -> str:
        top, *mid, leaf = path
        if top == "quantizer":
            return CODEBOOK_KEY
        parts = [top]
        if mid:
            name, *rest = mid
            if m := _LEVEL.fullmatch(name):
                kind = "res" if m[3] == "block" else "attn"
                parts += ["conv_blocks", block_index(m[1], m[2]), kind, m[4]]
            elif m := _RESAMPLE.fullmatch(name):
                parts += ["conv_blocks", block_index(m[1], m[2]), m[3]]
            else:
                parts.append(_MID.get(name, name))
            parts += rest
        return ".".join([*parts, leaf_name(leaf)])

    return torch_key


def ignored(key: str) -> bool:
    """Keys that are not weights: the codebook usage ring buffer."""
    return key == "quantize.codebook_used"
