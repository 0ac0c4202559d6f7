"""Results of finished runs as a table beside the published figures, and plots.

    python -m jaxkd.report RUN_DIRS... [--out DIR]

finds every run under RUN_DIRS (a directory holding `results.json` and `provenance.json`; each
member of a population counts as a run of its own), groups the runs by (dataset, teacher →
student, method) and aggregates their seeds, prints a markdown table (and the gain of every
method over training from scratch), and with `--out` writes it to `DIR/report.md` with two
plots: `curves.png` (train loss and eval top-1 against the step, one line per run) and
`gains.png` (the difference to scratch per method, error bars over seeds: top-1 points, or
bits per byte for language models).

Aggregation: mean ± sample standard deviation over seeds (ddof = 1; a single run shows its value).
Runs of one (dataset, teacher → student, method) whose configs differ in more than the seed and
bookkeeping fields (paths, logging, mesh) are kept apart, as variants named by the differing
fields (`distill.kd.temperature=2.0`). A method's gain over scratch is paired by seed where the
scratch run of that seed exists: the mean and sample std of the per-seed differences.

The published column (`jaxkd.reference`) states each figure's protocol: RepDistiller reports the
last epoch, mdistiller the best epoch (mean of 5 runs); jaxkd logs both, and Δ compares the
figure with the mean of the same protocol.

The pieces, for an experiment that reports its own runs (the teacher → scratch / KD comparison):
`load_runs`, `group`, `markdown_table`, `gains`, `gains_table`, `plot_curves`, `plot_gains`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from etils import epath

from jaxkd import provenance, reference

RESULTS = "results.json"
METRICS = "metrics.jsonl"
# Inside a run directory: no runs below these.
_NOT_RUN_DIRS = frozenset({"checkpoints", "tensorboard", "model", "xla_cache"})
# Config fields that do not change what a run computes: runs differing only there are seeds
# of one experiment (the seed itself, where things are, how often to log, the device layout).
_BOOKKEEPING_FIELDS = (
  "seed",
  "method",
  "population",
  "experiment",
  "compare",
  "teacher.checkpoint",
  "teacher.cache.dir",
  "data.dir",
  "data.num_threads",
  "data.eval_batch_size",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "stop_at_step",
  "mesh",
  "distributed",
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained student: its directory, resolved config, final results and logged metrics."""

  path: str
  config: dict
  results: dict
  metrics: tuple[dict, ...] = ()
  member: str = ""  # The population member's name; '' for a run of its own.

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))

  def series(self, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `name` in the `split` records of metrics.jsonl (last one per step:
    a resumed run logs its last steps again)."""
    by_step = {
      record["step"]: record[name]
      for record in self.metrics
      if record.get("split") == split and name in record
    }
    steps = sorted(by_step)
    return np.asarray(steps, np.int64), np.asarray([by_step[s] for s in steps], np.float64)


def _read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text())


def _read_metrics(path: epath.Path) -> tuple[dict, ...]:
  if not path.exists():
    return ()
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # The last line of a run killed while writing it.
      continue
  return tuple(records)


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[epath.Path]:
  """Every directory under `paths` (themselves included) holding results.json and
  provenance.json, in path order (local paths or `gs://`)."""
  found = []

  def visit(directory: epath.Path) -> None:
    children = sorted(directory.iterdir())
    names = {child.name for child in children}
    if RESULTS in names and provenance.FILENAME in names:
      found.append(directory)
    for child in children:
      if child.name not in _NOT_RUN_DIRS and child.is_dir():
        visit(child)

  for path in paths:
    visit(epath.Path(path))
  return found


def load_run(directory: str | os.PathLike) -> list[Run]:
  """The run in `directory`; a population's members, one run each. [] for a directory whose
  results.json is not a run's (a comparison's summary)."""
  directory = epath.Path(directory)
  record = provenance.read(directory)
  results = _read_json(directory / RESULTS)
  if record is None or "step" not in results:
    return []
  if "members" not in results:
    metrics = _read_metrics(directory / METRICS)
    return [Run(str(directory), record["config"], results, metrics)]
  runs = []
  for name, member_results in results["members"].items():
    member_dir = directory / "members" / name
    if (member_dir / RESULTS).exists():  # Holds the step and the member's best epoch too.
      member_results = _read_json(member_dir / RESULTS)
    config = provenance.member_record(record, name)["config"]
    runs.append(
      Run(str(member_dir), config, member_results, _read_metrics(member_dir / METRICS), name)
    )
  return runs


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
  """Every run under `paths` (`find_run_dirs`), each once."""
  runs, seen = [], set()
  for directory in find_run_dirs(paths):
    if str(directory) in seen:  # A member directory with a record of its own.
      continue
    for run in load_run(directory):
      if run.path not in seen:
        seen.add(run.path)
        runs.append(run)
  return runs


@dataclasses.dataclass(frozen=True, order=True)
class GroupKey:
  """What the seeds of one group share."""

  dataset: str
  teacher: str  # '' for a model trained without a teacher.
  student: str
  method: str  # provenance.method_label; 'ce' reads 'scratch'.
  variant: str = ""  # Config fields that set the group apart from others of the same four.

  @property
  def pair(self) -> str:
    return f"{self.teacher} → {self.student}" if self.teacher else self.student

  @property
  def label(self) -> str:
    """'resnet32x4 → resnet8x4 kd (distill.kd.temperature=2.0)'."""
    variant = f" ({self.variant})" if self.variant else ""
    return f"{self.pair} {self.method}{variant}"


def _teacher_name(config: dict) -> str:
  """config.teacher.model, else what its checkpoint's model.json names ('a+b' for an ensemble
  'dir_a,dir_b'), else the checkpoint's path; '' without a teacher."""
  teacher = config.get("teacher") or {}
  if teacher.get("model") or not teacher.get("checkpoint"):
    return teacher.get("model", "")
  names = []
  for directory in teacher["checkpoint"].split(","):
    metadata = epath.Path(directory) / "model.json"
    names.append(_read_json(metadata)["name"] if metadata.exists() else directory)
  return "+".join(names)


