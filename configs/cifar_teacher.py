"""A CIFAR-100 teacher of the model zoo, trained with the benchmark's recipe.

    python -m jaxkd.main --config=configs/cifar_teacher.py:model=wrn_40_2 \
        --workdir=/teachers/wrn_40_2 --config.data.dir=DATA_DIR

`<workdir>/model` is then the `--config.teacher.checkpoint` of `configs/cifar_kd.py`. This is
`configs/cifar_kd.py:method=ce,student=<model>`: cross-entropy alone, no teacher, the shared
recipe (RepDistiller `train_teacher.py`, mdistiller `vanilla.yaml`): 240 epochs, batch 64, SGD
momentum 0.9, lr 0.05 (0.01 for MobileNetV2 / ShuffleNetV1 / ShuffleNetV2), ×0.1 at epochs
150, 180, 210, weight decay 5e-4, RandomCrop(32, padding 4) + horizontal flip.
"""

import importlib.util
import os

from jaxkd import configlib


def _cifar_kd():
  """configs/cifar_kd.py, found beside this file whatever the working directory."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar_kd.py")
  spec = importlib.util.spec_from_file_location("cifar_kd", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  arg = configlib.parse_arg(arg, model="resnet32x4")
  return _cifar_kd().get_config(f"method=ce,student={arg.model}")
