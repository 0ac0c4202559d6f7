"""jaxkd's XLA:CPU options (`jaxkd.xla_flags`) against XLA's defaults, side by side.

XLA reads its flags once per process, so each setting runs `benchmarks/kd_step.py` in its own
process; the two settings alternate (default, jaxkd, default, jaxkd, ...) so that load changes
on a shared machine hit both alike. Each kd_step run also times the PyTorch step, so every
repeat gives a JAX / PyTorch ratio under each setting. Figures: median over repeats.

  python benchmarks/xla_cpu_flags.py                               # resnet56 → resnet20
  python benchmarks/xla_cpu_flags.py --pairs resnet32x4:resnet8x4 --repeats 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {'xla_defaults': {'JAXKD_XLA_DEFAULTS': '1'}, 'jaxkd_flags': {}}
VARIANTS = ('student_only', 'kd', 'teacher_fwd', 'cached', 'torch_kd')


def _kd_step_run(pair: str, environ_update: dict[str, str], args) -> dict:
  with tempfile.NamedTemporaryFile(suffix='.json') as output:
    environ = {**os.environ, **environ_update}
    if not environ_update:
      environ.pop('JAXKD_XLA_DEFAULTS', None)
    command = [sys.executable, os.path.join(HERE, 'kd_step.py'), '--pairs', pair,
               '--population-pairs', '', '--rounds', str(args.rounds), '--steps',
               str(args.steps), '--json', output.name]
    subprocess.run(command, env=environ, check=True, stdout=subprocess.DEVNULL)
    with open(output.name) as f:
      results = json.load(f)
  return {'xla_flags': results['xla_flags'], **results['pairs'][0]['times_s']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', default='resnet56:resnet20')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=2)
  args = parser.parse_args()
  print('load', os.getloadavg())
  for pair in args.pairs.split(','):
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
      for name, environ_update in SETTINGS.items():
        runs[name].append(_kd_step_run(pair, environ_update, args))
    medians = {name: {v: statistics.median(run[v] for run in runs[name]) for v in VARIANTS}
               for name in SETTINGS}
    print(pair, {name: runs[name][0]['xla_flags'] for name in SETTINGS})
    for name, times in medians.items():
      print(f'  {name:13s}', {v: round(t, 4) for v, t in times.items()},
            'jax/torch KD', round(times['kd'] / times['torch_kd'], 2))
    print('  jaxkd_flags / xla_defaults',
          {v: round(medians['jaxkd_flags'][v] / medians['xla_defaults'][v], 2)
           for v in VARIANTS if not v.startswith('torch')})
  print('load', os.getloadavg())


if __name__ == '__main__':
  main()
