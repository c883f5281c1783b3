"""Training a policy by RE-PO: generalised EM per optimizer step (see :mod:`repo.train.trainer`).

* :class:`Trainer` - the loop, checkpoints, several processes;
* :func:`build_run` - the components of a run built from its configuration (records,
  policy and reference, tokeniser, likelihood, noise model; :mod:`repo.train.build`);
* :class:`RunDir` - the run directory: every file a run writes, and reading it back;
* :class:`TrainConfig`, :func:`load_config`, :func:`describe_config` - the TOML configuration;
* :class:`OnlineEM` - E-steps per micro-batch, the damped annotator M-step per step
  (reusable inside another trainer, e.g. TRL's; see ``examples/``);
* :func:`policy_objective` - the policy step's loss (marginal likelihood or weighted);
* :class:`TrainingData`, :class:`BatchSchedule` - units, items and the batch order;
* :func:`save_checkpoint`, :func:`load_checkpoint` - safetensors + JSON, atomic;
* :func:`evaluate_run`, :func:`export_run` - ``re-po eval`` and ``re-po export``.
"""

from repo.inference.online import EStep, OnlineEM
from repo.train.build import RunParts, build_run, load_records
from repo.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from repo.train.config import ConfigError, TrainConfig, describe_config, load_config
from repo.train.dataset import BatchSchedule, TrainingData
from repo.train.evaluate import evaluate_policy, evaluate_run
from repo.train.export import export_run
from repo.train.objective import marginal_nll, plain_loss, policy_objective
from repo.train.run_dir import RunDir
from repo.train.trainer import Trainer

__all__ = [
    "BatchSchedule",
    "CheckpointError",
    "ConfigError",
    "EStep",
    "OnlineEM",
    "RunDir",
    "RunParts",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "build_run",
    "describe_config",
    "evaluate_policy",
    "evaluate_run",
    "export_run",
    "load_checkpoint",
    "load_config",
    "load_records",
    "marginal_nll",
    "plain_loss",
    "policy_objective",
    "save_checkpoint",
]
