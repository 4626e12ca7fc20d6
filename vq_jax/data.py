"""Input pipeline for image tokenizer training: data sources, preprocessing and grain iterators.

Sources are random-access sequences of ``{'image': uint8 [H, W, C], 'label': int32}`` chosen by a
dataset string (see :func:`make_source`); a new dataset is one source class plus one
:func:`register_source` call. :func:`make_train_iter` turns a source into an infinite,
deterministic, checkpointable iterator of one process's rows of layout-independent global batches;
:func:`make_eval_batches` covers a split exactly once across processes with padded, masked batches.

Only :func:`config_sources` and :func:`config_preprocess` read a config (``config.input``);
everything else takes plain values. No TensorFlow is needed anywhere, including for ``tfds:``
datasets (read via ArrayRecord)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import hashlib
import logging
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import grain
import numpy as np
from PIL import Image

from vq_jax.errors import MissingFileError, UserError

logger = logging.getLogger(__name__)

Example = dict[str, Any]
Batch = dict[str, np.ndarray]
ResizeMode = Literal["pad", "resize_crop", "none"]
CorruptMode = Literal["skip", "error"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_HOLDOUT_SPLITS = ("test", "val", "validation")
# Fraction of a flat folder (no train/test subfolders) held out as the 'test' split.
FOLDER_HOLDOUT_FRACTION = 0.05


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


class ArraySource:
    """In-memory source over a uint8 image array [N, H, W, C] and int labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int | None):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        self._images = images
        self._labels = labels.astype(np.int32)
        self.image_shape: tuple[int, int, int] | None = tuple(images.shape[1:])
        self.channels: int = images.shape[-1]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Example:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, image_shape={self.image_shape})"


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Parses a gzipped IDX file (big-endian header: magic 0x0000TTNN, NN int32 dims, data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"Cannot decompress IDX file {path} ({e}): the file is corrupt or truncated. "
            "Reinstall it with `apt-get install --reinstall -y dataset-fashion-mnist` or point "
            "config.input.data_dir at a good copy."
        ) from e
    fix = "Reinstall with `apt-get install --reinstall -y dataset-fashion-mnist`."
    if len(raw) < 4:
        raise UserError(f"IDX file {path} is truncated ({len(raw)} bytes). {fix}")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise UserError(
            f"IDX file {path} has bad magic number 0x{raw[:4].hex()} (expected 0x000008{ndim:02x}, "
            f"unsigned bytes). {fix}"
        )
    if ndim != expected_ndim:
        raise UserError(f"IDX file {path} has {ndim} dims, expected {expected_ndim}. {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"IDX file {path} is truncated inside its header. {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise UserError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header {dims} needs "
            f"{size}: the file is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# Decoded arrays keyed by ((path, mtime, size) of the image file, same of the label file).
_FASHION_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_FASHION_LOCK = threading.Lock()


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 28, 28, 1], labels uint8 [N]) for 'train' (60k) or 'test' (10k).

    Decoded arrays are cached in memory per file path (and modification time).
    """
    if split not in FASHION_MNIST_FILES:
        raise UserError(
            f"Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, got split={split!r}."
        )
    directory = data_dir or FASHION_MNIST_DIR
    image_path, label_path = (os.path.join(directory, n) for n in FASHION_MNIST_FILES[split])
    missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. Install the apt package "
            "`dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`, files go to "
            f"{FASHION_MNIST_DIR}) or set config.input.data_dir to a directory holding "
            f"{' and '.join(FASHION_MNIST_FILES[split])}."
        )
    key = tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in (image_path, label_path))
    with _FASHION_LOCK:
        if key not in _FASHION_CACHE:
            images = _read_idx(image_path, expected_ndim=3)
            labels = _read_idx(label_path, expected_ndim=1)
            if len(images) != len(labels):
                raise UserError(
                    f"{image_path} has {len(images)} images but {label_path} has {len(labels)} "
                    "labels. Reinstall with `apt-get install --reinstall -y dataset-fashion-mnist`."
                )
            _FASHION_CACHE[key] = (images[..., None], labels)
        return _FASHION_CACHE[key]


class TfdsSource:
    """Wraps a ``tfds.data_source`` (ArrayRecord, no TensorFlow) into {'image', 'label'} records.

    Datasets without a 'label' feature (e.g. celeb_a) give label -1 and ``num_classes=None``.
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # heavy import: only when needed

        self.name = name
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise _tfds_error(name, split, data_dir, e) from e
        features = self._ds.dataset_info.features
        if "image" not in features:
            raise UserError(
                f"TFDS dataset {name!r} has no 'image' feature (features: {list(features)}); "
                "only datasets with an 'image' feature can be used."
            )
        shape = tuple(features["image"].shape)
        self.channels: int | None = shape[-1] if len(shape) == 3 else None
        self.image_shape = shape if len(shape) == 3 and None not in shape else None
        label = features["label"] if "label" in features else None
        self._has_label = label is not None
        self.num_classes: int | None = getattr(label, "num_classes", None)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> Example:
        record = self._ds[index]
        image = np.asarray(record["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        label = np.int32(record["label"]) if self._has_label else np.int32(-1)
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, n={len(self)})"


def _tfds_error(name: str, split: str, data_dir: str | None, error: Exception) -> Exception:
    """Turns a tfds.data_source failure into an error that says how to prepare the data."""
    import tensorflow_datasets as tfds

    shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    prepare = (
        f"Prepare it in ArrayRecord format on a machine with TensorFlow: `tfds build {name} "
        f"--data_dir={shown_dir} --file_format=array_record`, copy the result here and set "
        "config.input.data_dir to that directory."
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # unknown dataset name, bad config, ...
        return UserError(f"Cannot open TFDS dataset {name!r}: {error}. {prepare}")
    if not builder.is_prepared():
        return MissingFileError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. {prepare}"
        )
    if "array_record" not in str(builder.info.file_format).lower():
        return UserError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format}, but random access needs ArrayRecord. {prepare}"
        )
    return UserError(f"Cannot read split {split!r} of TFDS dataset {name!r}: {error}")


