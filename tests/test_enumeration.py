"""The enumeration E-step against closed forms."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from repo.inference.enumeration import enumerate_posterior, marginal_log_likelihood
from repo.noise import Boltzmann, LabelData, Spammer, SymmetricFlip, TwoCoin


def _random_labels(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    annotator = torch.randint(0, k, (n,), generator=g)
    label = torch.randint(0, 2, (n,), generator=g).double()
    logits = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    eta = 0.05 + 0.9 * torch.rand(k, generator=g, dtype=torch.float64)
    return annotator, label, logits, eta


def test_symmetric_per_label_equals_paper_closed_form():
    annotator, label, logits, eta = _random_labels(5000, 30, 0)
    data = LabelData.from_labels(annotator, label)
    model = SymmetricFlip(30)
    model.eta = eta
    posterior = enumerate_posterior(model.model, logits, data)
    q1 = posterior.marginals["z"][..., 1].reshape(-1)
    w = model.label_correct(logits, data, posterior.marginals).reshape(-1)

    # PAPER.md: p_i = p(observed winner truly better), w = p eta / (p eta + (1-p)(1-eta)).
    p = torch.where(label == 1, torch.sigmoid(logits), torch.sigmoid(-logits))
    e = eta[annotator]
    w_closed = p * e / (p * e + (1 - p) * (1 - e))
    assert torch.allclose(w, w_closed, atol=1e-6, rtol=0)
    assert torch.allclose(torch.where(label == 1, q1, 1 - q1), w_closed, atol=1e-6, rtol=0)
    ll_closed = torch.log(p * e + (1 - p) * (1 - e))
    assert torch.allclose(posterior.log_likelihood, ll_closed, atol=1e-9)
    total = marginal_log_likelihood(model.model, logits, data)
    assert float(total.detach()) == pytest.approx(float(ll_closed.sum()), rel=1e-12)


def test_shared_truth_posterior_equals_product_form():
    g = torch.Generator().manual_seed(1)
    n, k, items = 3000, 12, 700
    item = torch.randint(0, items, (n,), generator=g)
    annotator = torch.randint(0, k, (n,), generator=g)
    label = torch.randint(0, 2, (n,), generator=g).double()
    data = LabelData.from_labels(annotator, label, item, shared_truth=True, num_annotators=k)
    logits = torch.randn(data.num_units, generator=g, dtype=torch.float64)
    model = TwoCoin(k)
    model.eta_a = 0.5 + 0.45 * torch.rand(k, generator=g, dtype=torch.float64)
    model.eta_b = 0.5 + 0.45 * torch.rand(k, generator=g, dtype=torch.float64)
    posterior = enumerate_posterior(model.model, logits, data)

    ea, eb = model.eta_a.detach()[data.annotator], model.eta_b.detach()[data.annotator]
    o, mask = data.label, data.mask
    like_a = torch.where(mask, torch.where(o == 1, ea, 1 - ea), torch.ones_like(ea)).prod(-1)
    like_b = torch.where(mask, torch.where(o == 1, 1 - eb, eb), torch.ones_like(eb)).prod(-1)
    prior = torch.sigmoid(logits)
    evidence = prior * like_a + (1 - prior) * like_b
    q1_closed = prior * like_a / evidence
    q1 = posterior.marginals["z"][..., 1].reshape(-1)
    assert torch.allclose(q1, q1_closed, atol=1e-6, rtol=0)
    assert torch.allclose(posterior.log_likelihood, evidence.log(), atol=1e-9)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-label"])
def test_spammer_nested_enumeration_matches_brute_force(shared):
    # Per-label truth has one label slot per unit: a plate of size 1.
    g = torch.Generator().manual_seed(2)
    n, k = 400, 5
    item = torch.randint(0, 150, (n,), generator=g)
    annotator = torch.randint(0, k, (n,), generator=g)
    label = torch.randint(0, 2, (n,), generator=g).double()
    data = LabelData.from_labels(
        annotator, label, item if shared else None, shared_truth=shared, num_annotators=k
    )
    logits = torch.randn(data.num_units, generator=g, dtype=torch.float64)
    model = Spammer(k)
    theta = 0.3 + 0.6 * torch.rand(k, generator=g, dtype=torch.float64)
    bias = torch.rand(k, generator=g, dtype=torch.float64)
    model.theta, model.bias = theta, bias
    posterior = enumerate_posterior(model.model, logits, data)

    t, b = theta[data.annotator], bias[data.annotator]
    o, mask = data.label, data.mask

    def channel(z):  # p(o | z) with the honesty indicator summed out
        p1 = t * z + (1 - t) * b
        return torch.where(mask, torch.where(o == 1, p1, 1 - p1), torch.ones_like(p1))

    prior = torch.sigmoid(logits)
    joint_a = prior * channel(1.0).prod(-1)
    joint_b = (1 - prior) * channel(0.0).prod(-1)
    q1 = posterior.marginals["z"][..., 1].reshape(-1)
    assert torch.allclose(q1, joint_a / (joint_a + joint_b), atol=1e-6, rtol=0)
    assert torch.allclose(posterior.log_likelihood, (joint_a + joint_b).log(), atol=1e-9)
    # p(honest | o) for one label, by Bayes' rule over (z, c).
    i, s = 0, 0
    p_z = torch.stack([joint_b[i], joint_a[i]]) / (joint_a[i] + joint_b[i])
    honest = 0.0
    for z in (0, 1):
        pz = float(p_z[z])
        lik_h = t[i, s] * (z if o[i, s] == 1 else 1 - z)
        lik_all = channel(float(z))[i, s]
        honest += pz * float(lik_h / lik_all)
    assert float(posterior.marginals["honest"][i, s, 1]) == pytest.approx(honest, abs=1e-6)


def test_pointwise_log_likelihood_of_two_unconnected_latents():
    """Two independent latents per unit: no single root connects the factors, so
    the pointwise log-likelihood is the contraction to the items plate."""
    g = torch.Generator().manual_seed(3)
    n = 50
    logits_a = torch.randn(n, generator=g, dtype=torch.float64)
    logits_b = torch.randn(n, generator=g, dtype=torch.float64)
    obs_a = torch.randint(0, 2, (n, 1), generator=g).double()
    obs_b = torch.randint(0, 2, (n, 1), generator=g).double()

    def model():
        with pyro.plate("items", n, dim=-2):
            a = pyro.sample(
                "a", dist.Bernoulli(logits=logits_a.unsqueeze(-1)), infer={"enumerate": "parallel"}
            )
            b = pyro.sample(
                "b", dist.Bernoulli(logits=logits_b.unsqueeze(-1)), infer={"enumerate": "parallel"}
            )
            with pyro.plate("slots", 1, dim=-1):
                pyro.sample("oa", dist.Bernoulli(probs=0.2 + 0.6 * a), obs=obs_a)
                pyro.sample("ob", dist.Bernoulli(probs=0.9 - 0.7 * b), obs=obs_b)

    posterior = enumerate_posterior(model)

    def evidence(logits, obs, p1, p0):
        prior = torch.sigmoid(logits)
        like1 = torch.where(obs[:, 0] == 1, p1, 1 - p1)
        like0 = torch.where(obs[:, 0] == 1, p0, 1 - p0)
        return prior * like1 + (1 - prior) * like0

    expected = evidence(logits_a, obs_a, 0.8, 0.2).log() + evidence(logits_b, obs_b, 0.2, 0.9).log()
    assert torch.allclose(posterior.log_likelihood, expected, atol=1e-9)


def test_pointwise_log_likelihood_without_latents():
    g = torch.Generator().manual_seed(4)
    annotator, label, logits, _ = _random_labels(300, 4, seed=4)
    item = torch.randint(0, 100, (300,), generator=g)
    data = LabelData.from_labels(annotator, label, item, shared_truth=True, num_annotators=4)
    unit_logits = torch.randn(data.num_units, generator=g, dtype=torch.float64)
    model = Boltzmann(4, tau_init=1.7)
    posterior = enumerate_posterior(model.model, unit_logits, data)
    per_label = dist.Bernoulli(logits=1.7 * unit_logits.unsqueeze(-1)).log_prob(data.label)
    expected = torch.where(data.mask, per_label, torch.zeros_like(per_label)).sum(-1)
    assert posterior.marginals == {}
    assert torch.allclose(posterior.log_likelihood, expected, atol=1e-9)
    # one unit: the items plate has size 1, which packed tensors drop
    first = data.subset(torch.tensor([0]))
    single = enumerate_posterior(model.model, unit_logits[:1], first)
    assert torch.allclose(single.log_likelihood, expected[:1], atol=1e-9)


def test_beta_prior_is_a_distribution_on_reliabilities():
    model = SymmetricFlip(
        4, prior=dist.Beta(torch.tensor(4.0).double(), torch.tensor(1.5).double())
    )
    assert set(model.priors()) == {"eta"}
    assert torch.isfinite(model.log_prior())
