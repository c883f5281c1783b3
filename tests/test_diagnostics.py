"""ArviZ conversion, PSIS-LOO model comparison, predictive checks and the report."""

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch

from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.diagnostics import (
    compare_em_bayes,
    compare_models,
    diagnose,
    load_run,
    predictive_checks,
    to_inference_data,
)
from repo.diagnostics.checks import sampler_warnings
from repo.diagnostics.compat import group, group_names
from repo.fit import fit_noise
from repo.inference.bayes import BayesSettings, infer
from repo.inference.em import fit_em
from repo.inference.enumeration import enumerate_posterior
from repo.noise import LabelData, make_noise_model
from repo.scorers import FixedLogits

F64 = torch.float64
FAST = BayesSettings(num_chains=2, warmup=100, draws=100, laplace_draws=400)
# for tests that check the shape of a result, not what it says
STRUCTURE = BayesSettings(num_chains=2, warmup=30, draws=20, laplace_draws=50)


def fitted(name, sim, k, shared=False, prior=None):
    if shared:
        data = LabelData.from_labels(
            sim.annotator, sim.label, sim.item, shared_truth=True, num_annotators=k
        )
    else:
        data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=k)
    scores = torch.as_tensor(sim.scores)
    scorer = FixedLogits(scores if shared else scores[sim.item])
    model = make_noise_model(name, k, prior=prior)
    fit_em(model, scorer, data)
    return model, scorer, data


@pytest.mark.parametrize("shared", [False, True])
def test_inference_data_groups_and_marginal_log_likelihood(shared):
    k = 3
    sim = simulate_labels(
        num_items=300, num_annotators=k, labels_per_item=2 if shared else 1,
        shared_truth=shared, seed=1,
    )  # fmt: skip
    prior = dist.Beta(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    model, scorer, data = fitted("symmetric", sim, k, shared, prior)
    result = infer("nuts", model, scorer, data, STRUCTURE)
    ids = ["x", "y", "z"]
    idata = to_inference_data(result, annotator_ids=ids)
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "constant_data"} <= set(
        group_names(idata)
    )
    posterior = group(idata, "posterior")
    assert posterior["eta"].dims == ("chain", "draw", "annotator")
    assert list(posterior["annotator"].values) == ids
    assert posterior.sizes["chain"] == 2 and posterior.sizes["draw"] == STRUCTURE.draws
    assert "diverging" in group(idata, "sample_stats")
    name, unit = ("o_item", "item") if shared else ("o", "label")
    log_lik = group(idata, "log_likelihood")[name]
    assert log_lik.dims == ("chain", "draw", unit)
    assert log_lik.shape[-1] == data.num_units
    observed = group(idata, "observed_data")["o"]
    assert observed.shape == (data.num_labels,)
    assert np.array_equal(observed.values, sim.label)
    constant = group(idata, "constant_data")
    assert np.array_equal(constant["annotator_index"].values, sim.annotator)
    # the stored log-likelihood is the marginal one (z summed out) at that draw
    draw = result.draws.draw(1, 7)
    from pyro import poutine

    exact = enumerate_posterior(
        poutine.condition(result.bayes_model, data=draw), result.logits, data
    )
    assert np.allclose(log_lik.values[1, 7], exact.log_likelihood.numpy())
    assert idata.attrs["method"] == "nuts" and idata.attrs["model"] == "symmetric"


GENERATORS = ["symmetric", "spammer", "boltzmann"]


@pytest.mark.parametrize("generator", GENERATORS)
def test_loo_prefers_the_generating_model(generator):
    # Must-show: the generating model within one SE of the best; the non-nested
    # alternative (Boltzmann against the flip models) worse by more than two SE.
    k = 4
    sim = simulate_labels(
        num_items=3000, num_annotators=k, shared_truth=False, model=generator, seed=20
    )
    models = {}
    for name in GENERATORS:
        model, scorer, data = fitted(name, sim, k)
        result = infer("em", model, scorer, data, FAST)
        models[name] = to_inference_data(result)
    table = compare_models(models)
    best = table.index[0]
    assert table.loc[generator, "elpd_diff"] <= table.loc[generator, "dse"], table
    rivals = [m for m in GENERATORS if (m == "boltzmann") != (generator == "boltzmann")]
    for rival in rivals:
        gap = table.loc[rival, "elpd_diff"] - (table.loc[generator, "elpd_diff"])
        assert best != rival
        assert table.loc[rival, "elpd_diff"] > 2 * table.loc[rival, "dse"], (rival, table)
        assert gap > 0