def _experiment(run: Run) -> tuple[str, str, str, str]:
  method = provenance.method_label(run.config)
  return (
    run.config["data"]["name"],
    _teacher_name(run.config),
    run.config["student"]["model"],
    "scratch" if method == "ce" else method,
  )


def _is_bookkeeping(field: str) -> bool:
  return any(field == name or field.startswith(name + ".") for name in _BOOKKEEPING_FIELDS)


def _show_value(value) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def _variants(runs: Sequence[Run]) -> list[str]:
  """Per run, the fields (other than bookkeeping) on which the runs' configs disagree."""
  flat = [
    {k: v for k, v in provenance.flatten(run.config).items() if not _is_bookkeeping(k)}
    for run in runs
  ]
  differing = sorted(
    field
    for field in set().union(*flat)
    if len({json.dumps(config.get(field), sort_keys=True) for config in flat}) > 1
  )
  return [
    ",".join(
      f"{field}={_show_value(config[field]) if field in config else '(absent)'}"
      for field in differing
    )
    for config in flat
  ]


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and sample std (ddof = 1; None for one value) of `count` values."""

  mean: float
  std: float | None
  count: int

  def format(self, digits: int, scale: float = 1.0, sign: str = "") -> str:
    """'73.30 ± 0.20' (`sign='+'`: '+0.83 ± 0.12'); one value alone: '73.30'."""
    text = f"{scale * self.mean:{sign}.{digits}f}"
    return text if self.std is None else f"{text} ± {scale * self.std:.{digits}f}"


def stat(values: Iterable[float]) -> Stat | None:
  values = np.asarray(list(values), np.float64)
  if not values.size:
    return None
  std = float(values.std(ddof=1)) if values.size > 1 else None
  return Stat(float(values.mean()), std, int(values.size))


@dataclasses.dataclass(frozen=True)
class Group:
  """The runs (seeds) of one experiment, in seed order."""

  key: GroupKey
  runs: tuple[Run, ...]

  def values(self, metric: str) -> list[float]:
    """`results[metric]` of the runs that have it."""
    return [run.results[metric] for run in self.runs if metric in run.results]

  def by_seed(self, metric: str) -> dict[int, float] | None:
    """Seed → `results[metric]`; None where two of the runs share a seed (no pairing by seed)."""
    runs = [run for run in self.runs if metric in run.results]
    by_seed = {run.seed: run.results[metric] for run in runs}
    return by_seed if len(by_seed) == len(runs) else None

  def stat(self, metric: str) -> Stat | None:
    return stat(self.values(metric))


def _method_rank(method: str) -> tuple[int, str]:
  order = reference.methods()
  return (order.index(method) if method in order else len(order), method)


def group(runs: Iterable[Run]) -> list[Group]:
  """Runs grouped by `GroupKey`, in order: dataset, models trained alone first, pair, then
  scratch and the published methods in the benchmark's order, then the others by name."""
  by_experiment: dict[tuple[str, str, str, str], list[Run]] = {}
  for run in runs:
    by_experiment.setdefault(_experiment(run), []).append(run)
  groups: dict[GroupKey, list[Run]] = {}
  for experiment, experiment_runs in by_experiment.items():
    for run, variant in zip(experiment_runs, _variants(experiment_runs)):
      groups.setdefault(GroupKey(*experiment, variant), []).append(run)

  def order(key: GroupKey):
    return (key.dataset, bool(key.teacher), key.teacher, key.student, _method_rank(key.method))

  return [
    Group(key, tuple(sorted(groups[key], key=lambda run: (run.seed, run.path))))
    for key in sorted(groups, key=lambda key: (order(key), key.variant))
  ]


