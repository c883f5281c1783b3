"""One annotator: the profile likelihood of eta, and out-of-sample annotator statistics."""

import json

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from repo.data.simulate import simulate_labels
from repo.inference.em import fit_em, set_value
from repo.inference.online import OnlineEM, _copy_state
from repo.inference.profile import eta_profile
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.scorers import CalibratedLogits, FixedLogits


def _one_annotator(num: int, eta: float, seed: int, shrink: float = 1.0):
    """Labels of one annotator with reliability ``eta`` over truths drawn from
    ``sigmoid(s)``; the scorer reports ``s / shrink``."""
    sim = simulate_labels(
        num_items=num, num_annotators=1, shared_truth=False, eta_range=(eta, eta), seed=seed
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    return torch.as_tensor(sim.scores, dtype=torch.float64) / shrink, data


def test_profile_matches_a_direct_maximisation_over_the_scale():
    c, data = _one_annotator(300, 0.8, seed=4, shrink=2.0)
    o = data.label[:, 0]
    profile = eta_profile(c, o)
    t = c * (2 * o - 1)
    for index in (60, 250, 400):
        eta = float(profile.eta[index])

        def negative(log_a: float, eta: float = eta) -> float:
            p = torch.sigmoid(torch.exp(torch.tensor(log_a)) * t)
            return -float(torch.log((1 - eta) + (2 * eta - 1) * p).sum())

        best = minimize_scalar(negative, bounds=(-4.6, 4.6), method="bounded")
        assert float(profile.log_likelihood[index]) == pytest.approx(-best.fun, abs=1e-3)


def test_profile_recovers_eta_and_scale_of_an_informative_scorer():
    # an under-confident but informative scorer (true logits / 2.5): the profile's
    # maximum is the joint maximum likelihood, near the truth, and the interval is short
    c, data = _one_annotator(20_000, 0.8, seed=5, shrink=2.5)
    profile = eta_profile(c, data.label[:, 0], grid=201, scales=61)
    assert profile.estimate == pytest.approx(0.8, abs=0.015)
    assert profile.scale_estimate == pytest.approx(2.5, rel=0.1)
    low, high = profile.interval
    assert low < 0.8 < high and profile.width < 0.04
    # the same point as EM over (eta, a)
    noise, scorer = SymmetricFlip(1), CalibratedLogits(c, 1.0)
    fit_em(noise, scorer, data, tol=1e-10)
    assert float(noise.eta.detach()[0]) == pytest.approx(profile.estimate, abs=2e-3)


def test_profile_is_flat_when_the_scorer_is_never_confident():
    # every |a c| small: only (2 eta - 1) a is identified, so eta = 0.6 and eta = 0.95
    # explain the labels equally well and the interval spans most of [1/2, 1]
    g = torch.Generator().manual_seed(6)
    s = 0.3 * torch.randn(5_000, generator=g, dtype=torch.float64)
    truth = torch.rand(5_000, generator=g, dtype=torch.float64) < torch.sigmoid(s)
    flip = torch.rand(5_000, generator=g, dtype=torch.float64) < 0.3
    labels = (truth ^ flip).double()
    profile = eta_profile(s, labels, grid=201, scales=61)
    at = {
        round(float(e), 3): float(v)
        for e, v in zip(profile.eta, profile.log_likelihood, strict=True)
    }
    assert abs(at[0.6] - at[0.95]) < 0.5
    assert profile.interval[0] < 0.62 and profile.interval[1] == 1.0


def test_profile_rejects_bad_input():
    with pytest.raises(ValueError, match="as many"):
        eta_profile(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="0 or 1"):
        eta_profile(torch.zeros(2), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="finite"):
        eta_profile(torch.tensor([0.0, float("nan")]), torch.tensor([0.0, 1.0]))


def _batch(data: LabelData, index: list[int]) -> LabelData:
    return data.subset(torch.tensor(index))


def test_out_of_sample_learns_only_from_first_visits():
    c, data = _one_annotator(40, 0.8, seed=7)
    online = OnlineEM(SymmetricFlip(1), alpha=1.0, out_of_sample=True, num_items=40)
    first = _batch(data, list(range(20)))
    online.e_step(c[first.unit], first, step=0)
    online.m_step()
    after_first = float(online.noise.eta[0])
    assert after_first != 0.9
    # the same items again (in-sample now): their logits are not overwritten and the
    # annotator parameters do not move
    online.e_step(10 * c[first.unit], first, step=1)
    online.m_step()
    assert float(online.noise.eta[0]) == after_first
    torch.testing.assert_close(online.first_visit[first.unit], c[first.unit])
    assert torch.isnan(online.first_visit[20:]).all()
    # a batch of old and new items learns from the new ones only: the same update as
    # the new ones alone
    mixed = _batch(data, list(range(15, 30)))
    online.e_step(c[mixed.unit], mixed, step=2)
    online.m_step()
    reference = OnlineEM(SymmetricFlip(1), alpha=1.0)  # from where `online` stood
    set_value(reference.noise, "eta", torch.tensor([after_first], dtype=torch.float64))
    new = _batch(data, list(range(20, 30)))
    reference.e_step(c[new.unit], new, step=0)
    reference.m_step()
    assert float(online.noise.eta[0]) == pytest.approx(float(reference.noise.eta[0]), abs=1e-12)


def test_fit_out_of_sample_learns_the_scale_of_under_confident_scores():
    # first-visit logits of an under-confident scorer (true / 2.5): the out-of-sample
    # fit learns the scale with eta and recovers eta; held at scale 1 it is too high
    c, data = _one_annotator(20_000, 0.75, seed=8, shrink=2.5)
    online = OnlineEM(SymmetricFlip(1), out_of_sample=True, num_items=20_000)
    for start in range(0, 20_000, 500):
        batch = _batch(data, list(range(start, start + 500)))
        online.e_step(c[batch.unit], batch, step=start // 500)
        online.m_step()
    assert not torch.isnan(online.first_visit).any()
    online.fit_out_of_sample(data)
    assert float(online.noise.eta[0]) == pytest.approx(0.75, abs=0.015)
    assert online.out_of_sample_scale == pytest.approx(2.5, rel=0.1)
    assert online.scale == 1.0  # the E-step's own scale is not calibrate's to change here
    held = SymmetricFlip(1)
    fit_em(held, FixedLogits(c), data)
    assert float(held.eta[0]) > 0.85
    # the kept logits and the scale survive a checkpoint
    other = OnlineEM(SymmetricFlip(1), out_of_sample=True, num_items=20_000)
    other.load_state_dict(online.state_dict())
    torch.testing.assert_close(other.first_visit, online.first_visit)
    assert other.out_of_sample_scale == online.out_of_sample_scale


def test_out_of_sample_needs_the_item_count():
    with pytest.raises(ValueError, match="number of items"):
        OnlineEM(SymmetricFlip(1), out_of_sample=True)
    with pytest.raises(ValueError, match="first visits"):
        OnlineEM(SymmetricFlip(1)).fit_out_of_sample(
            LabelData.from_labels(torch.zeros(1, dtype=torch.long), torch.ones(1))
        )


def test_trainer_fits_eta_on_first_visits_after_each_epoch(tmp_path, monkeypatch):
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    calls = []
    fit = OnlineEM.fit_out_of_sample

    def spy(self, data, reduce=None, **kwargs):
        calls.append(self.first_visit.clone())
        return fit(self, data, reduce, **kwargs)

    monkeypatch.setattr(OnlineEM, "fit_out_of_sample", spy)
    rows = rule_pairs(64, [0.8], seed=2, markers=4).rows
    method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"out_of_sample": True})
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": 2})
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    trainer.train()
    # one fit per epoch, each on every item's first-visit logit (none NaN after the
    # first pass, and the same ones after the second: the policy's later scores of
    # items it has trained on are not kept)
    assert len(calls) == 2
    assert not torch.isnan(calls[0]).any()
    torch.testing.assert_close(calls[0], calls[1])
    assert not torch.allclose(calls[1], trainer.item_logits())
    # one annotator: reliability.json says what its labels tell of eta
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    profile = eta_profile(calls[1][trainer.data.labels.unit], trainer.data.labels.label[:, 0])
    assert report["eta_profile"]["from"] == "first_visit_logits"
    assert report["eta_profile"]["interval"][0] == pytest.approx(profile.interval[0], abs=0.01)
    assert report["eta_profile"]["interval"][1] == pytest.approx(profile.interval[1], abs=0.01)


