"""re-po: noise-robust preference alignment of language models as a probabilistic program.

The annotator noise process is a Pyro model of the labels given a scorer's
preference logits (:mod:`repo.noise`, :mod:`repo.scorers`); EM infers the latent
true preferences by exact enumeration (:mod:`repo.inference`). See ``docs/``.
"""

import pyro

# Every PyroModule of this package keeps its parameters on the module (not in Pyro's
# global param store, where two models of one class would share same-named
# parameters and a stale value of another shape could be picked up).
pyro.settings.set(module_local_params=True)

from repo.fit import NoiseFit, fit_noise  # noqa: E402

__version__ = "0.1.0"

__all__ = ["NoiseFit", "__version__", "fit_noise"]
