"""Expectation-maximisation for a noise model and a scorer.

One EM iteration at parameters ``theta`` (annotator parameters and the scorer's):

* **E-step**: ``q(latents) = p(latents | o, theta)`` by exact enumeration
  (:func:`~repo.inference.enumeration.enumerate_posterior`), with the marginal
  log-likelihood ``L(theta)`` from the same trace.
* **M-step**: the closed-form maximiser of the expected complete-data
  log-likelihood where the module offers one (``sufficient_statistics`` and
  ``m_step``: MAP under its prior), otherwise L-BFGS on ``L(theta) + log p(theta)``
  over that module's parameters with the others held (an ECM step; by Fisher's
  identity its gradient at the start equals the expected complete-data one).

The estimate is chosen, never inferred from whether the model declares priors:
``estimate="ml"`` maximises the likelihood ``L(theta)`` alone (a Beta ``prior`` of
the model is hidden from its closed-form M-step,
:meth:`~repo.noise.base.NoiseModel.estimating`); ``estimate="map"`` maximises
``L(theta) + log p(theta)`` under the model's priors (MAP-EM). Left as None, a
model is estimated as constructed: MAP under the Beta ``prior`` it was given,
maximum likelihood without one (priors declared by ``priors()`` for full Bayes do
not count).

Every step increases the objective (the hierarchical model's evidence bound).
Full-batch EM stops when the relative change of the objective falls below ``tol``.
When every update is closed form, iterations are accelerated by SQUAREM (Varadhan
and Roland, 2008, scheme S3), with a monotone safeguard: an extrapolated point is
kept only if its objective is no lower than the last EM iterate's.

:func:`repo.inference.online.fit_minibatch_em` is the paper's Algorithm 1: per
mini-batch an E-step, then ``eta_k <- (1 - alpha) eta_k + alpha * (batch estimate)``
for each annotator seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.distributions.transforms import biject_to
from pyro.nn import PyroModule
from torch import Tensor

from repo.inference.enumeration import EnumPosterior, enumerate_posterior
from repo.noise.base import ESTIMATES, NoiseModel
from repo.noise.layout import LabelData
from repo.scorers import Scorer


@dataclass
class EMResult:
    """The outcome of an EM run.

    :param converged: whether the relative change of the objective fell below tol.
    :param iterations: EM iterations (E-steps) taken.
    :param objective: final log-likelihood plus log prior (evidence bound for the
        hierarchical model).
    :param trace: the objective after each accepted iteration.
    :param logits: the scorer's logits at the final parameters ``(I,)``.
    :param posterior: the E-step at the final parameters.
    """

    converged: bool
    iterations: int
    objective: float
    trace: list[float] = field(default_factory=list)
    logits: Tensor | None = None
    posterior: EnumPosterior | None = None


def set_value(module: PyroModule, name: str, value: Tensor) -> None:
    """Set a PyroParam (through its constraint) or a buffer to ``value``."""
    if name in module._pyro_params:
        constraint, _ = module._pyro_params[name]
        unconstrained = getattr(module, name + "_unconstrained")
        with torch.no_grad():
            unconstrained.copy_(biject_to(constraint).inv(value.to(unconstrained.dtype)))
    else:
        with torch.no_grad():
            getattr(module, name).copy_(value)


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


class EM:
    """EM over ``noise`` and ``scorer`` on ``data``; see the module docstring.

    :param estimate: ``"ml"`` (maximum likelihood), ``"map"`` (the posterior mode
        under the model's priors) or None (as constructed; see the module docstring).
    :param lbfgs_iterations: L-BFGS iterations per gradient M-step.
    """

    def __init__(
        self,
        noise: NoiseModel,
        scorer: Scorer,
        data: LabelData,
        *,
        estimate: str | None = None,
        lbfgs_iterations: int = 20,
    ) -> None:
        if estimate is not None and estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        self.noise, self.scorer, self.data = noise, scorer, data
        self.estimate = estimate
        self.lbfgs_iterations = lbfgs_iterations
        self._closed: tuple[bool, bool] | None = None

    def _probe(self, logits: Tensor, posterior: EnumPosterior) -> None:
        """Which modules offer a closed-form M-step (their statistics are not None)."""
        marginals = posterior.marginals
        noise = self.noise.sufficient_statistics(self.data, marginals, logits) is not None
        truth = self.noise.truth_posterior(logits, marginals)
        scorer = self.scorer.sufficient_statistics(self.data, truth) is not None
        self._closed = (noise, scorer)

    def _closed_form(self) -> tuple[bool, bool]:
        if self._closed is None:
            self._probe(*self._posterior())
        return self._closed

    @property
    def noise_closed(self) -> bool:
        """Whether the noise model's M-step is closed form."""
        return self._closed_form()[0]

    @property
    def scorer_closed(self) -> bool:
        """Whether the scorer's M-step is closed form (or it has no parameters)."""
        return self._closed_form()[1]

    @property
    def gradient_parameters(self) -> list[Tensor]:
        """The parameters updated by L-BFGS (those of modules with no closed form)."""
        noise, scorer = self._closed_form()
        gradient = [] if noise else list(self.noise.parameters())
        return gradient + ([] if scorer else list(self.scorer.parameters()))

    @property
    def all_closed_form(self) -> bool:
        return not self.gradient_parameters

    # -- steps -------------------------------------------------------------
    def _posterior(self) -> tuple[Tensor, EnumPosterior]:
        with torch.no_grad():
            logits = self.scorer(self.data).detach()
            return logits, enumerate_posterior(self.noise.e_step_model(), logits, self.data)

    def e_step(self) -> tuple[Tensor, EnumPosterior, float]:
        """The posterior at the current parameters and the objective there."""
        logits, posterior = self._posterior()
        if self._closed is None:
            self._probe(logits, posterior)
        with torch.no_grad():
            value = self.noise.objective(logits, self.data, posterior) + self.scorer.log_prior()
        return logits, posterior, float(value)

    def m_step(self, logits: Tensor, posterior: EnumPosterior) -> None:
        """Closed-form updates, then L-BFGS on the rest."""
        marginals = posterior.marginals
        if self.noise_closed:
            stats = self.noise.sufficient_statistics(self.data, marginals, logits)
            for name, value in self.noise.m_step(stats).items():
                set_value(self.noise, name, value)
        if self.scorer_closed and _has_parameters(self.scorer):
            truth = self.noise.truth_posterior(logits, marginals)
            stats = self.scorer.sufficient_statistics(self.data, truth)
            for name, value in self.scorer.m_step(stats).items():
                set_value(self.scorer, name, value)
        if self.gradient_parameters:
            self._gradient_m_step()

    def _negative_objective(self) -> Tensor:
        logits = self.scorer(self.data)
        ll = self.noise.marginal_log_likelihood(logits, self.data)
        return -(ll + self.noise.log_prior() + self.scorer.log_prior()) / self.data.num_labels

    def _gradient_m_step(self) -> None:
        optimizer = torch.optim.LBFGS(
            self.gradient_parameters,
            max_iter=self.lbfgs_iterations,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = self._negative_objective()
            loss.backward()
            return loss

        optimizer.step(closure)

    # -- state, for SQUAREM ------------------------------------------------
    def _state_tensors(self) -> list[Tensor]:
        tensors = [t for t in self.noise.state_dict().values() if t.is_floating_point()]
        return tensors + list(self.scorer.parameters())

    def get_state(self) -> list[Tensor]:
        return [t.detach().clone() for t in self._state_tensors()]

    def set_state(self, state: list[Tensor]) -> None:
        with torch.no_grad():
            for target, value in zip(self._state_tensors(), state, strict=True):
                target.copy_(value)

    # -- loops -------------------------------------------------------------
    def fit(
        self,
        tol: float = 1e-6,
        max_iter: int = 1000,
        accelerate: bool = True,
        callback: Callable[[int, float], None] | None = None,
    ) -> EMResult:
        """Full-batch EM until the relative change of the objective is below ``tol``."""
        if self.estimate is None:
            return self._fit(tol, max_iter, accelerate, callback)
        with self.noise.estimating(self.estimate):
            return self._fit(tol, max_iter, accelerate, callback)

    def _fit(self, tol, max_iter, accelerate, callback) -> EMResult:
        logits, posterior, value = self.e_step()
        if callback:
            callback(1, value)
        if accelerate and self.all_closed_form:
            return self._fit_squarem(tol, max_iter, callback, (logits, posterior, value))
        trace = [value]
        converged = False
        iterations = 1
        while iterations < max_iter:
            self.m_step(logits, posterior)
            logits, posterior, new = self.e_step()
            iterations += 1
            trace.append(new)
            if callback:
                callback(iterations, new)
            if abs(new - value) <= tol * abs(new):
                converged = True
                break
            value = new
        return EMResult(converged, iterations, trace[-1], trace, logits, posterior)

    def _fit_squarem(self, tol, max_iter, callback, first) -> EMResult:
        logits, posterior, value = first
        trace = [value]
        iterations, converged = 1, False
        while iterations < max_iter:
            theta0 = self.get_state()
            self.m_step(logits, posterior)
            theta1 = self.get_state()
            logits1, posterior1, value1 = self.e_step()
            self.m_step(logits1, posterior1)
            theta2 = self.get_state()
            iterations += 1
            r = [a - b for a, b in zip(theta1, theta0, strict=True)]
            v = [c - 2 * a + b for c, a, b in zip(theta2, theta1, theta0, strict=True)]
            r_norm = math.sqrt(sum(float((x * x).sum()) for x in r))
            v_norm = math.sqrt(sum(float((x * x).sum()) for x in v))
            alpha = -r_norm / v_norm if v_norm > 0 else -1.0
            alpha = min(alpha, -1.0)
            self.set_state(
                [t0 - 2 * alpha * a + alpha**2 * b for t0, a, b in zip(theta0, r, v, strict=True)]
            )
            logits, posterior, new = self.e_step()
            iterations += 1
            if not math.isfinite(new) or new < value1:
                self.set_state(theta2)  # extrapolation overshot: keep the EM iterate
                logits, posterior, new = self.e_step()
                iterations += 1
            trace.append(new)
            if callback:
                callback(iterations, new)
            if abs(new - value) <= tol * abs(new):
                converged = True
                break
            value = new
        return EMResult(converged, iterations, trace[-1], trace, logits, posterior)


def fit_em(
    noise: NoiseModel,
    scorer: Scorer,
    data: LabelData,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    accelerate: bool = True,
    callback: Callable[[int, float], None] | None = None,
    estimate: str | None = None,
) -> EMResult:
    """Full-batch EM for the ``estimate`` (``"ml"``, ``"map"``, None: as constructed);
    see :class:`EM`.
    Parameters are updated in place."""
    return EM(noise, scorer, data, estimate=estimate).fit(tol, max_iter, accelerate, callback)


def ema_update(
    module: PyroModule, estimates: dict[str, Tensor], seen: Tensor, alpha: float
) -> None:
    """``p <- (1 - alpha) p + alpha * estimate`` for every annotator in ``seen``.

    Parameters of shape ``(K,)`` are blended only where ``seen``; others always.
    """
    for name, estimate in estimates.items():
        old = getattr(module, name).detach()
        new = old + alpha * (estimate - old)
        if new.shape == seen.shape:
            new = torch.where(seen, new, old)
        set_value(module, name, new)
