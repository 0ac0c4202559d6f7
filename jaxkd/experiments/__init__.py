"""Experiments: programs that compose training runs (`jaxkd.train.train_and_evaluate`).

A config names its experiment in `config.experiment`; '' is a single training run.
"""

from jaxkd.experiments import compare

# config.experiment → run(config, workdir) -> summary.
EXPERIMENTS = {"compare": compare.run}
