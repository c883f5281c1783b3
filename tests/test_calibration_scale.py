"""The E-step's learned logit scale: closed form, joint EM recovery, online updates."""

import math

import numpy as np
import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.em import fit_em
from repo.inference.online import SCALE_STEP, OnlineEM
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.scorers import CalibratedLogits, FixedLogits, calibration_scale


def test_calibration_scale_solves_the_score_equation():
    # sum_i (q_i - sigmoid(a c_i)) c_i = 0 at the returned a (interior solution).
    g = torch.Generator().manual_seed(0)
    c = torch.randn(500, generator=g, dtype=torch.float64)
    q = torch.sigmoid(2.5 * c + 0.3 * torch.randn(500, generator=g, dtype=torch.float64))
    a = calibration_scale(c, q)
    score = float(((q - torch.sigmoid(a * c)) * c).sum())
    assert abs(score) < 1e-8

    # the maximiser: the objective is lower a little either side
    def objective(x: float) -> float:
        return float((q * torch.sigmoid(x * c).log() + (1 - q) * torch.sigmoid(-x * c).log()).sum())

    assert objective(a) > objective(a * 1.01) and objective(a) > objective(a * 0.99)


def test_calibration_scale_recovers_a_known_scale():
    # hard outcomes z ~ Bernoulli(sigmoid(a c)): the logistic MLE of a is consistent.
    g = torch.Generator().manual_seed(1)
    c = torch.randn(200_000, generator=g, dtype=torch.float64)
    z = (torch.rand(200_000, generator=g, dtype=torch.float64) < torch.sigmoid(3.0 * c)).double()
    assert calibration_scale(c, z, start=0.1) == pytest.approx(3.0, rel=0.02)


def test_calibration_scale_stays_in_its_bounds_when_separable():
    c = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    q = (c > 0).double()  # separable: the likelihood grows without bound in a
    assert calibration_scale(c, q, bounds=(0.1, 7.0)) == 7.0
    assert calibration_scale(c, 1 - q, bounds=(0.1, 7.0)) == 0.1


