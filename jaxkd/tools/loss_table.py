"""The table of registered loss terms in docs/engine.md, generated from the registry.

    python -m jaxkd.tools.loss_table                      # print the table
    python -m jaxkd.tools.loss_table --write docs/engine.md

`--write` replaces the lines between the markers `<!-- loss-table -->` and
`<!-- /loss-table -->`; tests/test_docs_tables.py checks that the committed table is this one.
"""

import argparse
import sys

from jaxkd import distill

BEGIN, END = "<!-- loss-table -->", "<!-- /loss-table -->"


def _settings(values: dict) -> str:
  return ", ".join(f"{name} {value!r}" for name, value in values.items()) or "—"


def markdown() -> str:
  """One row per registered term: what it reads, its traced hparams and static options."""
  lines = [
    "| loss | reads | hparams (traced, default) | options (static, default) |",
    "|---|---|---|---|",
  ]
  for row in distill.describe():
    reads = ["teacher" if row["teacher"] else "labels"]
    if row["adapter"]:
      reads.append("adapter")
    if row["state"]:
      reads.append("state")
    lines.append(
      f"| `{row['name']}` | {', '.join(reads)} | {_settings(row['hparams'])} | "
      f"{_settings(row['options'])} |"
    )
  return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
  """`text` with the lines between the markers replaced by `table`."""
  head, marker, rest = text.partition(BEGIN)
  _, end_marker, tail = rest.partition(END)
  if not marker or not end_marker:
    raise ValueError(f"the markers {BEGIN} and {END} are missing")
  return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", metavar="MARKDOWN_FILE", help="replace the table in this file")
  args = parser.parse_args(argv)
  table = markdown()
  if not args.write:
    print(table)
    return 0
  with open(args.write) as f:
    text = f.read()
  with open(args.write, "w") as f:
    f.write(replace_table(text, table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
