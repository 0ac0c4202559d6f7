"""jaxkd.report and jaxkd.reference: fake run directories in the trainer's format (metrics.jsonl,
results.json, provenance.json from `provenance.collect`), aggregated to hand-computed numbers,
published figures of the reference table, valid PNGs, and the command line.

The fake CIFAR-100 sweep: resnet32x4 → resnet8x4 with kd and dkd over seeds 0, 1, 2, the
student trained alone (`method=ce`) over the same seeds, and the teacher trained alone.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxkd import provenance, reference, report

import testing_utils

PAIR = "teacher=resnet32x4,student=resnet8x4"
# seed → results.json of each run; the means and stds below are computed by hand from these.
RESULTS = {
  "kd": {
    0: {"accuracy": 0.7310, "best_accuracy": 0.7340, "top5": 0.93, "agreement": 0.80, "kl": 0.50},
    1: {"accuracy": 0.7350, "best_accuracy": 0.7380, "top5": 0.93, "agreement": 0.82, "kl": 0.52},
    2: {"accuracy": 0.7330, "best_accuracy": 0.7360, "top5": 0.93, "agreement": 0.81, "kl": 0.54},
  },
  "dkd": {
    0: {"accuracy": 0.7600, "best_accuracy": 0.7630, "top5": 0.94, "agreement": 0.85, "kl": 0.30},
    1: {"accuracy": 0.7640, "best_accuracy": 0.7660, "top5": 0.94, "agreement": 0.86, "kl": 0.31},
    2: {"accuracy": 0.7650, "best_accuracy": 0.7680, "top5": 0.94, "agreement": 0.87, "kl": 0.32},
  },
  "ce": {
    0: {"accuracy": 0.7240, "best_accuracy": 0.7270, "top5": 0.92},
    1: {"accuracy": 0.7260, "best_accuracy": 0.7290, "top5": 0.92},
    2: {"accuracy": 0.7250, "best_accuracy": 0.7280, "top5": 0.92},
  },
}
STEPS_PER_EPOCH, EPOCHS = 100, 30


def fake_metrics(final_accuracy: float, seed: int) -> list[dict]:
  """Train loss decaying to a plateau and eval accuracy rising to `final_accuracy`, per epoch."""
  rng = np.random.default_rng(seed)
  records = []
  for epoch in range(1, EPOCHS + 1):
    for step in range(epoch * STEPS_PER_EPOCH - 50, epoch * STEPS_PER_EPOCH + 1, 50):
      loss = 1.5 * (1 - final_accuracy) + 4.0 * np.exp(-step / 700) + 0.03 * rng.standard_normal()
      records.append({"step": step, "split": "train", "loss": float(loss), "lr": 0.05})
    accuracy = final_accuracy * (1 - np.exp(-epoch / 6)) + 0.005 * rng.standard_normal()
    records.append({"step": epoch * STEPS_PER_EPOCH, "split": "eval", "accuracy": float(accuracy)})
  return records


def write_run(directory, record: dict | None, results: dict, metrics: list[dict]) -> None:
  """A run directory as jaxkd.train leaves it (the files the report reads)."""
  os.makedirs(directory, exist_ok=True)
  if record is not None:
    provenance.write(directory, record)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump({"step": STEPS_PER_EPOCH * EPOCHS, **results}, f)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in metrics)


def cifar_record(method: str, seed: int, pair: str = PAIR, **population) -> dict:
  config = testing_utils.load_config("cifar_kd", f"method={method},{pair}")
  config.seed = seed
  if population:
    config.population = population
  return provenance.collect(config, argv=["python", "-m", "jaxkd.main"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """The fake sweep in sweep.py's layout, ROOT/<pair>/<method>/seed_<s>."""
  root = tmp_path_factory.mktemp("sweep")
  for method, by_seed in RESULTS.items():
    for seed, results in by_seed.items():
      write_run(
        root / "resnet32x4-resnet8x4" / method / f"seed_{seed}",
        cifar_record(method, seed),
        results,
        fake_metrics(results["accuracy"], seed),
      )
  teacher = testing_utils.load_config("cifar_kd", "method=ce,student=resnet32x4")
  write_run(
    root / "teachers" / "resnet32x4",
    provenance.collect(teacher, argv=[]),
    {"accuracy": 0.7950, "best_accuracy": 0.7960, "top5": 0.95},
    fake_metrics(0.7950, 7),
  )
  return root


def _row(table: str, pair: str, method: str) -> list[str]:
  """The cells of the table row of `pair` and `method`."""
  for line in table.splitlines():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if len(cells) > 2 and cells[1] == pair and cells[2] == method:
      return cells
  raise AssertionError(f"no row {pair} {method} in\n{table}")


