r"""Training data: tokenised comparisons, their labels, and the order of mini-batches.

The trainer works on *truth units* (:class:`~repo.noise.layout.LabelData`): under
per-label truth (the paper) every label is a unit with its own latent ``z``; under
shared truth the labels of one item are one unit. A unit's logit comes from its
item's pair (prompt, A, B), so a mini-batch runs **one forward per distinct item**
in it (:meth:`TrainingData.batch`), never one per label.

Mini-batch order (:class:`BatchSchedule`): each epoch a permutation of the units
drawn from ``seed`` and the epoch number alone, cut into global batches of
``G = batch_size x gradient_accumulation_steps x processes`` units; units that do
not fill a last global batch wait for the next epoch's shuffle. Micro-batch ``a``
of process ``r`` in a global batch is the slice ``[(a P + r) m, (a P + r + 1) m)``
(``m`` = batch_size, ``P`` = processes), so a one-process run with ``m P`` units
per micro-batch sees the same global batches, grouped the same way. The order is a
pure function of (seed, epoch, step): resuming needs only the step.

Held-out labels (``[em] held_out``, :func:`held_out_items`): a share of the items,
drawn from the seed alone, whose units no batch holds until the epoch
``train_held_out_from`` (``[em] train_held_out``: the run's last); the annotator
parameters are refitted on their scores at each pass's end. From that epoch on the
permutation is of every unit, as without held-out items, so that pass is longer by
the held-out units: :meth:`BatchSchedule.epoch_of` maps a step to its epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from repo.data.errors import DataError
from repo.data.records import PreferenceData
from repo.noise.layout import LabelData
from repo.policy.reference import data_fingerprint
from repo.policy.tokenize import PairTokenizer, TokenizedPair, collate_pairs

__all__ = ["BatchSchedule", "MicroBatch", "TrainingData", "VIRTUAL_ANNOTATOR", "held_out_items"]

VIRTUAL_ANNOTATOR = "all"
"""The annotator id given to labels of data without an annotator column (K = 1)."""


@dataclass
class MicroBatch:
    """One micro-batch: the collated pairs of its items and the labels of its units.

    :param batch: collated pairs (:func:`~repo.policy.tokenize.collate_pairs`); its
        ``index`` is the item position in :attr:`TrainingData.pairs`.
    :param labels: the units' labels; ``labels.unit`` holds item positions.
    :param unit_item: ``(U,)`` row of ``batch`` (0..B-1) that scores each unit.
    :param units: ``(U,)`` the units' positions in :attr:`TrainingData.labels`.
    """

    batch: dict[str, Tensor]
    labels: LabelData
    unit_item: Tensor
    units: Tensor

    @property
    def num_units(self) -> int:
        return int(self.units.shape[0])


@dataclass
class TrainingData:
    """Tokenised items and the label layout the noise model reads.

    :param pairs: one tokenised pair per item; ``pairs[i].index == i``.
    :param labels: all labels; ``unit`` = item position (per-label truth: one row
        per label; shared truth: one row per item).
    :param annotator_ids: annotator id of each annotator index.
    :param item_ids: item id of each item position.
    :param records: the validated records whose labels these are.
    :param label_record: ``(N,)`` the record (index into ``records``) of each label,
        in the order of ``labels.row``.
    :param skipped: records dropped on the way, by reason (the loader's and the
        tokeniser's).
    :param pad_token_id: the padding id used to collate.
    """

    pairs: list[TokenizedPair]
    labels: LabelData
    annotator_ids: list[str]
    item_ids: list[str]
    records: PreferenceData
    label_record: Tensor
    pad_token_id: int
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of the tokenised items, the label layout and the annotator ids: a
        checkpoint resumes only on the data it was written for."""
        h = hashlib.sha256(data_fingerprint(self.pairs).encode())
        labels = self.labels
        for t in (labels.unit, labels.annotator, labels.label, labels.mask):
            h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps(self.annotator_ids).encode())
        return h.hexdigest()

    @classmethod
    def build(
        cls,
        records: PreferenceData,
        tokenizer: PairTokenizer,
        *,
        shared_truth: bool = False,
        annotator_ids: Sequence[str] | None = None,
    ) -> TrainingData:
        """Tokenise each item once and lay out the labels.

        Labels of records without an annotator id belong to :data:`VIRTUAL_ANNOTATOR`.
        Items whose pair the tokeniser skips (``prompt_overflow="skip"``) lose their
        labels, counted in ``skipped["prompt_too_long"]``. ``annotator_ids`` fixes the
        annotator index (e.g. a run's, when evaluating); unknown ids are an error.
        """
        if len(records) == 0:
            raise ValueError(
                f"no usable records (skipped: {dict(records.skipped) or 'none'}); "
                "check the data file and the [data] policies"
            )
        item_ids = records.items
        position = {item: i for i, item in enumerate(item_ids)}
        first: dict[str, int] = {}
        for n, record in enumerate(records):
            first.setdefault(record.item, n)
        tokenized = tokenizer.tokenize_all(
            [records[first[i]].prompt for i in item_ids],
            [records[first[i]].response_a for i in item_ids],
            [records[first[i]].response_b for i in item_ids],
            indices=range(len(item_ids)),
        )
        dropped_items = set(tokenized.skipped)
        keep_items = [i for i in range(len(item_ids)) if i not in dropped_items]
        renumber = {old: new for new, old in enumerate(keep_items)}
        pairs = [dataclasses.replace(p, index=renumber[p.index]) for p in tokenized.pairs]
        skipped = Counter(records.skipped)
        kept_records = []
        for n, record in enumerate(records):
            if position[record.item] in dropped_items:
                skipped["prompt_too_long"] += 1
            else:
                kept_records.append(n)
        if not kept_records:
            raise ValueError("every record was skipped: no prompt fits [model] max_length")
        names = [
            VIRTUAL_ANNOTATOR if records[n].annotator is None else records[n].annotator
            for n in kept_records
        ]
        if annotator_ids is None:
            annotator_ids = sorted(set(names))
        annotator_ids = list(annotator_ids)
        code = {a: k for k, a in enumerate(annotator_ids)}
        unknown = sorted(set(names) - set(code))
        if unknown:
            raise ValueError(
                f"annotator {unknown[0]!r} is not one of the run's annotators "
                f"({', '.join(annotator_ids)})"
            )
        annotator = torch.tensor([code[a] for a in names], dtype=torch.long)
        oriented = [_item_label(records, n, first) for n in kept_records]
        label = torch.tensor([o for o, _ in oriented], dtype=torch.float64)
        reoriented = sum(swapped for _, swapped in oriented)
        item = torch.tensor(
            [renumber[position[records[n].item]] for n in kept_records], dtype=torch.long
        )
        labels = LabelData.from_labels(
            annotator,
            label,
            item,
            shared_truth=shared_truth,
            num_annotators=len(annotator_ids),
        )
        notes = Counter(records.notes)
        notes["prompt_truncated"] += tokenized.n_prompt_truncated
        notes["response_truncated"] += tokenized.n_response_truncated
        notes["reoriented_labels"] += reoriented
        return cls(
            pairs=pairs,
            labels=labels,
            annotator_ids=annotator_ids,
            item_ids=[item_ids[i] for i in keep_items],
            records=records,
            label_record=torch.tensor(kept_records, dtype=torch.long),
            pad_token_id=int(tokenizer.tokenizer.pad_token_id or 0),
            skipped=dict(skipped),
            notes={k: v for k, v in notes.items() if v},
        )

    @property
    def num_units(self) -> int:
        return self.labels.num_units

    def label_counts(self) -> Tensor:
        """Labels per annotator in the whole data set, ``(K,)``."""
        return self.labels.label_counts()

    def batch(
        self,
        units: Tensor,
        collate: Callable[[list[TokenizedPair], int], dict[str, Tensor]] = collate_pairs,
    ) -> MicroBatch:
        """The micro-batch of the given units: their distinct items collated once
        (``collate``: :func:`~repo.policy.tokenize.collate_pairs` or a policy's
        :meth:`~repo.policy.Policy.collate`)."""
        labels = self.labels.subset(units)
        items, unit_item = torch.unique(labels.unit, return_inverse=True)
        batch = collate([self.pairs[int(i)] for i in items.tolist()], self.pad_token_id)
        return MicroBatch(batch=batch, labels=labels, unit_item=unit_item, units=units)


