"""What produced a run: its resolved config, software versions, source commit, devices and command.

A run's `<workdir>/provenance.json` answers "what exactly did this run run?" long after it ran,
and lets a resumed run say what changed since it started (`differences`):

    {"config": {...},            the resolved config, as JSON
     "config_py": "...",         the same config as a config file (tuples stay tuples)
     "method": "kd",             config.method, or a label derived from config.distill.losses
     "versions": {"python": ..., "jax": ..., "jaxlib": ..., "flax": ..., "optax": ...,
                  "orbax-checkpoint": ..., "numpy": ..., "jaxkd": ...},
     "git": {"commit": ..., "dirty": ..., "diff": ...} or null,
     "devices": {"platform": "tpu", "kind": "TPU v4", "count": 8, "local_count": 4,
                 "process_count": 2},
     "hostname": ..., "command": [argv...], "time": "2025-01-31T12:00:00+00:00",
     "members": {name: {config field: value}},   only for a population (config.population)
     "history": [earlier records]}               the record of every earlier start, oldest first

`write` also puts the config beside it as `<workdir>/config.py`, so that
`python -m jaxkd.main --config=<workdir>/config.py --workdir=NEW` reruns the run.

The git state is that of the jaxkd source tree when jaxkd runs from a checkout (`pip install -e`);
where the tree was copied without `.git` (launch/tpu_vm.sh sync), the launcher leaves the
checkout's state in `<tree>/.jaxkd_source.json`; otherwise (an installed wheel, no git) it is
null. Only `collect` asks JAX for its devices: reading and comparing records starts no backend.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import pprint
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from etils import epath

from jaxkd import population

FILENAME = "provenance.json"
CONFIG_FILENAME = "config.py"
# Written by launch/tpu_vm.sh into the copied tree: {"commit": ..., "dirty": ..., "diff": ...}.
SOURCE_FILENAME = ".jaxkd_source.json"
# Versions that change what a run computes; the backend plugins only where installed.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "jaxkd")
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
# configs/cifar_kd.py's method names for the losses whose registry name differs from it.
_LOSS_METHODS = {
  "attention_transfer": "at",
  "similarity_preserving": "sp",
  "correlation_congruence": "cc",
  "review_kd": "reviewkd",
}
_GIT_TIMEOUT_S = 10


def _json_safe(value: Any) -> Any:
  """`value` as JSON reads it back: tuples become lists, numpy scalars Python numbers."""
  return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def _config_dict(config: Any) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def config_file(config: Any) -> str:
  """A config file (`get_config()`) that rebuilds `config`, its tuples included."""
  body = pprint.pformat(_config_dict(config), indent=1, width=96, sort_dicts=False)
  return (
    '"""The config of the run recorded in provenance.json: pass it as --config to rerun it."""\n'
    "\nimport ml_collections\n\n\ndef get_config(arg=None):\n  del arg\n"
    f"  return ml_collections.ConfigDict(\n{_indent(body, '    ')}\n  )\n"
  )


def _indent(text: str, prefix: str) -> str:
  return "\n".join(prefix + line for line in text.splitlines())


def method_label(config: Mapping[str, Any]) -> str:
  """`config['method']`, or else the teacher terms of `config['distill']['losses']`.

  The derived label joins, sorted, the names of the losses other than 'ce' with a non-zero
  weight (in configs/cifar_kd.py's spelling: 'at' for attention_transfer, ...; '_ls' appended
  where the term z-scores the logits, `standardize`), and is 'scratch' for cross-entropy alone.
  """
  if config.get("method"):
    return str(config["method"])
  distill = config.get("distill") or {}
  terms = []
  for name, weight in (distill.get("losses") or {}).items():
    if name == "ce" or not weight:
      continue
    settings = distill.get(name) or {}
    terms.append(_LOSS_METHODS.get(name, name) + ("_ls" if settings.get("standardize") else ""))
  return "+".join(sorted(terms)) or "scratch"


def _run_git(root: str, *args: str) -> bytes:
  return subprocess.run(
    ["git", "-C", root, *args], capture_output=True, check=True, timeout=_GIT_TIMEOUT_S
  ).stdout


def git_state(root: str) -> dict | None:
  """`{'commit', 'dirty', 'diff'}` of the checkout whose top level is `root`, else None.

  `dirty`: tracked changes or untracked files (`git status --porcelain`); `diff`: the first 12
  hex digits of the SHA-256 of `git diff HEAD` (tells two dirty trees apart; None when clean).
  A tree copied without `.git` reads `root/.jaxkd_source.json` instead. Never raises: no git,
  no checkout, or `root` inside another project's checkout all give None.
  """
  try:
    toplevel = _run_git(root, "rev-parse", "--show-toplevel").decode().strip()
    # An installed jaxkd inside a virtualenv that lives in some other repository is not a checkout.
    if os.path.realpath(toplevel) != os.path.realpath(root):
      raise ValueError(toplevel)
    commit = _run_git(root, "rev-parse", "HEAD").decode().strip()
    dirty = bool(_run_git(root, "status", "--porcelain").strip())
    diff = _run_git(root, "diff", "HEAD") if dirty else b""
  except (OSError, subprocess.SubprocessError, ValueError):
    source = os.path.join(root, SOURCE_FILENAME)
    if not os.path.isfile(source):
      return None
    with open(source) as f:
      return json.load(f)
  return {
    "commit": commit,
    "dirty": dirty,
    "diff": hashlib.sha256(diff).hexdigest()[:12] if dirty else None,
  }


def source_root() -> str:
  """The directory holding the `jaxkd` package: the checkout's top level for `pip install -e`."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions() -> dict[str, str | None]:
  """Python's and `PACKAGES`' versions (None where not installed), and installed `PLUGINS`'."""
  found = {"python": platform.python_version()}
  for package in PACKAGES + PLUGINS:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      if package in PACKAGES:
        found[package] = None
  return found


