"""The likelihood-ratio test of label noise and the E-step it gates (``[em] noise_test``)."""

import json
import math
import threading

import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import binom, chi2

from repo.data.simulate import simulate_labels
from repo.inference.noise_test import (
    chi_bar_squared_sf,
    likelihood_ratio_test,
    perfect_labels_log_likelihood,
)
from repo.inference.online import (
    FIRST_LOOK,
    LOOK_SPACING,
    OnlineEM,
    fit_calibrated,
    look_points,
    pass_ends,
)
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData


def _labels(num: int, eta: float, seed: int, num_annotators: int = 1):
    """One label per item from annotators of reliability ``eta`` over truths drawn from
    ``sigmoid(s)`` (calibrated scores ``s``)."""
    sim = simulate_labels(
        num_items=num,
        num_annotators=num_annotators,
        shared_truth=False,
        eta_range=(eta, eta),
        seed=seed,
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=num_annotators)
    return torch.as_tensor(sim.scores, dtype=torch.float64), data


def _test(c: torch.Tensor, data: LabelData, level: float = 0.05):
    noise = SymmetricFlip(data.num_annotators)
    start = {k: v.clone() for k, v in noise.state_dict().items()}
    _, scorer = fit_calibrated(noise, c, data, [start])
    return likelihood_ratio_test(noise, scorer, data, level=level)


def test_chi_bar_squared_mixes_chi_squares_with_binomial_weights():
    # one boundary parameter: half a chi-square(1); its 0.95 point is chi2(1)'s 0.90
    assert chi_bar_squared_sf(float(chi2.ppf(0.90, 1)), 1) == pytest.approx(0.05)
    x = 4.2
    expected = 0.5 * chi2.sf(x, 1) + 0.25 * chi2.sf(x, 2)
    assert chi_bar_squared_sf(x, 2) == pytest.approx(expected)
    assert chi_bar_squared_sf(0.0, 3) == 1.0 and chi_bar_squared_sf(math.inf, 3) == 0.0


def test_chi_bar_squared_weights_hold_for_thousands_of_annotators():
    # 2^-2000 underflows a float and C(2000, 1000) overflows one: log-space weights
    d, x = 2000, 1040.0
    expected = sum(binom.pmf(k, d, 0.5) * chi2.sf(x, k) for k in range(1, d + 1))
    assert 0.05 < expected < 0.95
    assert chi_bar_squared_sf(x, d) == pytest.approx(expected, rel=1e-9)


def test_perfect_labels_fit_is_a_logistic_regression_without_intercept():
    c, data = _labels(300, 1.0, seed=1)
    y = data.label[:, 0]
    ll0, scale = perfect_labels_log_likelihood(c, data, (1e-3, 1e3))

    def negative(a: float) -> float:
        return -float(torch.nn.functional.logsigmoid(a * c * (2 * y - 1)).sum())

    best = minimize_scalar(negative, bounds=(1e-3, 1e3), method="bounded", options={"xatol": 1e-9})
    assert scale == pytest.approx(best.x, rel=1e-4)
    assert ll0 == pytest.approx(-best.fun, rel=1e-8)
    # two labels of one unit that disagree: impossible under perfect annotators
    two = LabelData.from_labels(
        torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), item=torch.tensor([0, 0]), shared_truth=True
    )
    assert perfect_labels_log_likelihood(torch.zeros(1), two, (1e-2, 1e2))[0] == -math.inf
    assert _test(torch.zeros(1, dtype=torch.float64), two).rejected


def test_the_test_holds_its_level_on_clean_labels_and_finds_noise():
    # calibrated scores, one annotator: clean labels are rejected at about the level
    # (the chi-bar-squared reference), 2,000 labels with 25% flipped nearly always
    # (with one annotator only the scores' shape tells noise: 300 such labels are
    # rejected about half the time)
    clean = [_test(*_labels(300, 1.0, seed=s)) for s in range(60)]
    noisy = [_test(*_labels(2000, 0.75, seed=100 + s)) for s in range(10)]
    assert all(t.statistic >= 0 and t.df == 1 for t in clean)
    assert sum(t.rejected for t in clean) / len(clean) <= 0.12
    assert sum(t.rejected for t in noisy) >= 9
    # several annotators: one degree of freedom each
    assert _test(*_labels(300, 0.75, seed=7, num_annotators=3)).df == 3