@dataclass(frozen=True)
class BatchSchedule:
    """Which units each process sees in each micro-batch (see the module docstring).

    :param num_units: units in the data.
    :param batch_size: units per micro-batch and process (``m``).
    :param accumulation: micro-batches per optimizer step.
    :param world_size: processes (``P``).
    :param seed: the run's seed.
    :param held_out: units no batch holds before the epoch ``train_held_out_from``
        (``None``: every unit is trained on).
    :param train_held_out_from: the epoch (from 0) from which batches hold the
        ``held_out`` units too (``[em] train_held_out``); ``None``: never.
    """

    num_units: int
    batch_size: int
    accumulation: int
    world_size: int
    seed: int
    held_out: Tensor | None = field(default=None, compare=False)
    train_held_out_from: int | None = None

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            trained = "truth units to train on" if self.held_out is not None else "truth units"
            raise ValueError(
                f"the data has {self.num_trained} {trained} but one optimizer step needs "
                f"{self.global_batch} (batch_size {self.batch_size} x gradient_accumulation_steps "
                f"{self.accumulation} x processes {self.world_size}); lower the batch size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @cached_property
    def trained_units(self) -> Tensor | None:
        """The units batches hold, ascending (``None``: all of them); computed once, as
        every step's :meth:`permutation` reads it."""
        if self.held_out is None:
            return None
        keep = torch.ones(self.num_units, dtype=torch.bool)
        keep[self.held_out] = False
        return keep.nonzero().reshape(-1)

    @property
    def num_trained(self) -> int:
        """Units batches hold before :attr:`train_held_out_from`: all but the held-out
        ones."""
        units = self.trained_units
        return self.num_units if units is None else len(units)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of an epoch over the :attr:`num_trained` units (every epoch
        before :attr:`train_held_out_from`; :meth:`steps_in` gives any epoch's)."""
        return self.num_trained // self.global_batch

    def _units_of(self, epoch: int) -> Tensor | None:
        """The units batches hold in ``epoch``, ascending (``None``: all of them)."""
        start = self.train_held_out_from
        return None if start is not None and epoch >= start else self.trained_units

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch``: :attr:`steps_per_epoch`, or from
        :attr:`train_held_out_from` on, those of an epoch over every unit."""
        units = self._units_of(epoch)
        return (self.num_units if units is None else len(units)) // self.global_batch

    def steps_for(self, epochs: int) -> int:
        """Optimizer steps of the first ``epochs`` epochs."""
        start = self.train_held_out_from
        if start is None or epochs <= start:
            return epochs * self.steps_per_epoch
        return start * self.steps_per_epoch + (epochs - start) * self.steps_in(start)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """``(epoch, position)`` of optimizer step ``step`` (counted from 0 over the
        whole run): its epoch and its place among that epoch's steps."""
        start = self.train_held_out_from
        if start is None or step < start * self.steps_per_epoch:
            return divmod(step, self.steps_per_epoch)
        epoch, position = divmod(step - start * self.steps_per_epoch, self.steps_in(start))
        return start + epoch, position

    def permutation(self, epoch: int) -> Tensor:
        """The order of the units batches hold in ``epoch`` (a function of seed and
        epoch only)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        units = self._units_of(epoch)
        order = torch.randperm(self.num_units if units is None else len(units), generator=generator)
        return order if units is None else units[order]

    def global_units(self, step: int) -> Tensor:
        """All units of optimizer step ``step`` (counted from 0 over the whole run)."""
        epoch, position = self.epoch_of(step)
        start = position * self.global_batch
        return self.permutation(epoch)[start : start + self.global_batch]

    def micro_units(self, step: int, rank: int) -> list[Tensor]:
        """The units of each micro-batch of process ``rank`` in optimizer step ``step``."""
        units = self.global_units(step)
        m, p = self.batch_size, self.world_size
        return [
            units[(a * p + rank) * m : (a * p + rank + 1) * m] for a in range(self.accumulation)
        ]


def _item_label(records: PreferenceData, n: int, first: dict[str, int]) -> tuple[int, bool]:
    """Record ``n``'s label in its item's A/B order (that of the item's first record),
    and whether it was re-oriented.

    Records of one item may show its responses in either order (a position column
    says which each annotator saw first); a label is then re-oriented, ``o -> 1 - o``,
    when its A is the item's B.

    :raises DataError: the record's responses are not the item's two responses.
    """
    record = records[n]
    reference = records[first[record.item]]
    if (record.response_a, record.response_b) == (reference.response_a, reference.response_b):
        return record.label, False
    if (record.response_a, record.response_b) == (reference.response_b, reference.response_a):
        return 1 - record.label, True
    raise DataError(
        f"item {record.item!r} holds other responses than in row {reference.row}: the rows "
        "of one item must compare the same two responses",
        row=record.row,
        field="item",
        reason="item_mismatch",
    )


def held_out_items(num_items: int, share: float, seed: int) -> Tensor:
    """The items whose labels the policy does not train on (``[em] held_out``; with
    ``[em] train_held_out``, until the last epoch):
    ``round(share * num_items)`` of them, at least one when ``share > 0``, drawn
    from ``seed`` alone (the same on every process and on resume), ascending; an
    empty tensor when ``share`` is 0."""
    count = round(share * num_items)
    if share > 0:
        count = max(count, 1)
    generator = torch.Generator().manual_seed(seed * 1_000_003 - 1)
    return torch.randperm(num_items, generator=generator)[:count].sort().values
