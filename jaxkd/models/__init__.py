"""Model zoo of the KD literature. Every model is an `nnx.Module` called as

    logits, features = model(images_nhwc, train=False, return_features=False)

`features` is `{}` unless `return_features=True`; then it maps the names that configs and
feature losses use (see docs/models.md) to arrays.
"""

from jaxkd.models.registry import create, names, register

# Importing a family module registers its models. One line per module.
from jaxkd.models import small_cnn  # noqa: F401  (quickstart CNNs)
from jaxkd.models import cifar_resnet  # noqa: F401
from jaxkd.models import cifar_wrn  # noqa: F401
from jaxkd.models import cifar_vgg  # noqa: F401
from jaxkd.models import cifar_mobilenetv2  # noqa: F401
from jaxkd.models import cifar_shufflenet  # noqa: F401
from jaxkd.models import imagenet_resnet  # noqa: F401
from jaxkd.models import imagenet_mobilenet  # noqa: F401
from jaxkd.models import vit  # noqa: F401
from jaxkd.models import transformer  # noqa: F401
from jaxkd.models import hf  # noqa: F401  (Hugging Face import / export)
from jaxkd.models.torch_import import load_torch_model, load_torch_state_dict

__all__ = ["create", "names", "register", "load_torch_model", "load_torch_state_dict"]
