"""Tests of the experiment scripts (examples/noise_sweep.py, examples/reliability_recovery.py)
and their helpers in repo.experiments, on grids small enough for seconds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import repo
from repo.experiments import Method, annotator_pool, scorer_accuracy, t_interval, with_fields

ROOT = Path(repo.__file__).resolve().parents[1]


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_t_interval_and_pool():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} * 1 / sqrt 3
    assert math.isnan(t_interval([0.7])[1])
    pool = annotator_pool(0.4)
    np.testing.assert_allclose(pool, [1.0, 0.8, 0.4, 0.2])
    assert np.mean(pool) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="flip rates"):
        annotator_pool(0.6)  # the noisiest annotator would flip 120% of labels


def test_noise_sweep_counts_a_test_never_taken_as_off():
    """A run whose cross-fitted fit was not taken has no noise test (``noise_evident``
    empty in the CSV): its posterior never reached the policy, so ``on`` counts it as
    off, not as the truthy NaN it is read as."""
    sweep = load_example("noise_sweep")
    frame = pd.DataFrame(
        {
            "noise": ["single"] * 3,
            "flip_rate": [0.4] * 3,
            "method": ["RE-DPO"] * 3,
            "noise_evident": [True, np.nan, False],
        }
    )
    assert sweep.switched_on(frame, "RE-DPO", "K=1 0.4") == "1/3"
    frame["noise_evident"] = np.nan  # runs without the test
    assert sweep.switched_on(frame, "RE-DPO", "K=1 0.4") == ""


def test_noise_sweep_grid_table_and_figure(tmp_path):
    """Clean rule pairs, one seed: DPO and Hölder-DPO learn the rule, rDPO told rho = 0
    is DPO, and RE-DPO raises eta from its start 0.9 towards 1; the tables and the
    figure follow."""
    sweep = load_example("noise_sweep")
    names = "DPO cDPO rDPO Hölder-DPO RE-DPO IPO RE-IPO SimPO RE-SimPO CPO RE-CPO".split()
    assert [m.name for m in sweep.methods(0.2)] == names
    assert all(m.em == {} for m in sweep.methods(0.2))  # RE-PO as a user gets it
    grid = sweep.Grid(
        settings=(("single", 0.0),),
        seeds=(10,),
        num_pairs=128,
        held_out=100,
        optim={"epochs": 3},
        only=("DPO", "rDPO", "Hölder-DPO", "RE-DPO"),
    )
    frame = sweep.run_grid(grid, tmp_path / "runs.csv")
    assert list(frame.method) == ["DPO", "Hölder-DPO", "RE-DPO", "rDPO"]  # cDPO, rDPO last
    assert sweep.run_grid(grid, tmp_path / "runs.csv").empty  # --append: all done already
    assert (
        len(open(tmp_path / "runs.csv", encoding="utf-8").read().splitlines()) == 5
    )  # header + 4 runs
    acc = frame.set_index("method").accuracy
    assert acc["DPO"] > 0.75 and acc["Hölder-DPO"] > 0.75, acc  # chance is 0.5
    assert acc["rDPO"] == acc["DPO"]  # epsilon = 0: the same loss, the same seed
    eta = json.loads(frame.set_index("method").eta_hat["RE-DPO"])
    assert len(eta) == 1 and eta[0] > 0.93, eta  # started at 0.9; every label is right
    assert json.loads(frame.set_index("method").eta_hat["DPO"]) == []
    # the profile interval of eta at the first-visit scores (reliability.json's
    # eta_profile): one annotator's, on [1/2, 1]; none for a run without EM
    low, high = frame.set_index("method").loc["RE-DPO", ["eta_low", "eta_high"]]
    assert 0.5 <= low <= high <= 1.0, (low, high)
    assert frame.set_index("method").loc["DPO", ["eta_low", "eta_high"]].isna().all()
    # the E-step the defaults resolved to: one annotator and DPO, first visits only
    # (128 items: too few to cross-fit, MIN_CROSS_FIT)
    re_dpo = frame.set_index("method").loc["RE-DPO"]
    assert (re_dpo.temperature, re_dpo.calibrate, re_dpo.out_of_sample) == (1.0, False, True)
    assert re_dpo.cross_fit == False  # noqa: E712 (a numpy bool)
    assert frame.set_index("method").out_of_sample.isna()["DPO"]
    assert sweep.estep_label(frame, "RE-DPO", "clean") == "T=1 oos test 0.05"
    assert bool(re_dpo.policy_calibrate)  # no learned scale: nothing to split
    # a run whose policy step read its posterior at s / T under a learned scale says so
    split = frame.copy()
    split.loc[split.method == "RE-DPO", ["calibrate", "out_of_sample", "policy_calibrate"]] = [
        True,
        False,
        False,
    ]
    assert sweep.estep_label(split, "RE-DPO", "clean") == "T=1 learned (policy s/T) test 0.05"
    # a cross-fitted run names its folds where they are not two (rows without the column:
    # two, as every cross-fitted run made before it)
    assert re_dpo.cross_fit_folds == 0  # the E-step read the policy
    crossed = frame.copy()
    crossed.loc[crossed.method == "RE-DPO", ["cross_fit", "cross_fit_folds"]] = [True, 4]
    assert sweep.estep_label(crossed, "RE-DPO", "clean") == "cross-fit 4 folds test 0.05"
    assert sweep.estep_label(crossed.drop(columns="cross_fit_folds"), "RE-DPO", "clean") == (
        "cross-fit test 0.05"
    )
    # clean labels: the noise test kept the posterior off, so RE-DPO trained as DPO
    assert re_dpo.noise_test == 0.05 and not re_dpo.noise_evident
    assert acc["RE-DPO"] == acc["DPO"]
    assert sweep.switched_on(frame, "RE-DPO", "clean") == "0/1"
    targets = sweep.targets_table({"3 epochs": frame})
    row = next(line for line in targets.splitlines() if "| clean | DPO |" in line)
    assert "| T=1 oos test 0.05 | 0/1 | +0.000 |" in row and "not below" in row, row
    hold = int(low <= 1.0 <= high)  # clean labels: the realised share is 1
    assert f"| {hold}/1 hold, width {high - low:.2f} |" in row, row
    tables = sweep.markdown_tables(frame)
    assert "| DPO | " in tables and "| Hölder-DPO | " in tables
    assert "| RE-DPO | clean | 1.000 |" in tables
    sweep.plot(frame, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    head = sweep.headline(frame)
    assert set(head["accuracy"]["clean"]) == {"DPO", "rDPO", "Hölder-DPO", "RE-DPO"}
    assert head["re_po_minus_plain"]["clean"]["RE-DPO"][0] == pytest.approx(
        acc["RE-DPO"] - acc["DPO"]
    )
    log_loss = frame.set_index("method").log_loss
    assert log_loss["DPO"] < math.log(2) and 0 <= frame.ece.min() <= frame.ece.max() < 0.5
    assert frame.scorer_accuracy.isna().all()  # no run was cross-fitted
    # a cross-fitted run records how far its scorers tell the truths (clean labels: the
    # scorers, each trained on the other half, learn the rule)
    crossed = sweep.run_grid(
        dataclasses.replace(grid, only=('RE-DPO em.cross_fit=true em.cross_fit_scorer="ipo"',)),
        tmp_path / "runs.csv",
    )
    (row,) = crossed.to_dict("records")
    assert row["cross_fit"] and row["cross_fit_scorer"] == "ipo"
    assert row["scorer_accuracy"] > 0.75, row
    assert pd.read_csv(tmp_path / "runs.csv").scorer_accuracy.notna().sum() == 1


def test_noise_sweep_rows_gain_a_new_column_and_keep_the_old_rows_as_written(tmp_path):
    # a CSV from before a column was added: the column is added, blank in the old rows,
    # whose text is kept as written; a row without the column is appended in place
    sweep = load_example("noise_sweep")
    path = tmp_path / "runs.csv"
    path.write_text("seed,accuracy,eta_low\n20,0.950,\n", encoding="utf-8")
    sweep._append_row(path, {"seed": 21, "accuracy": 0.9, "eta_low": 0.5, "scorer_accuracy": 0.8})
    sweep._append_row(path, {"seed": 22, "accuracy": 0.7, "eta_low": None})
    assert path.read_text(encoding="utf-8").splitlines() == [
        "seed,accuracy,eta_low,scorer_accuracy",
        "20,0.950,,",
        "21,0.9,0.5,0.8",
        "22,0.7,,",
    ]


def test_scorer_accuracy_is_the_share_of_signs_that_are_the_truth():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.2])
    assert scorer_accuracy(logits, np.array([1.0, 0.0, 0.0, 0.0])) == 0.75
    with pytest.raises(ValueError, match="4 scores against 3 items"):
        scorer_accuracy(logits, np.ones(3))


def test_noise_sweep_method_variants():
    """``--methods 'RE-CPO em.epoch_m_step=true'``: a method with fields of its sections
    set (TOML values), run after the grid's methods of a setting and paired with the
    plain loss of its first word."""
    sweep = load_example("noise_sweep")
    name = 'RE-CPO em.epoch_m_step=true loss.variant="nll" em.temperature=20'
    method = sweep.variant(name, 0.2)
    assert (method.name, method.family, method.robust) == (name, "cpo", True)
    assert method.em == {"epoch_m_step": True, "temperature": 20}
    assert method.loss == {"beta": sweep.BETA["cpo"], "variant": "nll"}
    assert sweep.variant("RE-CPO", 0.2) == next(m for m in sweep.methods(0.2) if m.name == "RE-CPO")
    assert sweep.plain_name(name) == "CPO" and sweep.plain_name("RE-DPO") == "DPO"
    with pytest.raises(ValueError, match="section.field=value"):
        sweep.variant("RE-CPO epoch_m_step=true", 0.2)
    with pytest.raises(ValueError, match="section.field=value"):
        sweep.variant("RE-CPO optim.epochs=2", 0.2)
    with pytest.raises(ValueError, match="not a TOML value"):
        sweep.variant("RE-CPO loss.variant=nll", 0.2)  # a TOML string needs quotes
    with pytest.raises(ValueError, match="unknown method 'RE-XPO'"):
        sweep.variant("RE-XPO em.alpha=0.2", 0.2)
    grid = sweep.Grid(settings=(("pool", 0.2),), only=("CPO", name))
    assert sweep.run_order(grid) == [(("pool", 0.2), ["CPO", name])]
    frame = pd.DataFrame(
        {
            "noise": "pool",
            "flip_rate": 0.2,
            "seed": [10, 11, 10, 11],
            "method": ["CPO", "CPO", name, name],
            "re_po": [False, False, True, True],
            "accuracy": [0.75, 0.70, 0.77, 0.71],
        }
    )
    gains = sweep.paired_gains(frame)
    assert list(gains.family) == ["CPO"] and gains["mean"].iloc[0] == pytest.approx(0.015)


def test_noise_sweep_file_stems_and_pairs(tmp_path, monkeypatch):
    """``--pairs N`` trains on N pairs per seed and names its files ``-pairsN``, before
    ``-epochs1``; ``--targets --pairs N`` reads those files."""
    sweep = load_example("noise_sweep")
    assert sweep.stem_for(False, 4) == "noise-sweep"
    assert sweep.stem_for(False, 1) == "noise-sweep-epochs1"
    assert sweep.stem_for(False, 1, 8192) == "noise-sweep-pairs8192-epochs1"
    assert sweep.stem_for(True, 3, 64) == "noise-sweep-quick-pairs64-epochs3"
    grids = []
    monkeypatch.setattr(sweep, "run_grid", lambda grid, *a, **k: grids.append(grid))
    monkeypatch.setattr(sweep, "markdown_tables", lambda frame: "")
    monkeypatch.setattr(sweep, "plot", lambda frame, path: None)
    monkeypatch.setattr(sweep, "headline", lambda frame: {})
    run = {"noise": "single", "flip_rate": 0.4, "seed": 20, "epochs": 1, "wall_s": 1, "cpu_s": 1}
    runs = [
        {**run, "method": "DPO", "family": "dpo", "re_po": False, "accuracy": 0.90},
        {**run, "method": "RE-DPO", "family": "dpo", "re_po": True, "accuracy": 0.95},
    ]
    runs[1].update(temperature=1.0, calibrate=False, out_of_sample=True)
    runs[1].update(eta_true="[0.6]", eta_hat="[0.61]")
    pd.DataFrame(runs).to_csv(tmp_path / "noise-sweep-pairs64-epochs1.csv", index=False)
    args = ["--pairs", "64", "--epochs", "1", "--settings", "single:0.4", "--append"]
    result = sweep.main([*args, "--out", str(tmp_path)])
    (grid,) = grids
    assert grid.num_pairs == 64 and grid.optim["epochs"] == 1 and result["train_pairs"] == 64
    assert (tmp_path / "noise-sweep-pairs64-epochs1-table.md").exists()
    sweep.main(["--targets", "--pairs", "64", "--out", str(tmp_path)])
    targets = (tmp_path / "noise-sweep-pairs64-targets.md").read_text()
    assert "| one pass | K=1 0.4 | DPO | 1 | T=1 oos |  | +0.050 | 0.010 |" in targets


def test_with_fields_and_recovery_variants():
    """``with_fields`` sets fields of a method's sections from TOML values and names the
    result after them; the recovery script's ``--methods`` reads the same syntax."""
    base = Method("RE-DPO", "dpo", True, {"beta": 0.3}, em={"alpha": 0.2})
    assert with_fields(base, []) is base
    out = with_fields(base, ["em.epoch_m_step=true", "noise.eta_init=0.8"])
    assert out.name == "RE-DPO em.epoch_m_step=true noise.eta_init=0.8"
    assert out.em == {"alpha": 0.2, "epoch_m_step": True} and out.noise == {"eta_init": 0.8}
    assert base.em == {"alpha": 0.2} and base.noise == {}  # the original is left as it was
    recovery = load_example("reliability_recovery")
    method = recovery.method_named("RE-DPO em.epoch_m_step=true")
    assert method.em == {**recovery.RE_DPO.em, "epoch_m_step": True}
    with pytest.raises(ValueError, match="unknown method 'RE-IPO'"):
        recovery.method_named("RE-IPO em.epoch_m_step=true")
    with pytest.raises(SystemExit):
        recovery.main(["--methods", "RE-DPO em.epoch_m_step", "--quick"])


