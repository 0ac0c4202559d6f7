"""Published top-1 figures of the KD benchmarks, for the comparison column of `jaxkd.report`.

`published.json` (package data) transcribes the result tables of the reference code READMEs with
their own model and method names, and maps those to jaxkd's: `resnet32x4`, `wrn_40_2`,
`MobileNetV2`, ... and configs/cifar_kd.py's `method=` names (`kd`, `at`, `dkd`, `kd_ls`, ...;
'scratch' for a model trained with cross-entropy alone, which is also what a "Teacher" figure
is). Every figure keeps its source, whose protocol differs:

* [R] RepDistiller README: the last epoch;
* [M] mdistiller README: the best epoch, mean of 5 runs;
* [D] DIST_KD README: mean ± std (epoch and number of runs not stated);
* [L] logit-standardization-KD README: mean of 4 runs (epoch not stated).

A jaxkd run logs both its last and its best epoch (`results.json`), so a figure is compared with
the number of the same protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json


@dataclasses.dataclass(frozen=True)
class Figure:
  """One published top-1 accuracy (%) and how it was measured."""

  top1: float
  std: float | None  # Over runs, where the source gives it.
  source: str | None  # 'R', 'M', 'D', 'L'; None: the reference does not name it.
  reference: str  # The source's name, e.g. 'RepDistiller README'.
  protocol: str  # As the reference states it: 'last epoch', 'best epoch, mean of 5', ...
  epoch: str | None  # 'last' or 'best' epoch; None: not stated.
  runs: int | None  # Runs averaged; None: not stated.

  def __str__(self) -> str:
    """'73.33 [R: last epoch]', '76.31 ± 0.19 [D: mean ± std]'."""
    value = f"{self.top1:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")
    return f"{value} [{self.source or '?'}: {self.protocol}]"


@functools.cache
def _table() -> dict:
  return json.loads(importlib.resources.files(__name__).joinpath("published.json").read_text())


def _canonical_model(name: str) -> str:
  return _table()["model_aliases"].get(name, name)


def _canonical_method(name: str) -> str:
  return _table()["method_aliases"].get(name, name)


@functools.cache
def _index() -> dict[tuple[str, str, str, str], tuple[Figure, ...]]:
  """(dataset, teacher, student, method) → figures; a model trained alone is
  (dataset, '', model, 'scratch'), whether the reference lists it as a teacher or a student."""
  table = _table()
  index: dict[tuple[str, str, str, str], list[Figure]] = {}
  for dataset, results in table["datasets"].items():
    for row in results["rows"]:
      source = table["sources"].get(row["source"], {})
      method = table["methods"][row["row"]]
      stds = row.get("std") or [None] * len(row["top1"])
      for pair, top1, std in zip(results["pairs"], row["top1"], stds, strict=True):
        if top1 is None:
          continue
        teacher, student = (table["models"][name] for name in pair.split("→"))
        if method == "teacher":
          key = (dataset, "", teacher, "scratch")
        elif method == "scratch":
          key = (dataset, "", student, "scratch")
        else:
          key = (dataset, teacher, student, method)
        figure = Figure(
          top1=top1,
          std=std,
          source=row["source"],
          reference=source.get("reference", "reference not stated"),
          protocol=source.get("protocol", "protocol not stated"),
          epoch=source.get("epoch"),
          runs=source.get("runs"),
        )
        if figure not in index.setdefault(key, []):  # A teacher's figure repeats per pair.
          index[key].append(figure)
  return {key: tuple(figures) for key, figures in index.items()}


def lookup(dataset: str, teacher: str, student: str, method: str) -> tuple[Figure, ...]:
  """The published figures of `student` distilled from `teacher` with `method` on `dataset`
  (jaxkd names; `method` 'scratch' or 'ce' ignores the teacher); () if none."""
  method = _canonical_method(method)
  if method == "scratch":
    return _index().get((dataset, "", _canonical_model(student), "scratch"), ())
  key = (dataset, _canonical_model(teacher), _canonical_model(student), method)
  return _index().get(key, ())


def sources() -> dict[str, dict]:
  """The sources by letter: `{'R': {'reference': 'RepDistiller README', 'epoch': 'last', ...}}`."""
  return dict(_table()["sources"])


def methods() -> list[str]:
  """jaxkd's names of the published methods, in the tables' order ('scratch' first)."""
  return list(dict.fromkeys(m for m in _table()["methods"].values() if m != "teacher"))