def devices() -> dict:
  """Platform, kind and count of the devices of every process (initialises JAX's backend)."""
  return {
    "platform": jax.devices()[0].platform,
    "kind": jax.devices()[0].device_kind,
    "count": jax.device_count(),
    "local_count": jax.local_device_count(),
    "process_count": jax.process_count(),
  }


def _members(config: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
  """Each population member's config fields that differ from `config`, by member name: its
  `seed` (jaxkd.population.member_seeds), its sweep values as `distill.<loss>.<hparam>` and
  `distill.losses.<loss>`, and 'learning_rate_scale' as the peak `optimizer.lr` it trains with.
  None for a single student."""
  members = population.parse(config.get("population") or {"size": 1})
  if members is None:
    return None
  fields = {}
  seeds = population.member_seeds(members, config["seed"])
  for name, overrides, seed in zip(members.names, members.overrides, seeds):
    fields[name] = {"seed": seed}
    for key, value in overrides.items():
      if key == population.LEARNING_RATE_SCALE_KEY:
        fields[name]["optimizer.lr"] = config["optimizer"]["lr"] * value
      elif key != population.SEED_KEY:
        fields[name][f"distill.{key}"] = value
  return _json_safe(fields)


def collect(config: Any, argv: Sequence[str] | None = None) -> dict:
  """The provenance record of a run of `config` started by `argv` (default `sys.argv`).

  Call it after `jaxkd.parallel.maybe_initialize_distributed`: it asks JAX for the devices.
  """
  config_dict = _config_dict(config)
  record = {
    "config": _json_safe(config_dict),
    "config_py": config_file(config),
    "method": method_label(config_dict),
    "versions": versions(),
    "git": git_state(source_root()),
    "devices": devices(),
    "hostname": socket.gethostname(),
    "command": list(sys.argv if argv is None else argv),
    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  members = _members(config_dict)
  if members is not None:
    record["members"] = members
  return record


def member_record(record: Mapping[str, Any], name: str) -> dict:
  """The record of population member `name`: its sweep values set in the config, which then
  describes a population of one; `member` names it. Its `config_py` is dropped (the member is
  rerun through the population's config)."""
  member = copy.deepcopy(dict(record))
  for field, value in member.pop("members")[name].items():
    *parents, leaf = field.split(".")
    node = member["config"]
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  member["config"]["population"] = {"size": 1, "sweep": {}}
  member["method"] = method_label(member["config"])
  member["member"] = name
  member.pop("config_py", None)
  return member


def read(workdir: str | os.PathLike) -> dict | None:
  """The record in `workdir`, None if it has none."""
  path = epath.Path(workdir) / FILENAME
  return json.loads(path.read_text()) if path.exists() else None


def write(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Writes `record` to `<workdir>/provenance.json` (and its config to `config.py`).

  A record already there (the run's earlier start) moves into `history`. Local paths and
  `gs://` alike (`etils.epath`); call it from one process.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = dict(record)
  previous = read(workdir)
  if previous is not None:
    history = previous.pop("history", [])
    record["history"] = [*history, previous]
  (workdir / FILENAME).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
  if "config_py" in record:
    (workdir / CONFIG_FILENAME).write_text(record["config_py"])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{'a': {'b': 1}}` → `{'a.b': 1}`; an empty mapping keeps its key, as `{}`."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _show(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False)


def _show_git(git: Mapping[str, Any] | None) -> str:
  if not git:
    return "(no git checkout)"
  dirty = f" (dirty {git['diff']})" if git.get("diff") else " (dirty)" if git.get("dirty") else ""
  return f"{str(git.get('commit'))[:12]}{dirty}"


def _show_devices(devices: Mapping[str, Any] | None) -> str:
  if not devices:
    return "(unknown)"
  return f"{devices['count']}× {devices['kind']} ({devices['process_count']} processes)"


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """What changed from record `saved` to `current`, one line each, for a resumed run's message:

      config.optimizer.lr: 0.05 → 0.1
      jax 0.10.2 → 0.11.0
      git 0f3c2a1b9d4e → 6e1d0c3b2a19 (dirty 5a1c9e0b7d32)
      devices 8× TPU v4 (2 processes) → 16× TPU v4 (4 processes)

  Config fields first (in name order; '(absent)' for a field only one side has), then versions,
  the source tree and the devices. Time, host and command always differ and are left out.
  """
  lines = []
  saved_config, current_config = flatten(saved["config"]), flatten(current["config"])
  for field in sorted(saved_config.keys() | current_config.keys()):
    before = _show(saved_config[field]) if field in saved_config else "(absent)"
    after = _show(current_config[field]) if field in current_config else "(absent)"
    if before != after:
      lines.append(f"config.{field}: {before} → {after}")
  saved_versions, current_versions = saved.get("versions", {}), current.get("versions", {})
  for package in [*saved_versions, *(p for p in current_versions if p not in saved_versions)]:
    before, after = saved_versions.get(package), current_versions.get(package)
    if before != after:
      lines.append(f"{package} {before or '(not installed)'} → {after or '(not installed)'}")
  if _show_git(saved.get("git")) != _show_git(current.get("git")):
    lines.append(f"git {_show_git(saved.get('git'))} → {_show_git(current.get('git'))}")
  if _show_devices(saved.get("devices")) != _show_devices(current.get("devices")):
    lines.append(
      f"devices {_show_devices(saved.get('devices'))} → {_show_devices(current.get('devices'))}"
    )
  return lines


def hparams(record: Mapping[str, Any]) -> dict[str, float | int | str | bool]:
  """The config as flat TensorBoard hparams: `{'optimizer.lr': 0.05, ..., 'method': 'kd'}`.

  Scalars stay as they are; lists, empty mappings and None become their JSON text.
  """
  flat = {
    field: value if isinstance(value, (bool, int, float, str)) else _show(value)
    for field, value in flatten(record["config"]).items()
  }
  flat["method"] = record.get("method") or method_label(record["config"])
  return flat