def test_comparison_refuses_different_units():
    sim = simulate_labels(num_items=200, num_annotators=2, shared_truth=False, seed=2)
    a = to_inference_data(infer("em", *fitted("symmetric", sim, 2), STRUCTURE))
    sim2 = simulate_labels(num_items=150, num_annotators=2, shared_truth=False, seed=2)
    b = to_inference_data(infer("em", *fitted("symmetric", sim2, 2), STRUCTURE))
    with pytest.raises(ValueError, match="not on the same truth units"):
        compare_models({"a": a, "b": b})


def test_predictive_checks_of_a_well_specified_model():
    sim = simulate_labels(num_items=2000, num_annotators=3, shared_truth=False, seed=3)
    prior = dist.Beta(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    result = infer("nuts", *fitted("symmetric", sim, 3, prior=prior), FAST)
    checks = predictive_checks(to_inference_data(result), num_draws=100)
    assert set(checks.statistic) == {"agreement", "balance"}
    assert len(checks) == 2 * (3 + 1)
    assert checks.p_value.between(0, 1).all()
    pooled = checks[checks.annotator == "all"]
    assert pooled.p_value.between(0.025, 0.975).all(), pooled
    agreement = checks[(checks.statistic == "agreement") & (checks.annotator != "all")]
    assert (
        agreement.observed.between(
            agreement.replicated_lo90 - 0.03, agreement.replicated_hi90 + 0.03
        )
    ).all()


def labels_file(tmp_path, n=600, k=3, seed=4):
    sim = simulate_labels(num_items=n, num_annotators=k, shared_truth=False, seed=seed)
    frame = pd.DataFrame(
        {"annotator": [f"r{a}" for a in sim.annotator], "label": sim.label, "score": sim.scores}
    )
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    return path


# EM's pointwise log-likelihood kept for 200 of its 2,000 Laplace draws (the NUTS fit
# has 200): enough for the report's PSIS-LOO and predictive-check sections
LOO_DRAWS = ("--loo-draws", "200")


def fit_cli(tmp_path, path, method, model="symmetric", extra=()):
    out = tmp_path / f"{model}-{method}.json"
    code = main(
        ["fit-noise", str(path), "--format", "scored", "--model", model, "--method", method,
         "--chains", "2", "--warmup", "100", "--draws", "100", "--prior", "beta:2,1"
         if model != "boltzmann" else "none", "--idata", str(tmp_path / f"{model}-{method}.nc"),
         "--trajectory", str(tmp_path / f"{model}-{method}.jsonl"), "--out", str(out), *extra]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def three_fits(tmp_path_factory):
    """One set of labels fitted three ways by ``re-po fit-noise``: NUTS and EM of the
    symmetric flip, EM of the Boltzmann model (each RESULT.json beside its side files)."""
    tmp = tmp_path_factory.mktemp("fits")
    path = labels_file(tmp)
    nuts = fit_cli(tmp, path, "nuts")
    em = fit_cli(tmp, path, "em", extra=LOO_DRAWS)
    boltzmann = fit_cli(tmp, path, "em", model="boltzmann", extra=LOO_DRAWS)
    return tmp, (nuts.name, em.name, boltzmann.name)


def copied_fits(fits, tmp_path):
    """The module's fits, copied to this test's folder (which may edit them)."""
    source, names = fits
    shutil.copytree(source, tmp_path / "fits")
    return [tmp_path / "fits" / name for name in names]


def test_diagnose_writes_the_report(three_fits, tmp_path, capsys):
    nuts, em, boltzmann = copied_fits(three_fits, tmp_path)
    out = tmp_path / "report"
    code = main(["diagnose", str(nuts), str(em), str(boltzmann), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    text = (out / "report.md").read_text()
    for heading in (
        "## Annotator reliability",
        "## EM against NUTS",
        "## Convergence diagnostics",
        "## PSIS-LOO",
        "## Posterior predictive checks",
        "## Model comparison",
    ):
        assert heading in text
    assert "divergences: 0" in text
    for figure in ("forest", "w", "trace", "calibration", "trajectories"):
        assert (out / f"fit1-{figure}.png").stat().st_size > 1000
        assert f"(fit1-{figure}.png)" in text
    comparison = compare_em_bayes(load_run(em), load_run(nuts))
    assert comparison.share_inside == 1.0
    assert set(comparison.table.columns) >= {"em_eta", "em_lo90", "bayes_lo90", "em_inside"}
    assert comparison.seconds["em"] > 0 and comparison.seconds["bayes"] > 0
    # a run directory with a RESULT.json is read too
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(em, run_dir / "RESULT.json")
    document = json.loads(em.read_text())
    document["files"] = {}
    (run_dir / "RESULT.json").write_text(json.dumps(document))
    report = diagnose([run_dir], tmp_path / "report2")
    assert "No InferenceData" in report.read_text()


def test_diagnose_warns_of_divergences(three_fits, tmp_path, capsys):
    nuts, _, _ = copied_fits(three_fits, tmp_path)
    document = json.loads(nuts.read_text())
    document["divergences"] = 3
    stats = {"diverging": np.zeros((2, 100), bool)}
    stats["diverging"][0, :3] = True
    document["warnings"] = [w.to_dict() for w in sampler_warnings(stats)]
    nuts.write_text(json.dumps(document))
    report = diagnose([nuts], tmp_path / "out")
    assert "`divergences`: 3 divergent transition(s)" in report.read_text()


@pytest.fixture(scope="module")
def small_em_fit(tmp_path_factory):
    """An EM fit of 200 labels by ``re-po fit-noise`` (the folder and the result's name)."""
    tmp = tmp_path_factory.mktemp("small")
    return tmp, (fit_cli(tmp, labels_file(tmp, n=200), "em", extra=LOO_DRAWS).name,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"model": "five-coin"}, "unknown noise model 'five-coin'"),
        ({"model": "two-coin"}, "does not belong to RESULT.json's 'two-coin'"),
        ({"files": {"inference_data": "missing.nc"}}, "does not exist"),
    ],
)
def test_diagnose_refuses_foreign_results(small_em_fit, tmp_path, capsys, change, message):
    (em,) = copied_fits(small_em_fit, tmp_path)
    document = json.loads(em.read_text())
    document.update(change)
    bad = em.parent / "bad.json"
    bad.write_text(json.dumps(document))
    code = main(["diagnose", str(bad), "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_diagnose_refuses_other_inputs(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a RESULT.json nor a training run" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{not json")
    assert main(["diagnose", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    path_a = labels_file(tmp_path, n=200, seed=5)
    a = fit_cli(tmp_path, path_a, "em", extra=LOO_DRAWS)
    other = tmp_path / "other"
    other.mkdir()
    b = fit_cli(other, labels_file(other, n=150, seed=6), "em", extra=LOO_DRAWS)
    assert main(["diagnose", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "not fits to the same labels" in capsys.readouterr().err


def test_fit_noise_python_api_to_inference_data():
    sim = simulate_labels(num_items=300, num_annotators=3, shared_truth=False, seed=7)
    frame = pd.DataFrame({"annotator": sim.annotator, "label": sim.label, "score": sim.scores})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_noise(
            frame, format="scored", method="svi", bayes=BayesSettings(svi_steps=200, svi_draws=100)
        )
    idata = fit.to_inference_data()
    assert idata.attrs["method"] == "svi"
    assert group(idata, "posterior").sizes["chain"] == 1
    assert list(group(idata, "posterior")["annotator"].values) == ["0", "1", "2"]


def test_predictive_checks_of_one_annotator_named_all(tmp_path):
    # data without annotator ids have one virtual annotator, "all": its checks and the
    # pooled row share the name, and the report's figure still shows both (re-po
    # diagnose of a one-annotator run failed on the duplicate name)
    from repo.data.labels import GLOBAL_ANNOTATOR
    from repo.diagnostics import plots

    sim = simulate_labels(num_items=300, num_annotators=1, shared_truth=False, seed=4)
    result = infer("nuts", *fitted("symmetric", sim, 1), STRUCTURE)
    idata = to_inference_data(result, annotator_ids=[GLOBAL_ANNOTATOR])
    checks = predictive_checks(idata, num_draws=20)
    assert (checks.annotator == "all").all() and len(checks) == 2 * 2
    assert checks.pooled.sum() == 2  # one pooled row per statistic
    one = checks[~checks.pooled].drop(columns="pooled").reset_index(drop=True)
    pooled = checks[checks.pooled].drop(columns="pooled").reset_index(drop=True)
    pd.testing.assert_frame_equal(one, pooled)  # one annotator: its labels are all labels
    figure = plots.plot_predictive(checks)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["all", "all"]
    # the report counts annotators with extreme p-values, not the pooled rows too
    from repo.diagnostics.report import extreme_annotators

    everywhere = checks.assign(p_value=0.01)
    assert len(extreme_annotators(everywhere)) == 2  # one annotator, two statistics
    assert "pooled" not in extreme_annotators(everywhere)
    assert extreme_annotators(checks.assign(p_value=0.5)).empty
