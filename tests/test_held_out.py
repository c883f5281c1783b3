"""Held-out labels (``[em] held_out``): items no batch trains on, scored by the policy
at each pass's end, and the annotator parameters refitted on them alone."""

import json
import warnings

import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.online import OnlineEM
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.train.dataset import BatchSchedule, held_out_items


def _one_annotator(num: int, eta: float, seed: int):
    """Labels of one annotator with reliability ``eta`` over truths drawn from
    ``sigmoid(s)``; the true logits ``s`` (a calibrated scorer)."""
    sim = simulate_labels(
        num_items=num, num_annotators=1, shared_truth=False, eta_range=(eta, eta), seed=seed
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    truth = torch.as_tensor(sim.truth, dtype=torch.float64)
    return torch.as_tensor(sim.scores, dtype=torch.float64), truth, data


def test_held_out_items_are_a_seeded_share_of_the_items():
    items = held_out_items(1000, 0.1, seed=3)
    assert len(items) == 100 and len(set(items.tolist())) == 100
    assert torch.equal(items, items.sort().values)
    assert torch.equal(items, held_out_items(1000, 0.1, seed=3))
    assert not torch.equal(items, held_out_items(1000, 0.1, seed=4))
    assert len(held_out_items(1000, 0.0, seed=3)) == 0
    assert len(held_out_items(5, 0.01, seed=3)) == 1  # a share > 0 holds out one at least


def test_a_schedule_never_batches_held_out_units_and_is_unchanged_without_them():
    held = torch.tensor([0, 7, 8, 30])
    schedule = BatchSchedule(
        num_units=40, batch_size=4, accumulation=1, world_size=2, seed=5, held_out=held
    )
    assert schedule.num_trained == 36 and schedule.steps_per_epoch == 4
    for epoch in range(3):
        order = schedule.permutation(epoch)
        assert sorted(order.tolist()) == sorted(set(range(40)) - set(held.tolist()))
    seen = torch.cat([schedule.global_units(step) for step in range(12)])
    assert not torch.isin(seen, held).any()
    plain = BatchSchedule(num_units=40, batch_size=4, accumulation=1, world_size=2, seed=5)
    generator = torch.Generator().manual_seed(5 * 1_000_003 + 1)
    assert torch.equal(plain.permutation(1), torch.randperm(40, generator=generator))


def test_a_schedule_trains_the_held_out_units_from_its_last_epoch():
    # [em] train_held_out: epochs 0 and 1 over the 36 trained units (4 steps of 8),
    # epoch 2 over all 40 (5 steps), in the order the plain schedule gives that epoch
    held = torch.tensor([0, 7, 8, 30])
    kwargs = dict(num_units=40, batch_size=4, accumulation=1, world_size=2, seed=5)
    schedule = BatchSchedule(**kwargs, held_out=held, train_held_out_from=2)
    plain = BatchSchedule(**kwargs)
    assert [schedule.steps_in(e) for e in range(4)] == [4, 4, 5, 5]
    assert schedule.steps_for(2) == 8 and schedule.steps_for(3) == 13
    assert [schedule.epoch_of(step) for step in (0, 3, 4, 7, 8, 12, 13)] == [
        (0, 0),
        (0, 3),
        (1, 0),
        (1, 3),
        (2, 0),
        (2, 4),
        (3, 0),
    ]
    before = torch.cat([schedule.global_units(step) for step in range(8)])
    assert not torch.isin(before, held).any()
    last = torch.cat([schedule.global_units(step) for step in range(8, 13)])
    assert sorted(last.tolist()) == list(range(40))  # every unit once, held-out ones too
    assert torch.equal(schedule.permutation(2), plain.permutation(2))
    assert schedule.steps_per_epoch == 4 and schedule.num_trained == 36


def test_fit_held_out_recovers_eta_and_then_the_e_step_leaves_it():
    # scores of held-out items from a scorer that knows the truth: the fit gives the
    # share of labels that agree with it (the closed form when the scorer is always
    # right), and afterwards no E-step moves eta, while the learned scale still follows
    # the policy's logits
    c, truth, data = _one_annotator(6000, 0.7, seed=11)
    sign = 2 * truth - 1
    held = torch.arange(0, 6000, 2)
    logits = torch.full((6000,), float("nan"), dtype=torch.float64)
    logits[held] = 8.0 * sign[held]
    online = OnlineEM(
        SymmetricFlip(1), alpha=1.0, calibrate=True, out_of_sample=True, num_items=6000
    )
    online.labels = data
    assert online.end_pass(1, held_out=logits) is not None
    agree = (data.label[held, 0] == truth[held]).double().mean()
    assert float(online.noise.eta.detach()[0]) == pytest.approx(float(agree), abs=1e-3)
    assert torch.sigmoid(torch.tensor(8.0 * online.held_out_scale)) > 0.99  # read as sure
    assert online.out_of_sample_scale is None  # the first-visit refit did not run
    eta = float(online.noise.eta.detach()[0])
    trained = data.subset(torch.arange(1, 6000, 2))
    scale = online.scale
    online.e_step(5.0 * c[trained.unit], trained, step=2)
    online.m_step()
    assert float(online.noise.eta.detach()[0]) == eta
    assert online.scale != scale
    # the refit's scale and scores survive a checkpoint
    other = OnlineEM(SymmetricFlip(1), calibrate=True, out_of_sample=True, num_items=6000)
    other.load_state_dict(online.state_dict())
    assert other.held_out_scale == online.held_out_scale
    torch.testing.assert_close(other.held_out_logits, online.held_out_logits, equal_nan=True)


def test_fit_held_out_of_a_calibrated_scorer_recovers_the_true_eta():
    # a calibrated but imperfect scorer (truths drawn from sigmoid(s)): EM with the
    # Platt scale learned recovers eta and a scale near 1
    c, _, data = _one_annotator(20_000, 0.8, seed=12)
    online = OnlineEM(SymmetricFlip(1), num_items=20_000)
    assert online.fit_held_out(c, data) is not None
    assert float(online.noise.eta.detach()[0]) == pytest.approx(0.8, abs=0.02)
    assert online.held_out_scale == pytest.approx(1.0, rel=0.15)


def test_the_posterior_waits_for_the_first_held_out_fit():
    # with held-out labels, the E-step gives the labels as given (held back) until a fit
    # on the held-out scores is taken, even with the noise test off (evidence assumed)
    c, truth, data = _one_annotator(2000, 0.7, seed=13)
    online = OnlineEM(SymmetricFlip(1), alpha=1.0, num_items=2000, held_out=True)
    assert online.noise_evident and not online.posterior_on
    trained = data.subset(torch.arange(1000, 2000))
    held_back = online.e_step(4.0 * c[trained.unit], trained, step=0)
    assert held_back.held_back and torch.equal(held_back.w, trained.mask.to(held_back.w.dtype))
    # scores that say nothing of the truths: no fit is taken, the posterior stays back
    noise = torch.full((2000,), float("nan"), dtype=torch.float64)
    noise[:1000] = torch.randn(
        1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert online.fit_held_out(noise, data) is None and not online.posterior_on
    # scores of a scorer that knows the truths: the fit is taken, the posterior is on
    sure = torch.full((2000,), float("nan"), dtype=torch.float64)
    sure[:1000] = 8.0 * (2 * truth[:1000] - 1)
    assert online.fit_held_out(sure, data) is not None and online.posterior_on
    posterior = online.e_step(4.0 * c[trained.unit], trained, step=1)
    assert not posterior.held_back and (posterior.w < 0.5).any()
    # without held-out labels the noise test alone decides, as before
    assert OnlineEM(SymmetricFlip(1), num_items=2000).posterior_on


@pytest.mark.parametrize("train_held_out", [True, False])
def test_trainer_holds_items_out_and_fits_eta_on_their_scores(
    tmp_path, monkeypatch, train_held_out
):
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    batches, fits, held_back = [], [], []
    e_step, fit = OnlineEM.e_step, OnlineEM.fit_held_out

    def spy_e_step(self, logits, data, step):
        batches.append((step, data.unit.clone()))
        result = e_step(self, logits, data, step)
        held_back.append((step, result.held_back))
        return result

    def spy_fit(self, logits, data, **kwargs):
        fits.append(logits.clone())
        return fit(self, logits, data, **kwargs)

    monkeypatch.setattr(OnlineEM, "e_step", spy_e_step)
    monkeypatch.setattr(OnlineEM, "fit_held_out", spy_fit)
    rows = rule_pairs(80, [0.8], seed=2, markers=4).rows
    em = {"held_out": True, "held_out_share": 0.25, "train_held_out": train_held_out}
    method = Method("RE-IPO", "ipo", True, {"beta": 0.1}, em=em)
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": 2})
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    trainer.train()
    held = trainer.held_out
    assert len(held) == 20
    first_pass = trainer.schedule.steps_per_epoch  # 60 trained units: 3 steps of 16
    first = torch.cat([units for step, units in batches if step < first_pass])
    later = torch.cat([units for step, units in batches if step >= first_pass])
    assert not torch.isin(first, held).any()  # no batch of the first pass held them
    # the last pass: every unit (5 steps of 16) with train_held_out, else the 60 again
    assert trainer.total_steps == first_pass + (5 if train_held_out else 3)
    assert torch.isin(later, held).sum() == (20 if train_held_out else 0)
    # one refit a pass: on the held-out items' scores under the first pass's last
    # policy, then under the last one's, or at their first visits in the pass that
    # trained on them
    assert len(fits) == 2
    for logits in fits:
        assert torch.equal((~torch.isnan(logits)).nonzero().reshape(-1), held)
    expected = trainer.em.first_visit if train_held_out else trainer.item_logits()
    torch.testing.assert_close(fits[1][held], expected[held], rtol=1e-4, atol=1e-3)
    # the posterior held back through the first pass (no fit yet), on after its fit
    assert all(back for step, back in held_back if step < first_pass)
    assert trainer.em.posterior_on is (trainer.em.held_out_scale is not None)
    if trainer.em.posterior_on and trainer.em.noise_test == 0:
        assert not any(back for step, back in held_back if step >= first_pass)
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["held_out"] == 0.25 and report["held_out_items"] == 20
    assert ("held_out_scale" in report) is (trainer.em.held_out_scale is not None)
    assert report["eta_profile"]["from"] == "held_out_logits"
    assert trainer.run_dir.read_data_report()["held_out_units"] == 20
    resolved = trainer.run_dir.read_resolved()
    assert resolved["train_held_out_from"] == (1 if train_held_out else None)


def test_held_out_in_one_pass_warns_that_the_posterior_never_comes_on(tmp_path):
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    rows = rule_pairs(80, [0.8], seed=2, markers=4).rows
    records = load_preferences(rows, annotator_column="annotator")
    em = {"held_out": True, "held_out_share": 0.25}
    method = Method("RE-IPO", "ipo", True, {"beta": 0.1}, em=em)
    one = rule_config(str(tmp_path / "one"), method, seed=0, optim={"epochs": 1})
    with pytest.warns(UserWarning, match="held_out with one pass"):
        trainer = Trainer(one, records=records)
    assert len(trainer.held_out) == 20 and not trainer.em.posterior_on
    two = rule_config(str(tmp_path / "two"), method, seed=0, optim={"epochs": 2})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held_out with one pass")
        Trainer(two, records=records)


def test_held_out_is_checked():
    from repo.experiments import Method, rule_config
    from repo.train.config import ConfigError

    for share in (0.0, 0.5):
        em = {"held_out": True, "held_out_share": share}
        method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em=em)
        with pytest.raises(ConfigError, match=r"\[em\] held_out_share"):
            rule_config("unused", method, seed=0).validate()


def test_a_run_with_held_out_labels_resumes_to_the_same_state(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    records = load_preferences(
        rule_pairs(96, [0.7], seed=4, markers=4).rows, annotator_column="annotator"
    )
    em = {"held_out": True, "held_out_share": 0.25, "train_held_out": True}
    method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em=em)
    # 72 units trained on, 4 steps a pass: the checkpoint at step 6 lies after the
    # first held-out refit, inside the second pass, which trains on all 96 units
    cfg = rule_config(str(tmp_path / "full"), method, seed=1, optim={"epochs": 2})
    cfg = cfg.replace("run", save_steps=6)
    full = Trainer(cfg, records=records)
    full.train()
    # the last pass trains the 96 units, held-out ones too (6 steps)
    assert full.step == 10 and full.em.held_out_scale is not None
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000006", part / "step-000006")
    for name in ("config.json", "metrics.jsonl", "annotators.jsonl"):
        shutil.copy(tmp_path / "full" / name, tmp_path / "part" / name)
    resumed = Trainer(
        cfg.replace("run", output_dir=str(tmp_path / "part"), resume=True), records=records
    )
    resumed.train()
    assert resumed.step == 10 and resumed.em.held_out_scale == full.em.held_out_scale
    a = load_file(str(tmp_path / "full" / "noise.safetensors"))
    b = load_file(str(tmp_path / "part" / "noise.safetensors"))
    assert a.keys() == b.keys() and "held_out.logits" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_an_uninformative_held_out_fit_leaves_the_pass_to_the_first_visit_refit():
    # held-out scores at chance (a policy that has learned nothing yet) are refused,
    # and the end of the pass refits on first visits as it would without them
    c, _, data = _one_annotator(4000, 0.75, seed=13)
    online = OnlineEM(SymmetricFlip(1), out_of_sample=True, num_items=4000)
    online.labels = data
    online.e_step(c[data.unit], data, step=0)
    online.m_step()
    g = torch.Generator().manual_seed(0)
    chance = torch.full((4000,), float("nan"), dtype=torch.float64)
    chance[:400] = 1e-3 * torch.randn(400, generator=g, dtype=torch.float64)
    result = online.end_pass(1, held_out=chance)
    assert result is not None and online.held_out_scale is None
    assert online.out_of_sample_scale is not None  # the first-visit refit ran
    assert float(online.noise.eta.detach()[0]) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    ("family", "annotators", "given", "share"),
    [
        ("ipo", 1, "auto", 0.1),  # IPO's trained scores are far from 0
        ("ipo", 2, "auto", 0.0),  # several annotators identify each other
        ("dpo", 1, "auto", 0.0),  # DPO's fit the labels' odds: not identified
        ("simpo", 1, "auto", 0.0),
        ("cpo", 1, "auto", 0.1),  # so are CPO's (summed log-probs)
        ("dpo", 1, True, 0.1),
        ("ipo", 1, False, 0.0),
    ],
)
def test_held_out_labels_by_default_for_ipo_with_one_annotator(family, annotators, given, share):
    from repo.experiments import Method, rule_config
    from repo.likelihoods import get_likelihood
    from repo.train.build import MIN_HELD_OUT, estep_settings

    # where the E-step reads the policy ([em] cross_fit = false; with "auto" one
    # annotator cross-fits unless held_out is asked for: tests/test_cross_fit.py)
    method = Method("RE-X", family, True, {}, em={"held_out": given, "cross_fit": False})
    config = rule_config("unused", method, seed=0)
    likelihood, noise = get_likelihood(family), SymmetricFlip(annotators)
    assert estep_settings(config, likelihood, noise, 8192, passes=4).held_out == share
    # "auto" holds out MIN_HELD_OUT items at least (512 pairs: none) and only in a run
    # of several passes (in one the refit would change the reported eta alone); true
    # holds out whatever the size and length
    forced = share if given is True else 0.0
    few = estep_settings(config, likelihood, noise, 10 * MIN_HELD_OUT - 10, passes=4)
    assert few.held_out == forced
    assert estep_settings(config, likelihood, noise, 10 * MIN_HELD_OUT, passes=4).held_out == share
    assert estep_settings(config, likelihood, noise, 8192, passes=1).held_out == forced
    off = rule_config(
        "unused", Method("X", family, False, {}, em={"held_out": given, "cross_fit": False}), seed=0
    )
    assert estep_settings(off, likelihood, noise, 8192, passes=4).held_out == 0


@pytest.mark.parametrize(("epochs", "held"), [(1, False), (2, True)])
def test_the_trainer_holds_out_by_default_only_over_several_passes(
    tmp_path, monkeypatch, epochs, held
):
    # RE-IPO with one annotator at its defaults but cross_fit (MIN_HELD_OUT lowered to fit
    # a test)
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer, build

    monkeypatch.setattr(build, "MIN_HELD_OUT", 5)
    records = load_preferences(rule_pairs(80, [0.7], seed=1).rows, annotator_column="annotator")
    method = Method("RE-IPO", "ipo", True, {"beta": 0.1}, em={"cross_fit": False})
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": epochs})
    trainer = Trainer(cfg, records=records)
    assert (trainer.held_out is not None) is held
    assert trainer.estep.held_out == (0.1 if held else 0.0)
    assert trainer.schedule.num_trained == (72 if held else 80)
    # by default the policy never trains on the held-out items ([em] train_held_out)
    assert trainer.schedule.train_held_out_from is None
    assert trainer.total_steps == epochs * trainer.schedule.steps_per_epoch
