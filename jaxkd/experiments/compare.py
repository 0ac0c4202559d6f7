"""The KD experiment in one command: teacher, then the same student from scratch and with KD.

For a config with ``experiment = 'compare'`` and a `compare` section (configs/quickstart.py,
configs/lm_kd.py):

1. trains `config.teacher` (`model`, `kwargs`) with cross-entropy on `compare.teacher_*`
   settings → `<workdir>/teacher/`, exported to `<workdir>/teacher/model/`;
2. for each of `compare.seeds` seeds, trains `config.student` twice on the same data, order
   and initialisation: with cross-entropy only (`<workdir>/scratch/seed_<s>/`) and with
   `config.distill` from that teacher (`<workdir>/kd/seed_<s>/`). With
   `compare.cache_teacher`, the KD students read the teacher's outputs stored once in
   `<workdir>/teacher/cache/` (`config.teacher.cache`: dense, or top-p-k truncated);
3. evaluates all of them on the test split against the teacher and writes the table to
   `<workdir>/results.md` and `results.json`, and the curves and the gain to `curves.png` and
   `gains.png` (`jaxkd.report`). Images: top-1, argmax agreement, KL(teacher ‖ student) per
   example. Language models: bits per byte, next-token top-1, agreement and KL per token.

Every run is an ordinary `train.train_and_evaluate` workdir, so an interrupted comparison
resumes where it stopped and a finished one only re-evaluates.
"""

import json
import os
import time

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from jaxkd import plan, preemption, report, teachers, train

_ROLES = ("scratch", "kd")
# The table's metric columns: (results key, header, scale, digits), images and language models.
_IMAGE_COLUMNS = (
  ("accuracy", "top-1 (%)", 100.0, 2),
  ("agreement", "agreement with teacher (%)", 100.0, 2),
  ("kl", "KL(teacher ‖ student)", 1.0, 3),
)
_LM_COLUMNS = (
  ("bits_per_byte", "bits per byte", 1.0, 4),
  ("accuracy", "next-token top-1 (%)", 100.0, 2),
  ("agreement", "agreement with teacher (%)", 100.0, 2),
  ("kl", "KL(teacher ‖ student) per token", 1.0, 4),
)


def teacher_config(config) -> ml_collections.ConfigDict:
  """The teacher's run: `config.teacher` trained with cross-entropy, no teacher of its own."""
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.student.model = config.teacher.model
  teacher.student.kwargs = config.teacher.kwargs
  teacher.experiment = ""
  teacher.method = ""  # trained alone: reported as 'scratch'
  teacher.teacher.model = ""
  teacher.teacher.checkpoint = ""
  teacher.distill = ml_collections.ConfigDict({"losses": {"ce": 1.0}})
  teacher.sampling.kind = ""  # the data as it is
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
    student.method = ""
    student.distill = ml_collections.ConfigDict({"losses": {"ce": 1.0}})
    student.sampling.kind = ""  # the data as it is
  return student


def _num_params(model_dir: str) -> int:
  """Trainable parameters of an exported model (built abstractly from its model.json)."""
  model = teachers.abstract_model(model_dir)
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _columns(summary: dict):
  return _LM_COLUMNS if "bits_per_byte" in summary["teacher"] else _IMAGE_COLUMNS


def _cell(runs, key, scale, digits, sign=""):
  return report.stat(run[key] for run in runs).format(digits, scale, sign)


