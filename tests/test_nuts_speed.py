"""NUTS's potential (CachedEnumEvaluator, batched and compiled) against Pyro's own, and the quick mode of
benchmarks/nuts_speed.py (Pyro's NUTS beside NumPyro's on one model)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from _helpers import load_benchmark
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad

from repo.data.simulate import simulate_labels
from repo.inference.bayes import bayesian_copy
from repo.inference.em import fit_em
from repo.inference.enumeration import MAX_PLATE_NESTING, local_params
from repo.inference.nuts import _potential, batched_potential
from repo.noise import LabelData, make_noise_model
from repo.noise.base import Sizes
from repo.scorers import FixedLogits

F64 = torch.float64


@pytest.mark.parametrize(
    "name", ["symmetric", "two-coin", "spammer", "hierarchical", "boltzmann", "glad"]
)
@pytest.mark.parametrize("jit", [False, True])
def test_batched_potential_equals_pyros(name, jit):
    # The theta-free factors are computed once, the enumerated sum is a direct
    # logsumexp and, under jit, the batch's energies and gradients are one compiled
    # graph: each chain's value and gradient must be Pyro's, away from the start too.
    k = 3
    simulated = "symmetric" if name == "glad" else name
    sim = simulate_labels(
        num_items=200, num_annotators=k, shared_truth=False, model=simulated, seed=3
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=k)
    scorer = FixedLogits(torch.as_tensor(sim.scores))
    prior = None
    if name in ("symmetric", "two-coin", "spammer"):
        prior = dist.Beta(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    model = make_noise_model(name, Sizes.of(data), prior=prior)
    fit_em(model, scorer, data)
    bayes, logits = bayesian_copy(model), scorer(data).detach()
    with local_params(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, pyros, _, _ = initialize_model(
            bayes, (logits, data), max_plate_nesting=MAX_PLATE_NESTING
        )
        initial, potential_fn, _ = _potential(bayes, logits, data, num_chains=2)
        potential = batched_potential(potential_fn, initial, [[0, 1]], jit)
        assert bool(potential.graphs) == jit
        for shift in (0.0, 0.3, -0.7):
            z = potential.flatten({key: value + shift for key, value in initial.items()})
            energy, grad = potential(z)
            for chain in range(2):
                point = {n: v[chain].clone() for n, v in potential.unflatten(z).items()}
                expected_grad, expected = potential_grad(pyros, point)
                flat = torch.cat([expected_grad[n].reshape(-1) for n in potential.names])
                assert torch.allclose(energy[chain], expected, rtol=1e-10, atol=1e-9), shift
                assert torch.allclose(grad[chain], flat, rtol=1e-8, atol=1e-8), shift


def test_nuts_speed_quick(tmp_path, capsys):
    pytest.importorskip("numpyro")
    speed = load_benchmark("nuts_speed")
    result = speed.main(["--quick", "--out", str(tmp_path / "nuts_speed-quick.json")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert (result["chains"], result["warmup"], result["draws"]) == (2, 100, 100)
    assert result["cli_s"] > 0 and result["import_s"] > 0
    assert {"em", "nuts", "enumeration", "summaries"} <= set(result["phases_s"])
    assert result["phases_s"]["nuts"]["warmup"] > 0
    anchor = result["anchor"]
    for side in ("pyro", "numpyro"):
        assert anchor[side]["min_ess_bulk"] > 20, anchor
        assert anchor[side]["min_ess_per_s"] > 0 and anchor[side]["divergences"] == 0
    # one model, two programs: the posterior means agree within Monte Carlo error
    np.testing.assert_allclose(anchor["pyro"]["eta_mean"], anchor["numpyro"]["eta_mean"], atol=0.03)
    gradients = result["potential_grad_ms"]
    assert set(gradients) == {
        "chains", "pyro_ms", "uncompiled_ms", "compiled_ms", "compile_s", "speedup"
    }  # fmt: skip
    assert gradients["chains"] == 2 and gradients["compiled_ms"] > 0
