"""Tests for vq_jax.data: sources, preprocessing, grain train/eval iterators."""

import gzip
import json
import logging
import os
import sys

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vq_jax import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


class IndexSource:
    """Source whose example i has label i and an asymmetric 4x4x1 image encoding i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = np.zeros((4, 4, 1), np.uint8)
        image[0, 0, 0] = i // 256
        image[0, 1, 0] = i % 256
        image[3, 3, 0] = 255  # makes the image left/right asymmetric
        return {"image": image, "label": np.int32(i)}


def expected_image(i: int) -> np.ndarray:
    """Independent preprocessing of IndexSource[i] for resize='none': x / 127.5 - 1."""
    img = np.zeros((4, 4, 1), np.float64)
    img[0, 0, 0], img[0, 1, 0], img[3, 3, 0] = i // 256, i % 256, 255
    return (img / 127.5 - 1.0).astype(np.float32)


IDENTITY_PP = data.make_preprocess_fn(resolution=4, channels=1, resize="none")


def train_iter(source, **kwargs):
    defaults = dict(
        batch_size=4,
        seed=0,
        preprocess_fn=IDENTITY_PP,
        random_flip=False,
        process_index=0,
        process_count=1,
    )
    return data.make_train_iter(source, **{**defaults, **kwargs})


def take(it, n):
    return [next(it) for _ in range(n)]


def labels_of(batches):
    return np.concatenate([b["label"] for b in batches])


# ------------------------------------------------------------------ training iterator


def test_train_batch_shapes_dtypes_and_values():
    src = data.make_source("synthetic", "train", synthetic_size=40, synthetic_shape=(16, 16, 3))
    pp = data.make_preprocess_fn(resolution=16, channels=3, resize="none")
    it = train_iter(src, batch_size=5, preprocess_fn=pp, random_flip=True)
    for batch in take(it, 3):
        assert set(batch) == {"image", "label"}
        chex.assert_shape(batch["image"], (5, 16, 16, 3))
        chex.assert_shape(batch["label"], (5,))
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))

    # Without flips, every image is exactly the independently normalised source image.
    it = train_iter(IndexSource(10), batch_size=3)
    for batch in take(it, 4):
        for img, lab in zip(batch["image"], batch["label"], strict=True):
            np.testing.assert_array_equal(img, expected_image(int(lab)))


def test_train_determinism_and_seed_dependence():
    src = IndexSource(50)
    a = take(train_iter(src, seed=3, random_flip=True), 4)
    b = take(train_iter(src, seed=3, random_flip=True), 4)
    c = take(train_iter(src, seed=4, random_flip=True), 4)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(labels_of(a), labels_of(c))


def test_each_epoch_is_a_new_permutation():
    n = 12
    labels = labels_of(take(train_iter(IndexSource(n), batch_size=4), 9))  # 3 epochs
    epochs = labels.reshape(3, n)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(n))  # actually shuffled


def test_processes_read_their_rows_of_the_single_process_batches():
    n, count, bs = 20, 3, 2  # global batch 6: epochs end mid-batch
    kwargs = dict(seed=5, random_flip=True)
    single = take(train_iter(IndexSource(n), batch_size=bs * count, **kwargs), 7)
    per_process = [
        take(
            train_iter(
                IndexSource(n), batch_size=bs, process_index=p, process_count=count, **kwargs
            ),
            7,
        )
        for p in range(count)
    ]
    for j, batch in enumerate(single):  # global batch j = the processes' batches j, in order
        for key in batch:
            joined = np.concatenate([batches[j][key] for batches in per_process])
            np.testing.assert_array_equal(joined, batch[key])
    first_epoch = labels_of(single)[:n]  # covered exactly once across the processes
    assert sorted(first_epoch.tolist()) == list(range(n))


def test_random_flip_mirrors_some_images():
    it = train_iter(IndexSource(16), batch_size=8, random_flip=True, seed=1)
    flipped = 0
    for batch in take(it, 4):
        for img, lab in zip(batch["image"], batch["label"], strict=True):
            plain = expected_image(int(lab))
            if np.array_equal(img, plain[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(img, plain)
    assert 0 < flipped < 32


@pytest.mark.parametrize("prefetch", [0, 3])
def test_state_round_trip_restores_exact_stream(prefetch):
    n, bs, k, m = 10, 4, 3, 5  # continues across epoch boundaries
    kwargs = dict(batch_size=bs, seed=7, random_flip=True, prefetch=prefetch)
    it = train_iter(IndexSource(n), process_index=1, process_count=2, **kwargs)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    assert state["batches"] == k
    assert (state["epoch"], state["offset"]) == divmod(k * bs * 2, n)  # of the global stream
    expected = take(it, m)

    fresh = train_iter(IndexSource(n), process_index=1, process_count=2, **kwargs)
    take(fresh, 1)  # a different position, to show set_state really moves it
    fresh.set_state(state)
    chex.assert_trees_all_equal(take(fresh, m), expected)
    assert fresh.get_state()["batches"] == k + m

    # A checkpoint keeps process 0's state; it positions every process.
    zero = train_iter(IndexSource(n), process_index=0, process_count=2, **kwargs)
    take(zero, k)
    fresh = train_iter(IndexSource(n), process_index=1, process_count=2, **kwargs)
    fresh.set_state(json.loads(json.dumps(zero.get_state())))
    chex.assert_trees_all_equal(take(fresh, m), expected)

    other = train_iter(IndexSource(n), process_index=1, process_count=2, batch_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)


def test_state_saved_before_global_streams_still_restores():
    it = train_iter(IndexSource(10), batch_size=4, seed=2)
    take(it, 3)
    expected = take(it, 2)
    legacy = {  # the format of single-process checkpoints written before streams were global
        "batches": 3,
        "epoch": 1,
        "offset": 2,
        "grain": {"next_index": 3},
        "seed": 2,
        "batch_size": 4,
        "process_index": 0,
        "process_count": 1,
        "shard_size": 10,
    }
    fresh = train_iter(IndexSource(10), batch_size=4, seed=2)
    fresh.set_state(legacy)
    chex.assert_trees_all_equal(take(fresh, 2), expected)


# ------------------------------------------------------------------ eval batches


@pytest.mark.parametrize(("n", "bs", "count"), [(23, 4, 3), (8, 4, 1), (2, 3, 4)])
def test_eval_batches_cover_split_once(n, bs, count):
    per_process = [
        list(
            data.make_eval_batches(
                IndexSource(n),
                batch_size=bs,
                preprocess_fn=IDENTITY_PP,
                process_index=p,
                process_count=count,
            )
        )
        for p in range(count)
    ]
    per_process_examples = (n + count - 1) // count
    expected_batches = (per_process_examples + bs - 1) // bs
    assert data.num_eval_batches(n, batch_size=bs, process_count=count) == expected_batches
    assert [len(b) for b in per_process] == [expected_batches] * count
    real = []
    for batches in per_process:
        for batch in batches:
            chex.assert_shape(batch["image"], (bs, 4, 4, 1))
            chex.assert_shape([batch["label"], batch["mask"]], (bs,))
            assert batch["mask"].dtype == np.float32
            assert set(np.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
            for img, lab, mask in zip(batch["image"], batch["label"], batch["mask"], strict=True):
                if mask:
                    real.append(int(lab))
                    np.testing.assert_array_equal(img, expected_image(int(lab)))
                else:
                    assert lab == -1 and not img.any()
    assert sorted(real) == list(range(n))
    ev = data.make_eval_batches(IndexSource(n), batch_size=bs, preprocess_fn=IDENTITY_PP)
    assert len(ev) == len(list(ev)) == len(list(ev))  # sized and re-iterable


def test_eval_max_batches_limits_every_process():
    n, bs, count = 30, 2, 2  # 8 full batches per process, cut to 3
    for p in range(count):
        ev = data.make_eval_batches(
            IndexSource(n),
            batch_size=bs,
            preprocess_fn=IDENTITY_PP,
            process_index=p,
            process_count=count,
            max_batches=3,
        )
        batches = list(ev)
        assert len(ev) == len(batches) == 3
        assert labels_of(batches).tolist() == list(range(p, n, count))[: 3 * bs]
        assert all(b["mask"].all() for b in batches)
    assert data.num_eval_batches(n, batch_size=bs, process_count=count, max_batches=99) == 8


# ------------------------------------------------------------------ preprocessing


def test_pad_centres_image_with_black():
    img = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    out = data.preprocess(img, resolution=32, channels=1, resize="pad")
    chex.assert_shape(out, (32, 32, 1))
    assert out.dtype == np.float32
    expected = np.full((32, 32, 1), -1.0)
    expected[2:30, 2:30] = img / 127.5 - 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="resolution >= 28"):
        data.preprocess(img, resolution=16, channels=1, resize="pad")


def test_resize_crop_and_none():
    img = np.full((20, 30, 3), 200, np.uint8)
    out = data.preprocess(img, resolution=16, channels=3, resize="resize_crop")
    chex.assert_shape(out, (16, 16, 3))
    np.testing.assert_allclose(out, 200 / 127.5 - 1, atol=1e-5)  # constant stays constant
    # Left third black, rest white: after the centre crop of a 16x24 resize, column 0 comes
    # from x=4 of the 24-wide image = x=5 of the original (black), the last column is white.
    img = np.full((20, 30, 1), 255, np.uint8)
    img[:, :10] = 0
    out = data.preprocess(img, resolution=16, channels=1, resize="resize_crop")
    chex.assert_shape(out, (16, 16, 1))
    assert out[:, 0].max() < -0.9 and out[:, -1].min() > 0.9
    with pytest.raises(ValueError, match="resize='none'"):
        data.preprocess(img, resolution=16, channels=1, resize="none")


def test_channel_mismatch_and_conversion():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    with pytest.raises(ValueError, match=r"config\.input\.channels to 1.*convert_channels"):
        data.preprocess(gray, resolution=4, channels=3, resize="none")
    rgb_out = data.preprocess(gray, resolution=4, channels=3, resize="none", convert_channels=True)
    np.testing.assert_allclose(rgb_out, np.repeat(gray / 127.5 - 1, 3, axis=-1), atol=1e-6)

    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="3 channel"):
        data.preprocess(rgb, resolution=4, channels=1, resize="none")
    luma = np.round(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    out = data.preprocess(rgb, resolution=4, channels=1, resize="none", convert_channels=True)
    np.testing.assert_allclose(out[..., 0], luma / 127.5 - 1, atol=1e-6)
    rgba = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="4 channel"):
        data.preprocess(rgba, resolution=4, channels=3, resize="none", convert_channels=True)


# ------------------------------------------------------------------ sources


def test_unknown_dataset_lists_forms():
    with pytest.raises(ValueError, match=r"tfds:NAME.*folder:PATH"):
        data.make_source("imagenet", "train")


class StripesSource:
    """A test-only dataset: the whole of what a new dataset needs is this class and the
    `register_source` call below. Example i: vertical stripes of period 2 + i % 3, label i % 3."""

    num_classes = 3

    def __init__(self, request: data.SourceRequest):
        self.image_shape = request.image_shape
        self.channels = request.image_shape[-1]
        self._n = 24 if request.split == "train" else 8

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        h, w, c = self.image_shape
        stripes = (np.arange(w) // (2 + i % 3)) % 2 * 255
        image = np.broadcast_to(stripes[None, :, None], (h, w, c)).astype(np.uint8)
        return {"image": image, "label": np.int32(i % 3)}


data.register_source("test_stripes", StripesSource, form="'test_stripes' (tests only)")


def test_registered_source_trains_through_the_config(tmp_path):
    from configs import vqvae
    from vq_jax import trainer

    config = vqvae.get_config("tiny")
    config.input.dataset = "test_stripes"
    config.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    train, test = data.config_sources(config)
    assert isinstance(train, StripesSource) and (len(train), len(test)) == (24, 8)
    assert train[4]["image"].shape == (16, 16, 1) and train[4]["label"] == 1
    result = trainer.train(config, str(tmp_path / "w"))
    assert result["num_examples"] == 8 and np.isfinite(result["psnr"])
    with pytest.raises(ValueError, match=r"'test_stripes' \(tests only\)"):
        data.make_source("test_stripes:x", "train")
    with pytest.raises(ValueError, match="taken"):
        data.register_source("test_stripes", StripesSource, form="again")


def test_synthetic_source_is_deterministic():
    a = data.make_source("synthetic", "train", synthetic_size=12, synthetic_shape=(8, 6, 3))
    b = data.make_source("synthetic", "train", synthetic_size=12, synthetic_shape=(8, 6, 3))
    assert len(a) == 12 and a.image_shape == (8, 6, 3) and a.num_classes == 10
    for i in (0, 5, 11):
        assert a[i]["image"].dtype == np.uint8 and a[i]["image"].shape == (8, 6, 3)
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert int(a[i]["label"]) == i % 10
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def _independent_idx(path, header):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    train = data.make_source("fashion_mnist", "train")
    test = data.make_source("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == (28, 28, 1) and train.num_classes == 10
    labels = _independent_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"), 8)
    pixels = _independent_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"), 16)
    ex = train[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)
    assert int(ex["label"]) == int(labels[0])
    np.testing.assert_array_equal(ex["image"][..., 0], pixels[:784].reshape(28, 28))
    np.testing.assert_array_equal(train[59999]["image"].ravel(), pixels[-784:])
    all_labels = np.array([int(test[i]["label"]) for i in range(0, 10000, 97)])
    assert all_labels.min() >= 0 and all_labels.max() <= 9


def test_fashion_mnist_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*config\.input\.data_dir"):
        data.make_source("fashion_mnist", "train", data_dir=str(tmp_path / "nope"))
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 2, 2))
    labels = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(range(11)))  # one byte short
    with pytest.raises(ValueError, match="truncated"):
        data.make_source("fashion_mnist", "test", data_dir=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + header[4:] + bytes(12))  # float32 type code
    with pytest.raises(ValueError, match="magic"):
        data.make_source("fashion_mnist", "test", data_dir=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(range(12)))
    src = data.make_source("fashion_mnist", "test", data_dir=str(tmp_path))
    assert len(src) == 3 and int(src[2]["label"]) == 3
    np.testing.assert_array_equal(src[1]["image"][..., 0], [[4, 5], [6, 7]])


# -- tfds: tiny datasets written in ArrayRecord format (PIL-encoded images: no TensorFlow).


def _tiny_image(i: int) -> np.ndarray:
    return np.full((6, 5, 3), 10 * i, np.uint8)


class VqTinyLabeled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(6, 5, 3)),
            "label": tfds.features.ClassLabel(num_classes=5),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": Image.fromarray(_tiny_image(i)), "label": i % 5}


class VqTinyUnlabeled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(6, 5, 3))})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": Image.fromarray(_tiny_image(i))}


def test_tfds_source_reads_array_record(tmp_path):
    for cls in (VqTinyLabeled, VqTinyUnlabeled):
        cls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = data.make_source("tfds:vq_tiny_labeled", "train", data_dir=str(tmp_path))
    assert len(src) == 12 and src.image_shape == (6, 5, 3) and src.num_classes == 5
    seen = set()
    for i in range(len(src)):
        ex = src[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (6, 5, 3)
        k = int(ex["image"][0, 0, 0]) // 10  # which generated example this record is
        np.testing.assert_array_equal(ex["image"], _tiny_image(k))
        assert int(ex["label"]) == k % 5 and ex["label"].dtype == np.int32
        seen.add(k)
    assert seen == set(range(12))
    assert len(data.make_source("tfds:vq_tiny_labeled", "test", data_dir=str(tmp_path))) == 4

    unlabeled = data.make_source("tfds:vq_tiny_unlabeled", "train", data_dir=str(tmp_path))
    assert unlabeled.num_classes is None and len(unlabeled) == 3
    assert int(unlabeled[0]["label"]) == -1

    pp = data.make_preprocess_fn(resolution=8, channels=3, resize="pad")
    batch = next(train_iter(src, preprocess_fn=pp, batch_size=6))
    chex.assert_shape(batch["image"], (6, 8, 8, 3))
    assert "tensorflow" not in sys.modules


def test_tfds_mock_data_and_unprepared(tmp_path):
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        src = data.make_source("tfds:mnist", "train")
        assert len(src) == 5 and src.image_shape == (28, 28, 1) and src.num_classes == 10
        ex = src[2]
        assert ex["image"].shape == (28, 28, 1) and 0 <= int(ex["label"]) < 10
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build mnist"):
        data.make_source("tfds:mnist", "train", data_dir=str(tmp_path))
    assert "tensorflow" not in sys.modules


# -- folder


def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_folder_source_with_split_dirs_and_corrupt_file(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    sizes = [(12, 20), (30, 18), (16, 16)]
    for cls_name in ("dog", "cat"):  # labels sorted: cat=0, dog=1
        for j, (h, w) in enumerate(sizes):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            _write(root / "train" / cls_name / f"{j}.png", img)
        _write(root / "test" / cls_name / "x.JPG", np.zeros((10, 10, 3), np.uint8), "JPEG")
    _write(root / "train" / "cat" / "deep" / "nested.jpeg", np.zeros((9, 9, 3), np.uint8))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    bad = root / "train" / "dog" / "broken.PNG"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)

    with caplog.at_level(logging.WARNING):
        train = data.make_source(f"folder:{root}", "train")
    assert len(train) == 7 and train.num_skipped == 1
    assert train.num_classes == 2 and train.image_shape is None and train.channels == 3
    assert any(
        "1 corrupt" in r.getMessage() and "broken.PNG" in r.getMessage() for r in caplog.records
    )
    by_path = {
        os.path.relpath(p, root / "train"): int(train[i]["label"])
        for i, p in enumerate(train.paths)
    }
    assert by_path["cat/0.png"] == 0 and by_path["dog/2.png"] == 1
    assert by_path[os.path.join("cat", "deep", "nested.jpeg")] == 0
    k = train.paths.index(str(root / "train" / "dog" / "1.png"))
    assert train[k]["image"].shape == (30, 18, 3)

    test = data.make_source(f"folder:{root}", "test")
    assert len(test) == 2 and sorted(int(test[i]["label"]) for i in range(2)) == [0, 1]

    with pytest.raises(ValueError, match=r"broken\.PNG"):
        data.make_source(f"folder:{root}", "train", on_corrupt="error")

    pp = data.make_preprocess_fn(resolution=8, channels=3, resize="resize_crop")
    batch = next(train_iter(train, preprocess_fn=pp, batch_size=3, random_flip=True))
    chex.assert_shape(batch["image"], (3, 8, 8, 3))
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_folder_flat_holdout_and_errors(tmp_path):
    root = tmp_path / "flat"
    for i in range(200):
        _write(root / f"{i:03d}.png", np.full((2, 2), i, np.uint8))
    train = data.make_source(f"folder:{root}", "train")
    test = data.make_source(f"folder:{root}", "test")
    assert len(train) + len(test) == 200 and 0 < len(test) < 30
    assert not set(train.paths) & set(test.paths)
    assert train.num_classes is None and train.channels == 1
    assert int(train[0]["label"]) == -1 and train[0]["image"].shape == (2, 2, 1)
    assert data.make_source(f"folder:{root}", "test").paths == test.paths  # deterministic

    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_source(f"folder:{tmp_path / 'missing'}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"No .* images"):
        data.make_source(f"folder:{tmp_path / 'empty'}", "train")
