r"""The policy M-step: the loss whose gradient moves the policy.

For a micro-batch of truth units with induced logits :math:`s_i` (with gradient)
and the E-step's soft targets :math:`q_i = p(z_i = 1 \mid o, \phi)`:

* ``"nll"`` with an exact E-step: the gradient of the noise model's **enumerated
  marginal likelihood** with the annotator parameters :math:`\phi` held fixed,

  .. math::

      -\nabla_\theta \log p(o \mid s(\theta), \phi)
      = -\nabla_\theta \sum_i \log \sum_{z_i} p(z_i \mid s_i) \prod_j p(o_{ij} \mid z_i, \phi),

  computed by :meth:`pyro.infer.TraceEnum_ELBO.differentiable_loss`. By Fisher's
  identity this equals the gradient of the weighted RE-PO loss
  :math:`-\sum_i [q_i \log\sigma(s_i) + (1 - q_i)\log\sigma(-s_i)]` at the current
  :math:`\theta` (the values differ by :math:`-\mathbb{E}_q[\log p(o \mid z, \phi)] - H(q)`,
  which does not depend on :math:`\theta` at fixed :math:`q`). It needs nothing
  of the noise model but its Pyro program, so a noise model without a latent truth
  (Boltzmann) plugs in too.
* otherwise (``"mixture"``, a tempered E-step, the warm-up): the family's
  :meth:`~repo.likelihoods.base.PreferenceLikelihood.policy_loss` with :math:`w = q`
  held fixed.
* ``"weighted"``: each label's own loss, weighted by the E-step's posterior that the
  label is correct, :math:`w_{ij} = p(z_i = o_{ij} \mid o, \phi)`:
  :math:`\sum_{ij} w_{ij} L(o_{ij})` (:func:`weighted_loss`). A label believed wrong is
  left out rather than turned round: it is the policy step of EM for a contamination
  model, where a wrong label carries no information about the truth (``docs/math.md``
  section 5).
* the plain loss (EM off, and while the noise test holds the posterior back, whatever
  the variant): :math:`L(\text{chosen} \succ \text{rejected})` on the observed labels,
  i.e. ``policy_loss`` with :math:`w = o` in the ``"mixture"`` form. Until the labels
  show noise RE-X trains exactly as X, also where X's loss is not the ``"nll"`` step
  (CPO's one-sided SFT term, IPO's and SimPO's surrogates).

Terms of a family outside its induced likelihood (CPO's w-weighted SFT term) are
added to the marginal-likelihood form through
:meth:`~repo.likelihoods.base.PreferenceLikelihood.auxiliary_loss`.

Every function returns the **sum** over the units (the trainer divides by the
global batch). The logit computation of the marginal likelihood runs on the CPU in
float64 (a few hundred numbers); the gradient flows back to the policy's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repo.inference.enumeration import marginal_log_likelihood
from repo.inference.online import EStep, frozen, single_thread
from repo.likelihoods.base import PreferenceLikelihood
from repo.likelihoods.stats import PairLogps
from repo.noise.base import NoiseModel
from repo.noise.layout import LabelData

__all__ = [
    "gather_stats",
    "marginal_nll",
    "plain_loss",
    "policy_objective",
    "posterior_loss",
    "weighted_loss",
]


def gather_stats(stats: PairLogps, index: Tensor) -> PairLogps:
    """Per-item statistics gathered to per-unit ones (``index``: the item of each unit)."""
    index = index.to(stats.policy_a.device)

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[index]

    return PairLogps(
        policy_a=stats.policy_a[index],
        policy_b=stats.policy_b[index],
        length_a=stats.length_a[index],
        length_b=stats.length_b[index],
        reference_a=pick(stats.reference_a),
        reference_b=pick(stats.reference_b),
    )


def marginal_nll(noise: NoiseModel, logits: Tensor, data: LabelData) -> Tensor:
    r"""``-log p(o | s, phi)`` summed over units, differentiable in ``logits`` only.

    The annotator parameters are held fixed (:func:`~repo.inference.online.frozen`). The
    program is the noise model's E-step program (the model itself, or with a
    continuous latent held at its current value, as the hierarchical model does).
    """
    s = logits.to("cpu", torch.float64)
    with frozen(noise), single_thread():
        return -marginal_log_likelihood(noise.e_step_model(), s, data)


def policy_objective(
    likelihood: PreferenceLikelihood,
    noise: NoiseModel,
    stats: PairLogps,
    logits: Tensor,
    data: LabelData,
    estep: EStep,
    variant: str,
) -> Tensor:
    """The policy step's loss (summed over units); see the module docstring.

    :param stats: per-unit statistics (with gradient).
    :param logits: per-unit induced logits ``likelihood.logits(stats)``.
    :param estep: the micro-batch's E-step.
    :param variant: ``"nll"``, ``"mixture"`` or ``"weighted"``.
    """
    if estep.held_back:  # no evidence of noise yet: the family's own loss on the labels
        return plain_loss(likelihood, stats, data)
    if variant == "nll" and estep.exact:
        loss = marginal_nll(noise, logits, data).to(logits.device, logits.dtype)
        q = estep.q.to(logits.device, logits.dtype)
        auxiliary = likelihood.auxiliary_loss(stats, q)
        return loss if auxiliary is None else loss + auxiliary.sum()
    if not noise.has_truth:
        raise ValueError(
            f"the {noise.name} noise model has no latent truth, so no soft target: use the "
            "'nll' variant with an exact E-step"
        )
    return posterior_loss(likelihood, stats, data, estep, variant)


def posterior_loss(
    likelihood: PreferenceLikelihood,
    stats: PairLogps,
    data: LabelData,
    estep: EStep,
    variant: str,
) -> Tensor:
    """The policy step read off the E-step's posterior, summed over units: with
    ``"weighted"`` each label's own loss times ``w`` (:func:`weighted_loss`), else the
    family's :meth:`~repo.likelihoods.base.PreferenceLikelihood.policy_loss` at the
    soft target ``q``. (:func:`policy_objective` takes the exact ``"nll"`` step from
    the marginal likelihood instead; the trainer's ``loss`` metric reads this.)"""
    if variant == "weighted":
        return weighted_loss(likelihood, stats, data, estep.w)
    q = estep.q.to(stats.policy_a.device, stats.policy_a.dtype)
    return likelihood.policy_loss(stats, q, variant).sum()


def plain_loss(likelihood: PreferenceLikelihood, stats: PairLogps, data: LabelData) -> Tensor:
    """The family's own loss on the observed labels, summed over labels (EM off).

    ``L(A > B)`` when A was chosen, else ``L(B > A)`` (the ``"mixture"`` step at
    ``w = o``, which is the family's loss itself). Shared truth: every label of a
    unit counts.
    """
    return weighted_loss(likelihood, stats, data, data.mask)


def weighted_loss(
    likelihood: PreferenceLikelihood, stats: PairLogps, data: LabelData, w: Tensor
) -> Tensor:
    r"""The family's own loss on each observed label times its weight ``w`` (``(U,
    slots)``, held fixed; 0 where no label), summed: :math:`\sum_{ij} w_{ij} L(o_{ij})`
    with :math:`L(1) = L(A \succ B)`, :math:`L(0) = L(B \succ A)`. With ``w`` the
    E-step's posterior that each label is correct it is the ``"weighted"`` policy step;
    with ``w`` the label mask it is :func:`plain_loss`."""
    device, dtype = stats.policy_a.device, stats.policy_a.dtype
    label = data.label.to(device, dtype)
    mask = data.mask.to(device)
    weight = w.to(device, dtype).detach()
    total = torch.zeros((), device=device, dtype=dtype)
    for slot in range(data.num_slots):
        per_unit = weight[:, slot] * likelihood.policy_loss(stats, label[:, slot], "mixture")
        total = total + torch.where(mask[:, slot], per_unit, torch.zeros_like(per_unit)).sum()
    return total
