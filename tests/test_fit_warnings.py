"""Warnings a statistician expects, at fit time and in the result (repo.diagnostics.checks)."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.diagnostics.checks import (
    ESS_MIN,
    RHAT_MAX,
    FitCheckWarning,
    FitWarning,
    convergence_warnings,
    laplace_warnings,
    run_warnings,
    sampler_warnings,
)
from repo.diagnostics.compat import from_dict, group
from repo.fit import NoiseFit, fit_noise
from repo.inference.bayes import BayesSettings
from repo.inference.nuts import DivergenceWarning

IDS = ["ann0", "ann1", "ann2"]


def posterior(eta, mu=None):
    """An ArviZ posterior of ``(chain, draw, annotator)`` draws of eta (and scalar mu)."""
    variables = {"eta": eta} if mu is None else {"eta": eta, "mu": mu}
    data = from_dict(
        {"posterior": variables},
        coords={"annotator": IDS},
        dims={"eta": ["annotator"]},
        attrs={},
    )
    return group(data, "posterior")


def test_well_mixed_draws_pass():
    rng = np.random.default_rng(0)
    eta = 0.8 + 0.02 * rng.standard_normal((4, 500, 3))
    assert convergence_warnings(posterior(eta)) == []


def test_poorly_mixed_draws_give_r_hat_and_ess_warnings_naming_the_annotator():
    # ann1's chains sit at different levels and wander (a random walk): r_hat ~ 1.1+,
    # ESS ~ 10; the others are independent draws.
    rng = np.random.default_rng(1)
    eta = 0.8 + 0.02 * rng.standard_normal((4, 500, 3))
    walk = np.cumsum(0.01 * rng.standard_normal((4, 500)), axis=1)
    eta[:, :, 1] = 0.7 + walk + np.array([0.0, 0.05, -0.05, 0.1])[:, None]
    mu = rng.standard_normal((4, 500))
    found = {w.check: w for w in convergence_warnings(posterior(eta, mu))}
    assert set(found) == {"r_hat", "ess_bulk", "ess_tail"}
    r_hat = found["r_hat"]
    assert r_hat.annotators == ("ann1",)
    assert r_hat.parameters == ("eta[ann1]",)
    assert r_hat.value > RHAT_MAX
    assert "eta[ann1]" in r_hat.message and "ann1" in r_hat.message
    assert "--draws" in r_hat.remedy
    assert found["ess_bulk"].value < ESS_MIN and found["ess_bulk"].annotators == ("ann1",)


def test_a_stuck_chain_is_not_mistaken_for_convergence():
    # A constant parameter gives R-hat NaN in ArviZ: reported, not passed.
    rng = np.random.default_rng(2)
    eta = 0.8 + 0.02 * rng.standard_normal((2, 200, 3))
    eta[:, :, 2] = 0.9
    found = {w.check: w for w in convergence_warnings(posterior(eta))}
    assert found["r_hat"].annotators == ("ann2",)


def test_sampler_warnings_count_divergences_and_tree_depth_hits():
    diverging = np.zeros((2, 50), dtype=bool)
    diverging[1, [3, 9]] = True
    depth = np.full((2, 50), 3)
    depth[0, :10] = 10
    found = {
        w.check: w for w in sampler_warnings({"diverging": diverging, "tree_depth": depth}, 10)
    }
    assert found["divergences"].value == 2
    assert "2 divergent transition(s)" in found["divergences"].message
    assert "chains [1]" in found["divergences"].message
    assert "--target-accept" in found["divergences"].remedy
    assert found["tree_depth"].value == 10
    assert "maximum tree depth 10" in found["tree_depth"].message
    assert "max_tree_depth" in found["tree_depth"].remedy
    clean = {"diverging": np.zeros((2, 50), bool), "tree_depth": np.full((2, 50), 4)}
    assert sampler_warnings(clean, 10) == []


def boundary_labels(seed=0, items=150):
    """Crowd labels: 'good' never wrong (EM drives eta to 1), two 80% annotators,
    and 'once' with a single label against the majority (EM drives eta to 0)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, items)
    rows = []
    for i, t in enumerate(truth):
        for name, p in (("good", 1.0), ("ok1", 0.8), ("ok2", 0.8)):
            rows.append({"annotator": name, "item": f"i{i}", "label": int(t if rng.random() < p else 1 - t)})  # fmt: skip
    rows.append({"annotator": "once", "item": "i0", "label": int(1 - truth[0])})
    return pd.DataFrame(rows)


