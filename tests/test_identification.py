"""The identification check: one annotator's eta against its profile-likelihood interval."""

import json

import pytest
import torch

from repo.cli import main
from repo.data.rule_pairs import rule_pairs
from repo.diagnostics import load_run
from repo.diagnostics.checks import (
    IDENTIFICATION_WIDTH,
    FitWarning,
    identification_warnings,
    run_warnings,
)
from repo.inference.profile import eta_profile


def _profile(low: float, high: float, n: int = 512) -> dict:
    return {"estimate": (low + high) / 2, "interval": [low, high], "num_labels": n}


def test_no_warning_for_a_short_interval_that_holds_the_estimate():
    assert identification_warnings(_profile(0.78, 0.84), 0.80, "a0") == []


def test_a_wide_interval_warns_with_its_width_and_names_the_annotator():
    (found,) = identification_warnings(_profile(0.505, 1.0, n=300), 0.93, "rater")
    assert found.check == "identification"
    assert found.value == pytest.approx(0.495)
    assert found.annotators == ("rater",) and found.parameters == ("eta[rater]",)
    assert "[0.505, 1.000]" in found.message and "300 first-visit" in found.message
    assert "inside" in found.message
    assert FitWarning.from_dict(found.to_dict()) == found  # what reliability.json keeps
    # the scores the profile was computed at are named (held-out labels: [em] held_out)
    held = {**_profile(0.505, 1.0, n=51), "from": "held_out_logits"}
    (found,) = identification_warnings(held, 0.93, "rater")
    assert "51 held-out logits" in found.message


def test_an_estimate_outside_a_short_interval_warns():
    assert IDENTIFICATION_WIDTH > 0.06
    (found,) = identification_warnings(_profile(0.70, 0.76), 0.92, "a0")
    assert "outside" in found.message


def test_profile_of_a_strong_scorer_passes_and_of_a_weak_one_warns():
    # labels with eta = 0.8 over truths drawn from sigmoid(s): with |s| large the
    # interval is short and holds 0.8; with |s| small it spans most of [1/2, 1]
    g = torch.Generator().manual_seed(3)
    for spread, warns in ((6.0, False), (0.3, True)):
        s = spread * torch.randn(4_000, generator=g, dtype=torch.float64)
        truth = torch.rand(4_000, generator=g, dtype=torch.float64) < torch.sigmoid(s)
        flip = torch.rand(4_000, generator=g, dtype=torch.float64) < 0.2
        labels = (truth ^ flip).double()
        profile = eta_profile(s, labels, grid=101, scales=61).to_dict()
        assert bool(identification_warnings(profile, 0.8, "a0")) is warns, profile


def test_the_profile_reads_logits_up_to_their_scale():
    # the scale is free, so the interval cannot depend on the logits' units; and scores
    # of tens of nats at chance (a policy that learned nothing, as CPO's summed
    # log-probabilities) say nothing of eta: the interval is all of [1/2, 1], where a
    # scale held at a >= MIN_SCALE read them as labels near chance ([0.5, 0.68])
    g = torch.Generator().manual_seed(5)
    truth = torch.rand(819, generator=g, dtype=torch.float64) < 0.5
    labels = (truth ^ (torch.rand(819, generator=g, dtype=torch.float64) < 0.2)).double()
    sure = (2 * truth.double() - 1) * (0.2 + torch.rand(819, generator=g, dtype=torch.float64))
    base = eta_profile(sure, labels, grid=201, scales=121)
    assert base.interval[0] <= 0.8 <= base.interval[1] and base.width < 0.1
    for units in (30.0, 100.0):
        scaled = eta_profile(units * sure, labels, grid=201, scales=121)
        assert scaled.interval == pytest.approx(base.interval, abs=0.011)
        chance = units * torch.randn(819, generator=g, dtype=torch.float64)
        assert eta_profile(chance, labels, grid=201, scales=121).interval == (0.5, 1.0)


def test_re_po_train_prints_the_warning_and_records_it(tmp_path, capsys):
    # one annotator, 32 pairs, two steps: the labels cannot pin eta down
    rows = rule_pairs(32, [0.8], seed=5).rows
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    toml = tmp_path / "train.toml"
    toml.write_text(
        '[model]\nrecipe = "tiny-llama"\ndevice = "cpu"\nmax_length = 64\n'
        '[data]\ntrain = "data.jsonl"\nannotator_column = "annotator"\n'
        "[em]\nenabled = true\n"
        "[optim]\nbatch_size = 16\nmax_steps = 2\n"
        '[run]\noutput_dir = "run"\nprogress = false\n'
    )
    assert main(["train", str(toml)]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "reliability.json").read_text())
    (recorded,) = report["warnings"]
    assert recorded["check"] == "identification"
    low, high = report["eta_profile"]["interval"]
    assert high - low > IDENTIFICATION_WIDTH
    assert f"[re-po] WARNING: {FitWarning.from_dict(recorded)}" in err
    # diagnose reads it back with the run, ahead of the final fit's own checks
    found = run_warnings(load_run(tmp_path / "run").result)
    assert found[0] == FitWarning.from_dict(recorded)
