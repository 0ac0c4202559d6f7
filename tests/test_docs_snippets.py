"""The python blocks of docs/losses.md marked `<!-- runnable -->` run as written, so the docs can't rot.

A runnable block is a fenced ```python block on the line right after the marker. Each runs in a fresh
namespace; a traceback points at its line in the markdown file.
"""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "losses.md"
MARKER = "<!-- runnable -->"
_BLOCK = re.compile(re.escape(MARKER) + r"\n```python\n(.*?)\n```", re.DOTALL)


def runnable_blocks(text: str) -> list[tuple[int, str]]:
  """(first code line, code) of every block following the marker."""
  return [
    (text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in _BLOCK.finditer(text)
  ]


BLOCKS = runnable_blocks(DOC.read_text())


def test_every_marker_has_a_block():
  markers = [line for line in DOC.read_text().splitlines() if line.strip() == MARKER]
  assert len(markers) == len(BLOCKS) >= 3


def test_marker_parsing():
  text = (
    f"x\n{MARKER}\n```python\na = 1\n```\n```python\nnot marked\n```\n{MARKER}\n```python\nb\n```"
  )
  assert runnable_blocks(text) == [(4, "a = 1"), (11, "b")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"losses.md:{line}" for line, _ in BLOCKS])
def test_snippet_runs(line, code):
  # Pad with newlines so the compiled code's line numbers are the markdown file's.
  exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), {"__name__": "docs_snippet"})
