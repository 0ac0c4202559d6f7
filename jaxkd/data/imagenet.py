"""Variable-size JPEG datasets (ImageNet), cut to fixed-size views on the host.

ImageNet's images have every size, so they cannot be stacked into a batch before they are cut:
the cut happens on the host, per example, in the grain workers that read the records
(`jaxkd.data.pipeline`), as the torchvision recipe of every ImageNet KD reference does
(mdistiller, DIST, CRD; torchvision's `references/classification/presets.py`):

  training    RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)), bilinear, then
              RandomHorizontalFlip(0.5)  (`train_view`);
  evaluation  Resize(256) of the shorter side, bilinear, then CenterCrop(224)  (`eval_view`).

Pixels are decoded with Pillow (`Image.open(...).convert('RGB')`, torchvision's `pil_loader`;
TFDS keeps ImageNet's few grayscale JPEGs single-channel) and resized with Pillow's bilinear
filter, which is what torchvision's transforms do to a PIL image, antialiasing included.
TensorFlow is never needed. The randomness of a training view comes from a numpy Generator the
pipeline derives from (seed, stream position), so a resumed run cuts the same views.
"""

import io
import math

import numpy as np
from PIL import Image

# torchvision RandomResizedCrop defaults: the area fraction and the aspect-ratio (w / h) range.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# get_params tries this many random boxes before it falls back to a central crop.
CROP_ATTEMPTS = 10


def decode(encoded: bytes) -> Image.Image:
  """The RGB image of a JPEG (or any Pillow format), grayscale and CMYK converted."""
  image = Image.open(io.BytesIO(encoded))
  return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = CROP_SCALE,
  ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of a random crop: torchvision `RandomResizedCrop.get_params`.

  Up to 10 times: draw an area fraction s ~ U(scale) and a log aspect ratio
  log r ~ U(log ratio), take w = round(√(s·H·W·r)), h = round(√(s·H·W / r)); the first box that
  fits in the image is placed uniformly at random. Otherwise a central crop: the whole image
  when its ratio lies within `ratio`, else the largest box at the nearest bound of `ratio`.
  """
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  image_ratio = width / height
  if image_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif image_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_view(encoded: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: RandomResizedCrop(size) then RandomHorizontalFlip of the image."""
  image = decode(encoded)
  top, left, h, w = random_resized_crop_box(image.height, image.width, rng)
  view = np.asarray(
    image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
  )
  return view[:, ::-1] if rng.random() < 0.5 else view


def resized_shape(height: int, width: int, shorter_side: int) -> tuple[int, int]:
  """``(h, w)`` after torchvision `Resize(shorter_side)`: the shorter side becomes
  `shorter_side`, the longer one int(shorter_side · long / short) (truncated)."""
  if width <= height:
    return int(shorter_side * height / width), shorter_side
  return shorter_side, int(shorter_side * width / height)


def eval_view(encoded: bytes, size: int, resize_size: int) -> np.ndarray:
  """uint8 [size, size, 3]: Resize(resize_size) then CenterCrop(size) of the image.

  CenterCrop's offsets are round((H' − size) / 2) and round((W' − size) / 2), Python's round
  (half to even), as torchvision's `center_crop`.
  """
  image = decode(encoded)
  height, width = resized_shape(image.height, image.width, resize_size)
  image = image.resize((width, height), Image.Resampling.BILINEAR)
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


class JpegSource:
  """Records ``{'image': encoded JPEG bytes, 'label': int}`` (a TFDS `data_source` read with
  `tfds.decode.SkipDecoding()` on the image), read as fixed-size views.

  `read(indices)` gives the evaluation view of each example; `read_train(indices, rngs)` a
  random training view drawn from each example's Generator. Both return
  ``{'image': uint8 [B, size, size, 3], 'label': int32 [B]}``.
  """

  def __init__(self, data_source, *, size: int, resize_size: int):
    self.data_source = data_source
    self.size = size
    self.resize_size = resize_size

  def __len__(self) -> int:
    return len(self.data_source)

  def _records(self, indices: np.ndarray) -> list:
    return self.data_source.__getitems__([int(i) for i in indices])

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self._records(indices)
    return {
      "image": np.stack([eval_view(r["image"], self.size, self.resize_size) for r in records]),
      "label": np.asarray([r["label"] for r in records], np.int32),
    }

  def read_train(self, indices: np.ndarray, rngs) -> dict[str, np.ndarray]:
    records = self._records(indices)
    return {
      "image": np.stack([train_view(r["image"], rng, self.size) for r, rng in zip(records, rngs)]),
      "label": np.asarray([r["label"] for r in records], np.int32),
    }

  def labels(self, num_examples: int, chunk: int = 4096) -> np.ndarray:
    """The labels of examples 0 .. num_examples − 1, without decoding any image."""
    return np.concatenate(
      [
        np.asarray(
          [r["label"] for r in self._records(range(start, min(start + chunk, num_examples)))]
        )
        for start in range(0, num_examples, chunk)
      ]
    ).astype(np.int32)