def _header(table: str) -> list[str]:
  return [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]


def test_reference_figures_and_protocols():
  (kd,) = reference.lookup("cifar100", "resnet32x4", "resnet8x4", "kd")
  assert (kd.top1, kd.source, kd.epoch) == (73.33, "R", "last")
  assert str(kd) == "73.33 [R: last epoch]"
  (dkd,) = reference.lookup("cifar100", "resnet32x4", "resnet8x4", "dkd")
  assert str(dkd) == "76.32 [M: best epoch, mean of 5]"
  (dist,) = reference.lookup("cifar100", "resnet56", "resnet20", "dist")
  assert str(dist) == "71.75 ± 0.30 [D: mean ± std]"
  assert reference.lookup("cifar100", "resnet110", "resnet32", "dist") == ()  # '–' in the table
  (ls,) = reference.lookup("cifar100", "vgg13", "vgg8", "kd_ls")
  assert str(ls) == "74.36 [L: mean of 4]"
  # A model trained alone: the table's "Teacher" or "Student scratch" row, whatever the teacher.
  assert [f.top1 for f in reference.lookup("cifar100", "", "resnet32x4", "ce")] == [79.42]
  assert [f.top1 for f in reference.lookup("cifar100", "resnet32x4", "resnet8x4", "scratch")] == [
    72.50
  ]
  # RepDistiller's `mobile_half` is MobileNetV2.
  (fitnet,) = reference.lookup("cifar100", "ResNet50", "mobile_half", "fitnet")
  assert fitnet.top1 == 63.16
  assert [str(f) for f in reference.lookup("imagenet2012", "resnet34", "resnet18", "kd")] == [
    "71.03 [M: best epoch, mean of 5]",
    "71.21 [D: mean ± std]",
  ]
  assert reference.methods()[:3] == ["scratch", "kd", "fitnet"]


def test_groups_aggregate_seeds(sweep):
  runs = report.load_runs([sweep])
  assert len(runs) == 10
  groups = {g.key.label: g for g in report.group(runs)}
  assert list(groups) == [
    "resnet32x4 scratch",
    "resnet8x4 scratch",
    "resnet32x4 → resnet8x4 kd",
    "resnet32x4 → resnet8x4 dkd",
  ]
  kd = groups["resnet32x4 → resnet8x4 kd"]
  assert [run.seed for run in kd.runs] == [0, 1, 2]
  accuracy = kd.stat("accuracy")
  np.testing.assert_allclose([accuracy.mean, accuracy.std], [0.7330, 0.0020], atol=1e-12)
  dkd_best = groups["resnet32x4 → resnet8x4 dkd"].stat("best_accuracy")
  # (0.7630, 0.7660, 0.7680): mean 0.765667, squared deviations summing to 12.667e-6.
  np.testing.assert_allclose(dkd_best.mean, 2.297 / 3, atol=1e-12)
  np.testing.assert_allclose(dkd_best.std, np.sqrt(38 / 3 * 1e-6 / 2), atol=1e-12)
  single = groups["resnet32x4 scratch"].stat("accuracy")
  assert (single.mean, single.std, single.count) == (0.7950, None, 1)


def test_table_numbers_and_published_column(sweep):
  table = report.markdown_table(report.group(report.load_runs([sweep])))
  assert _header(table) == [
    "dataset",
    "teacher → student",
    "method",
    "runs",
    "top-1, last (%)",
    "top-1, best (%)",
    "published top-1 (%)",
    "Δ published (points)",
    "top-5 (%)",
    "agreement with teacher (%)",
    "KL(teacher ‖ student) (nats)",
  ]
  assert _row(table, "resnet32x4 → resnet8x4", "kd") == [
    "cifar100",
    "resnet32x4 → resnet8x4",
    "kd",
    "3",
    "73.30 ± 0.20",
    "73.60 ± 0.20",
    "73.33 [R: last epoch]",
    "-0.03",  # last epoch: 73.30 − 73.33
    "93.00 ± 0.00",
    "81.00 ± 1.00",
    "0.520 ± 0.020",
  ]
  dkd = _row(table, "resnet32x4 → resnet8x4", "dkd")
  # Sample std of (76.00, 76.40, 76.50) = sqrt(0.07) = 0.2646; best 76.5667 vs mdistiller's best.
  assert dkd[4:8] == ["76.30 ± 0.26", "76.57 ± 0.25", "76.32 [M: best epoch, mean of 5]", "+0.25"]
  scratch = _row(table, "resnet8x4", "scratch")
  assert scratch[3:8] == ["3", "72.50 ± 0.10", "72.80 ± 0.10", "72.50 [R: last epoch]", "+0.00"]
  assert scratch[9:] == ["—", "—"]  # No teacher: no agreement, no KL.
  assert _row(table, "resnet32x4", "scratch")[4:8] == [
    "79.50",
    "79.60",
    "79.42 [R: last epoch]",
    "+0.08",
  ]
  assert (
    "[R] RepDistiller README: last epoch; [M] mdistiller README: best epoch, mean of 5." in table
  )
  assert "published" not in _header(
    report.markdown_table(report.group(report.load_runs([sweep])), None)
  )


