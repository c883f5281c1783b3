"""The label layout every noise model reads: truth units by label slots.

A data set of labels ``j = 1..N`` names, for each label, an annotator ``k_j``, an
outcome ``o_j`` in {0, 1} (1: response A preferred) and the *truth unit* it
informs: the latent true preference ``z`` it is a noisy copy of.

* Per-label truth (the paper): every label has its own ``z``; units are labels,
  so the layout is ``(N, 1)``.
* Shared truth (Dawid-Skene): the labels of one item share one ``z``; units are
  items and the layout is ``(I, S)`` with ``S`` the largest number of labels of
  one item, ragged rows padded and masked.

The scorer reads ``unit`` (the global index of each truth unit) to produce one
logit per row; noise models read ``annotator``, ``label`` and ``mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class LabelData:
    """Labels in a padded ``units x slots`` layout.

    :param unit: ``(I,)`` long, global index of each truth unit (the scorer's key).
    :param annotator: ``(I, S)`` long, annotator of each slot (0 where padded).
    :param label: ``(I, S)`` float in {0, 1}, 1 when the annotator preferred A.
    :param mask: ``(I, S)`` bool, False on padding.
    :param row: ``(I, S)`` long, the label's row in the input (-1 where padded).
    :param num_annotators: ``K``, the number of annotators.
    :param shared_truth: whether a unit's labels share one latent truth.
    """

    unit: Tensor
    annotator: Tensor
    label: Tensor
    mask: Tensor
    row: Tensor
    num_annotators: int
    shared_truth: bool

    @property
    def num_units(self) -> int:
        return self.annotator.shape[0]

    @property
    def num_slots(self) -> int:
        return self.annotator.shape[1]

    @property
    def num_labels(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def slot_mask(self) -> Tensor | bool:
        """The mask for ``poutine.mask``: ``True`` when no slot is padding (so that
        masking costs nothing on rectangular data)."""
        return True if bool(self.mask.all()) else self.mask

    @cached_property
    def label_code(self) -> Tensor:
        """:meth:`channel_code` of the observed labels, computed once."""
        return self.channel_code(self.label)

    def channel_code(self, label: Tensor) -> Tensor:
        """Look-up index of each label slot in an annotator-channel table
        (:class:`~repo.noise.channel.AnnotatorLabels`): ``o K + k`` for label ``o`` of
        annotator ``k``, ``2 K`` on padding; slots first, ``(..., S, I)``."""
        k = self.num_annotators
        code = label.long() * k + self.annotator
        code = torch.where(self.mask, code, torch.full((), 2 * k, dtype=code.dtype))
        return code.transpose(-1, -2).contiguous()

    @staticmethod
    def from_labels(
        annotator: Tensor,
        label: Tensor,
        item: Tensor | None = None,
        *,
        shared_truth: bool = False,
        num_annotators: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> LabelData:
        """Build the layout from flat label arrays.

        :param annotator: ``(N,)`` annotator index in ``0..K-1``.
        :param label: ``(N,)`` outcome in {0, 1}.
        :param item: ``(N,)`` item index (required for shared truth). Under
            per-label truth it becomes the unit index when given, else the label's
            row is.
        """
        annotator = torch.as_tensor(annotator, dtype=torch.long)
        label = torch.as_tensor(label, dtype=dtype)
        n = annotator.shape[0]
        if annotator.dim() != 1 or label.shape != (n,):
            raise ValueError(
                f"annotator and label must be 1-D of one length, got shapes "
                f"{tuple(annotator.shape)} and {tuple(label.shape)}"
            )
        if item is not None:
            item = torch.as_tensor(item, dtype=torch.long)
            if item.shape != (n,):
                raise ValueError(
                    f"item must have the labels' length {n}, got shape {tuple(item.shape)}"
                )
        k = int(annotator.max()) + 1 if num_annotators is None else num_annotators
        if n and (int(annotator.min()) < 0 or int(annotator.max()) >= k):
            raise ValueError(f"annotator indices must lie in 0..{k - 1}")
        rows = torch.arange(n)
        if not shared_truth:
            unit = rows if item is None else item
            return LabelData(
                unit=unit,
                annotator=annotator.unsqueeze(-1),
                label=label.unsqueeze(-1),
                mask=torch.ones(n, 1, dtype=torch.bool),
                row=rows.unsqueeze(-1),
                num_annotators=k,
                shared_truth=False,
            )
        if item is None:
            raise ValueError("shared truth needs an item index for every label")
        unit, inverse, counts = torch.unique(item, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n) - starts[inverse[order]]
        num_slots = int(counts.max()) if n else 1
        shape = (unit.shape[0], num_slots)
        out_annotator = torch.zeros(shape, dtype=torch.long)
        out_label = torch.zeros(shape, dtype=dtype)
        out_mask = torch.zeros(shape, dtype=torch.bool)
        out_row = torch.full(shape, -1, dtype=torch.long)
        u = inverse[order]
        out_annotator[u, slot] = annotator[order]
        out_label[u, slot] = label[order]
        out_mask[u, slot] = True
        out_row[u, slot] = rows[order]
        return LabelData(unit, out_annotator, out_label, out_mask, out_row, k, True)

    def subset(self, index: Tensor) -> LabelData:
        """The rows (truth units) ``index``, for mini-batches."""
        return LabelData(
            unit=self.unit[index],
            annotator=self.annotator[index],
            label=self.label[index],
            mask=self.mask[index],
            row=self.row[index],
            num_annotators=self.num_annotators,
            shared_truth=self.shared_truth,
        )

    def per_annotator_sum(self, values: Tensor) -> Tensor:
        """``sum_j values_j`` over each annotator's labels (padding excluded).

        ``values`` is ``(I, S)`` or ``(I, S, m)`` (several statistics at once); the
        result is ``(K,)`` or ``(K, m)``. Each statistic is one scatter-add of a
        vector (a scatter of ``m``-wide rows is several times slower on CPU).
        """
        extra = values.shape[2:]
        mask = self.mask.reshape(self.mask.shape + (1,) * len(extra))
        if self.slot_mask is not True:
            values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
        index = self.annotator.reshape(-1)
        columns = values.reshape(index.shape[0], math.prod(extra)).unbind(-1)
        sums = [
            torch.zeros(self.num_annotators, dtype=values.dtype, device=values.device).index_add_(
                0, index, column
            )
            for column in columns
        ]
        return torch.stack(sums, -1).reshape((self.num_annotators, *extra))

    @cached_property
    def _label_counts(self) -> Tensor:
        return self.per_annotator_sum(self.mask.to(self.label.dtype))

    def label_counts(self) -> Tensor:
        """Number of labels of each annotator: ``(K,)`` (computed once)."""
        return self._label_counts.clone()

    def flat(self, values: Tensor) -> Tensor:
        """Per-slot ``values`` ``(I, S)`` in the input's label order ``(N,)``."""
        values = values.expand_as(self.label)
        slots = values.reshape(-1) if self.slot_mask is True else values[self.mask]
        out = torch.empty(self.num_labels, dtype=values.dtype, device=values.device)
        out[self._flat_rows] = slots
        return out

    @cached_property
    def _flat_rows(self) -> Tensor:
        """The input row of every real slot, in slot order."""
        return self.row.reshape(-1) if self.slot_mask is True else self.row[self.mask]
