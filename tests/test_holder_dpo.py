"""Tests of the Hölder-DPO baseline (repo.likelihoods.baselines.HolderDPOLikelihood):
closed forms, the redescending gradient, the gamma -> 0 limit, the population
minimiser, the [loss] configuration and a short training run on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from repo.data.rule_pairs import rule_pairs
from repo.likelihoods import DPOLikelihood, HolderDPOLikelihood, PairLogps, get_likelihood
from repo.train import ConfigError, TrainConfig, Trainer

DTYPE = torch.float64


def margin_stats(h: list[float] | torch.Tensor, requires_grad: bool = False) -> PairLogps:
    """Pairs whose implicit-reward margin r(A) - r(B) is ``h`` (reference log-probs 0)."""
    h = torch.as_tensor(h, dtype=DTYPE)
    policy_a = h.clone().requires_grad_(requires_grad)
    zeros = torch.zeros_like(h)
    ones = torch.ones_like(h)
    return PairLogps(policy_a, zeros, ones, ones, zeros, zeros)


def margin_gradient(lik, h: list[float]) -> torch.Tensor:
    """dL/dh per pair, by autograd."""
    st = margin_stats(h, requires_grad=True)
    (grad,) = torch.autograd.grad(lik.loss(st).sum(), st.policy_a)
    return grad


# --------------------------------------------------------------------------- closed forms


def test_loss_values_by_hand() -> None:
    # gamma = 1 is the Brier score minus one: (1 - p)^2 - 1; at p = 1/2 that is -0.75
    brier = HolderDPOLikelihood(beta=1.0, gamma=1.0)
    torch.testing.assert_close(brier.loss(margin_stats([0.0])), torch.tensor([-0.75], dtype=DTYPE))
    # gamma = 2, p = 3/4 (beta h = log 3): -3 (9/16) + 2 (27/64) = -27/32
    lik = HolderDPOLikelihood(beta=0.5, gamma=2.0)
    torch.testing.assert_close(
        lik.loss(margin_stats([2 * math.log(3.0)])), torch.tensor([-27 / 32], dtype=DTYPE)
    )
    # the limits of p: 0 (the loss's maximum) and -1 (its minimum)
    torch.testing.assert_close(
        lik.loss(margin_stats([-2000.0, 2000.0])), torch.tensor([0.0, -1.0], dtype=DTYPE)
    )


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_loss_and_gradient_match_the_closed_forms(gamma: float) -> None:
    beta = 0.7
    h = torch.linspace(-12, 12, 49, dtype=DTYPE)
    lik = HolderDPOLikelihood(beta=beta, gamma=gamma)
    p = torch.sigmoid(beta * h)
    torch.testing.assert_close(
        lik.loss(margin_stats(h)), -(1 + gamma) * p**gamma + gamma * p ** (1 + gamma)
    )
    # dL/dh = beta dL/dm = -beta gamma (1 + gamma) p^gamma (1 - p)^2
    expected = -beta * gamma * (1 + gamma) * p**gamma * (1 - p) ** 2
    torch.testing.assert_close(margin_gradient(lik, h), expected)
    # ... which is DPO's gradient times gamma (1 + gamma) p^gamma (1 - p)
    dpo = margin_gradient(DPOLikelihood(beta=beta), h)
    torch.testing.assert_close(
        margin_gradient(lik, h), dpo * gamma * (1 + gamma) * p**gamma * (1 - p)
    )


def test_induced_logit_closed_form_sign_and_bound() -> None:
    beta, gamma = 0.4, 0.8
    lik = HolderDPOLikelihood(beta=beta, gamma=gamma)
    h = torch.tensor([-300.0, -7.0, -0.5, 0.0, 0.5, 7.0, 300.0], dtype=DTYPE)
    st = margin_stats(h)
    p = torch.sigmoid(beta * h)

    def f(q):
        return -(1 + gamma) * q**gamma + gamma * q ** (1 + gamma)

    s = lik.logits(st)
    torch.testing.assert_close(s, f(1 - p) - f(p))
    torch.testing.assert_close(s, lik.loss(st.swap()) - lik.loss(st))  # the generic form
    assert torch.equal(torch.sign(s), torch.sign(h))  # the induced model orders as DPO's
    assert s.abs().max() <= 1.0 and s[-1] == pytest.approx(1.0)  # bounded loss, |s| <= 1
    assert not lik.likelihood_style
    torch.testing.assert_close(lik.policy_loss(st, 1.0), lik.loss(st))  # variant: mixture


# --------------------------------------------------------------------------- robustness


def test_gradient_redescends_on_contradicted_pairs_unlike_dpo() -> None:
    """A pair the model confidently contradicts (very negative margin: a mislabelled or
    outlying pair) stops pulling: |dL/dh| -> 0, where DPO's tends to beta."""
    beta, gamma = 1.0, 0.5
    h = [-5.0, -10.0, -20.0, -40.0, -80.0]
    holder = margin_gradient(HolderDPOLikelihood(beta=beta, gamma=gamma), h).abs()
    dpo = margin_gradient(DPOLikelihood(beta=beta), h).abs()
    assert torch.all(holder[1:] < holder[:-1])  # falling with the margin
    assert holder[-1] < 1e-16
    # the tail: gamma (1 + gamma) exp(gamma m) (relative error O(exp(m)))
    tail = gamma * (1 + gamma) * torch.exp(gamma * torch.tensor(h[2:], dtype=DTYPE))
    torch.testing.assert_close(holder[2:], tail, rtol=1e-8, atol=0)
    torch.testing.assert_close(dpo[2:], torch.full((3,), beta, dtype=DTYPE))
    # the pull is largest at p = gamma / (2 + gamma), i.e. m = log(gamma / 2) (-1.39)
    grid = torch.linspace(-30, 30, 601, dtype=DTYPE).tolist()
    g = margin_gradient(HolderDPOLikelihood(beta=beta, gamma=gamma), grid).abs()
    assert grid[int(g.argmax())] == pytest.approx(math.log(gamma / 2), abs=0.05)