def test_gains_paired_by_seed(sweep):
  groups = report.group(report.load_runs([sweep]))
  found = {g.group.key.method: g for g in report.gains(groups)}
  assert set(found) == {"kd", "dkd"}
  kd = found["kd"]
  assert kd.baseline.key.label == "resnet8x4 scratch" and kd.paired
  # Per-seed differences 0.70, 0.90, 0.80 points: mean 0.80, std 0.10.
  np.testing.assert_allclose([kd.stat.mean, kd.stat.std], [0.0080, 0.0010], atol=1e-12)
  np.testing.assert_allclose(kd.published, 73.33 - 72.50)  # Both [R].
  assert found["dkd"].published is None  # DKD [M] and scratch [R] follow different protocols.
  table = report.gains_table(report.gains(groups))
  assert "| +0.80 ± 0.10 (paired by seed, 3 seeds) | +0.83 |" in table
  assert "| +3.80 ± 0.20 (paired by seed, 3 seeds) | — |" in table
  assert "| difference to scratch, top-1 (points) | published gain (points) |" in table


def test_unpaired_gain_without_common_seeds():
  def run(method, seed, accuracy):
    config = {
      "seed": seed,
      "data": {"name": "cifar100"},
      "teacher": {"model": "resnet56"},
      "student": {"model": "resnet20"},
      "distill": {"losses": {"ce": 0.1, "kd": 0.9} if method == "kd" else {"ce": 1.0}},
    }
    return report.Run(f"/{method}/{seed}", config, {"accuracy": accuracy})

  runs = [run("kd", 0, 0.71), run("kd", 1, 0.73), run("scratch", 5, 0.69), run("scratch", 6, 0.70)]
  (gain,) = report.gains(report.group(runs))
  assert not gain.paired
  np.testing.assert_allclose(gain.stat.mean, 0.72 - 0.695)
  np.testing.assert_allclose(
    gain.stat.std, np.hypot(np.std([0.71, 0.73], ddof=1), np.std([0.69, 0.70], ddof=1))
  )


def test_population_members_and_variants(tmp_path):
  # Seeds swept in one population: its members are the seeds of one group.
  population = tmp_path / "resnet56-resnet20" / "kd" / "population"
  seeds = {"size": 2, "sweep": {"seed": (0, 1)}}
  members = {"seed=0": {"accuracy": 0.70}, "seed=1": {"accuracy": 0.71}}
  record = cifar_record("kd", 0, "teacher=resnet56,student=resnet20", **seeds)
  write_run(population, record, {"members": members}, [])
  for name, results in members.items():  # The members' own directories hold no record.
    write_run(population / "members" / name, None, results, fake_metrics(0.7, 0))
  # Temperatures swept: two groups, named by the field that differs.
  temperatures = {"size": 2, "sweep": {"kd": {"temperature": (2.0, 4.0)}}}
  members = {"kd.temperature=2.0": {"accuracy": 0.69}, "kd.temperature=4.0": {"accuracy": 0.705}}
  record = cifar_record("kd", 0, "teacher=resnet110,student=resnet32", **temperatures)
  write_run(tmp_path / "temperatures", record, {"members": members}, [])

  runs = report.load_runs([tmp_path])
  assert [run.member for run in runs] == ["seed=0", "seed=1", *members]
  assert runs[0].metrics and not runs[2].metrics
  groups = report.group(runs)
  assert [(g.key.label, [run.seed for run in g.runs]) for g in groups] == [
    ("resnet110 → resnet32 kd (distill.kd.temperature=2.0)", [0]),
    ("resnet110 → resnet32 kd (distill.kd.temperature=4.0)", [1]),  # Unswept: seed + index.
    ("resnet56 → resnet20 kd", [0, 1]),
  ]
  table = report.markdown_table(groups)
  # Sample std of (70, 71) = 0.71; RepDistiller's resnet56 → resnet20 KD: 70.66.
  row = "| resnet56 → resnet20 | kd | 2 | 70.50 ± 0.71 | 70.66 [R: last epoch] | -0.16 |"
  assert row in table
  # Published figures are for the published recipe, not beside a variant.
  assert "| kd (distill.kd.temperature=4.0) | 1 | 70.50 | — | — |" in table