def _image_channels(mode: str) -> int:
    """Channels a PIL image mode decodes to here: grayscale modes -> 1, everything else -> 3."""
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


def _check_image_file(path: str) -> tuple[str, str | None, tuple[int, int]]:
    """Cheap validity check (PIL verify: header + structure, PNG CRCs); returns (mode, error,
    (height, width))."""
    try:
        with Image.open(path) as img:
            mode, (w, h) = img.mode, img.size
            img.verify()
        return mode, None, (h, w)
    except Exception as e:
        return "", f"{type(e).__name__}: {e}", (0, 0)


class FolderSource:
    """PNG/JPEG files found recursively under a directory; labels from first-level subfolders.

    Split layout: if ``root/train`` and one of ``root/{test,val,validation}`` exist they are the
    splits; otherwise ``FOLDER_HOLDOUT_FRACTION`` of the files (by hash of their relative path)
    form the 'test' split and the rest 'train'. Files are validated once at construction.
    """

    def __init__(self, root: str, split: str, on_corrupt: CorruptMode = "skip"):
        if on_corrupt not in ("skip", "error"):
            raise UserError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}.")
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise MissingFileError(
                f"Image folder {root} does not exist. Set config.input.dataset to "
                "'folder:/path/to/images' pointing at a directory of PNG/JPEG files."
            )
        split_dirs = _folder_split_dirs(root)
        if split_dirs is not None:
            if split == "train":
                split_root = split_dirs["train"]
            elif split in FOLDER_HOLDOUT_SPLITS:
                split_root = split_dirs.get(split, split_dirs["holdout"])
            else:
                raise UserError(
                    f"Folder {root} has split folders; split must be 'train' or one of "
                    f"{FOLDER_HOLDOUT_SPLITS}, got {split!r}."
                )
            class_names = sorted(
                {d for r in (split_dirs["train"], split_dirs["holdout"]) for d in _subdirs(r)}
            )
            files = _list_images(split_root)
        else:
            if split != "train" and split not in FOLDER_HOLDOUT_SPLITS:
                raise UserError(
                    f"Folder splits are 'train' and 'test' (hash-based holdout), got {split!r}."
                )
            split_root = root
            class_names = sorted(_subdirs(root))
            want_holdout = split != "train"
            files = [f for f in _list_images(root) if _is_holdout(f) == want_holdout]
        if not files:
            raise UserError(
                f"No {'/'.join(FOLDER_EXTENSIONS)} images for split {split!r} under {split_root}. "
                "Add images (any subfolder depth), or for a small flat folder create "
                f"{root}/train and {root}/test subfolders."
            )
        class_index = {name: i for i, name in enumerate(class_names)}

        paths = [os.path.join(split_root, f) for f in files]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            checks = list(pool.map(_check_image_file, paths))
        bad = [(p, err) for p, (_, err, _) in zip(paths, checks, strict=True) if err is not None]
        if bad and on_corrupt == "error":
            raise UserError(
                f"Corrupt or unreadable image {bad[0][0]} ({bad[0][1]}); {len(bad)} bad file(s) "
                f"under {split_root}. Remove them or use on_corrupt='skip'."
            )
        if bad:
            logger.warning(
                "Skipping %d corrupt/unreadable image(s) under %s; first: %s (%s)",
                len(bad),
                split_root,
                bad[0][0],
                bad[0][1],
            )
        self.num_skipped = len(bad)
        keep = [i for i, (_, err, _) in enumerate(checks) if err is None]
        if not keep:
            raise UserError(f"All {len(paths)} images under {split_root} are unreadable.")
        self.root = split_root
        self.paths = [paths[i] for i in keep]
        self.sizes = [checks[i][2] for i in keep]  # (height, width) of each file, from its header
        rel_parts = [files[i].split("/") for i in keep]
        self._labels = np.array(
            [class_index[p[0]] if len(p) > 1 else -1 for p in rel_parts], dtype=np.int32
        )
        modes = {_image_channels(checks[i][0]) for i in keep}
        self.channels = 1 if modes == {1} else 3
        self.class_names = class_names
        self.num_classes = len(class_names) or None
        self.image_shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                image = np.asarray(img, dtype=np.uint8)
        except Exception as e:
            raise UserError(
                f"Failed to decode image {path} ({e}). Remove or replace the file."
            ) from e
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, n={len(self)}, classes={self.num_classes})"


