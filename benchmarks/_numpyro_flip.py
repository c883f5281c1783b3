"""The symmetric flip written in NumPyro: the anchor for Pyro's NUTS speed.

The same posterior as :class:`repo.noise.SymmetricFlip` under a ``Beta(a, b)`` prior
with per-label truth and fixed scores ``s``::

    eta_k ~ Beta(a, b)
    log p(o_j | eta) = logsumexp_z [log p(z | s_j) + log p(o_j | z, eta_k)],  k = k_j

The truth is summed out by hand (``logaddexp`` of the two values): NumPyro's own
enumeration needs ``funsor``, which the ``bench`` extra does not install, and
computes the same sum. NUTS settings follow Pyro's run: diagonal mass matrix
adapted in warm-up, target acceptance 0.8, tree depth 10, chains one after the
other on one thread, started at the given point (the EM estimate), in float64.

NumPyro and JAX are benchmark-only dependencies (the ``bench`` extra); JAX is
imported on first use, with one CPU thread.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _jax():
    """Import JAX and NumPyro with one CPU thread and float64."""
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    import numpyro

    numpyro.set_platform("cpu")
    numpyro.enable_x64()
    return numpyro


def run_numpyro_nuts(
    annotator: np.ndarray,
    label: np.ndarray,
    scores: np.ndarray,
    num_annotators: int,
    prior: tuple[float, float],
    init_eta: np.ndarray,
    *,
    chains: int,
    warmup: int,
    draws: int,
    seed: int = 0,
) -> dict:
    """NUTS on the NumPyro model; returns ``eta`` draws ``(chains, draws, K)``, the
    wall seconds of the sampler call (compilation included) and per-draw
    ``diverging``."""
    numpyro = _jax()
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from jax.nn import log_sigmoid
    from numpyro.infer import MCMC, NUTS, init_to_value

    annotator = jnp.asarray(annotator)
    sign = jnp.asarray(2.0 * np.asarray(label, dtype=np.float64) - 1.0)
    log_p1 = log_sigmoid(jnp.asarray(scores, dtype=jnp.float64))  # log p(z = 1 | s)
    log_p0 = log_sigmoid(-jnp.asarray(scores, dtype=jnp.float64))
    a, b = prior

    def model():
        eta = numpyro.sample("eta", dist.Beta(a, b).expand([num_annotators]).to_event(1))
        logit_eta = (jnp.log(eta) - jnp.log1p(-eta))[annotator]
        # o = 1 agrees with z = 1: log p(o | z = 1) = log sigmoid(sign * logit_eta)
        joint1 = log_p1 + log_sigmoid(sign * logit_eta)
        joint0 = log_p0 + log_sigmoid(-sign * logit_eta)
        numpyro.factor("labels", jnp.logaddexp(joint0, joint1).sum())

    kernel = NUTS(
        model,
        target_accept_prob=0.8,
        max_tree_depth=10,
        init_strategy=init_to_value(values={"eta": jnp.asarray(init_eta, dtype=jnp.float64)}),
    )
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging",))
    eta = np.asarray(mcmc.get_samples(group_by_chain=True)["eta"])
    seconds = time.perf_counter() - start
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"])
    return {"eta": eta, "seconds": seconds, "divergences": int(diverging.sum())}
