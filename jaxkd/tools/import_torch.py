r"""Converts a PyTorch checkpoint of a zoo model into a jaxkd model checkpoint.

  python -m jaxkd.tools.import_torch --model resnet32x4 \
      --checkpoint resnet32x4_vanilla/ckpt_epoch_240.pth --out teachers/resnet32x4

The checkpoint is a state dict, or a training checkpoint holding one under 'model' (RepDistiller,
mdistiller) or 'state_dict'. It is read with `torch.load(..., weights_only=True)`, converted by
`jaxkd.models.load_torch_state_dict` (params and BatchNorm statistics; `--num_classes` defaults to
the classifier's size) and written with `jaxkd.models.io.save`, the format a config names as
`teacher.checkpoint`.
"""

import os

from absl import app
from absl import flags
from flax import nnx

from jaxkd.models import io
from jaxkd.models import registry
from jaxkd.models import torch_import

_MODEL = flags.DEFINE_string(
  "model", None, "Registered model name, e.g. resnet32x4.", required=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory of the jaxkd checkpoint.", required=True)
_NUM_CLASSES = flags.DEFINE_integer(
  "num_classes", None, "Classifier size; read off the checkpoint when unset."
)


def _read_torch_checkpoint(path: str):
  import torch  # pylint: disable=import-outside-toplevel  (only this tool needs torch)

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, …
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {reason}") from error


def import_checkpoint(
  name: str, checkpoint_path: str, out_dir: str, num_classes: int | None = None
) -> nnx.Module:
  """Reads, converts and saves; returns the converted model."""
  registry.check_name(name)
  if not os.path.isfile(checkpoint_path):
    raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
  state_dict = torch_import.unwrap_state_dict(_read_torch_checkpoint(checkpoint_path))
  if num_classes is None:
    num_classes = torch_import.infer_num_classes(name, state_dict)
  model = torch_import.load_torch_model(name, state_dict, num_classes=num_classes)
  io.save(out_dir, model, name, num_classes=num_classes)
  return model


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    import_checkpoint(_MODEL.value, _CHECKPOINT.value, _OUT.value, _NUM_CLASSES.value)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f"import_torch: error: {error}") from None
  print(f"wrote {_OUT.value} ({_MODEL.value} from {_CHECKPOINT.value})")


if __name__ == "__main__":
  app.run(main)