def test_calibrated_logits_and_eta_are_recovered_jointly_by_em():
    # True logits s ~ N(0, 3^2); the scorer reports c = s / 2.5 (under-confident), and
    # one annotator's labels pass through a symmetric flip with eta = 0.8. EM over
    # (eta, a) recovers both; with the scale held at 1, eta is over-estimated.
    sim = simulate_labels(
        num_items=100_000, num_annotators=1, shared_truth=False, eta_range=(0.8, 0.8), seed=3
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    c = torch.as_tensor(sim.scores) / 2.5
    calibrated = SymmetricFlip(1)
    scorer = CalibratedLogits(c, 1.0)
    result = fit_em(calibrated, scorer, data)
    assert result.converged
    assert float(scorer.scale.detach()) == pytest.approx(2.5, rel=0.05)
    assert float(calibrated.eta[0]) == pytest.approx(0.8, abs=0.01)
    held = SymmetricFlip(1)
    fit_em(held, FixedLogits(c), data)
    assert float(held.eta[0]) > 0.85  # the bias the scale removes


def test_online_calibration_reaches_the_full_data_fit():
    # The scale takes an undamped Newton step per optimizer step (within a factor
    # SCALE_STEP), eta the paper's EMA: over eight passes the online pair settles at the
    # joint maximum that the full-data fit reaches.
    sim = simulate_labels(
        num_items=20_000, num_annotators=1, shared_truth=False, eta_range=(0.75, 0.75), seed=4
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    c = torch.as_tensor(sim.scores) / 2.0
    full = OnlineEM(SymmetricFlip(1), calibrate=True)
    assert full.fit(c, data).converged
    assert full.scale == pytest.approx(1.9, rel=0.05)
    assert float(full.noise.eta[0]) == pytest.approx(0.75, abs=0.01)

    online = OnlineEM(SymmetricFlip(1), alpha=0.2, calibrate=True)
    step = 0
    for epoch in range(8):
        order = torch.randperm(data.num_units, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, data.num_units, 200):
            batch = data.subset(order[start : start + 200])
            online.e_step(c[batch.unit], batch, step)
            before = online.scale
            online.m_step()
            assert before / SCALE_STEP <= online.scale <= before * SCALE_STEP
            step += 1
    assert online.scale == pytest.approx(full.scale, rel=0.1)
    assert float(online.noise.eta[0]) == pytest.approx(float(full.noise.eta[0]), abs=0.02)


def test_the_policy_can_read_s_over_t_while_the_annotators_read_the_learned_scale():
    # policy_calibrate=False: w and q are the exact posterior at s / T (a closed form
    # through enumeration), while the annotator statistics and the scale's Newton step
    # are those of a * s: eta and a move exactly as with policy_calibrate=True
    from repo.inference.enumeration import enumerate_posterior

    sim = simulate_labels(
        num_items=400, num_annotators=3, shared_truth=False, eta_range=(0.6, 0.95), seed=7
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=3)
    c = torch.as_tensor(sim.scores, dtype=torch.float64)
    both = OnlineEM(SymmetricFlip(3), alpha=0.5, calibrate=True)
    split = OnlineEM(SymmetricFlip(3), alpha=0.5, calibrate=True, policy_calibrate=False)
    assert split.policy_at_temperature and not both.policy_at_temperature
    for em in (both, split):
        em.scale = 3.0  # a learned scale far from 1 / T = 1
    for step, start in enumerate(range(0, 400, 100)):
        batch = data.subset(torch.arange(start, start + 100))
        logits = c[batch.unit]
        shared = both.e_step(logits, batch, step)
        own = split.e_step(logits, batch, step)
        posterior = enumerate_posterior(split.noise.e_step_model(), logits, batch)
        w = split.noise.label_correct(logits, batch, posterior.marginals) * batch.mask
        torch.testing.assert_close(own.w, w)
        torch.testing.assert_close(own.q, split.noise.truth_posterior(logits, posterior.marginals))
        assert own.exact and not shared.exact  # s / T at T = 1: the marginal likelihood's step
        assert not torch.allclose(own.w, shared.w)
        both.m_step()
        split.m_step()
        assert split.scale == both.scale
        torch.testing.assert_close(split.noise.eta.detach(), both.noise.eta.detach())
    hot = OnlineEM(SymmetricFlip(3), calibrate=True, policy_calibrate=False, temperature=4.0)
    assert not hot.e_step(c[:8], data.subset(torch.arange(8)), 0).exact  # s / 4 is not s


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_online_calibration_undoes_over_confident_scores_in_one_pass(seed):
    # Scores 20 times over-confident (IPO's induced logit is 2h / beta = 20 h at
    # beta = 0.1): read at face value, a disagreeing label looks like an unreliable
    # annotator and the online eta falls short of the truth by 0.08 to 0.16; with the
    # scale learned it is within 0.03 after one pass of 32 steps of 16 labels.
    sim = simulate_labels(
        num_items=512, num_annotators=1, shared_truth=False, eta_range=(0.8, 0.8), seed=seed
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    realised = float((sim.label == sim.truth).mean())
    c = 20 * torch.as_tensor(sim.scores)
    etas, scales = {}, {}
    for calibrate in (False, True):
        online = OnlineEM(SymmetricFlip(1), calibrate=calibrate)
        order = torch.randperm(data.num_units, generator=torch.Generator().manual_seed(0))
        for step, start in enumerate(range(0, data.num_units, 16)):
            batch = data.subset(order[start : start + 16])
            online.e_step(c[batch.unit], batch, step)
            online.m_step()
        etas[calibrate], scales[calibrate] = float(online.noise.eta[0]), online.scale
    assert realised - etas[False] > 0.05
    assert abs(etas[True] - realised) < 0.03
    assert 0.01 <= scales[True] < 0.1  # the truth is 1/20


def test_calibration_starts_at_one_over_temperature_and_is_checkpointed():
    online = OnlineEM(SymmetricFlip(2), temperature=4.0, calibrate=True)
    assert online.scale == 0.25 and not online.exact
    assert OnlineEM(SymmetricFlip(2)).exact
    assert not OnlineEM(SymmetricFlip(2), temperature=2.0).exact
    online.scale = 0.7
    state = online.state_dict()
    other = OnlineEM(SymmetricFlip(2), calibrate=True)
    other.load_state_dict(state)
    assert other.scale == pytest.approx(0.7)
    logits = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.equal(other.calibrated(logits), logits * 0.7)


def test_calibration_needs_a_latent_truth():
    from repo.noise import Boltzmann

    with pytest.raises(ValueError, match="calibrate"):
        OnlineEM(Boltzmann(2), calibrate=True)


def test_calibrated_logits_rejects_a_start_outside_its_bounds():
    with pytest.raises(ValueError, match="min_scale"):
        CalibratedLogits(torch.zeros(3), scale=200.0)
    assert math.isfinite(float(CalibratedLogits(torch.zeros(3)).scale))
    np.testing.assert_allclose(
        CalibratedLogits(torch.tensor([1.0, 2.0]), 3.0)(
            LabelData.from_labels(torch.zeros(2, dtype=torch.long), torch.ones(2))
        )
        .detach()
        .numpy(),
        [3.0, 6.0],
    )


def test_trainer_learns_the_scale_and_fits_it_jointly_after_each_epoch(tmp_path):
    import json

    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    torch.set_num_threads(1)
    rows = rule_pairs(64, [0.8], seed=2, markers=4).rows
    # the epoch M-step on the scores the pass read (one annotator would refit on first visits)
    em = {"calibrate": True, "out_of_sample": False}
    method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em=em)
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": 2})
    cfg = cfg.replace("em", epoch_m_step=True)
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    trainer.train()
    scale = trainer.em.scale
    assert scale != 1.0 and scale == trainer.em.scale_of_refit  # the E-step reads the refit's
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step_scale"] == pytest.approx(scale)
    # after the last epoch: a maximum of the marginal likelihood in (eta, a) at the
    # last pass's logits (EM from there stays)
    noise = SymmetricFlip(1)
    noise.load_state_dict(trainer.noise.state_dict())
    scorer = CalibratedLogits(trainer.em.pass_logits, scale)
    fit_em(noise, scorer, trainer.data.labels, tol=1e-10)
    assert float(scorer.scale.detach()) == pytest.approx(scale, rel=1e-3)
    assert float(noise.eta[0]) == pytest.approx(float(trainer.noise.eta[0]), abs=1e-3)
