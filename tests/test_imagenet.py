"""ImageNet: the TFDS JPEG source, torchvision's crops on the host, the deterministic pipeline.

The data is a tiny TFDS 'imagenet2012' written here as array_record (`sources.write_tfds`):
synthetic JPEGs, one grayscale, plus lossless PNGs where a test compares pixels exactly.
"""

import io
import math

import numpy as np
import pytest
from PIL import Image

from jaxkd import data, distill, errors, plan
from jaxkd.data import imagenet

import testing_utils

tfds = pytest.importorskip("tensorflow_datasets")

_SPEC = data.DATASETS["imagenet2012"]
# (height, width) of the training images: landscape, portrait, square, smaller than the crop.
_TRAIN_SHAPES = [(60, 80), (90, 50), (64, 64), (120, 100), (40, 56), (75, 75), (50, 90), (100, 70)]


def _encode(pixels: np.ndarray, image_format: str = "JPEG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format)
  return buffer.getvalue()


def _smooth_image(height, width, seed, channels=3):
  """Low-frequency content (as photographs have), so that JPEG keeps it recognisable."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (4, 4, channels)).astype(np.float32)
  rows = np.linspace(0, 3, height)[:, None]
  cols = np.linspace(0, 3, width)[None, :]
  y0, x0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
  y1, x1 = np.minimum(y0 + 1, 3), np.minimum(x0 + 1, 3)
  wy, wx = (rows - y0)[..., None], (cols - x0)[..., None]
  image = (
    coarse[y0, x0] * (1 - wy) * (1 - wx)
    + coarse[y1, x0] * wy * (1 - wx)
    + coarse[y0, x1] * (1 - wy) * wx
    + coarse[y1, x1] * wy * wx
  )
  return np.squeeze(image.round().astype(np.uint8))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  directory = str(tmp_path_factory.mktemp("tfds"))
  train = [(_encode(_smooth_image(h, w, i)), 10 * i) for i, (h, w) in enumerate(_TRAIN_SHAPES)]
  validation = [
    (_encode(_smooth_image(300, 256, 100)), 7),
    (_encode(_smooth_image(70, 90, 101, channels=1)), 8),  # grayscale JPEG
    (_encode(_smooth_image(256, 300, 102), "PNG"), 9),  # lossless: exact pixels
  ]
  data.sources.write_tfds(
    directory,
    "imagenet2012",
    "5.1.0",
    # ImageNet's TFDS features (tensorflow_datasets/datasets/imagenet2012).
    {
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000),
      "file_name": tfds.features.Text(),
    },
    {
      split: [
        {"image": io.BytesIO(encoded), "label": label, "file_name": f"{split}_{i}.JPEG"}
        for i, (encoded, label) in enumerate(examples)
      ]
      for split, examples in (("train", train), ("validation", validation))
    },
  )
  return directory


def test_source_reads_views_and_test_is_the_validation_split(imagenet_dir):
  train = data.open_split("imagenet2012", "tfds", "train", imagenet_dir)
  test = data.open_split("imagenet2012", "tfds", "test", imagenet_dir)
  assert isinstance(train, data.JpegSource) and isinstance(train, data.RandomViewSource)
  assert len(train) == len(_TRAIN_SHAPES) and len(test) == 3
  assert sorted(train.labels(len(train)).tolist()) == [10 * i for i in range(len(_TRAIN_SHAPES))]
  batch = test.read(np.arange(3))
  assert batch["image"].shape == (3, 224, 224, 3) and batch["image"].dtype == np.uint8
  assert sorted(batch["label"].tolist()) == [7, 8, 9] and batch["label"].dtype == np.int32
  # The grayscale JPEG becomes three equal channels (torchvision's convert('RGB')).
  gray = batch["image"][batch["label"] == 8][0]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  assert _SPEC.num_classes == 1000 and _SPEC.image_shape == (224, 224, 3)
  assert _SPEC.mean == (0.485, 0.456, 0.406) and _SPEC.std == (0.229, 0.224, 0.225)


def test_missing_imagenet_says_how_to_download_and_prepare(tmp_path):
  with pytest.raises(data.DataUnavailableError) as error:
    data.open_split("imagenet2012", "tfds", "train", str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  for needed in (
    "https://image-net.org",
    "ILSVRC2012_img_train.tar",
    "ILSVRC2012_img_val.tar",
    "downloads/manual",
    "tfds build imagenet2012 --file_format=array_record",
    "--config.data.dir",
  ):
    assert needed in message


def test_resize_and_center_crop_golden_values():
  # torchvision Resize(256): the shorter side 256, the longer int(256 · long / short).
  assert imagenet.resized_shape(300, 400, 256) == (256, 341)
  assert imagenet.resized_shape(500, 375, 256) == (341, 256)
  assert imagenet.resized_shape(256, 300, 256) == (256, 300)
  # A 256 × 300 image is not resized; CenterCrop(224) starts at round(16.0), round(38.0).
  pixels = np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)
  view = imagenet.eval_view(_encode(pixels, "PNG"), 224, 256)
  np.testing.assert_array_equal(view, pixels[16:240, 38:262])
  # Odd margins: 256 × 301 → left = round(38.5) = 38 (half to even, as Python's round).
  pixels = np.random.default_rng(1).integers(0, 256, (256, 301, 3), dtype=np.uint8)
  view = imagenet.eval_view(_encode(pixels, "PNG"), 224, 256)
  np.testing.assert_array_equal(view, pixels[16:240, 38:262])


def test_train_view_cuts_the_box_then_flips(monkeypatch):
  pixels = np.random.default_rng(0).integers(0, 256, (250, 260, 3), dtype=np.uint8)
  encoded = _encode(pixels, "PNG")
  # A 224 × 224 box is cut without resampling: the view is the window itself, maybe mirrored.
  monkeypatch.setattr(imagenet, "random_resized_crop_box", lambda h, w, rng: (13, 29, 224, 224))
  window = pixels[13:237, 29:253]
  flips = []
  for seed in range(16):
    view = imagenet.train_view(encoded, np.random.default_rng(seed), 224)
    flipped = not np.array_equal(view, window)
    np.testing.assert_array_equal(view, window[:, ::-1] if flipped else window)
    flips.append(flipped)
  assert 0 < sum(flips) < 16
  # Other boxes are resized to the output size with Pillow's bilinear filter.
  monkeypatch.setattr(imagenet, "random_resized_crop_box", lambda h, w, rng: (5, 7, 100, 150))
  view = imagenet.train_view(encoded, np.random.default_rng(0), 64)
  expected = np.asarray(
    Image.fromarray(pixels[5:105, 7:157]).resize((64, 64), Image.Resampling.BILINEAR)
  )
  assert np.array_equal(view, expected) or np.array_equal(view, expected[:, ::-1])


def _torchvision_get_params(torch, height, width, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params (v0.20), transcribed."""
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = torch.randint(0, height - h + 1, size=(1,)).item()
      j = torch.randint(0, width - w + 1, size=(1,)).item()
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  i = (height - h) // 2
  j = (width - w) // 2
  return i, j, h, w


def _ks_statistic(a, b):
  """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b|."""
  grid = np.sort(np.concatenate([a, b]))
  return np.max(
    np.abs(
      np.searchsorted(np.sort(a), grid, side="right") / len(a)
      - np.searchsorted(np.sort(b), grid, side="right") / len(b)
    )
  )


@pytest.mark.parametrize("height, width", [(375, 500), (120, 420)])
def test_random_resized_crop_matches_torchvision_statistics(height, width):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  num = 3000
  ours = np.array(
    [
      imagenet.random_resized_crop_box(height, width, rng, (0.08, 1.0), (3 / 4, 4 / 3))
      for _ in range(num)
    ]
  )
  theirs = np.array(
    [_torchvision_get_params(torch, height, width, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(num)]
  )
  for boxes in (ours, theirs):
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  # Area fraction, aspect ratio and where the box sits: same distributions (KS, α = 0.001).
  critical = 1.95 * math.sqrt(2 / num)

  def statistics(boxes):
    top, left, h, w = boxes.T.astype(float)
    return {
      "area": h * w / (height * width),
      "log_ratio": np.log(w / h),
      "center_y": (top + h / 2) / height,
      "center_x": (left + w / 2) / width,
    }

  ours_stats, theirs_stats = statistics(ours), statistics(theirs)
  for name in ours_stats:
    assert _ks_statistic(ours_stats[name], theirs_stats[name]) < critical, name
  # The wide image often needs the fallback: a 4/3 central crop of full height.
  fallback = (120, round(120 * 4 / 3))
  fallback_rate = [
    np.mean((b[:, 2] == fallback[0]) & (b[:, 3] == fallback[1])) for b in (ours, theirs)
  ]
  assert abs(fallback_rate[0] - fallback_rate[1]) < 0.05


class _CountingRng:
  """A Generator stand-in that counts the draws."""

  def __init__(self):
    self.rng, self.uniform_calls = np.random.default_rng(0), 0

  def uniform(self, low, high):
    self.uniform_calls += 1
    return self.rng.uniform(low, high)

  def integers(self, low, high):
    return self.rng.integers(low, high)


@pytest.mark.parametrize(
  "height, width, expected",
  [
    # No box of ≥ 8% of a 10 × 1000 image fits in 10 rows: a 10 × round(10 · 4/3) central crop.
    (10, 1000, ((10 - 10) // 2, (1000 - 13) // 2, 10, 13)),
    # The transposed image: a round(10 · 4/3) × 10 crop.
    (1000, 10, ((1000 - 13) // 2, 0, 13, 10)),
  ],
)
def test_random_resized_crop_falls_back_after_ten_tries(height, width, expected):
  rng = _CountingRng()
  assert imagenet.random_resized_crop_box(height, width, rng) == expected
  assert rng.uniform_calls == 2 * 10  # an area and a ratio per try


def _views(source, seed, positions, indices):
  return data.normalize(
    np.stack(
      [
        imagenet.train_view(source._records([i])[0]["image"], rng, 224)
        for i, rng in zip(indices, data.pipeline.view_rngs(seed, positions))
      ]
    ),
    _SPEC,
  )


def test_train_batches_are_a_pure_function_of_seed_and_step(imagenet_dir):
  source = data.open_split("imagenet2012", "tfds", "train", imagenet_dir)
  kwargs = dict(seed=3, num_steps=5, global_batch_size=4, num_examples=len(source))
  full = list(data.train_batches(source, _SPEC, start_step=0, **kwargs))
  resumed = list(data.train_batches(source, _SPEC, start_step=3, **kwargs))
  assert len(full) == 5 and len(resumed) == 2
  for expected, actual in zip(full[3:], resumed):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(expected[key], actual[key])
  # Batch k's row i is example global_batch_indices[i] seen through the Generator of stream
  # position 4k + i.
  for step, batch in enumerate(full):
    indices = data.global_batch_indices(3, step, len(source), 4)
    np.testing.assert_array_equal(batch["index"], indices)
    expected = _views(source, 3, np.arange(4 * step, 4 * step + 4), indices)
    np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-6)
    assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
  # Epoch 1 revisits the examples through other random views.
  first_epoch = {int(i): image for i, image in zip(full[0]["index"], full[0]["image"])}
  later = {int(i): image for b in full[2:4] for i, image in zip(b["index"], b["image"])}
  shared = set(first_epoch) & set(later)
  assert shared and all(not np.allclose(first_epoch[i], later[i]) for i in shared)


def test_worker_processes_give_the_same_stream(imagenet_dir):
  # Two spawned workers compute batches 1, 3, 5 and 2, 4; grain interleaves them back in order.
  source = data.open_split("imagenet2012", "tfds", "train", imagenet_dir)
  kwargs = dict(seed=1, start_step=1, num_steps=6, global_batch_size=4, num_examples=len(source))
  threads = list(data.train_batches(source, _SPEC, num_threads=2, **kwargs))
  workers = list(data.train_batches(source, _SPEC, num_threads=1, num_workers=2, **kwargs))
  assert len(workers) == len(threads) == 5
  for expected, actual in zip(threads, workers):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(expected[key], actual[key])


def test_eval_batches_are_the_center_crops(imagenet_dir):
  test = data.open_split("imagenet2012", "tfds", "test", imagenet_dir)
  batches = list(data.eval_batches(test, _SPEC, global_batch_size=2))
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True, True, True, False]
  images = np.concatenate([b["image"] for b in batches])[mask]
  records = test._records(range(3))
  expected = np.stack([imagenet.eval_view(r["image"], 224, 256) for r in records])
  np.testing.assert_allclose(images, data.normalize(expected, _SPEC), rtol=0, atol=1e-6)
  # The PNG record is exact: 256 × 300, not resized, crop at (16, 38).
  labels = np.concatenate([b["label"] for b in batches])[mask]
  png = next(r for r in records if r["label"] == 9)
  pixels = np.asarray(Image.open(io.BytesIO(png["image"])))
  np.testing.assert_allclose(
    images[labels == 9][0], data.normalize(pixels[16:240, 38:262], _SPEC), rtol=0, atol=1e-6
  )


# Configs: configs/imagenet_kd.py and configs/cifar_teacher.py against the references' recipes,
# written out here (mdistiller configs/imagenet/<pair>/*.yaml; DIST_KD README; big_vision
# configs/proj/distill/bit_i1k.py; RepDistiller train_teacher.py).
_PAIRS = {"r34_r18": ("resnet34", "resnet18"), "r50_mv1": ("resnet50", "mobilenet_v1")}
_EXPECTED_DISTILL = {
  "ce": {"losses": {"ce": 1.0}},
  "kd": {"losses": {"ce": 0.5, "kd": 0.5}, "kd": {"temperature": 1.0}},
  "dkd": {
    "losses": {"ce": 1.0, "dkd": 1.0},
    "dkd": {"alpha": 1.0, "beta": None, "temperature": 1.0, "warmup_epochs": 1},
  },
  "dist": {
    "losses": {"ce": 1.0, "dist": 2.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0},
  },
  "fm": {"losses": {"kd": 1.0}, "kd": {"temperature": 1.0}},
}
_DKD_BETA = {"r34_r18": 0.5, "r50_mv1": 2.0}


@pytest.mark.parametrize("pair", sorted(_PAIRS))
@pytest.mark.parametrize("method", sorted(_EXPECTED_DISTILL))
def test_imagenet_config_is_the_reference_recipe(pair, method):
  config = testing_utils.load_config("imagenet_kd", f"pair={pair},method={method}")
  plan.check(config)
  expected = {**_EXPECTED_DISTILL[method]}
  if method == "dkd":
    expected["dkd"] = {**expected["dkd"], "beta": _DKD_BETA[pair]}
  assert config.distill.to_dict() == expected
  teacher, student = _PAIRS[pair]
  assert config.student.model == student
  assert config.teacher.model == ("" if method == "ce" else teacher)
  assert (config.data.name, config.data.source) == ("imagenet2012", "tfds")
  optimizer = config.optimizer
  if method == "fm":
    assert config.data.augment == "mixup" and config.data.batch_size == 4096
    assert config.num_epochs == 1200
    assert (optimizer.name, optimizer.lr, optimizer.schedule) == ("adamw", 0.03, "cosine")
    assert optimizer.weight_decay * optimizer.lr == pytest.approx(3e-4)  # big_vision's wd
    steps_per_epoch = 1_281_167 // 4096
    assert optimizer.warmup_epochs * steps_per_epoch == pytest.approx(5000)
  else:
    assert config.data.augment == "none" and config.data.batch_size == 512
    assert config.num_epochs == 100
    assert (optimizer.name, optimizer.lr, optimizer.momentum) == ("sgd", 0.2, 0.9)
    assert (optimizer.schedule, tuple(optimizer.decay_epochs)) == ("step", (30, 60, 90))
    assert (optimizer.decay_factor, optimizer.weight_decay) == (0.1, 1e-4)
  method_plan = distill.plan(
    config.distill,
    info=distill.FeatureInfo(student={}, teacher={}, num_classes=1000),
    has_teacher=method != "ce",
    steps_per_epoch=1_281_167 // config.data.batch_size,
  )
  losses = {name: float(weight) for name, weight in method_plan.hparams["losses"].items()}
  assert losses == expected["losses"] and method_plan.needs_teacher == (method != "ce")


def test_imagenet_config_refuses_unknown_arguments():
  with pytest.raises(errors.ConfigError, match="pair='r18_r18'"):
    testing_utils.load_config("imagenet_kd", "pair=r18_r18")
  with pytest.raises(errors.ConfigError, match="method='crd'"):
    testing_utils.load_config("imagenet_kd", "method=crd")


@pytest.mark.parametrize("model, lr", [("wrn_40_2", 0.05), ("ShuffleV2", 0.01)])
def test_cifar_teacher_config_is_the_teacher_recipe(model, lr):
  config = testing_utils.load_config("cifar_teacher", f"model={model}")
  plan.check(config)
  assert config.student.model == model and config.teacher.checkpoint == ""
  assert config.distill.to_dict() == {"losses": {"ce": 1.0}}
  assert (config.data.name, config.data.batch_size, config.data.augment) == (
    "cifar100",
    64,
    "crop_flip",
  )
  assert config.num_epochs == 240
  optimizer = config.optimizer
  assert (optimizer.name, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (
    "sgd",
    lr,
    0.9,
    5e-4,
  )
  assert (optimizer.schedule, tuple(optimizer.decay_epochs)) == ("step", (150, 180, 210))
