"""What a converter reads from a source checkpoint: the vq-jax architecture it describes."""

from __future__ import annotations

import dataclasses

from vq_jax.errors import UserError


class ConversionError(UserError):
    """A checkpoint, config or flag that cannot be converted; the message is one line naming
    the key or field, the value and the fix."""

    plain = True  # printed by the script without the class name


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A VQModel's shape in vq-jax terms (num_groups is 32 in both sources)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # ch_mult levels with attention after each res block
    z_channels: int
    in_channels: int
    codebook_size: int
    embed_dim: int
    l2_normalize: bool  # codes and encoder outputs unit-normalised before the lookup
    resolution: int  # the image size the source was trained at
    num_groups: int = 32