@dataclasses.dataclass(frozen=True)
class Column:
  """A results.json metric shown as mean ± std, × `scale`, with `digits` decimals."""

  metric: str
  header: str
  scale: float
  digits: int


_TOP1_LAST = Column("accuracy", "top-1, last (%)", 100.0, 2)
_TOP1_BEST = Column("best_accuracy", "top-1, best (%)", 100.0, 2)
_OTHER_COLUMNS = (
  Column("top5", "top-5 (%)", 100.0, 2),
  Column("agreement", "agreement with teacher (%)", 100.0, 2),
  Column("kl", "KL(teacher ‖ student) (nats)", 1.0, 3),
  Column("loss", "loss (nats/token)", 1.0, 3),
  Column("bits_per_byte", "bits per byte", 1.0, 3),
)
# Published figures are compared with our mean of the same epoch protocol.
_EPOCH_METRIC = {"last": "accuracy", "best": "best_accuracy"}

Published = Callable[[str, str, str, str], Sequence[reference.Figure]]


def _columns(groups: Sequence[Group]) -> list[Column]:
  """The columns some group has a value for; accuracy reads 'token accuracy' for LM runs."""
  columns = [_TOP1_LAST, _TOP1_BEST, *_OTHER_COLUMNS]
  language_models = all(
    run.results.get("bits_per_byte") is not None for g in groups for run in g.runs
  )
  if language_models:
    columns = [
      dataclasses.replace(c, header=c.header.replace("top-1", "token accuracy")) for c in columns
    ]
  return [c for c in columns if any(g.stat(c.metric) for g in groups)]


def _cell(group: Group, column: Column) -> str:
  value = group.stat(column.metric)
  if value is None:
    return "—"
  text = value.format(column.digits, column.scale)
  return text if value.count == len(group.runs) else f"{text} (n={value.count})"


def _published_cells(group: Group, figures: Sequence[reference.Figure]) -> tuple[str, str]:
  """'73.33 [R: last epoch]' and Δ = our mean of the figure's epoch protocol − the figure."""
  if not figures:
    return "—", "—"
  deltas = []
  for figure in figures:
    ours = group.stat(_EPOCH_METRIC.get(figure.epoch or "", ""))
    deltas.append("—" if ours is None else f"{100 * ours.mean - figure.top1:+.2f}")
  return " · ".join(map(str, figures)), " · ".join(deltas)


def _figures(published: Published | None, key: GroupKey) -> Sequence[reference.Figure]:
  # Variants (another temperature, ...) are not the published recipe.
  if published is None or key.variant:
    return ()
  return published(key.dataset, key.teacher, key.student, key.method)


