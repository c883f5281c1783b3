r"""Cross-fitted scores for the E-step (``[em] cross_fit``).

A policy that trains on a label fits it, flipped or not, and an E-step that reads that
policy's logits then finds the label plausible; with a policy step that follows the
posterior it can also train the policy on its own beliefs (``docs/math.md`` sections 5
and 8). Cross-fitting breaks the loop. The items are split at random (from ``[run]
seed``) into :math:`K` folds :math:`F_0, \dots, F_{K-1}` (``[em] cross_fit_folds``; by
default four in a run of one pass, over several two or four as the scorers' loss says,
:func:`~repo.train.build.auto_cross_fit_folds`); the scorer :math:`s_k` of fold
:math:`k` is trained on the labels of the items outside it by a plain loss (the run's
configuration with ``[em] enabled = false``: same model, recipe, LoRA or full
fine-tuning, passes; the loss the family's own, or the family
:meth:`~repo.likelihoods.base.PreferenceLikelihood.cross_fit_scorer` names: DPO for
CPO with its SFT term, IPO for DPO over several passes), and each item is scored by its
fold's scorer:

.. math::

    c_i = s_k(i), \qquad i \in F_k,

the scorer's induced logit under a policy that never saw item :math:`i`. The
annotator parameters and a Platt scale :math:`a` are fitted to the labels by EM on
:math:`c` (:meth:`~repo.inference.online.OnlineEM.fit_cross_fitted`), and the E-step of
every optimizer step of the run reads :math:`a\,c_i` instead of the policy's logit:
the posterior :math:`w` each label gets is fixed before the policy trains, and no step
can move it.

Each scorer is a run of its own under ``<output_dir>/cross-fit/scorer-K/``
(checkpoints and final policy, resumed like any run), trained and scored before the
policy's first step (:meth:`repo.train.trainer.Trainer.cross_fit`, from the pieces
here). The cost is :math:`K - 1` more runs' compute over the data (each scorer makes
the run's passes over a share :math:`1 - 1/K` of the items); more folds give scorers
trained on more of the labels, nearer the policy the run trains. The scores of every
item are kept in the online EM's state (``cross_fit.logits``), so a resumed run does
not score again.
"""

from __future__ import annotations

import dataclasses
import gc
import math

import torch
from torch import Tensor

from repo.data.records import PreferenceData
from repo.likelihoods import PreferenceLikelihood
from repo.policy import ReferenceLogps
from repo.train.build import build_reference_cache, build_trained_policy
from repo.train.config import LossSection, TrainConfig
from repo.train.dataset import TrainingData
from repo.train.evaluate import item_scores
from repo.train.run_dir import RunDir

__all__ = ["fold_config", "fold_scores", "item_folds", "scorer_records"]


def item_folds(num_items: int, seed: int, folds: int) -> Tensor:
    """``(I,)`` the fold of every item: a random permutation drawn from ``seed`` alone,
    dealt round the ``folds`` folds (their sizes differ by at most one)."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(num_items, dtype=torch.long)
    fold[order] = torch.arange(num_items) % folds
    return fold


def scorer_records(data: TrainingData, fold: Tensor, k: int) -> PreferenceData:
    """The records fold ``k``'s scorer trains on: those of the items outside fold ``k``
    (``fold``: :func:`item_folds` over ``data``'s items), in their order in
    ``data.records``."""
    keep = {data.item_ids[i] for i in (fold != k).nonzero().reshape(-1).tolist()}
    return PreferenceData([r for r in data.records if r.item in keep])


def fold_config(
    config: TrainConfig, k: int, total_steps: int, share: float, scorer: str = ""
) -> TrainConfig:
    """The configuration of fold ``k``'s scorer: the run's, with EM off (the plain loss),
    no evaluation or trackers, its own run directory (:meth:`RunDir.cross_fit_scorer`)
    and the run's reference cache; as many passes over its items as the run makes over
    all of them (``[optim] max_steps``, when set, scaled by the ``share`` of the units
    it trains on: ``total_steps`` the run's). ``scorer``: the loss family it trains with, at
    that family's defaults (``[loss]`` afresh), when it is not the run's (``""``: the
    run's ``[loss]``)."""
    out = RunDir(config.output_dir).cross_fit_scorer(k)
    cache = build_reference_cache(config).directory
    new = config.replace("run", output_dir=str(out), report_to=(), eval_steps=0)
    new = new.replace("em", enabled=False)
    if scorer and scorer != config.loss.family.strip().lower():
        new = new.replace("loss", **dataclasses.asdict(LossSection(family=scorer)))
    new = new.replace("data", eval="")
    new = new.replace("model", reference_cache_dir=str(cache))
    if config.optim.max_steps:
        new = new.replace("optim", max_steps=max(1, math.ceil(total_steps * share)))
    return new


def fold_scores(
    config: TrainConfig,
    run: RunDir,
    likelihood: PreferenceLikelihood,
    data: TrainingData,
    items: list[int],
    reference: ReferenceLogps | None,
    device: torch.device,
) -> Tensor:
    """``(len(items),)`` the induced logits (``likelihood``'s: the scorer's loss family)
    of ``items`` of ``data`` under the final policy of the scorer's run ``run``
    (``config``: its configuration, :func:`fold_config`), float64 on the CPU
    (:func:`~repo.train.evaluate.item_scores`). ``reference``: the run's reference
    log-probs of ``data`` (``None``: the scorer's own reference runs, as for a scorer
    that needs one in a run that has none). Every process scores all of them (the same
    numbers everywhere); the scorer is freed after."""
    policy = build_trained_policy(config, run, device)
    batch = config.optim.batch_size
    logits = item_scores(
        policy, likelihood, data, batch_size=batch, reference=reference, items=items
    )[0]
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits
