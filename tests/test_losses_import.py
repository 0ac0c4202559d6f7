"""`jaxkd.losses` stays importable with jax, numpy and optax only.

Checked in a fresh interpreter, over the whole package (every losses module is imported by
`jaxkd/losses/__init__.py`), so a heavy import added to any of them fails here.
"""

import subprocess
import sys

HEAVY_MODULES = ("flax", "tensorflow", "tensorflow_datasets", "orbax", "grain", "torch")

_CHECK = f"""
import pkgutil, sys
import jaxkd.losses
for module in pkgutil.iter_modules(jaxkd.losses.__path__):
  __import__('jaxkd.losses.' + module.name)
heavy = sorted(name for name in sys.modules
               if name.split('.')[0] in {HEAVY_MODULES!r})
print(','.join(heavy))
"""


def test_losses_import_without_heavy_dependencies():
  result = subprocess.run(
    [sys.executable, "-c", _CHECK], capture_output=True, text=True, check=False, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "", f"jaxkd.losses imported: {result.stdout.strip()}"