def _subdirs(root: str) -> list[str]:
    return [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]


def _folder_split_dirs(root: str) -> dict[str, str] | None:
    """{'train': dir, 'holdout': dir, <name>: dir...} when root has train + test/val subfolders."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        return None
    found = {n: os.path.join(root, n) for n in FOLDER_HOLDOUT_SPLITS}
    found = {n: d for n, d in found.items() if os.path.isdir(d)}
    if not found:
        return None
    return {"train": train, "holdout": next(iter(found.values())), **found}


def _list_images(root: str) -> list[str]:
    """Sorted POSIX paths relative to root of all PNG/JPEG files (any case) below root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(FOLDER_EXTENSIONS) and not name.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _is_holdout(rel_path: str) -> bool:
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") < FOLDER_HOLDOUT_FRACTION * 2**32


class SyntheticSource:
    """Deterministic smooth images (gradient + Gaussian blobs seeded by index); label = index % 10.

    For tests and smoke runs only.
    """

    def __init__(self, size: int, shape: Sequence[int], split: str = "train"):
        if size <= 0 or len(shape) != 3:
            raise UserError(f"synthetic needs size > 0 and shape (H, W, C), got {size}, {shape}")
        self._size = int(size)
        self.image_shape = tuple(int(s) for s in shape)
        self.channels = self.image_shape[-1]
        self.num_classes = 10
        self._split_seed = int.from_bytes(hashlib.sha1(split.encode()).digest()[:4], "big")

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for synthetic source of {self._size}")
        h, w, c = self.image_shape
        rng = np.random.default_rng([self._split_seed, index])
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        angle = rng.uniform(0, 2 * np.pi)
        img = 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0, 1, c)
        for _ in range(3):
            cy, cx = rng.uniform(0, 1, 2)
            sigma = rng.uniform(0.1, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            img = img + blob[..., None] * rng.uniform(0, 0.7, c)
        image = np.clip(img * 255.0, 0, 255).astype(np.uint8)
        return {"image": image, "label": np.int32(index % 10)}

    def __repr__(self) -> str:
        return f"SyntheticSource(n={self._size}, image_shape={self.image_shape})"


class Source(Protocol):
    """What every source is: ``len``, ``[i] -> {'image': uint8 [H, W, C], 'label': int32}``
    (label -1: none), ``image_shape`` (None if sizes vary), ``channels`` and ``num_classes``
    (or None)."""

    image_shape: tuple[int, ...] | None
    channels: int | None
    num_classes: int | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class SourceRequest:
    """What a source factory gets: the dataset string's argument (``'tfds:cifar10'`` ->
    ``'cifar10'``; ``''`` for a dataset without one), the split, and the input options
    (``image_shape``: the [H, W, C] the config reads, for sources that make their images)."""

    arg: str
    split: str
    data_dir: str | None = None
    synthetic_size: int = 64
    image_shape: tuple[int, ...] = (32, 32, 3)
    on_corrupt: CorruptMode = "skip"


@dataclasses.dataclass(frozen=True)
class _Registration:
    factory: Callable[[SourceRequest], Source]
    form: str
    takes_arg: bool


_SOURCES: dict[str, _Registration] = {}


def register_source(
    name: str, factory: Callable[[SourceRequest], Source], *, form: str, takes_arg: bool = False
) -> None:
    """Makes ``config.input.dataset = name`` (``'name:ARG'`` when ``takes_arg``) read the source
    ``factory(request)`` builds. ``form``: how the dataset string is written, for error messages
    (e.g. ``"'tfds:NAME' (e.g. 'tfds:cifar10')"``)."""
    if name in _SOURCES or ":" in name:
        raise ValueError(f"dataset name {name!r} is taken or has a ':'")
    _SOURCES[name] = _Registration(factory, form, takes_arg)


def dataset_forms() -> str:
    """The accepted dataset strings, for error messages."""
    return ", ".join(r.form for r in _SOURCES.values())


def make_source(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    *,
    synthetic_size: int = 64,
    synthetic_shape: Sequence[int] = (32, 32, 3),
    on_corrupt: CorruptMode = "skip",
) -> Source:
    """Returns the random-access source a dataset string names (see `register_source`; the
    built-in forms are 'fashion_mnist', 'tfds:NAME', 'folder:PATH' and 'synthetic')."""
    name, sep, arg = dataset.partition(":")
    registration = _SOURCES.get(name)
    if registration is None or registration.takes_arg != bool(arg) or (sep and not arg):
        raise UserError(
            f"Unknown dataset {dataset!r}. Set config.input.dataset to one of: {dataset_forms()}."
        )
    request = SourceRequest(
        arg, split, data_dir, synthetic_size, tuple(synthetic_shape), on_corrupt=on_corrupt
    )
    return registration.factory(request)


register_source(
    "fashion_mnist",
    lambda r: ArraySource(*load_fashion_mnist(r.split, r.data_dir), num_classes=10),
    form="'fashion_mnist' (IDX .gz files in input.data_dir or " + FASHION_MNIST_DIR + ")",
)
register_source(
    "tfds",
    lambda r: TfdsSource(r.arg, r.split, r.data_dir),
    form="'tfds:NAME' (e.g. 'tfds:cifar10'; prepared ArrayRecord data in input.data_dir)",
    takes_arg=True,
)
register_source(
    "folder",
    lambda r: FolderSource(r.arg, r.split, on_corrupt=r.on_corrupt),
    form="'folder:PATH' (PNG/JPEG files)",
    takes_arg=True,
)
register_source(
    "synthetic",
    lambda r: SyntheticSource(r.synthetic_size, r.image_shape, r.split),
    form="'synthetic' (tests only: input.synthetic_size images of the input's shape)",
)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _convert_channels(image: np.ndarray, channels: int, convert: bool) -> np.ndarray:
    have = image.shape[-1]
    if have == channels:
        return image
    if not convert or (have, channels) not in ((1, 3), (3, 1)):
        hint = (
            " or set convert_channels=True (config.input.convert_channels) to convert"
            if (have, channels) in ((1, 3), (3, 1))
            else ""
        )
        raise UserError(
            f"Images have {have} channel(s) but the model expects channels={channels}. "
            f"Set config.input.channels to {have}{hint}."
        )
    if have == 1:
        return np.repeat(image, 3, axis=-1)
    # ITU-R 601-2 luma, as PIL's RGB -> L.
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def _resize_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    h, w, c = image.shape
    scale = resolution / min(h, w)
    new_h, new_w = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        pil = pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
        image = np.asarray(pil, dtype=np.uint8).reshape(new_h, new_w, c)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return image[top : top + resolution, left : left + resolution]


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) downsampling: the mean of each ``factor x factor`` block, [H, W, C] -> [H/f,
    W/f, C] (float32). It is the documented degradation of the super-resolution configs: the
    low-resolution image every method (bicubic included) starts from."""
    h, w, c = image.shape
    if factor < 1 or h % factor or w % factor:
        raise UserError(
            f"config.input.downsample={factor} must be >= 1 and divide the {h}x{w} image."
        )
    blocks = np.asarray(image, np.float32).reshape(h // factor, factor, w // factor, factor, c)
    return blocks.mean(axis=(1, 3))


def upsample_images(
    images: np.ndarray, size: tuple[int, int], method: str = "bicubic"
) -> np.ndarray:
    """uint8 [N, h, w, C] -> uint8 [N, H, W, C] by PIL's 'bicubic' filter (the baseline of
    super-resolution) or 'nearest' (to show low-resolution images at full size)."""
    resample = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[method]
    out = []
    for im in np.asarray(images, np.uint8):
        c = im.shape[-1]
        pil = Image.fromarray(im[..., 0] if c == 1 else im)
        up = pil.resize((size[1], size[0]), resample=resample)
        out.append(np.asarray(up, np.uint8).reshape(size[0], size[1], c))
    return np.stack(out)


def preprocess(
    image: np.ndarray,
    *,
    resolution: int,
    channels: int,
    resize: ResizeMode,
    convert_channels: bool = False,
    downsample: int = 1,
) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [resolution, resolution, channels] in [-1, 1].

    resize: 'pad' centre-pads with black (e.g. Fashion-MNIST 28 -> 32; error if larger),
    'resize_crop' resizes the shorter side (PIL bicubic, antialiased) then centre-crops,
    'none' requires the image to already be resolution x resolution.
    Channel mismatches raise unless ``convert_channels`` (only 1 -> 3 repeat, 3 -> 1 luma).
    ``downsample = f > 1`` (low-resolution condition images): the image is brought to
    ``f * resolution`` as above, then :func:`area_downsample`'d by ``f``.
    """
    if downsample > 1:
        full = preprocess(
            image,
            resolution=resolution * downsample,
            channels=channels,
            resize=resize,
            convert_channels=convert_channels,
        )
        return area_downsample(full, downsample)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"preprocess expects [H, W, C] images, got shape {image.shape}")
    image = _convert_channels(image, channels, convert_channels)
    h, w, _ = image.shape
    if resize == "pad":
        if h > resolution or w > resolution:
            raise UserError(
                f"Cannot pad a {h}x{w} image to resolution {resolution}: it is larger. Set "
                f"config.input.resolution >= {max(h, w)} or use resize='resize_crop'."
            )
        top, left = (resolution - h) // 2, (resolution - w) // 2
        pad = ((top, resolution - h - top), (left, resolution - w - left), (0, 0))
        image = np.pad(image, pad, constant_values=0)
    elif resize == "resize_crop":
        image = _resize_crop(image, resolution)
    elif resize == "none":
        if (h, w) != (resolution, resolution):
            raise UserError(
                f"Image is {h}x{w} but resize='none' needs {resolution}x{resolution}. Use "
                "resize='pad' or 'resize_crop', or set config.input.resolution to match."
            )
    else:
        raise UserError(f"resize must be 'pad', 'resize_crop' or 'none', got {resize!r}.")
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def check_sizes(source: Any, resolution: int, resize: str) -> None:
    """Under resize='none' every image must already be resolution x resolution: checks the
    sizes a source read from the file headers (FolderSource), naming the first misfit, so a
    mixed folder fails at start, not when a batch first reaches that file."""
    sizes = getattr(source, "sizes", None)
    if resize != "none" or not sizes:
        return
    bad = [i for i, hw in enumerate(sizes) if tuple(hw) != (resolution, resolution)]
    if bad:
        h, w = sizes[bad[0]]
        raise UserError(
            f"{len(bad)} of {len(sizes)} images are not {resolution}x{resolution}, which "
            f"resize='none' needs; the first is {source.paths[bad[0]]} ({h}x{w}). Use "
            "--config.input.resize=resize_crop (or pad), or resize those files."
        )