def test_small_gamma_limit() -> None:
    """gamma -> 0: (L + 1) / gamma -> -log sigmoid(m) - sigmoid(-m), whose gradient is
    DPO's times sigmoid(-m); on a contradicted pair it is DPO's (the robustness goes)."""
    beta = 0.5
    h = torch.tensor([-60.0, -8.0, -1.0, 0.0, 1.0, 8.0], dtype=DTYPE)
    m = beta * h
    limit = -F.logsigmoid(m) - torch.sigmoid(-m)
    for gamma, tol in ((1e-3, 5e-2), (1e-5, 5e-4), (1e-7, 5e-6)):
        lik = HolderDPOLikelihood(beta=beta, gamma=gamma)
        scaled = (lik.loss(margin_stats(h)) + 1) / gamma
        torch.testing.assert_close(scaled, limit, rtol=tol, atol=tol)
        grad = margin_gradient(lik, h.tolist()) / gamma
        torch.testing.assert_close(grad, -beta * torch.sigmoid(-m) ** 2, rtol=tol, atol=tol)
    dpo = margin_gradient(DPOLikelihood(beta=beta), [-60.0])
    small = margin_gradient(HolderDPOLikelihood(beta=beta, gamma=1e-7), [-60.0]) / 1e-7
    torch.testing.assert_close(small, dpo, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("gamma", "pi"), [(1.0, 0.8), (0.5, 0.7), (1.5, 0.9), (0.2, 0.6)])
def test_population_minimiser(gamma: float, pi: float) -> None:
    """Labels saying "A" with probability pi: the expected loss is least at
    logit p = logit(pi) / (2 - gamma) - the true odds only at gamma = 1."""
    lik = HolderDPOLikelihood(beta=1.0, gamma=gamma)

    def expected(m: float) -> float:
        st = margin_stats([m])
        return float(pi * lik.loss(st) + (1 - pi) * lik.loss(st.swap()))

    found = minimize_scalar(expected, bounds=(-20, 20), method="bounded", options={"xatol": 1e-9})
    assert found.x == pytest.approx(math.log(pi / (1 - pi)) / (2 - gamma), abs=1e-5)


