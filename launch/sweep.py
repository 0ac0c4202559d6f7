"""A benchmark sweep as jaxkd commands: methods × teacher/student pairs × seeds.

    python launch/sweep.py --methods=kd,dkd,ce --pairs=resnet32x4:resnet8x4,resnet56:resnet20 \\
        --seeds=0,1,2 --root=/runs/cifar100 \\
        -- --config.teacher.checkpoint=/teachers/{teacher} --config.data.dir=/data/tfds

prints one command per run, for configs/cifar_kd.py (`--config`):

    python -m jaxkd.main --config=configs/cifar_kd.py:method=kd,teacher=resnet32x4,student=resnet8x4
        --config.seed=0 --workdir=/runs/cifar100/resnet32x4-resnet8x4/kd/seed_0 ...

Overrides after `--` go to every command; `{teacher}`, `{student}`, `{method}`, `{seed}` in them
are filled in per run. `method=ce` trains the student alone, whatever the teacher: one run per
student and seed (under the first pair naming it) serves every pair as the scratch baseline.

Outputs: the commands (default), `--script=FILE` (a bash script running them one after another),
`--launcher=slurm` (each command as `launch/slurm.sh [LAUNCHER_ARGS] CONFIG WORKDIR ...`, one job
each) or `--launcher=tpu_vm` (`launch/tpu_vm.sh run --wait [LAUNCHER_ARGS] ...`, one after the
other on one TPU VM), with `--launcher-args='--nodes=2 --partition=gpu'`. `--population` trains
the seeds of each (pair, method) as one population, a single run with
`--config.population.size=S '--config.population.sweep={"seed": (0, 1, 2)}'` in
`ROOT/<pair>/<method>/population/` (its members in `members/seed=<s>/`).

Every (method, pair) is loaded through the config file and checked (`jaxkd.plan.check`)
before anything is printed, so a misspelt method or model fails here, not in the tenth job.
`python -m jaxkd.report ROOT` then tabulates the finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
SCRATCH_METHOD = "ce"


@dataclasses.dataclass(frozen=True)
class Run:
  """One jaxkd.main invocation."""

  config: str  # `FILE:arg`, as --config takes it.
  workdir: str
  seed_args: tuple[str, ...]  # `--config.seed=N`, or a population's size and seed sweep.
  overrides: tuple[str, ...] = ()  # The user's, placeholders filled in.

  def main_command(self, python: str = "python") -> list[str]:
    return [
      python,
      "-m",
      "jaxkd.main",
      f"--config={self.config}",
      *self.seed_args,
      f"--workdir={self.workdir}",
      *self.overrides,
    ]

  def launcher_args(self) -> list[str]:
    """CONFIG WORKDIR OVERRIDES..., as launch/slurm.sh and launch/tpu_vm.sh run take them."""
    return [self.config, self.workdir, *self.seed_args, *self.overrides]


def _csv(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def _pairs(text: str) -> list[tuple[str, str]]:
  pairs = []
  for item in _csv(text):
    teacher, separator, student = item.partition(":")
    if not separator or not teacher or not student:
      raise ValueError(f"--pairs: {item!r} is not TEACHER:STUDENT")
    pairs.append((teacher, student))
  return pairs


def _fill(overrides: Sequence[str], **fields) -> tuple[str, ...]:
  """`overrides` with `{teacher}`, `{student}`, `{method}`, `{seed}` filled in."""
  try:
    return tuple(override.format(**fields) for override in overrides)
  except (KeyError, IndexError) as error:
    raise ValueError(
      f"override placeholder {error}: the fields are {{teacher}} {{student}} {{method}} {{seed}}"
      " (literal braces: {{ and }})"
    ) from None


def expand(
  config_file: str,
  methods: Sequence[str],
  pairs: Sequence[tuple[str, str]],
  seeds: Sequence[int],
  root: str,
  overrides: Sequence[str] = (),
  population: bool = False,
) -> list[Run]:
  """The runs of the sweep, pair by pair, method by method, seed by seed (module docstring)."""
  runs, scratch_done = [], set()
  for teacher, student in pairs:
    pair_dir = os.path.join(root, f"{teacher}-{student}")
    for method in methods:
      if method == SCRATCH_METHOD:
        if student in scratch_done:
          continue
        scratch_done.add(student)
      config = f"{config_file}:method={method},teacher={teacher},student={student}"
      method_dir = os.path.join(pair_dir, method)

      if population:
        seed_tuple = ", ".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")
        seed_args = (
          f"--config.population.size={len(seeds)}",
          f'--config.population.sweep={{"seed": ({seed_tuple})}}',
        )
        runs.append(
          Run(
            config,
            os.path.join(method_dir, "population"),
            seed_args,
            _fill(overrides, teacher=teacher, student=student, method=method, seed=seeds[0]),
          )
        )
        continue
      for seed in seeds:
        workdir = os.path.join(method_dir, f"seed_{seed}")
        runs.append(
          Run(
            config,
            workdir,
            (f"--config.seed={seed}",),
            _fill(overrides, teacher=teacher, student=student, method=method, seed=seed),
          )
        )
  return runs


def validate(runs: Sequence[Run]) -> None:
  """Loads every distinct `FILE:arg` with its `get_config(arg)` and checks it (`jaxkd.plan.check`:
  every value judged from the config alone); ConfigError names the first problem."""
  from jaxkd import plan

  loaded = {}
  for run in runs:
    path, _, arg = run.config.partition(":")
    if path not in loaded:
      spec = importlib.util.spec_from_file_location("sweep_config", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      loaded[path] = module
    plan.check(loaded[path].get_config(arg or None))


def _script_path(name: str) -> str:
  """launch/NAME relative to the working directory when below it (the repository root), else
  absolute: either way, what the printed commands run from here."""
  path = os.path.join(LAUNCH_DIR, name)
  relative = os.path.relpath(path)
  return path if relative.startswith(os.pardir) else relative


def command(
  run: Run, launcher: str = "", launcher_args: Sequence[str] = (), python: str = "python"
) -> list[str]:
  """The argv that starts `run`: jaxkd.main itself, or through launch/slurm.sh / tpu_vm.sh."""
  if not launcher:
    return run.main_command(python)
  if launcher == "slurm":
    return [_script_path("slurm.sh"), *launcher_args, *run.launcher_args()]
  if launcher == "tpu_vm":
    return [
      _script_path("tpu_vm.sh"),
      "run",
      "--wait",
      *launcher_args,
      *run.launcher_args(),
    ]
  raise ValueError(f"--launcher={launcher!r}: one of slurm, tpu_vm")


def script(commands: Sequence[Sequence[str]]) -> str:
  """A bash script running `commands` one after another, stopping at the first failure."""
  lines = ["#!/usr/bin/env bash", "# Written by launch/sweep.py.", "set -euo pipefail", ""]
  return "\n".join(lines + [shlex.join(argv) for argv in commands]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="launch/sweep.py",
    description=__doc__.split("\n\n")[0],
    epilog="Overrides for every run go after --; {teacher} {student} {method} {seed} are "
    "filled in.",
  )
  parser.add_argument(
    "--config", default="configs/cifar_kd.py", help="config file (default %(default)s)"
  )
  parser.add_argument(
    "--methods", required=True, help="comma-separated method= values, e.g. kd,dkd,ce"
  )
  parser.add_argument("--pairs", required=True, help="comma-separated TEACHER:STUDENT pairs")
  parser.add_argument(
    "--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)"
  )
  parser.add_argument(
    "--root", required=True, help="workdirs: ROOT/<teacher>-<student>/<method>/seed_<s>"
  )
  parser.add_argument(
    "--population", action="store_true", help="the seeds of a (pair, method) as one population run"
  )
  parser.add_argument(
    "--launcher", choices=("slurm", "tpu_vm"), help="start each run through launch/<launcher>.sh"
  )
  parser.add_argument(
    "--launcher-args", default="", help="options for the launcher, one shell-quoted string"
  )
  parser.add_argument(
    "--python", default="python", help="interpreter of the plain commands (default %(default)s)"
  )
  parser.add_argument(
    "--script", metavar="FILE", help="write a bash script running the commands in turn"
  )
  parser.add_argument(
    "--no-check", action="store_true", help="skip loading and validating each config"
  )
  parser.add_argument("overrides", nargs="*", help="after --: --config.field=value for every run")
  args = parser.parse_args(argv)

  try:
    seeds = [int(seed) for seed in _csv(args.seeds)]
    runs = expand(
      args.config,
      _csv(args.methods),
      _pairs(args.pairs),
      seeds,
      args.root,
      args.overrides,
      population=args.population,
    )
    if not args.no_check:
      validate(runs)
  except (ValueError, KeyError, OSError) as error:  # ConfigError is a ValueError.
    print(f"error: {error}", file=sys.stderr)
    return 2
  commands = [
    command(run, args.launcher or "", shlex.split(args.launcher_args), args.python) for run in runs
  ]
  if args.script:
    with open(args.script, "w") as f:
      f.write(script(commands))
    os.chmod(args.script, 0o755)
    print(f"wrote {len(commands)} commands to {args.script}")
  else:
    print("\n".join(shlex.join(argv) for argv in commands))
  return 0


if __name__ == "__main__":
  sys.exit(main())
