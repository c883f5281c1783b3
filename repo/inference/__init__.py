"""Inference over the noise models: exact enumeration, EM, and full Bayes.

* :mod:`~repo.inference.enumeration`: posterior marginals of the enumerated latents
  and the marginal log-likelihood (``TraceEnum_ELBO``), per unit;
* :mod:`~repo.inference.em`: full-batch EM (closed-form or L-BFGS M-steps, SQUAREM);
* :mod:`~repo.inference.online`: the online EM of the trainer (one damped M-step per
  optimizer step) and mini-batch EM for fits;
* :mod:`~repo.inference.noise_test`: the likelihood-ratio test of "no label is wrong"
  that holds the trainer's posterior back until the labels show noise;
* :mod:`~repo.inference.laplace`: observed information and EM's Laplace posterior;
* :mod:`~repo.inference.nuts`, :mod:`~repo.inference.svi`: NUTS, SVI and MAP on the
  same Pyro programs, latents enumerated out; :mod:`~repo.inference.bayes` runs any
  of them and summarises the draws (:mod:`~repo.inference.draws`).
"""

from repo.inference.bayes import BayesResult, BayesSettings, infer
from repo.inference.em import EM, EMResult, fit_em
from repo.inference.enumeration import EnumPosterior, enumerate_posterior, marginal_log_likelihood
from repo.inference.noise_test import NoiseTest, likelihood_ratio_test
from repo.inference.online import OnlineEM, fit_minibatch_em

__all__ = [
    "EM",
    "BayesResult",
    "BayesSettings",
    "EMResult",
    "EnumPosterior",
    "NoiseTest",
    "OnlineEM",
    "enumerate_posterior",
    "fit_em",
    "fit_minibatch_em",
    "infer",
    "likelihood_ratio_test",
    "marginal_log_likelihood",
]