def test_fit_out_of_sample_keeps_the_parameters_when_the_scores_say_nothing():
    # a policy at chance: first-visit logits unrelated to the labels. The likelihood
    # is flat along (2 eta - 1) a, so the fit would wander (to eta near 0 or 1); the
    # likelihood-ratio check against all-zero scores refuses it.
    g = torch.Generator().manual_seed(9)
    labels = (torch.rand(400, generator=g) < 0.5).double()
    data = LabelData.from_labels(torch.zeros(400, dtype=torch.long), labels, num_annotators=1)
    noise = SymmetricFlip(1)
    online = OnlineEM(noise, out_of_sample=True, num_items=400)
    online.e_step(1e-3 * torch.randn(400, generator=g, dtype=torch.float64), data, step=0)
    online.m_step()
    before = float(noise.eta.detach()[0])
    assert online.fit_out_of_sample(data) is None
    assert float(noise.eta.detach()[0]) == before and online.out_of_sample_scale is None


@pytest.mark.parametrize(("etas", "fits"), [([0.8], 2), ([0.8, 0.9], 0)])
def test_by_default_eta_of_one_annotator_is_fitted_on_first_visits(
    tmp_path, monkeypatch, etas, fits
):
    # [em] out_of_sample = "auto": out-of-sample statistics for one annotator only (where
    # the E-step reads the policy: [em] cross_fit = false)
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    calls = []
    fit = OnlineEM.fit_out_of_sample

    def spy(self, data, reduce=None, **kwargs):
        calls.append(1)
        return fit(self, data, reduce, **kwargs)

    monkeypatch.setattr(OnlineEM, "fit_out_of_sample", spy)
    rows = rule_pairs(48, etas, seed=2, markers=4).rows
    method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"cross_fit": False})
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": 2})
    assert cfg.em.out_of_sample == "auto"
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    trainer.train()
    assert trainer.em.out_of_sample is (len(etas) == 1)
    assert len(calls) == fits
    # the run's report says where eta was learned from
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["out_of_sample"] is (len(etas) == 1)
    assert report["e_step"]["calibrate"] is False and report["e_step"]["noise_test"] == 0.05
    assert ("first_visit_scale" in report) is (trainer.em.out_of_sample_scale is not None)