def test_bad_gamma_and_registry() -> None:
    for gamma in (0.0, -0.5, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="gamma"):
            HolderDPOLikelihood(gamma=gamma)
    lik = get_likelihood("Holder_DPO", beta=0.2, gamma=0.5)
    assert isinstance(lik, HolderDPOLikelihood) and lik.hparams() == {"beta": 0.2, "gamma": 0.5}
    assert HolderDPOLikelihood().hparams() == {"beta": 0.1, "gamma": 1.0}
    with pytest.raises(ValueError, match="reference"):
        lik.loss(PairLogps(*(torch.zeros(2, dtype=DTYPE),) * 2, *(torch.ones(2),) * 2))


# --------------------------------------------------------------------------- config and training


def config(tmp_path: Path, loss: dict) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"recipe": "tiny-llama", "device": "cpu"},
            "data": {"train": "data.jsonl"},
            "loss": loss,
            "run": {"output_dir": "run", "progress": False},
        },
        base_dir=tmp_path,
    )


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"family": "holder_dpo", "gamma": 0.0}, "[loss] gamma must be finite and > 0, got 0.0"),
        ({"family": "holder_dpo", "gamma": -0.5}, "[loss] gamma must be finite and > 0"),
        ({"family": "holder_dpo", "epsilon": 0.1}, "[loss] epsilon does not apply to family"),
        ({"family": "dpo", "gamma": 2.0}, "(it is an option of simpo, holder_dpo)"),
        ({"family": "simpo", "gamma": -0.5}, "[loss] gamma must be finite and >= 0"),
    ],
)
def test_config_refuses_bad_options(tmp_path, loss, message) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, loss)
    assert message in str(info.value)


def test_config_passes_gamma_and_defaults(tmp_path) -> None:
    cfg = config(tmp_path, {"family": "holder_dpo", "gamma": 0.5})
    assert cfg.likelihood_kwargs(0.3) == {"beta": 0.3, "gamma": 0.5}
    unset = config(tmp_path, {"family": "holder_dpo"})
    assert unset.likelihood_kwargs(0.3) == {"beta": 0.3}
    assert get_likelihood("holder_dpo", **unset.likelihood_kwargs(0.3)).gamma == 1.0


def test_plain_holder_dpo_trains_the_tiny_model(tmp_path, monkeypatch) -> None:
    """Three epochs of plain Hölder-DPO on 64 clean rule pairs (the noise sweep's
    settings): the loss (in [-1, 0]) falls, held-out pairs are ranked well above
    chance, the annotators are left alone, and the run records the family and gamma."""
    from repo.data.loaders import load_preferences
    from repo.experiments import Method, rule_config
    from repo.train.run_dir import RunDir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = rule_pairs(64, [1.0], seed=10, markers=4).rows
        held_out = rule_pairs(100, [1.0], seed=10_010, markers=4).rows
        method = Method("Hölder-DPO", "holder_dpo", False, {"beta": 0.3, "gamma": 0.5})
        cfg = rule_config(str(tmp_path / "run"), method, seed=10, optim={"epochs": 3})
        trainer = Trainer(cfg, records=load_preferences(train, annotator_column="annotator"))
        assert isinstance(trainer.likelihood, HolderDPOLikelihood)
        assert trainer.likelihood.hparams() == {"beta": 0.3, "gamma": 0.5}
        eta = trainer.noise.eta.detach().clone()
        trainer.train()
        losses = [r["loss"] for r in trainer.metrics_log.read()]
        assert len(losses) == 12 and all(-1.0 <= x <= 0.0 for x in losses), losses
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
        accuracy = trainer.evaluate(load_preferences(held_out, annotator_column="annotator"))
        assert accuracy["accuracy"] > 0.7, accuracy
        torch.testing.assert_close(trainer.noise.eta.detach(), eta)
        resolved = RunDir(tmp_path / "run").read_resolved()  # what `re-po eval` rebuilds it from
        assert resolved["likelihood"] == {
            "family": "holder_dpo",
            "variant": "mixture",
            "beta": 0.3,
            "gamma": 0.5,
        }
    finally:
        torch.set_num_threads(threads)