def markdown_table(groups: Sequence[Group], published: Published | None = reference.lookup) -> str:
  """One row per group: runs, each metric as mean ± std, and the published top-1 beside ours.

  `published(dataset, teacher, student, method)` gives the figures (default: the package's
  `jaxkd.reference`); None, or no figure for any group, leaves the published columns out.
  """
  columns = _columns(groups)
  figures = [_figures(published, g.key) for g in groups]
  with_published = any(figures)
  headers = ["dataset", "teacher → student", "method", "runs"]
  headers += [c.header for c in columns[:2]]
  if with_published:
    headers += ["published top-1 (%)", "Δ published (points)"]
  headers += [c.header for c in columns[2:]]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for group, group_figures in zip(groups, figures):
    key = group.key
    method = f"{key.method} ({key.variant})" if key.variant else key.method
    cells = [key.dataset, key.pair, method, str(len(group.runs))]
    cells += [_cell(group, c) for c in columns[:2]]
    if with_published:
      cells += _published_cells(group, group_figures)
    cells += [_cell(group, c) for c in columns[2:]]
    lines.append("| " + " | ".join(cells) + " |")
  notes = ["Mean ± sample std over seeds (ddof = 1); a single run shows its value."]
  if with_published:
    used = {f.source for fs in figures for f in fs}
    notes.append(
      "Published: "
      + "; ".join(
        f"[{letter}] {source['reference']}: {source['protocol']}"
        for letter, source in reference.sources().items()
        if letter in used
      )
      + ". Δ = our mean of the figure's epoch protocol (last or best) − the figure."
    )
  return "\n".join(lines) + "\n\n" + "\n".join(notes)


@dataclasses.dataclass(frozen=True)
class Gain:
  """`group`'s `metric` minus that of its scratch `baseline`."""

  group: Group
  baseline: Group
  metric: str
  stat: Stat
  paired: bool  # Per-seed differences over the seeds both have; else difference of the means.
  published: float | None  # The same difference in published figures of one source, if any.


def _baseline(key: GroupKey, by_key: dict[GroupKey, Group]) -> Group | None:
  """The scratch group of the same student: evaluated against the same teacher if there is
  one, else trained alone; the same variant if there is one, else the plain recipe."""
  for teacher in (key.teacher, ""):
    for variant in dict.fromkeys((key.variant, "")):
      candidate = GroupKey(key.dataset, teacher, key.student, "scratch", variant)
      if candidate in by_key:
        return by_key[candidate]
  return None


def _published_gain(key: GroupKey) -> float | None:
  """Published figure of the method − that of scratch, from one source (same protocol)."""
  if key.variant:
    return None
  scratch = {f.source: f.top1 for f in reference.lookup(key.dataset, "", key.student, "scratch")}
  for figure in reference.lookup(key.dataset, key.teacher, key.student, key.method):
    if figure.source in scratch:
      return figure.top1 - scratch[figure.source]
  return None


@dataclasses.dataclass(frozen=True)
class _Measure:
  """How a gain in one metric is shown: `scale` · value with `digits`, in `unit`."""

  scale: float
  digits: int
  unit: str
  lower_is_better: bool


# Images: top-1 in percentage points; language models: bits per byte (lower is better).
_MEASURES = {
  "accuracy": _Measure(100.0, 2, "top-1 (points)", False),
  "bits_per_byte": _Measure(1.0, 4, "bits per byte, lower is better", True),
}


def gain_metric(group: Group) -> str:
  """'bits_per_byte' for language models (every run reports it), else 'accuracy'."""
  return "bits_per_byte" if group.stat("bits_per_byte") is not None else "accuracy"


def gains(groups: Sequence[Group], metric: str | None = None) -> list[Gain]:
  """The gain of every non-scratch group with a scratch baseline (`_baseline`), in `metric`
  (default: `gain_metric` of the group).

  Paired by seed where both have runs of a seed: mean and sample std of the per-seed
  differences (what varies with the seed cancels). Otherwise the difference of the means, with
  std sqrt(s₁² + s₂²): the spread of the difference of one run of each.
  """
  by_key = {g.key: g for g in groups}
  found = []
  for group in groups:
    baseline = _baseline(group.key, by_key) if group.key.method != "scratch" else None
    if baseline is None:
      continue
    name = metric or gain_metric(group)
    ours, theirs = group.by_seed(name), baseline.by_seed(name)
    seeds = sorted(ours.keys() & theirs.keys()) if ours is not None and theirs is not None else []
    if seeds:
      difference, paired = stat(ours[s] - theirs[s] for s in seeds), True
    else:
      a, b = group.stat(name), baseline.stat(name)
      if a is None or b is None:
        continue
      std = math.hypot(a.std, b.std) if a.std is not None and b.std is not None else None
      difference, paired = Stat(a.mean - b.mean, std, a.count), False
    published = _published_gain(group.key) if name == "accuracy" else None
    found.append(Gain(group, baseline, name, difference, paired, published))
  return found