def test_fit_out_of_sample_does_not_stall_where_the_online_update_left_eta():
    # An online update that drifted to eta = 0.997 at under-confident scores (a = 1/20
    # of the truth's): EM started there stalls at "reliable labels, dull scorer" (eta
    # 0.997, a = 3), far below the maximum; started from the model's own start
    # (eta_init = 0.9) it reaches the maximum near the realised reliability, and the
    # refit keeps the start with the higher likelihood.
    g = torch.Generator().manual_seed(0)
    n = 8000
    s = 4 * torch.randn(n, generator=g, dtype=torch.float64)
    truth = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(s)
    flipped = torch.rand(n, generator=g, dtype=torch.float64) < 0.3
    data = LabelData.from_labels(
        torch.zeros(n, dtype=torch.long), (truth ^ flipped).double(), num_annotators=1
    )
    stalled = SymmetricFlip(1, eta_init=0.997)
    single = fit_em(stalled, CalibratedLogits(s / 20, 1.0), data, tol=1e-6, max_iter=500)
    assert float(stalled.eta.detach()[0]) > 0.99  # the stall this guards against

    noise = SymmetricFlip(1)  # eta_init = 0.9
    online = OnlineEM(noise, out_of_sample=True, num_items=n)
    online.e_step(s / 20, data, step=0)
    noise.load_state_dict(SymmetricFlip(1, eta_init=0.997).state_dict())
    result = online.fit_out_of_sample(data)
    assert result.objective > single.objective + 50
    realised = 1 - flipped.double().mean()
    assert float(noise.eta.detach()[0]) == pytest.approx(float(realised), abs=0.02)
    assert online.out_of_sample_scale == pytest.approx(20.0, rel=0.15)


