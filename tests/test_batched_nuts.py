"""The batched NUTS sampler against known truth: Gaussian moments, a one-annotator
posterior by quadrature, the compiled potential against the model's, and each
chain's independence of the chains batched with it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.batched_nuts import BatchedNUTS, BatchedPotential
from repo.inference.em import fit_em
from repo.inference.nuts import run_nuts
from repo.noise import LabelData, SymmetricFlip
from repo.scorers import FixedLogits

F64 = torch.float64
MU = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
SD = torch.tensor([0.1, 1.0, 10.0], dtype=F64)


def gaussian_energy(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``U`` of independent normals: ``x`` (3,) with means MU and scales SD, ``y``
    (2, 2) and ``s`` (a scalar) standard."""
    x, y, s = params["x"], params["y"], params["s"]
    return 0.5 * (((x - MU) / SD) ** 2).sum() + 0.5 * (y**2).sum() + 0.5 * s**2


def gaussian_potential(compile: bool = True) -> BatchedPotential:
    point = {
        "x": torch.zeros(3, dtype=F64),
        "y": torch.zeros(2, 2, dtype=F64),
        "s": torch.zeros((), dtype=F64),
    }
    return BatchedPotential(gaussian_energy, point, compile=compile)


def test_potential_layout_and_compiled_values():
    potential = gaussian_potential()
    assert (potential.names, potential.dim) == (["s", "x", "y"], 8)
    z = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    values = potential.unflatten(z)
    assert values["s"].shape == (3,) and values["y"].shape == (3, 2, 2)
    torch.testing.assert_close(potential.flatten(values), z)
    energy, grad = potential(z)
    expected, expected_grad = potential.uncompiled(z)
    torch.testing.assert_close(energy, expected)
    torch.testing.assert_close(grad, expected_grad)
    # closed form: U and its gradient
    x = values["x"]
    torch.testing.assert_close(potential.unflatten(grad)["x"], (x - MU) / SD**2)
    potential.check(z)


def test_gaussian_moments_and_adapted_metric():
    potential = gaussian_potential()
    sampler = BatchedNUTS(potential, seeds=[0, 1, 2, 3])
    start = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    run = sampler.run(start, warmup=400, draws=1500)
    draws = potential.unflatten(run["samples"])
    x = draws["x"].reshape(-1, 3)
    # 6,000 draws: means within a few Monte Carlo errors, scales within 8%
    assert torch.all((x.mean(0) - MU).abs() < 0.1 * SD), x.mean(0)
    assert torch.all((x.std(0) / SD - 1).abs() < 0.08), x.std(0)
    for name in ("y", "s"):
        flat = draws[name].reshape(6000, -1)
        assert torch.all(flat.mean(0).abs() < 0.1) and torch.all((flat.std(0) - 1).abs() < 0.08)
    # the adapted inverse metric is the posterior variances (scales span 100x)
    x_mass = potential.unflatten(sampler.inverse_mass)["x"]
    assert torch.all((x_mass / SD**2 - 1).abs() < 0.5), x_mass
    stats = run["stats"]
    assert stats["diverging"].sum() == 0
    assert np.all(stats["tree_depth"] == np.ceil(np.log2(stats["n_steps"] + 1)))
    assert 0.3 < stats["step_size"].mean() < 1.5
    assert np.all(stats["lp"] <= 0)  # -U of a Gaussian with its minimum at 0


def test_a_chains_draws_do_not_depend_on_its_batch():
    start = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    together = BatchedNUTS(gaussian_potential(), seeds=[5, 6, 7]).run(start, 60, 40)
    alone = BatchedNUTS(gaussian_potential(), seeds=[6]).run(start[1:2], 60, 40)
    torch.testing.assert_close(together["samples"][1], alone["samples"][0], rtol=0, atol=1e-10)
    for key, value in alone["stats"].items():
        np.testing.assert_allclose(together["stats"][key][1], value[0], atol=1e-10)