def test_looks_double_from_the_first_then_space_evenly_and_end_with_every_item():
    assert look_points(1000) == [64, 128, 256, 512, 1000]
    assert look_points(512) == [64, 128, 256, 512]
    assert look_points(40) == [40]
    assert look_points(100) == [64, 100]
    assert FIRST_LOOK == 64 and LOOK_SPACING == 512
    # past LOOK_SPACING the looks come every LOOK_SPACING items, not at doublings
    assert look_points(2048) == [64, 128, 256, 512, 1024, 1536, 2048]
    assert look_points(8192)[3:] == list(range(512, 8193, 512))
    assert look_points(2600) == [64, 128, 256, 512, 1024, 1536, 2048, 2560, 2600]
    # spacing = pass_size: the doubling looks alone
    assert look_points(8192, spacing=8192) == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    # later passes: one look at the end of each
    assert look_points(512, passes=3) == [64, 128, 256, 512, 1024, 1536]
    # passes of their own sizes (a last pass that trains the held-out items too)
    assert pass_ends([448, 512], 3) == [448, 960, 1472] and pass_ends(512, 2) == [512, 1024]
    assert look_points([448, 512], passes=2) == [64, 128, 256, 448, 960]


def test_a_longer_last_pass_is_looked_at_at_its_own_end():
    # a first pass over 1,792 of 2,048 items at chance, then a pass over all 2,048
    # with scores that know the truth: the pass ends, and the last look, come at
    # 1,792 + 2,048 visits, not at twice the first pass
    c, data = _labels(2048, 0.7, seed=3)

    def online_em() -> OnlineEM:
        return OnlineEM(
            SymmetricFlip(1),
            num_items=2048,
            noise_test=0.05,
            labels=data,
            passes=2,
            pass_size=[1792, 2048],
        )

    online = online_em()
    assert not any(_run(online, torch.zeros_like(c), data.subset(torch.arange(1792)), batch=256))
    # resumed at the first pass's end, a copy starts the next pass's scores anew as well
    resumed = online_em()
    resumed.load_state_dict(online.state_dict())
    for each in (online, resumed):
        opened = _run(each, c, data, batch=256)
        assert opened == [False] * 7 + [True]  # not at 3,584 = 2 x 1,792 visits
        assert each.noise_test_result.items == 2048  # the second pass's scores alone
        assert each.noise_test_result.level == pytest.approx(0.05 / 8)  # 7 + 1 looks


def test_a_later_pass_looks_at_its_own_scores():
    # first pass: a policy at chance (zero logits) shows nothing; second pass: scores
    # that know the truth show the flipped labels, at the end of that pass
    c, data = _labels(2048, 0.7, seed=3)
    online = OnlineEM(SymmetricFlip(1), num_items=2048, noise_test=0.05, labels=data, passes=2)
    assert not any(_run(online, torch.zeros_like(c), data, batch=256))
    assert online.noise_test_result.statistic == 0.0
    # the pass ended: its scores stay for the refit at its end, until the next E-step
    assert not torch.isnan(online.pass_logits).any()
    first = data.subset(torch.arange(256))
    online.e_step(c[first.unit], first, 8)
    assert torch.isnan(online.pass_logits).sum() == 2048 - 256  # the next pass's own scores
    online.m_step()
    rest = data.subset(torch.arange(256, 2048))
    opened = [online.noise_evident, *_run(online, c, rest, batch=256)]
    assert opened == [False] * 7 + [True]
    assert online.noise_test_result.level == pytest.approx(0.05 / 8)  # 7 + 1 looks
    assert online.noise_test_result.items == 2048