def _ridge(seed: int, n: int = 4000) -> tuple[Tensor, LabelData, float]:
    """One annotator, 40% of labels flipped, over truths drawn from ``sigmoid(c)``
    with ``c ~ N(0, 2^2)``: a calibrated scorer weak enough that the likelihood of
    ``(eta, a)`` is a long flat ridge. Returns the logits, the labels, the realised
    share of correct labels."""
    g = torch.Generator().manual_seed(seed)
    c = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    truth = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(c)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < 0.6
    label = torch.where(correct, truth, ~truth).double()
    data = LabelData.from_labels(torch.zeros(n, dtype=torch.long), label, num_annotators=1)
    return c, data, float(correct.double().mean())


def test_a_refit_reaches_the_profile_maximum_where_em_stalls_on_the_ridge():
    # From the model's start (eta_init = 0.9) at every scale of REFIT_SCALES, EM stops
    # by tolerance at eta 0.74, where the ridge is flat; the profile likelihood's
    # maximum is at 0.60, the realised share of correct labels, and EM started there
    # stays. The refit keeps the higher of the two.
    import repo.inference.online as online_module

    c, data, realised = _ridge(seed=7)
    stalled = SymmetricFlip(1)
    starts = [_copy_state(stalled)]
    fits = ((s, CalibratedLogits(c, a)) for s in starts for a in online_module.REFIT_SCALES)
    before, _ = online_module._best_fit(stalled, fits, data, 1e-6, 500)
    assert float(stalled.eta.detach()[0]) > 0.7  # the stall this guards against

    noise = SymmetricFlip(1)
    result, scorer = online_module.fit_calibrated(noise, c, data, starts)
    profile = eta_profile(c, data.label[:, 0], grid=201, scales=121)
    assert result.objective > before.objective + 1.0
    assert result.objective == pytest.approx(float(profile.log_likelihood.max()), abs=1e-2)
    eta = float(noise.eta.detach()[0])
    assert eta == pytest.approx(profile.estimate, abs=0.01)
    assert eta == pytest.approx(realised, abs=0.01)
    assert float(scorer.scale.detach()) == pytest.approx(1.0, rel=0.1)  # calibrated


def test_a_refit_that_converged_is_kept_to_the_digit():
    # A strong scorer: EM from the model's start reaches the maximum, the profile's
    # start finds it again, and the fit of the other starts is kept unchanged.
    import repo.inference.online as online_module

    c, data = _one_annotator(3_000, 0.8, seed=2)
    alone = SymmetricFlip(1)
    starts = [_copy_state(alone)]
    fits = ((s, CalibratedLogits(c, a)) for s in starts for a in online_module.REFIT_SCALES)
    before, before_scorer = online_module._best_fit(alone, fits, data, 1e-6, 500)
    noise = SymmetricFlip(1)
    result, scorer = online_module.fit_calibrated(noise, c, data, starts)
    assert result.objective == before.objective
    assert torch.equal(noise.eta.detach(), alone.eta.detach())
    assert torch.equal(scorer.scale.detach(), before_scorer.scale.detach())