def test_language_model_columns():
  config = {
    "seed": 0,
    "data": {"name": "tinystories"},
    "teacher": {"model": "lm_base"},
    "student": {"model": "lm_tiny"},
    "distill": {"losses": {"ce": 0.5, "kd": 0.5}},
  }
  runs = [
    report.Run(f"/lm/{seed}", {**config, "seed": seed}, result)
    for seed, result in enumerate(
      [
        {"accuracy": 0.41, "loss": 2.10, "bits_per_byte": 1.010},
        {"accuracy": 0.43, "loss": 2.00, "bits_per_byte": 0.990},
      ]
    )
  ]
  table = report.markdown_table(report.group(runs))
  assert _header(table) == [
    "dataset",
    "teacher → student",
    "method",
    "runs",
    "token accuracy, last (%)",
    "loss (nats/token)",
    "bits per byte",
  ]
  assert _row(table, "lm_base → lm_tiny", "kd")[4:] == [
    "42.00 ± 1.41",
    "2.050 ± 0.071",
    "1.000 ± 0.014",
  ]


def test_language_model_gains_are_in_bits_per_byte(tmp_path):
  """Language models' difference to scratch is in bits per byte, where lower is better, and a
  report mixing images and LMs names the unit in every cell."""

  def run(method, seed, bits_per_byte, accuracy):
    config = {
      "seed": seed,
      "data": {"name": "stdlib"},
      "teacher": {"model": "transformer_lm"},
      "student": {"model": "transformer_lm"},
      "distill": {"losses": {"ce": 0.5, "kd": 0.5} if method == "kd" else {"ce": 1.0}},
    }
    results = {"accuracy": accuracy, "bits_per_byte": bits_per_byte}
    return report.Run(f"/{method}/{seed}", config, results)

  runs = [run("scratch", 0, 3.50, 0.39), run("scratch", 1, 3.60, 0.40)]
  runs += [run("kd", 0, 3.40, 0.40), run("kd", 1, 3.44, 0.40)]
  (gain,) = report.gains(report.group(runs))
  assert gain.metric == "bits_per_byte" and gain.published is None
  np.testing.assert_allclose([gain.stat.mean, gain.stat.std], [-0.13, 0.0424264], atol=1e-6)
  table = report.gains_table([gain])
  assert "| difference to scratch, bits per byte, lower is better |" in table
  assert "| -0.1300 ± 0.0424 (paired by seed, 2 seeds) |" in table
  image = report.Gain(gain.group, gain.baseline, "accuracy", report.stat([0.01, 0.02]), True, None)
  mixed = report.gains_table([gain, image])
  assert "| -0.1300 ± 0.0424 bits per byte, lower is better (paired by seed, 2 seeds) |" in mixed
  assert "| +1.50 ± 0.71 top-1 (points) (paired by seed, 2 seeds) |" in mixed
  assert report.plot_gains(report.group(runs), tmp_path / "gains.png")
  _assert_png(tmp_path / "gains.png")


def _assert_png(path):
  from PIL import Image

  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    width, height = image.size
    assert width > 600 and height > 400
    # Not a blank canvas: the plot draws in several colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_plots_are_png_images(sweep, tmp_path):
  runs = report.load_runs([sweep])
  report.plot_curves(runs, tmp_path / "curves.png")
  assert report.plot_gains(report.group(runs), tmp_path / "gains.png")
  _assert_png(tmp_path / "curves.png")
  _assert_png(tmp_path / "gains.png")
  scratch_only = [run for run in runs if run.config["distill"]["losses"] == {"ce": 1.0}]
  assert not report.plot_gains(report.group(scratch_only), tmp_path / "none.png")
  assert not (tmp_path / "none.png").exists()


def test_command_line(sweep, tmp_path, capsys):
  assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
  printed = capsys.readouterr().out
  row = "| cifar100 | resnet32x4 → resnet8x4 | kd | 3 | 73.30 ± 0.20 | 73.60 ± 0.20 |"
  assert row in printed
  assert "## Difference to training from scratch" in printed
  assert sorted(os.listdir(tmp_path / "out")) == ["curves.png", "gains.png", "report.md"]
  assert "![gain over scratch](gains.png)" in (tmp_path / "out" / "report.md").read_text()

  assert report.main([str(tmp_path / "out")]) == 1
  assert "error: no runs under" in capsys.readouterr().err


def test_module_entry_point(sweep):
  printed = subprocess.run(
    [sys.executable, "-m", "jaxkd.report", str(sweep / "resnet32x4-resnet8x4" / "kd")],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "| cifar100 | resnet32x4 → resnet8x4 | kd | 3 | 73.30 ± 0.20 |" in printed