def test_a_boundary_laplace_fit_names_the_annotators_and_suggests_a_prior():
    with pytest.warns(FitCheckWarning, match="boundary: 2 annotator") as caught:
        fit = fit_noise(boundary_labels(), format="binary", method="em")
    assert len([w for w in caught if w.category is FitCheckWarning]) == len(fit.warnings) == 2
    found = {w.check: w for w in fit.warnings}
    assert set(found) == {"laplace", "boundary"}
    boundary = found["boundary"]
    assert set(boundary.annotators) == {"good", "once"}
    assert "good (150 labels" in boundary.message and "once (1 labels" in boundary.message
    assert "--prior" in boundary.remedy
    assert "eta[good]" in boundary.parameters
    assert "improper" in found["laplace"].message
    assert "--prior" in found["laplace"].remedy
    # the suggested prior keeps the estimates inside (0, 1): a proper fit, no warning
    with_prior = fit_noise(boundary_labels(), format="binary", method="em", prior="beta:5,2")
    assert with_prior.warnings == []


def test_laplace_warnings_from_a_summary_table():
    table = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "n_labels": [50, 60, 1],
            "eta": [0.9, 0.95, 0.3],
            "eta_lo90": [0.8, 0.9, 0.01],
            "eta_hi90": [0.95, 0.9, 0.9],
        }
    )
    found = {w.check: w for w in laplace_warnings(table, improper=[2])}
    assert found["boundary"].annotators == ("b",)  # an interval of no width
    assert found["laplace"].annotators == ("c",)
    assert "c (1 labels" in found["laplace"].message


def scored_table(n=300, k=3, seed=4):
    sim = simulate_labels(num_items=n, num_annotators=k, shared_truth=False, seed=seed)
    return pd.DataFrame(
        {"annotator": [f"r{a}" for a in sim.annotator], "label": sim.label, "score": sim.scores}
    )


def test_nuts_hitting_the_tree_depth_limit_is_warned():
    settings = BayesSettings(num_chains=2, warmup=20, draws=20, max_tree_depth=1)
    fit = fit_noise(scored_table(), format="scored", method="nuts", bayes=settings)
    stats = fit.posterior.draws.sample_stats
    assert stats["tree_depth"].max() <= 1 and stats["n_steps"].max() <= 1
    found = {w.check: w for w in fit.warnings}
    assert "tree_depth" in found
    assert found["tree_depth"].value == int((stats["tree_depth"] >= 1).sum())
    # the idata carries the statistic for ArviZ
    assert "tree_depth" in group(fit.to_inference_data(log_likelihood=False), "sample_stats")


def test_a_diverged_run_is_warned_not_just_reported():
    wild = BayesSettings(
        num_chains=2,
        warmup=10,
        draws=30,
        kernel_options={"step_size": 40.0, "adapt_step_size": False},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        fit = fit_noise(scored_table(), format="scored", method="nuts", bayes=wild)
    found = {w.check: w for w in fit.warnings}
    assert found["divergences"].value == fit.divergences > 0
    assert "r_hat" in found  # the chains are stuck: R-hat is flagged too, not printed bare


def test_warnings_are_saved_and_loaded_with_the_fit(tmp_path):
    fit = fit_noise(boundary_labels(), format="binary", method="em")
    assert fit.warnings
    loaded = NoiseFit.load(fit.save(tmp_path / "fit"))
    assert loaded.warnings == fit.warnings
    document = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert [w["check"] for w in document["warnings"]] == [w.check for w in fit.warnings]
    assert NoiseFit.from_dict(json.loads(fit.to_json())).warnings == fit.warnings
    assert run_warnings(document) == fit.warnings
    # an older result without the field: computed from its table and inference facts
    del document["warnings"]
    assert {w.check for w in run_warnings(document)} == {"laplace", "boundary"}
    with pytest.raises(ValueError, match="without remedy"):
        FitWarning.from_dict({"check": "r_hat", "message": "x"})


def test_an_unfinished_svi_optimisation_is_warned():
    settings = BayesSettings(svi_steps=50, svi_draws=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_noise(scored_table(), format="scored", method="svi", bayes=settings)
    assert fit.inference["converged"] is False
    (found,) = [w for w in fit.warnings if w.check == "optimisation"]
    assert "SVI stopped after 50 steps" in found.message and "--svi-steps" in found.remedy


def test_infinite_values_survive_json():
    warning = FitWarning("r_hat", "m", "r", ("a",), ("eta[a]",), float("inf"))
    record = json.loads(json.dumps(warning.to_dict()))
    assert FitWarning.from_dict(record) == warning


def test_cli_prints_the_warnings_and_records_them(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    scored_table().to_csv(path, index=False)
    out = tmp_path / "fit.json"
    code = main(
        ["fit-noise", str(path), "--format", "scored", "--method", "nuts", "--chains", "2",
         "--warmup", "30", "--draws", "30", "--out", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    document = json.loads(out.read_text())
    checks = [w["check"] for w in document["warnings"]]
    assert "ess_bulk" in checks  # 60 draws in all cannot reach 400
    assert "[re-po] WARNING: bulk ESS under 400" in err
    for record in document["warnings"]:
        assert record["message"] in err and record["remedy"] in err
    assert "FitCheckWarning" not in err  # printed once, as the CLI's own lines