def test_tree_depth_is_capped():
    potential = gaussian_potential()
    sampler = BatchedNUTS(potential, seeds=[0, 1], max_tree_depth=2, step_size=0.01)
    sampler.adapt_step_size = False
    run = sampler.run(torch.zeros(2, 8, dtype=F64), warmup=0, draws=20)
    assert run["stats"]["n_steps"].max() == 3 and run["stats"]["tree_depth"].max() == 2


def test_uncompiled_sampler_draws_as_the_compiled_one():
    start = torch.randn(2, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    runs = [
        BatchedNUTS(gaussian_potential(compile=compile), seeds=[1, 2]).run(start, 30, 20)
        for compile in (True, False)
    ]
    torch.testing.assert_close(runs[0]["samples"], runs[1]["samples"], rtol=0, atol=1e-8)


def test_one_annotator_posterior_matches_quadrature():
    # p(eta | o) for one annotator and known scores, by quadrature on a fine grid:
    # Beta(2, 1) prior times prod_i [eta p_i + (1 - eta)(1 - p_i)] for agreeing
    # labels (p_i = sigmoid(s_i) the truth's probability of the label).
    sim = simulate_labels(num_items=150, num_annotators=1, shared_truth=False, seed=4)
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    scorer = FixedLogits(torch.as_tensor(sim.scores))
    prior = dist.Beta(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    model = SymmetricFlip(1, prior=prior)
    fit_em(model, scorer, data)
    logits = scorer(data).detach()
    draws = run_nuts(
        copy.deepcopy(model).bayesian(), logits, data, num_chains=4, warmup=300, draws=1000
    )
    eta = draws.samples["eta"][..., 0].reshape(-1)

    grid = np.linspace(1e-4, 1 - 1e-4, 20001)
    p_one = 1 / (1 + np.exp(-np.asarray(sim.scores, dtype=float)))
    p_label = np.where(np.asarray(sim.label) == 1, p_one, 1 - p_one)
    log_post = np.log(2 * grid) + np.log(
        grid[:, None] * p_label + (1 - grid[:, None]) * (1 - p_label)
    ).sum(1)
    weight = np.exp(log_post - log_post.max())
    weight /= weight.sum()
    mean = float((weight * grid).sum())
    sd = math.sqrt(float((weight * (grid - mean) ** 2).sum()))
    assert abs(eta.mean() - mean) < 0.1 * sd, (eta.mean(), mean, sd)
    assert abs(eta.std() / sd - 1) < 0.08, (eta.std(), sd)
    cdf = np.cumsum(weight)
    for q in (0.05, 0.5, 0.95):
        assert abs(np.quantile(eta, q) - grid[np.searchsorted(cdf, q)]) < 0.15 * sd


def test_unknown_kernel_options_are_errors():
    sim = simulate_labels(num_items=100, num_annotators=2, shared_truth=False, seed=5)
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=2)
    prior = dist.Beta(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    model = SymmetricFlip(2, prior=prior).bayesian()
    with pytest.raises(ValueError, match="full_mass.*step_size, adapt_step_size"):
        run_nuts(
            model,
            torch.as_tensor(sim.scores),
            data,
            num_chains=1,
            warmup=5,
            draws=5,
            kernel_options={"full_mass": True},
        )


def test_a_branch_on_parameter_values_is_caught_at_the_starts():
    # The record holds the branch taken at its point; a start on the other side gets
    # a different potential, which the check refuses.
    def energy(params: dict[str, torch.Tensor]) -> torch.Tensor:
        x = params["x"]
        return (x**2).sum() if bool(x.sum() > 0) else 10 * (x**2).sum()

    potential = BatchedPotential(energy, {"x": torch.ones(2, dtype=F64)})
    potential.check(torch.tensor([[1.0, 2.0], [0.5, 0.1]], dtype=F64))
    with pytest.raises(RuntimeError, match="jit_compile=False"):
        potential.check(torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64))
    uncompiled = BatchedPotential(energy, {"x": torch.ones(2, dtype=F64)}, compile=False)
    energy_values, _ = uncompiled(torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64))
    torch.testing.assert_close(energy_values, torch.tensor([5.0, 50.0], dtype=F64))
