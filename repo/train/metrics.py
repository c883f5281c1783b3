"""What a run writes as it goes: metrics, the annotator trajectory, and summaries.

Files in the run directory (one JSON object a line, appended and flushed each
logged step; a resumed run first drops the lines after its checkpoint's step):

* ``metrics.jsonl``: ``step``, ``epoch``, ``loss`` (the policy step's loss), TRL's
  ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (``chosen`` is what
  each label chose), ``learning_rate``, ``grad_norm``, and for RE-PO
  ``marginal_nll`` (``-log p(o)`` per unit at the E-step), ``w/mean``,
  ``w/frac_below_0.5`` (labels more likely wrong than right) and a
  ``<param>/min|mean|max`` summary of every annotator parameter (``eta/...`` for the
  flip models);
* ``annotators.jsonl``: ``step`` and every annotator parameter as a list in the
  order of ``annotators.json`` (the per-annotator trajectory).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repo.likelihoods.stats import PairLogps
from repo.train.objective import plain_loss, posterior_loss

__all__ = ["JsonlLog", "MetricSums", "ProgressBar", "add_micro_metrics", "parameter_summary"]


class JsonlLog:
    """An append-only JSON-lines file keyed by ``step``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only the lines with ``step <= step`` (a resumed run rewrites the rest)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x]


class MetricSums:
    """Sums over an optimizer step's micro-batches, reduced over processes in one call.

    ``add(name, total, count)`` accumulates a sum and its count; :meth:`means`
    all-reduces every pair at once and returns ``total / count`` per name.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: Tensor | float, count: Tensor | float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def means(self, reduce=None) -> dict[str, float]:
        names = sorted(self.totals)
        flat = torch.tensor(
            [self.totals[n] for n in names] + [self.counts[n] for n in names], dtype=torch.float64
        )
        if reduce is not None:
            flat = reduce(flat)
        k = len(names)
        return {
            n: float(flat[i] / flat[k + i]) if flat[k + i] > 0 else math.nan
            for i, n in enumerate(names)
        }


def parameter_summary(parameters: dict[str, Tensor]) -> dict[str, float]:
    """``<name>/min``, ``<name>/mean``, ``<name>/max`` of every annotator parameter."""
    out = {}
    for name, value in parameters.items():
        v = value.detach().double().reshape(-1)
        out[f"{name}/min"] = float(v.min())
        out[f"{name}/mean"] = float(v.mean())
        out[f"{name}/max"] = float(v.max())
    return out


@torch.no_grad()
def add_micro_metrics(
    sums: MetricSums,
    likelihood,
    variant: str,
    stats,
    labels,
    estep=None,
    *,
    marginal: bool = True,
) -> None:
    """Add a micro-batch's metrics to ``sums``: the policy step's loss, TRL's reward
    metrics per label, and with an E-step (``estep``) ``w/mean``, ``w/frac_below_0.5``
    and, when ``marginal``, the marginal NLL per unit.

    :param stats: the micro-batch's :class:`~repo.likelihoods.PairLogps`, per unit.
    :param labels: the micro-batch's :class:`~repo.noise.LabelData`.
    """
    stats = _detached(stats)
    if estep is not None and not estep.held_back:
        value = posterior_loss(likelihood, stats, labels, estep, variant)
        units = labels.num_units
    else:
        value = plain_loss(likelihood, stats, labels)
        units = labels.num_labels if labels.shared_truth else labels.num_units
    sums.add("loss", value, units)
    reward_a, reward_b = (r.cpu().double() for r in likelihood.rewards(stats))
    logp_a, logp_b = stats.policy_a.cpu().double(), stats.policy_b.cpu().double()
    chose_a = labels.label > 0.5
    mask = labels.mask
    n = labels.num_labels

    def chosen_rejected(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a, b = a.unsqueeze(-1).expand_as(chose_a), b.unsqueeze(-1).expand_as(chose_a)
        return torch.where(chose_a, a, b)[mask], torch.where(chose_a, b, a)[mask]

    rc, rr = chosen_rejected(reward_a, reward_b)
    lc, lr = chosen_rejected(logp_a, logp_b)
    sums.add("rewards/chosen", rc.sum(), n)
    sums.add("rewards/rejected", rr.sum(), n)
    sums.add("rewards/margins", (rc - rr).sum(), n)
    sums.add("rewards/accuracies", (rc > rr).double().sum(), n)
    sums.add("logps/chosen", lc.sum(), n)
    sums.add("logps/rejected", lr.sum(), n)
    if estep is not None:
        w = estep.w[mask]
        sums.add("w/mean", w.sum(), n)
        sums.add("w/frac_below_0.5", (w < 0.5).double().sum(), n)
        if marginal:
            sums.add("marginal_nll", -estep.log_likelihood.sum(), labels.num_units)


def _detached(stats: PairLogps) -> PairLogps:
    def d(t):
        return None if t is None else t.detach()

    return PairLogps(
        d(stats.policy_a),
        d(stats.policy_b),
        d(stats.length_a),
        d(stats.length_b),
        d(stats.reference_a),
        d(stats.reference_b),
    )


class ProgressBar:
    """A ``tqdm`` bar on stderr over optimizer steps, showing the loss, the mean ``w``
    and the range of the first annotator parameter."""

    def __init__(self, total: int, initial: int, description: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=description, file=sys.stderr, dynamic_ncols=True
        )

    def update(self, metrics: dict[str, float], parameters: dict[str, Tensor]) -> None:
        """One step done, with its ``metrics`` and the annotator ``parameters`` after it."""
        shown = {"loss": f"{metrics['loss']:.4f}"}
        if "w/mean" in metrics:
            shown["w"] = f"{metrics['w/mean']:.3f}"
        if parameters:
            name, value = next(iter(parameters.items()))
            shown[name] = f"{float(value.min()):.3f}-{float(value.max()):.3f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