def _how(gain: Gain) -> str:
  """'paired by seed, 3 seeds' or 'unpaired, 2 vs 1 runs'."""
  if gain.paired:
    return f"paired by seed, {gain.stat.count} seed{'s' if gain.stat.count > 1 else ''}"
  return f"unpaired, {len(gain.group.runs)} vs {len(gain.baseline.runs)} runs"


def _gain_value(gain: Gain) -> str:
  measure = _MEASURES[gain.metric]
  return gain.stat.format(measure.digits, measure.scale, "+")


def _gain_cell(gain: Gain, with_unit: bool) -> str:
  unit = f" {_MEASURES[gain.metric].unit}" if with_unit else ""
  return f"{_gain_value(gain)}{unit} ({_how(gain)})"


def gains_table(found: Sequence[Gain]) -> str:
  """Markdown rows of `gains`: the difference to scratch (top-1 points, or bits per byte for
  language models), ours and published."""
  with_published = any(g.published is not None for g in found)
  metrics = {g.metric for g in found}
  units = f", {_MEASURES[next(iter(metrics))].unit}" if len(metrics) == 1 else ""
  headers = ["dataset", "teacher → student", "method", f"difference to scratch{units}"]
  headers += ["published gain (points)"] if with_published else []
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for gain in found:
    key = gain.group.key
    method = f"{key.method} ({key.variant})" if key.variant else key.method
    cells = [key.dataset, key.pair, method, _gain_cell(gain, with_unit=len(metrics) > 1)]
    if with_published:
      cells.append("—" if gain.published is None else f"{gain.published:+.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(groups: Sequence[Group], published: Published | None = reference.lookup) -> str:
  """The report: the results table, and the gains over scratch where there are any."""
  text = "## Results\n\n" + markdown_table(groups, published)
  found = gains(groups)
  if found:
    text += "\n\n## Difference to training from scratch (last epoch)\n\n" + gains_table(found)
  return text + "\n"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on a cluster or in CI.
  import matplotlib.pyplot as plt

  return plt


# Eval curves get point markers up to this many evaluations (240 epochs would be a smear).
_MAX_MARKERS = 40


def _save(plt, figure, path: str | os.PathLike) -> None:
  with epath.Path(path).open("wb") as f:  # matplotlib writes local files only; epath, gs:// too.
    figure.savefig(f, format="png", dpi=120)
  plt.close(figure)


def _style(index: int) -> dict:
  """Colour per group; the line style changes once the 10 colours are used up."""
  return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


def plot_curves(runs: Sequence[Run], path: str | os.PathLike) -> None:
  """Train loss (log scale) and eval top-1 (%) against the step, one line per run, one colour
  per group (its seeds share it), to `path` (PNG)."""
  plt = _pyplot()
  from matplotlib import ticker

  groups = group(runs)
  language_models = all(run.results.get("bits_per_byte") is not None for run in runs)
  # Language models: bits per byte (lower is better); images: top-1 (%).
  eval_name, scale, eval_label = (
    ("bits_per_byte", 1.0, "eval bits per byte")
    if language_models
    else ("accuracy", 100.0, "eval top-1 (%)")
  )
  figure, (loss_axes, eval_axes) = plt.subplots(
    1, 2, figsize=(12, 5.5), layout="constrained", squeeze=True
  )
  for index, g in enumerate(groups):
    seeds = f"{len(g.runs)} runs" if len(g.runs) > 1 else "1 run"
    for run_index, run in enumerate(g.runs):
      label = f"{g.key.label} ({seeds})" if run_index == 0 else None
      steps, loss = run.series("train", "loss")
      loss_axes.plot(steps, loss, linewidth=1.0, alpha=0.8, label=label, **_style(index))
      steps, values = run.series("eval", eval_name)
      marker = "o" if len(steps) <= _MAX_MARKERS else None  # A lone final evaluation shows too.
      eval_axes.plot(
        steps,
        scale * values,
        marker=marker,
        markersize=3,
        linewidth=1.0,
        alpha=0.8,
        **_style(index),
      )
  loss_axes.set(xlabel="step", ylabel="train loss (mean per logging interval)", yscale="log")
  loss_axes.set_title("Train loss")
  plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
  loss_axes.yaxis.set_major_formatter(plain)  # 0.5 and 2 rather than 5×10⁻¹ and 2×10⁰.
  loss_axes.yaxis.set_minor_formatter(plain)
  eval_axes.set(xlabel="step", ylabel=eval_label)
  eval_axes.set_title(f"{eval_label[0].upper()}{eval_label[1:]}, test split")
  for axes in (loss_axes, eval_axes):
    axes.grid(True, which="major", alpha=0.3)
  figure.legend(
    loc="outside lower center", fontsize="small", title="teacher → student, method", ncols=2
  )
  _save(plt, figure, path)


def _bar_label(gain: Gain) -> str:
  """Method (and variant), pair, and how the gain was computed, one per line."""
  key = gain.group.key
  lines = [key.method, *([key.variant] if key.variant else []), key.pair, f"({_how(gain)})"]
  return "\n".join(lines)


def plot_gains(groups: Sequence[Group], path: str | os.PathLike) -> bool:
  """Bar chart of `gains` (top-1 points; bits per byte when every gain is a language model's),
  error bars ± the std over seeds, published gains as markers where known; written to `path`
  (PNG). False (nothing written) without any gain."""
  found = gains(groups)
  if not found:
    return False
  if len({g.metric for g in found}) > 1:  # one axis, one unit: images and LMs together
    found = [g for g in found if g.metric == "accuracy"]
  measure = _MEASURES[found[0].metric]
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(found) + 2), 4.8), layout="constrained")
  positions = np.arange(len(found))
  means = [measure.scale * g.stat.mean for g in found]
  errors = [measure.scale * (g.stat.std or 0.0) for g in found]
  better = [(mean < 0) == measure.lower_is_better for mean in means]
  axes.bar(
    positions,
    means,
    yerr=errors,
    capsize=4,
    color=["C2" if good else "C3" for good in better],
    alpha=0.8,
    label="ours: mean ± std over seeds",
  )
  for position, mean, error, gain in zip(positions, means, errors, found):
    above = mean >= 0  # The value sits beyond the end of its error bar.
    axes.annotate(
      _gain_value(gain),
      (position, mean + error if above else mean - error),
      xytext=(0, 4 if above else -4),
      textcoords="offset points",
      ha="center",
      va="bottom" if above else "top",
      fontsize=8,
    )
  published = [(p, g.published) for p, g in zip(positions, found) if g.published is not None]
  if published:
    axes.scatter(
      [p for p, _ in published],
      [v for _, v in published],
      marker="D",
      color="black",
      zorder=3,
      label="published: method − scratch, one source",
    )
  axes.axhline(0.0, color="black", linewidth=0.8)
  axes.set_xticks(positions, [_bar_label(g) for g in found], fontsize=8)
  axes.set_ylabel(f"difference to scratch, {measure.unit}")
  axes.set_title("Difference to training from scratch, last epoch")
  axes.margins(y=0.2)
  axes.grid(True, axis="y", alpha=0.3)
  axes.legend(fontsize="small", loc="best")
  _save(plt, figure, path)
  return True


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxkd.report",
    description="Table (with published figures) and plots of the jaxkd runs under RUN_DIRS.",
  )
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run, or a tree of runs")
  parser.add_argument(
    "--out", metavar="DIR", help="write report.md, curves.png and gains.png to DIR"
  )
  args = parser.parse_args(argv)
  missing = [path for path in args.run_dirs if not epath.Path(path).is_dir()]
  if missing:
    print(f"error: not a directory: {' '.join(missing)}", file=sys.stderr)
    return 1
  runs = load_runs(args.run_dirs)
  if not runs:
    print(
      f"error: no runs under {' '.join(args.run_dirs)} (a run directory holds {RESULTS} and "
      f"{provenance.FILENAME})",
      file=sys.stderr,
    )
    return 1
  groups = group(runs)
  text = markdown(groups)
  print(text, end="")
  if args.out:
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out / "curves.png")
    figures = ["![train loss and eval accuracy](curves.png)"]
    if plot_gains(groups, out / "gains.png"):
      figures.append("![gain over scratch](gains.png)")
    (out / "report.md").write_text(text + "\n" + "\n\n".join(figures) + "\n")
    print(f"\nwrote {out / 'report.md'} and its plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
