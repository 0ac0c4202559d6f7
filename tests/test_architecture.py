"""Imports run one way: errors and state at the bottom, then teachers, the step, populations, the
plan, the trainer, experiments and `main` on top; no cycles, no function-local imports of jaxkd
modules to dodge one. Read from the source, not from a run."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxkd"

# Each module (or package) may import only modules of a strictly lower layer, or its own package.
LAYERS = [
  {"errors"},
  {"losses", "xla_flags", "parallel", "cli", "preemption"},
  {"state", "tasks", "checkpoint"},
  {"configlib", "optim", "data", "models", "metrics", "reference"},
  {"distill"},
  {"teachers"},
  {"step"},
  {"population", "sampling"},
  {"plan", "provenance"},
  {"train", "report", "evaluate"},
  {"experiments", "tools"},
  {"main"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(relative.parts).removesuffix(".__init__")
    yield name, ast.parse(path.read_text())


def _jaxkd_imports(node, module: str) -> set[str]:
  """The jaxkd modules an import node names (``from jaxkd import a, b`` names jaxkd.a, jaxkd.b)."""
  if isinstance(node, ast.Import):
    return {alias.name for alias in node.names if alias.name.startswith("jaxkd")}
  if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxkd"):
    if node.module == "jaxkd":
      return {f"jaxkd.{alias.name}" for alias in node.names}
    return {node.module}
  return set()


def _top(module: str) -> str:
  """The layer unit of a module: `jaxkd.distill.logit` → 'distill'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
  missing = {_top(name) for name, _ in _modules()} - set(RANK) - {""}
  assert not missing, f"add {sorted(missing)} to LAYERS"


@pytest.mark.parametrize("name, tree", list(_modules()), ids=lambda value: str(value)[:40])
def test_imports_go_down_the_layers(name, tree):
  unit = _top(name)
  for node in tree.body:
    for imported in _jaxkd_imports(node, name):
      target = _top(imported)
      if target in ("", unit):
        continue
      assert RANK[target] < RANK[unit], f"{name} imports {imported}: {target} is not below {unit}"


@pytest.mark.parametrize("name, tree", list(_modules()), ids=lambda value: str(value)[:40])
def test_no_function_local_jaxkd_imports(name, tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for inner in ast.walk(node):
        assert not _jaxkd_imports(inner, name), f"{name}.{node.name} imports jaxkd inside"
