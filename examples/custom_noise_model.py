"""Writing a new noise model: annotators who err more on close calls.

The flip models give each annotator one reliability. Real annotators are more
reliable when the two responses are far apart and guess when they are close. Let
annotator ``k`` report the truth with log-odds ``alpha_k + beta_k |s_i|``, where
``|s_i|`` is how clear-cut the comparison is under the scorer::

    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(sigmoid(+-(alpha_k + beta_k |s_i|)))   (+ when z_i = 1, - when 0)

The class below is all it takes: the Pyro model, and what to report. EM finds
that the model has no closed-form M-step and climbs the enumerated marginal
likelihood by L-BFGS; the E-step is Pyro's exact enumeration of ``z``.

Run: ``python examples/custom_noise_model.py`` (a few seconds).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

import repo  # noqa: F401  (module-local Pyro parameters)
from repo.inference.em import fit_em
from repo.noise import LabelData, NoiseModel
from repo.noise.base import agree_logits
from repo.scorers import FixedLogits


class DifficultyFlip(NoiseModel):
    """Reliability that grows with how clear-cut the comparison is."""

    name = "difficulty"

    def __init__(self, num_annotators: int) -> None:
        super().__init__(num_annotators)
        self.parameter("alpha", 1.0, "annotators", reliability=True)  # (K,), real
        self.parameter("beta", 0.0, "annotators")

    def logit_correct(self, logits: Tensor, data: LabelData) -> Tensor:
        k = data.annotator
        return self.alpha[..., k] + self.beta[..., k] * logits.abs().unsqueeze(-1)

    def model(self, logits: Tensor, data: LabelData) -> None:
        # The parameters are read before the plates: under full Bayes they are
        # sample sites, which must not pick up the plates' shapes.
        logit_correct = self.logit_correct(logits, data)
        with pyro.plate("items", data.num_units, dim=-2):
            z = pyro.sample(
                "z", dist.Bernoulli(logits=logits.unsqueeze(-1)), infer={"enumerate": "parallel"}
            )
            with pyro.plate("slots", data.num_slots, dim=-1), poutine.mask(mask=data.slot_mask):
                label_logits = agree_logits(z, logit_correct)
                pyro.sample("o", dist.Bernoulli(logits=label_logits), obs=data.label)

    def implied_eta(self, logits: Tensor, data: LabelData) -> Tensor:
        return torch.sigmoid(self.logit_correct(logits, data)).detach()


def simulate(num_labels: int, alpha: np.ndarray, beta: np.ndarray, seed: int = 0):
    """Labels from the model above with scores ``s ~ N(0, 3^2)`` given."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 3.0, num_labels)
    annotator = rng.integers(0, alpha.shape[0], num_labels)
    truth = rng.random(num_labels) < 1 / (1 + np.exp(-scores))
    logit_correct = alpha[annotator] + beta[annotator] * np.abs(scores)
    correct = rng.random(num_labels) < 1 / (1 + np.exp(-logit_correct))
    label = np.where(correct, truth, ~truth)
    return scores, annotator, label.astype(np.int64)


def main(num_labels: int = 100_000) -> dict[str, np.ndarray]:
    """Simulate, fit by EM, and print the truth beside the estimates."""
    alpha = np.array([0.5, 1.0, 2.0, 0.0])
    beta = np.array([1.0, 0.5, 0.0, 1.5])
    scores, annotator, label = simulate(num_labels, alpha, beta)
    data = LabelData.from_labels(torch.as_tensor(annotator), torch.as_tensor(label))
    model = DifficultyFlip(len(alpha))
    result = fit_em(model, FixedLogits(torch.as_tensor(scores)), data)
    fitted = {k: v.numpy() for k, v in model.annotator_parameters().items()}
    print(f"EM: {result.iterations} iterations, converged={result.converged}")
    print("annotator  alpha (true / fitted)  beta (true / fitted)")
    for k in range(len(alpha)):
        print(
            f"{k:9d}  {alpha[k]:5.2f} / {fitted['alpha'][k]:5.2f}"
            f"          {beta[k]:5.2f} / {fitted['beta'][k]:5.2f}"
        )
    return {"alpha": alpha, "beta": beta, **{f"fitted_{k}": v for k, v in fitted.items()}}


if __name__ == "__main__":
    main()
