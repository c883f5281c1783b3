"""The annotator refit at the end of each pass (``OnlineEM(pass_refit=True)``,
``[em] epoch_m_step``): EM to convergence on the logits the pass's E-steps read."""

from __future__ import annotations

import copy

import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.online import OnlineEM, fit_calibrated, fit_from_starts
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.scorers import FixedLogits

TRUE_ETA = (0.95, 0.75, 0.25)


def _pool(
    num_items: int, seed: int, dull: float = 4.0
) -> tuple[torch.Tensor, LabelData, torch.Tensor]:
    """One label an item from three annotators of :data:`TRUE_ETA`; the scores a policy
    would give, under-confident by a factor ``dull``; the realised reliabilities."""
    sim = simulate_labels(
        num_items=num_items, num_annotators=3, shared_truth=False, eta_range=(0.5, 0.5), seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    annotator = torch.as_tensor(sim.annotator)
    truth = torch.as_tensor(sim.truth).to(torch.float64)
    correct = torch.rand(num_items, generator=gen, dtype=torch.float64) < torch.tensor(TRUE_ETA)[
        annotator
    ].to(torch.float64)
    label = torch.where(correct, truth, 1 - truth)
    data = LabelData.from_labels(annotator, label, num_annotators=3)
    scores = torch.as_tensor(sim.scores, dtype=torch.float64) / dull
    realised = torch.stack([correct[annotator == k].to(torch.float64).mean() for k in range(3)])
    return scores, data, realised


def _one_pass(online: OnlineEM, scores: torch.Tensor, data: LabelData, batch: int = 64) -> int:
    step = 0
    for start in range(0, data.num_units, batch):
        part = data.subset(torch.arange(start, min(start + batch, data.num_units)))
        online.e_step(scores[part.unit], part, step)
        online.m_step()
        step += 1
    return step


def test_the_refit_is_em_on_the_pass_scores_and_finds_the_adversary():
    # an E-step that learns its scale: the refit learns it jointly
    scores, data, realised = _pool(3000, seed=0)
    online = OnlineEM(
        SymmetricFlip(3), num_items=3000, labels=data, pass_refit=True, calibrate=True
    )
    plain = OnlineEM(SymmetricFlip(3), num_items=3000, labels=data, calibrate=True)
    steps = _one_pass(online, scores, data)
    _one_pass(plain, scores, data)
    before = copy.deepcopy(online.noise.state_dict())
    torch.testing.assert_close(online.pass_logits, scores)  # the scores the E-steps read
    result = online.end_pass(steps)
    assert result is not None and result.converged
    eta = online.noise.eta.detach().to(torch.float64)
    # the maximum of the marginal likelihood in (eta, a) at those scores, from the
    # same starts (the online estimate and eta_init, at every starting scale)
    direct = SymmetricFlip(3)
    starts = [before, SymmetricFlip(3).state_dict()]
    _, scorer = fit_calibrated(direct, scores, data, starts)
    torch.testing.assert_close(eta, direct.eta.detach().to(torch.float64), atol=1e-6, rtol=0)
    assert online.scale_of_refit == pytest.approx(float(scorer.scale.detach()), rel=1e-6)
    assert 3.0 < online.scale_of_refit < 5.5  # the scores were divided by 4
    # a known truth: the refit recovers the realised reliabilities, the adversary's
    # included, which the damped online update (from eta_init 0.9) is still far from
    assert (eta - realised).abs().max() < 0.05, (eta, realised)
    online_error = (plain.noise.eta.detach().to(torch.float64) - realised).abs().max()
    assert online_error > 0.1
    assert online.scale == online.scale_of_refit  # the E-step reads the refit's scale


def test_an_e_step_at_a_fixed_scale_refits_at_that_scale():
    # DPO's E-step reads sigmoid(s) as it is: so does the refit (scale 1, not learned)
    scores, data, realised = _pool(3000, seed=3, dull=1.0)
    online = OnlineEM(SymmetricFlip(3), num_items=3000, labels=data, pass_refit=True)
    steps = _one_pass(online, scores, data)
    before = copy.deepcopy(online.noise.state_dict())
    assert online.end_pass(steps) is not None
    direct = SymmetricFlip(3)
    fit_from_starts(direct, FixedLogits(scores), data, [before, SymmetricFlip(3).state_dict()])
    torch.testing.assert_close(online.noise.eta, direct.eta, atol=1e-6, rtol=0)
    assert online.scale == online.scale_of_refit == 1.0
    assert (online.noise.eta.detach().to(torch.float64) - realised).abs().max() < 0.05


def test_a_refit_on_scores_that_carry_nothing_is_refused():
    # a policy at chance: with one label an item the labels alone cannot tell a
    # reliable annotator from its mirror image, so the refit is not taken
    _, data, _ = _pool(600, seed=1)
    online = OnlineEM(SymmetricFlip(3), num_items=600, labels=data, pass_refit=True)
    steps = _one_pass(online, torch.zeros(600, dtype=torch.float64), data)
    before = online.noise.eta.detach().clone()
    assert online.end_pass(steps) is None
    torch.testing.assert_close(online.noise.eta.detach(), before)
    assert online.scale_of_refit is None


def test_the_next_pass_starts_its_own_scores_and_a_checkpoint_keeps_them():
    scores, data, _ = _pool(512, seed=2)
    online = OnlineEM(
        SymmetricFlip(3), num_items=512, labels=data, pass_refit=True, passes=2, warmup_steps=2
    )
    assert online.end_pass(1) is None  # the warm-up: nothing is refitted
    steps = _one_pass(online, scores, data)
    state = online.state_dict()
    resumed = OnlineEM(SymmetricFlip(3), num_items=512, labels=data, pass_refit=True, passes=2)
    resumed.load_state_dict(state)
    online.end_pass(steps)
    resumed.end_pass(steps)
    torch.testing.assert_close(resumed.noise.eta, online.noise.eta)
    # the next E-step starts the second pass: the first pass's scores are dropped
    for em in (online, resumed):
        part = data.subset(torch.arange(64))
        em.e_step(-scores[part.unit], part, steps)
        assert int((~torch.isnan(em.pass_logits)).sum()) == 64
        torch.testing.assert_close(em.pass_logits[:64], -scores[:64])


def test_the_refit_needs_the_items():
    with pytest.raises(ValueError, match="pass_refit needs the number of items"):
        OnlineEM(SymmetricFlip(2), pass_refit=True)


def test_one_annotator_s_only_pass_ends_with_a_refit_from_min_pass_refit_items():
    from repo.experiments import Method, rule_config
    from repo.likelihoods import get_likelihood
    from repo.noise import HierarchicalFlip
    from repo.train.build import MIN_PASS_REFIT, build_online_em, estep_settings

    ipo = get_likelihood("ipo")
    crossed = rule_config("unused", Method("RE-IPO", "ipo", True, {"beta": 0.1}), seed=0)
    one = SymmetricFlip(1)
    # by default one pass of RE-IPO reads cross-fitted scores (its mixture step), and
    # nothing is refitted; reading the policy (cross_fit = false) its pass ends refitted
    assert estep_settings(crossed, ipo, one, MIN_PASS_REFIT, 1).cross_fit
    assert not estep_settings(crossed, ipo, one, MIN_PASS_REFIT, 1).epoch_m_step
    auto = crossed.replace("em", cross_fit=False)
    settings = estep_settings(auto, ipo, one, MIN_PASS_REFIT, 1)
    assert settings.epoch_m_step and settings.calibrate and not settings.out_of_sample
    online = build_online_em(auto, one, ipo, num_items=MIN_PASS_REFIT, settings=settings)
    assert online.pass_refit
    assert not estep_settings(auto, ipo, one, MIN_PASS_REFIT - 1, 1).epoch_m_step  # too few
    # several passes: the E-steps of the later ones read a fit, and in-sample scores
    # (cross-fitted from MIN_CROSS_FIT items; below it the online update's, as before)
    assert not estep_settings(auto, ipo, one, MIN_PASS_REFIT, 2).epoch_m_step
    # DPO and SimPO refit on first visits already; CPO's own scores are not its scorers'
    for family in ("dpo", "simpo", "cpo"):
        assert not estep_settings(auto, get_likelihood(family), one, 8192, 1).epoch_m_step
    dull = auto.replace("em", calibrate=False)  # a refit at a fixed scale: no Platt fit
    assert not estep_settings(dull, ipo, one, 8192, 1).epoch_m_step
    off = auto.replace("em", epoch_m_step=False)
    assert not estep_settings(off, ipo, one, 8192, 1).epoch_m_step
    assert estep_settings(auto, ipo, HierarchicalFlip(1), 8192, 1).epoch_m_step


def test_one_annotator_s_refit_on_one_pass_recovers_eta_the_online_update_misses():
    # one annotator of realised reliability ~0.6, under-confident scores (a policy
    # learning): the online update is a moving average over the last batches, the
    # refit reads every item's score once
    sim = simulate_labels(
        num_items=8192, num_annotators=1, shared_truth=False, eta_range=(0.6, 0.6), seed=4
    )
    data = LabelData.from_labels(
        torch.as_tensor(sim.annotator), torch.as_tensor(sim.label), num_annotators=1
    )
    scores = torch.as_tensor(sim.scores, dtype=torch.float64) / 4.0
    realised = float((torch.as_tensor(sim.label) == torch.as_tensor(sim.truth)).double().mean())
    online = OnlineEM(
        SymmetricFlip(1), num_items=8192, labels=data, pass_refit=True, calibrate=True
    )
    steps = _one_pass(online, scores, data, batch=16)
    moving = float(online.noise.eta.detach())
    assert online.end_pass(steps) is not None
    refit = float(online.noise.eta.detach())
    assert abs(refit - realised) < 0.015, (refit, realised)
    assert abs(refit - realised) < abs(moving - realised), (refit, moving, realised)
