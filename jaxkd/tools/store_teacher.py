r"""Stores a teacher's outputs over a config's training data, before any student trains.

    python -m jaxkd.tools.store_teacher --config=configs/lm_kd.py:method=pretrain \
        --config.teacher.checkpoint=/runs/lm_teacher/model --config.teacher.cache.dir=/caches/lm

Pre-training distillation's offline step (Peng et al. 2024): the teacher runs once over the
training windows the config's student will read, and its next-token distributions are stored
truncated as the config says (`teacher.cache`: `topk` k, `top_p` p, `temperature` τ, storage
`dtype`; 0 = dense logits), memory-mapped, one shard per process (`jaxkd.teachers.cache`). A
training run with the same config then reads them instead of running the teacher, and refuses
a cache of other data or another teacher naming what differs. Images work alike (dense or top-k
per example). Prints what was stored and its size next to dense float32 logits. An existing
cache is checked against the config and described, not rewritten.

A problem the user fixes (the config, the data, the teacher) is one `error:` line on stderr and
exit status 1.
"""

from absl import app, logging

from jaxkd import cli, errors, parallel, plan, train, xla_flags
from jaxkd.errors import ConfigError

_FLAGS, _CONFIG = cli.tool_flags()


def store(config) -> str:
  """Writes (or checks) the cache `config.teacher.cache` names; returns its description."""
  if not config.teacher.cache.dir:
    raise ConfigError("config.teacher.cache.dir is empty: name the directory to store into")
  if not config.teacher.checkpoint:
    raise ConfigError("config.teacher.checkpoint is empty: name the teacher to store")
  run = plan.resolve(config, workdir=None)
  teacher = train.load_teacher(run, parallel.make_mesh(run.mesh_shape))
  return f"{config.teacher.cache.dir}: {teacher.cache.describe()}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  xla_flags.configure_cpu()  # Before the first backend starts, as `jaxkd.main` does.
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they open at INFO
  try:
    print(store(_CONFIG.value))
  except errors.UserError as error:
    cli.exit_with_error(error)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.tool_flags_parser(_FLAGS, _CONFIG))
