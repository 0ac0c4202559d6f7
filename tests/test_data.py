"""Data: the IDX reader, the sources' error messages, the deterministic pipeline, crop+flip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import data
from jaxkd.data import idx

import testing_utils

_SPEC = data.DATASETS["fashion_mnist"]


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
  array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  path = str(tmp_path / ("a.idx" + (".gz" if compress else "")))
  testing_utils.write_idx(path, array, compress=compress)
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_read_idx_big_endian_int32(tmp_path):
  array = np.array([1, -2, 70000], np.int32)
  path = str(tmp_path / "int.idx")
  with open(path, "wb") as f:
    f.write(
      bytes([0, 0, 0x0C, 1]) + np.asarray([3], ">u4").tobytes() + array.astype(">i4").tobytes()
    )
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_read_idx_rejects_bad_files(tmp_path):
  bad_magic = str(tmp_path / "bad")
  with open(bad_magic, "wb") as f:
    f.write(b"\x1f\x8b\x08\x00garbage")
  with pytest.raises(ValueError, match="not an IDX file"):
    idx.read_idx(bad_magic)
  truncated = str(tmp_path / "short")
  with open(truncated, "wb") as f:
    f.write(bytes([0, 0, 0x08, 1]) + np.asarray([10], ">u4").tobytes() + b"\x00" * 4)
  with pytest.raises(ValueError, match="header says shape"):
    idx.read_idx(truncated)


def test_load_split_mixes_raw_and_gzip(tmp_path):
  train_images, train_labels = testing_utils.write_split(tmp_path, "train", 7, compress=False)
  test_images, test_labels = testing_utils.write_split(tmp_path, "t10k", 5, compress=True, seed=1)
  train = idx.load_split(str(tmp_path), "train")
  test = idx.load_split(str(tmp_path), "test")
  np.testing.assert_array_equal(train["image"][..., 0], train_images)
  np.testing.assert_array_equal(test["label"], test_labels)
  assert train["image"].shape == (7, 28, 28, 1) and train["label"].dtype == np.int32
  assert test["image"].shape == (5, 28, 28, 1)


def test_idx_source_missing_files_says_how_to_get_them(tmp_path):
  with pytest.raises(data.DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
    data.open_split("fashion_mnist", "idx", "train", str(tmp_path))


def test_tfds_source_missing_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DataUnavailableError) as error:
    data.open_split("cifar100", "tfds", "train", str(tmp_path))
  message = str(error.value)
  assert "tfds build cifar100 --file_format=array_record" in message
  assert "--config.data.dir" in message and "configs/quickstart.py" in message


def test_tfds_source_in_tfrecord_format_is_refused(tmp_path):
  version_dir = tmp_path / "cifar100" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps({"name": "cifar100"}))
  with pytest.raises(data.DataUnavailableError, match="prepared as tfrecord"):
    data.open_split("cifar100", "tfds", "train", str(tmp_path))


def test_batch_indices_are_a_pure_function_of_seed_and_step():
  first = data.global_batch_indices(3, 5, 100, 16)
  np.testing.assert_array_equal(first, data.global_batch_indices(3, 5, 100, 16))
  assert not np.array_equal(first, data.global_batch_indices(4, 5, 100, 16))


def test_each_epoch_visits_every_example_once():
  # 40 examples, batch 8: epoch e is steps 5e .. 5e + 4, each a fresh permutation.
  epochs = [
    np.concatenate(
      [data.global_batch_indices(0, step, 40, 8) for step in range(5 * epoch, 5 * epoch + 5)]
    )
    for epoch in range(2)
  ]
  for visited in epochs:
    np.testing.assert_array_equal(np.sort(visited), np.arange(40))
  assert not np.array_equal(epochs[0], epochs[1])


def test_batches_cross_epoch_boundaries():
  # 10 examples, batch 4: step 2 holds the last 2 of epoch 0 and the first 2 of epoch 1.
  stream = np.concatenate([np.random.default_rng([0, epoch]).permutation(10) for epoch in range(2)])
  np.testing.assert_array_equal(data.global_batch_indices(0, 2, 10, 4), stream[8:12])


def _tiny_source(num_examples=24):
  rng = np.random.default_rng(0)
  return data.ArraySource(
    {
      "image": rng.integers(0, 256, (num_examples, 28, 28, 1), dtype=np.uint8),
      "label": rng.integers(0, 10, num_examples).astype(np.int32),
    }
  )


def test_train_batches_resume_reproduces_the_stream():
  source = _tiny_source()
  kwargs = dict(seed=1, num_steps=7, global_batch_size=8, num_examples=20)
  full = list(data.train_batches(source, _SPEC, start_step=0, **kwargs))
  resumed = list(data.train_batches(source, _SPEC, start_step=4, **kwargs))
  assert len(full) == 7 and len(resumed) == 3
  for expected, actual in zip(full[4:], resumed):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(expected[key], actual[key])
  assert max(batch["index"].max() for batch in full) < 20  # only the first num_examples
  batch = full[0]
  np.testing.assert_allclose(
    batch["image"], data.normalize(source.arrays["image"][batch["index"]], _SPEC)
  )
  np.testing.assert_array_equal(batch["label"], source.arrays["label"][batch["index"]])


def test_eval_batches_pad_and_mask():
  source = _tiny_source(num_examples=19)
  batches = list(data.eval_batches(source, _SPEC, global_batch_size=8))
  assert [batch["image"].shape[0] for batch in batches] == [8, 8, 8]
  mask = np.concatenate([batch["mask"] for batch in batches])
  assert mask.sum() == 19 and not mask[19:].any()
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches])[mask], np.arange(19))


def test_normalize_constants():
  pixels = np.array([[0, 255]], np.uint8)
  np.testing.assert_allclose(
    data.normalize(pixels[..., None], _SPEC)[..., 0],
    [[-0.2860 / 0.3530, (1 - 0.2860) / 0.3530]],
    rtol=1e-6,
  )


def test_crop_flip_takes_a_window_of_the_padded_image():
  spec = data.DATASETS["cifar100"]
  augment = data.build_augment("crop_flip", spec)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
  rng = jax.random.key(0)
  augmented = np.asarray(augment(rng, images))
  np.testing.assert_allclose(np.asarray(jax.jit(augment)(rng, images)), augmented, rtol=1e-6)
  black = -np.asarray(spec.mean) / np.asarray(spec.std)
  padded = np.pad(np.asarray(images) - black, ((0, 0), (4, 4), (4, 4), (0, 0))) + black
  for image, out in zip(padded, augmented):
    windows = [image[y : y + 8, x : x + 8] for y in range(9) for x in range(9)]
    assert any(
      np.allclose(out, w, atol=1e-6) or np.allclose(out, w[:, ::-1], atol=1e-6) for w in windows
    )
  assert data.build_augment("none", spec) is None


class _FakeTfdsSource:
  """What `tfds.data_source` returns: `len` and batched `__getitems__` of record dicts."""

  def __init__(self, num_records):
    rng = np.random.default_rng(0)
    self.records = [
      {
        "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "label": np.int64(i % 100),
        "id": f"train_{i}",
      }
      for i in range(num_records)
    ]

  def __len__(self):
    return len(self.records)

  def __getitems__(self, keys):
    return [self.records[key] for key in keys]


def test_record_source_stacks_records():
  fake = _FakeTfdsSource(10)
  batch = data.RecordSource(fake).read(np.array([7, 2]))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"][0], fake.records[7]["image"])
  assert batch["label"].tolist() == [7, 2] and batch["label"].dtype == np.int32


def test_sources_read_the_labels_of_the_first_examples():
  record_labels = data.RecordSource(_FakeTfdsSource(10)).labels(7, chunk=3)
  assert record_labels.tolist() == list(range(7)) and record_labels.dtype == np.int32
  arrays = data.ArraySource(
    {"image": np.zeros((5, 2, 2, 1), np.uint8), "label": np.array([4, 3, 2, 1, 0])}
  )
  assert arrays.labels(3).tolist() == [4, 3, 2]


def test_num_worker_processes():
  assert data.num_worker_processes(0) == 0 and data.num_worker_processes(3) == 3
  assert data.num_worker_processes(-1) == len(os.sched_getaffinity(0))


def _ks_statistic(a, b):
  """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b|."""
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return np.max(np.abs(cdf(a) - cdf(b)))


def test_mixup_blends_each_image_with_its_neighbour_by_one_weight():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 3, 2)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2000)
  mixed = np.asarray(jax.jit(jax.vmap(data.augment.mixup, in_axes=(0, None)))(keys, images))
  x, neighbour = np.asarray(images), np.roll(np.asarray(images), 1, axis=0)
  # mixed = λ·x + (1 − λ)·x_{b−1}: λ by least squares, then the residual must vanish.
  lam = np.einsum("kbhwc,bhwc->k", mixed - neighbour, x - neighbour) / np.sum((x - neighbour) ** 2)
  np.testing.assert_allclose(
    mixed,
    lam[:, None, None, None, None] * x + (1 - lam[:, None, None, None, None]) * neighbour,
    atol=1e-5,
  )
  # big_vision p = 1, n = 2: λ = max(u, 1 − u) with u ~ U(0, 1), i.e. λ ~ U(1/2, 1).
  reference = np.random.default_rng(1).uniform(0.5, 1.0, len(lam))
  assert lam.min() >= 0.5 - 1e-6 and lam.max() <= 1 + 1e-6
  assert _ks_statistic(lam, reference) < 1.95 * np.sqrt(2 / len(lam))


def _reference_rand_bbox(height, width, lam, center_y, center_x):
  """clovaai/CutMix-PyTorch train.py `rand_bbox` (rows, columns), transcribed."""
  cut_rat = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut_rat), int(width * cut_rat)
  y1 = np.clip(center_y - cut_h // 2, 0, height)
  y2 = np.clip(center_y + cut_h // 2, 0, height)
  x1 = np.clip(center_x - cut_w // 2, 0, width)
  x2 = np.clip(center_x + cut_w // 2, 0, width)
  mask = np.zeros((height, width), bool)
  mask[y1:y2, x1:x2] = True
  return mask


def test_cutmix_box_matches_the_reference():
  rng = np.random.default_rng(0)
  lam = rng.uniform(size=300).astype(np.float32)
  center_y, center_x = rng.integers(0, 12, 300), rng.integers(0, 9, 300)
  boxes = jax.jit(jax.vmap(lambda *args: data.augment.cutmix_box(12, 9, *args)))(
    lam, center_y, center_x
  )
  for box, args in zip(np.asarray(boxes), zip(lam, center_y, center_x)):
    np.testing.assert_array_equal(box, _reference_rand_bbox(12, 9, *args))


def test_cutmix_pastes_one_box_from_the_neighbour():
  height, width = 16, 12
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, height, width, 3)), jnp.float32)
  keys = jax.random.split(jax.random.key(1), 1000)
  mixed = np.asarray(jax.jit(jax.vmap(data.augment.cutmix, in_axes=(0, None)))(keys, images))
  x, neighbour = np.asarray(images), np.roll(np.asarray(images), 1, axis=0)
  from_neighbour = np.all(mixed == neighbour, axis=-1)
  assert np.all(from_neighbour | np.all(mixed == x, axis=-1))
  # One box for the whole batch, a rectangle.
  box = from_neighbour[:, 0]
  assert np.all(from_neighbour == box[:, None])
  rows, cols = box.any(axis=2), box.any(axis=1)
  np.testing.assert_array_equal(box, rows[:, :, None] & cols[:, None, :])
  # Its area: λ ~ Beta(1, 1), a uniform centre, the reference's box.
  rng = np.random.default_rng(2)
  reference = [
    _reference_rand_bbox(
      height, width, rng.uniform(), rng.integers(0, height), rng.integers(0, width)
    ).mean()
    for _ in range(len(keys))
  ]
  assert _ks_statistic(box.mean(axis=(1, 2)), np.array(reference)) < 1.95 * np.sqrt(2 / len(keys))


def test_mixing_augmentations_are_built_by_name():
  spec = data.DATASETS["imagenet2012"]
  assert data.build_augment("mixup", spec) is data.augment.mixup
  assert data.build_augment("cutmix", spec) is data.augment.cutmix
  assert set(data.AUGMENTATIONS) == {"none", "crop_flip", "mixup", "cutmix"}
  with pytest.raises(ValueError, match="unknown augmentation"):
    data.build_augment("randaugment", spec)