def make_preprocess_fn(
    *,
    resolution: int,
    channels: int,
    resize: ResizeMode,
    convert_channels: bool = False,
    downsample: int = 1,
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`preprocess` with fixed arguments (a picklable partial)."""
    if resize not in ("pad", "resize_crop", "none"):
        raise UserError(f"resize must be 'pad', 'resize_crop' or 'none', got {resize!r}.")
    return functools.partial(
        preprocess,
        resolution=resolution,
        channels=channels,
        resize=resize,
        convert_channels=convert_channels,
        downsample=downsample,
    )


# ----------------------------------------------------------------------------------------------
# Training iterator
# ----------------------------------------------------------------------------------------------


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Independent uint32 seeds (shuffle, augmentation) of the training stream."""
    # The trailing 0 keeps the seeds (and so the stream) of runs made before streams were global.
    shuffle_seed, aug_seed = np.random.SeedSequence([seed, 0]).generate_state(2)
    return int(shuffle_seed), int(aug_seed)


def _apply_preprocess(example: Example, preprocess_fn: Callable[[np.ndarray], np.ndarray]):
    return {"image": preprocess_fn(example["image"]), "label": np.int32(example["label"])}


def _random_flip(example: Example, rng: np.random.Generator) -> Example:
    if rng.random() < 0.5:
        return {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


def _check_sharding(
    num_examples: int, process_index: int, process_count: int, *, min_examples: int
) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got {process_index}, {process_count}."
        )
    if num_examples < min_examples:
        raise UserError(
            f"Split has {num_examples} examples, fewer than the {min_examples} needed for "
            f"process_count={process_count}; use a larger split."
        )


class TrainIterator(grain.DatasetIterator):
    """Infinite batch iterator with a small JSON-serialisable, exactly restorable state.

    State: {'batches': batches returned so far, 'epoch': epoch of the next example of the
    global stream, 'offset': its position within that epoch, 'grain': grain's own iterator
    state (a batch count), and the pipeline parameters (seed, global_batch_size,
    num_examples) that ``set_state`` checks so a state is never applied to a differently
    configured pipeline}. Every process of a run is at the same position of the same global
    stream, so one process's state (the one a checkpoint keeps) restores every process, under
    any process layout with the same global batch size.
    """

    def __init__(self, parent: grain.DatasetIterator, *, params: dict[str, int]):
        super().__init__(parent)
        self._params = dict(params)
        self._batches = 0

    def __next__(self) -> Batch:
        batch = next(self._parent)
        self._batches += 1
        return batch

    @property
    def num_examples(self) -> int:
        return self._params["num_examples"]

    def get_state(self) -> dict[str, Any]:
        examples = self._batches * self._params["global_batch_size"]
        epoch, offset = divmod(examples, self._params["num_examples"])
        return {
            "batches": self._batches,
            "epoch": epoch,
            "offset": offset,
            "grain": self._parent.get_state(),
            **self._params,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        state = _upgrade_state(state)
        changed = {k: (state.get(k), v) for k, v in self._params.items() if state.get(k) != v}
        if changed:
            desc = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in changed.items())
            raise UserError(
                f"Data iterator state does not match this pipeline ({desc}). Restore with the same "
                "dataset, global batch size and seed, or pass --config.train.reset_data_iterator="
                "True to start the data stream from its beginning (the model state is kept)."
            )
        self._parent.set_state(state["grain"])
        self._batches = int(state["batches"])

    def __str__(self) -> str:
        return f"TrainIterator({self._params})"


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state saved before the stream was global (single-process runs: the same stream)."""
    if "global_batch_size" in state or state.get("process_count", 1) != 1:
        return state
    return {**state, "global_batch_size": state["batch_size"], "num_examples": state["shard_size"]}


class _ProcessRows(grain.MapDataset):
    """One process's rows of every global batch of an (infinite) example stream.

    With b = batch_size rows per process and P processes, this process's element k is the
    stream's element (k // b) * b * P + process_index * b + k % b: global batch j is the
    concatenation, in process order, of every process's local batch j.
    """

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, index: int, count: int):
        super().__init__(parent)
        self._b, self._index, self._count = batch_size, index, count

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rows, row = divmod(index, self._b)
        return self._parent[(rows * self._count + self._index) * self._b + row]

    def __str__(self) -> str:
        return f"_ProcessRows(batch_size={self._b}, index={self._index}, count={self._count})"


def make_train_iter(
    source: Sequence[Example],
    *,
    batch_size: int,
    seed: int,
    preprocess_fn: Callable[[np.ndarray], np.ndarray],
    random_flip: bool,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 2,
) -> TrainIterator:
    """Infinite iterator of {'image': f32 [b, H, W, C], 'label': i32 [b]} for this process.

    One global stream, independent of the process layout: the whole source reshuffled each
    epoch (grain index shuffle seeded by ``seed`` and the epoch; flips seeded by ``seed`` and
    the stream position), cut into global batches of ``batch_size * process_count`` examples
    that run across epoch boundaries so every batch is full. Each process reads and
    preprocesses only its ``batch_size`` rows of each global batch (process p: rows
    ``p * batch_size`` to ``(p + 1) * batch_size``), so N processes see exactly the global
    batches one process would. ``prefetch`` batches are prepared ahead by ``num_threads``
    threads (prefetch=0: synchronous). Use get_state/set_state to checkpoint.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 0 or num_threads < 0:
        raise ValueError(f"prefetch and num_threads must be >= 0, got {prefetch}, {num_threads}")
    _check_sharding(len(source), process_index, process_count, min_examples=1)
    shuffle_seed, aug_seed = _derive_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    # Lazy: only the elements _ProcessRows asks for are read, preprocessed and flipped.
    ds = ds.map(functools.partial(_apply_preprocess, preprocess_fn=preprocess_fn))
    if random_flip:  # seeded by the global stream position: the same under any layout
        ds = ds.random_map(_random_flip, seed=aug_seed)
    if process_count > 1:
        ds = _ProcessRows(ds, batch_size=batch_size, index=process_index, count=process_count)
    ds = ds.batch(batch_size, drop_remainder=True)
    threads = min(num_threads, prefetch) if prefetch > 0 else 0
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    params = {
        "seed": int(seed),
        "global_batch_size": int(batch_size * process_count),
        "num_examples": len(source),
    }
    return TrainIterator(iter(ds.to_iter_dataset(read_options)), params=params)


# ----------------------------------------------------------------------------------------------
# Evaluation batches
# ----------------------------------------------------------------------------------------------


def num_eval_batches(
    num_examples: int,
    *,
    batch_size: int,
    process_count: int = 1,
    max_batches: int | None = None,
) -> int:
    """Batches every process yields so that all ``num_examples`` are covered exactly once.

    With ``max_batches`` the pass is cut to at most that many batches per process (a prefix of
    each process's examples; then the split is no longer covered completely).
    """
    if num_examples < 1 or batch_size < 1 or process_count < 1:
        raise ValueError(
            f"Need num_examples, batch_size, process_count >= 1, got {num_examples}, "
            f"{batch_size}, {process_count}"
        )
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    full = math.ceil(math.ceil(num_examples / process_count) / batch_size)
    return full if max_batches is None else min(full, max_batches)


class EvalBatches:
    """Re-iterable, sized collection of one process's padded eval batches."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int):
        self._dataset = dataset
        self._num_batches = num_batches

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._dataset)


class _EvalElement:
    """Maps a padded position of this process to an example (real or zero padding + mask)."""

    def __init__(self, source, preprocess_fn, process_index: int, process_count: int):
        self._source = source
        self._preprocess_fn = preprocess_fn
        self._process_index = process_index
        self._process_count = process_count
        self._pad: Example | None = None

    def __call__(self, position: int) -> Example:
        index = self._process_index + position * self._process_count
        if index < len(self._source):
            example = _apply_preprocess(self._source[index], self._preprocess_fn)
            return {**example, "mask": np.float32(1.0)}
        if self._pad is None:
            real = _apply_preprocess(self._source[0], self._preprocess_fn)
            self._pad = {
                "image": np.zeros_like(real["image"]),
                "label": np.int32(-1),
                "mask": np.float32(0.0),
            }
        return self._pad


def make_eval_batches(
    source: Sequence[Example],
    *,
    batch_size: int,
    preprocess_fn: Callable[[np.ndarray], np.ndarray],
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
    prefetch: int = 2,
    num_threads: int = 2,
) -> EvalBatches:
    """One pass over the split: {'image', 'label', 'mask': f32 [b]} batches of fixed shape.

    Process p reads examples p, p + process_count, ...; the tail is padded with zero images,
    label -1 and mask 0. Every process yields ``num_eval_batches(...)`` batches, the same number
    (at most ``max_batches``, for a quicker partial evaluation).
    """
    _check_sharding(len(source), process_index, process_count, min_examples=1)
    n_batches = num_eval_batches(
        len(source), batch_size=batch_size, process_count=process_count, max_batches=max_batches
    )
    element = _EvalElement(source, preprocess_fn, process_index, process_count)
    ds = grain.MapDataset.range(n_batches * batch_size).map(element).batch(batch_size)
    threads = min(num_threads, prefetch) if prefetch > 0 else 0
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return EvalBatches(ds.to_iter_dataset(read_options), n_batches)


def config_sources(config: Any) -> tuple[Any, Any]:
    """The (train, eval) sources that `config.input` names."""
    ic = config.input
    ds = ic.get("downsample", 1)  # absent in older workdirs' configs
    kw = dict(
        data_dir=ic.data_dir,
        synthetic_size=ic.synthetic_size,
        synthetic_shape=(ic.resolution * ds, ic.resolution * ds, ic.channels),
        on_corrupt=ic.on_corrupt,
    )
    return make_source(ic.dataset, ic.train_split, **kw), make_source(
        ic.dataset, ic.eval_split, **kw
    )


def config_preprocess(config: Any) -> Callable:
    """The preprocessing (resize, channels, uint8 -> [-1, 1]) that `config.input` asks for."""
    ic = config.input
    return make_preprocess_fn(
        resolution=ic.resolution,
        channels=ic.channels,
        resize=ic.resize,
        convert_channels=ic.convert_channels,
        downsample=ic.get("downsample", 1),  # absent in older workdirs' configs
    )
