"""EM on simulated data with known truth: recovery, monotonicity, acceleration."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.em import EM, fit_em, set_value
from repo.inference.enumeration import enumerate_posterior
from repo.inference.online import fit_minibatch_em
from repo.noise import (
    Boltzmann,
    HierarchicalFlip,
    LabelData,
    Spammer,
    SymmetricFlip,
    TwoCoin,
    make_noise_model,
)
from repo.scorers import BradleyTerry, ClassPrior, FixedLogits


def _per_label(sim, k):
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=k)
    return data, FixedLogits(torch.as_tensor(sim.scores))


def _shared(sim, k):
    return LabelData.from_labels(
        sim.annotator, sim.label, sim.item, shared_truth=True, num_annotators=k
    )


def _annotator_eta(model, logits, data):
    implied = model.implied_eta(logits, data)
    return (data.per_annotator_sum(implied) / data.label_counts().clamp_min(1)).numpy()


def _non_decreasing(trace, rel=1e-10):
    return all(b >= a - rel * abs(a) for a, b in zip(trace, trace[1:], strict=False))


def test_symmetric_recovers_eta_with_known_scores():
    # 100,000 labels, 100 annotators, eta ~ U(0.55, 0.98), s ~ N(0, 3^2) given.
    sim = simulate_labels(
        num_items=100_000, num_annotators=100, shared_truth=False, eta_range=(0.55, 0.98), seed=0
    )
    data, scorer = _per_label(sim, 100)
    model = SymmetricFlip(100)
    result = fit_em(model, scorer, data)
    assert result.converged
    mae = np.abs(model.eta.detach().numpy() - sim.eta).mean()
    assert mae <= 0.02


def test_shared_truth_beats_majority_vote():
    # 20,000 items, 200 annotators, 5 labels per item, eta ~ U(0.5, 0.98), no scorer.
    sim = simulate_labels(
        num_items=20_000, num_annotators=200, labels_per_item=5, eta_range=(0.5, 0.98), seed=1
    )
    data = _shared(sim, 200)
    model, scorer = SymmetricFlip(200), ClassPrior()
    result = fit_em(model, scorer, data)
    truth = sim.item_truth[data.unit.numpy()]
    q1 = model.truth_posterior(result.logits, result.posterior.marginals).numpy()
    accuracy = ((q1 > 0.5) == truth).mean()
    votes = sim.frame().groupby("item").label.mean().to_numpy()[data.unit.numpy()]
    majority = ((votes > 0.5) == truth).mean()  # 5 labels: never a tie
    assert accuracy >= majority + 0.02
    assert np.abs(_annotator_eta(model, result.logits, data) - sim.eta).mean() <= 0.03


def test_hierarchical_recovers_sigma_and_helps_sparse_annotators():
    k = 500
    rng = np.random.default_rng(7)
    weights = rng.lognormal(0.0, 1.5, k)  # many annotators with a handful of labels
    sim = simulate_labels(
        num_items=20_000,
        num_annotators=k,
        model="hierarchical",
        shared_truth=False,
        annotator_weights=weights,
        mu=1.5,
        sigma=0.8,
        seed=3,
    )
    data, scorer = _per_label(sim, k)
    hier = HierarchicalFlip(k)
    result = fit_em(hier, scorer, data)
    assert result.converged
    sigma = float(hier.sigma.detach())
    assert abs(sigma - 0.8) <= 0.25 * 0.8
    assert abs(float(hier.mu.detach()) - 1.5) <= 0.2
    flat = SymmetricFlip(k)
    fit_em(flat, FixedLogits(torch.as_tensor(sim.scores)), data)
    counts = data.label_counts().numpy()
    sparse = (counts >= 1) & (counts <= 5)
    assert sparse.sum() >= 50
    err_hier = np.abs(hier.post_eta.numpy() - sim.eta)[sparse].mean()
    err_flat = np.abs(flat.eta.detach().numpy() - sim.eta)[sparse].mean()
    assert err_hier < err_flat


@pytest.mark.parametrize("name", ["symmetric", "two-coin", "spammer", "hierarchical"])
@pytest.mark.parametrize("shared", [True, False])
def test_plain_em_never_decreases(name, shared):
    k = 20
    sim = simulate_labels(
        num_items=1500 if shared else 4000,
        num_annotators=k,
        labels_per_item=3 if shared else 1,
        shared_truth=shared,
        adversarial_fraction=0.1,
        seed=4,
    )
    if shared:
        data, scorer = _shared(sim, k), ClassPrior()
    else:
        data, scorer = _per_label(sim, k)
    model = make_noise_model(name, k)
    result = fit_em(model, scorer, data, accelerate=False, tol=1e-10, max_iter=200)
    # With fixed scores the hierarchical M-step maximises the marginal likelihood
    # itself: one step reaches the optimum (trace: start, optimum, optimum again).
    assert len(result.trace) >= (3 if name == "hierarchical" and not shared else 4)
    assert result.trace[-1] > result.trace[0]
    assert _non_decreasing(result.trace)


def test_squarem_reaches_the_plain_em_optimum_faster():
    sim = simulate_labels(num_items=3000, num_annotators=60, labels_per_item=3, seed=5)
    data = _shared(sim, 60)
    plain, fast = SymmetricFlip(60), SymmetricFlip(60)
    r_plain = fit_em(plain, ClassPrior(), data, accelerate=False, tol=1e-12, max_iter=5000)
    r_fast = fit_em(fast, ClassPrior(), data, accelerate=True, tol=1e-12, max_iter=5000)
    assert r_fast.iterations < r_plain.iterations
    assert r_fast.objective == pytest.approx(r_plain.objective, rel=1e-8)
    assert torch.allclose(fast.eta.detach(), plain.eta.detach(), atol=1e-4)
    assert _non_decreasing(r_fast.trace)


def test_two_coin_parameters_come_back():
    k = 30
    sim = simulate_labels(
        num_items=30_000, num_annotators=k, labels_per_item=3, model="two-coin", seed=6
    )
    data = _shared(sim, k)
    model = TwoCoin(k)
    fit_em(model, ClassPrior(), data)
    assert np.abs(model.eta_a.detach().numpy() - sim.params["eta_a"]).mean() < 0.02
    assert np.abs(model.eta_b.detach().numpy() - sim.params["eta_b"]).mean() < 0.02


def test_spammer_parameters_come_back():
    k = 30
    sim = simulate_labels(
        num_items=30_000,
        num_annotators=k,
        labels_per_item=4,
        model="spammer",
        eta_range=(0.3, 0.95),
        seed=8,
    )
    data = _shared(sim, k)
    model = Spammer(k)
    fit_em(model, ClassPrior(), data)
    theta = model.theta.detach().numpy()
    assert np.abs(theta - sim.params["theta"]).mean() < 0.03
    spammy = sim.params["theta"] < 0.7  # enough spam labels to see the bias
    bias_err = np.abs(model.bias.detach().numpy() - sim.params["bias"])[spammy].mean()
    assert bias_err < 0.06


def test_boltzmann_parameters_come_back():
    k = 20
    sim = simulate_labels(
        num_items=40_000, num_annotators=k, model="boltzmann", shared_truth=False, seed=9
    )
    data, scorer = _per_label(sim, k)
    model = Boltzmann(k)
    result = fit_em(model, scorer, data)
    assert result.converged
    assert np.abs(model.tau.detach().numpy() - sim.params["tau"]).mean() < 0.1


def test_hierarchical_population_comes_back_under_shared_truth():
    k = 300
    sim = simulate_labels(
        num_items=30_000,
        num_annotators=k,
        labels_per_item=3,
        model="hierarchical",
        mu=1.5,
        sigma=0.8,
        seed=10,
    )
    model = HierarchicalFlip(k)
    result = fit_em(model, ClassPrior(), _shared(sim, k))
    assert result.converged
    assert abs(float(model.mu.detach()) - 1.5) < 0.25
    assert abs(float(model.sigma.detach()) - 0.8) < 0.3


@pytest.mark.parametrize("cls", [TwoCoin, Spammer])
def test_position_models_do_not_collapse_to_always_a(cls):
    # A/B independent of the label: the truth is A for about half the items.
    k = 40
    sim = simulate_labels(num_items=8000, num_annotators=k, labels_per_item=3, seed=11)
    data = _shared(sim, k)
    model, scorer = cls(k), ClassPrior()
    result = fit_em(model, scorer, data)
    pi_a = float(torch.sigmoid(scorer.logit_pi.detach()))
    assert 0.4 < pi_a < 0.6
    truth = sim.item_truth[data.unit.numpy()]
    q1 = model.truth_posterior(result.logits, result.posterior.marginals).numpy()
    # The Bayes-optimal accuracy here (true eta, true class prior) is 0.868 and
    # majority vote gets 0.833: a collapsed fit would sit near 0.5.
    oracle = SymmetricFlip(k)
    set_value(oracle, "eta", torch.as_tensor(sim.eta))
    zero = torch.zeros(data.num_units, dtype=torch.float64)
    best = oracle.truth_posterior(zero, enumerate_posterior(oracle.model, zero, data).marginals)
    best_accuracy = ((best.detach().numpy() > 0.5) == truth).mean()
    assert ((q1 > 0.5) == truth).mean() >= best_accuracy - 0.005
    eta = _annotator_eta(model, result.logits, data)
    assert np.abs(eta - sim.eta).mean() < 0.04


def test_crowd_bradley_terry_recovers_ranking():
    rng = np.random.default_rng(12)
    objects, k, n = 60, 15, 6000
    true_scores = rng.normal(0, 1.5, objects)
    eta = rng.uniform(0.6, 0.98, k)
    a = rng.integers(0, objects, n)
    b = (a + rng.integers(1, objects, n)) % objects
    annotator = rng.integers(0, k, n)
    p_a = 1 / (1 + np.exp(-(true_scores[a] - true_scores[b])))
    truth = rng.random(n) < p_a
    label = np.where(rng.random(n) < eta[annotator], truth, ~truth).astype(np.int64)
    data = LabelData.from_labels(annotator, label, num_annotators=k)
    scorer = BradleyTerry(torch.as_tensor(a), torch.as_tensor(b), objects)
    model = SymmetricFlip(k)
    result = fit_em(model, scorer, data)
    assert result.converged
    assert _non_decreasing(result.trace, rel=1e-8)
    estimated = scorer.centred().detach().numpy()
    rank = np.corrcoef(np.argsort(np.argsort(estimated)), np.argsort(np.argsort(true_scores)))
    assert rank[0, 1] > 0.95
    assert np.abs(model.eta.detach().numpy() - eta).mean() < 0.05


def test_closed_form_map_equals_generic_gradient_m_step():
    """Forcing the gradient M-step (no sufficient statistics) finds the same MAP."""

    class GradientOnly(SymmetricFlip):
        def sufficient_statistics(self, data, marginals, logits):
            return None

    sim = simulate_labels(num_items=2000, num_annotators=10, shared_truth=False, seed=13)
    data, scorer = _per_label(sim, 10)
    prior = dist.Beta(torch.tensor(4.0).double(), torch.tensor(1.5).double())
    closed, generic = SymmetricFlip(10, prior=prior), GradientOnly(10, prior=prior)
    fit_em(closed, scorer, data, tol=1e-12)
    em = EM(generic, scorer, data)
    assert em.gradient_parameters  # the generic path is the one under test
    em.fit(tol=1e-12)
    assert torch.allclose(closed.eta.detach(), generic.eta.detach(), atol=1e-5)
    # and the prior pulls towards its mode relative to maximum likelihood
    mle = SymmetricFlip(10)
    fit_em(mle, scorer, data, tol=1e-12)
    assert not torch.allclose(mle.eta.detach(), closed.eta.detach(), atol=1e-6)


def test_minibatch_ema_approaches_full_batch():
    sim = simulate_labels(num_items=40_000, num_annotators=20, shared_truth=False, seed=14)
    data, scorer = _per_label(sim, 20)
    full, mini = SymmetricFlip(20), SymmetricFlip(20)
    fit_em(full, scorer, data)
    generator = torch.Generator().manual_seed(0)
    fit_minibatch_em(mini, scorer, data, batch_size=2000, alpha=0.1, epochs=3, generator=generator)
    assert np.abs(mini.eta.detach().numpy() - full.eta.detach().numpy()).mean() < 0.02
    with pytest.raises(ValueError, match="alpha"):
        fit_minibatch_em(mini, scorer, data, batch_size=10, alpha=0.0)


def test_minibatch_hierarchical_keeps_whole_data_posteriors():
    # The hierarchical reliabilities are posteriors of whole-data statistics: mini-batch
    # EM runs its EMA on those statistics (scaled to the data), not on one batch's.
    k = 30
    sim = simulate_labels(
        num_items=30_000, num_annotators=k, model="hierarchical", shared_truth=False, seed=17
    )
    data, scorer = _per_label(sim, k)
    full, mini = HierarchicalFlip(k), HierarchicalFlip(k)
    fit_em(full, scorer, data)
    generator = torch.Generator().manual_seed(0)
    fit_minibatch_em(mini, scorer, data, batch_size=3000, alpha=0.1, epochs=3, generator=generator)
    assert np.abs(mini.post_eta.numpy() - full.post_eta.numpy()).mean() < 0.02
    assert abs(float(mini.mu.detach()) - float(full.mu.detach())) < 0.15


def test_models_of_one_class_keep_their_own_parameters():
    # Pyro's global param store would otherwise share "eta" between instances.
    sim = simulate_labels(num_items=3000, num_annotators=5, shared_truth=False, seed=15)
    data, scorer = _per_label(sim, 5)
    first, second = SymmetricFlip(5), SymmetricFlip(5, eta_init=0.6)
    fit_em(first, scorer, data)
    assert torch.allclose(second.eta.detach(), torch.full((5,), 0.6, dtype=torch.float64))


@pytest.mark.parametrize("shared", [True, False])
def test_hierarchical_evidence_never_exceeds_the_flat_maximum(shared):
    # log p(o | mu, sigma) = log E[p(o | eta)] <= max_eta log p(o | eta): a population
    # narrower than the quadrature grid must not inflate the evidence (3 annotators
    # of equal reliability drive the EB estimate of sigma to its floor).
    k = 3
    sim = simulate_labels(
        num_items=900 if shared else 3000,
        num_annotators=k,
        labels_per_item=3 if shared else 1,
        shared_truth=shared,
        eta_range=(0.9, 0.9),
        seed=16,
    )
    if shared:
        data, flat_scorer, hier_scorer = _shared(sim, k), ClassPrior(), ClassPrior()
    else:
        data, flat_scorer = _per_label(sim, k)
        hier_scorer = flat_scorer
    flat = fit_em(SymmetricFlip(k), flat_scorer, data, tol=1e-10)
    hier_model = HierarchicalFlip(k)
    hier = fit_em(hier_model, hier_scorer, data, tol=1e-10)
    assert float(hier_model.sigma.detach()) < 0.3
    assert hier.objective <= flat.objective + 1e-6