def test_fit_out_of_sample_starts_once_where_the_online_update_is_still_at_the_start(
    monkeypatch,
):
    # the online update has not moved eta from eta_init: the two starts are one, so the
    # refit runs EM once per scale of REFIT_SCALES, once from the profile's maximum and
    # once more for the null fit
    import repo.inference.online as online_module

    c, data = _one_annotator(2_000, 0.8, seed=3)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return fit_em(*args, **kwargs)

    monkeypatch.setattr(online_module, "fit_em", counting)
    online = OnlineEM(SymmetricFlip(1), out_of_sample=True, num_items=2_000)
    online.e_step(c, data, step=0)  # keeps the first visits; no M-step: eta is eta_init
    online.fit_out_of_sample(data)
    assert len(calls) == len(online_module.REFIT_SCALES) + 2
    assert isinstance(calls[-1], FixedLogits)  # the null fit of _scores_inform
    online.e_step(c, data, step=1)
    online.noise.load_state_dict(SymmetricFlip(1, eta_init=0.6).state_dict())
    calls.clear()
    online.fit_out_of_sample(data)  # two distinct starts now
    assert len(calls) == 2 * len(online_module.REFIT_SCALES) + 2


def test_with_a_learned_scale_first_visits_fit_eta_and_every_visit_fits_the_scale():
    # calibrate + out_of_sample: eta learns from first visits only, the E-step's scale
    # from every visit (it must follow the policy's logits as they grow), and the
    # first-visit refit's Platt scale (of the first-visit scores) is not the E-step's.
    c, data = _one_annotator(20_000, 0.75, seed=11, shrink=2.5)
    online = OnlineEM(SymmetricFlip(1), calibrate=True, out_of_sample=True, num_items=20_000)
    for start in range(0, 20_000, 1_000):  # pass 1 at the under-confident scores
        batch = _batch(data, list(range(start, start + 1_000)))
        online.e_step(c[batch.unit], batch, step=start // 1_000)
        online.m_step()
    online.fit_out_of_sample(data)
    eta, first_scale = float(online.noise.eta.detach()[0]), online.out_of_sample_scale
    assert eta == pytest.approx(0.75, abs=0.03) and first_scale == pytest.approx(2.5, rel=0.15)
    before = online.scale
    assert before != first_scale  # the refit's scale stays the refit's
    # pass 2: the policy's scores are now 10 times as large (it has trained on them)
    for step, start in enumerate(range(0, 20_000, 1_000), start=20):
        batch = _batch(data, list(range(start, start + 1_000)))
        online.e_step(10 * c[batch.unit], batch, step=step)
        online.m_step()
    assert float(online.noise.eta.detach()[0]) == eta  # no first visits: eta untouched
    assert online.scale < before / 2  # the scale followed the larger scores down
    online.fit_out_of_sample(data)
    assert float(online.noise.eta.detach()[0]) == pytest.approx(eta, abs=2e-3)
    assert online.out_of_sample_scale == pytest.approx(first_scale, rel=1e-2)


def test_the_profile_grid_takes_back_the_threads_single_thread_holds(monkeypatch):
    # looks and refits run under single_thread(); the profile's grid over every label
    # runs on the threads torch had outside it (all_threads), and the block restores one
    import repo.inference.online as online_module
    from repo.inference.online import all_threads, single_thread

    c, data = _one_annotator(2_000, 0.7, seed=4)
    outside = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        profile = SymmetricFlip.eta_profile

        def counting(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            return profile(self, *args, **kwargs)

        monkeypatch.setattr(SymmetricFlip, "eta_profile", counting)
        with single_thread():
            assert torch.get_num_threads() == 1
            with all_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            inside, _ = online_module.fit_calibrated(
                SymmetricFlip(1), c, data, [_copy_state(SymmetricFlip(1))]
            )
            assert torch.get_num_threads() == 1
        assert seen == [2] and torch.get_num_threads() == 2
        with all_threads():  # outside single_thread: as it is
            assert torch.get_num_threads() == 2
        # the same fit as with one thread throughout
        torch.set_num_threads(1)
        alone, _ = online_module.fit_calibrated(
            SymmetricFlip(1), c, data, [_copy_state(SymmetricFlip(1))]
        )
        assert inside.objective == pytest.approx(alone.objective, rel=1e-12)
    finally:
        torch.set_num_threads(outside)