def _run(online: OnlineEM, c: torch.Tensor, data: LabelData, batch: int = 32) -> list[bool]:
    opened = []
    for step, start in enumerate(range(0, data.num_units, batch)):
        part = data.subset(torch.arange(start, min(start + batch, data.num_units)))
        estep = online.e_step(c[part.unit], part, step)
        if not online.noise_evident:  # the labels as given: w = 1, q = the label
            torch.testing.assert_close(estep.w, torch.ones_like(estep.w))
            torch.testing.assert_close(estep.q, part.label[:, 0], atol=1e-9, rtol=0)
            assert not estep.exact
        online.m_step()
        opened.append(online.noise_evident)
    return opened


def test_the_e_step_waits_for_evidence_of_noise():
    c, data = _labels(2048, 0.7, seed=3)
    online = OnlineEM(SymmetricFlip(1), num_items=2048, noise_test=0.05, labels=data)
    opened = _run(online, c, data)
    # looks after 64, 128, ... items: switched on at one of them, and on from then on
    first = opened.index(True)
    assert ((first + 1) * 32) in look_points(2048)
    assert all(opened[first:])
    assert online.noise_test_result.rejected
    # meanwhile eta learned as without the test
    plain = OnlineEM(SymmetricFlip(1), num_items=2048)
    _run(plain, c, data)
    assert float(online.noise.eta[0]) == pytest.approx(float(plain.noise.eta[0]))
    # a checkpoint keeps the decision
    other = OnlineEM(SymmetricFlip(1), num_items=2048, noise_test=0.05, labels=data)
    other.load_state_dict(online.state_dict())
    assert other.noise_evident
    assert other.noise_test_result == online.noise_test_result


def test_labels_that_disagree_switch_the_posterior_on_at_once():
    # two annotators on each of 200 items, one of them flipping: the first step's
    # disagreements reject "no label is wrong" without waiting for a look
    g = torch.Generator().manual_seed(4)
    truth = (torch.rand(200, generator=g) < 0.5).double()
    flipped = torch.where(torch.rand(200, generator=g) < 0.3, 1 - truth, truth)
    data = LabelData.from_labels(
        torch.tensor([0, 1]).repeat(200),
        torch.stack([truth, flipped], -1).reshape(-1),
        item=torch.arange(200).repeat_interleave(2),
        shared_truth=True,
        num_annotators=2,
    )
    online = OnlineEM(SymmetricFlip(2), num_items=200, noise_test=0.05, labels=data)
    first = data.subset(torch.arange(16))
    online.e_step(torch.zeros(16, dtype=torch.float64), first, step=0)
    online.m_step()
    assert online.noise_evident
    assert online.noise_test_result.statistic == math.inf
    assert online.noise_test_result.items == 16


def test_clean_labels_leave_the_e_step_off_and_the_test_needs_its_data():
    c, data = _labels(512, 1.0, seed=5)
    online = OnlineEM(SymmetricFlip(1), num_items=512, noise_test=0.05, labels=data)
    assert not any(_run(online, c, data))
    assert online.noise_test_result.items == 512
    assert not online.noise_test_result.rejected
    with pytest.raises(ValueError, match="noise_test"):
        OnlineEM(SymmetricFlip(1), noise_test=0.05)
    with pytest.raises(ValueError, match="noise_test must"):
        OnlineEM(SymmetricFlip(1), num_items=4, noise_test=1.0, labels=data)


def test_the_test_is_a_config_field_and_reaches_the_trainer(tmp_path):
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer
    from repo.train.config import ConfigError

    rows = rule_pairs(48, [1.0], seed=2, markers=4).rows
    # the E-step reading the policy (one annotator's default cross-fits: tests/test_cross_fit.py)
    method = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"cross_fit": False})
    cfg = rule_config(str(tmp_path / "run"), method, seed=0, optim={"epochs": 1})
    assert cfg.em.noise_test == "auto"  # 0.05 where the E-step reads the policy
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    trainer.train()
    assert trainer.em.noise_test == 0.05
    assert trainer.em.noise_test_result.items == 48  # one look: every item
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    assert report["noise_test"] == trainer.em.noise_test_result.to_dict()
    assert trainer.last_metrics["noise/evident"] == float(trainer.em.noise_evident)
    assert trainer.last_metrics["e_step_scale"] == trainer.em.scale  # TRL's name
    off = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"noise_test": 0})
    cfg = rule_config(str(tmp_path / "off"), off, seed=0, optim={"epochs": 1})
    trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
    assert trainer.em.noise_evident
    bad = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"noise_test": 1.5})
    with pytest.raises(ConfigError, match="noise_test"):
        rule_config(str(tmp_path / "bad"), bad, seed=0)


