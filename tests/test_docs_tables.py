"""docs/engine.md's table of loss terms is the registry's (`python -m jaxkd.tools.loss_table`)."""

import os

from jaxkd import distill
from jaxkd.tools import loss_table

import testing_utils


def test_engine_docs_table_is_generated_from_the_registry():
  with open(os.path.join(testing_utils.REPO, "docs", "engine.md")) as f:
    text = f.read()
  assert loss_table.replace_table(text, loss_table.markdown()) == text, (
    "docs/engine.md is stale: run `python -m jaxkd.tools.loss_table --write docs/engine.md`"
  )


def test_every_registered_setting_is_in_the_table():
  table = loss_table.markdown()
  for row in distill.describe():
    line = next(line for line in table.splitlines() if line.startswith(f"| `{row['name']}` |"))
    for name in (*row["hparams"], *row["options"]):
      assert f"{name} " in line, (row["name"], name)
