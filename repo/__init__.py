"""re-po: noise-robust preference alignment of language models as a probabilistic program.

The annotator noise process is a Pyro model of the labels given a scorer's
preference logits (:mod:`repo.noise`, :mod:`repo.scorers`); EM infers the latent
true preferences by exact enumeration (:mod:`repo.inference`). See ``docs/``.
"""

from repo.fit import NoiseFit, fit_noise

__version__ = "0.1.0"

__all__ = ["NoiseFit", "__version__", "fit_noise"]
