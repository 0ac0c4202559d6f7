"""jaxkd's XLA:CPU options (`jaxkd.xla_flags.CPU_FLAGS`) against XLA's defaults, side by side.

XLA reads its flags once per process, so each setting runs `benchmarks/kd_step.py` in its own
process; the two settings alternate (default, jaxkd, default, jaxkd, ...) so that load changes
on a shared machine hit both alike. Figures: median over repeats.

- `--pairs`: the single-student variants of each pair (student-only, KD, teacher forward,
  cached) and the PyTorch KD step, so every repeat also gives a JAX / PyTorch ratio.
- `--population-pairs`: population steps (8 students, members unrolled, the CPU setting) over
  8 single steps, under each setting.

  python benchmarks/xla_cpu_flags.py                               # resnet56 → resnet20
  python benchmarks/xla_cpu_flags.py --pairs resnet56:resnet20,resnet32x4:resnet8x4
  python benchmarks/xla_cpu_flags.py --pairs "" --population-pairs quickstart
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from jaxkd import xla_flags  # noqa: E402


def _single_student_flags() -> dict[str, str]:
  """The XLA_FLAGS configure_cpu() sets for one student, even when kd_step.py measures
  populations (for which it would set none)."""
  environ = {}
  xla_flags.configure_cpu(environ)
  return environ


# Both settings name their flags explicitly, so kd_step.py's own configure_cpu() adds nothing.
SETTINGS = {"xla_defaults": {"JAXKD_XLA_DEFAULTS": "1"}, "jaxkd_flags": _single_student_flags()}
PAIR_VARIANTS = ("student_only", "kd", "teacher_fwd", "cached", "torch_kd")


def _kd_step_run(kd_step_args: list[str], setting: str) -> dict:
  environ = {
    key: value
    for key, value in os.environ.items()
    if key not in ("XLA_FLAGS", "JAXKD_XLA_DEFAULTS")
  }
  environ.update(SETTINGS[setting])
  with tempfile.NamedTemporaryFile(suffix=".json") as output:
    subprocess.run(
      [sys.executable, os.path.join(HERE, "kd_step.py"), *kd_step_args, "--json", output.name],
      env=environ,
      check=True,
      stdout=subprocess.DEVNULL,
    )
    with open(output.name) as f:
      return json.load(f)


def _alternate(kd_step_args, repeats, extract):
  """{setting: [extract(results) per repeat]}, the settings alternating."""
  runs = {setting: [] for setting in SETTINGS}
  for _ in range(repeats):
    for setting in SETTINGS:
      runs[setting].append(extract(_kd_step_run(kd_step_args, setting)))
  return runs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pairs", default="resnet56:resnet20")
  parser.add_argument("--population-pairs", default="")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  timing = ["--rounds", str(args.rounds), "--steps", str(args.steps)]
  print("load", os.getloadavg(), {name: setting for name, setting in SETTINGS.items()})
  for pair in filter(None, args.pairs.split(",")):
    runs = _alternate(
      ["--pairs", pair, "--population-pairs", "", *timing],
      args.repeats,
      lambda results: results["pairs"][0]["times_s"],
    )
    medians = {
      setting: {v: statistics.median(run[v] for run in runs[setting]) for v in PAIR_VARIANTS}
      for setting in SETTINGS
    }
    print(pair)
    for setting, times in medians.items():
      print(
        f"  {setting:13s}",
        {v: round(t, 4) for v, t in times.items()},
        "jax/torch KD",
        round(times["kd"] / times["torch_kd"], 2),
      )
    print(
      "  jaxkd_flags / xla_defaults",
      {
        v: round(medians["jaxkd_flags"][v] / medians["xla_defaults"][v], 2)
        for v in PAIR_VARIANTS
        if not v.startswith("torch")
      },
    )
  for setup in filter(None, args.population_pairs.split(",")):
    runs = _alternate(
      ["--pairs", "", "--population-pairs", setup, "--population-chunks", "1", *timing],
      args.repeats,
      lambda results: results["populations"][0]["population_over_sequential"],
    )
    print(
      setup,
      "population step / 8 single steps:",
      {
        setting: [round(run["population8_chunk1"], 3) for run in runs[setting]]
        for setting in SETTINGS
      },
    )
  print("load", os.getloadavg())


if __name__ == "__main__":
  main()