def test_reliability_recovery_quick(tmp_path, capsys):
    """--quick: rho = 0.2 and 0.8, one annotator and two (the grid's seed-10 runs). At 0.2
    the rule is learned; at 0.8 one annotator's estimate mirrors (the model learns the
    flipped rule), and beside a reliable annotator the noisy one's eta falls from 0.9 to
    below 0.3 with the right rule learned."""
    recovery = load_example("reliability_recovery")
    result = recovery.main(["--quick", "--out", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    frame = pd.read_csv(tmp_path / "reliability-recovery-quick.csv")
    assert len(frame) == 2 * 1 + 2 * 2  # (one + two annotators) per flip rate
    assert (tmp_path / "reliability-recovery-quick.png").stat().st_size > 10_000
    assert (tmp_path / "reliability-recovery-quick-table.md").read_text().count("\n| ") == 3
    row = frame.set_index(["setting", "flip_rate", "role"])
    low = row.loc[("one", 0.2, "noisy")]
    assert low.accuracy > 0.9 and abs(low.eta_hat - low.eta_true) < 0.2, low
    mirrored = row.loc[("one", 0.8, "noisy")]  # eta_hat near 1 - eta_true, not eta_true
    assert mirrored.eta_hat > 0.75 and mirrored.accuracy < 0.2, mirrored
    anchored = row.loc[("two", 0.8, "noisy")]  # started at 0.9
    assert anchored.eta_hat < 0.3 and anchored.accuracy > 0.9, anchored
    assert row.loc[("two", 0.8, "reliable")].eta_hat > 0.85


def test_demo_eta_floor(tmp_path, capsys):
    """The demo's design drawn three times: the oracle's eta is the realised share (MAE 0
    against it), and its error against the true eta is the realised shares' own; the
    labels alone leave an error against the realised shares; scores right on 95% of the
    pairs come closer than the labels alone."""
    floor = load_example("demo_eta_floor")
    result = floor.main(["--seeds", "3", "--out", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    frame = pd.read_csv(tmp_path / "demo-eta-floor.csv")
    assert len(frame) == 3 * 7 and set(frame.seed) == {0, 1, 2}
    oracle = frame[frame.scorer == "truth known"]
    np.testing.assert_allclose(oracle.mae_realised, 0.0, atol=1e-4)
    np.testing.assert_allclose(oracle.mae_true, oracle.realised_mae_true, atol=1e-4)
    labels_only = frame[frame.scorer == "labels only"]
    assert (labels_only.mae_realised > 0.005).all()
    assert result["mae"]["accuracy 0.95"]["realised"] < result["mae"]["labels only"]["realised"]
    table = (tmp_path / "demo-eta-floor-table.md").read_text()
    assert table.count("\n| ") == 7  # one row per scorer
