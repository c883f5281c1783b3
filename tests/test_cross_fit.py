"""Cross-fitted E-step scores (``[em] cross_fit``): each item scored by a scorer trained on
the other fold's labels, the annotator parameters fitted to those scores once, and every
E-step reading them instead of the policy's logits."""

import json
import math
import shutil

import pytest
import torch
from _helpers import load_benchmark, write_jsonl
from safetensors.torch import load_file

from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs
from repo.data.simulate import simulate_labels
from repo.experiments import Method, rule_config
from repo.inference.enumeration import enumerate_posterior
from repo.inference.online import OnlineEM, sign_agreement
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.train import Trainer
from repo.train.build import (
    CROSS_FIT_NOISE_TEST,
    MIN_CROSS_FIT,
    build_likelihood,
    build_trained_policy,
    estep_settings,
    model_recipe,
)
from repo.train.config import ConfigError, LossSection
from repo.train.cross_fit import fold_config, item_folds, scorer_records
from repo.train.evaluate import item_scores
from repo.train.run_dir import RunDir


def _one_annotator(num: int, eta: float, seed: int):
    """Labels of one annotator with reliability ``eta`` over truths drawn from
    ``sigmoid(s)``; the true logits ``s`` (a calibrated scorer) and the truths."""
    sim = simulate_labels(
        num_items=num, num_annotators=1, shared_truth=False, eta_range=(eta, eta), seed=seed
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    truth = torch.as_tensor(sim.truth, dtype=torch.float64)
    return torch.as_tensor(sim.scores, dtype=torch.float64), truth, data


@pytest.mark.parametrize("eta", [0.6, 0.8])
def test_fit_on_cross_fitted_scores_recovers_eta_and_fixes_the_e_step(eta):
    # scores of a calibrated scorer, given on 3x their scale: EM recovers eta and the
    # scale that undoes the factor; every E-step then reads a c_i of its units' items,
    # whatever logits it is handed, and no M-step moves eta or the scale
    c, _, data = _one_annotator(20_000, eta, seed=21)
    online = OnlineEM(SymmetricFlip(1), alpha=1.0, calibrate=True, num_items=20_000)
    online.labels = data
    assert online.fit_cross_fitted(3.0 * c, data) is not None
    assert float(online.noise.eta.detach()[0]) == pytest.approx(eta, abs=0.02)
    rms = float((3.0 * c).pow(2).mean().sqrt())  # the scores are kept in rms units
    assert online.scale * 3.0 / rms == pytest.approx(1.0, rel=0.25)
    assert not online.calibrate and online.posterior_on
    batch = data.subset(torch.arange(100, 164))
    e = online.e_step(torch.full((64,), 50.0, dtype=torch.float64), batch, step=0)
    tempered = online.scale * online.cross_fit_logits[batch.unit]
    posterior = enumerate_posterior(online.noise.e_step_model(), tempered, batch)
    expected = online.noise.label_correct(tempered, batch, posterior.marginals)
    torch.testing.assert_close(e.w, expected * batch.mask)
    assert not e.exact and not e.held_back
    state = (online.noise.eta.detach().clone(), online.scale)
    online.m_step()
    assert online.end_pass(5) is None
    assert torch.equal(online.noise.eta.detach(), state[0]) and online.scale == state[1]
    # the scores, the scale and the test's outcome survive a checkpoint
    other = OnlineEM(SymmetricFlip(1), calibrate=True, num_items=20_000)
    other.load_state_dict(online.state_dict())
    assert torch.equal(other.cross_fit_logits, online.cross_fit_logits)
    assert other.scale == online.scale and other.posterior_on and not other.calibrate


@pytest.mark.parametrize(("seed", "found"), [(0, False), (3, True), (5, True)])
def test_at_level_one_half_the_posterior_is_on_wherever_the_fit_finds_noise(seed, found):
    """``auto``'s level on cross-fitted scores (``CROSS_FIT_NOISE_TEST``): with one
    annotator the statistic is half a chi-square with one degree of freedom under "no
    label is wrong", so the test rejects at 1/2 exactly where it is above 0: where the
    maximum-likelihood fit puts some label noise (400 labels, 3% flipped: at seed 0 the
    fit puts none, at seeds 3 and 5 some, p 0.11 and 0.21, which 0.05 does not reject)."""
    c, _, data = _one_annotator(400, 0.97, seed=seed)
    half = OnlineEM(SymmetricFlip(1), num_items=400, noise_test=CROSS_FIT_NOISE_TEST, labels=data)
    half.fit_cross_fitted(c, data)
    test = half.noise_test_result
    assert (test.statistic > 0) is found and half.posterior_on is found
    # P(Lambda >= x) = P(chi2_1 > x) / 2 for x > 0, and 1 at x = 0 (the mass at 0 too)
    tail = 0.5 * math.erfc(math.sqrt(test.statistic / 2)) if found else 1.0
    assert test.p_value == pytest.approx(tail)
    assert (float(half.noise.eta.detach()[0]) < 1 - 1e-4) is found  # the fit's eta below 1
    strict = OnlineEM(SymmetricFlip(1), num_items=400, noise_test=0.05, labels=data)
    strict.fit_cross_fitted(c, data)
    assert not strict.posterior_on  # neither is evidence at 0.05
    assert strict.noise_test_result.statistic == pytest.approx(test.statistic)


def test_cross_fitted_scores_of_clean_or_uninformed_labels_leave_them_as_given():
    c, truth, data = _one_annotator(4000, 0.75, seed=22)
    clean = LabelData.from_labels(
        torch.zeros(4000, dtype=torch.long), truth.float(), num_annotators=1
    )
    # clean labels: the noise test on the scores does not reject, w = 1
    online = OnlineEM(SymmetricFlip(1), num_items=4000, noise_test=0.05, labels=clean)
    online.fit_cross_fitted(c, clean)
    assert online.noise_test_result is not None and not online.noise_test_result.rejected
    e = online.e_step(c[:64], clean.subset(torch.arange(64)), step=0)
    assert e.held_back and torch.equal(e.w, clean.subset(torch.arange(64)).mask.double())
    # noisy labels: it rejects and the posterior reaches the policy
    noisy = OnlineEM(SymmetricFlip(1), num_items=4000, noise_test=0.05, labels=data)
    noisy.fit_cross_fitted(c, data)
    assert noisy.noise_test_result.rejected and noisy.posterior_on
    # scores that say nothing of the truths: no fit is taken, the labels stay as given
    blind = OnlineEM(SymmetricFlip(1), num_items=4000)
    noise = torch.randn(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert blind.fit_cross_fitted(noise, data) is None and not blind.posterior_on
    restored = OnlineEM(SymmetricFlip(1), num_items=4000)
    restored.load_state_dict(blind.state_dict())
    assert not restored.posterior_on
    # scores against most labels (learned nothing of them): read as the labels worse than
    # chance the fit would turn them round; it is not taken and eta stays where it was
    assert sign_agreement(c, data) > 0.5 and sign_agreement(-c, data) < 0.5
    against = OnlineEM(SymmetricFlip(1), num_items=4000, noise_test=0.05, labels=data)
    start = against.noise.eta.detach().clone()
    assert against.fit_cross_fitted(-c, data) is None and not against.posterior_on
    assert torch.equal(against.noise.eta.detach(), start)
    with pytest.raises(ValueError, match="every item"):
        OnlineEM(SymmetricFlip(1), num_items=4000).fit_cross_fitted(
            torch.full((4000,), float("nan"), dtype=torch.float64), data
        )


def test_sign_agreement_counts_the_labels_the_scores_favour():
    data = LabelData.from_labels(
        torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0]), num_annotators=2
    )
    assert data.unit.numel() == 4  # one unit a label (shared truth off)
    logits = torch.tensor([2.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    assert sign_agreement(logits, data) == pytest.approx(1 / 3)  # a score of 0 not counted
    assert math.isnan(sign_agreement(torch.zeros(4, dtype=torch.float64), data))


def test_item_folds_split_the_items_in_folds_drawn_from_the_seed():
    fold = item_folds(101, seed=3, folds=2)
    assert sorted(torch.bincount(fold).tolist()) == [50, 51]
    assert torch.equal(fold, item_folds(101, seed=3, folds=2))
    assert not torch.equal(fold, item_folds(101, seed=4, folds=2))
    assert sorted(torch.bincount(item_folds(101, seed=3, folds=4)).tolist()) == [25, 25, 25, 26]


def test_cross_fit_settings():
    from repo.likelihoods import get_likelihood
    from repo.noise import make_noise_model

    ipo = get_likelihood("ipo")
    method = Method("RE-IPO", "ipo", True, {"beta": 0.1}, em={"cross_fit": True})
    cfg = rule_config("unused", method, seed=0)
    settings = estep_settings(cfg, ipo, SymmetricFlip(1), 8192, 4)
    assert settings.cross_fit and settings.held_out == 0 and not settings.calibrate
    assert not settings.out_of_sample and not settings.epoch_m_step
    # "auto": on cross-fitted scores of 4,096 items or more over several passes, any noise
    # the fit finds (level 0.5, statistic above 0), 0.05 elsewhere; a level given is taken
    # as given
    assert cfg.em.noise_test == "auto" and settings.noise_test == 0.5
    assert estep_settings(cfg, ipo, SymmetricFlip(1), 2048, 4).noise_test == 0.05
    # in one pass the plain loss does not memorise the flipped labels: 0.05 there too
    assert estep_settings(cfg, ipo, SymmetricFlip(1), 8192, 1).noise_test == 0.05
    given = cfg.replace("em", noise_test=0.01)
    assert estep_settings(given, ipo, SymmetricFlip(1), 8192, 4).noise_test == 0.01
    off = cfg.replace("em", cross_fit=False)
    reading = estep_settings(off, ipo, SymmetricFlip(1), 8192, 4)
    assert not reading.cross_fit and reading.noise_test == 0.05
    # the folds: "auto" 4 in one pass, and over several the scorers' loss's (IPO's 4,
    # others 2); as many as asked for; fewer than two refused by name
    assert cfg.em.cross_fit_folds == "auto"
    assert settings.cross_fit_folds == 4 and reading.cross_fit_folds == 0
    assert ipo.several_pass_folds == 4 and get_likelihood("dpo").several_pass_folds == 2
    by_dpo = cfg.replace("em", cross_fit_scorer="dpo")
    assert estep_settings(by_dpo, ipo, SymmetricFlip(1), 8192, 4).cross_fit_folds == 2
    assert estep_settings(by_dpo, ipo, SymmetricFlip(1), 8192, 1).cross_fit_folds == 4
    assert estep_settings(cfg, ipo, SymmetricFlip(1), 8192, 1).cross_fit_folds == 4
    four = estep_settings(cfg.replace("em", cross_fit_folds=4), ipo, SymmetricFlip(1), 8192, 4)
    assert four.cross_fit_folds == 4
    with pytest.raises(ConfigError, match=r"\[em\] cross_fit_folds"):
        cfg.replace("em", cross_fit_folds=1).validate()
    with pytest.raises(ConfigError, match=r"\[em\] cross_fit_folds: 9 folds of 8 items"):
        estep_settings(cfg.replace("em", cross_fit_folds=9), ipo, SymmetricFlip(1), 8, 4)
    boltzmann = rule_config("unused", method, seed=0).replace("noise", model="boltzmann")
    with pytest.raises(ConfigError, match=r"\[em\] cross_fit"):
        estep_settings(boltzmann, ipo, make_noise_model("boltzmann", 1), 8192, 4)


def _cross_fit_run(tmp_path, name: str, folds: int = 2, **run):
    rows = rule_pairs(96, [0.7], seed=4, markers=4).rows
    records = load_preferences(rows, annotator_column="annotator")
    em = {"cross_fit": True, "cross_fit_folds": folds}
    method = Method("RE-IPO", "ipo", True, {"beta": 0.1}, em=em)
    cfg = rule_config(str(tmp_path / name), method, seed=1, optim={"epochs": 2})
    return cfg.replace("run", posteriors=True, **run), records


@pytest.mark.parametrize("folds", [2, 3])
def test_a_cross_fitted_run_scores_each_item_by_the_scorer_that_never_saw_it(
    tmp_path, monkeypatch, folds
):
    seen = []
    e_step = OnlineEM.e_step

    def spy(self, logits, data, step):
        seen.append(self.cross_fit_logits is not None)
        return e_step(self, logits, data, step)

    monkeypatch.setattr(OnlineEM, "e_step", spy)
    cfg, records = _cross_fit_run(tmp_path, "run", folds)
    trainer = Trainer(cfg, records=records)
    trainer.train()
    assert seen and all(seen)  # every E-step of the policy's run read the fixed scores
    assert trainer.estep.cross_fit_folds == folds
    fold = item_folds(len(trainer.data.pairs), cfg.run.seed, folds)
    assert sorted(torch.bincount(fold).tolist()) == [96 // folds] * folds
    for k in range(folds):
        scorer = trainer.run_dir.cross_fit_scorer(k)
        report = json.loads((scorer / "data_report.json").read_text())
        assert report["items"] == int((fold != k).sum())  # it trained on the other folds
        assert json.loads((scorer / "config.json").read_text())["config"]["em"]["enabled"] is False
        # its final policy scores its fold's items as the E-step read them
        sub = cfg.replace("em", enabled=False).replace("run", output_dir=str(scorer))
        policy = build_trained_policy(sub, RunDir(scorer))
        scores = item_scores(policy, trainer.likelihood, trainer.data)[0]
        own = fold == k
        ratio = trainer.em.cross_fit_logits[own] / scores[own]  # 1 / their rms
        torch.testing.assert_close(
            ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=0
        )
    kept = {r.item for r in scorer_records(trainer.data, fold, 0)}
    assert kept == {trainer.data.item_ids[i] for i in (fold != 0).nonzero().reshape(-1).tolist()}
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["cross_fit"] is True
    assert report["eta_profile"]["from"] == "cross_fit_logits"
    posteriors = [json.loads(line) for line in (tmp_path / "run" / "posteriors.jsonl").open()]
    unit_logits = trainer.em.scale * trainer.em.cross_fit_logits[trainer.data.labels.unit]
    torch.testing.assert_close(
        torch.tensor([p["logit"] for p in posteriors], dtype=torch.float64),
        unit_logits,
        rtol=1e-6,
        atol=1e-6,
    )


def test_scorers_of_another_family_train_by_its_loss_at_its_defaults(tmp_path):
    # a CPO run (no reference, its SFT term set) cross-fitted by DPO's scorers
    rows = rule_pairs(96, [0.7], seed=4, markers=4).rows
    records = load_preferences(rows, annotator_column="annotator")
    method = Method("RE-CPO", "cpo", True, {"nll_weight": 0.5}, em={"cross_fit": True})
    cfg = rule_config(str(tmp_path / "run"), method, seed=1, optim={"epochs": 2})
    sub = fold_config(cfg, 0, 24, 0.5, "dpo")
    assert sub.loss == LossSection(family="dpo")  # [loss] afresh: no CPO option carried
    assert fold_config(cfg, 0, 24, 0.5, "cpo").loss == cfg.loss
    trainer = Trainer(cfg, records=records)
    trainer.train()
    assert trainer.estep.cross_fit_scorer == "dpo" and trainer.reference is None
    fold = item_folds(len(trainer.data.pairs), cfg.run.seed, 2)
    dpo = build_likelihood(sub, model_recipe(sub))
    for k in range(2):
        scorer = trainer.run_dir.cross_fit_scorer(k)
        written = json.loads((scorer / "config.json").read_text())["config"]["loss"]
        assert written["family"] == "dpo" and written["nll_weight"] == -1.0
        sub = fold_config(cfg, k, 24, 0.5, "dpo")
        policy = build_trained_policy(sub, RunDir(scorer))
        scores = item_scores(policy, dpo, trainer.data)[0]  # DPO's logit, its reference
        own = fold == k
        ratio = trainer.em.cross_fit_logits[own] / scores[own]  # 1 / their rms
        torch.testing.assert_close(
            ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=0
        )
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["cross_fit_scorer"] == "dpo"


def test_one_pass_of_cpo_cross_fits_by_default_with_dpos_scorers(tmp_path, monkeypatch):
    # one pass, [em] at its defaults: CPO's own first-visit scores carry its SFT term, so
    # "auto" cross-fits by DPO's scorers (each making the run's one pass over its fold);
    # the data size threshold lowered so that a small run reaches it
    monkeypatch.setattr("repo.train.build.MIN_CROSS_FIT", 64)
    rows = rule_pairs(96, [0.7], seed=4, markers=4).rows
    records = load_preferences(rows, annotator_column="annotator")
    one = {"epochs": 1}
    cfg = rule_config(str(tmp_path / "run"), Method("RE-CPO", "cpo", True, {}), seed=1, optim=one)
    assert cfg.em.cross_fit == "auto"
    trainer = Trainer(cfg, records=records)
    trainer.train()
    assert trainer.estep.cross_fit and trainer.estep.cross_fit_scorer == "dpo"
    assert trainer.estep.cross_fit_folds == 4  # "auto" in one pass
    for k in range(4):
        metrics = trainer.run_dir.cross_fit_scorer(k) / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in metrics.open()]
        # one pass over the other three folds' items
        assert steps[-1] == 72 // cfg.optim.batch_size
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["cross_fit"] and report["e_step"]["cross_fit_scorer"] == "dpo"
    dpo = rule_config(str(tmp_path / "dpo"), Method("RE-DPO", "dpo", True, {}), seed=1, optim=one)
    assert not Trainer(dpo, records=records).estep.cross_fit  # its own scores rank pairs


def test_several_passes_of_dpo_cross_fit_by_default_with_ipos_scorers(tmp_path, monkeypatch):
    # several passes, [em] at its defaults: DPO's scorers would learn the flipped labels
    # of their own folds, so "auto" trains them by IPO (DPOLikelihood.cross_fit_scorer)
    monkeypatch.setattr("repo.train.build.MIN_CROSS_FIT", 64)
    rows = rule_pairs(96, [0.7], seed=4, markers=4).rows
    records = load_preferences(rows, annotator_column="annotator")
    cfg = rule_config(
        str(tmp_path / "run"), Method("RE-DPO", "dpo", True, {}), seed=1, optim={"epochs": 2}
    )
    assert cfg.em.cross_fit == "auto" and cfg.em.cross_fit_scorer == ""
    trainer = Trainer(cfg, records=records)
    trainer.train()
    assert trainer.estep.cross_fit and trainer.estep.cross_fit_scorer == "ipo"
    assert trainer.estep.cross_fit_folds == 4  # "auto" over several passes: IPO's scorers'
    for k in range(4):
        written = json.loads((trainer.run_dir.cross_fit_scorer(k) / "config.json").read_text())
        assert written["config"]["loss"]["family"] == "ipo"
        assert written["config"]["em"]["enabled"] is False
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["e_step"]["cross_fit_scorer"] == "ipo"


def test_a_cross_fitted_run_resumes_without_training_its_scorers_again(tmp_path):
    cfg, records = _cross_fit_run(tmp_path, "full", save_steps=4)
    Trainer(cfg, records=records).train()
    # killed after its scorers finished, before its own first checkpoint
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "cross-fit", part / "cross-fit")
    shutil.copytree(tmp_path / "full" / "reference-cache", part / "reference-cache")
    shutil.copy(tmp_path / "full" / "config.json", part / "config.json")
    stamps = {p: p.stat().st_mtime_ns for p in (part / "cross-fit").rglob("*") if p.is_file()}
    resumed = Trainer(cfg.replace("run", output_dir=str(part), resume=True), records=records)
    resumed.train()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no scorer ran again
    a = load_file(str(tmp_path / "full" / "noise.safetensors"))
    b = load_file(str(part / "noise.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    again = load_file(str(part / "model" / "model.safetensors"))
    for key in full:
        torch.testing.assert_close(full[key], again[key], rtol=1e-5, atol=1e-6)


def test_cli_run_with_cross_fit(tmp_path):
    from repo.cli import main

    write_jsonl(tmp_path / "data.jsonl", rule_pairs(48, [0.7], seed=6, markers=4).rows)
    (tmp_path / "run.toml").write_text(
        '[model]\nrecipe = "tiny-llama"\ndevice = "cpu"\n'
        '[data]\ntrain = "data.jsonl"\n'
        '[loss]\nfamily = "dpo"\n'
        "[em]\ncross_fit = true\n"
        '[optim]\nbatch_size = 8\nmax_steps = 4\n[run]\noutput_dir = "run"\nprogress = false\n'
    )
    assert main(["train", str(tmp_path / "run.toml")]) == 0
    # max_steps 4 is under one pass: four folds ("auto"), each scorer's max_steps scaled
    # by the three quarters of the units it trains on
    for k in range(4):
        assert (tmp_path / "run" / "cross-fit" / f"scorer-{k}" / "adapter").is_dir()
    metrics = [
        json.loads(line)
        for line in (tmp_path / "run" / "cross-fit" / "scorer-0" / "metrics.jsonl").open()
    ]
    assert metrics[-1]["step"] == 3


def test_cross_fit_gives_way_to_fields_asked_for_and_refuses_to_mix_with_them():
    from repo.likelihoods import get_likelihood

    ipo = get_likelihood("ipo")
    auto = rule_config("unused", Method("RE-IPO", "ipo", True, {"beta": 0.1}), seed=0)
    assert estep_settings(auto, ipo, SymmetricFlip(1), 8192, 4).cross_fit
    assert estep_settings(auto, ipo, SymmetricFlip(1), MIN_CROSS_FIT, 2).cross_fit
    # one pass: IPO's mixture step would train an adapter on its own beliefs; the "nll"
    # step reads the policy's first visits (DPO's default)
    assert estep_settings(auto, ipo, SymmetricFlip(1), 8192, 1).cross_fit
    nll = auto.replace("loss", variant="nll")
    assert not estep_settings(nll, ipo, SymmetricFlip(1), 8192, 1).cross_fit
    dpo_run = rule_config("unused", Method("RE-DPO", "dpo", True, {}), seed=0)
    assert not estep_settings(dpo_run, get_likelihood("dpo"), SymmetricFlip(1), 8192, 1).cross_fit
    mixture = dpo_run.replace("loss", variant="mixture")
    assert estep_settings(mixture, get_likelihood("dpo"), SymmetricFlip(1), 8192, 1).cross_fit
    assert not estep_settings(auto, ipo, SymmetricFlip(1), MIN_CROSS_FIT - 1, 1).cross_fit
    assert not estep_settings(auto, ipo, SymmetricFlip(1), MIN_CROSS_FIT - 1, 4).cross_fit
    assert not estep_settings(auto, ipo, SymmetricFlip(3), 8192, 4).cross_fit  # a pool
    assert get_likelihood("dpo").default_cross_fit and not get_likelihood("simpo").default_cross_fit
    cpo = get_likelihood("cpo")  # its SFT term clones flipped responses: DPO's scorers
    assert cpo.default_cross_fit and cpo.cross_fit_scorer() == cpo.cross_fit_scorer(4) == "dpo"
    assert get_likelihood("cpo", nll_weight=0.0).cross_fit_scorer(4) == "cpo"
    assert get_likelihood("ipo").cross_fit_scorer(1) == get_likelihood("ipo").cross_fit_scorer(4)
    # DPO's scorers: its own loss in one pass, IPO's over several (margins to a target)
    dpo = get_likelihood("dpo")
    assert (dpo.cross_fit_scorer(1), dpo.cross_fit_scorer(2)) == ("dpo", "ipo")
    several = estep_settings(dpo_run, dpo, SymmetricFlip(1), 8192, 4)
    assert several.cross_fit_scorer == "ipo" and several.cross_fit_folds == 4
    own = estep_settings(
        dpo_run.replace("em", cross_fit_scorer="dpo"), dpo, SymmetricFlip(1), 8192, 4
    )
    assert own.cross_fit_scorer == "dpo" and own.cross_fit_folds == 2
    cpo_run = rule_config("unused", Method("RE-CPO", "cpo", True, {}), seed=0)
    assert estep_settings(cpo_run, cpo, SymmetricFlip(1), 8192, 4).cross_fit_folds == 2
    settings = estep_settings(auto, cpo, SymmetricFlip(1), 8192, 4)
    assert settings.cross_fit and settings.held_out == 0 and settings.cross_fit_scorer == "dpo"
    assert estep_settings(auto, ipo, SymmetricFlip(1), 8192, 4).cross_fit_scorer == "ipo"
    chosen = auto.replace("em", cross_fit_scorer="SimPO")
    assert estep_settings(chosen, cpo, SymmetricFlip(1), 8192, 4).cross_fit_scorer == "simpo"
    assert estep_settings(nll, ipo, SymmetricFlip(1), 8192, 1).cross_fit_scorer == ""
    # one pass: cross-fitted only by scorers of another loss than the run's (CPO's, DPO)
    cpo_run = rule_config("unused", Method("RE-CPO", "cpo", True, {}), seed=0)
    one_pass = estep_settings(cpo_run, cpo, SymmetricFlip(1), 8192, 1)
    assert one_pass.cross_fit and one_pass.cross_fit_scorer == "dpo"
    assert not estep_settings(cpo_run, cpo, SymmetricFlip(1), MIN_CROSS_FIT - 1, 1).cross_fit
    assert not estep_settings(cpo_run, cpo, SymmetricFlip(3), 8192, 1).cross_fit  # a pool
    likelihood_style = get_likelihood("cpo", nll_weight=0.0)  # its own scores rank pairs
    assert not estep_settings(cpo_run, likelihood_style, SymmetricFlip(1), 8192, 1).cross_fit
    by_dpo = nll.replace("em", cross_fit_scorer="dpo")  # asked for another loss's scorers
    assert estep_settings(by_dpo, ipo, SymmetricFlip(1), 8192, 1).cross_fit
    assert not estep_settings(
        nll.replace("em", cross_fit_scorer="ipo"), ipo, SymmetricFlip(1), 8192, 1
    ).cross_fit
    with pytest.raises(ConfigError, match=r"\[em\] cross_fit_scorer: unknown loss family 'dpx'"):
        auto.replace("em", cross_fit_scorer="dpx")
    held = auto.replace("em", held_out=True)
    assert not estep_settings(held, ipo, SymmetricFlip(1), 8192, 4).cross_fit
    for name in ("calibrate", "out_of_sample", "epoch_m_step", "held_out"):
        both = auto.replace("em", cross_fit=True, **{name: True})
        with pytest.raises(ConfigError, match=name):
            estep_settings(both, ipo, SymmetricFlip(1), 8192, 4)


def test_the_cost_benchmark_times_each_method_beside_ipo_in_the_same_rounds(tmp_path, capsys):
    """benchmarks/cross_fit_cost.py --quick: every method a whole run on the same pairs,
    its CPU time divided by IPO's of the same round, recorded where ``--out`` says."""
    cost = load_benchmark("cross_fit_cost")
    out = tmp_path / "cross_fit_cost-quick.json"
    result = cost.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert (result["pairs"], result["rounds"], result["quick"]) == (128, 1, True)
    methods = {m["method"]: m for m in result["methods"]}
    assert list(methods) == list(cost.METHODS)
    assert [m["expected_ratio"] for m in methods.values()] == [1.0, 1.0, 2.0, 4.0]
    assert methods["IPO"]["ratio"] == 1.0 and methods["IPO"]["ratio_wall"] == 1.0
    for m in methods.values():
        assert m["cpu_s"] > 0 and m["wall_s"] > 0 and m["ratio"] > 0
        assert m["ratio"] == pytest.approx(m["cpu_s"] / methods["IPO"]["cpu_s"], rel=0.02)
