"""Labels through per-annotator channels: the likelihood of the flip models.

When a label's law depends only on its annotator and the latent truth (symmetric,
two-coin and hierarchical flip: Dawid-Skene's confusion matrices for two classes),
the label logits form a table of ``V x K`` numbers,
``logits[v, k] = logit p(o = 1 | z = v, annotator k)``, and the labels of truth
unit ``i`` are::

    o_is | z_i ~ Bernoulli(logits = logits[z_i, k_is]),   s = 1..S, padding masked,

one event of ``S`` label slots. :class:`AnnotatorLabels` is that distribution. It
is the law of ``label_likelihood(logits[z, k], data)``, evaluated without forming
a logit per label: the log-sigmoid is taken on the ``2 V K`` entries of::

    table[v, o, k] = log sigmoid((2 o - 1) logits[v, k])

and each label's log-probability is one look-up in it, so the likelihood term of
the E-step is a gather and a sum over slots::

    log p(o_i | z_i = v) = sum_s table[v, o_is, k_is]

(padding slots look up a zero). It is Pyro's ``Categorical(Vindex(psi)[k, z])``
idiom for Dawid-Skene, written for binary labels with the look-up in log space.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape  # pure Python: torch's imports sympy
from torch import Tensor

from repo.noise.layout import LabelData


class AnnotatorLabels(TorchDistribution):
    """The labels of each truth unit given its truth, through annotator channels.

    :param logits: ``(V, K)``, ``logit p(o = 1 | z = v, annotator k)``.
    :param truth: the latent truth as an index into ``V`` (the enumerated or
        sampled ``z``), shape broadcastable to ``(..., I)``.
    :param data: the label layout: annotators ``(I, S)`` and padding.

    Batch shape ``broadcast(truth.shape, (I,))``, event shape ``(S,)``.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(
        self, logits: Tensor, truth: Tensor, data: LabelData, validate_args: bool | None = None
    ) -> None:
        if logits.dim() != 2 or logits.shape[1] < data.num_annotators:
            raise ValueError(
                f"logits must be (V, K) with K >= {data.num_annotators} (the data's "
                f"annotators), got shape {tuple(logits.shape)}"
            )
        truth = truth.reshape(1) if truth.dim() == 0 else truth
        self.logits, self.truth, self.data = logits, truth, data
        batch_shape = broadcast_shape(truth.shape, (data.num_units,))
        super().__init__(batch_shape, (data.num_slots,), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> AnnotatorLabels:
        batch_shape = torch.Size(batch_shape)
        truth = self.truth.expand(batch_shape[:-1] + self.truth.shape[-1:])
        new = self._get_checked_instance(AnnotatorLabels, _instance)
        new.logits, new.truth, new.data = self.logits, truth, self.data
        super(AnnotatorLabels, new).__init__(
            batch_shape, self.event_shape, validate_args=self._validate_args
        )
        return new

    def label_logits(self) -> Tensor:
        """``logits[z_i, k_is]`` for every slot: ``batch_shape + (S,)``."""
        truth = self.truth.long().unsqueeze(-1)  # (..., I or 1, 1)
        return self.logits[truth, self.data.annotator].expand(self.batch_shape + self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits[:, : self.data.num_annotators]  # the data's annotators
        v, k = logits.shape
        table = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
        # one row per truth value: [o = 0 | o = 1 | padding (log 1 = 0)], 2 K + 1 entries
        table = torch.cat([table.reshape(v, 2 * k), table.new_zeros(v, 1)], dim=1)
        code = self.data.label_code if value is self.data.label else self.data.channel_code(value)
        truth = self.truth.long()
        if truth.shape[-1] == 1 and code.dim() == 2:  # one truth for all units (enumerated)
            rows = table[truth.reshape(-1)]  # (M, 2 K + 1): one row per truth value
            # a gather (its gradient a scatter-add), not rows[:, code] (an index_put)
            per_slot = rows.gather(1, code.reshape(1, -1).expand(rows.shape[0], -1))
            per_slot = per_slot.reshape(truth.shape[:-1] + code.shape)
        else:
            per_slot = table[truth.unsqueeze(-2), code]
        log_prob = per_slot.sum(-2)  # per_slot: (..., S, I)
        return log_prob.expand(broadcast_shape(log_prob.shape, self.batch_shape))

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        with torch.no_grad():
            labels = dist.Bernoulli(logits=self.label_logits()).sample(torch.Size(sample_shape))
        return torch.where(self.data.mask, labels, torch.zeros((), dtype=labels.dtype))
