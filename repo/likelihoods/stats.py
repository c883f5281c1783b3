r"""Per-pair sufficient statistics of a preference loss.

Every loss family in :mod:`repo.likelihoods` is a function of a handful of
per-pair numbers that the policy computes in one forward pass. For a pair of
responses :math:`A, B` to a prompt :math:`x`:

.. math::

    \log\pi_\theta(A \mid x) = \sum_{t \in A} \log\pi_\theta(a_t \mid x, a_{<t}),
    \qquad |A| = \text{number of response tokens of } A,

and likewise under the frozen reference model :math:`\pi_{\mathrm{ref}}`
(DPO-style losses only). Derived quantities:

- mean token log-probability (SimPO): :math:`\log\pi_\theta(A \mid x) / |A|`;
- implicit log-ratio (DPO, IPO):
  :math:`r(A) = \log\pi_\theta(A \mid x) - \log\pi_{\mathrm{ref}}(A \mid x)`.

:class:`PairLogps` holds these as tensors of shape ``(B,)`` (one entry per
pair). ``A`` and ``B`` are the two responses of an item in the order of the data
(see DESIGN.md: never "A = chosen" by construction); a loss ``L(stats)`` is the
loss of the statement "A is preferred to B", and :meth:`PairLogps.swap` gives
the statistics of the reversed statement.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["PairLogps"]


@dataclass(frozen=True)
class PairLogps:
    r"""Summed response log-probabilities of the two responses of each pair.

    :param policy_a: :math:`\log\pi_\theta(A \mid x)`, summed over A's response tokens, ``(B,)``.
    :param policy_b: :math:`\log\pi_\theta(B \mid x)`, summed over B's response tokens, ``(B,)``.
    :param length_a: :math:`|A|`, number of response tokens of A (float, positive), ``(B,)``.
    :param length_b: :math:`|B|`, number of response tokens of B (float, positive), ``(B,)``.
    :param reference_a: :math:`\log\pi_{\mathrm{ref}}(A \mid x)` summed, or ``None`` for
        reference-free losses (SimPO, CPO).
    :param reference_b: :math:`\log\pi_{\mathrm{ref}}(B \mid x)` summed, or ``None``.

    The two reference tensors are given together or not at all. Tensors are
    used as given (no copies, no dtype changes); gradients flow through the
    policy tensors.
    """

    policy_a: Tensor
    policy_b: Tensor
    length_a: Tensor
    length_b: Tensor
    reference_a: Tensor | None = None
    reference_b: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.reference_a is None) != (self.reference_b is None):
            raise ValueError(
                "PairLogps: reference_a and reference_b must both be tensors or both be None"
            )
        if self.policy_a.shape != self.policy_b.shape:
            raise ValueError(
                f"PairLogps: policy_a has shape {tuple(self.policy_a.shape)} but policy_b has "
                f"shape {tuple(self.policy_b.shape)}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def has_reference(self) -> bool:
        """Whether reference-model log-probabilities are present."""
        return self.reference_a is not None

    @property
    def policy_mean_a(self) -> Tensor:
        r"""Mean token log-probability of A, :math:`\log\pi_\theta(A \mid x) / |A|`."""
        return self.policy_a / self.length_a

    @property
    def policy_mean_b(self) -> Tensor:
        r"""Mean token log-probability of B, :math:`\log\pi_\theta(B \mid x) / |B|`."""
        return self.policy_b / self.length_b

    @property
    def log_ratio_a(self) -> Tensor:
        r""":math:`r(A) = \log\pi_\theta(A) - \log\pi_{\mathrm{ref}}(A)`, the implicit log-ratio."""
        return self.policy_a - self._require_reference().reference_a  # type: ignore[operator]

    @property
    def log_ratio_b(self) -> Tensor:
        r""":math:`r(B) = \log\pi_\theta(B) - \log\pi_{\mathrm{ref}}(B)`, the implicit log-ratio."""
        return self.policy_b - self._require_reference().reference_b  # type: ignore[operator]

    # ------------------------------------------------------------------ transforms
    def swap(self) -> PairLogps:
        """The statistics with A and B exchanged (the reversed preference statement)."""
        return PairLogps(
            policy_a=self.policy_b,
            policy_b=self.policy_a,
            length_a=self.length_b,
            length_b=self.length_a,
            reference_a=self.reference_b,
            reference_b=self.reference_a,
        )

    def _require_reference(self) -> PairLogps:
        if not self.has_reference:
            raise ValueError(
                "this loss needs reference-model log-probabilities, but PairLogps has "
                "reference_a = reference_b = None"
            )
        return self