def test_while_held_back_every_variant_trains_as_the_plain_loss(tmp_path):
    """Clean labels: the test never rejects, so RE-CPO with the literal EM step
    (``"nll"``: a logistic on ``(beta + lambda) Delta``, no SFT term) trains exactly as
    CPO, SFT term included; the policy objective of a held-back E-step is the plain
    loss, and the logged loss is X's."""
    from repo.data.loaders import load_preferences
    from repo.data.rule_pairs import rule_pairs
    from repo.experiments import Method, rule_config
    from repo.train import Trainer

    rows = rule_pairs(48, [1.0], seed=2, markers=4).rows
    runs = {}
    for name, robust, loss in (
        ("CPO", False, {"beta": 1.0}),
        ("RE-CPO", True, {"beta": 1.0, "variant": "nll"}),
    ):
        method = Method(name, "cpo", robust, loss)
        cfg = rule_config(str(tmp_path / name), method, seed=0, optim={"epochs": 1})
        trainer = Trainer(cfg, records=load_preferences(rows, annotator_column="annotator"))
        trainer.train()
        runs[name] = trainer
    re_cpo = runs["RE-CPO"]
    assert re_cpo.variant == "nll" and not re_cpo.em.noise_evident
    for (key, a), b in zip(
        runs["CPO"].policy.model.state_dict().items(),
        re_cpo.policy.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), key
    assert re_cpo.last_metrics["loss"] == runs["CPO"].last_metrics["loss"]


def test_a_checkpoint_keeps_the_items_every_process_visited():
    # two processes, each visiting half the items: the saved state (the main
    # process's copy) holds both halves' first-visit and pass logits, so a resumed
    # run neither re-reads another process's items as first visits nor looks at half
    c, data = _labels(256, 0.7, seed=5)
    ranks = [
        OnlineEM(SymmetricFlip(1), num_items=256, noise_test=0.05, labels=data) for _ in range(2)
    ]
    for rank, online in enumerate(ranks):
        part = data.subset(torch.arange(rank * 128, rank * 128 + 40))
        online.e_step(c[part.unit], part, step=0)
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce(rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next call overwrites a slot
            return total

        return reduce

    states = [None, None]

    def save(rank: int) -> None:
        states[rank] = ranks[rank].state_dict(all_reduce(rank))

    workers = [threading.Thread(target=save, args=(r,)) for r in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    visited = torch.cat([torch.arange(0, 40), torch.arange(128, 168)])
    for state in states:
        for key in ("first_visit.logits", "noise_test.pass_logits"):
            seen = ~torch.isnan(state[key])
            assert seen.nonzero().reshape(-1).tolist() == visited.tolist()
            torch.testing.assert_close(state[key][visited], c[visited].double())
    # one process alone: its own items
    alone = ranks[0].state_dict()
    assert int((~torch.isnan(alone["first_visit.logits"])).sum()) == 40


def test_warm_up_steps_count_as_visits_of_the_pass():
    # scores at chance never reject; the pass still ends after 2048 visits, warm-up
    # steps (w at the prior eta, no posterior) included, and its last look reads all
    c, data = _labels(2048, 0.7, seed=3)
    online = OnlineEM(
        SymmetricFlip(1), num_items=2048, noise_test=0.05, labels=data, warmup_steps=4
    )
    for step, start in enumerate(range(0, 2048, 256)):
        part = data.subset(torch.arange(start, start + 256))
        online.e_step(torch.zeros(256, dtype=torch.float64), part, step)
        online.m_step()
    assert not online.noise_evident
    assert online.noise_test_result.items == 2048
    assert online._new_pass  # the pass ended with its last step
