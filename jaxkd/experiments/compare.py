"""The KD experiment in one command: teacher, then the same student from scratch and with KD.

For a config with ``experiment = 'compare'`` and a `compare` section (configs/quickstart.py):

1. trains `config.teacher` (`model`, `kwargs`) with cross-entropy on `compare.teacher_*`
   settings → `<workdir>/teacher/`, exported to `<workdir>/teacher/model/`;
2. for each of `compare.seeds` seeds, trains `config.student` twice on the same data, order
   and initialisation: with cross-entropy only (`<workdir>/scratch/seed_<s>/`) and with
   `config.distill` from that teacher (`<workdir>/kd/seed_<s>/`);
3. evaluates all of them on the test split against the teacher (top-1, argmax agreement,
   KL(teacher ‖ student)) and writes the table to `<workdir>/results.md` and `results.json`.

Every run is an ordinary `train.train_and_evaluate` workdir, so an interrupted comparison
resumes where it stopped and a finished one only re-evaluates.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxkd import data, models, plan, train

_ROLES = ("scratch", "kd")


def teacher_config(config) -> ml_collections.ConfigDict:
  """The teacher's run: `config.teacher` trained with cross-entropy, no teacher of its own."""
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.student.model = config.teacher.model
  teacher.student.kwargs = config.teacher.kwargs
  teacher.experiment = ""
  teacher.teacher.model = ""
  teacher.teacher.checkpoint = ""
  teacher.distill = ml_collections.ConfigDict({"losses": {"ce": 1.0}})
  teacher.num_epochs = config.compare.teacher_epochs
  teacher.data.train_examples = config.compare.teacher_train_examples
  return teacher


def student_config(config, role: str, seed: int, teacher_dir: str) -> ml_collections.ConfigDict:
  """Student run `role` ('scratch': cross-entropy only; 'kd': `config.distill`) with `seed`.

  Both evaluate against the teacher; only 'kd' trains with it.
  """
  student = ml_collections.ConfigDict(config.to_dict())
  student.experiment = ""
  student.seed = seed
  student.teacher.checkpoint = teacher_dir
  if role == "scratch":
    student.distill = ml_collections.ConfigDict({"losses": {"ce": 1.0}})
  return student


def _num_params(model_name: str, kwargs, num_classes: int) -> int:
  abstract_model = nnx.eval_shape(
    lambda: models.create(model_name, num_classes=num_classes, **kwargs)
  )
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))


def _mean_std(values, sign: str = "", digits: int = 2) -> str:
  """`mean ± sample std` (ddof = 1), or the value alone for a single run; `sign='+'` marks
  positive means."""
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:{sign}.{digits}f}"
  return f"{values.mean():{sign}.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def results_table(summary: dict) -> str:
  """Markdown table of a `run` summary: accuracies in %, KL at T = 1 in nats per test example."""
  teacher = summary["teacher"]
  num_seeds = len(summary["runs"]["scratch"])
  seeds = f"{num_seeds} seed{'s' if num_seeds > 1 else ''}"
  lines = [
    "| model | parameters | top-1 (%) | agreement with teacher (%) | KL(teacher ‖ student) |",
    "|---|---|---|---|---|",
    f"| teacher `{teacher['model']}` | {teacher['parameters']:,} | "
    f"{100 * teacher['accuracy']:.2f} | — | — |",
  ]
  labels = {"scratch": "student from scratch", "kd": "student with KD"}
  for role in _ROLES:
    runs = summary["runs"][role]
    lines.append(
      f"| {labels[role]} `{summary['student']['model']}` ({seeds}) | "
      f"{summary['student']['parameters']:,} | "
      f"{_mean_std([100 * r['accuracy'] for r in runs])} | "
      f"{_mean_std([100 * r['agreement'] for r in runs])} | "
      f"{_mean_std([r['kl'] for r in runs], digits=3)} |"
    )
  gain = [
    100 * (kd["accuracy"] - scratch["accuracy"])
    for kd, scratch in zip(summary["runs"]["kd"], summary["runs"]["scratch"])
  ]
  lines.append(f"| KD − scratch, paired by seed | | {_mean_std(gain, sign='+')} | | |")
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  """Runs the comparison (module docstring); returns the summary written to results.json."""
  teacher_dir = os.path.join(workdir, "teacher")
  seeds = [config.seed + offset for offset in range(config.compare.seeds)]
  configs = {"teacher": teacher_config(config)}
  for role in _ROLES:
    for seed in seeds:
      configs[f"{role}/seed_{seed}"] = student_config(
        config, role, seed, os.path.join(teacher_dir, "model")
      )
  # Every run is checked before the first one starts: a typo must not wait for the teacher.
  for run_config in configs.values():
    plan.check(run_config)

  start = time.perf_counter()
  results, seconds = {}, {}
  for name, run_config in configs.items():
    logging.info("=== %s ===", name)
    run_start = time.perf_counter()
    results[name] = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    seconds[name] = time.perf_counter() - run_start

  num_classes = data.DATASETS[config.data.name].num_classes
  summary = {
    "teacher": {
      "model": config.teacher.model,
      **results["teacher"],
      "parameters": _num_params(config.teacher.model, config.teacher.kwargs, num_classes),
    },
    "student": {
      "model": config.student.model,
      "parameters": _num_params(config.student.model, config.student.kwargs, num_classes),
    },
    "seeds": seeds,
    "runs": {role: [results[f"{role}/seed_{seed}"] for seed in seeds] for role in _ROLES},
    "seconds": {**seconds, "total": time.perf_counter() - start},
  }
  table = results_table(summary)
  print(table, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