def results_table(summary: dict) -> str:
  """Markdown table of a `run` summary: mean ± sample std over seeds (`jaxkd.report.stat`),
  and the gain of KD over scratch on the first column, paired by seed."""
  columns = _columns(summary)
  teacher = summary["teacher"]
  num_seeds = len(summary["runs"]["scratch"])
  seeds = f"{num_seeds} seed{'s' if num_seeds > 1 else ''}"
  header = "| model | parameters | " + " | ".join(label for _, label, _, _ in columns) + " |"
  # The teacher has no teacher to agree with.
  teacher_cells = [
    "—" if key in ("agreement", "kl") else _cell([teacher], key, scale, digits)
    for key, _, scale, digits in columns
  ]
  lines = [
    header,
    "|" + "---|" * (len(columns) + 2),
    f"| teacher `{teacher['model']}` | {teacher['parameters']:,} | "
    + " | ".join(teacher_cells)
    + " |",
  ]
  labels = {"scratch": "student from scratch", "kd": "student with KD"}
  for role in _ROLES:
    runs = summary["runs"][role]
    cells = [_cell(runs, key, scale, digits) for key, _, scale, digits in columns]
    lines.append(
      f"| {labels[role]} `{summary['student']['model']}` ({seeds}) | "
      f"{summary['student']['parameters']:,} | " + " | ".join(cells) + " |"
    )
  key, _, scale, digits = columns[0]
  differences = [
    {key: kd[key] - scratch[key]}
    for kd, scratch in zip(summary["runs"]["kd"], summary["runs"]["scratch"])
  ]
  gain = _cell(differences, key, scale, digits, sign="+")
  lines.append(f"| KD − scratch, paired by seed | | {gain} |" + " |" * (len(columns) - 1))
  return "\n".join(lines)


def student_cache_dir(workdir: str) -> str:
  """Where the KD students of a comparison read the stored teacher outputs."""
  return os.path.join(workdir, "teacher", "cache")


def run_configs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """The comparison's runs in order, by their directory under `workdir`: 'teacher', then
  'scratch/seed_<s>' and 'kd/seed_<s>' for every seed. Each is checked (`plan.check`), so a
  mistake in any of them is reported before the first one starts."""
  plan.check_comparison(config.compare)
  teacher_model = os.path.join(workdir, "teacher", "model")
  configs = {"teacher": teacher_config(config)}
  for role in _ROLES:
    for seed in _seeds(config):
      student = student_config(config, role, seed, teacher_model)
      if role == "kd" and config.compare.get("cache_teacher", False):
        student.teacher.cache.dir = student_cache_dir(workdir)
      configs[f"{role}/seed_{seed}"] = student
  for run_config in configs.values():
    plan.check(run_config)
  return configs


def _seeds(config) -> list[int]:
  return [config.seed + offset for offset in range(config.compare.seeds)]


def run(config, workdir: str) -> dict:
  """Runs the comparison (module docstring); returns the summary written to results.json."""
  configs = run_configs(config, workdir)
  teacher_dir = os.path.join(workdir, "teacher")
  seeds = _seeds(config)

  start = time.perf_counter()
  results, seconds = {}, {}
  watch = preemption.Watch(sync_every=config.log_every_steps)  # SIGTERM between runs too
  with watch.active():
    for index, (name, run_config) in enumerate(configs.items()):
      logging.info("=== %s ===", name)
      run_start = time.perf_counter()
      results[name] = train.train_and_evaluate(
        run_config,
        os.path.join(workdir, name),
        label=f"{name}, run {index + 1} of {len(configs)}",
        watch=watch,
      )
      seconds[name] = time.perf_counter() - run_start

  summary = {
    "teacher": {
      "model": config.teacher.model,
      **results["teacher"],
      "parameters": _num_params(os.path.join(teacher_dir, "model")),
    },
    "student": {
      "model": config.student.model,
      "parameters": _num_params(os.path.join(workdir, f"kd/seed_{seeds[0]}", "model")),
    },
    "seeds": seeds,
    "runs": {role: [results[f"{role}/seed_{seed}"] for seed in seeds] for role in _ROLES},
    "seconds": {**seconds, "total": time.perf_counter() - start},
  }
  table = results_table(summary)
  print(table, flush=True)
  if jax.process_index() == 0:
    epath.Path(workdir, "results.md").write_text(table + "\n")
    epath.Path(workdir, "results.json").write_text(json.dumps(summary, indent=2))
    runs = report.load_runs([workdir])
    report.plot_curves(runs, os.path.join(workdir, "curves.png"))
    report.plot_gains(report.group(runs), os.path.join(workdir, "gains.png"))
  return summary
